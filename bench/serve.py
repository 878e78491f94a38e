"""Serving latency and throughput: `ragrpo serve` over HTTP against the library's token loops, in one run.

Every request asks a question about builtin:movies (k=5 passages by default, the write-up's prompt) and gets a
64-token answer (`min_tokens` keeps the end-of-turn token out, so every answer has the same length).

    forward   rag.retrieve + rag.stream_answer in this process, one request after another, on the library's
              previous token loop (transformers' forward with its cache, float32, batch 1; the fallback for
              models the decode engine does not cover): the baseline of the issue that asked for batching
    library   the same through the decode engine (`decode.Engine`, float32 activations; weights packed as
              `hardware.decode_weights` says: fp16 for fbgemm where it pays, else oneDNN's layout)
    server    `ragrpo serve` in a subprocess, driven by the official openai client with stream=True, by 1, 4
              and 16 concurrent clients; its requests are rows of one continuously batched engine

For each it reports time to first token (TTFT: request sent -> first piece of answer text) and full-
answer latency, p50 and p95, plus requests and tokens per second, the number of failed requests
(an exception, or an answer that is not exactly 64 tokens) and, for the server, each answer's longest
wait between two pieces after the first (stall: what a running answer waits while new prompts are
prefilled; `--prefill-chunk` bounds it). It also times the prefill of the first
question's prompt alone (the server's weights, median of 5), the floor under TTFT. Prints a table and
the ratios, and writes JSON with the CPU's flags and the hardware decisions.

    python bench/serve.py --out bench/results/serve.json
    python bench/serve.py --requests 40 --latency-requests 5      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TOKENS = 64
QUESTIONS = [
    "What's common in movies where the protagonist turns out to be the bad guy",
    "Which film is about a beekeeper who poisoned the honey?",
    "A commander learns that she sabotaged her own station. What happens?",
    "Tell me about a heist that goes wrong.",
    "Which movies take place at sea?",
    "Who invents an island that does not exist?",
    "Is there a comedy about a diner?",
    "Which films are set in Venice?",
]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None}
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p95": cuts[94]}


def summarize(name: str, clients: int, results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    return {"name": name, "clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_examples": sorted({r["error"] for r in results if r["error"]})[:3],
            "ttft_s": percentiles([r["ttft"] for r in ok]), "latency_s": percentiles([r["latency"] for r in ok]),
            "stall_s": percentiles([r["stall"] for r in ok if "stall" in r]),
            "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall}


def run_library(db: Path, table_name: str, requests: int, k: int, threads: int | None, forward: bool = False) -> dict:
    """Retrieval and a token loop in this process, no HTTP: the decode engine, or with `forward` the library's
    previous loop (the engine is switched off for this side only, by making it cover no model)."""
    import ragrpo.generation.engine
    from ragrpo import hardware

    hardware.set_threads(threads)
    covered = ragrpo.generation.engine.fresh_projections
    if forward:
        ragrpo.generation.engine.fresh_projections = lambda model: None
    try:
        return _library_requests(db, table_name, requests, k, "forward" if forward else "library")
    finally:
        ragrpo.generation.engine.fresh_projections = covered


def _library_requests(db: Path, table_name: str, requests: int, k: int, name: str) -> dict:
    from ragrpo.generation.rag import retrieve, stream_answer
    from ragrpo.models import load_model
    from ragrpo.prompts import table_style
    from ragrpo.retrieval.index import open_table

    model, tokenizer = load_model(None)
    table = open_table(table_name, db)
    style = table_style(table)  # the server's prompts, passage for passage
    results = []
    started = time.perf_counter()
    for i in range(requests):
        sent = time.perf_counter()
        question = QUESTIONS[i % len(QUESTIONS)]
        hits, column = retrieve(table, question, k=k)
        stream = stream_answer(model, tokenizer, question, hits, column, style=style, max_new_tokens=TOKENS,
                               min_new_tokens=TOKENS)  # the server's default penalty, 1.0
        first = None
        for _ in stream:
            first = first or time.perf_counter()
        done = time.perf_counter()
        error = None if stream.completion_tokens == TOKENS else f"{stream.completion_tokens} tokens"
        results.append({"ttft": first - sent, "latency": done - sent, "tokens": stream.completion_tokens,
                        "error": error})
        print(f"{name}: {i + 1}/{requests} requests, {done - sent:.1f} s", file=sys.stderr, flush=True)
    return summarize(name, 1, results, time.perf_counter() - started)


def prefill_seconds(db: Path, table_name: str, k: int) -> dict:
    """The prefill of the first question's prompt alone, on the weights the server decodes with (median of 5)."""
    import torch

    from ragrpo import hardware
    from ragrpo.generation.engine import SamplingCopy
    from ragrpo.generation.rag import retrieve
    from ragrpo.models import load_model
    from ragrpo.prompts import build_prompt, table_style
    from ragrpo.retrieval.index import open_table

    model, tokenizer = load_model(None)
    table = open_table(table_name, db)
    style = table_style(table)  # as the server heads passages
    hits, column = retrieve(table, QUESTIONS[0], k=k)
    prompt = build_prompt(QUESTIONS[0], style.passages(hits, column), label=style.label)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    copy = SamplingCopy(model, dtype=torch.bfloat16 if hardware.bf16() else torch.float32)
    times = []
    with torch.inference_mode():
        for _ in range(6):
            started = time.perf_counter()
            copy.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - started)
    return {"prompt_tokens": ids.size(1), "dtype": str(copy.dtype), "seconds": statistics.median(times[1:])}


