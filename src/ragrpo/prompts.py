"""The prompt protocol: how retrieved passages are shown to the model, and how its citations are read.

Everything that builds a RAG prompt (`ask`, `serve`, training from an index, evaluation) or reads one
back (the citation and groundedness rewards) imports it from here, so the layout and its parser cannot
drift apart. The prompt is the write-up's, with one newline after `#Context` (the write-up glued the
first passage's header to it) and a header line per passage that names it:

    Given the Query: {query}

    And the context
    #Context
    ## Movie 1: The Ferryman's Ledger (1923)
    {text of hit 1}

    ## Movie 2: ...
    ...
    Answer concisely but creatively

The label word ("Movie") comes from the table's name, singular; the header from its metadata columns
(`{title} ({release_year})` for the built-in movies), or from `--passage-header`. A passage is cited by
its number in brackets, `[1]` (also `[1, 2]`), and only so. The header shows the number without brackets
so that an answer which copies a header ("Movie 1: The Ferryman's Ledger ...") has cited nothing: with
`[1]` in the headers, two runs learned to open every answer with the first header and were paid for it
as a citation (r16, r17 in bench/results/from-index/NOTES.md).

The agentic protocol (`train --from-index --agentic`, `ask --agentic`) gives no passages up front. The
prompt holds the instructions and the question, and the assistant's turn opens with `<search>`, so the
model's first words are a query. A query ends at `</search>`. The results come back as the same passage
layout inside `<information>` and `</information>`, numbered on from the previous results, and the
model may search again or answer:

    <search>ferryman ledger thames</search>
    <information>
    ## Movie 1: The Ferryman's Ledger (1923)
    ...
    </information>
    Jakob Marten keeps the ledger [1].
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from ragrpo import RagrpoError

PROMPT_TEMPLATE = "Given the Query: {query}\n\nAnd the context\n#Context\n{context}\n\nAnswer concisely but creatively"
# `--reasoning` (ask and train --from-index) appends this to the prompt; written for this project.
REASONING_INSTRUCTION = ("First reason about the context inside <think> </think>, then give only the answer "
                         "inside <answer> </answer>.")
# `--cite` appends this: the write-up's prompt never asks for sources, so a model has no reason to name one.
# It lists every passage's number; a single example ("e.g. [2]") pulled the 135M model's citations to [2]
# whatever the source (bench/results/from-index/NOTES.md).
CITE_INSTRUCTION = "After the answer, cite the {label} it comes from by its number: {numbers}."
# `--agentic`: the instructions of a prompt without passages; written for this project.
# Telling the model its reply already opened a search was what made the base 135M model close a query at
# all (found its source 5/32 rows against 0/32 for a plain "write a query inside <search> </search>").
AGENTIC_INSTRUCTION = ("Answer the question from the {plural}. Your reply starts inside a search: write a short "
                       "query for the {plural}, then </search>. The results come back inside <information> "
                       "</information>, each {label} numbered [n]. You may search up to {searches} times, each as "
                       "<search> query </search>. Then answer in one sentence and cite the {label} the answer "
                       "comes from by its number.")
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
INFORMATION_OPEN, INFORMATION_CLOSE = "<information>", "</information>"
DEFAULT_QUERY = "What's common in movies where the protagonist turns out to be the bad guy"
DEFAULT_LABEL = "Passage"

TITLE_COLUMNS = ("title", "name", "heading", "topic")
YEAR_COLUMNS = ("release_year", "year")

CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
# "Movie 2", "movie-2": the built-in corpus's label and a number, as a header starts. Not a citation,
# and not a claim of the answer's own either (`without_references`).
PASSAGE_NAME = re.compile(r"\bmovie\s*-?\s*\d+\b", re.IGNORECASE)


@dataclass(frozen=True)
class Passage:
    """One retrieved passage as the prompt shows it: a header naming it (may be empty) and its text."""

    header: str
    text: str

    def context(self) -> str:
        """What rewards read as this passage: the header is part of it, so a title in an answer is grounded."""
        return f"{self.header}\n{self.text}" if self.header else self.text


@dataclass(frozen=True)
class PassageStyle:
    """How a table's rows are headed in a prompt: a label word and a header template over its columns."""

    label: str = DEFAULT_LABEL
    header: str = ""

    def __post_init__(self):
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.header) if name is not None]
        except ValueError as exc:
            raise RagrpoError(f"--passage-header {self.header!r} is not a valid template ({exc}); "
                              "write column names in braces, e.g. '{title} ({release_year})'") from None
        if any(not name.isidentifier() for name in fields):
            raise RagrpoError(f"--passage-header {self.header!r}: fields must be plain column names in braces")

    def fields(self) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(self.header) if name]

    def check(self, columns: list[str]) -> None:
        """One line naming a header field the table does not have."""
        missing = [name for name in self.fields() if name not in columns]
        if missing:
            raise RagrpoError(f"--passage-header uses {', '.join(map(repr, missing))}, which the table does not "
                              f"have; columns are: {', '.join(columns)}")

    def passage(self, row: dict, column: str) -> Passage:
        header = self.header.format_map({k: "" if v is None else v for k, v in row.items()}) if self.header else ""
        return Passage(" ".join(header.split()), str(row[column]))

    def passages(self, hits: list[dict], column: str) -> list[Passage]:
        return [self.passage(hit, column) for hit in hits]

    def to_dict(self) -> dict:
        return {"label": self.label, "header": self.header}


