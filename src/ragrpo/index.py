"""Ingest: documents from CSV/JSONL/Parquet (or builtin:movies) into a LanceDB table that embeds its own queries.

The table's schema is a `LanceModel` built from the data: the text column is the embedding function's
`SourceField`, `vector` its `VectorField`, every other column keeps its type. The embedding function
comes from LanceDB's registry (`sentence-transformers`), so its name and settings are stored in the
table's metadata and any LanceDB client can later run `table.search("some text")` on it.

Nothing is written until the data has been read, checked and embedded: the vectors are computed first
and the table is created in one call, so a bad input or a failure while embedding leaves no table
behind (and `--overwrite` never drops the old table before the new one is ready).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ragrpo import RagrpoError
from ragrpo.data import read_records, require_columns
from ragrpo.models import device, quiet_transformers, resolve_embedder

DEFAULT_DB = "lancedb"
# The wiki movie-plots layout loads as it is and gives the write-up's column names.
WIKI_RENAMES = {"Release Year": "release_year", "Title": "title", "Plot": "movie_plot"}
TEXT_COLUMN_GUESSES = ("movie_plot", "text", "content", "plot", "document", "body", "passage")
VECTOR_COLUMN = "vector"


@dataclass
class IndexResult:
    table: str
    db: str
    rows: int
    columns: list[str]
    text_column: str
    embedder: str
    skipped_empty: int


def parse_renames(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """["Release Year=release_year", ...] -> {"Release Year": "release_year", ...}"""
    renames = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise RagrpoError(f"--rename {pair!r}: expected OLD=NEW")
        renames[old.strip()] = new.strip()
    return renames


def _snake(name: str) -> str:
    """'Origin/Ethnicity' -> 'origin_ethnicity': a name usable in a --where filter without quoting."""
    snake = re.sub(r"[^0-9a-zA-Z]+", "_", str(name)).strip("_").lower()
    return snake if snake and not snake[0].isdigit() else f"col_{snake}"


def normalize_columns(frame, renames: dict[str, str], source: str):
    """Apply --rename, then the wiki defaults, then snake_case every other column name."""
    require_columns(frame, list(renames), source)
    if all(c in frame.columns for c in WIKI_RENAMES):
        renames = {**{k: v for k, v in WIKI_RENAMES.items() if k not in renames}, **renames}
    mapping = {c: renames.get(c, _snake(c)) for c in frame.columns}
    seen: dict[str, str] = {}
    for old, new in mapping.items():
        if new in seen:
            raise RagrpoError(f"{source}: columns {seen[new]!r} and {old!r} both become {new!r}; use --rename")
        seen[new] = old
    if VECTOR_COLUMN in seen:
        raise RagrpoError(f"{source}: column name {VECTOR_COLUMN!r} is reserved for the embeddings; use --rename")
    return frame.rename(columns=mapping)


def _field_type(series):
    import pandas as pd

    if series.isna().all():  # an empty column (e.g. the wiki layout's blank `Wiki Page`) is text
        return str
    if pd.api.types.is_bool_dtype(series):
        return bool
    if pd.api.types.is_integer_dtype(series):
        return int
    if pd.api.types.is_float_dtype(series):
        return float | None
    return str


def embedding_function(embedding_model: str | None = None):
    from lancedb.embeddings import get_registry

    quiet_transformers()
    name = resolve_embedder(embedding_model)
    try:
        return get_registry().get("sentence-transformers").create(name=name, device=device())
    except Exception as exc:
        raise RagrpoError(f"embedding model {embedding_model!r} could not be loaded: {exc}") from None


def build_schema(frame, text_column: str, func):
    """A LanceModel subclass for `frame`: the text column embeds into `vector` through `func`."""
    from lancedb.pydantic import LanceModel, Vector
    from pydantic import create_model

    fields = {VECTOR_COLUMN: (Vector(func.ndims()), func.VectorField())}
    for column in frame.columns:
        if column == text_column:
            fields[column] = (str, func.SourceField())
        else:
            fields[column] = (_field_type(frame[column]), ...)
    return create_model("Document", __base__=LanceModel, **fields)


def prepare_frame(source: str, text_column: str | None, renames: dict[str, str]):
    """Read and normalise the input; returns (frame, text_column, rows skipped for empty text)."""
    frame = normalize_columns(read_records(source), renames, source)
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMN_GUESSES if c in frame.columns), None)
        if text_column is None:
            raise RagrpoError(
                f"{source}: no text column found (tried {', '.join(TEXT_COLUMN_GUESSES)}); pass --text-column"
            )
    require_columns(frame, [text_column], source)
    for column in frame.columns:
        if _field_type(frame[column]) is str:
            frame[column] = frame[column].fillna("").astype(str)
    keep = frame[text_column].str.strip() != ""
    skipped = int((~keep).sum())
    frame = frame[keep].reset_index(drop=True)
    if frame.empty:
        raise RagrpoError(f"{source}: column {text_column!r} is empty in every row")
    return frame, text_column, skipped


def index(
    source: str,
    table: str,
    db: str | Path = DEFAULT_DB,
    *,
    text_column: str | None = None,
    renames: dict[str, str] | None = None,
    embedding_model: str | None = None,
    overwrite: bool = False,
) -> IndexResult:
    """Read `source`, embed its text column and create LanceDB table `table` in `db`."""
    import lancedb

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", table):
        raise RagrpoError(f"table name {table!r}: use letters, digits, '_', '-' or '.'")
    frame, text_column, skipped = prepare_frame(source, text_column, renames or {})
    if not overwrite and Path(db).exists() and table in lancedb.connect(db).table_names():
        raise RagrpoError(f"table {table!r} already exists in {db}; pass --overwrite to replace it")

    func = embedding_function(embedding_model)
    schema = build_schema(frame, text_column, func)
    # Embed before touching the database: the registry sees a filled vector column and keeps it.
    frame[VECTOR_COLUMN] = func.compute_source_embeddings(frame[text_column].tolist())
    connection = lancedb.connect(db)
    connection.create_table(table, data=frame, schema=schema, mode="overwrite" if overwrite else "create")
    return IndexResult(
        table=table,
        db=str(db),
        rows=len(frame),
        columns=[c for c in frame.columns if c != VECTOR_COLUMN],
        text_column=text_column,
        embedder=func.name,
        skipped_empty=skipped,
    )


def open_table(table: str, db: str | Path = DEFAULT_DB):
    import lancedb

    if not Path(db).exists() or table not in lancedb.connect(db).table_names():
        raise RagrpoError(f"no table {table!r} in {db}; create it with `ragrpo index INPUT --table {table}`")
    return lancedb.connect(db).open_table(table)
