"""Bad input and faults (issue 22), through the real command line: each case is one `Error:` line with exit
code 2 (or a repair that says what it did), and the run folder or table is left as it should be.

Checks that must fire before any model loads are run with `--model` naming a folder that does not
exist: had the model been loaded first, the error would be about the model instead."""

import json
import os
import subprocess
import sys

import pytest

MISSING_MODEL = "/nonexistent/ragrpo-test-model"


def ragrpo(*args, code: str | None = None):
    """Run `ragrpo ARGS` in a subprocess; `code` runs first, in the same process (to simulate a fault)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = ["-c", f"{code}\nfrom ragrpo.cli import main\nmain()"] if code else ["-m", "ragrpo.cli"]
    return subprocess.run([sys.executable, *start, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def one_error_line(result, *fragments) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder) -> dict:
    """relative path -> bytes of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- train: the run folder ----------------------------------------------------------------------------

TINY_TOML = """
max_samples = 4
[grpo]
max_steps = 1
num_generations = 2
per_device_train_batch_size = 2
max_completion_length = 8
save_strategy = "no"
"""


@pytest.fixture()
def tiny_model(tmp_path, tiny_model_dir):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    return tiny_model_dir


def finished_run(folder):
    """A stand-in for a finished run folder: what must survive a failed --overwrite byte for byte."""
    (folder / "merged").mkdir(parents=True)
    (folder / "merged" / "config.json").write_text('{"old": true}')
    (folder / "config.json").write_text(json.dumps({"run": {"model": MISSING_MODEL}}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    return snapshot(folder)


def test_failed_overwrite_leaves_the_old_run_intact(tmp_path, tiny_model):
    run = tmp_path / "runs" / "demo"
    before = finished_run(run)
    reward = tmp_path / "bad_reward.py"
    reward.write_text("def shaky(completions, **kw):\n    return [float('nan')] * len(completions)\n")

    result = ragrpo("train", "--model", tiny_model, "--config", tmp_path / "tiny.toml", "--reward",
                    f"{reward}:shaky", "--overwrite", "--output", run)

    one_error_line(result, "reward 'shaky' returned nan")
    assert snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["demo"]  # the staging folder is gone


def test_overwrite_trains_beside_the_old_run_and_swaps_it_in(tmp_path, tiny_model):
    run = tmp_path / "runs" / "demo"
    finished_run(run)
    # The reward runs mid-training: the old run must still be in place then.
    reward = tmp_path / "watch.py"
    reward.write_text("from pathlib import Path\n\n"
                      "def old_run_present(completions, **kw):\n"
                      f"    if not Path({str(run / 'metrics.jsonl')!r}).exists():\n"
                      "        raise RuntimeError('the old run was deleted before the new one finished')\n"
                      "    return [0.0] * len(completions)\n")

    result = ragrpo("train", "--model", tiny_model, "--config", tmp_path / "tiny.toml", "--reward",
                    f"{reward}:old_run_present", "--overwrite", "--output", run)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 1 steps" in result.stdout
    assert json.loads((run / "merged" / "config.json").read_text()) != {"old": True}
    assert (run / "adapter" / "adapter_config.json").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "rewards/old_run_present/mean" in r] == [1]  # the new run's log only
    assert ".staging-" not in (run / "config.json").read_text()
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["output"] == str(run) and config["grpo"]["output_dir"] == str(run / "checkpoints")
    assert sorted(p.name for p in run.parent.iterdir()) == ["demo"]  # no staging or replaced folder left


def test_resume_with_overwrite_is_refused_and_keeps_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    before = finished_run(run)

    one_error_line(ragrpo("train", "--output", run, "--resume", "--overwrite"), "--resume", "--overwrite")
    assert snapshot(run) == before


@pytest.mark.parametrize("output", ["notes.txt", "notes.txt/run"])
@pytest.mark.parametrize("from_index", [False, True])
def test_output_that_is_a_file(tmp_path, output, from_index):
    (tmp_path / "notes.txt").write_text("not a run")
    extra = ["--from-index", "movies", "--db", tmp_path / "db"] if from_index else []
    result = ragrpo("train", "--model", MISSING_MODEL, "--output", tmp_path / output, *extra)
    one_error_line(result, f"--output {tmp_path / output}", "is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "not a run"
    assert not (tmp_path / "db").exists()


# -- train: settings, checked before any model loads ----------------------------------------------------

@pytest.mark.parametrize("flag,value", [
    ("--max-steps", 0),  # trained 1 step and exited 0
    ("--max-steps", -5),  # trained 3 epochs (transformers reads max_steps <= 0 as "use num_train_epochs")
    ("--save-steps", 0),
    ("--num-generations", 0),  # ZeroDivisionError inside TRL's GRPOConfig
])
def test_non_positive_counts(tmp_path, flag, value):
    result = ragrpo("train", "--model", MISSING_MODEL, flag, value, "--output", tmp_path / "run")
    one_error_line(result, f"{flag} must be at least 1, got {value}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("toml,message", [
    ('seed = "abc"\n', "seed = 'abc': expected an integer"),
    ('rewards = "length"\n', "rewards = 'length': expected a list of strings"),
    ('[grpo]\ntemperature = "hot"\n', "[grpo] temperature = 'hot': expected a number (a field of trl.GRPOConfig)"),
    ("[grpo]\nbf16 = 1\n", "[grpo] bf16 = 1: expected true or false"),
    ("[grpo]\nmax_steps = 0\n", "[grpo] max_steps must be at least 1, got 0"),
    ('[lora]\nr = "big"\n', "[lora] r = 'big': expected an integer (a field of peft.LoraConfig)"),
    ('[lora]\nbias = "some"\n', "[lora] bias = 'some': expected one of 'none', 'all', 'lora_only'"),
])
def test_config_values_of_the_wrong_type(tmp_path, toml, message):
    (tmp_path / "run.toml").write_text(toml)
    result = ragrpo("train", "--model", MISSING_MODEL, "--config", tmp_path / "run.toml", "--output", tmp_path / "run")
    one_error_line(result, f"config file {tmp_path / 'run.toml'}: {message}")
    assert not (tmp_path / "run").exists()


# -- filters and the index ------------------------------------------------------------------------------

NOTES = [
    ("bees", "An old beekeeper helps a sergeant catch a poisoner; he poisoned the honey himself.", 1985),
    ("glass", "A girl finishes her father's chandelier in Venice; her hidden signature is found.", 1995),
    ("ceres", "The commander of an asteroid mine learns that she sabotaged the airlocks herself.", 2001),
]


def write_notes(path):
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["title", "text", "release_year"])
        writer.writerows(NOTES)
    return path


