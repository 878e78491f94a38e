"""The questions a from-index run trains on, made from the table's documents without labels.

`template_questions` asks for what a document's fields and text give: its title ("which film involves ...?"),
its year, and names cut from its sentences (who ... ?, fill-the-blank); `model_questions` has the model write
one question per document. Each question carries its source document's id and, where it asks for a field or a
name, that target (`meta["targets"]`), which the `answer_match` reward reads: nobody labels them.
`tuning/curriculum.py` retrieves for them and builds the training rows.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from ragrpo.prompts import TITLE_COLUMNS, YEAR_COLUMNS
from ragrpo.retrieval.index import document_id
from ragrpo.rewards.builtin import STOP_WORDS, words

QUESTION_MODES = ("templates", "model")
# the kinds of training question `template_questions` and `model_questions` make; `--kinds` keeps some of them
QUESTION_KINDS = ("keyword", "when", "who", "blank", "what", "summary", "model")
# Template questions answered by a passage's header (its title, its year). With passages shown, the default
# trains without them where the table gives other questions: over the first 100 steps of seven runs they were
# answered mostly where the source was passage 1, so what they taught was to retell passage 1
# (bench/results/from-index/NOTES.md, session 26).
HEADER_KINDS = ("keyword", "when")
# Written for this project: the model writes one question about a passage, in its own words.
QUESTION_PROMPT = ("Read the passage below and write one question that it answers. Reply with the question "
                   "only.\n\nPassage:\n{text}")


@dataclass
class Question:
    query: str
    kind: str
    source_id: str
    meta: dict = field(default_factory=dict)


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


# A sentence that opens with a name ("Beppe Scarpa owes a fortune to ...") gives a "who" question
# ("Who owes a fortune to ...?") whose answer is the name. Neither it nor a fill-the-blank question names
# the film: the gold questions users ask describe it instead, and a model that finds the passage by its
# header never learns to find it by what it says (r11, bench/results/from-index/NOTES.md).
# A blank line ends a sentence too: reference text (builtin:pydocs) has paragraphs and code blocks without a
# full stop, and a name run across one ("raise AssertionError" then "The extended form") is no name.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_NAMED_SUBJECT = re.compile(r"^((?:[A-Z][\w'’-]+ ){0,2}[A-Z][\w'’-]+) ([a-z][^.!?]{15,}?)[.!?]?$")


def subject_questions(text: str, source: str, n: int = 2) -> list[Question]:
    """Up to `n` "who" questions cut from sentences that open with a name: the name is the target.

    Every sentence opens with a capital, so a one-word name counts only where the text also capitalises
    it inside a sentence ("the widow Clara Voss"): "Copper kettles whistle" gives no question."""
    sentences = _SENTENCE_END.split(text)
    inner = {w for s in sentences for w in s.split()[1:] if w[:1].isupper()}
    out = []
    for sentence in sentences:
        found = _NAMED_SUBJECT.match(sentence.strip())
        if not found:
            continue
        name, rest = found.group(1), found.group(2).rstrip(",;: ")
        verb = rest.split()[0]
        # the name is a subject when a verb follows it ("Clara teams up", "Hassan drives"); a plot is in the
        # present tense, so a verb ends in -s (not -ss) or -ed; "Thames ferryman ..." and "Jakob's search" are not
        if (name.split()[0].lower() in STOP_WORDS | {"after", "when", "while", "once", "unable"} or name.endswith("'s")
                or (" " not in name and name not in inner)
                or verb in STOP_WORDS or not (verb.endswith("ed") or (verb.endswith("s") and not verb.endswith("ss")))):
            continue
        targets = list(dict.fromkeys([name, name.split()[-1]]))
        out.append(Question(f"Who {rest}?", "who", source, {"targets": targets}))
        if len(out) == n:
            break
    return out


# A capitalised run of words inside a sentence ("the widow Clara Voss inherits") is a name: blanked out,
# it gives a question whose answer is that name.
_NAME_INSIDE = re.compile(r"(?<=\s)[A-Z][\w'’-]+(?: [A-Z][\w'’-]+){0,2}")


def blank_questions(text: str, title: str | None, source: str, n: int = 3) -> list[Question]:
    """Up to `n` questions that blank out a name inside a sentence of `text`; the name is the target.

    One name per sentence, the first that is not part of the title, in sentences of at least eight words,
    so the rest of the sentence says enough to find it."""
    skip = set(words(str(title or ""))) | {"i"}
    out = []
    for sentence in _SENTENCE_END.split(text):
        sentence = " ".join(sentence.split())
        if len(sentence.split()) < 8:
            continue
        for found in _NAME_INSIDE.finditer(sentence):
            name = found.group(0).rstrip("'’")
            if set(words(name)) <= skip or name.lower() in STOP_WORDS:
                continue
            blanked = sentence[:found.start()] + "___" + sentence[found.start() + len(name):]
            out.append(Question(f'Which name fills the blank in "{blanked}"?', "blank", source,
                                {"targets": list(dict.fromkeys([name, name.split()[-1]]))}))
            break
        if len(out) == n:
            break
    return out


def template_questions(row: dict, column: str, df: Counter, documents: int) -> list[Question]:
    """Questions that `row` answers, each carrying what it asks for in `meta["targets"]` (for the
    `answer_match` reward): the title ("which film involves ...?"), the year, and names cut from the
    text ("who ...?" and fill-the-blank). A row that gives none of these gets the two open questions
    (what happens in it, a summary), which have no target.

    Most questions ask for a name in the text, as most questions users ask of their documents do: a run
    whose questions mostly asked for the title or the year learned to answer every question with a
    passage's header (bench/results/from-index/NOTES.md, r10).
    """
    source = document_id(row, column)
    title, year = _first(row, TITLE_COLUMNS), _first(row, YEAR_COLUMNS)
    noun = "film" if "movie" in column or "plot" in column else "document"
    text = str(row[column])
    words_ = keywords(text, df, documents)
    out = []
    if title and len(words_) >= 3:
        out.append(Question(f"Which {noun} involves {_listing(words_[:3])}?", "keyword", source,
                            {"targets": [str(title)]}))
    if year is not None and len(words_) >= 6:
        out.append(Question(f"In what year was the {noun} about {_listing(words_[3:6])} released?", "when", source,
                            {"targets": [str(year)]}))
    out += subject_questions(text, source, n=3)
    out += blank_questions(text, title, source, n=3)
    if not out and title:
        asked = f"What happens in {title}?" if noun == "film" else f"What does {title} explain?"
        out += [Question(asked, "what", source),
                Question(f"Summarize the story of {title} in two sentences.", "summary", source)]
    elif not out and len(words_) >= 2:
        out += [Question(f"Which {noun} involves {_listing(words_[:2])}?", "keyword", source),
                Question(f"Summarize the {noun} about {_listing(words_[:2])}.", "summary", source)]
    return out


# ---- questions written by the model ---------------------------------------------------------------

_QUESTION_LINE = re.compile(r"[^\n?]{8,}\?")


def model_questions(rows: list[dict], column: str, model, tokenizer, *, batch_size: int = 8,
                    max_new_tokens: int = 48) -> list[Question]:
    """One question per document, written greedily by `model` from the document's text.

    A reply without a question mark falls back to the document's keyword question, so every document
    still gets one (`kind` says which).
    """
    from ragrpo.generation.rag import generate

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




def make_questions(rows: list[dict], column: str, mode: str, model=None, tokenizer=None) -> list[Question]:
    if mode == "model":
        return model_questions(rows, column, model, tokenizer)
    df = document_frequencies([str(r[column]) for r in rows])
    return [q for row in rows for q in template_questions(row, column, df, len(rows))]


def parse_kinds(text: str | None) -> tuple[str, ...] | None:
    """`--kinds`: comma-separated kinds, `all`, or None (the default, `training_kinds`)."""
    if text is None:
        return None
    return QUESTION_KINDS if text.strip() == "all" else tuple(k.strip() for k in text.split(",") if k.strip())
