"""Ingest that streams: files are read frame by frame, each frame is embedded and handed to LanceDB before
the next is read, and LanceDB commits once; a failure anywhere leaves the table as it was."""

import json

import lancedb
import numpy as np
import pandas as pd
import pytest
from test_ingest import one_error_line, ragrpo

from ragrpo import RagrpoError
from ragrpo.data import iter_records, read_records

WORDS = ["harbour", "keeper", "ferry", "storm", "lantern", "orchard", "violin", "mine", "glacier", "circus",
         "archive", "telegraph", "vineyard", "lighthouse", "tram", "bakery"]


def documents(n: int, start: int = 0) -> list[dict]:
    """`n` short distinct documents with an id, a title, a year and a text."""
    return [{"doc": i, "title": f"Story {i}", "year": 1900 + i % 97,
             "text": f"Story {i} tells of a {WORDS[i % 16]} and a {WORDS[(i * 7 + 3) % 16]} in winter {i}."}
            for i in range(start, start + n)]


def write_jsonl(path, rows, tail: str = ""):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return path


# -- reading ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_files_are_read_frame_by_frame_and_add_up_to_the_whole_file(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    frame = pd.DataFrame(documents(10))
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".csv": lambda: frame.to_csv(path, index=False),
     ".parquet": lambda: frame.to_parquet(path, row_group_size=3)}[suffix]()
    frames = list(iter_records(str(path), 4))
    assert [len(f) for f in frames] == [4, 4, 2]
    whole = read_records(str(path))
    assert pd.concat(frames, ignore_index=True).equals(whole) and whole["doc"].tolist() == list(range(10))


def test_a_broken_line_is_reached_only_after_the_frames_before_it(tmp_path):
    """The frames before a broken last line come out first: the file is not parsed whole up front."""
    path = write_jsonl(tmp_path / "docs.jsonl", documents(9), tail="{not json\n")
    frames = iter_records(str(path), 4)
    assert [len(next(frames)), len(next(frames))] == [4, 4]
    with pytest.raises(RagrpoError, match=r"docs.jsonl cannot be read as jsonl after row 8"):
        list(frames)
    (tmp_path / "header.csv").write_text("doc,text\n")
    with pytest.raises(RagrpoError, match="has no rows"):
        list(iter_records(str(tmp_path / "header.csv"), 4))


def test_builtin_corpora_are_cut_into_frames_too():
    frames = list(iter_records("builtin:movies", 500))
    assert all(len(f) <= 500 for f in frames) and sum(map(len, frames)) == len(read_records("builtin:movies"))


# -- ingest -------------------------------------------------------------------------------------------

@pytest.fixture()
def frame_sizes(monkeypatch):
    """The size of every frame the ingest chunks and embeds."""
    from ragrpo.retrieval import index as module

    sizes, chunk_frame = [], module.chunk_frame

    def recording(frame, *args):
        sizes.append(len(frame))
        return chunk_frame(frame, *args)

    monkeypatch.setattr(module, "chunk_frame", recording)
    return sizes


def rows_of(db, table):
    return lancedb.connect(db).open_table(table).to_pandas().sort_values("doc").reset_index(drop=True)


@pytest.mark.integration
def test_a_streamed_ingest_holds_one_frame_at_a_time_and_writes_what_the_whole_input_would(tmp_path, frame_sizes):
    from ragrpo.retrieval.index import index
    from ragrpo.retrieval.search import search

    path = tmp_path / "docs.parquet"
    pd.DataFrame(documents(300)).to_parquet(path, row_group_size=50)
    streamed = index(str(path), "streamed", tmp_path / "db", batch_rows=64, precision="float32")
    assert frame_sizes == [64, 64, 64, 64, 44]
    frame_sizes.clear()
    whole = index(str(path), "whole", tmp_path / "db", batch_rows=None, precision="float32")
    assert frame_sizes == [300]
    assert (streamed.documents, streamed.chunks, streamed.rows) == (whole.documents, whole.chunks, whole.rows) \
        == (300, 300, 300)
    a, b = rows_of(tmp_path / "db", "streamed"), rows_of(tmp_path / "db", "whole")
    assert a.drop(columns="vector").equals(b.drop(columns="vector"))
    cosine = (np.stack(a["vector"]) * np.stack(b["vector"])).sum(axis=1)
    assert cosine.min() > 1 - 1e-5  # float32: batch composition does not change a vector
    db = lancedb.connect(tmp_path / "db")
    # one commit for all the frames: the streamed table has as many versions as the one written whole
    assert len(db.open_table("streamed").list_versions()) == len(db.open_table("whole").list_versions())
    table = db.open_table("streamed")
    assert search(table, "Story 123 tells of a", k=1, mode="fts")[0]["doc"] == 123
    # the registry's metadata came through: plain LanceDB embeds the query itself
    assert table.search(documents(1, 41)[0]["text"]).limit(1).to_list()[0]["doc"] == 41


