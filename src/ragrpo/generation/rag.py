"""Retrieval-augmented answers: retrieve, build the prompt (`ragrpo.prompts`), generate through the chat template."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ragrpo import RagrpoError
from ragrpo.prompts import PassageStyle, build_prompt, table_style
from ragrpo.retrieval.index import DEFAULT_DB, open_table
from ragrpo.retrieval.search import search, text_column
from ragrpo.rewards.citations import drawn_from


@dataclass
class Answer:
    query: str
    text: str
    sources: list[dict] = field(default_factory=list)
    prompt: str = ""
    raw: str = ""  # the whole completion; with reasoning, `text` is its <answer> section only
    searches: list[dict] = field(default_factory=list)  # an agentic answer's search calls (`agentic.public`)
    drawn_from: int | None = None  # the source (1-based) its words come from (`rewards.citations.drawn_from`)


def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Completions for a batch of chat conversations; temperature 0 means greedy decoding.

    `repetition_penalty` > 1 divides the scores of tokens already in the text (transformers' CTRL-style
    penalty); it keeps small models' greedy answers out of loops.
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            repetition_penalty=repetition_penalty, **sampling
        )  # (B, prompt + new)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new_tokens]


def retrieve(table, query: str, *, where: str | None = None, k: int = 5, mode: str = "vector",
             rerank: str | None = None, vector=None) -> tuple[list[dict], str]:
    """The hits for `query` (by `mode`: vector, fts or hybrid) and the name of the text column they carry;
    `vector`: the query already embedded (`search.embed_queries`)."""
    hits = search(table, query, where=where, k=k, mode=mode, rerank=rerank, vector=vector)
    if not hits:
        raise RagrpoError(f"no rows match --where {where!r}; nothing to answer from" if where else "the table is empty")
    return hits, text_column(table)


def answer_from_hits(model, tokenizer, query: str, hits: list[dict], column: str, *,
                     max_new_tokens: int = 128, temperature: float = 0.0, repetition_penalty: float = 1.0,
                     reasoning: bool = False, cite: bool = False, style: PassageStyle | None = None) -> Answer:
    from ragrpo.rewards.builtin import answer_text

    style = style or PassageStyle()
    passages = style.passages(hits, column)
    prompt = build_prompt(query, passages, reasoning=reasoning, cite=cite, label=style.label)
    [text] = generate(model, tokenizer, [[{"role": "user", "content": prompt}]], max_new_tokens=max_new_tokens,
                      temperature=temperature, repetition_penalty=repetition_penalty)
    shown = answer_text(text) if reasoning else text.strip()
    return Answer(query=query, text=shown, sources=answer_sources(hits, column), prompt=prompt, raw=text.strip(),
                  drawn_from=drawn_from(shown, passages, query))


def ask(query: str, table: str, model: str | None, *, db: str | Path = DEFAULT_DB, where: str | None = None,
        k: int = 5, max_new_tokens: int = 128, temperature: float = 0.0, repetition_penalty: float = 1.0,
        mode: str = "vector", rerank: str | None = None, reasoning: bool = False, cite: bool = False,
        header: str | None = None, storage_options: dict[str, str] | None = None) -> Answer:
    """Retrieve `k` passages for `query` (prefiltered by `where`), then answer from them with `model`.

    Retrieval runs first, so a bad table or filter fails before the model is loaded.
    """
    from ragrpo.models import load_model

    handle = open_table(table, db, storage_options)
    style = table_style(handle, header)
    hits, column = retrieve(handle, query, where=where, k=k, mode=mode, rerank=rerank)
    lm, tokenizer = load_model(model)
    return answer_from_hits(lm, tokenizer, query, hits, column, max_new_tokens=max_new_tokens,
                            temperature=temperature, repetition_penalty=repetition_penalty, reasoning=reasoning,
                            cite=cite, style=style)


# --- Streaming -------------------------------------------------------------------------------------
# `generate` above hands back whole answers; `TextStream` yields an answer's text as it is written, for
# `ragrpo ask` and the server. It runs its own token loop (one forward pass per token over a KV cache)
# rather than `model.generate` in a thread with a streamer: the loop lives in the consumer's thread, so
# a consumer that stops iterating (a client that hung up) stops the generation at the next token, and
# nothing is left running. Greedy decoding gives the same tokens as `generate` (tested).


class TextStream:
    """One completion, generated lazily: iterate it for text pieces; afterwards read `text`,
    `finish_reason` ("stop": end of turn or a stop string; "length": `max_new_tokens` reached) and the
    token counts. `close()` (or dropping it) stops the generation. Batch size 1.

    `stop` strings end the answer without being part of it; text that could be the start of a stop
    string is held back until it is known not to be. `min_new_tokens` keeps the end-of-turn token out
    until that many tokens exist (benchmarks use it for answers of a fixed length).
    """

    def __init__(self, model, tokenizer, conversation: list[dict], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 stop: list[str] | tuple[str, ...] = (), min_new_tokens: int = 0, seed: int | None = None,
                 sources: list[dict] | None = None, passages: list | None = None, question: str = ""):
        if max_new_tokens < 1:
            raise RagrpoError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        self.prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.prompt_tokens = len(self.prompt_ids)
        context = getattr(model.config, "max_position_embeddings", None)
        if context and self.prompt_tokens + max_new_tokens > context:
            raise RagrpoError(f"the prompt has {self.prompt_tokens} tokens; with {max_new_tokens} new tokens it "
                              f"exceeds the model's context of {context}: ask for fewer tokens or passages")
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.temperature, self.top_p, self.repetition_penalty, self.seed = temperature, top_p, repetition_penalty, seed
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty
        self.stop = [s for s in stop if s]
        self.sources = sources or []
        self.passages, self.question = passages or [], question
        self.text, self.finish_reason, self.completion_tokens = "", None, 0
        self._pieces = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def read(self) -> str:
        """Run to the end; the whole answer."""
        for _ in self:
            pass
        return self.text

    def drawn_from(self) -> int | None:
        """The source (1-based) the text so far is drawn from (`rewards.citations.drawn_from`); None without
        passages."""
        return drawn_from(self.text, self.passages, self.question) if self.passages else None

    def _eos_ids(self) -> list[int]:
        from ragrpo.generation.decode import eos_ids

        return eos_ids(self.model, self.tokenizer)

    def _tokens(self):
        """Token ids so far, one step at a time; sets finish_reason when it ends by itself. Through the decode
        engine where it covers the model (`engine.fresh_projections`), else the model's own cached forward."""
        import torch

        from ragrpo.generation.engine import fresh_projections

        with torch.inference_mode():
            projections = fresh_projections(self.model)
        if projections is None:
            yield from self._forward_tokens()
        else:
            yield from self._engine_tokens(projections)

    def _engine_tokens(self, projections):
        import torch

        from ragrpo.generation.decode import Engine, Row, Sampling

        sampling = Sampling(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                            do_sample=self.temperature > 0, temperature=self.temperature or 1.0, top_p=self.top_p,
                            repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
                            presence_penalty=self.presence_penalty, seed=self.seed)
        engine = Engine(self.model, projections, slots=1, capacity=self.prompt_tokens + self.max_new_tokens)
        row = Row(self.prompt_ids, sampling, self._eos_ids(), self.model.device)
        with torch.inference_mode():
            engine.add([row])
            while not row.finish_reason:
                engine.step()
                if row.finish_reason == "stop":
                    self.finish_reason = "stop"
                    return
                self.completion_tokens += 1
                yield row.new
        self.finish_reason = "length"

    def _penalize_generated(self, ids, scores):
        """A logits processor: the decode engine's frequency and presence penalties over the answer's tokens."""
        from ragrpo.generation.decode import penalize_generated

        generated = ids[0, self.prompt_tokens:].tolist()
        if generated:
            penalize_generated(scores[0], generated, self.frequency_penalty, self.presence_penalty)
        return scores

    def _forward_tokens(self):
        """The fallback for models the engine does not cover: transformers' forward with its cache, batch 1."""
        import torch
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.frequency_penalty or self.presence_penalty:
            processors.append(self._penalize_generated)
        sample = self.temperature > 0
        if sample:
            processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        generator = None
        if sample and self.seed is not None:
            generator = torch.Generator(self.model.device).manual_seed(self.seed)
        eos = self._eos_ids()
        ids = torch.tensor([self.prompt_ids], device=self.model.device)  # (1, prompt + generated so far)
        step_input, cache = ids, None
        with torch.no_grad():
            for step in range(self.max_new_tokens):
                out = self.model(input_ids=step_input, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                scores = processors(ids, out.logits[:, -1, :].float())  # (1, vocab)
                if step < self.min_new_tokens and eos:
                    scores[:, eos] = float("-inf")
                if sample:
                    token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)  # (1, 1)
                else:
                    token = scores.argmax(dim=-1, keepdim=True)  # (1, 1)
                if token.item() in eos:
                    self.finish_reason = "stop"
                    return
                ids = torch.cat([ids, token], dim=1)
                step_input = token
                self.completion_tokens += 1
                yield ids[0, len(self.prompt_ids):]
        self.finish_reason = "length"

    def _run(self):
        text = Detokenizer(self.tokenizer, self.stop)
        for new_ids in self._tokens():
            piece = text.feed(new_ids)
            self.text = text.text
            if piece:
                yield piece
            if text.stopped:
                self.finish_reason = "stop"
                return
        rest = text.flush()
        self.text = text.text
        if rest:
            yield rest


