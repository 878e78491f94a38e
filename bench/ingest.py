"""Ingest memory benchmark, one process run: peak RSS of `ragrpo.retrieval.index.index` as the input grows,
streamed (the default, `batch_rows=2048`) against the whole input read as one frame (`batch_rows=None`,
which is how every ingest ran before streaming).

Each case runs in a child process of its own, because peak RSS is a per-process high-water mark. A
thread in the child samples its RSS every 20 ms and keeps two peaks: while the rows are read, embedded
and written (up to LanceDB's commit), and while the indexes are built afterwards (full-text always;
from 10,000 rows the IVF_HNSW_SQ vector index and the scalar indexes too). `ru_maxrss` is reported as
well. The child's RSS before the ingest starts (Python with torch, transformers and lancedb imported) is
the floor every case shares.

The documents are SHORT (one or two sentences of the built-in corpus, about 25 words, with a title,
year and genre), so that 200,000 of them embed in minutes on 2 cores; with the corpus's own plots
(about 115 words) the embedder's time grows about fivefold and the per-row memory (vector, text)
about twofold. They are written as Parquet (row groups of 10,000), and as JSONL for the smallest case.
`--untrimmed` adds a streamed side with RAGRPO_TRIM=0 (freed heap pages kept by glibc).

    python bench/ingest.py --out bench/results/ingest-cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("LANCEDB_LOG", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 2**20


# -- data ---------------------------------------------------------------------------------------------

def write_documents(n: int, path: Path, seed: int = 0) -> None:
    """`n` documents of one or two corpus sentences each, written 10,000 rows at a time."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ragrpo.data import read_records

    movies = read_records("builtin:movies")
    pool = [s.strip() for plot in movies["Plot"] for s in re.split(r"(?<=[.!?])\s+", plot) if len(s.split()) > 6]
    genres = sorted(set(movies["Genre"]))
    rng = random.Random(seed)
    writer = None
    with open(path.with_suffix(".jsonl"), "w") as jsonl:
        for start in range(0, n, 10_000):
            rows = [{"doc_id": f"doc-{i:07d}", "title": f"The {rng.choice(pool).split()[1]} {i}",
                     "release_year": rng.randint(1920, 2024), "genre": rng.choice(genres),
                     "text": " ".join(rng.sample(pool, rng.randint(1, 2)))}
                    for i in range(start, min(n, start + 10_000))]
            frame = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
            writer = writer or pq.ParquetWriter(path, frame.schema)
            writer.write_table(frame)
            jsonl.writelines(json.dumps(row) + "\n" for row in rows)
    writer.close()


# -- one case, in a child process ---------------------------------------------------------------------

def child(source: str, db: str, batch_rows: int | None) -> dict:
    import torch  # noqa: F401  (imported before the floor is read: every case pays for it)

    from ragrpo.retrieval import index as module

    floor = rss_mb()
    peaks = {"write": floor, "indexes": floor}
    phase, done = ["write"], threading.Event()

    def sample():
        while not done.wait(0.02):
            peaks[phase[0]] = max(peaks[phase[0]], rss_mb())

    build_indexes = module.build_indexes

    def timed_indexes(*args, **kwargs):  # marks where LanceDB's commit ended and the index build begins
        phase[0] = "indexes"
        times["write"] = time.perf_counter() - start
        return build_indexes(*args, **kwargs)

    module.build_indexes = timed_indexes
    times: dict[str, float] = {}
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    result = module.index(source, "docs", db, batch_rows=batch_rows)
    times["total"] = time.perf_counter() - start
    done.set()
    thread.join()
    return {"rows": result.rows, "floor_mb": round(floor, 1), "write_peak_mb": round(peaks["write"], 1),
            "index_peak_mb": round(peaks["indexes"], 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "write_seconds": round(times["write"], 1), "total_seconds": round(times["total"], 1),
            "indexes": result.indexes, "precision": result.precision}


def run_case(source: Path, workdir: Path, batch_rows: int | None, env: dict) -> dict:
    db = workdir / f"db-{len(list(workdir.iterdir()))}"
    out = subprocess.run([sys.executable, __file__, "--child", str(source), str(db), str(batch_rows)],
                         capture_output=True, text=True, check=False, env={**os.environ, **env})
    if out.returncode:
        raise SystemExit(f"case {source.name} batch_rows={batch_rows} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="50000,200000", help="input sizes, comma-separated")
    parser.add_argument("--batch-rows", type=int, default=None, help="streamed frame size [default: the library's]")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-input baseline")
    parser.add_argument("--untrimmed", action="store_true", help="also stream with RAGRPO_TRIM=0 (no malloc_trim)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "DB", "BATCH_ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        source, db, batch = args.child
        print(json.dumps(child(source, db, None if batch == "None" else int(batch))))
        return

    from ragrpo.hardware import cpu_flags, cpu_name
    from ragrpo.retrieval.index import BATCH_ROWS

    batch_rows = args.batch_rows or BATCH_ROWS
    sizes = [int(n) for n in args.rows.split(",")]
    cases = []
    with tempfile.TemporaryDirectory(prefix="ragrpo-ingest-") as tmp:
        workdir = Path(tmp)
        for n in sizes:
            path = workdir / f"docs-{n}.parquet"
            write_documents(n, path)
            sides = [("streamed", path, batch_rows, {})]
            sides += [] if args.no_whole else [("whole", path, None, {})]
            sides += [("untrimmed", path, batch_rows, {"RAGRPO_TRIM": "0"})] if args.untrimmed else []
            if n == min(sizes):
                sides.append(("streamed", path.with_suffix(".jsonl"), batch_rows, {}))
            for side, source, batch, env in sides:
                case = {"rows_in": n, "side": side, "format": source.suffix[1:], "batch_rows": batch, "env": env,
                        **run_case(source, workdir, batch, env)}
                cases.append(case)
                print(f"{n:>8} {case['format']:>8} {side:>9}: write peak {case['write_peak_mb']:7.0f} MB, "
                      f"index peak {case['index_peak_mb']:7.0f} MB (floor {case['floor_mb']:.0f}), "
                      f"write {case['write_seconds']:6.1f} s, total {case['total_seconds']:6.1f} s", flush=True)

    def above_floor(side, n, key="write_peak_mb", fmt="parquet"):
        case = next(c for c in cases if c["side"] == side and c["rows_in"] == n and c["format"] == fmt)
        return case[key] - case["floor_mb"]

    small, large = min(sizes), max(sizes)
    summary = {"streamed_write_growth_mb": round(above_floor("streamed", large) - above_floor("streamed", small), 1),
               "streamed_write_above_floor_mb": {n: round(above_floor("streamed", n), 1) for n in sizes}}
    if not args.no_whole:
        summary["whole_write_growth_mb"] = round(above_floor("whole", large) - above_floor("whole", small), 1)
        summary["whole_write_above_floor_mb"] = {n: round(above_floor("whole", n), 1) for n in sizes}
        summary[f"whole_over_streamed_above_floor_at_{large}"] = round(
            above_floor("whole", large) / max(above_floor("streamed", large), 1.0), 2)
    if args.untrimmed:
        summary["untrimmed_write_growth_mb"] = round(above_floor("untrimmed", large) - above_floor("untrimmed", small), 1)
    print(json.dumps(summary, indent=1))
    record = {"benchmark": "ingest", "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
              "cases": cases, "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
