"""Training on your own index: GRPO prompts built from the LanceDB table the model will answer over.

The write-up trains on one dataset and answers over another, so the tuned model never sees a RAG
prompt while it learns. Here the training prompts are RAG prompts over the user's own table, made
without labels:

1. read the table's documents (optionally those matching `--where`) and split them by document into
   training and held-out, by a stable hash of each document's id (the split is recorded in the run);
2. for every document, make questions it answers: from templates over its fields and text (what
   happens in it, which film of its year is about its keywords, which story involves other keywords,
   a summary request), or written by the model itself (`questions="model"`);
3. retrieve the top k for each question with exactly what `ragrpo ask --mode MODE` uses (the table's
   embedding function, the same search mode, filter and k, `rag.build_prompt`), and keep the retrieved passages (`context`),
   their document ids (`context_ids`) and the source document's id (`source_id`) as dataset columns,
   so that rewards such as `groundedness` and `source_citation_grounded` can see them.

Prompts ask for a citation by default (`cite`; `ask --cite` builds the same prompt, `ask --reasoning`
the reasoning one): the write-up's prompt never asks for a source, so a small model names none and a
citation reward would have nothing to reinforce.

The run folder gets a `curriculum/` folder: `train.jsonl` (the training rows, which `--resume` reads
back), `heldout.jsonl` (the held-out questions, which `ragrpo eval --from-index` retrieves for again)
and `split.json` (the settings and the document ids on each side).

A document's id is its `id`/`doc_id`/`document_id` column when the table has one, else a hash of its
text, so the same document gets the same id in every run.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ragrpo import RagrpoError
from ragrpo.config import RunConfig
from ragrpo.prompts import (
    PassageStyle,
    build_agentic_prompt,
    build_prompt,
    passage_names,
    table_style,
)
from ragrpo.retrieval.index import DEFAULT_DB, ID_COLUMNS, VECTOR_COLUMN, document_id, open_table  # noqa: F401
from ragrpo.retrieval.search import MODES, text_column
from ragrpo.tuning.orders import balanced_orders, mixed_orders
from ragrpo.tuning.questions import (  # noqa: F401  (re-exported: the questions were made here before)
    HEADER_KINDS,
    QUESTION_KINDS,
    QUESTION_MODES,
    QUESTION_PROMPT,
    Question,
    blank_questions,
    document_frequencies,
    keywords,
    make_questions,
    model_questions,
    parse_kinds,
    subject_questions,
    template_questions,
)

ORDERS = ("balanced", "retrieved", "mixed")
# `IndexSource` settings that deal a run's training questions only: an evaluation of the run asks without them
TRAINING_ONLY = {"not_first": None, "not_first_questions": 0}  # tuning/orders.py; mixed: tuning/groups.py too
# The recipe of a from-index run, r14's (bench/results/from-index/NOTES.md says how each piece was found):
# the weighted sum normalised within the group (normalising each reward first gave a reward without spread,
# length, the whole vote in r12), G=8 completions of one prompt per step, no KL term, and TRL's adaptive
# entropy bonus, which engages only if the policy's entropy falls below 1 nat (r13 collapsed to 0.06).
# `answer_match_own_words` pays a right answer less the more of it is copied in long runs: on two seed-42 runs it kept
# accuracy within a spread of `answer_match`'s and held distinct-2 where `answer_match` lost 0.045 to 0.11 (sessions
# 27-28). The terms with weight 0 are logged, not paid: `answer_match` (read by the step-100 check),
# `verbatim_span` (the copied share), and `drawn_from_first`, the share of answers drawn from passage 1, about
# 1/k for a run that reads, 0.76 on held-out answers for one that learned to retell passage 1 (session 22).
DEFAULT_REWARDS = ["answer_match_own_words=2", "source_citation_debiased_1w", "drawn_from_first=0", "answer_match=0",
                   "verbatim_span=0"]
# The check of a default-recipe run at step 100 (tuning/restart.py), recorded and not acted on unless `restarts` is
# set: two restarts measured in session 25 gave no run that reads (NOTES.md). Chosen on runs that trained on every
# question kind, without --reasoning or --agentic, so it comes only with those: a run on name questions alone
# averages less `answer_match` early (one that read averaged 0.205 over steps 51-100, session 26).
DEFAULT_RESTART = "answer_match<0.22@100"
DEFAULT_AGGREGATION = "sum_then_normalize"
DEFAULT_GRPO = {"beta": 0.0, "use_adaptive_entropy": True, "entropy_target": 1.0, "entropy_coef_delta": 0.01,
                "entropy_coef_max": 0.3}
DEFAULT_GROUP = {"num_generations": 8, "per_device_train_batch_size": 8}  # only when neither is given
REASONING_REWARDS = ["format=0.5"]
# `--agentic`: the answer and citation terms above, plus what the searches did (rewards/agentic.py)
AGENTIC_REWARDS = ["answer_match=2", "source_citation_debiased_1w", "search_found_source", "search_format=0.5",
                   "search_cost"]


@dataclass
class IndexSource:
    """Where a from-index run takes its documents and how it turns them into prompts."""

    table: str
    db: str = DEFAULT_DB
    where: str | None = None
    k: int = 3
    mode: str = "hybrid"
    questions: str = "templates"
    reasoning: bool = False
    cite: bool = True
    held_out: float = 0.1
    max_documents: int | None = None
    header: str | None = None  # the passage header template; None: from the table's columns
    # passage order in a prompt: source position spread evenly over 1..k, as retrieved, or (training only)
    # mixed: each of a question's G answers under one of k orders, the source at each position (tuning/groups.py)
    order: str = "balanced"
    order_seed: int = 0
    agentic: bool = False  # no passages up front: the model searches the table itself (`tuning.agentic`)
    max_searches: int = 3
    # the question kinds trained on (QUESTION_KINDS); None: `training_kinds` decides (no HEADER_KINDS)
    kinds: tuple[str, ...] | None = None
    # question kinds whose source is never shown first in a training prompt (with a balanced or mixed order)
    not_first: tuple[str, ...] | None = None
    # the first N questions trained on show their source at 2..k only (balanced order); the rows are then written
    # in the order they train, and TRL's shuffling is turned off (`from_index_config`)
    not_first_questions: int = 0

    def __post_init__(self):
        self.kinds = None if self.kinds is None else tuple(self.kinds)
        self.not_first = None if self.not_first is None else tuple(self.not_first)
        for option, given in (("--kinds", self.kinds), ("--not-first", self.not_first)):
            unknown = sorted(set(given or ()) - set(QUESTION_KINDS))
            if unknown or given == ():
                said = f"{','.join(unknown)}: unknown question kind" if unknown else "names no kind"
                raise RagrpoError(f"{option} {said}; use some of {', '.join(QUESTION_KINDS)}, or all")
        if self.max_searches < 1:
            raise RagrpoError(f"--max-searches must be at least 1, got {self.max_searches}")
        if self.not_first_questions < 0:
            raise RagrpoError(f"--not-first-questions must be 0 or more, got {self.not_first_questions}")
        if self.not_first_questions and (self.agentic or self.order != "balanced"):
            raise RagrpoError("--not-first-questions deals passage orders in the order questions are trained: it "
                              "needs --order balanced, without --agentic")
        if self.agentic and self.reasoning:
            raise RagrpoError("--agentic and --reasoning cannot be combined: an agentic answer follows its searches")
        if self.questions not in QUESTION_MODES:
            raise RagrpoError(f"--questions {self.questions!r}: use one of {', '.join(QUESTION_MODES)}")
        if self.k < 1:
            raise RagrpoError(f"-k must be at least 1, got {self.k}")
        if self.mode not in MODES:
            raise RagrpoError(f"--mode {self.mode!r}: use one of {', '.join(MODES)}")
        if not 0 < self.held_out < 1:
            raise RagrpoError(f"held_out must be in (0, 1) for a from-index run, got {self.held_out}")
        if self.order not in ORDERS:
            raise RagrpoError(f"--order {self.order!r}: use one of {', '.join(ORDERS)}")
        if self.max_documents is not None and self.max_documents < 2:
            raise RagrpoError(f"--max-documents must be at least 2, got {self.max_documents}")


# ---- documents ------------------------------------------------------------------------------------


def read_documents(table, where: str | None = None) -> list[dict]:
    """Every row of `table` (matching `where`) as a dict without its vector, in the table's order."""
    from ragrpo.retrieval.search import check_where

    builder = table.search().limit(table.count_rows() or 1)
    if where:
        check_where(table, where)  # one clear line for an unknown column or bad SQL
        builder = builder.where(where)
    rows = builder.to_list()
    for row in rows:
        row.pop(VECTOR_COLUMN, None)
    if not rows:
        raise RagrpoError(f"no rows match --where {where!r}" if where else "the table is empty")
    return rows


