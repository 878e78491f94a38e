"""Indexing builtin:movies into a real LanceDB table, prefiltered search, and RAG answers."""

import json
import os
import subprocess
import sys

import pytest
from conftest import PARAPHRASES

pytestmark = pytest.mark.integration


def ragrpo(*args):
    return subprocess.run([sys.executable, "-m", "ragrpo.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_every_filtered_row_satisfies_the_filter(movie_db):
    result = ragrpo("search", "a hero who is secretly the villain", "--table", "movies", "--db", movie_db,
                    "--where", "release_year < 1990", "-k", "20", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 20
    assert all(row["release_year"] < 1990 for row in rows)
    assert set(rows[0]) == {"release_year", "title", "origin_ethnicity", "director", "cast", "genre",
                            "wiki_page", "movie_plot", "chunk", "_distance"}
    assert [r["_distance"] for r in rows] == sorted(r["_distance"] for r in rows)


@pytest.mark.parametrize("query,title", PARAPHRASES.items())
def test_paraphrase_finds_its_movie(movie_db, query, title):
    from ragrpo.retrieval.search import search_table

    assert search_table("movies", query, db=movie_db, k=1)[0]["title"] == title


def test_table_embeds_its_own_queries_for_any_lancedb_client(movie_db):
    import lancedb

    table = lancedb.connect(movie_db).open_table("movies")
    assert table.count_rows() == 160
    hits = table.search("asteroid mine airlock sabotage").where("release_year >= 1990").limit(3).to_list()
    assert hits[0]["title"] == "Saboteur of Ceres Station"


def test_reindex_without_overwrite_keeps_the_table(movie_db):
    result = ragrpo("index", "builtin:movies", "--table", "movies", "--db", movie_db)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    import lancedb

    assert lancedb.connect(movie_db).open_table("movies").count_rows() == 160


def test_index_jsonl_with_renames(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in [
        {"Doc Id": 1, "Body": "Penguins huddle together through the Antarctic winter.", "Year": 2001},
        {"Doc Id": 2, "Body": "A recipe for sourdough bread with a long cold proof.", "Year": 1999},
        {"Doc Id": 3, "Body": "   ", "Year": 2005},
    ]))
    result = ragrpo("index", docs, "--table", "notes", "--db", tmp_path / "db", "--text-column", "text",
                    "--rename", "Body=text", "--rename", "Year=year")
    assert result.returncode == 0, result.stderr
    assert "indexed 2 documents as 2 chunks" in result.stdout and "1 rows with empty text skipped" in result.stdout
    found = ragrpo("search", "baking bread", "--table", "notes", "--db", tmp_path / "db", "--json", "-k", "1")
    row = json.loads(found.stdout)
    assert row["doc_id"] == 2 and row["year"] == 1999 and row["text"].startswith("A recipe")


def test_ask_prints_an_answer_and_its_sources(movie_db, tiny_run):
    query = "What's common in movies where the protagonist turns out to be the bad guy"
    result = ragrpo("ask", query, "--table", "movies", "--db", movie_db, "--model", tiny_run.merged,
                    "--where", "release_year < 1990", "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    answer, _, sources = result.stdout.partition("\nSources:\n")
    assert answer.strip()
    lines = sources.strip().splitlines()
    assert len(lines) == 5
    mark = "   <- the answer's words are drawn from this one"
    assert sum(line.endswith(mark) for line in lines) <= 1  # at most one source is marked
    years = [int(line.removesuffix(mark).rsplit("(", 1)[1].rstrip(")")) for line in lines]
    assert all(year < 1990 for year in years)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_training_retrieves_as_ask_does_through_a_vector_index(movie_db, tmp_path, mode):
    """Training embeds its questions in one batch, then searches as `ask` does: on a table with an
    IVF_HNSW_SQ index that means the same probes and the same refinement with full vectors, so the same
    rows with the same scores (the index's 8-bit vectors alone give other distances)."""
    import shutil

    from ragrpo.generation.rag import retrieve
    from ragrpo.retrieval.index import build_indexes, open_table
    from ragrpo.tuning.curriculum import retrieve_all

    shutil.copytree(movie_db, tmp_path / "db")
    table = open_table("movies", tmp_path / "db")
    assert "vector_idx" in build_indexes(table, "movie_plot", threshold=1)
    queries = ["a ferryman keeps a ledger of his passengers", "a seal steals a necklace at a parade",
               "lanterns for a festival are lost in a typhoon"]
    score = "_distance" if mode == "vector" else "_relevance_score"
    batched = retrieve_all(table, queries, where="release_year > 1900", k=4, mode=mode)
    for query, hits in zip(queries, batched, strict=True):
        alone, _ = retrieve(table, query, where="release_year > 1900", k=4, mode=mode)
        assert [h["title"] for h in hits] == [h["title"] for h in alone]
        assert [h[score] for h in hits] == pytest.approx([h[score] for h in alone], abs=1e-5)
