"""The bodies `ragrpo serve` accepts: pydantic checks types and bounds, and its errors become one 400 line
naming the field. Text is checked here, before it reaches the embedder, the tokenizer or LanceDB."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGES = 64
MAX_MESSAGE_CHARS = 16_000
MAX_K = 20
MAX_SEARCHES = 8


SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value) -> bool:
    """Whether a string in `value` (a str, or lists and dicts of them) holds a lone UTF-16 surrogate: JSON's
    "\\ud800" escape decodes to one, and no UTF-8 encoder (tokenizer, embedder, LanceDB) accepts it."""
    if isinstance(value, str):
        return SURROGATE.search(value) is not None
    if isinstance(value, list | tuple):
        return any(_lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    return False


class Body(BaseModel):
    @field_validator("*", mode="before")
    @classmethod
    def _valid_text(cls, value):
        # Checked before anything reads the text: LanceDB retries a failed query embedding for minutes.
        if _lone_surrogate(value):
            raise ValueError("the text holds a lone UTF-16 surrogate (such as \\ud800), which is not a character; "
                             "send valid UTF-8 or complete surrogate pairs")
        return value


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content):
        for n, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part.get("type"), str):
                raise ValueError(f"part {n} needs a string 'type' (e.g. \"text\")")  # noqa: TRY004 (pydantic wants ValueError)
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"part {n} is a text part without a string 'text'")
        return content

    def text(self) -> str:
        """The content as plain text; a list of parts (OpenAI's newer shape) keeps its text parts."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class RetrievalFields(Body):
    where: str | None = Field(default=None, max_length=2000)
    k: int | None = Field(default=None, ge=1, le=MAX_K)  # None: the server's (the model's training setting, else 5)
    mode: Literal["vector", "fts", "hybrid"] | None = None


class ChatRequest(RetrievalFields):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (user, logprobs, ...) are accepted

    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)  # what torch's generator takes
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=5.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)  # OpenAI's ranges
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0)
    cite: bool | None = None  # ask for [n] citations; None: the server's setting
    agentic: bool = False  # the model searches the table itself (`generation.agentic`); no passages up front
    max_searches: int = Field(default=3, ge=1, le=MAX_SEARCHES)  # with `agentic`

    @field_validator("messages")
    @classmethod
    def _last_is_a_question(cls, messages: list[Message]) -> list[Message]:
        for n, message in enumerate(messages):
            if len(message.text()) > MAX_MESSAGE_CHARS:
                raise ValueError(f"message {n} is longer than {MAX_MESSAGE_CHARS} characters")
        if messages[-1].role != "user" or not messages[-1].text().strip():
            raise ValueError("the last message must be a non-empty user message (the question)")
        return messages

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s or len(s) > 100 for s in stops):
            raise ValueError("at most 4 stop strings of 1 to 100 characters")
        return stops


class SearchRequest(RetrievalFields):
    query: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