def is_held_out(doc_id: str, share: float) -> bool:
    """A stable, order-free choice: the first 4 bytes of the id's SHA-1 as a fraction of 2**32."""
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:4], "big") / 2**32 < share


# ---- the dataset ----------------------------------------------------------------------------------


def rag_example(question: Question, hits: list[dict], column: str, *, reasoning: bool, cite: bool = False,
                style: PassageStyle | None = None, order: list[int] | None = None) -> dict:
    """One training row: the prompt `ask` would build from `hits` (shown in `order`, indices into the hits;
    default as retrieved), and what rewards need to know. `retrieved_order` gives each shown passage's
    rank in the retrieval, `source_rank` the source's position in the prompt (0: not retrieved)."""
    style = style or PassageStyle()
    order = list(range(len(hits))) if order is None else order
    shown = [style.passage(hits[i], column) for i in order]
    ids = [document_id(hits[i], column) for i in order]
    prompt = build_prompt(question.query, shown, reasoning=reasoning, cite=cite, label=style.label)
    names = [passage_names(hits[i], p.header) for i, p in zip(order, shown)]
    own = {name for group, i in zip(names, ids) if i == question.source_id for name in group}
    others = [name for group, i in zip(names, ids) if i != question.source_id for name in group if name not in own]
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "query": question.query,
        "context": [p.context() for p in shown],
        "context_ids": ids,
        "source_id": question.source_id,
        "source_rank": ids.index(question.source_id) + 1 if question.source_id in ids else 0,
        "retrieved_order": [i + 1 for i in order],
        "kind": question.kind,
        "targets": list(question.meta.get("targets", [])),
        # the other passages' names: an answer naming one of them has not answered (`answer_match`)
        "distractors": list(dict.fromkeys(others)),
    }