def default_header(columns: list[str]) -> str:
    """`{title} ({release_year})` from the first title-like and year-like columns the table has."""
    title = next((c for c in TITLE_COLUMNS if c in columns), None)
    year = next((c for c in YEAR_COLUMNS if c in columns), None)
    if title and year:
        return f"{{{title}}} ({{{year}}})"
    return f"{{{title}}}" if title else ""


def label_for(table_name: str) -> str:
    """The table's name as a label word: 'movies' -> 'Movie', 'support_notes' -> 'Support note'."""
    name = " ".join(re.split(r"[_\-\s]+", table_name.strip())).strip()
    if not name or not name[0].isalpha():
        return DEFAULT_LABEL
    if name.endswith(("vies", "kies", "bies")):  # movies, cookies, zombies
        name = name[:-1]
    elif name.endswith("ies") and len(name) > 4:  # stories
        name = name[:-3] + "y"
    elif name.endswith("s") and not name.endswith("ss") and len(name) > 3:
        name = name[:-1]
    return name[0].upper() + name[1:].lower()


def style_for(table_name: str, columns: list[str], header: str | None = None, label: str | None = None) -> PassageStyle:
    """The default style of a table (label from its name, header from its columns); `header` overrides."""
    style = PassageStyle(label or label_for(table_name), default_header(columns) if header is None else header)
    style.check(columns)
    return style


def table_style(table, header: str | None = None, label: str | None = None) -> PassageStyle:
    """`style_for` a LanceDB table handle."""
    return style_for(table.name, list(table.schema.names), header, label)


# ---- building -------------------------------------------------------------------------------------


def as_passage(item) -> Passage:
    return item if isinstance(item, Passage) else Passage("", str(item))


def cite_instruction(passages: int, label: str = DEFAULT_LABEL) -> str:
    """'After the answer, cite the movie it comes from by its number: [1], [2].' for two passages."""
    return CITE_INSTRUCTION.format(label=label.lower(), numbers=", ".join(f"[{n}]" for n in range(1, passages + 1)))


def heading(label: str, number: int, header: str) -> str:
    """A passage's header line: '## Movie 2: The Salt Clock (1921)', or '## Movie 2:' without a header."""
    return f"## {label} {number}: {header}".rstrip()


def passage_layout(passages: list, first: int = 1, label: str = DEFAULT_LABEL) -> str:
    """`passages` as the model reads them, each under its heading, numbered from `first`: the prompt's context
    and a search's results alike."""
    shown = enumerate(map(as_passage, passages), first)
    return "\n\n".join(f"{heading(label, n, p.header)}\n{p.text}" for n, p in shown)


def build_prompt(query: str, passages: list, reasoning: bool = False, cite: bool = False,
                 label: str = DEFAULT_LABEL) -> str:
    """The write-up's prompt over `passages` (`Passage`s, or plain strings without a header); `cite`
    and `reasoning` each append one sentence of instructions."""
    prompt = PROMPT_TEMPLATE.format(query=query, context=passage_layout(passages, 1, label))
    prompt = f"{prompt}\n\n{cite_instruction(len(passages), label)}" if cite else prompt
    return f"{prompt}\n\n{REASONING_INSTRUCTION}" if reasoning else prompt


