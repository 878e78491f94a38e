"""Citation rewards: does the answer name the passage it draws on, and is that passage the right one?

`citation` needs only the `context` column: a cited passage earns what it supports of the sentence
citing it. The source-citation rewards need the `context_ids` (ids of the retrieved passages, in
prompt order) and `source_id` columns that `ragrpo train --from-index` builds: they know which
document the question was made from. A reference is `[n]` (also `[1, 2]`), as the prompt protocol
reads it (`ragrpo.prompts.cited_passages`); a "Movie n" name is none, since headers are written so.

Every source-citation variant starts from the same credits, one per passage the answer refers to
(once, however often it is named): 1 for the source's passage, 0 for another retrieved passage (the
variant's `others`), -1 for a passage that does not exist. The variants differ in one thing each:

    source_citation           the mean of the credits, in [-1, 1]; 0 without references
    source_citation_grounded  a reference to the source earns only the share of the answer's own
                              content words found in the source passage
    source_citation_answered  a reference to the source earns its 1 only in an answer with at least
                              `min_words` content words of its own
    source_citation_only      ... and a reference to another retrieved passage costs `others` (-1)
    source_citation_exact     ... and the worst credit counts, not the mean: 1 only when every passage
                              referred to is the source's (the evaluation's citation accuracy)
    source_citation_debiased  ... a right reference earning 1 + 1/k less the running rate at which
                              answers cite its position, so that a habit earns little (it keeps state)

`drawn_from_source` pays for what the system marks instead (`drawn_from`): the answer's own words
come from the source's passage, whatever it cites. `drawn_from_first` is no reward but a gauge, logged
at weight 0: the share of answers drawn from the first shown passage, whatever the source.
`drawn_position_charge` charges an answer drawn from a position that recent answers over-use, so that a
habit of retelling one passage costs something where every answer in a group is wrong.

`single_citation` is their format term: 1 for an answer that refers to exactly one shown passage,
whichever it is; `single_citation_debiased` charges that 1 the running rate at which answers cite the
position, as `source_citation_debiased` does.

"Own" words leave out the question's words and the passage names. Why each variant exists, from the
runs that needed it, is in bench/results/from-index/NOTES.md: without `grounded` or `min_words` a run
learned to answer with bare passage names; with `others=0` citing every passage was a safe bet; with
`others=-1` under `exact`, a wrong guess cost more than silence and a run stopped citing.
"""

from __future__ import annotations

import re

from ragrpo import RagrpoError
from ragrpo.prompts import CITATION, as_passage, cited_passages, without_references
from ragrpo.rewards.base import Reward, answer_text, column, content_words, passages, share, words

SOURCE_COLUMNS_NEEDED = ("needs 'context_ids' and 'source_id' columns (the ids of the retrieved passages and "
                         "of the document the question is about); `ragrpo train --from-index` builds them")

# A sentence ends at . ! ? followed by space, at a CJK full stop, or at a line break; a citation right
# after the full stop ("... island. [1]") still belongs to the sentence before it.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?!\s)(?!\[\d)|(?<=[。！？])(?!\[\d)|\n+")


def citation(completions, context=None, **kwargs) -> list[float]:
    """Citations `[n]` of the `context` passages: mean over citations of their support, in [-1, 1].

    A citation `[n]` (also `[1, 2]` or `[1][2]`) in a sentence earns the share of that sentence's
    content words found in passage n (counted from 1), and costs -1 when there is no passage n. An
    answer without citations scores 0, so citing pays only when the cited passage says what the
    sentence says.

    >>> docs = ["Finch invented an arctic island.", "The sponsors lost their money."]
    >>> citation(["Finch invented an island [1].", "Finch invented an island [2].", "Finch lied [7].", "No."],
    ...          context=[docs] * 4)
    [1.0, 0.0, -1.0, 0.0]
    """
    scores = []
    for completion, sample_context in zip(completions, column(context, "context"), strict=True):
        docs = [set(words(p)) for p in passages(sample_context)]
        credits = []
        for sentence in _SENTENCE_END.split(answer_text(completion)):
            claimed = content_words(CITATION.sub(" ", sentence))
            for group in CITATION.findall(sentence):
                cited = map(int, group.split(","))
                credits += [share(claimed, docs[n - 1]) if 1 <= n <= len(docs) else -1.0 for n in cited]
        scores.append(sum(credits) / len(credits) if credits else 0.0)
    return scores


