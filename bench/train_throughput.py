"""GRPO training throughput: the write-up's TRL setup against ragrpo's engine settings, in one process.

Both sides train the same packaged SmolLM2-135M-Instruct with the same rank-8 LoRA on the same prompts
(one-sentence summaries of builtin:movies), G=6 completions of up to 128 tokens per prompt, 6
completions per optimizer step, and the same objective: the write-up's (clipped ratio, k3 KL with
beta 0.04 to the adapter-free model, per-sequence `grpo` aggregation). Only how the work is done
differs.

    baseline  the write-up's GRPOConfig through plain TRL: float32, gradient checkpointing on (TRL's
              default), one generate call per optimizer step, adamw_torch (the CPU fallback for
              paged_adamw_8bit)
    ragrpo    ragrpo's engine settings (`ragrpo.config.engine_settings`): bf16 autocast where the
              hardware has fast bf16, no gradient checkpointing

It prints completions per second, seconds per step, peak memory and the ratio, and writes JSON.

    python bench/train_throughput.py --steps 8 --out bench/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

# Generation for several steps in one call measured no faster here (see engine_settings); kept at 1.
STEPS_PER_GENERATION = 1


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(name: str, grpo_overrides: dict, steps: int, workdir: Path) -> dict:
    import torch

    from ragrpo.config import build_run_config
    from ragrpo.models import load_model
    from ragrpo.train import build_dataset, make_trainer

    cfg = build_run_config(preset="seed", max_steps=steps, output=str(workdir / name), seed=0,
                           grpo={"save_strategy": "no", "logging_steps": 1, **grpo_overrides})
    model, tokenizer = load_model(None)
    dataset = build_dataset(cfg, tokenizer)
    (workdir / name).mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(cfg, model, tokenizer, dataset, workdir / name)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    logs = [h for h in trainer.state.log_history if "reward" in h]
    completions = steps * trainer.args.per_device_train_batch_size
    tokens = sum(h["completions/mean_length"] * trainer.args.per_device_train_batch_size for h in logs)
    result = {
        "side": name,
        "steps": steps,
        "completions": completions,
        "completion_tokens": tokens,
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "completions_per_second": completions / seconds,
        "completion_tokens_per_second": tokens / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "settings": {k: getattr(trainer.args, k) for k in (
            "bf16", "gradient_checkpointing", "steps_per_generation", "generation_batch_size", "num_generations",
            "per_device_train_batch_size", "max_completion_length", "beta", "loss_type", "optim")},
    }
    del trainer, model
    gc.collect()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side")
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument("--workdir", default="/tmp/ragrpo-bench")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ragrpo.config import engine_settings
    from ragrpo.models import quiet_transformers

    quiet_transformers()
    workdir = Path(args.workdir)
    baseline = run_side("baseline", {"gradient_checkpointing": True, "bf16": False}, args.steps, workdir)
    tuned = run_side("ragrpo", engine_settings(steps_per_generation=STEPS_PER_GENERATION), args.steps, workdir)
    ratio = tuned["completions_per_second"] / baseline["completions_per_second"]
    rows = [("", "baseline", "ragrpo")]
    for key in ("completions", "completion_tokens", "seconds_per_step", "completions_per_second",
                "completion_tokens_per_second", "peak_rss_mb"):
        rows.append((key, f"{baseline[key]:.2f}", f"{tuned[key]:.2f}"))
    print("\n".join(f"{a:<30}{b:>12}{c:>12}" for a, b, c in rows))
    print(f"speed-up (completions per second): {ratio:.2f}x")
    record = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": sys.version.split()[0]},
              "baseline": baseline, "ragrpo": tuned, "speedup": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
