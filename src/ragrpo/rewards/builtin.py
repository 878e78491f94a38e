"""Reward functions, with TRL's signature: `(prompts, completions, **kwargs) -> list[float | None]`.

A completion is a string (plain-text prompts) or a list of chat messages (conversational prompts);
every reward reads the text through `completion_text`, so both shapes score the same. A reward's
`__name__` is its stable metric key (`rewards/<name>/mean` in the logs). Parametrized rewards are
`get_*` factories; their default configuration carries the registry name (`repetition`), any other
one says its parameters in the name (`repetition_4gram`), so two variants never share a metric.

The built-ins are in `REWARDS` (`ragrpo rewards list` prints them, the README has a table).

Conventions for retrieval-augmented rewards. TRL hands every dataset column to every reward, one
value per completion. `context` holds a sample's retrieved passages: a list of strings, or one string
whose passages are separated by blank lines (the layout of `ragrpo.prompts.build_prompt`); citations `[n]`
count passages from 1. `query` holds the question. A reward that needs a column the dataset lacks
fails with one line naming the column. When the completion has an `<answer>` section, these rewards
score that section only, so the reasoning in `<think>` neither earns nor loses support. Words are
lowercase unicode `\\w+` tokens, so any script works; "content words" drop a small English stop-word
list. An empty answer scores 0 everywhere except `length`.

Names resolve to functions, and every reward handed to the trainer is guarded, in `ragrpo.rewards.registry`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ragrpo import RagrpoError
from ragrpo.prompts import CITATION, cited_passages, without_references


class RewardError(RagrpoError):
    """A reward function failed or returned an unusable score."""


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the content of its chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, list):
        return "".join(completion_text(message) for message in completion)
    return "" if completion is None else str(completion)


# ---- text helpers ---------------------------------------------------------------------------------

# Written for this project: articles, pronouns, auxiliaries, prepositions and conjunctions that carry
# no claim of their own, so that "the" in an answer is not "supported" by "the" in the context.
STOP_WORDS = frozenset(["a", "an", "the", "and", "or", "but", "nor", "so", "yet", "if", "then", "than", "that", "this", "these", "those", "there", "here", "is", "are", "was", "were", "be", "been", "being", "am", "do", "does", "did", "done", "have", "has", "had", "having", "will", "would", "shall", "should", "can", "could", "may", "might", "must", "not", "no", "yes", "i", "me", "my", "mine", "we", "us", "our", "ours", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "it", "its", "they", "them", "their", "theirs", "who", "whom", "whose", "which", "what", "when", "where", "why", "how", "of", "in", "on", "at", "to", "from", "by", "for", "with", "about", "as", "into", "onto", "over", "under", "after", "before", "between", "through", "during", "without", "within", "against", "among", "up", "down", "out", "off", "again", "further", "once", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such", "only", "own", "same", "too", "very", "just", "also", "s", "t", "d", "ll", "m", "re", "ve"])

_WORD = re.compile(r"\w+")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)


def words(text: str) -> list[str]:
    """Lowercase word tokens of any script: `\\w+` matches letters and digits in every alphabet."""
    return _WORD.findall(text.lower())


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOP_WORDS]


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def answer_text(completion) -> str:
    """The answer of a completion: its last `<answer>` section, else the text without `<think>` sections."""
    text = completion_text(completion)
    sections = _ANSWER.findall(text)
    return (sections[-1] if sections else _THINK.sub(" ", text)).strip()


def passages(context) -> list[str]:
    """A sample's `context` as a list of passages: a list is kept as it is (so `[n]` keeps its meaning),
    a string is split at blank lines, None is no passages."""
    if context is None:
        return []
    if isinstance(context, str):
        return [p.strip() for p in re.split(r"\n\s*\n", context) if p.strip()]
    if isinstance(context, (list, tuple)):
        return ["" if p is None else str(p) for p in context]
    raise TypeError(f"a context must be a string or a list of strings, not {type(context).__name__}")


def read_passages(path: str | Path) -> list[str]:
    """Passages from a text file, separated by blank lines (the `--context FILE` of `rewards score`)."""
    path = Path(path)
    if not path.is_file():
        raise RagrpoError(f"context file {path} does not exist")
    try:
        return passages(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RagrpoError(f"context file {path} is not UTF-8 text") from None


_COLUMN_HELP = {
    "context": "the retrieved passages: a list of strings, or one string with passages separated by blank "
               "lines; `ragrpo rewards score` takes them as --context FILE",
    "query": "the question; `ragrpo rewards score` takes it as --query TEXT",
}


def _column(values, name: str) -> list:
    """A dataset column handed to a reward by TRL; its absence is the user's to fix, so say how."""
    if values is None:
        raise RagrpoError(f"needs a {name!r} column in the dataset ({_COLUMN_HELP[name]})")
    return values