def own_words(text: str, question: str) -> list[str]:
    """The answer's content words that are neither the question's nor references to passages."""
    asked = set(content_words(question))
    return [w for w in content_words(without_references(text)) if w not in asked]


def drawn_from(answer: str, passages: list, question: str) -> int | None:
    """The passage (1-based) holding the largest share of the answer's own words (neither the question's nor
    citation marks), headers included; None when no passage holds any, or two hold the most (a tie names
    none). This is how the system attributes an answer whatever the model cites: the 135M model's own
    "[n]" follows position, not reading (bench/results/from-index/NOTES.md, the citation probe).
    `passages` are `Passage`s or strings; none (an agentic answer whose searches found nothing) names none."""
    own = own_words(answer, question)
    if not own or not passages:
        return None
    shares = [share(own, set(words(p.context()))) for p in map(as_passage, passages)]
    best = max(shares)
    return shares.index(best) + 1 if best > 0 and shares.count(best) == 1 else None


class SourceCitation(Reward):
    """Citing the question's source document: per passage referred to 1 / 0 / -1, averaged, in [-1, 1].

    When the source was not retrieved, no reference can score 1.

    >>> ids = [["a", "b", "c"]] * 5
    >>> SourceCitation()(["As Movie 2 shows, ...", "Per [1] and [2] and [2].", "See [9].", "No idea.", "[2]"],
    ...                  context_ids=ids, source_id=["b"] * 5)
    [0.0, 0.5, -1.0, 0.0, 1.0]
    """

    __name__ = "source_citation"
    others = 0.0  # the credit of a reference to another retrieved passage
    reads_context = reads_query = False

    def __call__(self, completions, context_ids=None, source_id=None, context=None, query=None,
                 **kwargs) -> list[float]:
        if context_ids is None or source_id is None:
            raise RagrpoError(SOURCE_COLUMNS_NEEDED)
        n = len(completions)
        contexts = column(context, "context") if self.reads_context else [None] * n
        queries = column(query, "query") if self.reads_query else [""] * n
        rows = zip(completions, context_ids, source_id, contexts, queries, strict=True)
        return [self.score(answer_text(c), list(ids), source, ctx, q) for c, ids, source, ctx, q in rows]

    def credits(self, text: str, ids: list, source: str) -> list[float]:
        """One credit per passage the answer refers to, in order of first reference."""
        refs = list(dict.fromkeys(cited_passages(text)))
        return [-1.0 if not 1 <= n <= len(ids) else 1.0 if ids[n - 1] == source else self.others for n in refs]

    def score(self, text: str, ids: list, source: str, context, question: str) -> float:
        credits = self.credits(text, ids, source)
        return sum(credits) / len(credits) if credits else 0.0


class SourceCitationGrounded(SourceCitation):
    """Citing the source document, a reference to it earning the share of the answer found in it, in [-1, 1].

    The share is over the answer's own content words (not the question's, not passage names).

    An answer that only names a passage ("Movie- 2.") earns nothing, however right the number.

    >>> docs = [["Finch sails north.", "Finch invented an arctic island.", "Gulls."]] * 3
    >>> SourceCitationGrounded()(
    ...     ["Movie 2.", "Finch invented an island [2].", "Finch invented the gulls [2][3]."],
    ...     context_ids=[["a", "b", "c"]] * 3, source_id=["b"] * 3, context=docs, query=["Who is Finch?"] * 3)
    [0.0, 1.0, 0.25]
    """

    __name__ = "source_citation_grounded"
    reads_context = reads_query = True

    def score(self, text: str, ids: list, source: str, context, question: str) -> float:
        credits = self.credits(text, ids, source)
        if 1.0 in credits:
            earned = share(own_words(text, question), set(words(passages(context)[ids.index(source)])))
            credits = [earned if c == 1.0 else c for c in credits]
        return sum(credits) / len(credits) if credits else 0.0


