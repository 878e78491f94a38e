"""Ingest at scale: chunking, the fast embedding path's accuracy, upserts, indexes, search modes, rerank."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ragrpo import RagrpoError

MOVIE_COLUMNS = {"release_year", "title", "origin_ethnicity", "director", "cast", "genre", "wiki_page",
                 "movie_plot", "chunk"}


def ragrpo(*args):
    return subprocess.run([sys.executable, "-m", "ragrpo.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def one_error_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def embedder():
    from ragrpo.models import resolve_embedder
    from ragrpo.retrieval.embed import Embedder

    return Embedder.load(resolve_embedder(None), precision="bfloat16")


# -- data ---------------------------------------------------------------------------------------------

def test_text_folder_reads_txt_and_md_recursively(tmp_path):
    from ragrpo.data import read_records

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Plain notes.")
    (tmp_path / "sub" / "b.md").write_text("intro\n# Heading Two\nbody")
    (tmp_path / "skip.csv").write_text("x\n1\n")
    frame = read_records(str(tmp_path))
    assert frame.to_dict("records") == [
        {"path": "a.txt", "title": "a", "text": "Plain notes."},
        {"path": "sub/b.md", "title": "Heading Two", "text": "intro\n# Heading Two\nbody"},
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RagrpoError, match="without .txt or .md"):
        read_records(str(tmp_path / "empty"))


# -- chunking and the fast path (real MiniLM) -----------------------------------------------------------

@pytest.mark.integration
def test_chunks_are_verbatim_overlapping_windows(embedder):
    text = " ".join(f"word{n} alpha beta" for n in range(300))  # ~1,500 tokens
    [chunks] = embedder.chunk([text], 100, 20)
    assert len(chunks) > 10
    starts = [text.index(chunk) for chunk in chunks]  # every chunk is a verbatim slice, in order
    ends = [start + len(chunk) for start, chunk in zip(starts, chunks)]
    assert starts[0] == 0 and ends[-1] == len(text)
    assert all(s2 < e1 for e1, s2 in zip(ends, starts[1:])), "consecutive chunks must overlap"
    assert all(s1 < s2 for s1, s2 in itertools.pairwise(starts))
    sizes = [len(embedder.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert max(sizes) <= 100 + 2  # re-tokenizing a slice can split its edge words differently
    assert embedder.chunk(["short text"], 100, 20) == [["short text"]]
    with pytest.raises(RagrpoError, match="--chunk-overlap"):
        embedder.chunk([text], 100, 100)


@pytest.mark.integration
def test_chunking_hands_whole_texts_token_ids_to_encode(embedder):
    long = " ".join(f"word{n} alpha beta" for n in range(100))
    texts = ["A lighthouse keeper's log.", long, "Bandits raid a caravan."]
    chunks, ids = embedder.chunk(texts, 100, 20, return_ids=True)
    flat = [c for parts in chunks for c in parts]
    assert len(ids) == len(flat) and len(chunks[1]) > 1
    whole = embedder.tokenizer([texts[0], texts[2]])["input_ids"]  # [CLS] ... [SEP], as encode tokenizes
    assert ids[0] == whole[0] and ids[-1] == whole[1]
    assert all(row is None for row in ids[1:-1])  # windows are tokenized again from their own text
    assert np.array_equal(embedder.encode(flat, ids=ids), embedder.encode(flat))


@pytest.mark.integration
def test_fast_embedding_stays_within_1e3_cosine_of_float32_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    from ragrpo.data import read_records

    plots = read_records("builtin:movies")["Plot"].tolist()
    # Mixed lengths in one call: short phrases, whole plots, and plots doubled (past 254 tokens: truncated).
    texts = [p[:60] for p in plots[:40]] + plots + [p + " " + p for p in plots[:40]]
    reference = SentenceTransformer(embedder.name, device="cpu").encode(texts, normalize_embeddings=True)
    fast = embedder.encode(texts)
    assert embedder.dtype == "bfloat16"  # the check on the first batch passed, so bf16 ran throughout
    gap = 1.0 - (fast * reference).sum(axis=1)
    assert gap.max() <= 1e-3, f"max 1 - cosine {gap.max():.2e}"
    assert np.allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)



@pytest.mark.integration
def test_embedder_without_a_fast_path_uses_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    from ragrpo.retrieval.embed import Embedder

    model = SentenceTransformer(embedder.name, device="cpu")
    fallback = Embedder(embedder.name, model.tokenizer, model.max_seq_length, fallback=model)
    texts = ["A lighthouse keeper's log.", "Bandits raid a caravan near the monastery at dusk."]
    assert fallback.dim == embedder.dim == 384
    vectors = fallback.encode(texts)
    assert vectors.shape == (2, 384)
    assert np.allclose(vectors, model.encode(texts, normalize_embeddings=True), atol=1e-6)

def test_packed_linears_compute_what_the_plain_bf16_bert_does():
    import torch
    from conftest import needs_packing
    from transformers import BertConfig, BertModel

    from ragrpo.retrieval.embed import pack_linears

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    plain = BertModel(config).eval().to(torch.bfloat16)
    packed = BertModel(config).eval().to(torch.bfloat16)
    packed.load_state_dict(plain.state_dict())
    needs_packing(torch.bfloat16)
    assert pack_linears(packed) == 12  # q, k, v, attention output, intermediate (with its GELU), output
    assert isinstance(packed.encoder.layer[0].intermediate.intermediate_act_fn, torch.nn.Identity)
    ids = torch.randint(0, 100, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.inference_mode():
        want = plain(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        got = packed(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    # the same bf16 arithmetic in another order: a few bf16 steps apart at most, on values of order 1
    assert (got - want).abs().max() < 0.05 and (got - want).abs().mean() < 0.003


# -- upserts ------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_id_column_upsert_is_idempotent_and_drops_stale_chunks(tmp_path):
    import lancedb

    from ragrpo.retrieval.index import index

    docs, db = tmp_path / "docs", tmp_path / "db"
    docs.mkdir()
    long_text = " ".join(f"Chapter {n}: the lighthouse keeper counts ships in the fog." for n in range(60))
    (docs / "long.md").write_text("# Lighthouse\n" + long_text)
    (docs / "bread.txt").write_text("A recipe for sourdough bread with a long cold proof.")
    args = ["index", docs, "--table", "notes", "--db", db, "--id-column", "path", "--chunk-size", "64"]

    def table():  # opened afresh: a handle does not see other processes' commits by default
        return lancedb.connect(db).open_table("notes")

    index(str(docs), "notes", db, id_column="path", chunk_size=64)  # the library call behind the command
    before = table().to_pandas().drop(columns="vector").sort_values(["path", "chunk"]).reset_index(drop=True)
    assert (before["path"] == "long.md").sum() > 5 and (before["path"] == "bread.txt").sum() == 1

    again = ragrpo(*args)  # the same ingest twice: no duplicate rows, same content
    assert again.returncode == 0 and "upserted" in again.stdout, again.stderr
    after = table().to_pandas().drop(columns="vector").sort_values(["path", "chunk"]).reset_index(drop=True)
    assert after.equals(before)

    (docs / "long.md").write_text("# Lighthouse\nThe keeper retired.")  # now one chunk
    (docs / "bread.txt").unlink()  # absent from the input: kept in the table
    (docs / "tea.txt").write_text("Green tea steeps for two minutes.")
    assert index(str(docs), "notes", db, id_column="path", chunk_size=64).upserted
    rows = table().to_pandas().sort_values("path")
    assert rows[["path", "chunk"]].values.tolist() == [["bread.txt", 0], ["long.md", 0], ["tea.txt", 0]]
    assert rows.set_index("path").loc["long.md", "text"].endswith("The keeper retired.")
    # The registry metadata survives the merge: plain LanceDB embeds the query itself.
    assert table().search("steeping tea").limit(1).to_list()[0]["path"] == "tea.txt"
    assert [r["path"] for r in table().search("keeper retired", query_type="fts").limit(1).to_list()] == ["long.md"]


def test_index_input_errors(tmp_path):
    (tmp_path / "dup.csv").write_text("doc,text\n1,a cat\n1,a dog\n")
    one_error_line(ragrpo("index", tmp_path / "dup.csv", "--table", "t", "--db", tmp_path / "db",
                          "--id-column", "doc"), "repeats the id 1")
    one_error_line(ragrpo("index", tmp_path / "dup.csv", "--table", "t", "--db", tmp_path / "db",
                          "--id-column", "docid"), "no column 'docid'")
    assert not (tmp_path / "db").exists()


@pytest.mark.integration
def test_chunk_size_beyond_the_embedder_and_reingest_without_id(tmp_path, movie_db):
    one_error_line(ragrpo("index", "builtin:movies", "--table", "t", "--db", tmp_path / "db", "--chunk-size", "600"),
                   "--chunk-size 600", "at most 254")
    assert not (tmp_path / "db").exists()
    one_error_line(ragrpo("index", "builtin:movies", "--table", "movies", "--db", movie_db),
                   "--overwrite", "--id-column")


# -- indexes ------------------------------------------------------------------------------------------

def test_indexes_built_from_the_threshold_and_filters_still_hold(tmp_path):
    """A table of real layout with synthetic vectors (no embedding needed): past the threshold it gets
    an IVF_HNSW_SQ vector index, B-tree/bitmap scalar indexes and a full-text index, and prefiltered
    vector search through them returns only matching rows, nearest first."""
    import lancedb
    import pandas as pd
    import pyarrow as pa

    from ragrpo.retrieval.index import build_indexes

    rng = np.random.default_rng(0)
    n = 1200
    vectors = rng.normal(size=(n, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    frame = pd.DataFrame({"doc_id": [f"d{i}" for i in range(n)], "chunk": 0, "year": rng.integers(1950, 2020, n),
                          "genre": rng.choice(["drama", "comedy", "horror"], n),
                          "text": [f"story number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(n)],
                          "vector": list(vectors)})
    schema = pa.schema([("doc_id", pa.string()), ("chunk", pa.int64()), ("year", pa.int64()), ("genre", pa.string()),
                        ("text", pa.string()), ("vector", pa.list_(pa.float32(), 16))])
    table = lancedb.connect(tmp_path / "db").create_table("t", data=pa.Table.from_pandas(frame, schema=schema))
    assert build_indexes(table, "text", threshold=n + 1) == ["text_idx"]
    built = build_indexes(table, "text", threshold=n)
    assert set(built) == {"vector_idx", "doc_id_idx", "chunk_idx", "year_idx", "genre_idx"}
    kinds = {ix.name: ix.index_type.upper().replace("_", "") for ix in table.list_indices()}  # e.g. IvfHnswSq
    assert kinds == {"vector_idx": "IVFHNSWSQ", "year_idx": "BTREE", "chunk_idx": "BTREE", "doc_id_idx": "BTREE",
                     "genre_idx": "BITMAP", "text_idx": "FTS"}
    hits = table.search(vectors[7]).nprobes(20).where("year < 1980", prefilter=True).limit(10).to_list()
    assert len(hits) == 10 and all(h["year"] < 1980 for h in hits)
    if frame.loc[7, "year"] < 1980:
        assert hits[0]["doc_id"] == "d7"
    exact = table.search(vectors[3]).limit(1).to_list()
    assert exact[0]["doc_id"] == "d3"


# -- search modes -------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
def test_every_mode_finds_the_movie_and_honours_the_filter(movie_db, mode):
    from ragrpo.retrieval.index import open_table
    from ragrpo.retrieval.search import search

    table = open_table("movies", movie_db)
    rows = search(table, "asteroid mine airlocks sabotage recording", where="release_year >= 1990", k=8, mode=mode)
    assert rows[0]["title"] == "Saboteur of Ceres Station"
    assert all(r["release_year"] >= 1990 for r in rows) and len(rows) == 8
    assert set(rows[0]) == MOVIE_COLUMNS | {{"vector": "_distance", "fts": "_score", "hybrid": "_relevance_score"}[mode]}
    if mode == "hybrid":  # reciprocal rank fusion with k=60: at most 2/61, best first
        scores = [r["_relevance_score"] for r in rows]
        assert scores == sorted(scores, reverse=True) and scores[0] <= 2 / 61 + 1e-9


@pytest.mark.integration
def test_bad_mode_and_where_name_the_problem(movie_db):
    from ragrpo.generation.rag import retrieve
    from ragrpo.retrieval.index import open_table
    from ragrpo.retrieval.search import search

    table = open_table("movies", movie_db)
    with pytest.raises(RagrpoError, match="search mode 'semantic'"):
        search(table, "q", mode="semantic")
    with pytest.raises(RagrpoError, match="search mode 'semantic'"):
        retrieve(table, "q", mode="semantic")
    for mode in ("vector", "fts", "hybrid"):
        with pytest.raises(RagrpoError, match=r"unknown column 'release_yr'; columns are: release_year"):
            search(table, "q", where="release_yr < 1990", mode=mode)
    result = ragrpo("search", "q", "--table", "movies", "--db", movie_db, "--mode", "hybrid",
                    "--where", "genre = 'drama' AND (release_year <")
    one_error_line(result, "invalid --where")


@pytest.mark.integration
def test_cli_search_modes_print_their_scores(movie_db):
    result = ragrpo("search", "lighthouse keeper in the fog", "--table", "movies", "--db", movie_db,
                    "--mode", "fts", "-k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(" score " in line for line in lines)
    hybrid = ragrpo("search", "lighthouse keeper in the fog", "--table", "movies", "--db", movie_db,
                    "--mode", "hybrid", "-k", "2", "--json")
    assert [set(json.loads(line)) >= {"_relevance_score", "title"} for line in hybrid.stdout.splitlines()] == [True] * 2


# -- rerank -------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory):
    """No trained cross-encoder ships in a PyPI package here: this is a 2-layer BERT sequence classifier
    with random weights and MiniLM's tokenizer. It checks the plumbing (candidates, ordering, scores),
    not rerank quality."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ragrpo.models import resolve_embedder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cross-encoder")
    tokenizer = AutoTokenizer.from_pretrained(resolve_embedder(None))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.integration
