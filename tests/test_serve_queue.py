"""The server's queue in front of the model, without a model: one generation at a time in arrival
order, a client that leaves frees its place, and a full queue answers 503 before any work."""

import asyncio

import pytest

from ragrpo.serving.server import ApiError, Server, admit, generate_pieces


class FakeStream:
    """Stands in for rag.TextStream: yields its pieces, logging them, then sets finish_reason."""

    def __init__(self, name, pieces, log):
        self.name, self.log, self.finish_reason, self.closed = name, log, None, False
        self._pieces = iter(pieces)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            piece = next(self._pieces)
        except StopIteration:
            self.finish_reason = "stop"
            raise
        self.log.append(self.name)
        return piece

    def close(self):
        self.closed = True


class SlowStream(FakeStream):
    """A FakeStream whose every piece takes 5 ms, as a token would."""

    def __next__(self):
        import time

        time.sleep(0.005)
        return super().__next__()


def server(**settings) -> Server:
    return Server(model=None, tokenizer=None, table=None, text_column="text", model_id="m", **settings)


async def still_there():
    return False


async def collect(srv, stream, client_gone=still_there):
    return [piece async for piece in generate_pieces(srv, stream, client_gone)]


def test_one_generation_at_a_time_in_arrival_order():
    async def main():
        srv, log = server(), []
        streams = [FakeStream(name, ["a", "b", "c"], log) for name in "XYZ"]
        results = await asyncio.gather(*(collect(srv, s) for s in streams))
        return srv, log, results, streams

    srv, log, results, streams = asyncio.run(main())
    assert results == [["a", "b", "c"]] * 3
    assert log == ["X"] * 3 + ["Y"] * 3 + ["Z"] * 3  # no interleaving: each answer runs to its end
    assert (srv.running, srv.waiting, srv.served, srv.cancelled) == (0, 0, 3, 0)
    assert all(s.closed for s in streams)


def test_a_client_that_leaves_frees_its_place():
    async def main():
        srv, log = server(), []
        calls = 0

        async def gone_after_two_pieces():
            nonlocal calls
            calls += 1
            return calls > 2

        leaving = FakeStream("L", ["a"] * 100, log)
        pieces = await collect(srv, leaving, gone_after_two_pieces)
        after = await collect(srv, FakeStream("N", ["z"], log))
        return srv, pieces, after, leaving

    srv, pieces, after, leaving = asyncio.run(main())
    assert pieces == ["a", "a"] and leaving.closed and after == ["z"]
    assert (srv.running, srv.waiting, srv.served, srv.cancelled) == (0, 0, 1, 1)


def test_cancelled_while_waiting_leaves_the_queue():
    async def main():
        srv, log = server(), []
        first = asyncio.create_task(collect(srv, FakeStream("A", ["a"] * 50, log)))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(collect(srv, FakeStream("B", ["b"], log)))
        while srv.waiting == 0:
            await asyncio.sleep(0.001)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await first
        return srv, log

    srv, log = asyncio.run(main())
    assert "B" not in log and (srv.running, srv.waiting, srv.served) == (0, 0, 1)


def test_a_waiting_client_that_leaves_gives_its_place_back_before_its_turn():
    """Nothing cancels a non-streaming request whose client hangs up: the waiter itself must notice."""
    async def main():
        srv, log = server(), []
        first = asyncio.create_task(collect(srv, SlowStream("A", ["a"] * 200, log)))  # about 1 s
        await asyncio.sleep(0)
        left = False

        async def gone():
            return left

        waiting = asyncio.create_task(collect(srv, FakeStream("B", ["b"], log), gone))
        behind = asyncio.create_task(collect(srv, FakeStream("C", ["c"], log)))
        while srv.waiting < 2:
            await asyncio.sleep(0.001)
        left = True
        pieces = await asyncio.wait_for(waiting, 1)
        state = (srv.waiting, srv.cancelled, first.done())
        await first
        await behind
        return srv, log, pieces, state

    srv, log, pieces, state = asyncio.run(main())
    assert pieces == [] and state == (1, 1, False)  # it left the line while A was still generating
    assert "B" not in log and log[-1] == "C"  # and C, behind it, still got its turn
    assert (srv.running, srv.waiting, srv.served, srv.cancelled) == (0, 0, 2, 1)
    assert not srv.turn.locked()