class Detokenizer:
    """A completion's text as its tokens arrive: `feed(all new ids so far)` returns the text that is ready to
    send. `stop` strings end the text without being part of it (`stopped` turns True); text that could be
    the start of a stop string, or a character split across tokens, is held back until it is known."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.text, self.emitted, self.stopped = "", "", False

    def feed(self, new_ids) -> str:
        if self.stopped:
            return ""
        full = self.tokenizer.decode(new_ids, skip_special_tokens=True).lstrip()
        if full.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = full[:cut], True
            return self.flush()
        self.text = full
        ready = len(full) - _held_back(full, self.stop)
        if ready <= len(self.emitted):
            return ""
        piece, self.emitted = full[len(self.emitted):ready], full[:ready]
        return piece

    def flush(self) -> str:
        """What is left to send once the completion has ended."""
        piece = self.text[len(self.emitted):] if len(self.text) > len(self.emitted) else ""
        self.emitted = self.text
        return piece


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may yet become one)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def answer_sources(hits: list[dict], column: str) -> list[dict]:
    """The retrieved rows without their text: what an answer cites."""
    return [{key: value for key, value in hit.items() if key != column} for hit in hits]


def stream_answer(model, tokenizer, query: str, hits: list[dict], column: str, *, history: list[dict] = (),
                  cite: bool = False, style: PassageStyle | None = None, **options) -> TextStream:
    """A `TextStream` answering `query` from `hits` with the write-up's prompt, after the chat `history`
    (earlier turns, if any); `options` are `TextStream`'s. The stream carries the sources and the passages
    (for `TextStream.drawn_from`)."""
    style = style or PassageStyle()
    passages = style.passages(hits, column)
    prompt = build_prompt(query, passages, cite=cite, label=style.label)
    conversation = [*history, {"role": "user", "content": prompt}]
    return TextStream(model, tokenizer, conversation, sources=answer_sources(hits, column), passages=passages,
                      question=query, **options)


def ask_stream(query: str, table: str, model: str | None, *, db: str | Path = DEFAULT_DB, where: str | None = None,
               k: int = 5, mode: str = "vector", rerank: str | None = None, cite: bool = False,
               header: str | None = None, storage_options: dict[str, str] | None = None, **options) -> TextStream:
    """`ask`, streamed: retrieval first (a bad table or filter fails before the model loads), then a
    `TextStream` of the answer with its sources."""
    from ragrpo.models import load_model

    handle = open_table(table, db, storage_options)
    style = table_style(handle, header)
    hits, column = retrieve(handle, query, where=where, k=k, mode=mode, rerank=rerank)
    lm, tokenizer = load_model(model)
    return stream_answer(lm, tokenizer, query, hits, column, cite=cite, style=style, **options)
