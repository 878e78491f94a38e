"""Retrieval benchmark, one process: ingest speed, query latency and index recall, and hit@5 by mode.

1. hit@5 on the built-in corpus: builtin:movies is indexed by `ragrpo.retrieval.index.index`; for
   every movie a question is generated from one of its sentences (not the first) with the character
   names replaced by "someone", and each mode (vector, fts, hybrid) is scored on whether the movie is
   in its top 5.
2. ingest: the same generated documents (default 5,000; plot-like paragraphs composed from the
   built-in corpus's sentences, with metadata drawn from its columns) go in
       baseline  the write-up's way: a LanceModel schema through the registry, then `table.add(df)`,
                 which embeds with sentence-transformers' float32 `encode`
       ragrpo    `ragrpo.retrieval.index.index` on the same data written to a CSV (reading, chunking,
                 the fast embedding path and the full-text index included)
   Both embedders are loaded before the clock starts for the baseline; ragrpo's timing includes
   loading its own. The largest 1 - cosine between the two sides' vectors is reported too.
3. query latency and recall: tables of 10k and 100k rows. Embedding 100k texts is out of reach on
   2 cores, so rows past the real documents are SYNTHESIZED: a real document's metadata with a new
   year, and a noisy copy of its real vector (unit noise of norm 0.5, renormalised). Indexes are built
   by `ragrpo.retrieval.index.build_indexes` (IVF_HNSW_SQ, scalar, FTS). Latency is
   `ragrpo.retrieval.search.search` end to end (query embedding plus prefiltered search, k=5,
   `release_year < 1990`). Recall@10 of the
   vector index is measured against exact search (`bypass_vector_index`), with and without the filter.

    python bench/retrieval.py --out bench/results/retrieval-cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("LANCEDB_LOG", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
FILTER = "release_year < 1990"


# -- data ---------------------------------------------------------------------------------------------

def corpus():
    from ragrpo.data import read_records

    return read_records("builtin:movies")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def make_documents(n: int, seed: int = 0):
    """`n` plot-like documents: 3 to 9 sentences from different movies, with corpus-like metadata."""
    import pandas as pd

    rng = random.Random(seed)
    movies = corpus()
    pool = [s for plot in movies["Plot"] for s in sentences(plot)]
    title_words = sorted({w for t in movies["Title"] for w in re.findall(r"[A-Z][a-z']+", t)})
    rows = []
    for i in range(n):
        parts = rng.sample(pool, rng.randint(3, 9))
        rows.append({
            "doc_id": f"doc-{i:05d}",
            "title": "The " + " ".join(rng.sample(title_words, rng.randint(1, 3))),
            "release_year": rng.randint(1920, 2024),
            "genre": rng.choice(list(movies["Genre"])),
            "origin": rng.choice(list(movies["Origin/Ethnicity"])),
            "text": " ".join(parts),
        })
    return pd.DataFrame(rows)


def question_for(plot: str, rng: random.Random) -> str:
    """A question from one sentence of `plot` (not the first), names replaced by 'someone'."""
    options = sentences(plot)[1:] or sentences(plot)
    sentence = rng.choice(options).rstrip(".!?")
    words = sentence.split()
    # Capitalised words after the first are names (people, places): a question rarely repeats them.
    words = [words[0]] + ["someone" if w[:1].isupper() else w for w in words[1:]]
    return "Which film has a story where " + " ".join(words)[0].lower() + " ".join(words)[1:] + "?"


# -- 1. hit@5 -----------------------------------------------------------------------------------------

def hit_at_5(workdir: Path) -> dict:
    from ragrpo.retrieval.index import index, open_table
    from ragrpo.retrieval.search import search

    index("builtin:movies", "movies", workdir / "hits")
    table = open_table("movies", workdir / "hits")
    rng = random.Random(1)
    questions = [(question_for(plot, rng), title) for plot, title in zip(corpus()["Plot"], corpus()["Title"])]
    result = {"questions": len(questions), "example": questions[0][0]}
    for mode in ("vector", "fts", "hybrid"):
        hits = sum(title in {row["title"] for row in search(table, q, k=5, mode=mode)} for q, title in questions)
        result[mode] = round(hits / len(questions), 4)
    return result


# -- 2. ingest ----------------------------------------------------------------------------------------

def ingest(docs, workdir: Path) -> tuple[dict, np.ndarray]:
    import lancedb
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    from ragrpo.models import resolve_embedder
    from ragrpo.retrieval.index import index, open_table

    func = get_registry().get("sentence-transformers").create(name=resolve_embedder(None), device="cpu")

    class Document(LanceModel):  # the write-up's schema, with this corpus's columns
        doc_id: str
        title: str
        release_year: int
        genre: str
        origin: str
        text: str = func.SourceField()
        vector: Vector(func.ndims()) = func.VectorField()  # ndims() loads the model before the clock

    db = lancedb.connect(workdir / "baseline")
    started = time.perf_counter()
    table = db.create_table("docs", schema=Document)
    table.add(docs)
    baseline_s = time.perf_counter() - started
    reference = table.to_pandas().set_index("doc_id").loc[docs["doc_id"], "vector"]

    path = workdir / "docs.csv"
    docs.to_csv(path, index=False)
    started = time.perf_counter()
    result = index(str(path), "docs", workdir / "ragrpo", id_column="doc_id")
    ragrpo_s = time.perf_counter() - started
    frame = open_table("docs", workdir / "ragrpo").to_pandas()
    ours = frame[frame["chunk"] == 0].set_index("doc_id").loc[docs["doc_id"], "vector"]
    ours_m, ref_m = np.stack(ours.to_numpy()), np.stack(reference.to_numpy())
    gap = float((1 - (ours_m * ref_m).sum(1)).max())
    return {
        "documents": len(docs),
        "mean_words": round(float(docs["text"].str.split().str.len().mean()), 1),
        "chunks": result.chunks,
        "baseline_seconds": round(baseline_s, 2),
        "ragrpo_seconds": round(ragrpo_s, 2),
        "baseline_docs_per_s": round(len(docs) / baseline_s, 2),
        "ragrpo_docs_per_s": round(len(docs) / ragrpo_s, 2),
        "speedup": round(baseline_s / ragrpo_s, 2),
        "target_speedup": 3.0,
        "ragrpo_precision": result.precision,
        "max_1_minus_cosine_vs_baseline": gap,
    }, ours_m


# -- 3. latency and recall ----------------------------------------------------------------------------

def synthetic_table(docs, vectors: np.ndarray, rows: int, workdir: Path):
    import lancedb
    import pandas as pd

    from ragrpo.retrieval.index import build_schema, embedding_function

    rng = np.random.default_rng(rows)
    pick = np.arange(rows) % len(docs)
    frame = docs.iloc[pick].reset_index(drop=True).copy()
    frame["doc_id"] = [f"row-{i:06d}" for i in range(rows)]
    frame["chunk"] = 0
    synthetic = np.arange(rows) >= len(docs)
    frame.loc[synthetic, "release_year"] = rng.integers(1920, 2025, int(synthetic.sum()))
    noise = rng.normal(size=(rows, vectors.shape[1])).astype(np.float32)
    noise *= 0.5 / np.linalg.norm(noise, axis=1, keepdims=True)
    matrix = vectors[pick] + noise * synthetic[:, None]
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    func = embedding_function(None)
    schema = build_schema(frame, "text", func)
    frame["vector"] = list(matrix)
    table = lancedb.connect(workdir / "synthetic").create_table(f"rows{rows}", data=pd.DataFrame(frame),
                                                                 schema=schema, mode="overwrite")
    return table, func


def latency_and_recall(docs, vectors, rows: int, queries: list[str], workdir: Path) -> dict:
    from ragrpo.retrieval.index import build_indexes
    from ragrpo.retrieval.search import NPROBES, REFINE_FACTOR, search

    table, func = synthetic_table(docs, vectors, rows, workdir)
    started = time.perf_counter()
    built = build_indexes(table, "text", threshold=0)
    index_s = time.perf_counter() - started
    for q in queries[:3]:
        search(table, q, where=FILTER, k=5)  # warm-up: caches, index pages
    times = []
    for q in queries:
        started = time.perf_counter()
        search(table, q, where=FILTER, k=5)
        times.append(time.perf_counter() - started)
    recall = {}
    for name, where in (("no_filter", None), ("filtered", FILTER)):
        found = []
        for q in queries:
            vector = np.asarray(func.compute_query_embeddings(q)[0])
            approx = table.search(vector).nprobes(NPROBES).refine_factor(REFINE_FACTOR).limit(10)
            exact = table.search(vector).bypass_vector_index().limit(10)
            if where:
                approx, exact = approx.where(where, prefilter=True), exact.where(where, prefilter=True)
            a = {r["doc_id"] for r in approx.to_list()}
            e = {r["doc_id"] for r in exact.to_list()}
            found.append(len(a & e) / len(e))
        recall[name] = round(float(np.mean(found)), 4)
    return {
        "rows": rows,
        "synthesized_rows": max(0, rows - len(docs)),
        "indexes": built,
        "index_build_seconds": round(index_s, 2),
        "queries": len(queries),
        "latency_p50_ms": round(float(np.percentile(times, 50)) * 1000, 2),
        "latency_p95_ms": round(float(np.percentile(times, 95)) * 1000, 2),
        "recall_at_10": recall,
        "target_recall": 0.95,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--rows", default="10000,100000", help="Comma-separated table sizes for latency/recall.")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out", default="bench/results/retrieval.json")
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_at_start": os.getloadavg()},
        "notes": "rows beyond the generated documents in the latency tables are synthesized (noisy copies of "
                 "real document vectors); see the module docstring",
    }

    def save():
        out.write_text(json.dumps(report, indent=2) + "\n")

    workdir = Path(tempfile.mkdtemp(prefix="ragrpo-bench-"))
    try:
        report["hit_at_5"] = hit_at_5(workdir)
        print("hit@5", report["hit_at_5"], flush=True)
        save()
        docs = make_documents(args.docs)
        report["ingest"], vectors = ingest(docs, workdir)
        print("ingest", report["ingest"], flush=True)
        save()
        rng = random.Random(2)
        queries = [question_for(text, rng) for text in docs["text"].sample(args.queries, random_state=3)]
        report["latency"] = []
        for rows in (int(r) for r in args.rows.split(",")):
            report["latency"].append(latency_and_recall(docs, vectors, rows, queries, workdir))
            print("latency", report["latency"][-1], flush=True)
            save()
        report["load_average_at_end"] = os.getloadavg()
        save()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
