"""GRPO training throughput: the write-up's TRL setup against ragrpo's engine, in one process.

Every side trains the same packaged SmolLM2-135M-Instruct with the same rank-8 LoRA on the same prompts
(one-sentence summaries of builtin:movies), G=6 completions of 128 tokens per prompt, 6 completions per
optimizer step, and the same objective: the write-up's (clipped ratio, k3 KL with beta 0.04 to the
adapter-free model, per-sequence `grpo` aggregation). Only how the work is done differs.

    baseline  the write-up's GRPOConfig through plain TRL: float32, gradient checkpointing on (TRL's
              default), adamw_torch (the CPU fallback for paged_adamw_8bit)
    bf16      plain TRL with ragrpo's GRPOConfig engine settings only (`engine_settings`: bf16 autocast
              where the hardware has fast bf16, no gradient checkpointing); the lever of the first version
    ragrpo    ragrpo's fast engine (`ragrpo.generation.engine`): those settings, the frozen base held in
              bf16, and sampling on a merged copy of the policy with a static key/value cache

So that every side does the same work, completions are held at exactly 128 tokens (`min_new_tokens`):
6 x 128 = 768 completion tokens per step on every side. The first step of each side is a warm-up and is
not timed. It prints completions per second, seconds per step, peak memory and the ratios, and writes JSON.

    python bench/train_throughput.py --steps 4 --out bench/results/train_throughput-cpu-2core.json

The JSON records the CPU's flags and every hardware decision (`ragrpo.hardware.summary`). To measure what an
AVX2-only CPU does on a newer one, cap the instruction sets torch, oneDNN and MKL may use:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/train_throughput.py
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

from transformers import TrainerCallback

TOKENS = 128
SIDES = {
    # name -> (engine, extra GRPOConfig settings)
    "baseline": ("trl", {"gradient_checkpointing": True, "bf16": False}),
    "bf16": ("trl", "engine_settings"),
    "ragrpo": ("fast", {}),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step."""

    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.started)


def run_side(name: str, steps: int, workdir: Path, tokens: int = TOKENS) -> dict:
    import torch

    from ragrpo.config import build_run_config, engine_settings
    from ragrpo.models import load_model
    from ragrpo.tuning.train import build_dataset, make_trainer

    engine, extra = SIDES[name]
    extra = engine_settings() if extra == "engine_settings" else extra
    cfg = build_run_config(preset="seed", engine=engine, max_steps=steps + 1, output=str(workdir / name), seed=0,
                           grpo={"save_strategy": "no", "logging_steps": 1, "max_completion_length": tokens,
                                 "generation_kwargs": {"min_new_tokens": tokens}, **extra})
    model, tokenizer = load_model(None)
    dataset = build_dataset(cfg, tokenizer)
    (workdir / name).mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(cfg, model, tokenizer, dataset, workdir / name)
    timer = StepTimer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = sum(timer.times[1:])  # the first step is a warm-up
    logs = [h for h in trainer.state.log_history if "reward" in h][1:]
    completions = steps * trainer.args.per_device_train_batch_size
    tokens = sum(h["completions/mean_length"] * trainer.args.per_device_train_batch_size for h in logs)
    result = {
        "side": name,
        "engine": engine,
        "steps": steps,
        "completions": completions,
        "completion_tokens": tokens,
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "step_seconds": timer.times,
        "completions_per_second": completions / seconds,
        "completion_tokens_per_second": tokens / seconds,
        "peak_rss_mb": peak_rss_mb(),  # of the process so far: sides run in order
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "settings": {k: getattr(trainer.args, k) for k in (
            "bf16", "gradient_checkpointing", "steps_per_generation", "generation_batch_size", "num_generations",
            "per_device_train_batch_size", "max_completion_length", "beta", "loss_type", "optim")},
    }
    print(f"{name}: {result['seconds_per_step']:.2f} s/step, {tokens:.0f} completion tokens", flush=True)
    del trainer, model
    gc.collect()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per side (after one warm-up)")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES),
                        help="which sides to run; baseline is always run first")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="completion tokens (128 in the write-up)")
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument("--workdir", default="/tmp/ragrpo-bench")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ragrpo.models import quiet_transformers

    quiet_transformers()
    workdir = Path(args.workdir)
    sides = ["baseline", *(name for name in args.sides if name != "baseline")]
    results = {name: run_side(name, args.steps, workdir, args.tokens) for name in sides}
    baseline = results["baseline"]
    speedups = {name: r["completions_per_second"] / baseline["completions_per_second"] for name, r in results.items()}
    rows = [("", *results)]
    for key in ("completions", "completion_tokens", "seconds_per_step", "completions_per_second",
                "completion_tokens_per_second", "peak_rss_mb"):
        rows.append((key, *(f"{r[key]:.2f}" for r in results.values())))
    rows.append(("speed-up vs baseline", *(f"{v:.2f}x" for v in speedups.values())))
    print("\n".join(f"{row[0]:<30}" + "".join(f"{cell:>12}" for cell in row[1:]) for row in rows))
    from ragrpo import hardware

    record = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": sys.version.split()[0], "hardware": hardware.summary()},
              "loadavg_at_end": os.getloadavg(), "sides": results, "speedup": speedups}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