@pytest.fixture(scope="module")
def notes_db(tmp_path_factory):
    from ragrpo.retrieval.index import index

    folder = tmp_path_factory.mktemp("notes")
    index(str(write_notes(folder / "notes.csv")), "notes", folder / "db")
    return folder / "db"


NOT_ONE_FILTER = {
    "release_year < 1990; DROP TABLE notes": "';' ends the filter",
    "release_year < 1990 LIMIT 1": "LIMIT is not part of a filter",
    "release_year < 1990 ORDER BY title": "ORDER BY is not part of a filter",
    "release_year < 1990 GROUP BY title": "GROUP BY",
    "release_year < 1990 -- AND title = 'x'": "SQL comments",
}


def test_where_that_is_more_than_one_filter(notes_db):
    # Each of these exited 0 before, searching with only the part before the ';' or the keyword.
    for where, why in NOT_ONE_FILTER.items():
        result = ragrpo("search", "honey", "--table", "notes", "--db", notes_db, "--where", where)
        one_error_line(result, f"invalid --where {where!r}", why)
    # The same characters inside a string literal are part of one filter, and it runs.
    result = ragrpo("search", "honey", "--table", "notes", "--db", notes_db, "--json",
                    "--where", "title != 'x; LIMIT 1 -- ORDER BY' AND release_year < 1990")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line)["title"] for line in result.stdout.splitlines()] == ["bees"]


def test_train_from_index_refuses_a_where_with_two_statements(notes_db, tmp_path):
    result = ragrpo("train", "--model", MISSING_MODEL, "--from-index", "notes", "--db", notes_db,
                    "--where", "release_year < 1990; DELETE FROM notes", "--output", tmp_path / "run")
    one_error_line(result, "invalid --where", "';' ends the filter")
    assert not (tmp_path / "run").exists()


