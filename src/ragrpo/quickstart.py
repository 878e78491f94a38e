"""The whole pipeline on the built-in data, sized for 2 CPU cores and about a quarter of an hour.

1. index the built-in movie corpus into LanceDB (MiniLM embeddings through the registry);
2. build a label-free curriculum from the table (`ragrpo train --from-index`): questions made from
   the films' own fields and text, retrieved for with hybrid search, passages in balanced order; the
   films that `--held-out 0.2` keeps out are never trained on;
3. GRPO-train a LoRA adapter on it with the from-index rewards, then merge it;
4. answer the packaged gold questions about the held-out films with the base and the tuned model
   (the same sampling seed) and print answer accuracy and citation accuracy before and after;
5. answer one held-out gold question and the write-up's query with both models, greedily, side by side.

The write-up's own recipe (a length and a token-diversity reward on one-sentence summaries) is
`ragrpo train` on its defaults; it shortens answers but does not make them more right, so the
quickstart shows the recipe that does (bench/results/from-index/NOTES.md has the runs).
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from ragrpo.generation.rag import Answer
from ragrpo.prompts import DEFAULT_QUERY

WHERE = "release_year < 1990"
HELD_OUT = 0.2  # the share the packaged gold set's films are held out at
K = 3
# Both models answer the side-by-side questions greedily with a mild repetition penalty (small models
# loop without it on long prompts).
REPETITION_PENALTY = 1.2
# The from-index recipe, shortened: one prompt x G=6 completions of up to 64 tokens per step.
QUICKSTART_STEPS = 60
MAX_COMPLETION_LENGTH = 64
# The figures printed before/after, from `ragrpo eval --from-index`.
FIGURES = ("answer accuracy", "token F1", "cites source only", "cites source only, source not passage 1",
           "distinct-2", "answer length, chars")


@dataclass
class QuickstartReport:
    comparison: object  # from_index.IndexComparison
    gold_question: str
    gold_answers: list[str]
    films: int  # held out
    answers: dict[str, dict[str, Answer]]  # question -> {"base": ..., "tuned": ...}
    seconds: float
    run_dir: Path


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width) or ["(empty)"]


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 48) -> str:
    """Two texts in columns, wrapped to `width` characters each."""
    a, b = _wrap(left, width), _wrap(right, width)
    lines = [f"{left_title:<{width}} | {right_title}", f"{'-' * width}-+-{'-' * width}"]
    lines += [f"{a[i] if i < len(a) else '':<{width}} | {b[i] if i < len(b) else ''}" for i in range(max(len(a), len(b)))]
    return "\n".join(lines)


def before_after(comparison) -> str:
    base, tuned = comparison.summary("base"), comparison.summary("tuned")
    rows = [f"{'held-out gold questions':<42}{'base':>10}{'tuned':>10}"]
    rows += [f"{name:<42}{base[name]['mean']:>10.3f}{tuned[name]['mean']:>10.3f}" for name in FIGURES if name in base]
    return "\n".join(rows)


def report(rep: QuickstartReport) -> str:
    from ragrpo.prompts import source_label

    c = rep.comparison
    parts = [(f"Gold questions about the {rep.films} held-out films ({c.questions} questions, passages in "
              f"{c.order} order, sampling seed {c.seeds[0]}, temperature 1):\n"
              f"{before_after(c)}")]
    for question, pair in rep.answers.items():
        sources = "; ".join(f"[{n}] {source_label(s)}" for n, s in enumerate(pair["tuned"].sources, 1))
        header = f"Query: {question}\nSources: {sources}"
        if question == rep.gold_question:
            header += f"\nGold answer: {' / '.join(rep.gold_answers)}"
        parts += [header, side_by_side("BASE MODEL", pair["base"].text, "GRPO-TUNED MODEL", pair["tuned"].text)]
    parts.append(f"Decoding: greedy, repetition penalty {REPETITION_PENALTY}, both models. Report: "
                 f"{rep.run_dir / 'eval-index' / 'report.md'}\nRun folder: {rep.run_dir}    wall time: "
                 f"{rep.seconds / 60:.1f} min")
    return "\n\n".join(parts)


def run(workdir: str | Path = "runs/quickstart", *, seed: int = 42, max_steps: int | None = None,
        max_questions: int | None = None, echo=print) -> QuickstartReport:
    from ragrpo.config import build_run_config
    from ragrpo.evaluation.from_index import compare_from_index
    from ragrpo.generation.rag import answer_from_hits, retrieve
    from ragrpo.models import load_model
    from ragrpo.prompts import table_style
    from ragrpo.retrieval.index import index, open_table
    from ragrpo.tuning.curriculum import IndexSource, from_index_config, train_from_index

    started = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "lancedb"

    echo("[1/5] indexing builtin:movies into LanceDB ...")
    indexed = index("builtin:movies", "movies", db=db, overwrite=True)
    echo(f"      {indexed.rows} movies embedded with the packaged all-MiniLM-L6-v2")

    steps = max_steps or QUICKSTART_STEPS
    echo(f"[2/5] questions from the table, then [3/5] GRPO training for {steps} steps ...")
    source = IndexSource("movies", str(db), k=K, held_out=HELD_OUT, order_seed=seed)
    cfg = build_run_config(output=str(workdir / "run"), seed=seed, held_out=HELD_OUT, max_steps=steps,
                           max_completion_length=MAX_COMPLETION_LENGTH, grpo={"save_strategy": "no"})
    result, curriculum = train_from_index(from_index_config(cfg, source, rewards_given=False), source, overwrite=True)
    echo(f"      {len(curriculum.examples)} training questions from {len(curriculum.train_ids)} films; "
         f"{len(curriculum.held_ids)} films held out")

    echo("[4/5] answering the gold questions about the held-out films with both models ...")
    comparison = compare_from_index(result.output, seeds=[0], max_questions=max_questions,
                                    echo=lambda line: echo(f"      {line}"))

    echo("[5/5] answering one held-out gold question and the write-up's query side by side ...")
    from ragrpo.evaluation.from_index import gold_questions

    _, golds = gold_questions({"held_out_documents": curriculum.held_ids}, None)
    gold = golds[0]  # the first in file order: not picked by how either model answers it
    table = open_table("movies", db)
    style = table_style(table)
    asked = {gold.query: retrieve(table, gold.query, k=K, mode="hybrid"),
             DEFAULT_QUERY: retrieve(table, DEFAULT_QUERY, where=WHERE, k=K, mode="hybrid")}
    answers = {question: {} for question in asked}
    for side, name in (("base", None), ("tuned", str(result.merged))):
        model, tokenizer = load_model(name)
        for question, (hits, column) in asked.items():
            answers[question][side] = answer_from_hits(model, tokenizer, question, hits, column, cite=True,
                                                       repetition_penalty=REPETITION_PENALTY, style=style)
        del model
    return QuickstartReport(comparison, gold.query, gold.meta["answers"], len(curriculum.held_ids), answers,
                            time.perf_counter() - started, result.output)