def test_full_queue_is_refused_with_503():
    srv = server(max_waiting=2)
    admit(srv)
    srv.waiting = 2
    with pytest.raises(ApiError) as error:
        admit(srv)
    assert error.value.status == 503 and error.value.body()["error"]["code"] == "queue_full"


def test_searches_that_hang_past_their_deadline_do_not_hold_up_the_ones_after_them():
    """Seven hung calls (more than asyncio's default executor has workers on this machine) each time out
    at their deadline, and a quick call after them still answers at once."""
    import threading
    import time

    from ragrpo.serving.guards import within

    release = threading.Event()

    async def main():
        hung = await asyncio.gather(*(within(release.wait, 0.2) for _ in range(7)), return_exceptions=True)
        started = time.monotonic()
        quick = await within(lambda: "rows", 0.5)
        return hung, quick, time.monotonic() - started

    try:
        hung, quick, seconds = asyncio.run(main())
    finally:
        release.set()
    assert all(isinstance(h, TimeoutError) for h in hung)
    assert quick == "rows" and seconds < 0.2

    async def failing():
        return await within(lambda: 1 / 0, 1.0)

    with pytest.raises(ZeroDivisionError):  # an error in the call reaches the request, which answers 4xx
        asyncio.run(failing())


# ---- a batched row's pieces reach its reader --------------------------------------------------------


def _generation():
    from types import SimpleNamespace

    from ragrpo.generation.batching import Generation

    return Generation(row=SimpleNamespace(finish_reason=None, new=[], eos=[]),  # a row still running
                      detokenizer=SimpleNamespace(stopped=False, text=""))


async def _read(generation, gone=lambda: False, each=lambda piece: None):
    from ragrpo.serving.server import batched_pieces

    async def client_gone():
        return gone()

    pieces = []
    async for piece in batched_pieces(generation, client_gone):
        pieces.append(piece)
        each(piece)
    return pieces


def test_batched_pieces_read_what_was_queued_before_and_after_the_reader_started():
    import threading

    generation = _generation()
    generation.emit("queued before the reader ")  # no reader yet: nobody to wake, the queue keeps it

    def engine():
        for piece in ("a", "b", "c", None):
            generation.emit(piece)

    async def main():
        threading.Timer(0.05, engine).start()
        return await _read(generation)

    assert asyncio.run(main()) == ["queued before the reader ", "a", "b", "c"]
    assert generation.on_piece is None  # the reader unhooked itself


def test_each_piece_wakes_the_reader_rather_than_waiting_out_its_poll():
    """The engine thread emits a piece only once the reader has taken the previous one, so a missed
    wake-up would cost the reader's 0.2 s poll per piece: 40 pieces, 8 s. Woken, it takes milliseconds."""
    import threading
    import time

    generation, taken = _generation(), threading.Semaphore(0)

    def engine():
        for n in range(40):
            generation.emit(str(n))
            taken.acquire()
        generation.emit(None)

    async def main():
        threading.Thread(target=engine, daemon=True).start()
        return await _read(generation, each=lambda piece: taken.release())

    started = time.monotonic()
    assert asyncio.run(main()) == [str(n) for n in range(40)]
    assert time.monotonic() - started < 4.0  # half of what polling alone would take


def test_a_reader_whose_client_left_cancels_its_row():
    generation = _generation()
    generation.emit("a")  # read at once; the client is asked about once the queue runs dry
    assert asyncio.run(_read(generation, gone=lambda: True)) == ["a"]
    assert generation.cancelled
