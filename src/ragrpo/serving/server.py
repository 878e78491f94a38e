"""An OpenAI-compatible RAG server over one LanceDB table and one model, and the web page at `/`.

    POST /v1/chat/completions   RAG on the last user message; `stream: true` sends server-sent events
                                ending with `data: [DONE]`. Extra body fields: `where` (SQL prefilter),
                                `k`, `mode`, `repetition_penalty`, `min_tokens`, and `agentic` (the model
                                searches for itself: `serving/agentic.py`). The answer's sources come
                                back as `sources` (in the first chunk when streaming), and the number of
                                the one its words are drawn from as `drawn_from` (in the finish chunk).
    GET  /v1/models             the one model served
    POST /v1/search             the rows retrieval would use, without generating
    GET  /healthz               liveness, plus the queue: generations running, waiting, served, cancelled

This module imports FastAPI at the top: only `ragrpo serve` imports it, so `ragrpo --help` stays instant.
The server is thin: retrieval is `rag.retrieve`, generation is `rag.stream_answer`'s token loop. The
model and the table are loaded once. One generation runs at a time (a small model on a few CPU cores
gains little from running two at once); the others wait their turn in arrival order, up to
`max_waiting`, after which a request gets 503 rather than an ever longer wait. Each token is computed
in a worker thread, so the event loop keeps serving `/healthz`, `/v1/search` and the page meanwhile.
Between tokens the server checks that the client is still there: one who hangs up (mid-stream or while
waiting) stops its generation at the next token and frees its place.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad body
(not UTF-8 JSON, a field of the wrong type, message list, sizes, `max_tokens` bounds, a malformed `where`,
an unknown `mode`, text holding a lone UTF-16 surrogate), 401 without the API key when one is set, 404
for another model's name, 413 for a body over `MAX_BODY_BYTES` (counted as it is read, so a chunked body
without Content-Length is held to it too), 503 when the queue is full.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragrpo import RagrpoError
from ragrpo.answer_settings import AnswerSettings
from ragrpo.prompts import PassageStyle
from ragrpo.serving.guards import ApiError, BodyLimit, Guard, take_turn, within
from ragrpo.serving.guards import labelled as _labelled
from ragrpo.serving.guards import sse as _sse
from ragrpo.serving.request_bodies import ChatRequest, RetrievalFields, SearchRequest

API_KEY_ENV = "RAGRPO_API_KEY"
MAX_BODY_BYTES = 256 * 1024

# --- The server's state -------------------------------------------------------------------------------


@dataclass
class Server:
    """What the endpoints share: the model, the table, and the queue in front of the model."""

    model: object
    tokenizer: object
    table: object
    text_column: str
    model_id: str
    api_key: str | None = None
    max_tokens: int = 512  # the largest `max_tokens` a request may ask for
    default_tokens: int = 128
    max_waiting: int = 64
    repetition_penalty: float = 1.0  # 1.2 taxed copying from the passages: bench/results/from-index/NOTES.md
    batcher: object = None  # `batching.Batcher` where the decode engine covers the model; else one at a time
    answering: AnswerSettings = field(default_factory=AnswerSettings)  # k, mode and cite unless a request says
    style: PassageStyle = field(default_factory=PassageStyle)  # how passages are headed in prompts
    retrieval_deadline: float = 10.0  # seconds a search (embedding included) may take before a 504
    inflight: int = 0  # admitted requests: searching, waiting or generating
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: waiters are served in arrival order
    running: int = 0
    waiting: int = 0
    served: int = 0
    cancelled: int = 0
    started: int = field(default_factory=lambda: int(time.time()))

    def cites(self, body) -> bool:
        return self.answering.cite if body.cite is None else body.cite

    def enter(self) -> None:
        """Admit a request (search or chat) or answer 503: at most `max_waiting` beyond what the model runs at
        once. The check and the count are one step of the event loop, so concurrent requests cannot pass it."""
        limit = self.max_waiting + (self.batcher.max_batch if self.batcher else 1)
        if self.inflight >= limit:
            raise ApiError(503, f"the server is busy ({self.inflight} requests in progress); retry later",
                           kind="server_error", code="queue_full")
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1

    def health(self) -> dict:
        queue = self.batcher.health() if self.batcher else {
            "running": self.running, "waiting": self.waiting, "max_batch": 1, "served": self.served,
            "cancelled": self.cancelled, "errors": 0}
        return {"status": "ok", "model": self.model_id, "table": self.table.name, "rows": self.table.count_rows(),
                **queue, "in_progress": self.inflight}


def _next_piece(stream):
    return next(stream, None)


def admit(server: Server) -> None:
    """503 when the queue is full (checked before any work, so a streamed reply never starts and fails)."""
    if server.waiting >= server.max_waiting:
        raise ApiError(503, f"the server is busy ({server.waiting} requests waiting); retry later",
                       kind="server_error", code="queue_full")


async def generate_pieces(server: Server, stream, client_gone):
    """The stream's text pieces, generated in turn with other requests; stops early when `client_gone()`,
    whether it is waiting for its turn or generating."""
    server.waiting += 1
    queued = True
    try:
        if not await take_turn(server.turn, client_gone):
            server.cancelled += 1
            stream.close()
            return
        server.waiting -= 1
        queued = False
        server.running += 1
        try:
            while True:
                if await client_gone():
                    return
                # One token per worker-thread call: the event loop stays responsive. A cancellation
                # waits for the token in progress (anyio's default, unlike asyncio.to_thread), so the
                # model never runs two requests at once and close() never meets a running loop.
                piece = await anyio.to_thread.run_sync(_next_piece, stream)
                if piece is None:
                    return
                yield piece
        finally:
            # Unfinished means the client left: seen here between tokens, or a cancellation from the
            # response (starlette cancels a streamed reply when the client disconnects).
            server.running -= 1
            if stream.finish_reason is None:
                server.cancelled += 1
            else:
                server.served += 1
            stream.close()
            server.turn.release()
    finally:
        if queued:
            server.waiting -= 1


async def batched_pieces(generation, client_gone):
    """A batched generation's text pieces as the engine's thread produces them; the row is cancelled (its slot
    freed at the next step) when the client leaves or the reader stops early.

    The engine's thread wakes this coroutine through the event loop (`call_soon_threadsafe`) after each piece,
    rather than a worker thread waiting on the queue per token: on 2 cores, 16 clients' thread hops a step
    competed with torch's own threads. The event is cleared before the queue is read, so a piece queued
    in between sets it again and is not missed."""
    import asyncio
    import queue as queues

    loop, ready = asyncio.get_running_loop(), asyncio.Event()

    def wake():  # on the engine's thread
        try:
            loop.call_soon_threadsafe(ready.set)
        except RuntimeError:  # the loop closed (the server stopped): nobody is reading
            pass

    generation.on_piece = wake
    checked = time.monotonic()
    try:
        while True:
            ready.clear()
            try:
                piece = generation.pieces.get_nowait()
            except queues.Empty:
                try:
                    await asyncio.wait_for(ready.wait(), timeout=0.2)
                    continue  # woken: a piece is queued; the client is asked only on a quiet 0.2 s
                except TimeoutError:
                    piece = queues.Empty
            if time.monotonic() - checked > 0.2 or piece is queues.Empty:  # pieces may come faster than that
                checked = time.monotonic()
                if await client_gone():
                    return
            if piece is queues.Empty:
                continue
            if piece is None:
                return
            yield piece
    finally:
        generation.on_piece = None
        if generation.finish_reason is None and generation.error is None:
            generation.cancel()


def _sources(stream) -> list[dict]:
    return _labelled(stream.sources)


def create_app(server: Server):
    """The FastAPI app over a loaded `Server`."""
    from ragrpo.generation.rag import retrieve, stream_answer

    app = FastAPI(title="ragrpo", docs_url=None, redoc_url=None)
    page = resources.files("ragrpo.serving").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        # FastAPI's own errors (a body it could not parse: not UTF-8, nested too deep; an unknown path) in
        # the same OpenAI shape as ours.
        message = str(exc.detail)
        if message == "There was an error parsing the body":
            message = "the request body could not be parsed as JSON (is it UTF-8?)"
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(ApiError(400, "the request body is not valid JSON").body(), status_code=400)
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        message = f"{where}: {message}" if where else f"the request body must be a JSON object ({message})"
        return JSONResponse(ApiError(400, message, param=where or None).body(), status_code=400)

    app.add_middleware(Guard, api_key=server.api_key)

    async def find(query: str, fields: RetrievalFields):
        search = partial(retrieve, server.table, query, where=fields.where, k=fields.k or server.answering.k,
                         mode=fields.mode or server.answering.mode)
        try:
            return await within(search, server.retrieval_deadline)
        except TimeoutError:
            raise ApiError(504, f"retrieval took longer than {server.retrieval_deadline:g} s; try a simpler where "
                           "or fewer passages", kind="server_error", code="retrieval_timeout") from None
        except RagrpoError as exc:
            param = "where" if "where" in str(exc) else "mode" if "mode" in str(exc) else None
            raise ApiError(400, str(exc), param=param) from None

    @app.get("/", response_class=HTMLResponse)
    async def index_page():
        return page

    @app.get("/healthz")
    async def healthz():
        return server.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.started,
                                            "owned_by": "ragrpo"}]}

    @app.post("/v1/search")
    async def search(body: SearchRequest):
        server.enter()
        try:
            hits, column = await find(body.query, body)
        finally:
            server.leave()
        return {"object": "list", "text_column": column, "data": hits}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        server.enter()  # held until the answer is sent, or the client has left
        try:
            response = await answer(body, request)
        except BaseException:
            server.leave()
            raise
        if not isinstance(response, StreamingResponse):
            server.leave()
            return response
        inner = response.background

        async def sent():  # starlette runs it when the stream ends, also after a disconnect
            try:
                if inner is not None:
                    await inner()
            finally:
                server.leave()

        response.background = BackgroundTask(sent)
        return response

    async def answer(body: ChatRequest, request: Request):
        if body.model and body.model != server.model_id:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {server.model_id!r}",
                           param="model", code="model_not_found")
        admit(server)
        max_tokens = body.max_completion_tokens or body.max_tokens or min(server.default_tokens, server.max_tokens)
        if max_tokens > server.max_tokens:
            raise ApiError(400, f"max_tokens: at most {server.max_tokens}, got {max_tokens}", param="max_tokens")
        question = body.messages[-1].text()
        hits, column = await find(question, body)  # with `agentic` too: a bad filter or mode is a 400 up front
        if body.agentic:
            from ragrpo.serving.agentic import agentic_chat

            return await agentic_chat(server, body, request, question, max_tokens)
        history = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                   for m in body.messages[:-1]]
        penalty = body.repetition_penalty or server.repetition_penalty
        if server.batcher is not None:
            return await batched_chat(server, body, request, question, hits, column, history, max_tokens, penalty)
        try:
            stream = stream_answer(server.model, server.tokenizer, question, hits, column, history=history,
                                   cite=server.cites(body), style=server.style, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                   repetition_penalty=penalty, frequency_penalty=body.frequency_penalty,
                                   presence_penalty=body.presence_penalty, stop=body.stop or [], seed=body.seed,
                                   min_new_tokens=min(body.min_tokens, max_tokens))
        except RagrpoError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_id}

        def usage():
            return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
                    "total_tokens": stream.prompt_tokens + stream.completion_tokens}

        if not body.stream:
            async for _ in generate_pieces(server, stream, request.is_disconnected):
                pass
            choice = {"index": 0, "message": {"role": "assistant", "content": stream.text},
                      "finish_reason": stream.finish_reason}
            return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage(),
                    "sources": _sources(stream), "drawn_from": stream.drawn_from()}

        pieces = generate_pieces(server, stream, request.is_disconnected)
        return _event_stream(meta, body, _sources(stream), pieces, lambda: stream.finish_reason, lambda: None, usage,
                             stream.drawn_from)

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)  # added last: outermost, before the API key check
    return app


async def batched_chat(server: Server, body: ChatRequest, request: Request, question, hits, column, history,
                       max_tokens: int, penalty: float):
    """The chat endpoint's answer as one row of the running batch (`batching.Batcher`)."""
    from ragrpo.generation.batching import QueueFull
    from ragrpo.generation.decode import Sampling, eos_ids
    from ragrpo.generation.rag import answer_sources
    from ragrpo.prompts import build_prompt
    from ragrpo.rewards.citations import drawn_from

    tokenizer, batcher, style = server.tokenizer, server.batcher, server.style
    passages = style.passages(hits, column)
    prompt = build_prompt(question, passages, cite=server.cites(body), label=style.label)
    conversation = [*history, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + max_tokens > batcher.engine.capacity:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; with {max_tokens} new tokens it exceeds the "
                       f"server's {batcher.engine.capacity}: ask for fewer tokens or passages", param="messages")
    sampling = Sampling(max_new_tokens=max_tokens, min_new_tokens=min(body.min_tokens, max_tokens),
                        do_sample=body.temperature > 0, temperature=body.temperature or 1.0, top_p=body.top_p,
                        repetition_penalty=penalty, frequency_penalty=body.frequency_penalty,
                        presence_penalty=body.presence_penalty, seed=body.seed)
    eos = eos_ids(server.model, tokenizer)
    try:
        generation = batcher.submit(prompt_ids, sampling, eos, body.stop or [])
    except QueueFull as exc:
        raise ApiError(503, str(exc), kind="server_error", code="queue_full") from None
    sources = _labelled(answer_sources(hits, column))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_id}

    def usage():
        return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                "total_tokens": generation.prompt_tokens + generation.completion_tokens}

    def failed():
        return ApiError(500, generation.error, kind="server_error", code="generation_failed")

    def drawn():
        return drawn_from(generation.text, passages, question)

    pieces = batched_pieces(generation, request.is_disconnected)
    if not body.stream:
        async for _ in pieces:
            pass
        if generation.error:
            raise failed()
        choice = {"index": 0, "message": {"role": "assistant", "content": generation.text},
                  "finish_reason": generation.finish_reason}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage(), "sources": sources,
                "drawn_from": drawn()}
    return _event_stream(meta, body, sources, pieces, lambda: generation.finish_reason,
                         lambda: failed().body() if generation.error else None, usage, drawn)


