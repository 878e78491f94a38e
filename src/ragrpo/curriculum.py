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
import math
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ragrpo import RagrpoError
from ragrpo.config import RunConfig
from ragrpo.index import DEFAULT_DB, VECTOR_COLUMN, open_table
from ragrpo.rag import build_prompt
from ragrpo.retrieve import MODES, text_column
from ragrpo.rewards import STOP_WORDS, words

ID_COLUMNS = ("id", "doc_id", "document_id")
TITLE_COLUMNS = ("title", "name", "heading")
YEAR_COLUMNS = ("release_year", "year")
QUESTION_MODES = ("templates", "model")
# The rewards of a from-index run, and how they are combined. Each reward is normalised within its group
# of completions before the weighted sum (TRL's `multi_objective_aggregation="normalize_then_sum"`), so a
# weight says how much a reward counts whatever its unit: the write-up's length reward is in characters
# (-abs(50 - len), often -300 for a rambling answer) and, summed raw, it drowned groundedness and citation
# (both within [-1, 1]). Measured on the built-in corpus (bench/results/from-index/NOTES.md):
# - groundedness leaves out the question's own words: template questions are made of the source's words,
#   and the first run learned to repeat the question;
# - a citation earns only as much as the answer is grounded in the cited source: the second run (plain
#   `source_citation`) learned to answer with bare passage names ("Movie- 2.");
# - both runs, with raw sums, learned above all to be short (10 to 20 tokens), and the third (grounded
#   citation, raw sum, length weight 0.003) stopped citing at all;
# - with normalised rewards, groundedness rose far past the seed spread but citation did not (fourth
#   and fifth runs): a reference to the source earned only the answer's grounded share, and a
#   completion that both cited the source and said something grounded was too rare to learn from.
#   The citation reward now asks only that the answer say something (five content words of its own)
#   and groundedness, beside it, asks that it be grounded; a bare "Movie- 2." still earns nothing.
# - with that reward (sixth run) the model cited more but mostly "[1][2]", which scored 0.5 whenever the
#   source was one of the two. Making another passage cost -1 (`source_citation_only`, seventh run)
#   taught it to stop citing. Heading each passage with its film's title (eighth run) taught it to
#   answer with titles alone ("[1] The Ferryman's Ledger (1923)"), short enough to please the length
#   reward.
# - retrieving by vector, the source was passage 1 for only 59% of the questions, and the model could
#   not tell which passage a title question was about. Hybrid search (the default `mode` here) puts it
#   first for 75% of them (vector 61%, over all the built-in corpus's template questions). The citation
#   reward is the evaluation's citation accuracy as a reward (`source_citation_exact`): only a reference
#   to the source alone earns 1, and a wrong guess costs no more than citing nothing.
DEFAULT_REWARDS = ["groundedness_beyond_question", "source_citation_exact=1.5", "length=0.5"]
DEFAULT_AGGREGATION = "normalize_then_sum"
REASONING_REWARDS = ["format=0.5"]
# Written for this project: the model writes one question about a passage, in its own words.
QUESTION_PROMPT = ("Read the passage below and write one question that it answers. Reply with the question "
                   "only.\n\nPassage:\n{text}")


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

    def __post_init__(self):
        if self.questions not in QUESTION_MODES:
            raise RagrpoError(f"--questions {self.questions!r}: use one of {', '.join(QUESTION_MODES)}")
        if self.k < 1:
            raise RagrpoError(f"-k must be at least 1, got {self.k}")
        if self.mode not in MODES:
            raise RagrpoError(f"--mode {self.mode!r}: use one of {', '.join(MODES)}")
        if not 0 < self.held_out < 1:
            raise RagrpoError(f"held_out must be in (0, 1) for a from-index run, got {self.held_out}")
        if self.max_documents is not None and self.max_documents < 2:
            raise RagrpoError(f"--max-documents must be at least 2, got {self.max_documents}")


@dataclass
class Question:
    query: str
    kind: str
    source_id: str
    meta: dict = field(default_factory=dict)


# ---- documents ------------------------------------------------------------------------------------


def document_id(row: dict, column: str) -> str:
    for name in ID_COLUMNS:
        if row.get(name) not in (None, ""):
            return str(row[name])
    return "sha1:" + hashlib.sha1(str(row[column]).encode()).hexdigest()[:12]


def read_documents(table, where: str | None = None) -> list[dict]:
    """Every row of `table` (matching `where`) as a dict without its vector, in the table's order."""
    from ragrpo.retrieve import check_where

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


# ---- questions from templates ---------------------------------------------------------------------


def _first(row: dict, names: tuple[str, ...]):
    return next((row[n] for n in names if row.get(n) not in (None, "")), None)


