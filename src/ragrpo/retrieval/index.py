"""Ingest: documents from CSV/JSONL/Parquet, a folder of .txt/.md, a Hugging Face dataset or builtin:movies
into a LanceDB table that embeds its own queries.

The table's schema is a `LanceModel` built from the data: the text column is the embedding function's
`SourceField`, `vector` its `VectorField`, every other column keeps its type. The embedding function
comes from LanceDB's registry (`sentence-transformers`), so its name and settings are stored in the
table's metadata and any LanceDB client can later run `table.search("some text")` on it.

Long texts are cut into overlapping chunks of the embedder's tokens (`ragrpo.retrieval.embed`); every
chunk is a row that repeats its document's columns and adds `chunk` (0, 1, ...). The vectors come from
the fast path in `ragrpo.retrieval.embed` (within 1e-3 cosine of the registry function's own float32
vectors).

Ids and upserts: with `id_column`, a row's key is (id, chunk). Re-ingesting updates the chunks whose
key exists, inserts new ones, and deletes the chunks of re-ingested documents that the new version no
longer has, all in one `merge_insert` commit; so running the same ingest twice changes nothing, and a
document that got shorter leaves no stale chunks. Documents absent from the new input are kept.

The input streams: `iter_records` reads a CSV, JSONL or Parquet file `batch_rows` documents at a time,
and each batch is chunked, embedded and handed to LanceDB as Arrow record batches before the next is
read, so peak memory does not grow with the input (bench/ingest.py). Column types are decided from the
first batch. LanceDB writes data files as the batches arrive but commits the table version once, after
the last: a bad row late in the file or a failure while embedding leaves the previous version (a new
table that fails is removed, data files and all), and `--overwrite` never drops the old table before
the new one is ready. An upsert reads the input twice: first the ids only (to check them and to name
the documents whose stale chunks go), then everything.

Indexes are built afterwards (`build_indexes`); they only speed queries up (but `--mode fts` and
`hybrid` need the full-text one). An ingest killed between its commit and its index build leaves a
complete table without them: a plain re-run of the same command then builds the missing indexes.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragrpo import RagrpoError, hardware
from ragrpo.data import iter_records, read_records, require_columns
from ragrpo.models import device, quiet_transformers, resolve_embedder

DEFAULT_DB = "lancedb"
# The wiki movie-plots layout loads as it is and gives the write-up's column names.
WIKI_RENAMES = {"Release Year": "release_year", "Title": "title", "Plot": "movie_plot"}
TEXT_COLUMN_GUESSES = ("movie_plot", "text", "content", "plot", "document", "body", "passage")
VECTOR_COLUMN = "vector"
ID_COLUMNS = ("id", "doc_id", "document_id")  # a row's own id, where it has one (else a hash of its text)
CHUNK_COLUMN = "chunk"
DEFAULT_OVERLAP = 32  # embedder tokens shared by consecutive chunks of one document
INDEX_THRESHOLD = 10_000  # rows from which the vector and scalar indexes are built
# Documents read, chunked, embedded and handed to LanceDB at a time: peak memory stays flat in the
# input's size (bench/ingest.py), and a batch is long enough for embedding batches sorted by length.
BATCH_ROWS = 2048


@dataclass
class IndexResult:
    table: str
    db: str
    rows: int
    columns: list[str]
    text_column: str
    embedder: str
    skipped_empty: int
    documents: int = 0
    chunks: int = 0
    upserted: bool = False
    indexes: list[str] | None = None
    precision: str = "float32"
    repaired: bool = False  # an existing table only had its missing indexes built; no rows were written



def document_id(row: dict, column: str) -> str:
    """A row's document id: its first non-empty `ID_COLUMNS` value, else a hash of its `column` text."""
    for name in ID_COLUMNS:
        if row.get(name) not in (None, ""):
            return str(row[name])
    return "sha1:" + hashlib.sha1(str(row[column]).encode()).hexdigest()[:12]

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
        # a local embedder's error is not transient: no retries (LanceDB's default backs off for minutes)
        return get_registry().get("sentence-transformers").create(name=name, device=device(), max_retries=0)
    except Exception as exc:
        raise RagrpoError(f"embedding model {embedding_model!r} could not be loaded: {exc}") from None