def _event_stream(meta: dict, body: ChatRequest, sources: list[dict], pieces, finish_reason, error, usage, drawn):
    """The streamed reply, as server-sent events: the role chunk with the sources, one chunk per piece, then
    the finish reason with `drawn_from` (the source the answer's words come from, known only now) or the error,
    the usage if asked for, and [DONE]. Nothing follows a client that left."""
    chunk = {**meta, "object": "chat.completion.chunk"}

    def delta(content: dict, finish=None) -> dict:
        return {**chunk, "choices": [{"index": 0, "delta": content, "finish_reason": finish}]}

    async def events():
        yield _sse({**delta({"role": "assistant", "content": ""}), "sources": sources})
        async for piece in pieces:
            yield _sse(delta({"content": piece}))
        if (failure := error()) is not None:
            yield _sse(failure)
            return
        if finish_reason() is None:  # the client left; nobody reads what would follow
            return
        yield _sse({**delta({}, finish_reason()), "drawn_from": drawn()})
        if (body.stream_options or {}).get("include_usage"):
            yield _sse({**chunk, "choices": [], "usage": usage()})
        yield _sse("[DONE]")

    # A client that hangs up cancels the response task, possibly while `events` waits at a yield;
    # the background task (which starlette runs after a disconnect too) closes the pieces either way.
    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(pieces.aclose),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def default_max_batch() -> int:
    """Rows per decode step: a step reads every weight once, so on a CPU 8 rows a core cost little more than
    one (bench/serve.py); a GPU takes more."""
    import os

    from ragrpo import hardware

    return 64 if hardware.device() == "cuda" else min(64, 8 * (os.cpu_count() or 1))


