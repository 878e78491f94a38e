"""Rewards for searching while answering (`train --from-index --agentic`), label-free.

They read the `searches` column the agentic rollout returns beside each completion (one dict per call:
`query`, `ids` shown, `found`, `error`; see `ragrpo.generation.agentic`) and the row's `source_id`, the
document the question was made from. The rollout also replaces `context` and `context_ids` with the
passages the model's own searches showed, numbered as it saw them, so the groundedness, citation and
answer rewards score an agentic answer unchanged.
"""

from __future__ import annotations

from ragrpo import RagrpoError
from ragrpo.prompts import agentic_answer, transcript
from ragrpo.rewards.base import Reward, completion_text


def _searches(searches, completions) -> list[list[dict]]:
    if searches is None:
        raise RagrpoError("needs the agentic rollout's 'searches' column; train with `ragrpo train --from-index "
                          "TABLE --agentic`")
    return [list(calls or []) for calls in searches][:len(completions)]


class SearchFoundSource(Reward):
    """1 when one of the model's own searches returned the question's source document, else 0.

    >>> SearchFoundSource()(["q</search>..."] * 2, searches=[[{"found": ["a", "b"]}], [{"found": ["c"]}]],
    ...                     source_id=["b", "b"])
    [1.0, 0.0]
    """

    __name__ = "search_found_source"

    def __call__(self, completions, searches=None, source_id=None, **kwargs) -> list[float]:
        if source_id is None:
            raise RagrpoError("needs a 'source_id' column (the document each question was made from)")
        return [float(any(source in (call.get("found") or ()) for call in calls))
                for calls, source in zip(_searches(searches, completions), source_id, strict=True)]


class SearchFormat(Reward):
    """Half for search calls that ran (the share without an error), half for an answer written after the results.

    A call with an empty query, a `</search>` never opened, or one beyond the search limit has an error;
    a completion that ends inside a query or a result has no answer.

    >>> SearchFormat()(["q</search>\\n<information>\\n...\\n</information>\\nHale [1].", "q</search>\\n<information>"],
    ...                searches=[[{"error": None}], [{"error": None}]])
    [1.0, 0.5]
    """

    __name__ = "search_format"

    def __call__(self, completions, searches=None, **kwargs) -> list[float]:
        scores = []
        for completion, calls in zip(completions, _searches(searches, completions), strict=True):
            ran = sum(not call.get("error") for call in calls) / len(calls) if calls else 0.0
            answered = float(bool(agentic_answer(transcript(completion_text(completion)))))
            scores.append(0.5 * ran + 0.5 * answered)
        return scores


class SearchCost(Reward):
    """-cost for every search call beyond the first (refused and failed calls count): 0 for one search.

    >>> SearchCost(0.1)(["a", "b"], searches=[[{}], [{}, {}, {}]])
    [0.0, -0.2]
    """

    def __init__(self, cost: float = 0.1):
        if cost < 0:
            raise RagrpoError(f"search_cost: the cost must be at least 0, not {cost}")
        self.cost = cost
        self.__name__ = "search_cost" if cost == 0.1 else f"search_cost_{cost:g}"

    def __call__(self, completions, searches=None, **kwargs) -> list[float]:
        return [-self.cost * max(0, len(calls) - 1) for calls in _searches(searches, completions)]
