"""Can the model point at the passage that holds an answer it is given? A probe of citation, no sampling.

For every gold question about the documents a from-index run held out, the prompt is built as `eval
--from-index` builds it (`ask --cite`'s prompt, k passages in balanced order), and the assistant's turn is
written for the model: the gold answer, then " [". The model's next-token scores for the digits 1..k are
its citation. Nothing is sampled, so this isolates choosing the passage from writing the answer.

Reported per model: the share of questions whose highest-scored digit is the source's position (chance
1/k), that share at each source position, the share of each digit chosen (a habit shows as one digit near
1), and the mean probability the model gives the source's digit among the k. A lexical reader is printed
beside them: the passage holding the most of the gold answer's words (what reading alone would need).

    python bench/citation_probe.py RUN_DIR --db DB [--model DIR] --out bench/results/citation_probe.json

RUN_DIR is a `ragrpo train --from-index` run (its split says which documents were held out); the base
model is always probed, `--model` adds another (for example RUN_DIR/merged).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path


def answer_turn(row: dict) -> str:
    return f"{row['answers'][0]} ["


def digit_ids(tokenizer, k: int) -> list[int]:
    ids = [tokenizer.encode(str(n), add_special_tokens=False) for n in range(1, k + 1)]
    if any(len(i) != 1 for i in ids):
        raise SystemExit(f"the tokenizer spells some of 1..{k} with more than one token: {ids}")
    return [i[0] for i in ids]


def probe(model, tokenizer, rows: list[dict], k: int) -> list[list[float]]:
    """Per row, the softmax over the k digits of the model's next-token scores after the answer and ' ['."""
    import torch

    digits = digit_ids(tokenizer, k)
    out = []
    with torch.inference_mode():
        for row in rows:
            conversation = [*row["prompt"], {"role": "assistant", "content": answer_turn(row)}]
            text = tokenizer.apply_chat_template(conversation, continue_final_message=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
            out.append(torch.softmax(logits[digits], dim=-1).tolist())
    return out


def lexical_choice(row: dict) -> int:
    """The passage (1-based) holding the most of the gold answer's words; the first on a tie."""
    from ragrpo.rewards.base import passages, words

    wanted = set(words(" ".join(row["answers"])))
    shown = passages(row["context"])
    counts = [len(wanted & set(words(p))) for p in shown]
    return counts.index(max(counts)) + 1


def summarize(choices: list[int], rows: list[dict], k: int, source_probs: list[float] | None = None) -> dict:
    sources = [r["source_rank"] for r in rows]
    right = [c == s for c, s in zip(choices, sources)]
    by_position = {p: [r for r, s in zip(right, sources) if s == p] for p in range(1, k + 1)}
    chosen = Counter(choices)
    summary = {"accuracy": sum(right) / len(right),
               "accuracy_by_source_position": {p: sum(v) / len(v) for p, v in by_position.items() if v},
               "share_choosing": {n: chosen[n] / len(choices) for n in range(1, k + 1)}}
    if source_probs is not None:
        summary["mean_source_probability"] = sum(source_probs) / len(source_probs)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--db", required=True)
    parser.add_argument("--model", action="append", default=[], help="A model to probe beside the base model.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from ragrpo import hardware
    from ragrpo.evaluation.from_index import gold_rows
    from ragrpo.models import load_model
    from ragrpo.retrieval.index import open_table

    split = json.loads((Path(args.run_dir) / "curriculum" / "split.json").read_text())
    source = split["source"]
    table = open_table(source["table"], args.db)
    gold = f"builtin:{source['table']}"
    rows = [r for r in gold_rows(table, set(split["held_out_documents"]), k=source["k"], mode=source["mode"], gold=gold)
            if r["source_rank"] > 0]
    k = source["k"]
    print(f"{len(rows)} gold questions whose source was retrieved, k={k}, passages in balanced order")
    results = {"lexical reader": summarize([lexical_choice(r) for r in rows], rows, k)}
    for name in [None, *args.model]:
        started = time.perf_counter()
        model, tokenizer = load_model(name)
        probs = probe(model, tokenizer, rows, k)
        choices = [max(range(k), key=p.__getitem__) + 1 for p in probs]
        label = name or "base"
        results[label] = summarize(choices, rows, k, [p[r["source_rank"] - 1] for p, r in zip(probs, rows)])
        results[label]["seconds"] = time.perf_counter() - started
        del model
    print(f"{'reader':<28} {'accuracy':>8}  by source position        share choosing 1..k")
    for label, s in results.items():
        at = " ".join(f"{v:.3f}" for v in s["accuracy_by_source_position"].values())
        share = " ".join(f"{v:.3f}" for v in s["share_choosing"].values())
        print(f"{label[-28:]:<28} {s['accuracy']:>8.3f}  {at:<24} {share}")
    print(f"chance: {1 / k:.3f}")
    if args.out:
        record = {"benchmark": "citation_probe", "run": args.run_dir, "table": source["table"], "questions": len(rows),
                  "k": k, "chance": 1 / k, "results": results,
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                              "hardware": hardware.summary()},
                  "command": " ".join(sys.argv)}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