def make_batcher(model, tokenizer, *, max_batch: int, max_waiting: int, max_tokens: int,
                 prefill_chunk: int = 1024):
    """A `Batcher` over a sampling copy of `model` (bf16 where it pays; weights packed as
    `hardware.decode_weights` says: fp16 for fbgemm or oneDNN's layout), or
    None where the decode engine does not cover the model's family."""
    import torch

    from ragrpo import hardware
    from ragrpo.generation.batching import Batcher
    from ragrpo.generation.engine import SamplingCopy, _projections, loop_family

    if not loop_family(model.config):
        return None
    copy = SamplingCopy(model, dtype=torch.bfloat16 if hardware.bf16() else torch.float32)
    copy.sync()
    projections = copy.packed or _projections(copy.model, copy.fused, "plain")
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    capacity = min(context, 1536 + max_tokens)  # prompts of up to ~1.5k tokens (k=5 passages is about 1.1k)
    return Batcher(copy.model, projections, tokenizer, max_batch=max_batch, max_waiting=max_waiting,
                   capacity=capacity, prefill_chunk=prefill_chunk)


def model_id_for(model: str | None) -> str:
    """The name clients send as `model`: the model folder's name ('merged' gets its run's name in front)."""
    from ragrpo.models import resolve_model

    path = Path(resolve_model(model))
    return f"{path.parent.name}/{path.name}" if path.name == "merged" and path.parent.name else path.name