def build_schema(frame, text_column: str, func, dim: int | None = None):
    """A LanceModel subclass for `frame`: the text column embeds into `vector` through `func`.

    `dim` is the vector size when the caller knows it; without it `func.ndims()` asks the registry's
    model, which loads a second copy of the embedder (about 4 s on a cold start)."""
    from lancedb.pydantic import LanceModel, Vector
    from pydantic import create_model

    fields = {VECTOR_COLUMN: (Vector(dim or func.ndims()), func.VectorField())}
    for column in frame.columns:
        if column == text_column:
            fields[column] = (str, func.SourceField())
        else:
            fields[column] = (_field_type(frame[column]), ...)
    return create_model("Document", __base__=LanceModel, **fields)


def find_text_column(frame, text_column: str | None, source: str) -> str:
    """`text_column` checked against the frame, or the first of TEXT_COLUMN_GUESSES it has."""
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMN_GUESSES if c in frame.columns), None)
        if text_column is None:
            raise RagrpoError(
                f"{source}: no text column found (tried {', '.join(TEXT_COLUMN_GUESSES)}); pass --text-column"
            )
    require_columns(frame, [text_column], source)
    return text_column


def clean_frame(frame, text_column: str, text_columns: set[str]):
    """Text columns (`text_columns`, decided once from the first rows) filled with "" and made str; rows
    with empty text dropped. Returns (frame, rows dropped)."""
    for column in text_columns:
        frame[column] = frame[column].fillna("").astype(str)
    keep = frame[text_column].str.strip() != ""
    return frame[keep].reset_index(drop=True), int((~keep).sum())


def prepare_frame(source: str, text_column: str | None, renames: dict[str, str]):
    """Read and normalise the whole input at once; returns (frame, text_column, rows skipped for empty text)."""
    frame = normalize_columns(read_records(source), renames, source)
    text_column = find_text_column(frame, text_column, source)
    frame, skipped = clean_frame(frame, text_column, {c for c in frame.columns if _field_type(frame[c]) is str})
    if frame.empty:
        raise RagrpoError(f"{source}: column {text_column!r} is empty in every row")
    return frame, text_column, skipped


def chunk_frame(frame, text_column: str, embedder, size: int, overlap: int):
    """One row per chunk: the parent's columns (id and metadata) repeated, its text cut into chunks,
    and `chunk` = 0, 1, ... numbering the chunks of each document; also the chunks' input ids where the
    chunking pass has them (`Embedder.chunk`), so a text that stayed whole is tokenized once."""
    pieces, ids = embedder.chunk(frame[text_column].tolist(), size, overlap, return_ids=True)
    counts = [len(p) for p in pieces]
    chunks = frame.loc[frame.index.repeat(counts)].reset_index(drop=True)
    chunks[text_column] = [text for parts in pieces for text in parts]
    chunks[CHUNK_COLUMN] = [n for count in counts for n in range(count)]
    return chunks, counts, ids


def _sql_literal(value) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value.item() if hasattr(value, "item") else value)


def _embed(embedder, texts: list[str], counts: list[int], bar, ids: list | None = None):
    """Vectors for `texts`; `bar` (tqdm) counts documents, one when all its chunks are embedded."""
    parent = np.repeat(np.arange(len(counts)), counts)
    left = np.array(counts)
    start = bar.n

    def on_batch(indices):
        np.subtract.at(left, parent[indices], 1)
        bar.update(start + int((left == 0).sum()) - bar.n)

    return embedder.encode(texts, ids=ids, on_batch=on_batch)


def _check_upsert(existing, frame, table: str) -> None:
    have = [name for name in existing.schema.names if name != VECTOR_COLUMN]
    new = [*frame.columns, CHUNK_COLUMN]
    if set(have) != set(new):
        raise RagrpoError(f"table {table!r} has columns {', '.join(have)} but the input gives {', '.join(new)}; "
                          "upsert the same layout or pass --overwrite")