def one_request(client, model_id: str, i: int, k: int) -> dict:
    """One streamed request: time to the first piece of text, to the end, and the longest wait between two
    pieces after the first (`stall`: what a running answer waits while new prompts are prefilled)."""
    sent = time.perf_counter()
    first, tokens, last, stall = None, 0, None, 0.0
    try:
        chunks = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=TOKENS, stream=True, stream_options={"include_usage": True},
            extra_body={"k": k, "min_tokens": TOKENS})
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter()
                first = first or now
                stall = max(stall, now - last) if last is not None else stall
                last = now
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:
        return {"ttft": None, "latency": None, "tokens": 0, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    done = time.perf_counter()
    error = None if tokens == TOKENS and first is not None else f"{tokens} tokens"
    return {"ttft": (first or done) - sent, "latency": done - sent, "tokens": tokens, "error": error, "stall": stall}


def run_server_load(url: str, model_id: str, clients: int, requests: int, k: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=3600)
    started = time.perf_counter()
    results = []
    with ThreadPoolExecutor(clients) as pool:
        for result in pool.map(lambda i: one_request(client, model_id, i, k), range(requests)):
            results.append(result)
            errors = sum(r["error"] is not None for r in results)
            print(f"{clients} clients: {len(results)}/{requests} requests, {errors} errors, "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return summarize("server", clients, results, time.perf_counter() - started)


def start_server(db: Path, table: str, threads: int | None, prefill_chunk: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RAGRPO_API_KEY": "bench", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ragrpo.cli", "serve", "--table", table, "--db", str(db),
                                "--port", str(port), "--max-tokens", str(TOKENS), "--max-waiting", "256",
                                *(["--threads", str(threads)] if threads else []),
                                *(["--prefill-chunk", str(prefill_chunk)] if prefill_chunk else [])],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=5)
            return process, url
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start")


def fmt(row: dict) -> str:
    def s(value):
        return f"{value:8.2f}" if value is not None else "       -"

    return (f"{row['name']:<8} {row['clients']:>7} {row['requests']:>8} {s(row['ttft_s']['p50'])} "
            f"{s(row['ttft_s']['p95'])} {s(row['latency_s']['p50'])} {s(row['latency_s']['p95'])} "
            f"{row['requests_per_s']:8.3f} {row['tokens_per_s']:8.1f} {row['errors']:>6} "
            f"{s(row.get('stall_s', {}).get('p50'))} {s(row.get('stall_s', {}).get('p95'))}")


def ratios(rows: list[dict]) -> dict:
    by = {(r["name"], r["clients"]): r for r in rows}
    library, single, forward = by.get(("library", 1)), by.get(("server", 1)), by.get(("forward", 1))
    out = {}
    if forward and single:
        out["server_1_client_vs_forward_latency_p50"] = single["latency_s"]["p50"] / forward["latency_s"]["p50"]
    if library and single:
        out["server_1_client_vs_library_ttft_p50"] = single["ttft_s"]["p50"] / library["ttft_s"]["p50"]
        out["server_1_client_vs_library_latency_p50"] = single["latency_s"]["p50"] / library["latency_s"]["p50"]
    for clients in (4, 16):
        if single and ("server", clients) in by:
            out[f"throughput_{clients}_vs_1_client"] = by[("server", clients)]["tokens_per_s"] / single["tokens_per_s"]
            out[f"latency_p50_{clients}_vs_1_client"] = (by[("server", clients)]["latency_s"]["p50"]
                                                       / single["latency_s"]["p50"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="Requests for the 16-client run.")
    parser.add_argument("--latency-requests", type=int, default=8, help="Requests for the library and 1 client.")
    parser.add_argument("--requests-4", type=int, default=16, help="Requests for the 4-client run.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on both sides (`ragrpo serve --threads`) [default: torch's].")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="`ragrpo serve --prefill-chunk` [default: the server's]; a large value turns chunking off.")
    parser.add_argument("--db", default=None, help="LanceDB folder with builtin:movies [default: index a fresh one].")
    parser.add_argument("--table", default="movies")
    parser.add_argument("-k", type=int, default=5, help="Passages per question.")
    parser.add_argument("--note", default="", help="Free text kept in the JSON, e.g. the machine's load.")
    parser.add_argument("--out", default="bench/results/serve.json")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LANCEDB_LOG", "error")
    import torch

    from ragrpo import hardware
    from ragrpo.models import quiet_transformers

    quiet_transformers()
    db = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="ragrpo-bench-")) / "lancedb"
    if not args.db:
        from ragrpo.retrieval.index import index

        index("builtin:movies", args.table, db)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "serve", "tokens_per_answer": TOKENS, "k": args.k, "complete": False, "rows": [],
              "ratios": {}, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                        "torch_threads": args.threads or torch.get_num_threads(),
                                        "loadavg_before": os.getloadavg(), "hardware": hardware.summary()},
              "note": args.note, "command": " ".join(sys.argv)}

    def record(row: dict) -> None:
        # Written after every row, so a run cut short still leaves what it measured.
        result["rows"].append(row)
        result["ratios"] = ratios(result["rows"])
        result["machine"]["loadavg_after"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(fmt(row), flush=True)

    result["prefill"] = prefill_seconds(db, args.table, args.k)
    print(f"prefill of a {result['prefill']['prompt_tokens']}-token prompt: {result['prefill']['seconds']:.3f} s",
          flush=True)
    record(run_library(db, args.table, args.latency_requests, args.k, args.threads, forward=True))
    record(run_library(db, args.table, args.latency_requests, args.k, args.threads))
    process, url = start_server(db, args.table, args.threads, args.prefill_chunk)
    try:
        model_id = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{url}/v1/models", headers={"Authorization": "Bearer bench"})))["data"][0]["id"]
        # The 16-client run (the no-errors check) before the 4-client one, which matters least.
        for clients, requests in ((1, args.latency_requests), (16, args.requests), (4, args.requests_4)):
            record(run_server_load(url, model_id, clients, requests, args.k))
    finally:
        process.terminate()
        process.wait(timeout=60)

    result["complete"] = True
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'side':<8} {'clients':>7} {'requests':>8} {'ttft p50':>8} {'ttft p95':>8} {'lat p50':>8} "
          f"{'lat p95':>8} {'req/s':>8} {'tok/s':>8} {'errors':>6} {'stall50':>8} {'stall95':>8}")
    for row in result["rows"]:
        print(fmt(row))
    single = next(r for r in result["rows"] if r["name"] == "server" and r["clients"] == 1)
    result["ratios"]["server_1_client_ttft_vs_prefill"] = single["ttft_s"]["p50"] / result["prefill"]["seconds"]
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\nratios: " + ", ".join(f"{name} {value:.3f}" for name, value in result["ratios"].items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
