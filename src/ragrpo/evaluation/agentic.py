"""`ragrpo eval --from-index TABLE RUN --agentic`: base and tuned models searching for themselves.

An agentic run (`train --from-index --agentic`) is evaluated on the gold questions about the documents it
held out, with the search it trained with (`tuning.agentic.run_tool`: the run's table at its version, filter,
k, mode and passage headers). Each model answers every question once per sampling seed through the search
loop (`generation.agentic`), at the run's training temperature and token budget. Every seed gives:

    search found source      share of questions whose source document one of the model's own searches
                             returned; beside it, once, the same for a search of the question verbatim,
                             which needs no model (the retriever's own hit rate)
    searches per answer      search calls per answer, refused and failed ones included
    failed calls per answer  calls that ran no search (empty query, unopened tag, beyond the limit, an error)
    text after the results   share of completions that wrote anything after their last results (what
                             `search_format` pays half for): not that it answers, which the next two say
    answer accuracy          a gold answer in the answer, naming no other passage the searches showed
                             (`evaluation.gold.answer_accuracy`, the shown passages' names as distractors);
                             also by question kind and with hedges allowed
    cites source only        the answer cites the source's passage number and no other
    answer length, distinct-2   as in `evaluation.from_index`

and, so that the search loop is judged against what it replaces, the same model's single-shot RAG
(the run's k passages retrieved for the question, `ask --cite`'s prompt) on the same questions and seeds:
`single-shot answer accuracy` and `single-shot cites source only`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ragrpo import RagrpoError

HEADLINE = ("search found source", "searches per answer", "text after the results", "answer accuracy",
            "cites source only", "single-shot answer accuracy")
BATCH = 12  # questions through the loop at once


@dataclass
class AgenticComparison:
    run_dir: str
    table_name: str
    questions: int
    verbatim_found: float  # a search of the question verbatim returns the source
    seeds: list[int]
    base: list[dict[str, float]]  # one figure dict per seed
    tuned: list[dict[str, float]]
    counts: dict[str, int] = field(default_factory=dict)
    gold: str | None = None
    temperature: float = 1.0
    max_searches: int = 3
    seconds: float = 0.0

    def summary(self, side: str) -> dict[str, dict]:
        runs = getattr(self, side)
        return {name: {"mean": sum(r[name] for r in runs) / len(runs),
                       "spread": max(r[name] for r in runs) - min(r[name] for r in runs),
                       "seeds": [r[name] for r in runs]} for name in runs[0]}

    def verdicts(self) -> dict[str, dict]:
        base, tuned = self.summary("base"), self.summary("tuned")
        out = {}
        for name in HEADLINE:
            if name in base:
                gain, spread = tuned[name]["mean"] - base[name]["mean"], max(base[name]["spread"], tuned[name]["spread"])
                out[name] = {"gain": gain, "spread": spread, "exceeds_spread": abs(gain) > spread}
        return out

    def table(self) -> str:
        base, tuned = self.summary("base"), self.summary("tuned")
        rows = [("figure (mean over seeds, spread)", "base", "tuned")]
        rows += [(name, f"{base[name]['mean']:.3f} ±{base[name]['spread']:.3f}",
                  f"{tuned[name]['mean']:.3f} ±{tuned[name]['spread']:.3f}") for name in base]
        rows.append(("search found source, verbatim", f"{self.verbatim_found:.3f}", ""))
        return "\n".join(f"{a:<40}{b:>18}{c:>18}" for a, b, c in rows)

    def to_dict(self) -> dict:
        return {"run": self.run_dir, "table": self.table_name, "questions": self.questions, "gold": self.gold,
                "temperature": self.temperature, "max_searches": self.max_searches, "seeds": self.seeds,
                "seconds": self.seconds, "verbatim_found": self.verbatim_found, "counts": self.counts,
                "base": self.summary("base"), "tuned": self.summary("tuned"), "verdicts": self.verdicts()}


def score_transcripts(records: list[dict], questions: list) -> tuple[dict[str, float], dict[str, int]]:
    """One seed's figures from its transcripts (`records`: completion, searches, context_ids, names) and the
    gold `questions` they answer; the counts say how many answers stand behind each figure."""
    from ragrpo.evaluation.from_index import distinct_2
    from ragrpo.evaluation.gold import answer_accuracy
    from ragrpo.prompts import agentic_answer, cited_passages
    from ragrpo.rewards.builtin import hedges

    answers = [agentic_answer(r["completion"]) for r in records]
    per = {"search found source": [], "searches per answer": [], "failed calls per answer": [],
           "text after the results": [], "answer accuracy": [], "answer accuracy, hedges allowed": [], "cites source only": [],
           "answer length, chars": []}
    kinds: dict[str, list[float]] = {}
    for record, answer, question in zip(records, answers, questions, strict=True):
        source, calls, ids = question.source_id, record["searches"], record["context_ids"]
        per["search found source"].append(float(any(source in call["found"] for call in calls)))
        per["searches per answer"].append(float(len(calls)))
        per["failed calls per answer"].append(float(sum(bool(call["error"]) for call in calls)))
        per["text after the results"].append(float(bool(answer)))
        golds = question.meta["answers"]
        correct = answer_accuracy(answer, golds, hedges(record["names"], ids, source))
        per["answer accuracy"].append(correct)
        per["answer accuracy, hedges allowed"].append(answer_accuracy(answer, golds))
        numbers = {n for n, doc in enumerate(ids, 1) if doc == source}
        per["cites source only"].append(float(bool(numbers) and set(cited_passages(answer)) <= numbers
                                              and bool(cited_passages(answer))))
        per["answer length, chars"].append(float(len(answer)))
        kinds.setdefault(question.kind, []).append(correct)
    for kind, values in sorted(kinds.items()):
        per[f"answer accuracy, kind {kind}"] = values
    figures = {name: sum(v) / len(v) for name, v in per.items()}
    figures["distinct-2"] = distinct_2([a for a in answers if a])
    return figures, {name: len(v) for name, v in per.items()}


def agentic_records(folder: Path, side: str, name: str | None, questions: list, tool, *, seed: int,
                    max_new_tokens: int, max_searches: int, temperature: float, loaded: dict) -> list[dict]:
    """A side's transcripts for one seed, kept in `folder/answers/agentic-SIDE-seedN.json` and reused when the
    model, questions, budget, search limit, temperature and table are the same."""
    from ragrpo.evaluation.from_index import load_side
    from ragrpo.generation.agentic import search_and_answer

    path = folder / "answers" / f"agentic-{side}-seed{seed}.json"
    key = {"model": str(name), "max_new_tokens": max_new_tokens, "max_searches": max_searches,
           "temperature": temperature, "table_version": tool.table.version,
           "questions_sha256": hashlib.sha256(json.dumps([q.query for q in questions]).encode()).hexdigest()}
    if path.exists():
        cached = json.loads(path.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached["records"]
    model, tokenizer, sampler = load_side(loaded, side, name)
    records = []
    for start in range(0, len(questions), BATCH):
        batch = [q.query for q in questions[start:start + BATCH]]
        rows = search_and_answer(model, tokenizer, batch, tool, max_searches=max_searches,
                                 max_new_tokens=max_new_tokens, temperature=temperature, sampler=sampler,
                                 seed=seed * 100_003 + start)
        records += [{"query": q, "completion": row.text(tokenizer), "searches": row.record()["searches"],
                     "context_ids": row.context_ids, "names": row.names, "finish_reason": row.finish_reason}
                    for q, row in zip(batch, rows, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**key, "seed": seed, "records": records}))
    return records


def spread_over(items: list, limit: int | None) -> list:
    """At most `limit` of `items`, taken evenly over the list (the gold set is in document order)."""
    if not limit or len(items) <= limit:
        return items
    return [items[n * len(items) // limit] for n in range(limit)]


def compare_agentic(run_dir: str | Path, table: str | None = None, *, base: str | None = None, db: str | None = None,
                    seeds: list[int] = (0, 1, 2), max_new_tokens: int | None = None,
                    max_questions: int | None = None, output: str | Path | None = None, qa: str | Path | None = None,
                    table_version: int | None = None, storage_options: dict[str, str] | None = None,
                    echo=lambda line: None) -> AgenticComparison:
    """Score an agentic run's merged model and `base` searching for themselves on the gold questions about the
    run's held-out documents, beside a verbatim search and their own single-shot RAG; write report.md."""
    from ragrpo.config import PRESETS
    from ragrpo.evaluation.from_index import cached_answers, gold_questions, score_answers
    from ragrpo.tuning.agentic import run_tool
    from ragrpo.tuning.curriculum import (
        TRAINING_ONLY,
        IndexSource,
        document_id,
        open_run_table,
        rag_examples,
        read_curriculum,
    )
    from ragrpo.tuning.train import load_run_config

    started = time.time()
    run_dir = Path(run_dir)
    split, _ = read_curriculum(run_dir)
    source = split["source"]
    if not source.get("agentic"):
        raise RagrpoError(f"{run_dir} was not trained with --agentic; evaluate it without --agentic")
    if not (run_dir / "merged").exists():
        raise RagrpoError(f"{run_dir} has no merged/ model; did its training finish?")
    if not seeds:
        raise RagrpoError("give at least one seed")
    gold, questions = gold_questions(split, qa)
    if not questions:
        raise RagrpoError(f"{run_dir}: no gold questions are about its held-out documents; pass --qa FILE.jsonl")
    questions = spread_over(questions, max_questions)
    handle = open_run_table(split, table, db, table_version, storage_options, echo)
    tool = run_tool(split, handle)
    cfg = load_run_config(run_dir)
    grpo = {**PRESETS[cfg.preset], **cfg.grpo}
    tokens = max_new_tokens or grpo.get("max_completion_length", 128)
    temperature = grpo.get("temperature", 1.0)
    searches = source.get("max_searches", 3)
    column = split["text_column"]
    verbatim = [any(document_id(hit, column) == q.source_id for hit in tool(q.query)[0]) for q in questions]
    verbatim_found = sum(verbatim) / len(verbatim)
    echo(f"{len(questions)} held-out gold questions ({gold}); a search of the question verbatim finds the source "
         f"for {verbatim_found:.3f}")
    # single-shot RAG with the same model: the run's k passages for the question verbatim, as retrieved
    single = IndexSource(**{**source, "agentic": False, "cite": True, "order": "retrieved", "order_seed": 0,
                            **TRAINING_ONLY})
    rows = rag_examples(handle, questions, column, single)
    for row, question in zip(rows, questions, strict=True):
        row["answers"] = question.meta["answers"]
    folder = Path(output) if output else run_dir / "eval-agentic"
    sides, counts, loaded = {}, {}, {}
    for side, name in (("tuned", str(run_dir / "merged")), ("base", base)):
        sides[side] = []
        for seed in seeds:
            clock = time.time()
            records = agentic_records(folder, side, name, questions, tool, seed=seed, max_new_tokens=tokens,
                                      max_searches=searches, temperature=temperature, loaded=loaded)
            figures, counts = score_transcripts(records, questions)
            shot = score_answers(cached_answers(folder, side, name, rows, seed=seed, max_new_tokens=tokens,
                                                loaded=loaded, temperature=temperature), rows, []).figures
            figures["single-shot answer accuracy"] = shot["answer accuracy"]
            figures["single-shot cites source only"] = shot["cites source only"]
            sides[side].append(figures)
            echo(f"{side} seed {seed}: search found source {figures['search found source']:.3f}, answer accuracy "
                 f"{figures['answer accuracy']:.3f} (single-shot {shot['answer accuracy']:.3f}) "
                 f"({time.time() - clock:.0f} s)")
    loaded.clear()
    result = AgenticComparison(str(run_dir), handle.name, len(questions), verbatim_found, list(seeds), sides["base"],
                               sides["tuned"], counts, gold, temperature, searches, time.time() - started)
    write_report(result, folder)
    return result


