"""Continuous batching for `serve`: every request is a row of one running `decode.Engine`.

One thread owns the engine. Between decode steps it takes waiting requests into free slots, prefills new
prompts up to a budget of `prefill_chunk` tokens (whole prompts while they fit, a longer one a chunk at a
time; with no row decoding, a prompt in one go), runs one step for all live rows, hands each row's new
text to its request, and frees the slots of rows that ended or whose client left. The budget bounds how
long an answer being streamed pauses for other requests' prefills. A decode step on a small model costs
about the same for 1 or 16 rows (it reads every weight once either way), so the aggregate throughput
grows with the number of clients until the matmuls stop being memory-bound.

Requests past the free slots wait in arrival order, at most `max_waiting` of them; `submit` refuses
beyond that (the server answers 503). A request's settings (temperature, top-p, repetition penalty,
seed, min/max tokens, stop strings) are its own row's.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from ragrpo import hardware
from ragrpo.generation.decode import Engine, Prefill, Row, Sampling


class QueueFull(Exception):
    pass


@dataclass
class Generation:
    """One request's answer as it is generated: `pieces` (a thread-safe queue of text pieces, None at the end),
    then `text`, `finish_reason` ('stop', 'length'; None if cancelled), `error` and the token counts.
    `on_piece`, when set, is called from the engine's thread after each piece is queued: the server wakes
    its event loop with it instead of parking a worker thread on the queue for every token."""

    row: Row
    detokenizer: object
    pieces: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    error: str | None = None
    on_cancel: object = None
    on_piece: object = None
    prefill_steps: int = 0  # decode steps the batch took from this request's admission to its joining

    @property
    def prompt_tokens(self) -> int:
        return len(self.row.prompt)

    @property
    def completion_tokens(self) -> int:
        eos = self.row.finish_reason == "stop" and self.row.new and self.row.new[-1] in self.row.eos
        return len(self.row.new) - int(bool(eos))

    @property
    def text(self) -> str:
        return self.detokenizer.text

    @property
    def finish_reason(self) -> str | None:
        if self.cancelled or self.error:
            return None
        return "stop" if self.detokenizer.stopped else self.row.finish_reason

    def cancel(self) -> None:
        """The client left: a waiting request leaves the queue now, a running row frees its slot at the next step."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel(self)

    def emit(self, piece: str | None) -> None:
        """Queue a piece of text (None: the end) and tell the reader."""
        self.pieces.put(piece)
        if self.on_piece is not None:
            self.on_piece()


