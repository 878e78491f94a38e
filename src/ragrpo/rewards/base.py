"""What every reward reads, and what every reward is.

A completion is a string (plain-text prompts) or a list of chat messages (conversational prompts);
every reward reads the text through `completion_text`, so both shapes score the same. When the
completion has an `<answer>` section, the retrieval rewards score that section only (`answer_text`),
so the reasoning in `<think>` neither earns nor loses support. Words are lowercase unicode `\\w+`
tokens, so any script works; "content words" drop a small English stop-word list.

`Reward` is the base of the built-in rewards: a small callable class with a stable `__name__`, which
TRL turns into the metric key (`rewards/<name>/mean`). Instances hold their settings only, so they
pickle, as multi-process and asynchronous trainers need.
"""

from __future__ import annotations

import re
from pathlib import Path

from ragrpo import RagrpoError


class Reward:
    """A reward as TRL calls it: `reward(prompts=..., completions=..., **columns) -> list[float | None]`.

    A subclass sets `__name__` (on the class, or per instance when its settings change the name, so
    that two variants never share a metric) and says in the first line of its docstring what it
    scores: `ragrpo rewards list` prints that line.
    """

    __name__ = "reward"

    def __call__(self, completions, **kwargs) -> list[float]:
        raise NotImplementedError

    def for_run(self, budget: int | None = None, tokenizer=None) -> Reward:
        """The instance a run calls: itself, or a fresh copy for a reward that keeps state or needs the run's
        token `budget` (its `max_completion_length`) or `tokenizer`."""
        return self

    def __repr__(self) -> str:
        return f"<reward {self.__name__}>"


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
    """The answer of a completion: its last `<answer>` section, else the text without `<think>` sections. An
    agentic completion (one with search calls) answers after its last results (`prompts.agentic_answer`)."""
    from ragrpo.prompts import agentic_answer, is_agentic

    text = completion_text(completion)
    if is_agentic(text):
        text = agentic_answer(text)
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


def column(values, name: str) -> list:
    """A dataset column handed to a reward by TRL; its absence is the user's to fix, so say how."""
    if values is None:
        raise RagrpoError(f"needs a {name!r} column in the dataset ({_COLUMN_HELP[name]})")
    return values


def prompt_text(prompt) -> str:
    """The user's words in a prompt: the last user message of a conversation, or the text itself."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return completion_text(users[-1] if users else prompt)
    return completion_text(prompt)


def share(units: list, support: set) -> float:
    """The share of `units` found in `support`; 0 when there are none."""
    return sum(u in support for u in units) / len(units) if units else 0.0
