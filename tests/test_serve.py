"""The RAG server: a real `ragrpo serve` process on a free port, over the packaged model and the movie_db
table, driven by the official `openai` client, plain HTTP, and headless Chromium for the web page."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.integration

KEY = "test-key-7"
QUESTION = "Which film is about a beekeeper who poisoned the honey?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(movie_db, base_model_dir):
    """`ragrpo serve` in a subprocess, the API key from the environment; yields its base URL."""
    yield from serving(movie_db)


@pytest.fixture(scope="module")
def searcher_server(movie_db, searcher_dir):
    """`ragrpo serve` over the scripted searcher model (conftest.scripted_searcher), one request at a time."""
    yield from serving(movie_db, "--model", str(searcher_dir), "--max-batch", "1")


def serving(movie_db, *args):
    port = free_port()
    # float32 weights: then rows decoded together give exactly the tokens each gives alone (in bf16 the matmul
    # kernels' blocking depends on the batch size, and near-ties can flip; tests/test_decode.py bounds that)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAGRPO_API_KEY": KEY, "RAGRPO_BF16": "0"}
    process = subprocess.Popen([sys.executable, "-m", "ragrpo.cli", "serve", "--table", "movies", "--db", str(movie_db),
                                "--port", str(port), "--max-tokens", "64", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start:\n{process.stdout.read()}")
            time.sleep(0.5)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def request(url, path, body=None, *, key=KEY, raw=None):
    """(status, parsed JSON) for a GET, or a POST of `body` (or of the bytes `raw`)."""
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=headers), timeout=300) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def health(url) -> dict:
    return request(url, "/healthz", key=None)[1]


def test_models_and_health(server, client):
    [model] = client.models.list().data
    assert model.id == "SmolLM2-135M-Instruct" and model.owned_by == "ragrpo"
    state = health(server)
    assert state["status"] == "ok" and state["rows"] == 160 and state["model"] == model.id
    assert state["max_batch"] == min(64, 8 * os.cpu_count())  # continuous batching, sized to the machine
    assert {"running", "waiting", "served", "cancelled", "errors"} <= set(state)


def test_plain_and_streamed_answers_agree(client):
    question = [{"role": "user", "content": QUESTION}]
    extra = {"where": "release_year >= 1990", "k": 2}
    plain = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=8,
                                           extra_body=extra)
    assert plain.id.startswith("chatcmpl-") and plain.object == "chat.completion" and plain.created > 0
    [choice] = plain.choices
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < plain.usage.completion_tokens <= 8
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    sources = plain.model_extra["sources"]
    assert len(sources) == 2 and all(s["release_year"] >= 1990 for s in sources)
    assert sources[0]["title"] == "The Beekeeper's Confession" and "movie_plot" not in sources[0]

    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=extra))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].model_extra["sources"] == sources
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # it streamed: more than one piece of text
    # Greedy decoding: the streamed pieces add up to the plain answer.
    assert "".join(pieces) == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    # the source the answer's words come from (or none): beside the sources, and in the streamed finish chunk
    assert plain.model_extra["drawn_from"] in (None, 1, 2)
    [finish] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish.model_extra["drawn_from"] == plain.model_extra["drawn_from"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streaming_ends_with_done(server):
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=300)
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3, "k": 1, "stream": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    connection.close()


def test_api_key_is_required(server):
    from openai import AuthenticationError, OpenAI

    assert request(server, "/v1/models", key=None)[0] == 401
    status, body = request(server, "/v1/search", {"query": "bees"}, key="wrong")
    assert status == 401 and "API key" in body["error"]["message"]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert request(server, "/healthz", key=None)[0] == 200


def test_search_applies_the_filter(server):
    status, body = request(server, "/v1/search", {"query": "a hero who is secretly the villain",
                                                  "where": "release_year < 1990", "k": 7})
    assert status == 200 and len(body["data"]) == 7
    assert all(row["release_year"] < 1990 for row in body["data"])
    assert body["text_column"] == "movie_plot" and "vector" not in body["data"][0]


QUESTION_MESSAGES = [{"role": "user", "content": "Who is the villain?"}]
BAD_REQUESTS = [
    # (body, status, fragment of the error message)
    ({"messages": []}, 400, "messages: "),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, 400, "last message must be a non-empty user message"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "x" * 20_000}]}, 400, "longer than 16000 characters"),
    ({"messages": QUESTION_MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": QUESTION_MESSAGES, "max_tokens": 65}, 400, "max_tokens: at most 64"),
    ({"messages": QUESTION_MESSAGES, "temperature": 3}, 400, "temperature: "),
    ({"messages": QUESTION_MESSAGES, "n": 2}, 400, "n: "),
    ({"messages": QUESTION_MESSAGES, "frequency_penalty": 2.5}, 400, "frequency_penalty: "),
    ({"messages": QUESTION_MESSAGES, "presence_penalty": -3}, 400, "presence_penalty: "),
    ({"messages": QUESTION_MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop strings"),
    ({"messages": QUESTION_MESSAGES, "where": "release_yr < 1990"}, 400, "invalid --where"),
    ({"messages": QUESTION_MESSAGES, "where": "release_year <<< 1"}, 400, "invalid --where"),
    ({"messages": QUESTION_MESSAGES, "where": "release_year > 3000"}, 400, "no rows match"),
    ({"messages": QUESTION_MESSAGES, "mode": "semantic"}, 400, "mode: "),
    ({"messages": QUESTION_MESSAGES, "k": 0}, 400, "k: "),
    ({"messages": QUESTION_MESSAGES, "model": "gpt-4"}, 404, "not served here"),
]


@pytest.mark.parametrize("body,status,fragment", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message(server, body, status, fragment):
    got, answer = request(server, "/v1/chat/completions", body)
    assert got == status, answer
    assert fragment in answer["error"]["message"]


def test_malformed_and_oversized_bodies(server):
    status, body = request(server, "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = request(server, "/v1/chat/completions", raw=b"x" * 300_000)
    assert status == 413 and "bytes" in body["error"]["message"]
    assert health(server)["status"] == "ok"


def test_disconnect_mid_stream_frees_the_slot(server, client):
    before = health(server)
    sock = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=300)
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64, "min_tokens": 64,
                       "k": 1, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    received = b""
    while received.count(b'"content"') < 3:  # the role chunk and two pieces of text
        received += sock.recv(65536)
    sock.close()  # hang up mid-answer
    deadline = time.monotonic() + 5  # a decode step is tens of milliseconds; the server polls every 0.2 s
    while (state := health(server))["running"] or state["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, f"the generation kept its slot: {state}"
        time.sleep(0.2)
    assert state["cancelled"] == before["cancelled"] + 1 and state["served"] == before["served"]
    # The next request is answered at once, not after the abandoned answer's remaining tokens.
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user",
                                            "content": QUESTION}], max_tokens=2, extra_body={"k": 1})
    assert answer.choices[0].message.content


def test_concurrent_greedy_answers_equal_one_at_a_time_answers(server):
    """Greedy rows decoded together in one batch give the tokens each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    questions = [QUESTION, "Which film ends in betrayal at sea?", "Who is the villain of a heist film?"]

    def ask(question):
        status, body = request(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                                "max_tokens": 24, "k": 2, "temperature": 0})
        assert status == 200, body
        return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone and all(tokens > 5 for _, tokens in alone)