def index(
    source: str,
    table: str,
    db: str | Path = DEFAULT_DB,
    *,
    text_column: str | None = None,
    renames: dict[str, str] | None = None,
    embedding_model: str | None = None,
    overwrite: bool = False,
    id_column: str | None = None,
    chunk_size: int | None = None,
    chunk_overlap: int = DEFAULT_OVERLAP,
    index_threshold: int = INDEX_THRESHOLD,
    precision: str = "auto",
    progress: bool = False,
    storage_options: dict[str, str] | None = None,
    batch_rows: int | None = BATCH_ROWS,
) -> IndexResult:
    """Read `source`, chunk and embed its text column, and create (or, with `id_column`, upsert into)
    LanceDB table `table` in `db`; then build the full-text index, and the vector and scalar indexes
    once the table has `index_threshold` rows. `db` is a folder or an object-store URI (`connect`).

    The input streams through in frames of `batch_rows` documents (None: all at once), each read,
    chunked, embedded and handed to LanceDB before the next is read; LanceDB commits once, at the end."""
    import pyarrow as pa
    from tqdm import tqdm

    from ragrpo.retrieval.embed import Embedder

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", table):
        raise RagrpoError(f"table name {table!r}: use letters, digits, '_', '-' or '.'")
    if batch_rows is not None and batch_rows < 1:
        raise RagrpoError(f"--batch-rows {batch_rows}: give at least 1 document per batch")
    renames = renames or {}
    frames = (normalize_columns(frame, renames, source) for frame in iter_records(source, batch_rows))
    first = next(frames)
    text_column = find_text_column(first, text_column, source)
    if CHUNK_COLUMN in first.columns:
        raise RagrpoError(f"{source}: column name {CHUNK_COLUMN!r} is reserved for chunk numbers; use --rename")
    if id_column is not None:
        require_columns(first, [id_column], source)
        if id_column == text_column:
            raise RagrpoError(f"--id-column {id_column!r} is the text column; name a column of document ids")
    exists = has_table(table, db, storage_options)
    upsert = exists and id_column is not None and not overwrite
    if exists and not overwrite and not upsert:
        # A table whose ingest was killed between its commit and its index build has all its rows but
        # lacks indexes: a plain re-run builds them (and writes no rows) instead of refusing.
        existing = open_table(table, db, storage_options)
        column = embedding_config(existing).source_column
        missing = missing_indexes(existing, column, index_threshold)
        if not missing:
            raise RagrpoError(f"table {table!r} already exists in {db}; pass --overwrite to replace it, "
                              "or --id-column to upsert into it")
        built = build_indexes(existing, column, index_threshold)
        return IndexResult(table=table, db=str(db), rows=existing.count_rows(),
                           columns=[c for c in existing.schema.names if c != VECTOR_COLUMN], text_column=column,
                           embedder="", skipped_empty=0, indexes=built, repaired=True)
    # Column types are decided from the first frame; a text column stays text in every later frame.
    text_columns = {c for c in first.columns if _field_type(first[c]) is str}
    if upsert:
        _check_upsert(open_table(table, db, storage_options), first, table)
    ids_given = _document_ids(source, renames, text_column, id_column, text_columns, batch_rows) \
        if id_column is not None else None

    embedder = Embedder.load(resolve_embedder(embedding_model), precision=precision)
    size = chunk_size or embedder.max_tokens - 2  # [CLS] and [SEP] take two of the model's positions
    if size > embedder.max_tokens - 2 or size < 1:
        raise RagrpoError(f"--chunk-size {size}: the embedder reads at most {embedder.max_tokens - 2} tokens "
                          "per text (longer chunks would be truncated)")
    func = embedding_function(embedding_model)
    columns = [*first.columns, CHUNK_COLUMN]
    # typed from the whole first frame, as `text_columns` was (one row would type a column empty there as text)
    schema = build_schema(first.assign(**{CHUNK_COLUMN: 0}), text_column, func, dim=embedder.dim)
    # Nullable fields in the input's column order, as LanceDB gives a table written from a DataFrame: rows
    # added later with plain LanceDB (`table.add`) may leave metadata columns out.
    fields = {field.name: field for field in schema.to_arrow_schema()}
    arrow_schema = pa.schema([fields[c].with_nullable(True) for c in [*columns, VECTOR_COLUMN]])
    counted = {"documents": 0, "chunks": 0, "skipped": 0}
    failure: list[BaseException] = []

    def embedded_batches():
        # disable=None: tqdm shows the bar only when stderr is a terminal (no bar in logs or pipes).
        with tqdm(unit="doc", desc="embedding", disable=None if progress else True, leave=False,
                  dynamic_ncols=True) as bar:
            for frame in itertools.chain([first], frames):
                frame, skipped = clean_frame(_same_columns(frame, first.columns, source, counted["documents"]),
                                             text_column, text_columns)
                counted["skipped"] += skipped
                if frame.empty:
                    continue
                chunks, counts, ids = chunk_frame(frame, text_column, embedder, size, chunk_overlap)
                chunks[VECTOR_COLUMN] = list(_embed(embedder, chunks[text_column].tolist(), counts, bar, ids))
                done = counted["documents"]
                counted["documents"] += len(counts)
                counted["chunks"] += len(chunks)
                yield from _arrow(chunks, arrow_schema, source, done + 1, done + len(counts)).to_batches()
                del chunks, frame, ids
                hardware.release_memory()  # else freed batches stay in the heap: RSS grows with the input
        if not counted["documents"]:
            raise RagrpoError(f"{source}: column {text_column!r} is empty in every row")

    def kept_failure(batches):
        # LanceDB reports an error raised while it reads the stream as its own RuntimeError; keep ours.
        try:
            yield from batches
        except BaseException as exc:
            failure.append(exc)
            raise

    reader = pa.RecordBatchReader.from_batches(arrow_schema, kept_failure(embedded_batches()))
    connection = connect(db, storage_options)
    try:
        if upsert:
            target = connection.open_table(table)
            # One commit: update chunks that exist, insert new ones, and delete the chunks of re-ingested
            # documents that the new version no longer has (a document that got shorter).
            listed = ", ".join(_sql_literal(v) for v in ids_given)
            (target.merge_insert([id_column, CHUNK_COLUMN]).when_matched_update_all().when_not_matched_insert_all()
             .when_not_matched_by_source_delete(f"{id_column} IN ({listed})").execute(reader))
        else:
            target = connection.create_table(table, data=reader, schema=schema,
                                             mode="overwrite" if overwrite else "create")
    except BaseException as exc:
        if not exists:  # a create that failed leaves data files without a manifest: remove them
            _drop_debris(connection, table)
        if failure and failure[0] is not exc:
            raise failure[0] from None
        raise
    built = build_indexes(target, text_column, index_threshold, id_column=id_column)
    return IndexResult(
        table=table,
        db=str(db),
        rows=target.count_rows(),
        columns=columns,
        text_column=text_column,
        embedder=func.name,
        skipped_empty=counted["skipped"],
        documents=counted["documents"],
        chunks=counted["chunks"],
        upserted=upsert,
        indexes=built,
        precision=embedder.dtype,
    )


