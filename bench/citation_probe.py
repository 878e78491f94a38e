"""Can the model tell which passage an answer comes from? Four readers of the same prompts, in one run.

Issue 17 asks for citations that read the passages; every GRPO run so far learned a position habit
instead (bench/results/from-index/NOTES.md). Sampling cannot say whether the 135M model is able to point
at a passage at all, so this probe asks without sampling. On the gold questions about a run's held-out
documents (passages in the balanced order `eval --from-index` uses, so the source is at each position
1..k equally often), only rows whose source was retrieved:

    prior        the model's choice of "[1]" .. "[k]" as its whole reply: its position habit alone
    given answer the gold answer followed by " [n]": which n the model finds likeliest once it is told
                 the answer. A model that reads the passages points at the source here
    given answer, by name   the same with the passage's header instead of its number, "(source: The
                 Ferryman's Ledger (1923))": whether the model would cite by name what it cannot by number
                 (summed log-probability: the headers differ in length, and a sum is what sampling pays)
    likelihood   which passage, shown alone in the same prompt, makes the gold answer likeliest: the
                 label-free signal a context-reliance reward would train a citation on
    lexical      which passage holds the most of the gold answer's words (normalised; ties split): what
                 a reader with no model gets from word overlap alone

Each is scored as the share of rows where its choice is the source passage, overall, where the source is
not passage 1, and by question kind; chance is 1/k. Prints a table and writes JSON with the CPU flags.

    python bench/citation_probe.py --run RUN --db DB --out bench/results/citation-probe.json
    python bench/citation_probe.py --run RUN --db DB --models base,RUN/merged --limit 60   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("LANCEDB_LOG", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shown_passages(row: dict) -> list:
    """The row's passages as `Passage`s again (its context strings are 'header\\ntext')."""
    from ragrpo.prompts import Passage

    return [Passage(*c.split("\n", 1)) if "\n" in c else Passage("", c) for c in row["context"]]


def argmax_choice(scores: list[float]) -> list[int]:
    """Every position (1-based) holding the highest score: a tie is a split choice."""
    best = max(scores)
    return [i + 1 for i, s in enumerate(scores) if s == best]


def lexical_scores(row: dict) -> list[float]:
    """Share of the gold answer's normalised words that each passage (header and text) holds."""
    from ragrpo.evaluation.gold import normalize

    best = []
    for passage in row["context"]:
        words = set(normalize(passage).split())
        best.append(max(sum(w in words for w in normalize(g).split()) / max(1, len(normalize(g).split()))
                        for g in row["answers"]))
    return best


def model_scores(model, tokenizer, rows: list[dict], label: str) -> dict[str, list[list[float]]]:
    """Per row, a score for each passage under the four model readers: mean log-probability per token,
    summed over the tokens for the by-name reader (its candidates differ in length)."""
    from ragrpo.models import answer_logprobs
    from ragrpo.prompts import build_prompt

    k = len(rows[0]["context"])
    prompts = [r["prompt"][0]["content"] for r in rows]
    gold = [r["answers"][0] for r in rows]
    out = {"prior": [], "given answer": [], "given answer, by name": [], "likelihood": []}
    prior = [answer_logprobs(model, tokenizer, prompts, [f"[{n}]"] * len(rows)) for n in range(1, k + 1)]
    given = [answer_logprobs(model, tokenizer, prompts, [f"{g} [{n}]" for g in gold]) for n in range(1, k + 1)]
    named = []
    for n in range(k):
        cited = [f"{g} (source: {shown_passages(r)[n].header})" for g, r in zip(gold, rows, strict=True)]
        lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in cited]
        named.append([m * t for m, t in zip(answer_logprobs(model, tokenizer, prompts, cited), lengths, strict=True)])
    alone = []
    for n in range(k):
        single = [build_prompt(r["query"], [shown_passages(r)[n]], cite=True, label=label) for r in rows]
        alone.append(answer_logprobs(model, tokenizer, single, gold))
    for i in range(len(rows)):
        out["prior"].append([prior[n][i] for n in range(k)])
        out["given answer"].append([given[n][i] for n in range(k)])
        out["given answer, by name"].append([named[n][i] for n in range(k)])
        out["likelihood"].append([alone[n][i] for n in range(k)])
    return out