class SourceCitationAnswered(SourceCitation):
    """Citing the source document, a reference to it counting only in an answer of `min_words` own words.

    The reward is for naming the source of an answer, and a bare "Movie- 2." is none. Whether the words
    are in the passage is left to a groundedness reward beside it.

    >>> reward = SourceCitationAnswered(min_words=2)
    >>> reward(["Walter Crouch [2].", "[2]", "Crouch [2]"], context_ids=[["a", "b"]] * 3, source_id=["b"] * 3,
    ...        query=["Who rows?"] * 3)
    [1.0, 0.0, 0.0]
    """

    reads_query = True
    stem = "source_citation_answered"

    def __init__(self, min_words: int = 5):
        if min_words < 1:
            raise RagrpoError(f"source citation: min_words must be at least 1, not {min_words}")
        self.min_words = min_words
        self.__name__ = self.stem if min_words == 5 else f"{self.stem}_{min_words}w"

    def answered_credits(self, text: str, ids: list, source: str, question: str) -> list[float]:
        credits = self.credits(text, ids, source)
        if 1.0 in credits:
            earned = float(len(own_words(text, question)) >= self.min_words)
            credits = [earned if c == 1.0 else c for c in credits]
        return credits

    def score(self, text: str, ids: list, source: str, context, question: str) -> float:
        credits = self.answered_credits(text, ids, source, question)
        return sum(credits) / len(credits) if credits else 0.0


class SourceCitationOnly(SourceCitationAnswered):
    """Citing the source document alone, in an answer of its own: another passage cited costs `others`.

    At `others=-1`, "[1][2]" scores 0, as much as citing nothing: only the source alone scores 1.

    >>> SourceCitationOnly(min_words=1)(["Crouch [1][2].", "Crouch [2]."], context_ids=[["a", "b"]] * 2,
    ...                                 source_id=["b"] * 2, query=["Who rows?"] * 2)
    [0.0, 1.0]
    """

    stem = "source_citation_only"

    def __init__(self, min_words: int = 5, others: float = -1.0):
        if not -1.0 <= others < 0.0:
            raise RagrpoError(f"source citation: others must be within [-1, 0), not {others}")
        super().__init__(min_words)
        self.others = others


class SourceCitationExact(SourceCitationAnswered):
    """Citing the source document and nothing else, in an answer of its own: the worst reference counts.

    The worst reference's credit counts: "[1][2]" scores 0, as do a wrong guess and silence.

    >>> SourceCitationExact(min_words=1)(["Crouch [1][2].", "Crouch [2].", "Crouch [3]."],
    ...     context_ids=[["a", "b"]] * 3, source_id=["b"] * 3, query=["Who rows?"] * 3)
    [0.0, 1.0, -1.0]
    """

    stem = "source_citation_exact"

    def score(self, text: str, ids: list, source: str, context, question: str) -> float:
        credits = self.answered_credits(text, ids, source, question)
        return min(credits) if credits else 0.0


class SourceCitationDebiased(SourceCitationExact):
    """Citing the source document alone, a right reference earning less the more often recent answers cite its position.

    A right reference to the source at position p earns `1 + 1/k - rate(p)`, where k is the number of
    passages and rate(p) is the share of recent answers that referred to position p, whatever the source
    was; everything else scores as `source_citation_exact` does (a wrong guess or silence 0). A habit
    earns little: always citing [3] is right a third of the time at rate 1, worth 1/9 on average, against
    1/3 for citing at random with even rates and 1 for reading. Citing still beats silence. r13 shows
    the habit the plain exact score trained, and r14a the silence that a penalty on wrong references
    (the rate subtracted from every reference) trained instead (bench/results/from-index/NOTES.md).

    The rates are an exponential average over batches (`decay` per call), updated after each batch
    is scored, so a batch never pays for its own choices; they start at 0. `for_run` gives a fresh copy,
    so runs in one process do not share rates.

    >>> reward = SourceCitationDebiased(min_words=1, decay=0.5)
    >>> ids, source = [["a", "b", "c", "d"]] * 4, ["c"] * 4
    >>> reward(["Crouch [3].", "Crouch [3].", "Crouch [3].", "Crouch [1]."], context_ids=ids, source_id=source,
    ...        query=["Who rows?"] * 4)
    [1.25, 1.25, 1.25, 0.0]
    >>> reward(["Crouch [3].", "Crouch [1]."], context_ids=ids[:2], source_id=["a"] * 2, query=["Who rows?"] * 2)
    [0.0, 1.125]
    """

    stem = "source_citation_debiased"

    def __init__(self, min_words: int = 5, decay: float = 0.9):
        super().__init__(min_words)
        self.positions = PositionRates(decay)

    @property
    def rates(self) -> dict[int, float]:
        return self.positions.rates

    def for_run(self, budget: int | None = None, tokenizer=None) -> SourceCitationDebiased:
        return SourceCitationDebiased(self.min_words, self.positions.decay)

    def __call__(self, completions, context_ids=None, source_id=None, context=None, query=None,
                 **kwargs) -> list[float]:
        scores = super().__call__(completions, context_ids=context_ids, source_id=source_id, context=context,
                                  query=query)
        # A score of 1 means every reference is the source: one position, or several where the source
        # document was retrieved twice; their mean rate is charged.
        return self.positions.debias(scores, completions, context_ids)


