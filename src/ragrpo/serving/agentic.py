"""Agentic chat in `ragrpo serve`: a request with `"agentic": true` gets no passages up front; the model
searches the server's table itself (`generation.agentic`, the loop `ask --agentic` and training use) and
answers from what it found.

The reply is OpenAI's chat completion with two fields beside `choices`: `searches` (each call's `query`,
the `passages` it showed as numbers into `sources`, and its `error` when it ran no search) and `sources`
(the rows the searches showed, in number order). Streamed, a chunk with an empty delta and a one-call
`searches` list is sent as each search is made, then the answer in one content chunk with the `sources`,
then the finish reason (with `drawn_from`, as in `server.py`) and `[DONE]`: the answer is not known until
the last search has been answered. `drawn_from` is the number of the source the answer's words come from.

Agentic requests take turns at the model with each other (one search loop at a time) and run beside the
batch of ordinary requests, which decodes on its own copy of the weights. The conversation's earlier
messages are not shown to the model: the loop's prompt is the question alone. A client that leaves stops its
loop at the next round (at most one more segment of sampling).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid

import anyio
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from ragrpo.serving.guards import ApiError, labelled, sse, take_turn


async def agentic_chat(server, body, request, question: str, max_tokens: int):
    """The chat endpoint's answer through the search loop; `server` is the app's `Server`."""
    from ragrpo.generation.agentic import SearchTool, public, search_and_answer
    from ragrpo.generation.rag import answer_sources
    from ragrpo.prompts import agentic_answer
    from ragrpo.rewards.citations import drawn_from

    tool = SearchTool(server.table, where=body.where, k=body.k or server.answering.k,
                      mode=body.mode or server.answering.mode, style=server.style)
    gone, events = threading.Event(), queue.Queue()

    def work():
        try:
            [row] = search_and_answer(server.model, server.tokenizer, [question], tool, max_searches=body.max_searches,
                                      max_new_tokens=max_tokens, temperature=body.temperature, seed=body.seed,
                                      on_search=lambda _, call: events.put(("search", public(call))),
                                      cancelled=gone.is_set)
            events.put(("done", row))
        except Exception as exc:  # the client gets one 500 line; the server goes on
            events.put(("error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__))

    async def relay():
        """(kind, value) events as the loop's thread makes them, in turn with other agentic requests."""
        if not await take_turn(server.turn, request.is_disconnected):
            server.cancelled += 1
            return
        thread = threading.Thread(target=work, daemon=True, name="ragrpo-agentic")
        server.running += 1
        try:
            thread.start()
            while True:
                try:
                    kind, value = await anyio.to_thread.run_sync(events.get, True, 0.2)
                except queue.Empty:
                    if await request.is_disconnected():
                        return
                    continue
                yield kind, value
                if kind != "search":
                    return
        finally:
            gone.set()  # a loop still running ends at its next round; the model is free once it has
            await anyio.to_thread.run_sync(thread.join)
            server.running -= 1
            server.turn.release()

    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_id}

    def finished(row) -> tuple[dict, list[dict], dict, int | None]:
        answer = agentic_answer(row.text(server.tokenizer))
        drawn = drawn_from(answer, tool.style.passages(row.hits, tool.column), question)
        usage = {"prompt_tokens": len(row.prompt_ids), "completion_tokens": row.written,
                 "total_tokens": len(row.prompt_ids) + row.written}
        if row.finish_reason in ("stop", "length"):
            server.served += 1
        return {"role": "assistant", "content": answer}, labelled(answer_sources(row.hits, tool.column)), usage, drawn

    def failure(message: str) -> ApiError:
        return ApiError(500, message, kind="server_error", code="generation_failed")

    if not body.stream:
        searches, row = [], None
        async for kind, value in relay():
            if kind == "error":
                raise failure(value)
            if kind == "search":
                searches.append(value)
            else:
                row = value
        if row is None:  # the client left; nobody reads this
            raise ApiError(499, "the client closed the request", code="client_closed")
        message, sources, usage, drawn = finished(row)
        return {**meta, "object": "chat.completion", "usage": usage, "sources": sources, "searches": searches,
                "drawn_from": drawn, "choices": [{"index": 0, "message": message, "finish_reason": row.finish_reason}]}

    chunk = {**meta, "object": "chat.completion.chunk"}

    def delta(content: dict, finish=None, **extra) -> dict:
        return {**chunk, "choices": [{"index": 0, "delta": content, "finish_reason": finish}], **extra}

    events_out = relay()

    async def stream():
        yield sse(delta({"role": "assistant", "content": ""}, searches=[]))
        async for kind, value in events_out:
            if kind == "error":
                yield sse(failure(value).body())
                return
            if kind == "search":
                yield sse(delta({}, searches=[value]))
                continue
            message, sources, usage, drawn = finished(value)
            yield sse(delta({"content": message["content"]}, sources=sources))
            yield sse(delta({}, value.finish_reason, drawn_from=drawn))
            if (body.stream_options or {}).get("include_usage"):
                yield sse({**chunk, "choices": [], "usage": usage})
            yield sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream", background=BackgroundTask(events_out.aclose),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