def accuracy(choices: list[list[int]], rows: list[dict], keep) -> tuple[float, int]:
    """Share of kept rows whose choice is the source (a tie of m passages counts 1/m if the source is one)."""
    hits = [(r["source_rank"] in c) / len(c) for c, r in zip(choices, rows, strict=True) if keep(r)]
    return (sum(hits) / len(hits) if hits else float("nan")), len(hits)


def summarise(scores: list[list[float]], rows: list[dict]) -> dict:
    choices = [argmax_choice(s) for s in scores]
    out = {}
    groups = {"all": lambda r: True, "source not passage 1": lambda r: r["source_rank"] != 1}
    for kind in sorted({r["kind"] for r in rows}):
        groups[f"kind {kind}"] = lambda r, kind=kind: r["kind"] == kind
    for name, keep in groups.items():
        value, n = accuracy(choices, rows, keep)
        out[name] = {"accuracy": value, "rows": n}
    picked = defaultdict(float)
    for c in choices:
        for position in c:
            picked[position] += 1 / len(c)
    out["chosen position share"] = {str(p): picked[p] / len(choices) for p in sorted(picked)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a from-index run folder (its held-out split and settings)")
    parser.add_argument("--db", help="the LanceDB folder (default: the run's)")
    parser.add_argument("--models", default="base", help="comma-separated: 'base' (packaged) or model folders")
    parser.add_argument("--limit", type=int, help="at most this many rows, spread over the set")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)

    from ragrpo.evaluation.from_index import gold_questions
    from ragrpo.hardware import cpu_flags, cpu_name
    from ragrpo.models import load_model
    from ragrpo.prompts import table_style
    from ragrpo.tuning.curriculum import IndexSource, open_run_table, rag_examples, read_curriculum

    split, _ = read_curriculum(Path(args.run))
    gold_name, questions = gold_questions(split, None)
    if not questions:
        print(f"{args.run}: no gold questions about its held-out documents", file=sys.stderr)
        return 2
    source = split["source"]
    table = open_run_table(split, None, args.db, None, None, lambda line: None)
    setting = IndexSource(**{"mode": "vector", **source, "order": "balanced", "order_seed": 0, "cite": True})
    rows = rag_examples(table, questions, split["text_column"], setting)
    for row, question in zip(rows, questions, strict=True):
        row["answers"] = question.meta["answers"]
    rows = [r for r in rows if r["source_rank"] > 0]
    if args.limit and len(rows) > args.limit:
        rows = rows[::len(rows) // args.limit][:args.limit]
    k = len(rows[0]["context"])
    label = table_style(table).label
    print(f"{len(rows)} rows ({gold_name}, source retrieved, k={k}); chance {1 / k:.3f}", flush=True)

    readers = {"lexical": summarise([lexical_scores(r) for r in rows], rows)}
    for name in args.models.split(","):
        clock = time.time()
        model, tokenizer = load_model(None if name == "base" else name)
        for reader, scores in model_scores(model, tokenizer, rows, label).items():
            readers[f"{name}: {reader}"] = summarise(scores, rows)
        print(f"{name}: {time.time() - clock:.0f} s", flush=True)
        del model

    groups = [g for g in readers["lexical"] if g != "chosen position share"]
    print(f"\n{'reader':<40}" + "".join(f"{g:>24}" for g in groups) + "   chosen positions")
    for reader, result in readers.items():
        cells = "".join(f"{result[g]['accuracy']:>17.3f} (n={result[g]['rows']:>3})" for g in groups)
        shares = " ".join(f"{p}:{v:.2f}" for p, v in result["chosen position share"].items())
        print(f"{reader:<40}{cells}   {shares}")
    print(f"chance {1 / k:.3f}")
    if args.out:
        record = {"benchmark": "citation_probe", "cpu": cpu_name(), "cpu_flags": cpu_flags(), "run": args.run,
                  "gold": gold_name, "rows": len(rows), "k": k, "chance": 1 / k, "readers": readers}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