def document_frequencies(texts: list[str]) -> Counter:
    return Counter(w for text in texts for w in set(words(text)))


def keywords(text: str, df: Counter, documents: int, n: int = 6) -> list[str]:
    """The `n` most distinctive words of `text` (tf-idf over the documents), longest first on ties.

    Only alphabetic words of 4+ letters outside the stop list: they read well inside a question.
    """
    counts = Counter(w for w in words(text) if len(w) >= 4 and w.isalpha() and w not in STOP_WORDS)
    score = {w: c * math.log((1 + documents) / (1 + df[w])) for w, c in counts.items()}
    return sorted(score, key=lambda w: (-score[w], -len(w), w))[:n]


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def template_questions(row: dict, column: str, df: Counter, documents: int) -> list[Question]:
    """Up to four questions that `row` answers, from its title, year and most distinctive words."""
    source = document_id(row, column)
    title, year = _first(row, TITLE_COLUMNS), _first(row, YEAR_COLUMNS)
    noun = "film" if "movie" in column or "plot" in column else "document"
    words_ = keywords(str(row[column]), df, documents)
    out = []
    if title:
        out.append(Question(f"What happens in {title}?", "what", source))
    if year is not None and len(words_) >= 3:
        out.append(Question(f"Which {year} {noun} is about {_listing(words_[:3])}?", "year", source))
    if len(words_) >= 6:
        out.append(Question(f"Which {noun} involves {_listing(words_[3:6])}?", "keyword", source))
    elif len(words_) >= 2:
        out.append(Question(f"Which {noun} involves {_listing(words_[:2])}?", "keyword", source))
    if title:
        out.append(Question(f"Summarize the story of {title} in two sentences.", "summary", source))
    elif words_:
        out.append(Question(f"Summarize the {noun} about {_listing(words_[:2])}.", "summary", source))
    return out


# ---- questions written by the model ---------------------------------------------------------------

_QUESTION_LINE = re.compile(r"[^\n?]{8,}\?")


def model_questions(rows: list[dict], column: str, model, tokenizer, *, batch_size: int = 8,
                    max_new_tokens: int = 48) -> list[Question]:
    """One question per document, written greedily by `model` from the document's text.

    A reply without a question mark falls back to the document's keyword question, so every document
    still gets one (`kind` says which).
    """
    from ragrpo.rag import generate

    df = document_frequencies([str(r[column]) for r in rows])
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        conversations = [[{"role": "user", "content": QUESTION_PROMPT.format(text=r[column])}] for r in chunk]
        replies = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                           repetition_penalty=1.2)
        for row, reply in zip(chunk, replies, strict=True):
            found = _QUESTION_LINE.search(reply)
            if found:
                out.append(Question(" ".join(found.group(0).split()), "model", document_id(row, column)))
            else:
                fallback = template_questions(row, column, df, len(rows))
                out += [q for q in fallback if q.kind == "keyword"][:1]
    return out


# ---- the dataset ----------------------------------------------------------------------------------


def make_questions(rows: list[dict], column: str, mode: str, model=None, tokenizer=None) -> list[Question]:
    if mode == "model":
        return model_questions(rows, column, model, tokenizer)
    df = document_frequencies([str(r[column]) for r in rows])
    return [q for row in rows for q in template_questions(row, column, df, len(rows))]


def rag_example(question: Question, hits: list[dict], column: str, *, reasoning: bool, cite: bool = False) -> dict:
    """One training row: the prompt `ask` would build from `hits`, and what rewards need to know."""
    ids = [document_id(hit, column) for hit in hits]
    texts = [str(hit[column]) for hit in hits]
    prompt = build_prompt(question.query, texts, reasoning=reasoning, cite=cite)
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "query": question.query,
        "context": texts,
        "context_ids": ids,
        "source_id": question.source_id,
        "source_rank": ids.index(question.source_id) + 1 if question.source_id in ids else 0,
        "kind": question.kind,
    }


def retrieve_all(table, queries: list[str], *, where: str | None, k: int, mode: str = "vector") -> list[list[dict]]:
    """`rag.retrieve` for many queries. fts and hybrid go through it query by query; vector uses the same
    embedding function (the table's own), filter and k, but embeds the queries in one batch (one at a
    time costs ~10x more on a CPU)."""
    from lancedb.embeddings import EmbeddingFunctionRegistry

    from ragrpo.rag import retrieve
    from ragrpo.retrieve import check_where

    if not queries:
        return []
    if mode != "vector":
        return [retrieve(table, query, where=where, k=k, mode=mode)[0] for query in queries]
    if where:
        check_where(table, where)
    configs = EmbeddingFunctionRegistry.get_instance().parse_functions(table.schema.metadata)
    func = next(iter(configs.values())).function
    vectors = func.generate_embeddings(queries)  # (Q, dim)
    out = []
    for query, vector in zip(queries, vectors, strict=True):
        builder = table.search(vector).limit(k)
        if where:
            builder = builder.where(where, prefilter=True)
        hits = builder.to_list()
        if not hits:
            raise RagrpoError(f"no rows match --where {where!r}; nothing to answer from" if where else
                              "the table is empty")
        for hit in hits:
            hit.pop(VECTOR_COLUMN, None)
        out.append(hits)
    return out