def test_rerank_orders_first_stage_candidates_by_the_cross_encoder(movie_db, tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    from ragrpo.retrieval.index import open_table
    from ragrpo.retrieval.search import RERANK_CANDIDATES, search

    table = open_table("movies", movie_db)
    query = "a detective who is the killer"
    candidates = search(table, query, k=3 * RERANK_CANDIDATES, where="release_year < 1990")
    reranked = search(table, query, k=3, where="release_year < 1990", rerank=str(tiny_cross_encoder))
    scores = CrossEncoder(str(tiny_cross_encoder)).predict([(query, c["movie_plot"]) for c in candidates])
    expected = [candidates[i]["title"] for i in np.argsort(-scores)[:3]]
    assert [r["title"] for r in reranked] == expected
    assert [r["_rerank_score"] for r in reranked] == sorted((r["_rerank_score"] for r in reranked), reverse=True)
    one_error_line(ragrpo("search", "q", "--table", "movies", "--db", movie_db, "--rerank", tmp_path_missing()),
                   "cross-encoder", "could not be loaded")


def tmp_path_missing():
    return "/nonexistent/cross-encoder-model"


@pytest.mark.parametrize("bf16, dtype", [("1", "bfloat16"), ("0", "float32")])
def test_auto_precision_follows_the_hardware_decision(force_hardware, bf16, dtype):
    from ragrpo.models import resolve_embedder
    from ragrpo.retrieval.embed import Embedder

    force_hardware(BF16=bf16)
    embedder = Embedder.load(resolve_embedder(None), precision="auto")
    assert embedder.dtype == dtype
    vectors = embedder.encode(["a ferryman on the Thames", "a glassblower in Murano"])
    assert vectors.shape == (2, embedder.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
