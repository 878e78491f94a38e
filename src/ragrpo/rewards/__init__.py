"""Rewards: the built-in reward functions (`builtin`) and how reward names become the guarded
functions the trainer calls (`registry`).

The built-ins are re-exported here, so that user code reads `from ragrpo.rewards import REWARDS` and a
reward spec may name one as `ragrpo.rewards:length` or `ragrpo.rewards.length`. The registry is not
re-exported: its users import `ragrpo.rewards.registry` itself.
"""

from ragrpo.rewards.builtin import (
    REWARDS,
    STOP_WORDS,
    AnswerMatch,
    RewardError,
    answer_match,
    answer_text,
    citation,
    completion_text,
    content_words,
    describe,
    get_context_reliance_reward,
    get_format_reward,
    get_groundedness_reward,
    get_length_reward,
    get_relevance_reward,
    get_repetition_reward,
    get_source_citation_reward,
    length,
    ngrams,
    passages,
    read_passages,
    source_citation,
    token_diversity,
    words,
)

__all__ = [
    "REWARDS",
    "STOP_WORDS",
    "AnswerMatch",
    "RewardError",
    "answer_match",
    "answer_text",
    "citation",
    "completion_text",
    "content_words",
    "describe",
    "get_context_reliance_reward",
    "get_format_reward",
    "get_groundedness_reward",
    "get_length_reward",
    "get_relevance_reward",
    "get_repetition_reward",
    "get_source_citation_reward",
    "length",
    "ngrams",
    "passages",
    "read_passages",
    "source_citation",
    "token_diversity",
    "words",
]