def retrieve_all(table, queries: list[str], *, where: str | None, k: int, mode: str = "vector") -> list[list[dict]]:
    """`rag.retrieve` for many queries, with the queries embedded in one batch first (one at a time costs
    ~10x more on a CPU); the search itself is `ask`'s, index settings included."""
    from ragrpo.generation.rag import retrieve
    from ragrpo.retrieval.search import embed_queries

    if not queries:
        return []
    vectors = embed_queries(table, queries) if mode != "fts" else [None] * len(queries)
    return [retrieve(table, query, where=where, k=k, mode=mode, vector=vector)[0]
            for query, vector in zip(queries, vectors, strict=True)]


def agentic_example(question: Question, label: str, max_searches: int) -> dict:
    """One agentic training row: the question and the instructions, no passages (the rollout searches and
    fills `context`, `context_ids` and `distractors` per completion)."""
    return {"prompt": [{"role": "user", "content": build_agentic_prompt(question.query, max_searches, label)}],
            "query": question.query, "source_id": question.source_id, "kind": question.kind,
            "targets": list(question.meta.get("targets", []))}


def rag_examples(table, questions: list[Question], column: str, source: IndexSource, group: int = 1) -> list[dict]:
    """A prompt row per question: retrieved as `ask` retrieves, headed in the table's style, in `source.order`;
    with `source.agentic`, the question alone (`agentic_example`). In `mixed` order, `group` rows per question
    (one per answer of its GRPO group, tagged with the question's number in `GROUP_COLUMN`)."""
    from ragrpo.tuning.groups import GROUP_COLUMN

    style = table_style(table, source.header)
    if source.agentic:
        return [agentic_example(q, style.label, source.max_searches) for q in questions]
    hits = retrieve_all(table, [q.query for q in questions], where=source.where, k=source.k, mode=source.mode)
    ids = [[document_id(hit, column) for hit in h] for h in hits]
    sources = [q.source_id for q in questions]
    late = [q.kind in (source.not_first or ()) or n < source.not_first_questions for n, q in enumerate(questions)]
    if source.order == "mixed":
        orders = mixed_orders(ids, sources, group, source.order_seed, late)
        return [{**rag_example(q, h, column, reasoning=source.reasoning, cite=source.cite, style=style, order=o),
                 GROUP_COLUMN: n}
                for n, (q, h, group_orders) in enumerate(zip(questions, hits, orders, strict=True))
                for o in group_orders]
    orders = balanced_orders(ids, sources, source.order_seed, late) if source.order == "balanced" else [None] * len(hits)
    return [rag_example(q, h, column, reasoning=source.reasoning, cite=source.cite, style=style, order=o)
            for q, h, o in zip(questions, hits, orders, strict=True)]