def load_server(table: str, model: str | None, *, db: str | Path = "lancedb", threads: int | None = None,
                max_batch: int | None = None, prefill_chunk: int = 1024, storage_options: dict[str, str] | None = None,
                **settings) -> Server:
    """Open the table and load the model once; `settings` are `Server`'s fields. `threads` sets torch's
    intra-op threads once (on a shared CPU, 1 thread can be several times faster than spinning on 2).
    `max_batch` rows decode together (`default_max_batch()` if None; 1 serves one request at a time); a new
    prompt is prefilled `prefill_chunk` tokens at a time while other rows decode (`batching.Batcher`)."""
    from ragrpo import hardware
    from ragrpo.answer_settings import saved_settings
    from ragrpo.models import load_model
    from ragrpo.prompts import table_style
    from ragrpo.retrieval.index import open_table
    from ragrpo.retrieval.search import text_column

    lance_table = open_table(table, db, storage_options)
    column = text_column(lance_table)
    answering = saved_settings(model) or AnswerSettings()
    style = table_style(lance_table, answering.header)
    hardware.set_threads(threads)
    lm, tokenizer = load_model(model)
    server = Server(lm, tokenizer, lance_table, column, model_id_for(model), answering=answering, style=style,
                    **settings)
    max_batch = default_max_batch() if max_batch is None else max_batch
    if max_batch > 1:
        server.batcher = make_batcher(lm, tokenizer, max_batch=max_batch, max_waiting=server.max_waiting,
                                      max_tokens=server.max_tokens, prefill_chunk=prefill_chunk)
    hardware.release_openmp()  # this thread is done with torch: the engine's thread decodes with the CPUs' workers
    return server