class Batcher:
    """The engine's thread and its queue. `submit` a prompt's token ids; read the `Generation`'s pieces."""

    def __init__(self, model, projections, tokenizer, *, max_batch: int, max_waiting: int, capacity: int,
                 prefill_chunk: int = 1024):
        self.engine = Engine(model, projections, slots=max_batch, capacity=capacity)
        self.tokenizer, self.max_batch, self.max_waiting = tokenizer, max_batch, max_waiting
        self.prefill_chunk = prefill_chunk
        self.waiting: list[Generation] = []
        # admitted, prompt partly prefilled, in arrival order: (generation, its prefill, the batch's steps then)
        self.prefilling: list[tuple[Generation, Prefill, int]] = []
        self.live: dict[int, Generation] = {}  # id(row) -> generation
        self.served = self.cancelled = self.errors = self.steps = 0
        self.lock = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="ragrpo-batcher", daemon=True)
        self.thread.start()

    # ---- called from the server's threads ----
    def submit(self, prompt_ids: list[int], sampling: Sampling, eos: list[int], stop: list[str]) -> Generation:
        from ragrpo.generation.rag import Detokenizer

        generation = Generation(Row(prompt_ids, sampling, eos, self.engine.device), Detokenizer(self.tokenizer, stop),
                                on_cancel=self._withdraw)
        with self.lock:  # the check and the append are one step: the bound holds under concurrent requests
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"the server is busy ({len(self.waiting)} requests waiting); retry later")
            self.waiting.append(generation)
            self.lock.notify()
        return generation

    def _withdraw(self, generation: Generation) -> None:
        with self.lock:
            if generation in self.waiting:
                self.waiting.remove(generation)
            else:
                return
        self._finish(generation)

    def health(self) -> dict:
        with self.lock:
            return {"running": len(self.live) + len(self.prefilling), "waiting": len(self.waiting),
                    "max_batch": self.max_batch,
                    "served": self.served, "cancelled": self.cancelled, "errors": self.errors}

    def close(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.thread.join(timeout=10)

    # ---- the engine's thread ----
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                if not self.waiting and not self.live and not self.prefilling:
                    # idle: end this thread's OpenMP team, so that a thread computing meanwhile (an agentic
                    # request's loop) has the CPUs' only team (hardware.release_openmp)
                    hardware.release_openmp(others_may_compute=True)
                with self.lock:
                    while not self.stopped and not self.waiting and not self.live and not self.prefilling:
                        self.lock.wait()
                    if self.stopped:
                        break
                    free = self.max_batch - len(self.live) - len(self.prefilling)
                    joining, self.waiting = self.waiting[:free], self.waiting[free:]
                joining = [g for g in joining if not self._left(g)]
                self._admit(joining)
                self._drop_cancelled()
                self._prefill()
                if self.engine.rows:
                    self._step()
        for generation in [*self.live.values(), *(entry[0] for entry in self.prefilling), *self.waiting]:
            generation.error = "the server is shutting down"
            generation.emit(None)

    def _admit(self, joining: list[Generation]) -> None:
        for generation in joining:
            try:
                prefill = self.engine.begin(generation.row)
            except Exception as exc:  # a row the engine refuses ends with an error, the others go on
                self._finish(generation, error=str(exc))
                continue
            with self.lock:
                self.prefilling.append((generation, prefill, self.steps))

    def _prefill(self) -> None:
        """Prefill waiting prompts in arrival order, at most `prefill_chunk` tokens between two decode steps:
        whole prompts while they fit, and a prompt larger than that a chunk at a time; with no row decoding,
        the first prompt in one go."""
        budget = self.prefill_chunk
        while self.prefilling and budget > 0:
            generation, prefill, steps_before = self.prefilling[0]
            left = len(generation.row.prompt) - prefill.done
            if budget < min(left, self.prefill_chunk):
                return  # the next prompt would be cut short: it starts after the next step, in one go if it fits
            # a chunk boundary costs (824 tokens: 0.94 s in one go, 1.1 s in 2 chunks), so where no row waits on
            # it, a prompt goes in one go
            take = min(left, budget) if self.engine.rows else left
            try:
                joined = self.engine.advance(prefill, take)
            except Exception as exc:
                with self.lock:
                    self.prefilling.pop(0)
                self._finish(generation, error=str(exc))
                continue
            budget -= take
            if not joined:
                return
            generation.prefill_steps = self.steps - steps_before
            with self.lock:
                self.prefilling.pop(0)
                self.live[id(generation.row)] = generation

    def _drop_cancelled(self) -> None:
        for generation in list(self.live.values()):
            if generation.cancelled:
                self.engine.remove(generation.row)
                self._finish(generation)
        for entry in [entry for entry in self.prefilling if entry[0].cancelled]:
            with self.lock:
                self.prefilling.remove(entry)
            self._finish(entry[0])

    def _step(self) -> None:
        self.steps += 1
        try:
            ended = set(map(id, self.engine.step()))
        except Exception as exc:  # the step failed for every row: each ends with the error
            for generation in list(self.live.values()):
                self.engine.remove(generation.row)
                self._finish(generation, error=f"generation failed: {exc}")
            return
        for generation in list(self.live.values()):
            piece = generation.detokenizer.feed(generation.row.new)
            if piece:
                generation.emit(piece)
            if id(generation.row) in ended or generation.detokenizer.stopped:
                self.engine.remove(generation.row)
                self._finish(generation)

    def _left(self, generation: Generation) -> bool:
        if generation.cancelled:
            self._finish(generation)
        return generation.cancelled

    def _finish(self, generation: Generation, error: str | None = None) -> None:
        if error:
            generation.error = error
        else:
            rest = generation.detokenizer.flush()
            if rest and not generation.cancelled:
                generation.emit(rest)
        with self.lock:
            self.live.pop(id(generation.row), None)
            if generation.error:
                self.errors += 1
            elif generation.cancelled:
                self.cancelled += 1
            else:
                self.served += 1
        generation.emit(None)