def rag_examples(table, questions: list[Question], column: str, source: IndexSource) -> list[dict]:
    hits = retrieve_all(table, [q.query for q in questions], where=source.where, k=source.k, mode=source.mode)
    return [rag_example(q, h, column, reasoning=source.reasoning, cite=source.cite)
            for q, h in zip(questions, hits, strict=True)]


@dataclass
class Curriculum:
    source: IndexSource
    text_column: str
    train_ids: list[str]
    held_ids: list[str]
    examples: list[dict]
    held_questions: list[Question]

    def split_record(self) -> dict:
        return {"source": asdict(self.source), "text_column": self.text_column,
                "train_documents": self.train_ids, "held_out_documents": self.held_ids,
                "train_questions": len(self.examples), "held_out_questions": len(self.held_questions)}

    def files(self) -> dict[str, str]:
        """The run folder's `curriculum/` files, as text."""
        lines = lambda records: "".join(json.dumps(r) + "\n" for r in records)
        return {
            "curriculum/split.json": json.dumps(self.split_record(), indent=2),
            "curriculum/train.jsonl": lines(self.examples),
            "curriculum/heldout.jsonl": lines(asdict(q) for q in self.held_questions),
        }


def build_curriculum(source: IndexSource, model=None, tokenizer=None) -> Curriculum:
    """Split the table's documents, make questions, and retrieve for the training questions."""
    table = open_table(source.table, source.db)
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
    train_questions = [q for q in questions if q.source_id not in held]
    if not train_questions:
        raise RagrpoError(f"no question could be made from the documents of {source.table!r}")
    examples = rag_examples(table, train_questions, column, source)
    return Curriculum(source, column, sorted(set(ids) - held), sorted(held), examples,
                      [q for q in questions if q.source_id in held])


def read_curriculum(run_dir: str | Path) -> tuple[dict, list[Question]]:
    """A from-index run's split record and held-out questions."""
    folder = Path(run_dir) / "curriculum"
    if not (folder / "split.json").exists():
        raise RagrpoError(f"{run_dir} is not a from-index run folder (no curriculum/split.json); train it with "
                          "`ragrpo train --from-index TABLE`")
    split = json.loads((folder / "split.json").read_text())
    held = [Question(**json.loads(line)) for line in (folder / "heldout.jsonl").read_text().splitlines() if line]
    return split, held


# ---- training -------------------------------------------------------------------------------------


def from_index_config(cfg: RunConfig, source: IndexSource, rewards_given: bool) -> RunConfig:
    """The run configuration of a from-index run: its own default rewards, each normalised within its group
    before the weighted sum (unless the configuration says otherwise), unless rewards were given."""
    if not rewards_given:
        cfg.rewards = DEFAULT_REWARDS + (REASONING_REWARDS if source.reasoning else [])
        cfg.grpo.setdefault("multi_objective_aggregation", DEFAULT_AGGREGATION)
    return cfg


def train_from_index(cfg: RunConfig, source: IndexSource, *, overwrite: bool = False):
    """Build the curriculum from the table, then GRPO-train on it as `ragrpo train` does.

    The training rows are written to `OUTPUT/curriculum/train.jsonl` and the run's `dataset` points
    there with `held_out` 0 (the held-out documents never made it into the file), so `--resume` and
    `ragrpo eval` read the same rows back. Prompts are not shortened: `max_prompt_length` is raised to
    the longest prompt, so no passage loses its end.
    """
    from ragrpo.models import load_model
    from ragrpo.reward_specs import resolve_rewards
    from ragrpo.train import build_dataset, check_output, train

    output = Path(cfg.output)
    check_output(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise RagrpoError(f"output folder {output} is not empty; pass --overwrite or another --output")
    resolve_rewards(cfg.rewards)  # fail on an unknown reward before anything slow
    model, tokenizer = load_model(cfg.model) if source.questions == "model" else (None, None)
    curriculum = build_curriculum(source, model, tokenizer)
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
    return train(cfg, overwrite=overwrite, dataset=dataset, files=files), curriculum
