"""From reward names to the guarded functions the trainer calls.

Names resolve from `ragrpo.rewards.REWARDS`, else as `package.module:function` (or
`package.module.function`), else as `path/to/file.py:function`; `NAME=WEIGHT` gives a weight. Every
reward handed to the trainer is wrapped by `guarded`, which turns an exception, a list of the wrong
length, or a NaN/inf score into a `RewardError` that names the reward and the sample, instead of a
traceback from deep inside TRL.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

from ragrpo import RagrpoError
from ragrpo.rewards.builtin import REWARDS, Reward, RewardError, completion_text

# ---- resolving names ------------------------------------------------------------------------------


def _load_callable(spec: str) -> Callable:
    """`package.module:function`, `package.module.function` or `path/to/file.py:function`."""
    target, sep, attr = spec.rpartition(":")
    if not sep:
        target, _, attr = spec.rpartition(".")
    if not target or not attr:
        raise RagrpoError(f"unknown reward {spec!r}; built-in rewards: {', '.join(REWARDS)}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise RagrpoError(f"reward file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"ragrpo_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise RagrpoError(f"reward file {path} failed to import: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise RagrpoError(
                f"unknown reward {spec!r}: cannot import {target!r} ({exc}); built-in rewards: {', '.join(REWARDS)}"
            ) from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise RagrpoError(f"reward {spec!r}: {target} has no function {attr!r}")
    return func


def parse_reward(spec: str, *, budget: int | None = None, tokenizer=None) -> tuple[Callable, float]:
    """`NAME[=WEIGHT]` -> (reward function, weight); `budget` (the run's max_completion_length) and `tokenizer`
    go to a built-in that needs them."""
    name, sep, weight_text = spec.partition("=")
    name = name.strip()
    weight = 1.0
    if sep:
        try:
            weight = float(weight_text)
        except ValueError:
            raise RagrpoError(f"reward {spec!r}: weight {weight_text!r} is not a number") from None
        if not math.isfinite(weight):
            raise RagrpoError(f"reward {spec!r}: weight must be finite")
    func = REWARDS.get(name) or _load_callable(name)
    if isinstance(func, Reward):
        func = func.for_run(budget, tokenizer)  # a reward with state starts each run fresh
    return func, weight


def resolve_rewards(specs: list[str], *, budget: int | None = None,
                    tokenizer=None) -> tuple[list[Callable], list[float]]:
    """Guarded reward functions and their weights, in the order given."""
    pairs = [parse_reward(spec, budget=budget, tokenizer=tokenizer) for spec in specs]
    return [guarded(func) for func, _ in pairs], [weight for _, weight in pairs]


# ---- guarding against broken rewards --------------------------------------------------------------


def _preview(completion) -> str:
    text = completion_text(completion).replace("\n", " ")
    return text if len(text) <= 40 else text[:37] + "..."


def _first_failing_sample(func, prompts, completions, kwargs) -> int | None:
    """Re-run a failing reward one sample at a time to find which sample breaks it."""
    n = len(completions)
    for i in range(n):
        sliced = {k: [v[i]] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
        try:
            func(prompts=[prompts[i]] if prompts else prompts, completions=[completions[i]], **sliced)
        except Exception:
            return i
    return None


class Guarded:
    """A reward wrapped so that failures stop training with one line naming the reward and the sample.

    A class, so that a guarded reward pickles as the reward it wraps does."""

    def __init__(self, func: Callable):
        self.func = func
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        self.__doc__ = func.__doc__

    def __repr__(self) -> str:
        return f"<guarded reward {self.__name__}>"

    def __call__(self, prompts=None, completions=None, **kwargs):
        name, func = self.__name__, self.func
        completions = completions or []
        try:
            scores = func(prompts=prompts, completions=completions, **kwargs)
        except RagrpoError as exc:  # a built-in reward saying what the input lacks, e.g. a column
            raise RewardError(f"reward {name!r}: {exc}") from None
        except Exception as exc:
            i = _first_failing_sample(func, prompts, completions, kwargs)
            where = f"sample {i} ({_preview(completions[i])!r})" if i is not None else "a batch"
            raise RewardError(f"reward {name!r} raised {type(exc).__name__} on {where}: {exc}") from None
        scores = list(scores)
        if len(scores) != len(completions):
            raise RewardError(
                f"reward {name!r} returned {len(scores)} scores for {len(completions)} completions"
            )
        for i, score in enumerate(scores):
            if score is None:
                continue
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise RewardError(
                    f"reward {name!r} returned {score!r} (not a number) on sample {i} "
                    f"({_preview(completions[i])!r})"
                ) from None
            if not math.isfinite(value):
                raise RewardError(
                    f"reward {name!r} returned {value} on sample {i} ({_preview(completions[i])!r})"
                )
        return scores


def guarded(func: Callable) -> Guarded:
    """`func` guarded: an exception, a list of the wrong length, or a NaN/inf score is one `RewardError`."""
    return Guarded(func)


def score_text(specs: list[str], completion: str, *, context: list[str] | None = None,
               query: str | None = None) -> list[tuple[str, float | None]]:
    """Each reward's score for one completion, called as the trainer calls it (guarded), with `context`
    and `query` as that sample's dataset columns: for debugging a reward before a long run.

    >>> score_text(["length", "groundedness"], "Finch invented a sea island.", context=["Finch invented it."])
    [('length', -22.0), ('groundedness', 0.5)]
    """
    funcs, _ = resolve_rewards(specs)
    columns = {name: [value] for name, value in (("context", context), ("query", query)) if value is not None}
    prompts = [query] if query is not None else None
    return [(func.__name__, func(prompts=prompts, completions=[completion], **columns)[0]) for func in funcs]
