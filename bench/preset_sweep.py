"""How the default preset's learning rate was chosen: short runs at several rates, scored on held-out prompts.

Each point trains the packaged SmolLM2-135M-Instruct with `--preset default` (G=6, 128 tokens, beta 0.04,
the fast engine) at one learning rate and seed, then samples 2 completions for each of the 14 held-out
movies from the base and the tuned model (same prompts, same sampling seed) and records the write-up's
rewards. The issue's criterion is checked for every point: the tuned model's mean length error
|len - 50| at most half of the base model's, with token diversity not lower.

    python bench/preset_sweep.py --lr 2e-4 5e-4 1e-3 --seeds 0 --steps 40 \\
        --out bench/results/preset_sweep-cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def run_point(lr: float, seed: int, steps: int, workdir: Path, samples: int) -> dict:
    from ragrpo.config import build_run_config
    from ragrpo.evaluation.evaluate import compare_run
    from ragrpo.tuning.train import train

    output = workdir / f"lr{lr:g}-seed{seed}"
    cfg = build_run_config(output=str(output), learning_rate=lr, seed=seed, max_steps=steps,
                           grpo={"save_strategy": "no"})
    started = time.perf_counter()
    train(cfg, overwrite=True)
    train_seconds = time.perf_counter() - started
    comparison = compare_run(str(output), samples=samples)
    base, tuned = comparison.base, comparison.tuned
    # the length reward is -|len - 50|, so its negated mean is the mean length error
    error_base, error_tuned = -base.rewards["length"], -tuned.rewards["length"]
    point = {
        "learning_rate": lr,
        "seed": seed,
        "steps": steps,
        "train_seconds": train_seconds,
        "length_error": {"base": error_base, "tuned": error_tuned, "ratio": error_tuned / error_base},
        "token_diversity": {"base": base.rewards["token_diversity"], "tuned": tuned.rewards["token_diversity"]},
        "completion_chars": {"base": base.completion_chars, "tuned": tuned.completion_chars},
        "prompts": comparison.prompts,
        "samples": samples,
    }
    point["meets_criterion"] = (point["length_error"]["ratio"] <= 0.5
                                and point["token_diversity"]["tuned"] >= point["token_diversity"]["base"])
    print(f"lr {lr:g} seed {seed}: {train_seconds / 60:.1f} min, length error {error_base:.1f} -> {error_tuned:.1f} "
          f"({point['length_error']['ratio']:.2f}x), diversity {base.rewards['token_diversity']:.1f} -> "
          f"{tuned.rewards['token_diversity']:.1f}, criterion {'met' if point['meets_criterion'] else 'NOT met'}",
          flush=True)
    return point


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-4, 5e-4, 1e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--samples", type=int, default=2, help="completions per held-out prompt")
    parser.add_argument("--out", default="bench/results/preset_sweep.json")
    parser.add_argument("--workdir", default="/tmp/ragrpo-sweep")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ragrpo.models import quiet_transformers

    quiet_transformers()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    points = []
    for seed in args.seeds:
        for lr in args.lr:
            points.append(run_point(lr, seed, args.steps, Path(args.workdir), args.samples))
            record = {"cores": os.cpu_count(), "loadavg": os.getloadavg(), "points": points}
            Path(args.out).write_text(json.dumps(record, indent=2))  # after every point: partial sweeps survive
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
