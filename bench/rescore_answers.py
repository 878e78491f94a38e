"""Re-score a from-index run's saved answers with this commit's figures, without generating anything.

The passages a figure reads (`context`: each passage's header field and text) do not depend on the prompt's
heading line, so answers saved under earlier headers get today's drawn-from figures. Prints each figure's
mean and spread (max - min) over seeds 0, 1, 2 for base and tuned.

    python bench/rescore_answers.py RUN ANSWERS_DIR --db DB --figures "answer accuracy|drawn from the source"
"""
import argparse
import json
from pathlib import Path

from ragrpo.evaluation.from_index import gold_questions, score_answers
from ragrpo.tuning.curriculum import IndexSource, open_run_table, rag_examples, read_curriculum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the from-index run folder (its held-out split and settings)")
    parser.add_argument("answers", type=Path, help="folder of base-seedN.json and tuned-seedN.json")
    parser.add_argument("--db", required=True, help="the LanceDB folder the run trained on")
    parser.add_argument("--figures", default="answer accuracy|drawn from the source, source not passage 1",
                        help="figure names, separated by |")
    args = parser.parse_args()
    split, _ = read_curriculum(args.run)
    _, questions = gold_questions(split, None)
    table = open_run_table(split, None, args.db, None, None)
    setting = IndexSource(**{**split["source"], "order": "balanced", "order_seed": 0})
    rows = rag_examples(table, questions, split["text_column"], setting)
    for row, question in zip(rows, questions, strict=True):
        row["answers"] = question.meta["answers"]
    scored = {}  # side -> one figures dict per seed
    for side in ("base", "tuned"):
        for seed in (0, 1, 2):
            saved = json.loads((args.answers / f"{side}-seed{seed}.json").read_text())
            if saved["queries"] != [r["query"] for r in rows]:
                raise SystemExit(f"{args.answers}: {side} seed {seed} answers other questions than this run's")
            scored.setdefault(side, []).append(score_answers(saved["completions"], rows, []).figures)
    for name in args.figures.split("|"):
        line = f"{name:<66}"
        for side, seeds in scored.items():
            values = [figures[name] for figures in seeds]
            line += f" {side} {sum(values) / len(values):.3f} ({max(values) - min(values):.3f})"
        print(line)


if __name__ == "__main__":
    main()