def _check_port(host: str, port: int) -> None:
    """Fail before loading anything when the address cannot be bound."""
    import socket

    if not 0 <= port <= 65535:
        raise RagrpoError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as exc:
        raise RagrpoError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host") \
            from None


def serve(table: str, model: str | None, *, db: str | Path = "lancedb", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "info", echo=None, **settings) -> None:
    """Load the model and the table, then serve until interrupted; `echo` gets one line once loaded."""
    import uvicorn

    _check_port(host, port)
    if settings.get("threads") is not None and settings["threads"] < 1:
        raise RagrpoError(f"--threads must be at least 1, got {settings['threads']}")
    if settings.get("max_batch") is not None and settings["max_batch"] < 1:
        raise RagrpoError(f"--max-batch must be at least 1, got {settings['max_batch']}")
    if settings.get("prefill_chunk", 1) < 1:
        raise RagrpoError(f"--prefill-chunk must be at least 1 token, got {settings['prefill_chunk']}")
    if api_key is not None and not api_key.strip():
        raise RagrpoError("the API key is empty; pass a non-empty --api-key or unset the variable")
    server = load_server(table, model, db=db, api_key=api_key, **settings)
    if echo:
        echo(f"serving {server.model_id} over table {table!r} ({server.table.count_rows()} rows) at "
             f"http://{host}:{port}/" + (" (API key required)" if api_key else ""))
    try:
        # open streams get 3 s to finish on SIGTERM, then the server stops anyway
        uvicorn.run(create_app(server), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)
    finally:
        if server.batcher is not None:
            server.batcher.close()