@dataclass
class Curriculum:
    source: IndexSource
    text_column: str
    train_ids: list[str]
    held_ids: list[str]
    examples: list[dict]
    held_questions: list[Question]
    table_uri: str = ""
    table_version: int | None = None  # the LanceDB version the questions were made and retrieved from

    def split_record(self) -> dict:
        return {"source": asdict(self.source), "text_column": self.text_column,
                "table_uri": self.table_uri, "table_version": self.table_version,
                "train_documents": self.train_ids, "held_out_documents": self.held_ids,
                "train_questions": self.train_questions, "held_out_questions": len(self.held_questions),
                "train_kinds": dict(Counter(row["kind"] for row in self.question_rows().values() if "kind" in row))}

    def question_rows(self) -> dict:
        """One training row per question: a mixed-order curriculum writes G rows for each, tagged with its number."""
        from ragrpo.tuning.groups import GROUP_COLUMN

        rows = {}
        for n, row in enumerate(self.examples):
            rows.setdefault(row.get(GROUP_COLUMN, n), row)
        return rows

    @property
    def train_questions(self) -> int:
        return len(self.question_rows())

    def files(self) -> dict[str, str]:
        """The run folder's `curriculum/` files, as text."""
        from ragrpo.answer_settings import RUN_FILE, AnswerSettings

        lines = lambda records: "".join(json.dumps(r) + "\n" for r in records)
        settings = AnswerSettings(self.source.mode, self.source.k, self.source.cite, self.source.reasoning,
                                  self.source.header)
        return {
            RUN_FILE: settings.to_json(),  # copied beside the merged model once it is saved
            "curriculum/split.json": json.dumps(self.split_record(), indent=2),
            "curriculum/train.jsonl": lines(self.examples),
            "curriculum/heldout.jsonl": lines(asdict(q) for q in self.held_questions),
        }


def training_kinds(source: IndexSource, made: set[str]) -> set[str]:
    """The kinds of question a run trains on, of the kinds `made` for its training documents: those asked for
    (`--kinds`); by default, with template questions over passages shown up front, all but HEADER_KINDS where
    another kind was made. An agentic run searches before it sees a passage, so no position pays there: it keeps
    them all."""
    if source.kinds is not None:
        return set(source.kinds)
    if source.agentic or source.questions != "templates":
        return made
    return made - set(HEADER_KINDS) or made


