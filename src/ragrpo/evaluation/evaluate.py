"""What the tuning changed: sample completions from a model and score them with the run's rewards.

Scores are means over held-out prompts, `samples` completions each, drawn with the same sampling
settings as training (temperature 1 by default) and a fixed seed, so base and tuned models are
compared on the same prompts with the same random stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ragrpo.generation.rag import generate
from ragrpo.rewards.builtin import completion_text
from ragrpo.rewards.registry import resolve_rewards


@dataclass
class EvalResult:
    rewards: dict[str, float]
    total: float
    completion_chars: float
    completions: list[str] = field(default_factory=list)


def score(prompts: list, completions: list, reward_specs: list[str], *, budget: int | None = None,
          tokenizer=None) -> tuple[dict[str, float], float]:
    """Mean of each reward over the completions, and the mean weighted total; `budget` (the completions' token
    budget) and `tokenizer` go to the rewards that count tokens."""
    funcs, weights = resolve_rewards(reward_specs, budget=budget, tokenizer=tokenizer)
    means, total = {}, 0.0
    for func, weight in zip(funcs, weights):
        values = [v for v in func(prompts=prompts, completions=completions) if v is not None]
        means[func.__name__] = sum(values) / len(values) if values else float("nan")
        total += weight * means[func.__name__]
    return means, total


def evaluate(model, tokenizer, conversations: list[list[dict]], reward_specs: list[str], *, samples: int = 2,
             max_new_tokens: int = 128, temperature: float = 1.0, seed: int = 0, batch_size: int = 16) -> EvalResult:
    """Sample `samples` completions per conversation and score them."""
    prompts = [c for c in conversations for _ in range(samples)]
    completions = []
    for start in range(0, len(prompts), batch_size):
        completions += generate(model, tokenizer, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                temperature=temperature, seed=seed + start)
    means, total = score(prompts, completions, reward_specs, budget=max_new_tokens, tokenizer=tokenizer)
    chars = sum(len(completion_text(c)) for c in completions) / len(completions)
    return EvalResult(rewards=means, total=total, completion_chars=chars, completions=completions)


# ---- comparing a tuned model with its base --------------------------------------------------------


@dataclass
class Comparison:
    prompts: int
    samples: int
    base: EvalResult
    tuned: EvalResult

    def table(self) -> str:
        rows = [("", "base", "tuned")]
        rows += [(f"{name} (mean)", f"{self.base.rewards[name]:.2f}", f"{self.tuned.rewards[name]:.2f}")
                 for name in self.base.rewards]
        rows.append(("total reward (mean)", f"{self.base.total:.2f}", f"{self.tuned.total:.2f}"))
        rows.append(("completion length, chars", f"{self.base.completion_chars:.1f}",
                     f"{self.tuned.completion_chars:.1f}"))
        return "\n".join(f"{a:<28}{b:>10}{c:>10}" for a, b, c in rows)

    def to_dict(self) -> dict:
        side = lambda r: {"rewards": r.rewards, "total": r.total, "completion_chars": r.completion_chars}
        return {"prompts": self.prompts, "samples": self.samples, "base": side(self.base), "tuned": side(self.tuned)}


def compare(model: str, base: str | None, cfg, *, samples: int = 2, max_new_tokens: int = 128,
            temperature: float = 1.0, seed: int = 0, max_prompts: int | None = None) -> Comparison:
    """Score `model` and `base` on the held-out prompts of `cfg`'s dataset, same prompts, same seed."""
    from ragrpo import RagrpoError
    from ragrpo.models import load_model
    from ragrpo.tuning.train import split_prompts

    tuned_model, tokenizer = load_model(model)
    _, _, held = split_prompts(cfg, tokenizer)
    if not held:
        raise RagrpoError(f"{cfg.dataset}: no held-out prompts (held_out is {cfg.held_out})")
    held = held[:max_prompts] if max_prompts else held
    held = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in held]
    settings = {"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    tuned = evaluate(tuned_model, tokenizer, held, cfg.rewards, **settings)
    del tuned_model
    base_model, base_tokenizer = load_model(base)
    return Comparison(len(held), samples, evaluate(base_model, base_tokenizer, held, cfg.rewards, **settings), tuned)


def compare_run(model: str, base: str | None = None, *, dataset: str | None = None,
                prompt_template: str | None = None, rewards: list[str] | None = None,
                max_new_tokens: int | None = None, **settings) -> Comparison:
    """`compare` for a run folder (its merged model, dataset, template, rewards and completion length are
    reused unless given) or for a plain model folder (builtin:movies, the write-up's rewards, 128 tokens)."""
    from ragrpo.config import PRESETS, build_run_config
    from ragrpo.tuning.train import load_run_config

    run_dir = Path(model)
    if (run_dir / "config.json").exists() and (run_dir / "merged").exists():
        cfg = load_run_config(run_dir)
        model = str(run_dir / "merged")
        cfg.dataset = dataset or cfg.dataset
        cfg.prompt_template = prompt_template or cfg.prompt_template
        cfg.rewards = rewards or cfg.rewards
        tokens = {**PRESETS[cfg.preset], **cfg.grpo}.get("max_completion_length", 128)
    else:
        cfg = build_run_config(dataset=dataset, prompt_template=prompt_template, rewards=rewards or None)
        tokens = 128
    return compare(model, base, cfg, max_new_tokens=max_new_tokens or tokens, **settings)


# ---- training curves ------------------------------------------------------------------------------


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw a run's metrics.jsonl (total and per-reward means, KL, completion length, step time) to PNG."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ragrpo import RagrpoError

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise RagrpoError(f"{run_dir} has no metrics.jsonl: is it a ragrpo run folder?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "reward" in r]
    if not records:
        raise RagrpoError(f"{path} has no logged training steps yet")
    reward_keys = sorted(k for k in records[0] if k.startswith("rewards/") and k.endswith("/mean"))
    panels = [("total reward", ["reward"])] + [(k.split("/")[1], [k]) for k in reward_keys]
    panels += [("KL to reference", ["kl"]), ("completion length, tokens", ["completions/mean_length"]),
               ("step time, s", ["step_time"])]
    panels = [(title, keys) for title, keys in panels if any(k in records[0] for k in keys)]
    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    steps = [r["step"] for r in records]
    for axis, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            axis.plot(steps, [r.get(key, float("nan")) for r in records], marker=".", linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"GRPO run {Path(run_dir).resolve().name}")
    figure.tight_layout()
    target = Path(output) if output else Path(run_dir) / "curves.png"
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