class DrawnFromSource(Reward):
    """The answer's own words come from the source document's passage: 1, else 0 (the system's citation).

    Scored with `drawn_from`, the rule `ask` and `serve` use to mark the source an answer comes
    from and `eval --from-index` scores as "drawn from the source": the passage holding the largest share
    of the answer's own content words, one passage ahead of the others. It pays for reading the right
    passage rather than for writing its number, which SmolLM2-135M does by position whatever it read (the
    citation probe, bench/results/from-index/NOTES.md). Passage order is shuffled per sample in training,
    so drawing from one position by habit earns 1/k. 0 when the source was not retrieved.

    >>> docs = [["Walter Crouch keeps the ferry ledger.", "Hale hid watches in a second ledger.", "Gulls."]] * 3
    >>> DrawnFromSource()(["He hid watches [1].", "Walter Crouch [2].", "A ledger."],
    ...     context_ids=[["a", "b", "c"]] * 3, source_id=["b"] * 3, context=docs, query=["Who hid what?"] * 3)
    [1.0, 0.0, 0.0]
    """

    __name__ = "drawn_from_source"

    def __call__(self, completions, context_ids=None, source_id=None, context=None, query=None,
                 **kwargs) -> list[float]:
        if context_ids is None or source_id is None:
            raise RagrpoError(SOURCE_COLUMNS_NEEDED)
        rows = zip(completions, context_ids, source_id, column(context, "context"), column(query, "query"),
                   strict=True)
        scores = []
        for completion, ids, source, sample_context, question in rows:
            drawn = drawn_from(answer_text(completion), passages(sample_context), question)
            scores.append(float(drawn is not None and list(ids)[drawn - 1] == source))
        return scores


class DrawnFromFirst(Reward):
    """The answer's own words come from the first shown passage, whatever the source: 1, else 0 (a habit gauge).

    Not a thing to pay for: the default from-index recipe logs it at weight 0. Passages are in balanced
    order in training, so a model that reads the source draws from passage 1 about 1/k of the time, and a
    run that learned to retell passage 1 whatever was asked (seed 42 of the quickstart's recipe on an Intel
    Xeon, bench/results/from-index/NOTES.md, sessions 21-22) drew 0.76 of its held-out answers from it, while
    its training `answer_match` still rose on the third of questions whose source is first.

    >>> docs = [["Walter Crouch keeps the ferry ledger.", "Hale hid watches in a second ledger.", "Gulls."]] * 3
    >>> DrawnFromFirst()(["1: Walter Crouch keeps it.", "Hale hid watches.", "A ledger."],
    ...     context=docs, query=["Who hid what?"] * 3)
    [1.0, 0.0, 0.0]
    """

    __name__ = "drawn_from_first"

    def __call__(self, completions, context=None, query=None, **kwargs) -> list[float]:
        rows = zip(completions, column(context, "context"), column(query, "query"), strict=True)
        return [float(drawn_from(answer_text(c), passages(ctx), q) == 1) for c, ctx, q in rows]