def _same_columns(frame, columns, source: str, documents_before: int):
    """`frame` with the first frame's columns: one a later frame lacks (a JSONL key no row of it has)
    is added empty; one the first frame lacked is an error."""
    extra = [c for c in frame.columns if c not in columns]
    if extra:
        raise RagrpoError(f"{source}: column {extra[0]!r} appears after {documents_before} documents, "
                          "absent from the first rows; give every row the same columns")
    return frame.reindex(columns=columns)


def _arrow(chunks, arrow_schema, source: str, first: int, last: int):
    """The chunks as an Arrow table of the table's schema; a value that does not fit its column's type
    (decided from the first rows) is one RagrpoError naming the documents (1-based, of those with text)."""
    import pyarrow as pa

    try:
        return pa.Table.from_pandas(chunks[arrow_schema.names], schema=arrow_schema, preserve_index=False)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        detail = str(exc.args[0] if exc.args else exc).splitlines()[0][:200]
        raise RagrpoError(f"{source}: a value among documents {first}..{last} does not fit "
                          f"its column's type, decided from the first rows ({detail})") from None


def _document_ids(source: str, renames: dict, text_column: str, id_column: str, text_columns: set[str],
                  batch_rows: int | None) -> list:
    """The ids of the input's documents that have text, read in a first pass over the input (ids only
    are kept); an id given twice is a RagrpoError."""
    seen: set = set()
    ids = []
    for frame in iter_records(source, batch_rows):
        frame = normalize_columns(frame, renames, source)
        require_columns(frame, [id_column, text_column], source)
        frame, _ = clean_frame(frame[[id_column, text_column]].copy(), text_column, text_columns & {text_column})
        for value in frame[id_column]:
            if value in seen:
                raise RagrpoError(f"{source}: --id-column {id_column!r} repeats the id {_sql_literal(value)}; "
                                  "ids must be unique for an upsert")
            seen.add(value)
            ids.append(value)
    return ids


