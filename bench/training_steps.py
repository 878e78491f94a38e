"""Which question each step of a from-index run trained on, and what it earned there: `answer_match` by question
kind and by the source's position in the prompt, over windows of steps.

A run's `metrics.jsonl` logs one mean per reward and step, but not the question. With one question a step (G
answers in one group, the default recipe), the question is fixed by the run's seed: `build_dataset` shuffles
the curriculum with it, and TRL's `RepeatSampler` draws the order with it. This script rebuilds that order with
TRL's own sampler and checks every step against the log: the step's prompt length in tokens (the rise in
`num_tokens` over G, less the mean completion length) must equal the rebuilt question's. A run whose steps do
not all match is refused, so a change in TRL's sampling cannot go unnoticed.

A restarted run (`restarts.json`) keeps the first attempt's shuffled dataset and samples on its own seed; a
stopped attempt's metrics (`stalled/seed-N.metrics.jsonl`) can be read with `--metrics` and `--seed N`.

    python bench/training_steps.py RUN [RUN ...] [--windows 50,100,200] [--out steps.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KIND_GROUPS = {"keyword": "title", "when": "year", "who": "name", "blank": "name"}


def read_steps(run: Path, metrics: Path | None = None, seed: int | None = None) -> list[dict]:
    """One record per logged training step: the question's kind, its source position, the step's rewards."""
    import pandas as pd
    from transformers import AutoTokenizer
    from trl.trainer.utils import RepeatSampler

    config = json.loads((run / "config.json").read_text())["run"]
    restarts = run / "restarts.json"
    stopped = json.loads(restarts.read_text())["stopped"] if restarts.exists() else []
    data_seed = stopped[0]["seed"] if stopped else config["seed"]  # the dataset is shuffled once per run
    seed = config["seed"] if seed is None else seed
    group = config["grpo"]["num_generations"]
    if config["grpo"].get("per_device_train_batch_size", group) != group:
        raise SystemExit(f"{run}: more than one question a step; this script reads one-question steps only")
    frame = pd.read_json(run / "curriculum" / "train.jsonl", lines=True)
    shuffled = config["grpo"].get("shuffle_dataset") is not False  # --not-first-questions trains in file order
    if shuffled:
        frame = frame.sample(frac=1.0, random_state=data_seed).reset_index(drop=True)
    order = list(RepeatSampler(range(len(frame)), mini_repeat_count=group, batch_size=1, seed=seed,
                               shuffle=shuffled))[::group]
    tokenizer = AutoTokenizer.from_pretrained(_model_dir(config))
    records, tokens = [], 0.0
    for line in (metrics or run / "metrics.jsonl").read_text().splitlines():
        logged = json.loads(line)
        if "rewards/answer_match/mean" not in logged:
            continue
        row = frame.iloc[order[logged["step"] - 1]]
        text = tokenizer.apply_chat_template(list(row["prompt"]), add_generation_prompt=True, tokenize=False)
        prompt = len(tokenizer(text, add_special_tokens=False).input_ids)
        seen = (logged["num_tokens"] - tokens) / group - logged["completions/mean_length"]
        tokens = logged["num_tokens"]
        if abs(seen - prompt) > 1:
            raise SystemExit(f"{run}: step {logged['step']} logged a {seen:.0f}-token prompt, the rebuilt question has "
                             f"{prompt}; the sampling order could not be rebuilt")
        records.append({"step": logged["step"], "kind": row["kind"], "position": int(row["source_rank"]),
                        "answer_match": logged["rewards/answer_match/mean"],
                        "drawn_from_first": logged.get("rewards/drawn_from_first/mean"),
                        "teaches": logged["frac_reward_zero_std"] < 1})
    return records


def _model_dir(config: dict) -> str:
    from ragrpo.models import resolve_model

    return str(resolve_model(config.get("model")))


def table(records: list[dict], windows: list[int]) -> dict:
    """Mean `answer_match` and the share of steps that teach (the group's rewards differ), per window of steps,
    by kind group, by source position, and by both."""
    out = {}
    for start, end in zip([0] + windows, windows):
        rows = [r for r in records if start < r["step"] <= end]
        cells = {}
        def kind(r):
            return KIND_GROUPS.get(r["kind"], r["kind"])

        for name, key in (("kind", kind), ("position", lambda r: r["position"]),
                          ("kind@position", lambda r: f"{kind(r)}@{r['position']}")):
            for value in sorted({key(r) for r in rows}, key=str):
                chosen = [r for r in rows if key(r) == value]
                cells[f"{name} {value}"] = {"steps": len(chosen),
                                            "answer_match": sum(r["answer_match"] for r in chosen) / len(chosen),
                                            "teaches": sum(r["teaches"] for r in chosen) / len(chosen)}
        out[f"{start + 1}-{end}"] = cells
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--metrics", type=Path, help="another metrics file (a stopped attempt's), one run only")
    parser.add_argument("--seed", type=int, help="the seed the --metrics attempt sampled with")
    parser.add_argument("--windows", default="50,100,200", help="ends of the step windows")
    parser.add_argument("--out", type=Path, help="write the tables as JSON")
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    results = {}
    for run in args.runs:
        results[str(run)] = tables = table(read_steps(run, args.metrics, args.seed), windows)
        print(f"\n{run}: answer_match (share of steps that teach), steps per cell in brackets")
        names = sorted({c for cells in tables.values() for c in cells})
        print(f"{'':20}" + "".join(f"{w:>22}" for w in tables))
        for name in names:
            print(f"{name:20}" + "".join(
                f"{cells[name]['answer_match']:>9.2f} ({cells[name]['teaches']:.2f}) [{cells[name]['steps']:>3}]"
                if name in cells else f"{'-':>22}" for cells in tables.values()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
