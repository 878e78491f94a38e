"""Search over a table made by `ragrpo.retrieval.index`: vector, full-text or hybrid, prefiltered,
optionally reranked.

- `vector`: the query text is embedded by the table's own embedding function (read back from the
  table's metadata by LanceDB) and the nearest rows are found, exactly or through the vector index
  when the table has one (`ragrpo.retrieval.index.build_indexes`).
- `fts`: LanceDB's native full-text search (BM25) over the text column's inverted index.
- `hybrid`: both, fused by reciprocal rank fusion (LanceDB's `RRFReranker`, k=60): a row's score is
  the sum of 1 / (60 + rank) over the two lists.

The `where` filter is checked against the table's schema before anything runs (an unknown column or
malformed SQL is one line naming it), then applied before the search (LanceDB's prefilter, as in the
write-up's `.where("release_year < 1990").limit(5)`). Rows come back as plain dicts without their
vectors, with the mode's score: `_distance` (vector, lower is nearer), `_score` (fts, BM25) or
`_relevance_score` (hybrid, RRF), and `_rerank_score` when a cross-encoder reranked them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from ragrpo import RagrpoError
from ragrpo.retrieval.index import DEFAULT_DB, VECTOR_COLUMN, embedding_config, open_table, text_column

MODES = ("vector", "fts", "hybrid")
# With a vector index: IVF partitions visited per query, and how many times k candidates are re-scored
# with the full vectors (the index stores 8-bit scalar-quantized ones). On bench/retrieval.py's 100k
# rows (79 partitions, mostly synthetic near-duplicates) 20 probes with refine 5 gave recall@10 0.91;
# 40 probes reached 1.0 on a probe set. Refine 5 costs about 10 ms per query there.
NPROBES = 40
REFINE_FACTOR = 5
RERANK_CANDIDATES = 4  # a reranked search scores k * this many first-stage hits
SCORE_COLUMNS = ("_rerank_score", "_relevance_score", "_score", "_distance")


def _filter_error(where: str, exc: Exception) -> RagrpoError:
    message = " ".join(str(exc).split())
    unknown = re.search(r"No field named (\S+?)\.? Valid fields", message)
    if unknown:
        return RagrpoError(f"invalid --where {where!r}: unknown column {unknown.group(1).strip('`')!r}; "
                           f"columns are: {_columns_hint(message)}")
    message = re.sub(r"^(Invalid input, )?", "", message)
    return RagrpoError(f"invalid --where {where!r}: {message[:200]}")


def _columns_hint(message: str) -> str:
    fields = re.findall(r"`([^`]+)`", message.split("Valid fields are", 1)[-1])
    return ", ".join(f for f in fields if f != VECTOR_COLUMN)


# LanceDB parses the first expression of a filter and drops whatever follows it, so these would be
# ignored without a word: the query would run on a different filter than the one written.
NOT_A_FILTER = (
    (r";", "';' ends the filter there; give one condition (join conditions with AND / OR)"),
    (r"--|/\*", "SQL comments are not allowed in a filter (the rest of it would be ignored)"),
    (r"\blimit\b", "LIMIT is not part of a filter; use -k for the number of rows"),
    (r"\boffset\b", "OFFSET is not part of a filter"),
    (r"\border\s+by\b", "ORDER BY is not part of a filter; rows come back best match first"),
    (r"\bgroup\s+by\b|\bhaving\b", "GROUP BY / HAVING are not part of a filter"),
)


def _outside_literals(where: str) -> str:
    """`where` with every quoted string ('...'), identifier ("..." or `...`) blanked out."""
    out, quote = [], None
    for char in where:
        if quote:
            if char == quote:
                quote = None  # a doubled quote ('it''s') closes and reopens, which blanks it just the same
            out.append(" ")
        elif char in "'\"`":
            quote = char
            out.append(" ")
        else:
            out.append(char)
    return "".join(out)


def check_where(table, where: str) -> None:
    """Check that `where` is one filter expression, then plan (without running) a scan with it: an unknown
    column, bad SQL, or a statement that is more than a filter raises RagrpoError."""
    bare = _outside_literals(where)
    for pattern, why in NOT_A_FILTER:
        if re.search(pattern, bare, flags=re.IGNORECASE):
            raise RagrpoError(f"invalid --where {where!r}: {why}")
    try:
        table.search().where(where).explain_plan()
    except Exception as exc:  # LanceDB raises RuntimeError/ValueError with DataFusion's message
        raise _filter_error(where, exc) from None


def _has_index(table, kind: str) -> bool:
    return any(ix.index_type.upper().startswith(kind) for ix in table.list_indices())


def embed_queries(table, queries: list[str]):
    """The table's own embedding function (from its metadata) over `queries` in one batch: `search` with
    these vectors finds what it finds from the texts, and a batch costs about a tenth per query of one
    query at a time on a CPU."""
    return embedding_config(table).function.generate_embeddings(list(queries))


def search(table, query: str, *, where: str | None = None, k: int = 5, mode: str = "vector",
           rerank: str | None = None, vector=None) -> list[dict]:
    """The `k` best rows for `query` among those satisfying `where` (an SQL filter), by `mode`.

    `rerank` names a sentence-transformers cross-encoder: the first stage then fetches
    k * RERANK_CANDIDATES rows and the cross-encoder's (query, text) scores order them. `vector` is the
    query already embedded (`embed_queries`), for many queries at once; vector and hybrid use it in
    place of embedding `query` here, with the same index settings.
    """
    from lancedb.rerankers import RRFReranker

    from ragrpo.hardware import small_job

    if mode not in MODES:
        raise RagrpoError(f"search mode {mode!r}: use one of {', '.join(MODES)}")
    if not query or not query.strip():
        raise RagrpoError("the query is empty")
    if k < 1:
        raise RagrpoError(f"-k must be at least 1, got {k}")
    if where:
        check_where(table, where)
    if mode != "vector" and not _has_index(table, "FTS"):
        raise RagrpoError(f"--mode {mode} needs a full-text index, which this table lacks; "
                          "re-create it with `ragrpo index ... --overwrite`")
    fetch = k * RERANK_CANDIDATES if rerank else k
    if vector is not None and mode == "vector":
        builder = table.search(vector, query_type="vector")
    elif vector is not None and mode == "hybrid":
        builder = table.search(query_type="hybrid").vector(vector).text(query)
    else:
        builder = small_job(functools.partial(table.search, query, query_type=mode))  # LanceDB embeds it here
    if mode == "hybrid":
        builder = builder.rerank(RRFReranker())
    if mode != "fts" and _has_index(table, "IVF"):
        builder = builder.nprobes(NPROBES).refine_factor(REFINE_FACTOR)
    builder = builder.limit(fetch)
    if where:
        builder = builder.where(where, prefilter=True)
    try:
        rows = small_job(builder.to_list)  # or here, for hybrid
    except Exception as exc:  # LanceDB raises ValueError/RuntimeError/... for a filter it could not run
        if where:
            raise _filter_error(where, exc) from None
        raise
    for row in rows:
        row.pop(VECTOR_COLUMN, None)
    if rerank and rows:
        rows = rerank_rows(rerank, query, rows, text_column(table))[:k]
    return rows


@functools.lru_cache(maxsize=2)
def _cross_encoder(name: str):
    from sentence_transformers import CrossEncoder

    from ragrpo.models import device, quiet_transformers

    quiet_transformers()
    try:
        return CrossEncoder(name, device=device())
    except Exception as exc:
        raise RagrpoError(f"cross-encoder {name!r} could not be loaded: {str(exc).splitlines()[0][:160]}") from None


def rerank_rows(model: str, query: str, rows: list[dict], column: str) -> list[dict]:
    """`rows` ordered by the cross-encoder's score of (query, row[column]), best first."""
    scores = _cross_encoder(model).predict([(query, row[column]) for row in rows])
    for row, score in zip(rows, scores, strict=True):
        row["_rerank_score"] = float(score)
    return sorted(rows, key=lambda row: -row["_rerank_score"])


def score_of(row: dict) -> tuple[str, float]:
    """(name, value) of the score a search row carries: the reranker's, else its mode's."""
    name = next(c for c in SCORE_COLUMNS if c in row)
    return name.strip("_").replace("_", " "), row[name]


def search_table(name: str, query: str, *, db: str | Path = DEFAULT_DB, where: str | None = None, k: int = 5,
                 mode: str = "vector", rerank: str | None = None, storage_options: dict[str, str] | None = None):
    return search(open_table(name, db, storage_options), query, where=where, k=k, mode=mode, rerank=rerank)

