"""What the tuning changed: sample completions from a model and score them with the run's rewards.

Scores are means over held-out prompts, `samples` completions each, drawn with the same sampling
settings as training (temperature 1 by default) and a fixed seed, so base and tuned models are
compared on the same prompts with the same random stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ragrpo.rag import generate
from ragrpo.rewards import completion_text, resolve_rewards


@dataclass
class EvalResult:
    rewards: dict[str, float]
    total: float
    completion_chars: float
    completions: list[str] = field(default_factory=list)


def score(prompts: list, completions: list, reward_specs: list[str]) -> tuple[dict[str, float], float]:
    """Mean of each reward over the completions, and the mean weighted total."""
    funcs, weights = resolve_rewards(reward_specs)
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
    means, total = score(prompts, completions, reward_specs)
    chars = sum(len(completion_text(c)) for c in completions) / len(completions)
    return EvalResult(rewards=means, total=total, completion_chars=chars, completions=completions)