class PositionRates:
    """The running share of answers that refer to each passage position, whatever the source: what a
    debiased reward charges, so that citing one position by habit earns little.

    An exponential average over batches (`decay` per call), updated after the batch is scored, so a batch
    never pays for its own choices; every rate starts at `start` (0, unless told)."""

    def __init__(self, decay: float = 0.9, start: float = 0.0):
        if not 0.0 <= decay < 1.0:
            raise RagrpoError(f"position rates: decay must be within [0, 1), not {decay}")
        self.decay = decay
        self.start = start
        self.rates: dict[int, float] = {}  # passage position -> running share of answers referring to it

    def rate(self, position: int) -> float:
        return self.rates.get(position, self.start)

    def debias(self, scores: list[float], completions, context_ids) -> list[float]:
        """A score of 1 becomes `1 + 1/k - mean rate of the positions referred to`; other scores stay."""
        referred = [set(cited_passages(answer_text(c))) for c in completions]
        debiased = [score + 1 / len(ids) - sum(self.rate(n) for n in refs) / len(refs)
                    if score == 1.0 else score for score, refs, ids in zip(scores, referred, context_ids, strict=True)]
        self.update(referred)
        return debiased

    def update(self, referred: list[set[int]]) -> None:
        """Fold in one batch: per answer, the set of positions it refers to (empty for none)."""
        for n in set(self.rates).union(*referred):
            batch_share = sum(n in refs for refs in referred) / max(len(referred), 1)
            self.rates[n] = self.decay * self.rate(n) + (1 - self.decay) * batch_share


class DrawnPositionCharge(Reward):
    """Charges an answer drawn from a passage position that recent answers draw from well beyond its share.

    Passage order is balanced in training, so a model that reads draws from each of the k positions
    about 1/k of the time. A run that learned to retell passage 1 (seed 42 of the default recipe on an
    Intel Xeon: 0.76 of its held-out answers) was never told otherwise: in a group whose source is passage
    2 or 3 every answer was wrong, so `answer_match` had no spread to rank by and the habit cost nothing
    there. This term ranks those answers: an answer drawn (`drawn_from`) from position p scores
    `-(rate(p) - 1/k - margin)` when that is below 0, and every other answer 0. It asks for no label: the
    position's running rate counts every answer, right or wrong, whatever the source was.

    The rates are an exponential average of the share of each batch's answers drawn from each position
    (`decay` per call), starting at 1/k and updated after the batch is scored (`PositionRates`). One
    batch is one question's group, whose answers share a source, so a batch's share swings between about
    0 and 1 for a model that reads; `decay` 0.97 and `margin` 0.15 keep such a model below the charge on
    almost every step (the rate's spread is then about 0.06), while a habit at 0.76 pays about 0.28.
    That makes it late: in r23 (seed 42) it first charged at step 92, after the habit had set in, and once a
    group's 8 answers all retell passage 1 they are charged alike. Held-out accuracy fell from the default's
    0.134 to 0.100 (bench/results/from-index/NOTES.md, session 23); `drawn_from_source` did better there.

    >>> docs = [["Walter Crouch keeps the ferry ledger.", "Hale hid watches in a second ledger.", "Gulls."]] * 4
    >>> charge = DrawnPositionCharge(decay=0.5)
    >>> answers = ["Walter Crouch keeps it.", "Crouch keeps a ferry.", "Walter.", "Hale hid watches."]
    >>> charge(answers, context=docs, query=["Who hid what?"] * 4)
    [0.0, 0.0, 0.0, 0.0]
    >>> [round(score, 3) for score in charge(answers, context=docs, query=["Who hid what?"] * 4)]
    [-0.058, -0.058, -0.058, 0.0]
    """

    __name__ = "drawn_position_charge"

    def __init__(self, margin: float = 0.15, decay: float = 0.97):
        if not 0.0 <= margin < 1.0:
            raise RagrpoError(f"drawn position charge: margin must be within [0, 1), not {margin}")
        self.margin = margin
        self.positions = PositionRates(decay)
        self.started = False  # the rates start at 1/k, k read from the first batch

    def for_run(self, budget: int | None = None, tokenizer=None) -> DrawnPositionCharge:
        return DrawnPositionCharge(self.margin, self.positions.decay)

    def __call__(self, completions, context=None, query=None, **kwargs) -> list[float]:
        rows = zip(completions, map(passages, column(context, "context")), column(query, "query"), strict=True)
        drawn = [(drawn_from(answer_text(c), shown, q), len(shown)) for c, shown, q in rows]
        if drawn and not self.started:
            self.positions.start, self.started = 1 / max(drawn[0][1], 1), True
        scores = [min(0.0, 1 / k + self.margin - self.positions.rate(p)) if p else 0.0 for p, k in drawn]
        self.positions.update([{p} if p else set() for p, _ in drawn])
        return scores