def _prompt_text(prompt) -> str:
    """The user's words in a prompt: the last user message of a conversation, or the text itself."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return completion_text(users[-1] if users else prompt)
    return completion_text(prompt)


def _named(func: Callable, name: str) -> Callable:
    """Give a factory's product its metric key; its docstring's first line is what `rewards list` shows."""
    func.__name__ = func.__qualname__ = name
    return func


# ---- the write-up's rewards ---------------------------------------------------------------------


def length(completions, **kwargs) -> list[float]:
    """The write-up's length reward: `-abs(50 - len(text))`, in characters; 0 is best.

    >>> length(["x" * 50, "", [{"role": "assistant", "content": "x" * 60}]])
    [0.0, -50.0, -10.0]
    """
    return [float(-abs(50 - len(completion_text(c)))) for c in completions]


def get_length_reward(target: int = 50, unit: str = "chars", tokenizer=None) -> Callable:
    """`-abs(target - size)`, the size in characters or in tokens; 0 is best.

    Tokens are counted with `tokenizer` when one is given, else from the `completion_ids` TRL passes
    (its count, the end-of-sequence token included). The defaults give the write-up's `length`.

    >>> get_length_reward(target=10)(["x" * 12])
    [-2.0]
    >>> by_tokens = get_length_reward(target=3, unit="tokens")
    >>> by_tokens(["one two three four"], completion_ids=[[11, 12, 13, 14]]), by_tokens.__name__
    ([-1.0], 'length_3_tokens')
    """
    if unit not in ("chars", "tokens"):
        raise RagrpoError(f"length unit {unit!r}: use 'chars' or 'tokens'")

    def length_reward(completions, completion_ids=None, **kwargs) -> list[float]:
        """-abs(target - size), in characters or tokens; 0 is best."""
        texts = [completion_text(c) for c in completions]
        if unit == "chars":
            sizes = [len(text) for text in texts]
        elif tokenizer is not None:
            sizes = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        elif completion_ids is not None:
            sizes = [len(ids) for ids in completion_ids]
        else:
            raise RagrpoError("a length in tokens needs get_length_reward(unit='tokens', tokenizer=...)")
        return [float(-abs(target - size)) for size in sizes]

    name = "length" if (target, unit) == (50, "chars") else f"length_{target}_{unit}"
    return _named(length_reward, name)


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


def get_format_reward(partial: bool = True) -> Callable:
    """Reasoning then answer: `<think>...</think>` followed by `<answer>...</answer>`, nothing around them.

    1.0 for that exact shape with both sections non-empty. Otherwise, with `partial=True` (the
    registry's `format`), 0.125 for each of the four tags used exactly once and 0.25 more when they
    come in order (at most 0.75); with `partial=False` (`format_strict`), 0.0.

    >>> get_format_reward()(["<think>2 + 2 = 4</think>\\n<answer>4</answer>", "<think>2 + 2 = 4</think> 4",
    ...                      "4"])
    [1.0, 0.25, 0.0]
    >>> get_format_reward(partial=False)(["Sure! <think>2 + 2 is 4.</think><answer>4</answer>"])
    [0.0]
    """

    def format_reward(completions, **kwargs) -> list[float]:
        """<think>...</think> then <answer>...</answer>: 1.0 exact, else partial credit up to 0.75 (or 0)."""
        return [_format_score(completion_text(c), partial) for c in completions]

    return _named(format_reward, "format" if partial else "format_strict")


def get_repetition_reward(ngram: int = 3) -> Callable:
    """A penalty for repeated word n-grams: `unique / total - 1`, in [-1, 0]; 0 below n words.

    >>> get_repetition_reward()(["the cat sat on the mat", "go go go go go go", ""])
    [0.0, -0.75, 0.0]
    >>> get_repetition_reward(ngram=1).__name__
    'repetition_1gram'
    """
    if ngram < 1:
        raise RagrpoError(f"repetition n-gram size must be at least 1, not {ngram}")

    def repetition(completions, **kwargs) -> list[float]:
        """Penalty for repeated word n-grams (3 by default): unique / total - 1, in [-1, 0]."""
        scores = []
        for completion in completions:
            grams = ngrams(words(completion_text(completion)), ngram)
            scores.append(len(set(grams)) / len(grams) - 1.0 if grams else 0.0)
        return scores

    name = "repetition" if ngram == 3 else f"repetition_{ngram}gram"
    return _named(repetition, name)


# ---- grounding in the retrieved context ---------------------------------------------------------


# The citation syntax and its parser are the prompt protocol's (`ragrpo.prompts`).
_CITATION = CITATION
_without_references = without_references


def _share(units: list, support: set) -> float:
    """The share of `units` found in `support`; 0 when there are none."""
    return sum(u in support for u in units) / len(units) if units else 0.0


def _units(text: str, ngram: int) -> list:
    """What groundedness counts: content words, or word n-grams that hold at least one content word."""
    if ngram == 1:
        return content_words(text)
    return [g for g in ngrams(words(text), ngram) if any(w not in STOP_WORDS for w in g)]


def get_groundedness_reward(ngram: int = 1, beyond_question: bool = False) -> Callable:
    """Share of the answer's content words (or word n-grams) that occur in the `context` column, in [0, 1].

    Exact matching after lowercasing, no stemming: "invented" does not support "invents". Counts are
    over occurrences, so a supported word said twice counts twice; references to passages (`[n]`,
    "Movie n") are not counted. An answer with no content words (empty, or only stop words) scores 0.

    With `beyond_question`, words (n-grams) that are also in the `query` column are left out: when the
    questions are made from the passages' own words, an answer that repeats the question would otherwise
    score as grounded without saying anything new.

    >>> context = ["Aldous Finch invented an arctic island to keep his sponsors paying."]
    >>> get_groundedness_reward()(["Finch invented the island.", "Finch was a pirate.", ""],
    ...                           context=[context] * 3)
    [1.0, 0.5, 0.0]
    >>> get_groundedness_reward(ngram=2)(["Finch invented a tropical island."], context=[context])
    [0.25]
    >>> get_groundedness_reward(beyond_question=True)(["Who invented an island? Finch invented it.",
    ...     "Who invented an island?"], context=[context] * 2, query=["Who invented an island?"] * 2)
    [1.0, 0.0]
    """
    if ngram < 1:
        raise RagrpoError(f"groundedness n-gram size must be at least 1, not {ngram}")

    def groundedness(completions, context=None, query=None, **kwargs) -> list[float]:
        """Share of the answer's content words (or n-grams) found in the 'context' passages, in [0, 1]."""
        contexts = _column(context, "context")
        queries = _column(query, "query") if beyond_question else [""] * len(completions)
        scores = []
        for completion, sample_context, question in zip(completions, contexts, queries, strict=True):
            asked = set(_units(question, ngram))
            units = [u for u in _units(_without_references(answer_text(completion)), ngram) if u not in asked]
            # n-grams are collected per passage, so none spans the seam between two passages
            support = {u for passage in passages(sample_context) for u in _units(passage, ngram)}
            scores.append(_share(units, support))
        return scores

    if beyond_question:
        groundedness.__doc__ = "Share of the answer's content words not in the 'query' found in the 'context', in [0, 1]."
    name = "groundedness" if ngram == 1 else f"groundedness_{ngram}gram"
    return _named(groundedness, f"{name}_beyond_question" if beyond_question else name)


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
    for completion, sample_context in zip(completions, _column(context, "context"), strict=True):
        docs = [set(words(p)) for p in passages(sample_context)]
        credits = []
        for sentence in _SENTENCE_END.split(answer_text(completion)):
            claimed = content_words(_CITATION.sub(" ", sentence))
            for group in _CITATION.findall(sentence):
                cited = map(int, group.split(","))
                credits += [_share(claimed, docs[n - 1]) if 1 <= n <= len(docs) else -1.0 for n in cited]
        scores.append(sum(credits) / len(credits) if credits else 0.0)
    return scores


def get_source_citation_reward(grounded: bool = False, min_words: int = 0, others: float = 0.0,
                               exclusive: bool = False) -> Callable:
    """Citing the question's source document: per passage referred to, 1 / 0 / -1, averaged, in [-1, 1].

    Each passage the answer refers to (once, however often it is named) scores 1 when it is the
    source's passage, 0 for another retrieved passage and -1 for a passage that does not exist; the
    score is their mean, 0 without references. A reference is `[n]` or a "Movie n" name (the label
    `ragrpo.generation.rag` gives passage n). Needs the `context_ids` (ids of the retrieved passages, in
    order) and `source_id` columns that `ragrpo train --from-index` builds; when the source was not
    retrieved, no reference can score 1.

    With `grounded`, a reference to the source's passage earns only the share of the answer's content
    words found in that passage, leaving out the question's words and the passage names: an answer that
    only names a passage ("Movie- 2.") earns nothing, however right the number. A measured from-index
    run without it learned to answer with bare passage names (bench/results/from-index/NOTES.md).

    With `min_words`, a reference to the source earns its 1 only in an answer with at least that many
    content words of its own (leaving out the question's words and the passage names), however
    grounded: the reward is for naming the source of an answer, and a bare "Movie- 2." is none. Whether
    the words are in the passage is left to a groundedness reward beside it.

    `others` is the credit of a reference to another retrieved passage. At its default, 0, citing every
    passage is a safe bet ("[1][2]" scores 0.5 whenever the source is one of them), and a measured run
    learned to do just that; at -1, "[1][2]" scores 0, as much as citing nothing, and only a reference to
    the source alone scores 1.

    With `exclusive` the score is the worst reference's credit, not the mean: 1 only when every passage
    referred to is the source's (the evaluation's citation accuracy). "[1][2]" scores 0, as does a wrong
    guess or silence; with `others=-1` a wrong guess cost more than silence and a run learned to stop citing.

    >>> ids = [["a", "b", "c"]] * 5
    >>> source_citation(["As Movie 2 shows, ...", "Per [1] and [2] and [2].", "See [9].", "No idea.", "[2]"],
    ...                 context_ids=ids, source_id=["b"] * 5)
    [1.0, 0.5, -1.0, 0.0, 1.0]
    >>> docs = [["Finch sails north.", "Finch invented an arctic island.", "Gulls."]] * 3
    >>> get_source_citation_reward(grounded=True)(
    ...     ["Movie 2.", "Finch invented an island [2].", "Finch invented the gulls [2][3]."], context_ids=ids[:3],
    ...     source_id=["b"] * 3, context=docs, query=["Who is Finch?"] * 3)
    [0.0, 1.0, 0.25]
    """

    def source_citation(completions, context_ids=None, source_id=None, context=None, query=None,
                        **kwargs) -> list[float]:
        """Citing the question's source document: per passage referred to 1 / 0 / -1, averaged, in [-1, 1]."""
        if context_ids is None or source_id is None:
            raise RagrpoError("needs 'context_ids' and 'source_id' columns (the ids of the retrieved passages and "
                              "of the document the question is about); `ragrpo train --from-index` builds them")
        contexts = _column(context, "context") if grounded else [None] * len(completions)
        queries = _column(query, "query") if grounded or min_words else [""] * len(completions)
        scores = []
        for completion, ids, source, sample_context, question in zip(
                completions, context_ids, source_id, contexts, queries, strict=True):
            ids, text = list(ids), answer_text(completion)
            refs = list(dict.fromkeys(cited_passages(text)))  # each passage once, in order
            credits = [(1.0 if ids[n - 1] == source else others) if 1 <= n <= len(ids) else -1.0 for n in refs]
            if (grounded or min_words) and 1.0 in credits:
                asked = set(content_words(question))
                claimed = [w for w in content_words(_without_references(text)) if w not in asked]
                if grounded:
                    earned = _share(claimed, set(words(passages(sample_context)[ids.index(source)])))
                else:
                    earned = float(len(claimed) >= min_words)
                credits = [earned if c == 1.0 else c for c in credits]
            scores.append((min(credits) if exclusive else sum(credits) / len(credits)) if credits else 0.0)
        return scores

    if exclusive and (others or not min_words):
        raise RagrpoError("source citation: exclusive goes with min_words and others 0")
    if grounded and min_words:
        raise RagrpoError("source citation: give grounded or min_words, not both")
    if grounded:
        source_citation.__doc__ = ("Citing the source document, a reference earning the share of the answer's "
                                   "content words found in the source passage, in [-1, 1].")
        return _named(source_citation, "source_citation_grounded")
    if not -1.0 <= others <= 0.0:
        raise RagrpoError(f"source citation: others must be within [-1, 0], not {others}")
    if min_words:
        source_citation.__doc__ = (f"Citing the source document, a reference counting only in an answer of at least "
                                   f"{min_words} content words of its own, in [-1, 1].")
        if exclusive:
            source_citation.__doc__ += " Every passage referred to must be the source's: the worst one counts."
            return _named(source_citation, "source_citation_exact" if min_words == 5 else
                          f"source_citation_exact_{min_words}w")
        if others:
            source_citation.__doc__ += f" Another retrieved passage cited counts {others:g}."
            return _named(source_citation, "source_citation_only")
        return _named(source_citation, "source_citation_answered")
    if others:
        raise RagrpoError("source citation: others applies only with min_words")
    return _named(source_citation, "source_citation")


source_citation = get_source_citation_reward()


class AnswerMatch:
    """1 when the answer holds one of the row's `targets` as a run of whole words (after SQuAD's
    normalisation, `ragrpo.evaluation.gold`) and names none of its `distractors`, else 0; 0 for a row
    without targets.

    The targets are not labels anyone wrote: a from-index question made from a document's own fields
    carries the field it asks for (the title a "which film" question asks for, the year of a "what year"
    one, the name a "who ..." question was cut from), so the reward is label-free in the sense the
    curriculum is. The distractors are the other retrieved passages' titles and years: without them, listing
    every passage's header scores on every title question. A row without targets (a summary request)
    scores 0 for every completion of its group, which gives no advantage either way. The `distractors`
    column is optional. A class, not a closure, so that it pickles.

    >>> AnswerMatch()(["It is Inspector Hale [2].", "Nobody."], targets=[["Hale"], ["Hale"]])
    [1.0, 0.0]
    >>> AnswerMatch()(["Hale or Crouch", "Hale"], targets=[["Hale"]] * 2, distractors=[["Crouch"]] * 2)
    [0.0, 1.0]
    """

    __name__ = "answer_match"

    def __call__(self, completions, targets=None, distractors=None, **kwargs) -> list[float]:
        """1 when the answer names what its question asks for (the 'targets' column) and no other passage."""
        from ragrpo.evaluation.gold import answer_accuracy

        if targets is None:
            raise RagrpoError("needs a 'targets' column (what each question asks for); `ragrpo train --from-index` "
                              "builds it")
        others = distractors if distractors is not None else [()] * len(completions)
        return [answer_accuracy(answer_text(c), t, d) if t else 0.0
                for c, t, d in zip(completions, targets, others, strict=True)]


answer_match = AnswerMatch()


# ---- rewards that run a model -------------------------------------------------------------------


def get_context_reliance_reward(model=None) -> Callable:
    """How much the retrieved context explains the answer, without labels: the answer's mean token
    log-likelihood given the query and the `context` passages, minus given the query alone (nats).

    Both prompts are `ragrpo.prompts.build_prompt(query, passages)` in a user turn of the chat template,
    the second with no passages, so the passages are the only difference. Positive: the context
    makes the answer likelier (it draws on it); near 0 or negative: the answer would be said anyway.
    The `query` column is optional (an empty query without it). An empty answer scores 0.

    `model` is the scoring language model: None for the packaged base model (the adapter-free
    reference of a LoRA run), a Hugging Face id or folder, or a loaded `(model, tokenizer)`. It is
    loaded on the first call and kept. Cost: two forward passes per completion, over the prompt,
    the passages and the answer, on a second copy of the model next to the one being trained.

    >>> reward = get_context_reliance_reward()  # loads nothing yet
    >>> reward(["Finch invented the island."], context=[["Aldous Finch invented an arctic island."]],
    ...        query=["Who made up the island?"])  # doctest: +SKIP
    [1.9...]
    """
    loaded = {}

    def context_reliance(completions, context=None, query=None, **kwargs) -> list[float]:
        """Answer log-likelihood with the 'context' minus without it, under the base model (nats)."""
        from ragrpo.models import answer_logprobs, load_model
        from ragrpo.prompts import build_prompt

        contexts = _column(context, "context")
        queries = [completion_text(q) for q in query] if query is not None else [""] * len(completions)
        answers = [answer_text(c) for c in completions]
        if not any(answers):
            return [0.0] * len(answers)
        if "lm" not in loaded:
            loaded["lm"] = model if isinstance(model, tuple) else load_model(model)
        lm, tokenizer = loaded["lm"]
        with_context = [build_prompt(q, passages(c)) for q, c in zip(queries, contexts, strict=True)]
        without = [build_prompt(q, []) for q in queries]
        given_context = answer_logprobs(lm, tokenizer, with_context, answers)
        given_query = answer_logprobs(lm, tokenizer, without, answers)
        return [a - b for a, b in zip(given_context, given_query)]

    return context_reliance


def get_relevance_reward(embedding_model=None) -> Callable:
    """Cosine similarity of the answer's and the query's embeddings, negatives clipped to 0, in [0, 1].

    The query is the `query` column, else the prompt's last user message. `embedding_model` is a
    sentence-transformers name or folder (None: the packaged all-MiniLM-L6-v2, as `ragrpo index`
    uses), loaded on the first call and kept. An empty answer or query scores 0.

    >>> reward = get_relevance_reward()  # loads nothing yet
    >>> reward(["The detective is the killer.", "Bananas are yellow."],
    ...        query=["a detective who is the murderer"] * 2)  # doctest: +SKIP
    [0.8..., 0.0...]
    """
    loaded = {}

    def relevance(completions, prompts=None, query=None, **kwargs) -> list[float]:
        """Cosine similarity of the answer's and the 'query' embeddings (configured embedder), in [0, 1]."""
        if query is not None:
            queries = [completion_text(q) for q in query]
        elif prompts:
            queries = [_prompt_text(p) for p in prompts]
        else:
            queries = _column(None, "query")
        answers = [answer_text(c) for c in completions]
        scores = [0.0] * len(answers)
        todo = [i for i, (a, q) in enumerate(zip(answers, queries, strict=True)) if a.strip() and q.strip()]
        if not todo:
            return scores
        if "embedder" not in loaded:
            from sentence_transformers import SentenceTransformer

            from ragrpo.models import device, resolve_embedder

            name = resolve_embedder(embedding_model)
            try:
                loaded["embedder"] = SentenceTransformer(name, device=device())
            except Exception as exc:
                raise RagrpoError(f"embedding model {embedding_model!r} could not be loaded: {exc}") from None
        texts = [answers[i] for i in todo] + [queries[i] for i in todo]
        vectors = loaded["embedder"].encode(texts, normalize_embeddings=True)  # (2P, dim): answers, queries
        for j, i in enumerate(todo):
            scores[i] = min(1.0, max(0.0, float(vectors[j] @ vectors[len(todo) + j])))
        return scores

    return relevance


REWARDS: dict[str, Callable] = {
    "length": length,
    "token_diversity": token_diversity,
    "format": get_format_reward(),
    "groundedness": get_groundedness_reward(),
    "groundedness_beyond_question": get_groundedness_reward(beyond_question=True),
    "citation": citation,
    "source_citation": source_citation,
    "source_citation_grounded": get_source_citation_reward(grounded=True),
    "source_citation_answered": get_source_citation_reward(min_words=5),
    "source_citation_only": get_source_citation_reward(min_words=5, others=-1.0),
    "source_citation_exact": get_source_citation_reward(min_words=5, exclusive=True),
    "source_citation_exact_1w": get_source_citation_reward(min_words=1, exclusive=True),
    "answer_match": answer_match,
    "context_reliance": get_context_reliance_reward(),
    "relevance": get_relevance_reward(),
    "repetition": get_repetition_reward(),
}


def describe(func: Callable) -> str:
    """A reward's one-line description: the first line of its docstring."""
    return ((func.__doc__ or "").strip().splitlines() or [""])[0]
