"""Reading documents and prompts: local CSV/JSONL/Parquet files, folders of .txt/.md files, Hugging Face
datasets, builtin:movies and builtin:pydocs.

Everything arrives as a pandas DataFrame. `builtin:movies` is the corpus shipped in `ragrpo/data/`:
original synopses written for this project, in the column layout of the wiki movie-plots CSV
(`Release Year`, `Title`, `Origin/Ethnicity`, `Director`, `Cast`, `Genre`, `Wiki Page`, `Plot`).
`builtin:pydocs` is not shipped: it is read from the running Python's `pydoc_data.topics` (the
language-reference topics behind `help("assert")`), one row per topic: `id` (the topic key),
`heading` and `text`. Its wording therefore follows the Python version that reads it.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from ragrpo import RagrpoError

BUILTIN = {"builtin:movies": "movies.csv"}  # corpora shipped as files in ragrpo/data/
PYDOCS = "builtin:pydocs"  # built from the running Python's own help topics
_SUFFIXES = {".csv", ".jsonl", ".json", ".parquet"}


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("ragrpo") / "data" / BUILTIN[name]))


def _looks_like_path(source: str) -> bool:
    return Path(source).suffix.lower() in _SUFFIXES or source.startswith((".", "/", "~"))


def read_records(source: str):
    """Rows of `source` as a DataFrame; a missing file, unknown format or empty table is a RagrpoError."""
    return next(iter_records(source))


def iter_records(source: str, batch_rows: int | None = None):
    """Rows of `source` as DataFrames of at most `batch_rows` rows each (one frame when None), read as
    they are needed: a CSV, JSONL or Parquet file larger than memory is never held whole. Other
    sources (folders, datasets, built-in corpora) are read at once and cut into frames. Errors are
    RagrpoErrors, raised when the frame they concern is reached."""
    import pandas as pd

    if source == PYDOCS:
        yield from _slices(read_pydoc_topics(), batch_rows)
        return
    if source in BUILTIN:
        path = builtin_path(source)
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
    elif _looks_like_path(source):
        raise RagrpoError(f"input file {source} does not exist")
    elif source.startswith("builtin:"):
        raise RagrpoError(f"no built-in corpus {source!r}; built-in corpora: {', '.join([*BUILTIN, PYDOCS])}")
    else:
        yield from _slices(_read_hub_dataset(source), batch_rows)
        return
    if path.is_dir():
        yield from _slices(read_text_folder(path), batch_rows)
        return
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise RagrpoError(f"{path}: unsupported format {suffix!r}; use .csv, .jsonl or .parquet")
    rows = 0
    try:
        for frame in _file_frames(path, suffix, batch_rows):
            rows += len(frame)
            if len(frame):
                yield frame
    except RagrpoError:
        raise
    except pd.errors.EmptyDataError:
        raise RagrpoError(f"{path} is empty") from None
    except Exception as exc:
        where = f" after row {rows}" if rows else ""
        raise RagrpoError(f"{path} cannot be read as {suffix[1:]}{where}: {str(exc).splitlines()[0]}") from None
    if not rows:
        raise RagrpoError(f"{path} has no rows")


def _file_frames(path: Path, suffix: str, batch_rows: int | None):
    import pandas as pd

    if suffix == ".parquet":
        if batch_rows is None:
            yield pd.read_parquet(path)
            return
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as handle:
            for batch in handle.iter_batches(batch_size=batch_rows):
                yield batch.to_pandas()
    elif suffix == ".csv":
        if batch_rows is None:
            yield pd.read_csv(path)
        else:
            with pd.read_csv(path, chunksize=batch_rows) as reader:
                yield from reader
    elif suffix == ".jsonl" and batch_rows is not None:
        with pd.read_json(path, lines=True, chunksize=batch_rows) as reader:
            yield from reader
    else:
        yield pd.read_json(path, lines=suffix == ".jsonl")


def _slices(frame, batch_rows: int | None):
    if batch_rows is None:
        yield frame
        return
    for start in range(0, len(frame), batch_rows):
        yield frame.iloc[start:start + batch_rows].reset_index(drop=True)


TEXT_SUFFIXES = (".txt", ".md")


def read_text_folder(folder: Path):
    """One row per .txt/.md file under `folder` (recursively): `path` (relative, the id), `title`, `text`.

    The title is a Markdown file's first `# heading`, else the file name without its suffix.
    """
    import pandas as pd

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise RagrpoError(f"{folder} is a folder without .txt or .md files; give a folder of those or a "
                          ".csv, .jsonl or .parquet file")
    rows = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RagrpoError(f"{file} cannot be read as UTF-8 text: {exc}") from None
        heading = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), None)
        title = heading if file.suffix.lower() == ".md" and heading else file.stem
        rows.append({"path": file.relative_to(folder).as_posix(), "title": title, "text": text})
    return pd.DataFrame(rows)


# A topic opens with its heading underlined by a row of `*` (or `=` for a section); the body follows.
_TOPIC_HEADING = re.compile(r"(?P<heading>[^\n]+)\n[*=]{3,}[ \t]*\n")


def read_pydoc_topics():
    """One row per topic of `pydoc_data.topics`: `id` (the key, "assert"), `heading` ('The "assert"
    statement', the underline dropped) and `text` (the rest, verbatim but for the outer whitespace).

    A topic without an underlined first line keeps its whole text and takes its key as heading."""
    import pandas as pd

    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise RagrpoError(f"{PYDOCS} needs the standard library's pydoc_data module, which this Python lacks "
                          "(some Linux distributions package it separately)") from None
    rows = []
    for key, topic in sorted(topics.items()):
        topic = topic.strip()
        match = _TOPIC_HEADING.match(topic)
        heading, text = (match["heading"].strip(), topic[match.end():]) if match else (key, topic)
        rows.append({"id": key, "heading": heading, "text": text.strip()})
    return pd.DataFrame(rows)


def _read_hub_dataset(name: str):
    """The `train` split of a Hugging Face dataset (`name` or `name:split`)."""
    dataset_name, _, split = name.partition(":")
    try:
        from datasets import load_dataset

        frame = load_dataset(dataset_name, split=split or "train").to_pandas()
    except Exception as exc:
        raise RagrpoError(
            f"{name!r} is neither a local file nor a loadable Hugging Face dataset "
            f"({str(exc).splitlines()[0][:160]})"
        ) from None
    if frame.empty:
        raise RagrpoError(f"dataset {name} has no rows")
    return frame


def require_columns(frame, columns, source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RagrpoError(
            f"{source}: no column {missing[0]!r}; columns are: {', '.join(map(str, frame.columns))}"
        )