def _drop_debris(connection, table: str) -> None:
    """Remove what a failed create left: LanceDB lists a table folder that has data files but no manifest."""
    if table in table_names(connection):
        connection.drop_table(table)


def _scalar_index_type(table, column: str, rows: int) -> str | None:
    import pyarrow as pa

    kind = table.schema.field(column).type
    if pa.types.is_boolean(kind):
        return "BITMAP"
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return "BTREE"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        # Few distinct values (genre, country): a bitmap; near-unique strings (ids, titles): a B-tree,
        # which Lance builds on utf8 only (a large_utf8 column of ids stays unindexed).
        distinct = len(table.search().select([column]).limit(rows).to_arrow()[column].unique())
        if distinct <= 1000:
            return "BITMAP"
        return "BTREE" if pa.types.is_string(kind) else None
    return None


def missing_indexes(table, text_column: str, threshold: int = INDEX_THRESHOLD) -> list[tuple[str, str]]:
    """(column, kind) of each index the table should have and lacks: the full-text index on the text column
    always; from `threshold` rows on, the vector index and a scalar index on every other filterable column."""
    have = {ix.name for ix in table.list_indices()}
    missing = [] if f"{text_column}_idx" in have else [(text_column, "FTS")]
    rows = table.count_rows()
    if rows < threshold:
        return missing
    if f"{VECTOR_COLUMN}_idx" not in have:
        missing.append((VECTOR_COLUMN, "IVF_HNSW_SQ"))
    for column in table.schema.names:
        if column in (VECTOR_COLUMN, text_column) or f"{column}_idx" in have:
            continue
        kind = _scalar_index_type(table, column, rows)
        if kind:
            missing.append((column, kind))
    return missing