def test_a_client_that_hangs_up_before_the_answer_is_cancelled(server):
    before = health(server)
    sock = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=30)
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64, "min_tokens": 64,
                       "k": 1}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 30
    while health(server)["running"] == 0:  # the row is in the batch
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sock.close()  # not streaming: the client hangs up while its answer is generated
    deadline = time.monotonic() + 5
    while (state := health(server))["running"] or state["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, f"the generation kept its slot: {state}"
        time.sleep(0.1)
    assert state["served"] == before["served"] and state["errors"] == before["errors"]


def test_concurrent_requests_are_queued_not_dropped(server):
    from concurrent.futures import ThreadPoolExecutor

    def ask(n):
        return request(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": f"{QUESTION} {n}"}],
                                                        "max_tokens": 2, "k": 1})

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    assert [status for status, _ in results] == [200] * 6
    assert all(body["choices"][0]["message"]["content"] for _, body in results)
    assert health(server)["running"] == 0 and health(server)["waiting"] == 0


def test_web_page_streams_an_answer_with_sources(server):
    """Headless Chromium types a question into the page and sees an answer and its sources."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        driver.get(server + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "question").send_keys(QUESTION)
        driver.find_element(By.ID, "where").send_keys("release_year >= 1990")
        for field, value in (("k", "2"), ("max_tokens", "6")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 300).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "Error")))
        assert driver.find_element(By.ID, "status").text.startswith("done")
        assert driver.find_element(By.ID, "answer").text.strip()
        sources = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#sources li")]
        assert sources[0].startswith("The Beekeeper's Confession (1997)") and len(sources) == 2
        # the same request through the API names the passage the page marks (greedy: the same answer)
        _, plain = request(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                                                           "where": "release_year >= 1990", "k": 2, "max_tokens": 6})
        marked = [n for n, text in enumerate(sources, 1) if text.endswith("(the answer's words come from here)")]
        assert marked == ([plain["drawn_from"]] if plain["drawn_from"] else [])
        assert driver.find_element(By.ID, "model").text == "SmolLM2-135M-Instruct"
    finally:
        driver.quit()


def test_an_agentic_request_returns_the_searches_beside_the_sources(searcher_server, searcher_dir):
    body = {"messages": [{"role": "user", "content": "Who helps the police on the Thames?"}], "agentic": True, "k": 2,
            "mode": "hybrid", "max_tokens": 32}
    status, plain = request(searcher_server, "/v1/chat/completions", body)
    assert status == 200, plain
    assert plain["searches"] == [{"query": "Thames ferryman ledger", "passages": [1, 2], "error": None}]
    assert plain["sources"][0]["label"] == "The Ferryman's Ledger (1923)" and len(plain["sources"]) == 2
    assert "movie_plot" not in plain["sources"][0]
    [choice] = plain["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Inspector Hale [1]."}
    # usage counts the tokens the model wrote (the query line, the answer, its end of turn), not the results
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(searcher_dir)
    written = tokenizer(" Thames ferryman ledger\n Inspector Hale [1].", add_special_tokens=False)["input_ids"]
    assert choice["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] == len(written) + 1

    # streamed: the search arrives as its own chunk before the answer, which comes with the sources
    status, chunks = streamed_chunks(searcher_server, body)
    assert status == 200
    searched = [c for c in chunks if c.get("searches")]
    answered = [n for n, c in enumerate(chunks) if c["choices"][0]["delta"].get("content")]
    assert [c["searches"] for c in searched] == [plain["searches"]] and chunks.index(searched[0]) < answered[0]
    assert chunks[answered[0]]["choices"][0]["delta"]["content"] == "Inspector Hale [1]."
    # the source its words come from (Inspector Hale is in The Ferryman's Ledger's plot), plain and streamed
    assert plain["drawn_from"] == 1
    assert [c["drawn_from"] for c in chunks if c["choices"][0]["finish_reason"]] == [1]
    assert chunks[answered[0]]["sources"] == plain["sources"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]
    state = health(searcher_server)
    assert state["running"] == 0 and state["served"] >= 2


def test_an_agentic_answer_after_a_search_that_showed_nothing_names_no_source(movie_db, base_model_dir, tmp_path):
    """A model that calls the tool with an empty query gets no passages, then answers: a 200 that lists no
    source and marks none, plain and streamed (it was a 500: the attribution took the best of no passages)."""
    from conftest import scripted_searcher

    searcher = scripted_searcher(base_model_dir, tmp_path / "blank", query="")
    body = {"messages": [{"role": "user", "content": "Who helps the police on the Thames?"}], "agentic": True,
            "max_tokens": 32}
    servers = serving(movie_db, "--model", str(searcher), "--max-batch", "1")
    url = next(servers)
    try:
        for stream in (False, True):
            status, answer = streamed_finish(url, body) if stream else request(url, "/v1/chat/completions", body)
            assert status == 200, answer
            assert answer["sources"] == [] and answer["drawn_from"] is None
            assert [call["passages"] for call in answer["searches"]] == [[]] and answer["searches"][0]["error"]
    finally:
        servers.close()  # stops the server


def streamed_chunks(url, body) -> tuple[int, list[dict]]:
    """(status, the chunks) of a streamed chat request; the stream must end with `data: [DONE]`."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=300)
    connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    events = [e.removeprefix("data: ") for e in response.read().decode().split("\n\n") if e]
    connection.close()
    assert events[-1] == "[DONE]"
    return response.status, [json.loads(e) for e in events[:-1]]