def test_rerun_repairs_a_table_left_without_its_full_text_index(tmp_path):
    import lancedb

    source, db = write_notes(tmp_path / "notes.csv"), tmp_path / "db"
    args = ["index", source, "--table", "notes", "--db", db]
    # Killed right after the table's commit, before its indexes were built.
    killed = ragrpo(*args, code="import os, ragrpo.retrieval.index\n"
                                "ragrpo.retrieval.index.build_indexes = lambda *a, **k: os._exit(9)")
    assert killed.returncode == 9, killed.stderr[-3000:]
    table = lancedb.connect(db).open_table("notes")
    assert table.count_rows() == 3 and table.list_indices() == []
    one_error_line(ragrpo("search", "honey", "--table", "notes", "--db", db, "--mode", "fts"),
                   "needs a full-text index")

    repaired = ragrpo(*args)  # refused before ("already exists; pass --overwrite")

    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert "built: text_idx" in repaired.stdout and "No rows were written" in repaired.stdout
    table = lancedb.connect(db).open_table("notes")
    assert table.count_rows() == 3 and [ix.name for ix in table.list_indices()] == ["text_idx"]
    found = ragrpo("search", "honey poisoner", "--table", "notes", "--db", db, "--mode", "fts", "--json")
    assert found.returncode == 0 and json.loads(found.stdout.splitlines()[0])["title"] == "bees"
    # Now complete: a plain re-run is refused again, and changes nothing.
    one_error_line(ragrpo(*args), "already exists", "--overwrite")
    assert lancedb.connect(db).open_table("notes").count_rows() == 3


# -- the server: request limits and validation ------------------------------------------------------------

