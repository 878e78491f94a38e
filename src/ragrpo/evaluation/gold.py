"""Gold answers: question sets with short reference answers, and how an answer is scored against them.

A gold file is JSONL, one question a line:

    {"question": "...", "answers": ["short answer", "accepted variant"], "source_id": "sha1:...", "kind": "person"}

`question` and `answers` (a list, or one answer as a string) are required; `source_id` (the document
the answer comes from, as `ragrpo.tuning.curriculum.document_id` computes it) and `kind` are optional.
`builtin:movies` is the set packaged for the built-in corpus (`ragrpo/data/movies_gold.jsonl`):
questions written by hand about the films that a from-index run holds out at `held_out` 0.2 (and so at
the default 0.1), every answer found in its film's plot or metadata. It lives beside the corpus but
nothing that builds training prompts reads it: the curriculum reads only the indexed table. `builtin:pydocs`
(`ragrpo/data/pydocs_gold.jsonl`) is the same for the Python help topics: questions written by hand
about the topics held out at 0.2, `source_id` the topic key, every answer found verbatim in its
topic's text in Python 3.11 to 3.13.

Scoring follows SQuAD's evaluation script: both sides are normalised (lowercase, punctuation removed,
the articles a/an/the dropped, whitespace folded). `answer_accuracy` asks that a gold answer appear
in the answer as a run of whole words, since a generated answer is a sentence, not an extracted span;
`token_f1` is SQuAD's bag-of-tokens F1, best over the golds. Stdlib only, so importing it is instant.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ragrpo import RagrpoError

BUILTIN_GOLD = {"builtin:movies": "movies_gold.jsonl", "builtin:pydocs": "pydocs_gold.jsonl"}
KINDS = ("title", "year", "person", "place", "object", "other")
PYDOCS_KINDS = ("keyword", "exception", "operator", "value", "name", "other")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class GoldQuestion:
    question: str
    answers: tuple[str, ...]
    source_id: str | None = None
    kind: str | None = None


# ---- normalisation and scores ---------------------------------------------------------------------


def _is_punctuation(ch: str) -> bool:
    # SQuAD strips string.punctuation; Unicode punctuation (curly quotes, dashes) too, since models write it.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """SQuAD's normalisation: "The Ferryman's Ledger!" -> "ferrymans ledger"."""
    text = "".join(ch for ch in str(text).lower() if not _is_punctuation(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _contains_span(tokens: list[str], span: list[str]) -> bool:
    n = len(span)
    return n > 0 and any(tokens[i:i + n] == span for i in range(len(tokens) - n + 1))


def answer_accuracy(answer: str, golds, distractors=()) -> float:
    """1.0 if any gold, normalised, is a run of whole words of the normalised answer, and no distractor
    is; else 0.0.

    "He was born in 1923." matches "1923"; "19234" and "Hale" in "Hales" do not. `distractors` are the
    names of the other passages the question was shown with (`ragrpo.prompts.passage_names`): an answer
    that lists every candidate holds the gold but has not answered. A distractor that is part of a gold,
    or holds one (two films of the same year), does not count against it."""
    tokens = normalize(answer).split()
    spans = [normalize(g).split() for g in _as_list(golds)]
    if not any(_contains_span(tokens, s) for s in spans):
        return 0.0
    for other in _as_list(distractors):
        wrong = normalize(other).split()
        if any(_contains_span(s, wrong) or _contains_span(wrong, s) for s in spans):
            continue
        if _contains_span(tokens, wrong):
            return 0.0
    return 1.0


def _f1(prediction: list[str], gold: list[str]) -> float:
    if not prediction or not gold:
        return float(prediction == gold)
    same = sum((Counter(prediction) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(answer: str, golds) -> float:
    """SQuAD's token F1 between the normalised answer and each gold; the best of them."""
    tokens = normalize(answer).split()
    return max((_f1(tokens, normalize(g).split()) for g in _as_list(golds)), default=0.0)


def _as_list(golds) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


# ---- files ----------------------------------------------------------------------------------------


def gold_path(source: str | Path) -> Path:
    """The file behind `source`: a packaged set's name (`builtin:movies`) or a path."""
    if str(source) in BUILTIN_GOLD:
        return Path(str(resources.files("ragrpo") / "data" / BUILTIN_GOLD[str(source)]))
    if str(source).startswith("builtin:"):
        raise RagrpoError(f"no gold set {source!r}; packaged sets: {', '.join(BUILTIN_GOLD)}")
    return Path(source).expanduser()


def _text_field(record: dict, name: str, where: str, required: bool) -> str | None:
    value = record.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        problem = "is missing" if value is None else "must be a non-empty string"
        raise RagrpoError(f"{where}: field {name!r} {problem}")
    return value.strip()


def _parse(record, where: str) -> GoldQuestion:
    if not isinstance(record, dict):
        raise RagrpoError(f"{where}: expected a JSON object with 'question' and 'answers'")
    question = _text_field(record, "question", where, required=True)
    answers = record.get("answers")
    if answers is None:
        raise RagrpoError(f"{where}: field 'answers' is missing")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise RagrpoError(f"{where}: field 'answers' must be a non-empty list of strings")
    for answer in answers:
        if not isinstance(answer, str) or not normalize(answer):
            raise RagrpoError(f"{where}: answer {answer!r} is empty once normalised (articles and punctuation "
                              "are dropped); give a word or more")
    return GoldQuestion(question, tuple(a.strip() for a in answers),
                        _text_field(record, "source_id", where, required=False),
                        _text_field(record, "kind", where, required=False))


def load_gold(source: str | Path = "builtin:movies") -> list[GoldQuestion]:
    """The questions of a gold JSONL file (or a packaged set by name), in file order; blank lines skipped."""
    path = gold_path(source)
    if not path.is_file():
        raise RagrpoError(f"gold file {path} does not exist" if not path.exists() else
                          f"gold file {path} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RagrpoError(f"gold file {path} cannot be read as UTF-8 text: {exc}") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RagrpoError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        out.append(_parse(record, where))
    if not out:
        raise RagrpoError(f"gold file {path} has no questions")
    return out