@pytest.mark.integration
def test_a_failure_late_in_the_stream_leaves_the_previous_table_or_none(tmp_path):
    from ragrpo.retrieval.index import index

    db = tmp_path / "db"
    index(str(write_jsonl(tmp_path / "first.jsonl", documents(120))), "docs", db, id_column="doc", batch_rows=32)
    before = lancedb.connect(db).open_table("docs")
    version, content = before.version, rows_of(db, "docs")

    late_type = write_jsonl(tmp_path / "late_type.jsonl", [*documents(100, 500), {**documents(1, 600)[0], "year": "soon"}])
    late_column = write_jsonl(tmp_path / "late_column.jsonl", [*documents(100, 500), {**documents(1, 600)[0], "extra": 1}])
    broken = write_jsonl(tmp_path / "broken.jsonl", documents(100, 500), tail="{not json\n")
    cases = [(late_type, "does not fit its column's type"), (late_column, "column 'extra' appears after"),
             (broken, "cannot be read as jsonl after row 96")]
    for path, message in cases:
        for how in (["--overwrite"], ["--id-column", "doc"]):
            one_error_line(ragrpo("index", path, "--table", "docs", "--db", db, "--batch-rows", "32", *how), message)
            table = lancedb.connect(db).open_table("docs")
            assert table.version == version and rows_of(db, "docs").drop(columns="vector").equals(
                content.drop(columns="vector")), (path.name, how)
        # a new table that fails is not left behind, not even as data files without a manifest
        one_error_line(ragrpo("index", path, "--table", "fresh", "--db", db, "--batch-rows", "32"), message)
        assert lancedb.connect(db).list_tables().tables == ["docs"] and not (db / "fresh.lance").exists()

    # the same for an error that is not ours: it comes out as itself, not as LanceDB's wrapper
    from ragrpo.retrieval.embed import Embedder

    calls, encode = [], Embedder.encode

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("embedding ran out of memory")
        return encode(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Embedder, "encode", failing)
        with pytest.raises(MemoryError, match="ran out of memory"):
            index(str(tmp_path / "first.jsonl"), "docs", db, overwrite=True, batch_rows=32)
    assert lancedb.connect(db).open_table("docs").version == version and len(calls) == 3


@pytest.mark.integration
def test_a_number_column_empty_in_the_first_row_stays_a_number(tmp_path):
    """Types come from the whole first batch, not its first row: a rating missing from document 0 is null."""
    from ragrpo.retrieval.index import index

    rows = [{**row, "rating": None if row["doc"] == 0 else row["doc"] / 2} for row in documents(20)]
    index(str(write_jsonl(tmp_path / "docs.jsonl", rows)), "docs", tmp_path / "db", batch_rows=8)
    table = lancedb.connect(tmp_path / "db").open_table("docs")
    assert str(table.schema.field("rating").type) == "double"
    ratings = rows_of(tmp_path / "db", "docs")["rating"]
    assert np.isnan(ratings[0]) and ratings[1:].tolist() == [n / 2 for n in range(1, 20)]


def test_batch_rows_below_one_is_one_error_line(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", documents(3))
    one_error_line(ragrpo("index", path, "--table", "t", "--db", tmp_path / "db", "--batch-rows", "0"),
                   "--batch-rows 0")
    assert not (tmp_path / "db").exists()