def write_report(result: AgenticComparison, folder: Path) -> Path:
    """report.md, results.json and curves.png (the run's training log) in `folder`."""
    from ragrpo.evaluation.evaluate import plot_run
    from ragrpo.evaluation.from_index import figure_lines

    folder.mkdir(parents=True, exist_ok=True)
    plot_run(result.run_dir, folder / "curves.png")
    (folder / "results.json").write_text(json.dumps(result.to_dict(), indent=2))
    base, tuned = result.summary("base"), result.summary("tuned")
    lines = [f"# Agentic evaluation of {Path(result.run_dir).name} on table `{result.table_name}`", "",
             (f"{result.questions} gold questions ({result.gold}) about documents the run never trained on; "
              f"{len(result.seeds)} sampling seeds per model ({', '.join(map(str, result.seeds))}), temperature "
              f"{result.temperature:g}, up to {result.max_searches} searches. A search of the question verbatim "
              f"finds the source for **{result.verbatim_found:.3f}** of them (no model involved). "
              f"This call took {result.seconds / 60:.1f} min."), "",
             *figure_lines(base, tuned, result.counts, result.questions, result.verdicts())]
    found = result.verdicts()["search found source"]
    met = "met" if found["gain"] > found["spread"] else "NOT met"
    searched = (f"- the tuned model's own searches find the source more often than the base model's, beyond the "
                f"spread: **{met}** ({found['gain']:+.3f} against {found['spread']:.3f})")
    against = (f"- answer accuracy against single-shot RAG, tuned: {tuned['answer accuracy']['mean']:.3f} searching, "
               f"{tuned['single-shot answer accuracy']['mean']:.3f} single-shot; base: "
               f"{base['answer accuracy']['mean']:.3f} searching, {base['single-shot answer accuracy']['mean']:.3f} "
               "single-shot")
    lines += ["", "## Done when", "", searched, against, "", "![training curves](curves.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    return folder / "report.md"