def build_indexes(table, text_column: str, threshold: int = INDEX_THRESHOLD, *, id_column=None) -> list[str]:
    """A native full-text index on the text column always; from `threshold` rows on, an IVF_HNSW_SQ
    vector index and a scalar index on every other filterable column. An existing index is brought
    up to date with the new rows instead (`optimize`). Returns the names of the indexes built."""
    if table.list_indices():
        table.optimize()  # adds rows written since the indexes were built
    built = []
    for column, kind in missing_indexes(table, text_column, threshold):
        if kind == "FTS":
            table.create_fts_index(column, use_tantivy=False, replace=True)
        elif column == VECTOR_COLUMN:
            # Partitions of about sqrt(rows) vectors; HNSW inside each keeps recall high at few probes.
            from lancedb.index import IvfHnswSq

            partitions = max(1, int(table.count_rows()**0.5) // 4)
            table.create_index(VECTOR_COLUMN, config=IvfHnswSq(distance_type="l2", num_partitions=partitions))
        else:
            table.create_scalar_index(column, index_type=kind)
        built.append(f"{column}_idx")
    return built


def is_uri(db: str | Path) -> bool:
    """True for object-store URIs (s3://bucket/path, gs://, az://, memory://): no local folder to check."""
    return "://" in str(db)


def parse_storage_options(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """["aws_region=eu-west-1", ...] -> {"aws_region": "eu-west-1", ...}, LanceDB's `storage_options`."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RagrpoError(f"--storage-option {pair!r}: expected KEY=VALUE, e.g. aws_region=us-east-1")
        options[key.strip()] = value
    return options


STORE_HINTS = {  # S3's error codes -> what the user can change
    "NoSuchBucket": "create the bucket or fix the URI",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID or --storage-option aws_access_key_id",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY or --storage-option aws_secret_access_key",
    "AccessDenied": "check the credentials and the bucket's policy",
}


def _store_error(db, exc: Exception) -> str:
    """One line for an object store's refusal, from the error text LanceDB passes up from Rust: the S3
    error code and message where the server replied, else the connection failure."""
    text, where = str(exc), f"cannot open LanceDB at {db}"
    code, message = re.search(r"<Code>([^<]+)</Code>", text), re.search(r"<Message>([^<]+)</Message>", text)
    if code:
        hint = STORE_HINTS.get(code.group(1))
        detail = f"{code.group(1)}: {message.group(1)}" if message else code.group(1)
        return f"{where}: {detail}" + (f"; {hint}" if hint else "")
    if "BadScheme" in text:
        return f"{where}: the endpoint is plain HTTP; set AWS_ALLOW_HTTP=true (or --storage-option allow_http=true)"
    refused = re.search(r'kind: Connect.*?message: "([^"]+)"', text)
    if refused:
        return f"{where}: cannot reach the endpoint ({refused.group(1)}); check AWS_ENDPOINT_URL"
    return f"{where}: {text.split(', location:')[0].splitlines()[0][:300] if text else type(exc).__name__}"


def connect(db: str | Path = DEFAULT_DB, storage_options: dict[str, str] | None = None):
    """The LanceDB connection to `db`, a local folder or an object-store URI. The object store reads the
    standard AWS variables itself (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    AWS_ALLOW_HTTP); `storage_options` override them. Connecting to a URI lists it, so a missing bucket
    or refused credentials are one RagrpoError here rather than a traceback later. A local folder is
    created if missing (callers that only read check for it first)."""
    import lancedb

    try:
        return lancedb.connect(str(db) if is_uri(db) else db, storage_options=storage_options or None)
    except (OSError, ValueError, RuntimeError) as exc:
        raise RagrpoError(_store_error(db, exc)) from None


def table_names(connection, db: str | Path = "") -> list[str]:
    """Every table's name (`table_names()` stops at 10 by default; `list_tables` pages)."""
    names, token = [], None
    try:
        while True:
            page = connection.list_tables(page_token=token)
            names += page.tables
            token = page.page_token
            if not token:
                return names
    except (OSError, ValueError, RuntimeError) as exc:
        raise RagrpoError(_store_error(db, exc)) from None


def has_table(table: str, db: str | Path = DEFAULT_DB, storage_options: dict[str, str] | None = None) -> bool:
    if not is_uri(db) and not Path(db).exists():
        return False  # connecting would create the folder
    return table in table_names(connect(db, storage_options), db)


def open_table(table: str, db: str | Path = DEFAULT_DB, storage_options: dict[str, str] | None = None):
    """Table `table` of `db` (a folder or an object-store URI); a missing one is a RagrpoError."""
    connection = None if not is_uri(db) and not Path(db).exists() else connect(db, storage_options)
    if connection is None or table not in table_names(connection, db):
        raise RagrpoError(f"no table {table!r} in {db}; create it with `ragrpo index INPUT --table {table}`")
    return connection.open_table(table)


def embedding_config(table):
    """The table's embedding function and its source column, as LanceDB's registry reads its metadata."""
    from lancedb.embeddings import EmbeddingFunctionRegistry

    configs = EmbeddingFunctionRegistry.get_instance().parse_functions(table.schema.metadata)
    if not configs:
        raise RagrpoError("this table has no embedding function in its metadata; re-create it with `ragrpo index`")
    return next(iter(configs.values()))


def text_column(table) -> str:
    """The column the table embeds (its registry SourceField)."""
    return embedding_config(table).source_column