def build_curriculum(source: IndexSource, model=None, tokenizer=None, *,
                     storage_options: dict[str, str] | None = None, group: int = 1) -> Curriculum:
    """Split the table's documents, make questions, and retrieve for the training questions. The
    `storage_options` (an object store's credentials, perhaps) are used, never recorded; `group` is the
    number of answers per question, for a `mixed` order."""
    table = open_table(source.table, source.db, storage_options)
    column = text_column(table)
    rows = read_documents(table, source.where)
    if source.max_documents:
        rows = rows[:source.max_documents]
    ids = [document_id(r, column) for r in rows]
    held = {i for i in ids if is_held_out(i, source.held_out)}
    if not held or len(held) == len(set(ids)):
        raise RagrpoError(f"{len(rows)} documents cannot be split into training and held-out with held_out "
                          f"{source.held_out}; add documents or change the share")
    questions = make_questions(rows, column, source.questions, model, tokenizer)
    trainable = [q for q in questions if q.source_id not in held]
    kinds = training_kinds(source, {q.kind for q in trainable})
    train_questions = [q for q in trainable if q.kind in kinds]
    if not train_questions:
        asked = f" of kinds {', '.join(source.kinds)}" if source.kinds else ""
        raise RagrpoError(f"no question{asked} could be made from the documents of {source.table!r}")
    if source.not_first_questions:  # the rows train in the order written: shuffle them here, seeded
        random.Random(source.order_seed).shuffle(train_questions)
    examples = rag_examples(table, train_questions, column, source, group)
    return Curriculum(source, column, sorted(set(ids) - held), sorted(held), examples,
                      [q for q in questions if q.source_id in held], table_uri=str(table.uri),
                      table_version=table.version)


def read_curriculum(run_dir: str | Path) -> tuple[dict, list[Question]]:
    """A from-index run's split record and held-out questions."""
    folder = Path(run_dir) / "curriculum"
    if not (folder / "split.json").exists():
        raise RagrpoError(f"{run_dir} is not a from-index run folder (no curriculum/split.json); train it with "
                          "`ragrpo train --from-index TABLE`")
    split = json.loads((folder / "split.json").read_text())
    held = [Question(**json.loads(line)) for line in (folder / "heldout.jsonl").read_text().splitlines() if line]
    return split, held


def checkout_version(table, version: int | None, echo):
    """`table` as it was at `version` (read-only), or the latest when `version` is None (with a notice)."""
    if version is None:
        echo(f"notice: the run recorded no table version; reading the latest ({table.version})")
        return table
    if version != table.version:
        known = [v.version if hasattr(v, "version") else v["version"] for v in table.list_versions()]
        if version not in known:
            raise RagrpoError(f"table {table.name!r} has no version {version} (it has {min(known)} to {max(known)}); "
                              "pass --table-version with one of them")
        table.checkout(version)
    return table


def open_run_table(split: dict, table: str | None = None, db: str | None = None, table_version: int | None = None,
                   storage_options: dict[str, str] | None = None, echo=lambda line: None):
    """The table a from-index run trained on (its split record names it), at the version it recorded,
    or at `table_version`; `table` and `db` point elsewhere."""
    source = split["source"]
    handle = open_table(table or source["table"], db or source["db"], storage_options)
    return checkout_version(handle, table_version if table_version is not None else split.get("table_version"),
                            echo)


# ---- training -------------------------------------------------------------------------------------


def from_index_config(cfg: RunConfig, source: IndexSource, rewards_given: bool) -> RunConfig:
    """The run configuration of a from-index run: its own default rewards, aggregation and restart rule unless
    rewards were given, and its GRPO settings (`DEFAULT_GRPO`, `DEFAULT_GROUP`) wherever the configuration is silent."""
    if not rewards_given:
        cfg.rewards = (AGENTIC_REWARDS if source.agentic else DEFAULT_REWARDS) + (
            REASONING_REWARDS if source.reasoning else [])
        cfg.grpo.setdefault("multi_objective_aggregation", DEFAULT_AGGREGATION)
        every_kind = source.kinds is not None and set(HEADER_KINDS) <= set(source.kinds)
        if every_kind and not (source.agentic or source.reasoning) and cfg.restart_if is None:
            cfg.restart_if = DEFAULT_RESTART
            cfg.restarts = 0 if cfg.restarts is None else cfg.restarts
    for name, value in DEFAULT_GRPO.items():
        cfg.grpo.setdefault(name, value)
    if source.not_first_questions:  # its first questions must be trained first (`build_dataset` keeps the order too)
        if cfg.grpo.get("shuffle_dataset") is True:
            raise RagrpoError("--not-first-questions trains the curriculum in its own order: remove "
                              "shuffle_dataset = true from the configuration")
        cfg.grpo["shuffle_dataset"] = False
    if not set(DEFAULT_GROUP) & set(cfg.grpo):
        cfg.grpo.update(DEFAULT_GROUP)
    return cfg