class SingleCitation(Reward):
    """Referring to exactly one shown passage, whichever, in an answer with a word of its own: 1, else 0.

    A format term: it makes a citation part of every answer, so that a source-citation reward beside it
    has numbers to choose between. r14 and r15 learned to answer at the token limit and stopped citing
    (the citation, asked for after the answer, no longer fit), so the debiased citation reward had
    almost no citing completions to compare (bench/results/from-index/NOTES.md). Which number is right
    is left to that reward; this one pays every position alike, and so pays a habit in full: r16 learned
    to open every answer with "[1]:" under it (`single_citation_debiased` charges a habit).

    >>> SingleCitation()(["Crouch rows [2].", "Crouch [1][2].", "Crouch [4].", "[2]", "Crouch rows."],
    ...     context_ids=[["a", "b", "c"]] * 5, query=["Who rows?"] * 5)
    [1.0, 0.0, 0.0, 0.0, 0.0]
    """

    __name__ = "single_citation"

    def __call__(self, completions, context_ids=None, query=None, **kwargs) -> list[float]:
        if context_ids is None:
            raise RagrpoError("needs a 'context_ids' column (the ids of the retrieved passages, in prompt "
                              "order); `ragrpo train --from-index` builds it")
        queries = column(query, "query")
        scores = []
        for completion, ids, question in zip(completions, context_ids, queries, strict=True):
            text = answer_text(completion)
            refs = set(cited_passages(text))
            one = len(refs) == 1 and 1 <= min(refs) <= len(ids)
            scores.append(float(one and bool(own_words(text, question))))
        return scores


class SingleCitationDebiased(SingleCitation):
    """Referring to exactly one shown passage, earning 1 + 1/k less the running rate at which answers cite it.

    `single_citation` paid every position alike, and r16 learned to open every answer with "[1]:": a
    habit that pays the format term in full, after which a group's answers all cite alike and the
    source-citation reward has no spread left to learn from (bench/results/from-index/NOTES.md). Here a
    position cited by habit earns about 1/k, and citing another position pays more, so a habit does not
    hold. The rates are kept as `source_citation_debiased` keeps them (`PositionRates`).

    >>> reward = SingleCitationDebiased(decay=0.5)
    >>> ids, question = [["a", "b", "c"]] * 4, ["Who rows?"] * 4
    >>> reward(["Crouch [1].", "Crouch [1].", "Crouch [1].", "Crouch [2][3]."], context_ids=ids, query=question)
    [1.3333333333333333, 1.3333333333333333, 1.3333333333333333, 0.0]
    >>> [round(score, 3) for score in reward(["Crouch [1].", "Crouch [2]."], context_ids=ids[:2], query=question[:2])]
    [0.958, 1.208]
    """

    __name__ = "single_citation_debiased"

    def __init__(self, decay: float = 0.9):
        self.positions = PositionRates(decay)

    def for_run(self, budget: int | None = None, tokenizer=None) -> SingleCitationDebiased:
        return SingleCitationDebiased(self.positions.decay)

    def __call__(self, completions, context_ids=None, query=None, **kwargs) -> list[float]:
        scores = super().__call__(completions, context_ids=context_ids, query=query)
        return self.positions.debias(scores, completions, context_ids)


def get_source_citation_reward(grounded: bool = False, min_words: int = 0, others: float = 0.0,
                               exclusive: bool = False) -> SourceCitation:
    """The source-citation variant for these settings (the module docstring lists them); a setting
    that no variant has is one line saying which go together."""
    if grounded and min_words:
        raise RagrpoError("source citation: give grounded or min_words, not both")
    if grounded and (others or exclusive):
        raise RagrpoError("source citation: grounded goes without others and exclusive")
    if grounded:
        return SourceCitationGrounded()
    if not min_words:
        if others or exclusive:
            raise RagrpoError("source citation: others and exclusive apply only with min_words")
        return SourceCitation()
    if exclusive:
        if others:
            raise RagrpoError("source citation: exclusive goes with others 0")
        return SourceCitationExact(min_words)
    return SourceCitationOnly(min_words, others) if others else SourceCitationAnswered(min_words)


source_citation = SourceCitation()
