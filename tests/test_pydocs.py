"""builtin:pydocs, the running Python's help topics as a corpus, and its packaged gold set."""

import os
import subprocess
import sys
from collections import Counter

import pytest

from ragrpo import RagrpoError
from ragrpo.data import read_records
from ragrpo.evaluation.gold import PYDOCS_KINDS, answer_accuracy, load_gold
from ragrpo.tuning.curriculum import is_held_out


@pytest.fixture(scope="module")
def topics():
    """The corpus as the loader gives it: topic key -> row."""
    frame = read_records("builtin:pydocs")
    return {row["id"]: row for row in frame.to_dict("records")}


def _folded(text: str) -> str:
    return " ".join(text.lower().split())


# ---- the corpus -----------------------------------------------------------------------------------


def test_one_row_per_topic_with_heading_and_text():
    from pydoc_data.topics import topics as shipped

    frame = read_records("builtin:pydocs")
    assert list(frame.columns) == ["id", "heading", "text"]
    assert sorted(frame["id"]) == sorted(shipped) and frame["id"].is_unique
    for row in frame.to_dict("records"):
        assert row["id"] and row["heading"] and row["text"], row["id"]
        assert row["text"] == row["text"].strip()
        # the text starts after the heading and its underline (its prose often opens with the heading's
        # words: "Assignment statements are used to ...", so the first line is compared, not searched)
        assert row["text"].splitlines()[0] != row["heading"], row["id"]
        heading, underline, rest = shipped[row["id"]].strip().split("\n", 2)
        assert set(underline) <= set("*=") and len(underline) >= 3, row["id"]
        assert (row["heading"], row["text"]) == (heading.strip(), rest.strip()), row["id"]


def test_heading_is_the_first_line_and_the_underline_is_dropped(topics):
    assert topics["assert"]["heading"] == 'The "assert" statement'
    assert topics["assert"]["text"].startswith("Assert statements are")
    assert topics["try"]["heading"] == 'The "try" statement'
    assert "*****" not in topics["for"]["text"].splitlines()[0]


def test_an_unknown_builtin_corpus_lists_the_known_ones():
    with pytest.raises(RagrpoError, match="no built-in corpus 'builtin:films'; built-in corpora: "
                                          "builtin:movies, builtin:pydocs"):
        read_records("builtin:films")


# ---- the gold set ---------------------------------------------------------------------------------


def test_gold_set_is_large_enough_and_spread_over_topics():
    gold = load_gold("builtin:pydocs")
    assert len(gold) >= 48
    assert len({q.source_id for q in gold}) >= 10
    assert {q.kind for q in gold} <= set(PYDOCS_KINDS)
    assert all(n >= 2 for n in Counter(q.kind for q in gold).values())
    assert len({q.question for q in gold}) == len(gold)


def test_gold_questions_ask_about_held_out_topics(topics):
    for q in load_gold("builtin:pydocs"):
        assert q.source_id in topics, q.source_id
        assert is_held_out(q.source_id, 0.2), q.source_id


def test_gold_answers_come_from_their_topic_and_not_from_their_question(topics):
    for q in load_gold("builtin:pydocs"):
        text = topics[q.source_id]["text"]
        for gold in q.answers:
            assert _folded(gold) in _folded(text), (q.source_id, gold)
            assert answer_accuracy(q.question, [gold]) == 0.0, (q.question, gold)
        # scoring normalises both sides; at least one gold must survive that as a run of whole words
        # ("types.MappingProxyType" does, a bare "MappingProxyType" inside it does not)
        assert answer_accuracy(text, q.answers) == 1.0, (q.source_id, q.answers)


# ---- indexing -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_index_builtin_pydocs(tmp_path, topics):
    import lancedb

    from ragrpo.retrieval.search import text_column

    db = tmp_path / "db"
    result = subprocess.run([sys.executable, "-m", "ragrpo.cli", "index", "builtin:pydocs", "--table", "pydocs",
                             "--db", str(db)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    table = lancedb.connect(db).open_table("pydocs")
    assert {"id", "heading", "text", "chunk", "vector"} <= set(table.schema.names)
    assert text_column(table) == "text"
    rows = table.search().select(["id", "heading", "chunk"]).limit(table.count_rows()).to_list()
    assert {r["id"] for r in rows} == set(topics)
    assert len(rows) > len(topics)  # the long topics (specialnames, compound, ...) are cut into chunks
    assert all(r["heading"] == topics[r["id"]]["heading"] for r in rows)