def train_from_index(cfg: RunConfig, source: IndexSource, *, overwrite: bool = False,
                     storage_options: dict[str, str] | None = None, callbacks=()):
    """Build the curriculum from the table, then GRPO-train on it as `ragrpo train` does.

    The training rows are written to `OUTPUT/curriculum/train.jsonl` and the run's `dataset` points
    there with `held_out` 0 (the held-out documents never made it into the file), so `--resume` and
    `ragrpo eval` read the same rows back. Prompts are not shortened: `max_prompt_length` is raised to
    the longest prompt, so no passage loses its end. `callbacks` (transformers TrainerCallbacks) go to `train`.
    """
    from ragrpo.config import grpo_config
    from ragrpo.models import load_model
    from ragrpo.rewards.registry import resolve_rewards
    from ragrpo.tuning.train import build_dataset, check_output, train

    output = Path(cfg.output)
    check_output(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise RagrpoError(f"output folder {output} is not empty; pass --overwrite or another --output")
    resolve_rewards(cfg.rewards)  # fail on an unknown reward before anything slow
    open_table(source.table, source.db, storage_options)  # and on a missing table, bucket or credential
    model, tokenizer = load_model(cfg.model) if source.questions == "model" else (None, None)
    group = grpo_config(cfg, output / "checkpoints").num_generations
    curriculum = build_curriculum(source, model, tokenizer, storage_options=storage_options, group=group)
    del model
    if tokenizer is None:
        from transformers import AutoTokenizer

        from ragrpo.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    lengths = [len(tokenizer.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)) for e in curriculum.examples]
    cfg.max_prompt_length = max(cfg.max_prompt_length, max(lengths))
    cfg.held_out = 0.0
    files = curriculum.files()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "train.jsonl"
        staged.write_text(files["curriculum/train.jsonl"])
        cfg.dataset = str(staged)
        dataset = build_dataset(cfg, tokenizer)
    cfg.dataset = str(output / "curriculum" / "train.jsonl")
    rollout = agentic_rollout(curriculum.split_record(), storage_options) if source.agentic else None
    return train(cfg, overwrite=overwrite, dataset=dataset, files=files, rollout=rollout,
                 callbacks=callbacks), curriculum


def agentic_rollout(split: dict, storage_options: dict[str, str] | None = None):
    """The search loop of an agentic run as TRL's `rollout_func`, over the table at the version it trained on."""
    from ragrpo.tuning.agentic import AgenticRollout, run_tool

    table = open_run_table(split, storage_options=storage_options)
    return AgenticRollout(run_tool(split, table), split["source"].get("max_searches", 3))


def resume(cfg: RunConfig, storage_options: dict[str, str] | None = None, overwrite: bool = False):
    """`ragrpo train --resume`: a run continues from its last checkpoint; an agentic from-index run gets its
    search loop back (its split record says how it searched). `overwrite` is refused, by `train`."""
    from ragrpo.tuning.train import train

    split = Path(cfg.output) / "curriculum" / "split.json"
    rollout = None
    if not overwrite and split.exists() and json.loads(split.read_text())["source"].get("agentic"):
        rollout = agentic_rollout(json.loads(split.read_text()), storage_options)
    return train(cfg, resume=True, overwrite=overwrite, rollout=rollout)