@pytest.fixture(scope="module")
def notes_server(notes_db, base_model_dir, tmp_path_factory):
    """`ragrpo serve` over the notes table with a tiny 2-layer model (requests here fail before it runs)."""
    process, url = start_server(notes_db, base_model_dir, tmp_path_factory.mktemp("serve") / "tiny-model",
                                "--max-tokens", "8")
    yield url
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def post(url, path, raw: bytes, timeout: float = 60):
    """(status, parsed JSON) for a POST of the bytes `raw` with Content-Length."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + path, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def post_chunked(url, path, chunks):
    """(status, parsed JSON) for a POST whose body is sent chunked, without Content-Length; stops sending once
    the server has answered (it need not read a body it refuses)."""
    import http.client
    import select
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for chunk in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if select.select([sock], [], [], 0)[0]:
                    break
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed the connection first
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def health(url) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as response:
        return json.load(response)


def test_chunked_body_over_the_limit_gets_413(notes_server):
    # 20 MB in 64 KiB chunks, no Content-Length: the old check never saw a size (and read it all, then 400).
    status, body = post_chunked(notes_server, "/v1/chat/completions", (b" " * 65536 for _ in range(320)))
    assert status == 413 and body["error"]["message"] == "the request body is over 262144 bytes"
    # A chunked body under the limit is read whole and answered as usual.
    question = json.dumps({"messages": [{"role": "user", "content": "honey?"}], "max_tokens": 1000}).encode()
    status, body = post_chunked(notes_server, "/v1/chat/completions", [question[:10], question[10:]])
    assert status == 400 and body["error"]["message"] == "max_tokens: at most 8, got 1000"
    assert health(notes_server)["running"] == 0


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "honey \ud800 bees"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "honey"}], "stop": ["\udc00"]}, "stop"),
    ("/v1/search", {"query": "honey \udfff"}, "query"),
    ("/v1/search", {"query": "honey", "where": "title = '\ud800'"}, "where"),
])
def test_lone_surrogates_are_refused_before_retrieval(notes_server, path, body, param):
    # Before, such text reached the embedder, and LanceDB retried the failed query embedding for minutes.
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the escape "\ud800", valid JSON
    status, answer = post(notes_server, path, raw, timeout=30)
    assert status == 400, answer
    assert answer["error"]["param"] == param and "lone UTF-16 surrogate" in answer["error"]["message"]
    assert health(notes_server)["running"] == 0


@pytest.mark.parametrize("raw,message", [
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
     "messages.0.content: part 0 is a text part without a string 'text'"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}),
     "messages.0.content: part 0 is a text part without a string 'text'"),
    (json.dumps({"messages": [{"role": "user", "content": "honey"}], "seed": 10**30, "temperature": 1}),
     "seed: Input should be less than or equal to 9223372036854775807"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe honey"}]}', "could not be parsed as JSON (is it UTF-8?)"),
])
def test_fields_of_the_wrong_type_get_400_with_a_message(notes_server, raw, message):
    status, answer = post(notes_server, "/v1/chat/completions", raw if isinstance(raw, bytes) else raw.encode())
    assert status == 400, answer
    assert message in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"
    assert health(notes_server)["running"] == 0


def start_server(db, base_model_dir, folder, *flags):
    """`ragrpo serve` over the notes table with a tiny 2-layer model of an 8k context; (process, url)."""
    import socket
    import time
    import urllib.request

    from conftest import tiny_llama

    if not (folder / "config.json").exists():
        model, tokenizer = tiny_llama(base_model_dir, max_position_embeddings=8192)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "ragrpo.cli", "serve", "--table", "notes", "--db", db,
                                "--model", folder, "--port", str(port), *flags],
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=5)
            return process, url
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)


LONG = {"messages": [{"role": "user", "content": "Tell me about the notes."}], "k": 1, "max_tokens": 4000,
        "min_tokens": 4000}


def open_request(url, body: dict):
    """Send a chat request on a raw socket and return the socket (to hang up on it later)."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url)
    raw = json.dumps(body).encode()
    sock = socket.create_connection((address.hostname, address.port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    return sock


def wait_for(condition, url, seconds: float) -> dict:
    import time

    deadline = time.monotonic() + seconds
    while not condition(state := health(url)):
        assert time.monotonic() < deadline, f"not within {seconds} s: {state}"
        time.sleep(0.05)
    return state


def test_one_bounded_admission_for_search_and_chat_and_a_waiting_client_leaves_at_once(notes_db, base_model_dir,
                                                                                       tmp_path):
    """Two batch slots and one waiting place: a fourth request, search included, gets 503; a waiting client that
    hangs up (not streaming) gives its place back at once; SIGTERM stops the server within seconds, mid-answer."""
    import time

    process, url = start_server(notes_db, base_model_dir, tmp_path / "tiny-8k", "--max-batch", "2",
                                "--max-waiting", "1", "--max-tokens", "4000")
    try:
        running = [open_request(url, LONG) for _ in range(2)]
        wait_for(lambda s: s["running"] == 2, url, 30)
        waiting = open_request(url, LONG)
        wait_for(lambda s: s["waiting"] == 1, url, 30)
        status, body = post(url, "/v1/search", json.dumps({"query": "notes", "k": 1}).encode())
        assert status == 503 and "busy" in body["error"]["message"]
        status, body = post(url, "/v1/chat/completions", json.dumps(LONG).encode())
        assert status == 503 and body["error"]["code"] == "queue_full"
        waiting.close()  # it never ran: its place in the queue is freed, not kept until a slot frees
        state = wait_for(lambda s: s["waiting"] == 0 and s["in_progress"] == 2 and s["cancelled"] == 1, url, 2)
        assert state["running"] == 2 and state["served"] == 0 and state["errors"] == 0
        assert post(url, "/v1/search", json.dumps({"query": "notes", "k": 1}).encode())[0] == 200
        started = time.monotonic()
        process.terminate()  # two generations of 4000 tokens are still running
        process.wait(timeout=15)
        assert time.monotonic() - started < 10
        for sock in running:
            sock.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_one_at_a_time_a_waiting_client_that_hangs_up_leaves_before_its_turn(notes_db, base_model_dir, tmp_path):
    """`--max-batch 1` serves through the one-at-a-time queue, where a non-streaming waiter has no watcher but
    itself: before, its place was given back only when its turn came."""
    process, url = start_server(notes_db, base_model_dir, tmp_path / "tiny-8k", "--max-batch", "1",
                                "--max-waiting", "2", "--max-tokens", "4000")
    try:
        running = open_request(url, LONG)
        wait_for(lambda s: s["running"] == 1, url, 30)
        waiting = open_request(url, LONG)
        wait_for(lambda s: s["waiting"] == 1, url, 30)
        waiting.close()
        state = wait_for(lambda s: s["waiting"] == 0 and s["cancelled"] == 1, url, 2)
        assert state["running"] == 1 and state["served"] == 0 and state["max_batch"] == 1
        running.close()
        # seen between tokens, and the first token follows the long prompt's prefill: 5 s was too short for it on
        # a CPU shared with another job (session 22)
        wait_for(lambda s: s["running"] == 0 and s["cancelled"] == 2 and s["in_progress"] == 0, url, 30)
    finally:
        process.kill()
        process.wait()


def test_a_search_past_its_deadline_gets_504_in_seconds(notes_db, base_model_dir, tmp_path):
    import time

    process, url = start_server(notes_db, base_model_dir, tmp_path / "tiny-8k", "--retrieval-deadline", "0.001")
    try:
        started = time.monotonic()
        status, body = post(url, "/v1/search", json.dumps({"query": "notes", "k": 1}).encode())
        assert status == 504 and "retrieval took longer than 0.001 s" in body["error"]["message"]
        assert time.monotonic() - started < 5
        assert health(url)["in_progress"] == 0  # its admission was given back
    finally:
        process.terminate()
        process.wait(timeout=30)
