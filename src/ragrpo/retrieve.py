"""Prefiltered vector search over a table made by `ragrpo.index`.

The query text is embedded by the table's own embedding function (read back from the table's
metadata by LanceDB), the `where` filter is applied before the nearest-neighbour search (LanceDB's
prefilter, as in the write-up's `.where("release_year < 1990").limit(5)`), and rows come back as
plain dicts without their vectors, with `_distance`.
"""

from __future__ import annotations

from pathlib import Path

from ragrpo import RagrpoError
from ragrpo.index import DEFAULT_DB, VECTOR_COLUMN, open_table


def _filter_error(where: str, exc: Exception) -> RagrpoError:
    message = " ".join(str(exc).split())
    return RagrpoError(f"invalid --where {where!r}: {message[:200]}")


def search(table, query: str, *, where: str | None = None, k: int = 5, mode: str = "vector") -> list[dict]:
    """The `k` rows nearest to `query` among those satisfying `where` (an SQL filter)."""
    if mode != "vector":
        raise RagrpoError(f"search mode {mode!r} is not available here; use 'vector'")
    if not query or not query.strip():
        raise RagrpoError("the query is empty")
    if k < 1:
        raise RagrpoError(f"-k must be at least 1, got {k}")
    builder = table.search(query).limit(k)
    if where:
        builder = builder.where(where, prefilter=True)
    try:
        rows = builder.to_list()
    except Exception as exc:  # LanceDB raises ValueError/RuntimeError/... for a bad filter
        if where:
            raise _filter_error(where, exc) from None
        raise
    for row in rows:
        row.pop(VECTOR_COLUMN, None)
    return rows


def search_table(name: str, query: str, *, db: str | Path = DEFAULT_DB, where: str | None = None, k: int = 5,
                 mode: str = "vector"):
    return search(open_table(name, db), query, where=where, k=k, mode=mode)


def text_column(table) -> str:
    """The column the table embeds (its registry SourceField)."""
    from lancedb.embeddings import EmbeddingFunctionRegistry

    configs = EmbeddingFunctionRegistry.get_instance().parse_functions(table.schema.metadata)
    if not configs:
        raise RagrpoError("this table has no embedding function in its metadata; re-create it with `ragrpo index`")
    return next(iter(configs.values())).source_column
