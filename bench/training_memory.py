"""Training memory benchmark, one process run: the RSS of the quickstart's from-index GRPO training, step by
step, with oneDNN's primitive cache at its own default (1,024 entries) and at ragrpo's (64).

Training passes change shape every step (prompt and completion lengths vary), and oneDNN compiles and keeps a
primitive per operation and shape, with its buffers. Two 200-step runs of the default recipe grew to 12-13 GB
(one was killed for memory with two running). oneDNN reads ONEDNN_PRIMITIVE_CACHE_CAPACITY once, so each side
runs in a child process of its own, set before `import ragrpo`. The two children run at the same time, one
torch thread each on a 2-core machine, so they share the machine's conditions and their step times compare.

Each child indexes `builtin:movies` into its own folder, builds the quickstart's curriculum (seed, held-out
share and GRPO settings as `ragrpo quickstart`) and trains `--steps` steps, recording its RSS (from
/proc/self/statm) and the time at the end of every step. The table gives the RSS at a few steps, its
maximum, its rise per step over the second half of the run, and the mean step time after step 5.

    python bench/training_memory.py --steps 30 --out bench/results/training-memory-cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CAPACITIES = {"oneDNN default": "1024", "ragrpo default": "64"}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 2**30


def child(steps: int, seed: int, out: Path) -> None:
    """Train the quickstart's recipe for `steps` steps, writing one JSON line per step to `out`."""
    from transformers import TrainerCallback

    from ragrpo.config import build_run_config
    from ragrpo.models import quiet_transformers
    from ragrpo.quickstart import HELD_OUT, QUICKSTART_GRPO
    from ragrpo.retrieval.index import index
    from ragrpo.tuning.curriculum import IndexSource, from_index_config, train_from_index

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="training-memory-"))
    index("builtin:movies", "movies", db=work / "lancedb")
    log = out.open("w")

    class StepMemory(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            log.write(json.dumps({"step": state.global_step, "rss_gib": rss_gib(), "time": time.time()}) + "\n")
            log.flush()

    source = IndexSource("movies", str(work / "lancedb"), held_out=HELD_OUT, order_seed=seed)
    cfg = from_index_config(build_run_config(output=str(work / "run"), seed=seed, held_out=HELD_OUT,
                                             **{**QUICKSTART_GRPO, "max_steps": steps}), source, rewards_given=False)
    train_from_index(cfg, source, overwrite=True, callbacks=[StepMemory()])


def summarise(records: list[dict]) -> dict:
    half = records[len(records) // 2:]
    after = records[4:]  # from the end of step 5: the first steps compile and allocate
    return {
        "steps": len(records),
        "rss_gib_by_step": {r["step"]: round(r["rss_gib"], 3) for r in records},
        "rss_gib_max": round(max(r["rss_gib"] for r in records), 3),
        "rise_mib_per_step_second_half": round((half[-1]["rss_gib"] - half[0]["rss_gib"]) * 1024
                                               / max(half[-1]["step"] - half[0]["step"], 1), 1),
        "seconds_per_step_after_5": round((after[-1]["time"] - after[0]["time"]) / max(len(after) - 1, 1), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("CAPACITY", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 6:
        parser.error("--steps must be at least 6: the step time is taken from step 5 on")
    if args.child:
        child(args.steps, args.seed, Path(args.child[1]))
        return

    logs = Path(tempfile.mkdtemp(prefix="training-memory-logs-"))
    env = {**os.environ, "RAGRPO_THREADS": "1", "OMP_NUM_THREADS": "1"}
    children = {name: subprocess.Popen(
        [sys.executable, __file__, "--steps", str(args.steps), "--seed", str(args.seed),
         "--child", capacity, str(logs / f"{capacity}.jsonl")],
        env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": capacity}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for name, capacity in CAPACITIES.items()}
    for name, process in children.items():
        _, err = process.communicate()
        if process.returncode:
            sys.exit(f"{name} failed:\n{err.decode()[-2000:]}")
    sides = {name: summarise([json.loads(line) for line in (logs / f"{capacity}.jsonl").read_text().splitlines()])
             for name, capacity in CAPACITIES.items()}

    from ragrpo import hardware

    base, ours = sides["oneDNN default"], sides["ragrpo default"]
    shown = sorted({1, 10, args.steps // 2, args.steps} & set(base["rss_gib_by_step"]))
    print(f"{'cache':<24}" + "".join(f"{f'RSS@{s}':>9}" for s in shown) + f"{'max':>8}{'MiB/step':>10}{'s/step':>8}")
    for name, capacity in CAPACITIES.items():
        side = sides[name]
        print(f"{name + ' (' + capacity + ')':<24}" + "".join(f"{side['rss_gib_by_step'][s]:>9.2f}" for s in shown)
              + f"{side['rss_gib_max']:>8.2f}{side['rise_mib_per_step_second_half']:>10.1f}"
              + f"{side['seconds_per_step_after_5']:>8.2f}")
    print(f"max RSS ratio (64 / 1024): {ours['rss_gib_max'] / base['rss_gib_max']:.2f}; step time ratio: "
          f"{ours['seconds_per_step_after_5'] / base['seconds_per_step_after_5']:.2f}")
    record = {"benchmark": "training_memory", "steps": args.steps, "seed": args.seed,
              "threads_per_side": 1, "sides": {f"{n} ({c})": sides[n] for n, c in CAPACITIES.items()},
              "hardware": hardware.summary()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
