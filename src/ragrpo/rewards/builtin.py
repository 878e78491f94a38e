"""Reward functions, with TRL's signature: `(prompts, completions, **kwargs) -> list[float | None]`.

A reward is a small callable class (`ragrpo.rewards.base.Reward`) or a plain function; its `__name__`
is its stable metric key (`rewards/<name>/mean` in the logs). A parametrized reward's default
configuration carries the registry name (`repetition`), any other one says its parameters in the name
(`repetition_4gram`), so two variants never share a metric; `get_*` factories build them as TRL's do.
The citation rewards are in `ragrpo.rewards.citations`, the ones that run a model in
`ragrpo.rewards.model_based`; what every reward reads (completion text, words, passages) in
`ragrpo.rewards.base`.

The built-ins are in `REWARDS` (`ragrpo rewards list` prints them, the README has a table).

Conventions for retrieval-augmented rewards. TRL hands every dataset column to every reward, one
value per completion. `context` holds a sample's retrieved passages: a list of strings, or one string
whose passages are separated by blank lines (the layout of `ragrpo.prompts.build_prompt`); citations `[n]`
count passages from 1. `query` holds the question. A reward that needs a column the dataset lacks
fails with one line naming the column. An empty answer scores 0 everywhere except `length`.

Names resolve to functions, and every reward handed to the trainer is guarded, in `ragrpo.rewards.registry`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ragrpo import RagrpoError
from ragrpo.prompts import cited_passages, without_references  # noqa: F401  (cited_passages: re-exported)
from ragrpo.rewards.agentic import SearchCost, SearchFormat, SearchFoundSource
from ragrpo.rewards.base import (  # noqa: F401  (re-exported: what rewards read is importable from here)
    STOP_WORDS,
    Reward,
    RewardError,
    answer_text,
    column,
    completion_text,
    content_words,
    ngrams,
    passages,
    read_passages,
    share,
    words,
)
from ragrpo.rewards.citations import (  # noqa: F401
    DrawnFromFirst,
    DrawnFromSource,
    DrawnPositionCharge,
    SingleCitation,
    SingleCitationDebiased,
    SourceCitation,
    SourceCitationAnswered,
    SourceCitationDebiased,
    SourceCitationExact,
    SourceCitationGrounded,
    SourceCitationOnly,
    citation,
    get_source_citation_reward,
    source_citation,
)
from ragrpo.rewards.model_based import (  # noqa: F401
    ContextReliance,
    Relevance,
    get_context_reliance_reward,
    get_relevance_reward,
)

# ---- the write-up's rewards ---------------------------------------------------------------------


def length(completions, **kwargs) -> list[float]:
    """The write-up's length reward: `-abs(50 - len(text))`, in characters; 0 is best.

    >>> length(["x" * 50, "", [{"role": "assistant", "content": "x" * 60}]])
    [0.0, -50.0, -10.0]
    """
    return [float(-abs(50 - len(completion_text(c)))) for c in completions]


class Length(Reward):
    """-abs(target - size), in characters or tokens; 0 is best.

    Tokens are counted with `tokenizer` when one is given, else from the `completion_ids` TRL passes
    (its count, the end-of-sequence token included). The defaults give the write-up's `length`.

    >>> Length(target=10)(["x" * 12])
    [-2.0]
    >>> by_tokens = Length(target=3, unit="tokens")
    >>> by_tokens(["one two three four"], completion_ids=[[11, 12, 13, 14]]), by_tokens.__name__
    ([-1.0], 'length_3_tokens')
    """

    def __init__(self, target: int = 50, unit: str = "chars", tokenizer=None):
        if unit not in ("chars", "tokens"):
            raise RagrpoError(f"length unit {unit!r}: use 'chars' or 'tokens'")
        self.target, self.unit, self.tokenizer = target, unit, tokenizer
        self.__name__ = "length" if (target, unit) == (50, "chars") else f"length_{target}_{unit}"

    def __call__(self, completions, completion_ids=None, **kwargs) -> list[float]:
        texts = [completion_text(c) for c in completions]
        if self.unit == "chars":
            sizes = [len(text) for text in texts]
        elif self.tokenizer is not None:
            sizes = [len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        elif completion_ids is not None:
            sizes = [len(ids) for ids in completion_ids]
        else:
            raise RagrpoError("a length in tokens needs get_length_reward(unit='tokens', tokenizer=...)")
        return [float(-abs(self.target - size)) for size in sizes]


def get_length_reward(target: int = 50, unit: str = "chars", tokenizer=None) -> Length:
    return Length(target, unit, tokenizer)


class Overlong(Reward):
    """DAPO's soft overlong penalty (TRL's): 0 up to the last quarter of the run's token budget, then down to -1.

    It pays for ending, not for being short: every answer that ends before the last `cache` tokens of the
    `max_completion_length` budget (a quarter of it unless given) scores 0 alike. The budget comes from the
    run (`for_run`); tokens are the `completion_ids` TRL passes (end-of-sequence included), or
    `tokenizer`'s count of the text where there are none (evaluation).

    >>> penalty = Overlong().for_run(budget=64)
    >>> penalty(["a", "b", "c"], completion_ids=[[1] * 20, [1] * 56, [1] * 64]), penalty.cache
    ([0.0, -0.5, -1.0], 16)
    """

    __name__ = "overlong"

    def __init__(self, cache: int | None = None, budget: int | None = None, tokenizer=None):
        self.given_cache, self.budget, self.tokenizer = cache, budget, tokenizer
        if self.cache is not None and (self.cache < 1 or (budget is not None and budget <= self.cache)):
            raise RagrpoError(f"overlong: the cache ({self.cache} tokens) must be at least 1 and below the budget "
                              f"({budget})")

    @property
    def cache(self) -> int | None:
        """The penalised tail of the budget, in tokens: as given, else a quarter of the budget."""
        return self.given_cache or (max(1, self.budget // 4) if self.budget else None)

    def for_run(self, budget: int | None = None, tokenizer=None) -> Overlong:
        return Overlong(self.given_cache, budget, tokenizer)

    def __call__(self, completions, completion_ids=None, **kwargs) -> list[float]:
        from trl.rewards import get_soft_overlong_punishment

        if self.budget is None:
            raise RagrpoError("overlong needs the run's token budget (max_completion_length): it scores in training "
                              "and in `eval`, not alone")
        if completion_ids is None:
            if self.tokenizer is None:
                raise RagrpoError("overlong counts tokens: it needs the completion_ids the trainer passes, or a tokenizer")
            completion_ids = [self.tokenizer(completion_text(c), add_special_tokens=False)["input_ids"]
                              for c in completions]
        return get_soft_overlong_punishment(self.budget, self.cache)(completion_ids=completion_ids)


def token_diversity(completions, **kwargs) -> list[float]:
    """The write-up's diversity reward: 100 * unique / total whitespace tokens; 0 for an empty text.

    >>> token_diversity(["a b c d", "a a a a", "   "])
    [100.0, 25.0, 0.0]
    """
    scores = []
    for completion in completions:
        tokens = completion_text(completion).split()
        scores.append(100.0 * len(set(tokens)) / len(tokens) if tokens else 0.0)
    return scores


# ---- the shape of a reasoning answer ------------------------------------------------------------

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_STRICT_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def _format_score(text: str, partial: bool) -> float:
    counts = [text.count(tag) for tag in _TAGS]
    match = _STRICT_FORMAT.fullmatch(text)
    if counts == [1, 1, 1, 1] and match and match[1].strip() and match[2].strip():
        return 1.0
    if not partial:
        return 0.0
    # Partial credit leads a model that has not found the format yet towards it: 0.125 for each tag
    # used exactly once, 0.25 more when all four come in order. Its ceiling (0.75) stays below a strict
    # match, so text around the sections or an empty section still costs something.
    score = 0.125 * sum(count == 1 for count in counts)
    if counts == [1, 1, 1, 1]:
        positions = [text.index(tag) for tag in _TAGS]
        score += 0.25 if positions == sorted(positions) else 0.0
    return score


class Format(Reward):
    """<think>...</think> then <answer>...</answer>: 1.0 exact, else partial credit up to 0.75 (or 0).

    1.0 for that exact shape, nothing around the sections, both non-empty. Otherwise, with
    `partial=True` (the registry's `format`), 0.125 for each of the four tags used exactly once and
    0.25 more when they come in order (at most 0.75); with `partial=False` (`format_strict`), 0.0.

    >>> Format()(["<think>2 + 2 = 4</think>\\n<answer>4</answer>", "<think>2 + 2 = 4</think> 4", "4"])
    [1.0, 0.25, 0.0]
    >>> Format(partial=False)(["Sure! <think>2 + 2 is 4.</think><answer>4</answer>"])
    [0.0]
    """

    def __init__(self, partial: bool = True):
        self.partial = partial
        self.__name__ = "format" if partial else "format_strict"

    def __call__(self, completions, **kwargs) -> list[float]:
        return [_format_score(completion_text(c), self.partial) for c in completions]


def get_format_reward(partial: bool = True) -> Format:
    return Format(partial)


class Repetition(Reward):
    """Penalty for repeated word n-grams (3 by default): unique / total - 1, in [-1, 0]; 0 below n words.

    >>> Repetition()(["the cat sat on the mat", "go go go go go go", ""])
    [0.0, -0.75, 0.0]
    >>> Repetition(ngram=1).__name__
    'repetition_1gram'
    """

    def __init__(self, ngram: int = 3):
        if ngram < 1:
            raise RagrpoError(f"repetition n-gram size must be at least 1, not {ngram}")
        self.ngram = ngram
        self.__name__ = "repetition" if ngram == 3 else f"repetition_{ngram}gram"

    def __call__(self, completions, **kwargs) -> list[float]:
        scores = []
        for completion in completions:
            grams = ngrams(words(completion_text(completion)), self.ngram)
            scores.append(len(set(grams)) / len(grams) - 1.0 if grams else 0.0)
        return scores


def get_repetition_reward(ngram: int = 3) -> Repetition:
    return Repetition(ngram)


# ---- grounding in the retrieved context ---------------------------------------------------------


def _units(text: str, ngram: int) -> list:
    """What groundedness counts: content words, or word n-grams that hold at least one content word."""
    if ngram == 1:
        return content_words(text)
    return [g for g in ngrams(words(text), ngram) if any(w not in STOP_WORDS for w in g)]


class Groundedness(Reward):
    """Share of the answer's content words (or n-grams) found in the 'context' passages, in [0, 1].

    Exact matching after lowercasing, no stemming: "invented" does not support "invents". Counts are
    over occurrences, so a supported word said twice counts twice; citation marks (`[n]`) and passage
    names ("Movie n") are not counted. An answer with no content words (empty, or only stop words) scores 0.

    >>> context = ["Aldous Finch invented an arctic island to keep his sponsors paying."]
    >>> Groundedness()(["Finch invented the island.", "Finch was a pirate.", ""], context=[context] * 3)
    [1.0, 0.5, 0.0]
    >>> Groundedness(ngram=2)(["Finch invented a tropical island."], context=[context])
    [0.25]
    """

    beyond_question = False

    def __init__(self, ngram: int = 1):
        if ngram < 1:
            raise RagrpoError(f"groundedness n-gram size must be at least 1, not {ngram}")
        self.ngram = ngram
        name = "groundedness" if ngram == 1 else f"groundedness_{ngram}gram"
        self.__name__ = f"{name}_beyond_question" if self.beyond_question else name

    def __call__(self, completions, context=None, query=None, **kwargs) -> list[float]:
        contexts = column(context, "context")
        queries = column(query, "query") if self.beyond_question else [""] * len(completions)
        scores = []
        for completion, sample_context, question in zip(completions, contexts, queries, strict=True):
            asked = set(_units(question, self.ngram))
            units = [u for u in _units(without_references(answer_text(completion)), self.ngram) if u not in asked]
            # n-grams are collected per passage, so none spans the seam between two passages
            support = {u for passage in passages(sample_context) for u in _units(passage, self.ngram)}
            scores.append(share(units, support))
        return scores


class GroundednessBeyondQuestion(Groundedness):
    """Share of the answer's content words not in the 'query' found in the 'context', in [0, 1].

    When the questions are made from the passages' own words, an answer that repeats the question
    would otherwise score as grounded without saying anything new.

    >>> context = ["Aldous Finch invented an arctic island to keep his sponsors paying."]
    >>> GroundednessBeyondQuestion()(["Who invented an island? Finch invented it.", "Who invented an island?"],
    ...                              context=[context] * 2, query=["Who invented an island?"] * 2)
    [1.0, 0.0]
    """

    beyond_question = True


def get_groundedness_reward(ngram: int = 1, beyond_question: bool = False) -> Groundedness:
    return GroundednessBeyondQuestion(ngram) if beyond_question else Groundedness(ngram)


class VerbatimSpan(Reward):
    """Minus the share of the answer's words that sit in a run of more than `longest` words copied from one
    passage of the 'context', in [-1, 0].

    Against answers that retell the source sentence for sentence: `answer_match` and the marked source both
    pay for copying, and copying the same sentences for every question about a document drags distinct-2
    down (the clean-clone quickstart of session 26, bench/results/from-index/NOTES.md). A name or a title
    quoted in full stays within `longest` words and costs nothing. Citation marks are left out; runs are
    matched per passage, so none spans the seam between two passages.

    >>> context = ["Window washer Troy Haskett is dangling on a scaffold when the rope snaps."]
    >>> VerbatimSpan()(["Troy Haskett.", "Window washer Troy Haskett is dangling on a scaffold.", ""],
    ...                context=[context] * 3)
    [0.0, -1.0, 0.0]
    >>> VerbatimSpan(longest=3)(["Troy Haskett is dangling, and the rope snaps."], context=[context])
    [-0.5]
    """

    def __init__(self, longest: int = 5):
        if longest < 1:
            raise RagrpoError(f"verbatim_span needs a longest allowed run of at least 1 word, not {longest}")
        self.longest = longest
        self.__name__ = "verbatim_span" if longest == 5 else f"verbatim_span_{longest}w"

    def __call__(self, completions, context=None, **kwargs) -> list[float]:
        run = self.longest + 1  # the shortest run that costs
        scores = []
        for completion, sample_context in zip(completions, column(context, "context"), strict=True):
            said = words(without_references(answer_text(completion)))
            copied = [False] * len(said)
            # n-grams are collected per passage, so none spans the seam between two passages
            support = {g for passage in passages(sample_context) for g in ngrams(words(passage), run)}
            for start, gram in enumerate(ngrams(said, run)):
                if gram in support:
                    copied[start:start + run] = [True] * run
            scores.append(-sum(copied) / len(said) if said else 0.0)
        return scores


def get_verbatim_span_reward(longest: int = 5) -> VerbatimSpan:
    return VerbatimSpan(longest)


# ---- answering what was asked -------------------------------------------------------------------


class AnswerMatch(Reward):
    """1 when the answer holds one of the row's `targets` as a run of whole words (after SQuAD's
    normalisation, `ragrpo.evaluation.gold`) and names none of its `distractors`, else 0; 0 for a row
    without targets.

    The targets are not labels anyone wrote: a from-index question made from a document's own fields
    carries the field it asks for (the title a "which film" question asks for, the year of a "what year"
    one, the name a "who ..." question was cut from), so the reward is label-free in the sense the
    curriculum is. The distractors are the other retrieved passages' titles and years: without them, listing
    every passage's header scores on every title question. An agentic row's passages are known only after
    its searches: the rollout gives their `passage_names` (with `context_ids`), and the distractors are
    taken from those. A row without targets (a summary request)
    scores 0 for every completion of its group, which gives no advantage either way. The `distractors`
    column is optional.

    >>> AnswerMatch()(["It is Inspector Hale [2].", "Nobody."], targets=[["Hale"], ["Hale"]])
    [1.0, 0.0]
    >>> AnswerMatch()(["Hale or Crouch", "Hale"], targets=[["Hale"]] * 2, distractors=[["Crouch"]] * 2)
    [0.0, 1.0]
    """

    __name__ = "answer_match"

    def __call__(self, completions, targets=None, distractors=None, passage_names=None, context_ids=None,
                 source_id=None, **kwargs) -> list[float]:
        """1 when the answer names what its question asks for (the 'targets' column) and no other passage."""
        from ragrpo.evaluation.gold import answer_accuracy

        if targets is None:
            raise RagrpoError("needs a 'targets' column (what each question asks for); `ragrpo train --from-index` "
                              "builds it")
        if distractors is None and passage_names is not None:  # an agentic row: its passages came from its searches
            distractors = [hedges(names, ids, source)
                           for names, ids, source in zip(passage_names, context_ids, source_id, strict=True)]
        others = distractors if distractors is not None else [()] * len(completions)
        return [answer_accuracy(answer_text(c), t, d) if t else 0.0
                for c, t, d in zip(completions, targets, others, strict=True)]


answer_match = AnswerMatch()


class AnswerMatchEnded(Reward):
    """`answer_match`, paid in full only to an answer that ends before the last quarter of the token budget.

    A right answer earns `1 + overlong / 2`: 1 when it ends early, down to 0.5 when it runs to the budget;
    a wrong one earns 0 however long it is. So ending pays only once the answer is right. As a separate
    term, the same penalty is the whole advantage in every group whose answers are all wrong, and the
    answers shrank to 2 tokens before any was right (r21, bench/results/from-index/NOTES.md).

    >>> reward = AnswerMatchEnded().for_run(budget=64)
    >>> reward(["Hale.", "Hale, and on and on", "No."], targets=[["Hale"]] * 3, completion_ids=[[1] * 3, [1] * 64, [1] * 2])
    [1.0, 0.5, 0.0]
    """

    __name__ = "answer_match_ended"

    def __init__(self, overlong: Overlong | None = None):
        self.overlong = overlong or Overlong()

    def for_run(self, budget: int | None = None, tokenizer=None) -> AnswerMatchEnded:
        return AnswerMatchEnded(self.overlong.for_run(budget, tokenizer))

    def __call__(self, completions, completion_ids=None, **kwargs) -> list[float]:
        right = answer_match(completions, **kwargs)
        penalty = self.overlong(completions, completion_ids=completion_ids)
        return [r * (1.0 + p / 2) for r, p in zip(right, penalty, strict=True)]


class AnswerMatchOwnWords(Reward):
    """`answer_match`, paid in full only to an answer that does not retell a passage: a right answer earns
    `1 + verbatim_span / 2`, from 1 in its own words down to 0.5 when every word is in a copied run; a wrong one 0.

    So copying costs only once the answer is right. As a separate term (`verbatim_span=1`, r28 seed 45) the
    penalty was the whole advantage in every group whose answers were all wrong, and the run stopped drawing
    on the passages before any answer was right (bench/results/from-index/NOTES.md, session 27), as r21's
    overlong term did to length.

    >>> reward = AnswerMatchOwnWords()
    >>> context = ["Window washer Troy Haskett is dangling on a scaffold when the rope snaps."]
    >>> reward(["Troy Haskett.", "Window washer Troy Haskett is dangling on a scaffold.", "Nobody."],
    ...        targets=[["Troy Haskett"]] * 3, context=[context] * 3)
    [1.0, 0.5, 0.0]
    """

    __name__ = "answer_match_own_words"

    def __init__(self, copied: VerbatimSpan | None = None):
        self.copied = copied or VerbatimSpan()

    def __call__(self, completions, context=None, **kwargs) -> list[float]:
        right = answer_match(completions, **kwargs)
        penalty = self.copied(completions, context=context)
        return [r * (1.0 + p / 2) for r, p in zip(right, penalty, strict=True)]


def hedges(names: list[list[str]], ids: list[str], source: str) -> list[str]:
    """The names (`prompts.passage_names`) of the shown passages that are not the source's, bar the source's own."""
    own = {name for group, doc in zip(names, ids) if doc == source for name in group}
    return list(dict.fromkeys(name for group, doc in zip(names, ids) if doc != source for name in group
                              if name not in own))


REWARDS: dict[str, Callable] = {
    "length": length,
    "token_diversity": token_diversity,
    "format": Format(),
    "groundedness": Groundedness(),
    "groundedness_beyond_question": GroundednessBeyondQuestion(),
    "citation": citation,
    "source_citation": source_citation,
    "source_citation_grounded": SourceCitationGrounded(),
    "source_citation_answered": SourceCitationAnswered(),
    "source_citation_only": SourceCitationOnly(),
    "source_citation_exact": SourceCitationExact(),
    "source_citation_exact_1w": SourceCitationExact(min_words=1),
    "source_citation_debiased_1w": SourceCitationDebiased(min_words=1),
    "drawn_from_source": DrawnFromSource(),
    "drawn_from_first": DrawnFromFirst(),
    "drawn_position_charge": DrawnPositionCharge(),
    "single_citation": SingleCitation(),
    "single_citation_debiased": SingleCitationDebiased(),
    "answer_match": answer_match,
    "answer_match_ended": AnswerMatchEnded(),
    "answer_match_own_words": AnswerMatchOwnWords(),
    "context_reliance": ContextReliance(),
    "relevance": Relevance(),
    "repetition": Repetition(),
    "verbatim_span": VerbatimSpan(),
    "overlong": Overlong(),
    "search_found_source": SearchFoundSource(),
    "search_format": SearchFormat(),
    "search_cost": SearchCost(),
}


def describe(func: Callable) -> str:
    """A reward's one-line description: the first line of its docstring."""
    return ((func.__doc__ or "").strip().splitlines() or [""])[0]