def _title_and_year(row: dict) -> tuple:
    """The row's first non-empty title-like field and first year-like field (None where it has none)."""
    title = next((row[c] for c in TITLE_COLUMNS if row.get(c)), None)
    year = next((row[c] for c in YEAR_COLUMNS if row.get(c) is not None), None)
    return title, year


def passage_names(row: dict, header: str = "") -> list[str]:
    """What names a retrieved row in an answer: its title and its year (the built-in header's fields),
    else its header. An answer that names a passage other than its source has hedged ("1. Dingo Creek
    Tapes 2. The Ferryman's Ledger 3. ..." holds the right title and two wrong ones)."""
    names = [str(v) for v in _title_and_year(row) if v is not None and str(v).strip()]
    return names or ([header] if header.strip() else [])


def source_label(row: dict) -> str:
    """'Title (1987)' when the row has a title and a year, else its id or first short field."""
    title, year = _title_and_year(row)
    if title:
        return f"{title} ({year})" if year is not None else str(title)
    for key, value in row.items():
        if not key.startswith("_") and isinstance(value, (int, str)) and len(str(value)) <= 80:
            return f"{key}={value}"
    return "(untitled)"


# ---- reading --------------------------------------------------------------------------------------


def cited_passages(text: str) -> list[int]:
    """Every passage an answer refers to, in order: its `[n]` marks (`[1, 2]` too). A "Movie 2" name
    is no citation: it is how a header starts, and a copied header cites nothing."""
    return [int(n) for group in CITATION.findall(text) for n in group.split(",")]


def without_references(text: str) -> str:
    """`text` without its citation marks and passage names ("[1]", "Movie 2"): neither is a claim."""
    return PASSAGE_NAME.sub(" ", CITATION.sub(" ", text))


# ---- the agentic protocol -------------------------------------------------------------------------


def build_agentic_prompt(query: str, max_searches: int, label: str = DEFAULT_LABEL) -> str:
    """The user's turn of an agentic prompt: the instructions, then the question (no passages)."""
    noun = label.lower()
    instruction = AGENTIC_INSTRUCTION.format(plural=noun + "s", label=noun, searches=max_searches)
    return f"{instruction}\n\nQuestion: {query}"


def render_information(passages: list, first: int, label: str = DEFAULT_LABEL, note: str = "") -> str:
    """A search's results as the model reads them: the prompt's passage layout numbered from `first`, or
    `note` alone (an empty query, a failed search, no searches left), inside <information> tags."""
    body = "\n\n".join(part for part in (note, passage_layout(passages, first, label)) if part)
    return f"\n{INFORMATION_OPEN}\n{body}\n{INFORMATION_CLOSE}\n"


_SEARCH = re.compile(re.escape(SEARCH_OPEN) + r".*?(?:" + re.escape(SEARCH_CLOSE) + r"|$)", re.DOTALL)


def transcript(completion: str) -> str:
    """An agentic completion as the model wrote it: TRL's completion starts after the `<search>` that
    opened the assistant's turn, so that tag goes back in front."""
    return completion if completion.lstrip().startswith(SEARCH_OPEN) else SEARCH_OPEN + completion


def is_agentic(text: str) -> bool:
    """Whether a completion holds a search call or its results (else it is an ordinary answer)."""
    return SEARCH_CLOSE in text or INFORMATION_OPEN in text


def agentic_answer(text: str) -> str:
    """What an agentic completion answers: its text after the last results, search calls removed; "" when
    it ends inside a query or inside results (no answer was written)."""
    text = transcript(text)
    end = text.rfind(INFORMATION_CLOSE)
    tail = text[end + len(INFORMATION_CLOSE):] if end >= 0 else text
    if INFORMATION_OPEN in tail or tail.rfind(SEARCH_OPEN) > tail.rfind(SEARCH_CLOSE):
        return ""  # results or a query that never closed
    if end < 0 and SEARCH_CLOSE in tail and not tail.rsplit(SEARCH_CLOSE, 1)[1].strip():
        return ""  # it stopped at a query
    return _SEARCH.sub(" ", tail).strip()


def segment_query(segment: str) -> str | None:
    """The query of a model segment that ended at `</search>`: the text after its last `<search>`, spaces
    folded (may be empty), or None when the segment closes a search it never opened."""
    body = segment.rsplit(SEARCH_CLOSE, 1)[0]
    if SEARCH_OPEN not in body:
        return None
    return " ".join(body.rsplit(SEARCH_OPEN, 1)[1].split())