def streamed_finish(url, body):
    """(status, the finish chunk with the sources and searches of the chunks before it) of a streamed request."""
    status, chunks = streamed_chunks(url, body)
    finish = next(c for c in chunks if c["choices"][0]["finish_reason"])
    searches = [call for c in chunks for call in c.get("searches", [])]
    sources = next((c["sources"] for c in chunks if "sources" in c), None)
    return status, {**finish, "searches": searches, "sources": sources}


@pytest.mark.parametrize("extra, fragment", [
    ({"where": "release_year >"}, "invalid --where"),
    ({"max_searches": 0}, "max_searches: "),
    ({"max_searches": 9}, "max_searches: "),
    ({"agentic": "sometimes"}, "agentic: "),
])
def test_bad_agentic_requests_get_a_400(searcher_server, extra, fragment):
    body = {"messages": [{"role": "user", "content": "Who?"}], "agentic": True, **extra}
    status, answer = request(searcher_server, "/v1/chat/completions", body)
    assert status == 400 and fragment in answer["error"]["message"], answer


def test_the_server_ends_its_loading_threads_openmp_workers(movie_db, base_model_dir, force_hardware):
    """The engine's thread decodes with the only OpenMP team: with a second one idle, libgomp's workers sleep
    between parallel regions and a token took 32 ms against 25 (hardware.release_openmp)."""
    from conftest import needs_openmp_release, openmp_team

    from ragrpo.serving.server import load_server

    needs_openmp_release()
    force_hardware(OMP_RELEASE=None, BF16="0")
    servers = []
    found = openmp_team(lambda: servers.append(load_server("movies", str(base_model_dir), db=movie_db, max_batch=2)))
    try:
        assert found["team"] and not found["alive"]
        assert servers[0].batcher is not None  # the engine's thread was started before the team ended
    finally:
        servers[0].batcher.close()
