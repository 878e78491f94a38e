"""Gold answers: SQuAD-style scoring, the loader's one-line errors, and the packaged set for builtin:movies
(its ids are the ones a from-index run records, it covers the held-out films, its answers come from them)."""

from collections import Counter

import pytest

from ragrpo import RagrpoError
from ragrpo.evaluation.gold import KINDS, answer_accuracy, load_gold, normalize, token_f1
from ragrpo.tuning.curriculum import document_id, is_held_out

# (answer, golds, accuracy, F1)
SCORES = [
    ("The Ferryman's Ledger", ["The Ferryman's Ledger"], 1.0, 1.0),
    ("the ferrymans ledger!", ["The Ferryman's Ledger"], 1.0, 1.0),           # case, punctuation, article
    ("It was released in 1923.", ["1923"], 1.0, 1 / 3),                        # a span inside a sentence
    ("It was released in 1924.", ["1923"], 0.0, 0.0),                          # a different year
    ("19234", ["1923"], 0.0, 0.0),                                             # a partial word
    ("Inspector Hales", ["Hale"], 0.0, 0.0),                                   # a longer word is not the gold
    ("Inspector Hale", ["Hale", "Inspector Hale"], 1.0, 1.0),                  # the best gold counts
    ("Ned", ["Ned Sorrell"], 0.0, 2 / 3),                                      # part of the gold: F1 only
    ("Sorrell Ned", ["Ned Sorrell"], 0.0, 1.0),                                # F1 ignores order, spans do not
    ("in the\tCuyahoga   River", ["Cuyahoga River"], 1.0, 0.8),                # whitespace folded
    ("“Mong Kok”", ["Mong Kok"], 1.0, 1.0),                                    # Unicode quotes are punctuation
    ("", ["Kobe"], 0.0, 0.0),
    ("Kobe", "Kobe", 1.0, 1.0),                                                # one gold as a string
]


@pytest.mark.parametrize("answer, golds, accuracy, f1", SCORES)
def test_scores(answer, golds, accuracy, f1):
    assert answer_accuracy(answer, golds) == accuracy
    assert token_f1(answer, golds) == pytest.approx(f1)


@pytest.mark.parametrize("answer, golds, distractors, accuracy, hedges_allowed", [
    ("The Ferryman's Ledger (1923)", ["The Ferryman's Ledger"], ["Dingo Creek Tapes", "1985"], 1.0, 1.0),
    ("1. Dingo Creek Tapes 2. The Ferryman's Ledger", ["The Ferryman's Ledger"], ["Dingo Creek Tapes"], 0.0, 1.0),
    ("1923, 1985 or 1938", ["1923"], ["1985", "1938"], 0.0, 1.0),            # listing every year is no answer
    ("In 1923.", ["1923"], ["1923"], 1.0, 1.0),                               # another film of the same year
    ("Monsoon Bride", ["Monsoon Bride"], ["Monsoon"], 1.0, 1.0),              # a distractor inside the gold
    ("Gravesend, says Dingo Creek", ["Gravesend"], ["Dingo Creek Tapes"], 1.0, 1.0),  # part of a name is not it
    ("Crouch", ["Hale"], ["Crouch"], 0.0, 0.0),
])
def test_an_answer_naming_another_passage_has_hedged(answer, golds, distractors, accuracy, hedges_allowed):
    assert answer_accuracy(answer, golds, distractors) == accuracy
    assert answer_accuracy(answer, golds) == hedges_allowed


def test_normalize_is_squads():
    assert normalize("  The Cartographer's  Lie, an Epic! ") == "cartographers lie epic"
    assert normalize("Theatre and a thesis") == "theatre and thesis"  # only whole-word articles go


# ---- the loader -----------------------------------------------------------------------------------


def _write(tmp_path, text):
    path = tmp_path / "gold.jsonl"
    path.write_text(text)
    return path


def test_load_reads_fields_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path, '{"question": "Who?", "answers": ["Hale", "Inspector Hale"], "source_id": "d1", '
                            '"kind": "person"}\n\n{"question": "When?", "answers": "1923"}\n')
    first, second = load_gold(path)
    assert (first.question, first.answers, first.source_id, first.kind) == ("Who?", ("Hale", "Inspector Hale"),
                                                                            "d1", "person")
    assert (second.answers, second.source_id, second.kind) == (("1923",), None, None)


@pytest.mark.parametrize("text, message", [
    ('{"question": "Who?", "answers": ["Hale"]}\n{"question": "Who?", "answers": [\n',
     "line 2: not valid JSON"),
    ('{"answers": ["Hale"]}\n', "line 1: field 'question' is missing"),
    ('{"question": "  ", "answers": ["Hale"]}\n', "line 1: field 'question' must be a non-empty string"),
    ('{"question": "Who?"}\n', "line 1: field 'answers' is missing"),
    ('{"question": "Who?", "answers": []}\n', "line 1: field 'answers' must be a non-empty list"),
    ('{"question": "Who?", "answers": ["The"]}\n', "line 1: answer 'The' is empty once normalised"),
    ('{"question": "Who?", "answers": ["Hale"], "source_id": ""}\n', "field 'source_id' must be a non-empty"),
    ('["Who?", "Hale"]\n', "line 1: expected a JSON object"),
    ("\n\n", "has no questions"),
])
def test_bad_files_give_one_line_errors(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(RagrpoError) as caught:
        load_gold(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file_and_unknown_set(tmp_path):
    with pytest.raises(RagrpoError, match=r"gold file .*nope\.jsonl does not exist$"):
        load_gold(tmp_path / "nope.jsonl")
    with pytest.raises(RagrpoError, match="no gold set 'builtin:films'; packaged sets: builtin:movies"):
        load_gold("builtin:films")


# ---- the packaged set -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def movies():
    """The built-in corpus as `ragrpo index builtin:movies` reads it: columns normalised, plot as `movie_plot`.

    Every plot is one chunk (checked against a real index in `test_ids_match_an_indexed_table`), so a
    document's id is the curriculum's `document_id` of its row."""
    from ragrpo.retrieval.index import prepare_frame

    frame, column, _ = prepare_frame("builtin:movies", None, {})
    rows = frame.to_dict("records")
    return {document_id(row, column): row for row in rows}, column


def test_packaged_set_loads_with_known_ids_and_kinds(movies):
    docs, _ = movies
    gold = load_gold("builtin:movies")
    assert len(gold) >= 220
    assert {q.source_id for q in gold} <= set(docs)
    assert {q.kind for q in gold} <= set(KINDS)
    assert Counter(q.kind for q in gold)["title"] >= 30  # which-film questions are part of the mix


def test_packaged_set_covers_the_held_out_films(movies):
    docs, _ = movies
    per_doc = Counter(q.source_id for q in load_gold("builtin:movies"))
    held = {i for i in docs if is_held_out(i, 0.2)}
    assert held >= {i for i in docs if is_held_out(i, 0.1)}
    assert len(held) >= 20
    assert all(per_doc[i] >= 5 for i in held), {docs[i]["title"]: per_doc[i] for i in held if per_doc[i] < 5}


def test_packaged_answers_come_from_their_film_and_not_from_their_question(movies):
    docs, column = movies
    for q in load_gold("builtin:movies"):
        row = docs[q.source_id]
        passage = " ".join(str(row[c]) for c in (column, "title", "release_year", "director", "cast"))
        for gold in q.answers:
            assert answer_accuracy(passage, [gold]) == 1.0, (row["title"], gold)
            assert answer_accuracy(q.question, [gold]) == 0.0, (q.question, gold)


def test_packaged_file_is_package_data():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "data/*.jsonl" in pyproject["tool"]["setuptools"]["package-data"]["ragrpo"]


@pytest.mark.integration
def test_ids_match_an_indexed_table(movie_db, movies):
    """The ids the curriculum reads from a real index of builtin:movies are the gold set's."""
    from ragrpo.retrieval.index import open_table
    from ragrpo.retrieval.search import text_column
    from ragrpo.tuning.curriculum import IndexSource, read_documents

    table = open_table("movies", movie_db)
    column = text_column(table)
    ids = [document_id(row, column) for row in read_documents(table)]
    assert column == movies[1] and sorted(ids) == sorted(movies[0])  # one chunk per film
    held = {i for i in ids if is_held_out(i, IndexSource(table="movies").held_out)}
    assert held <= {q.source_id for q in load_gold("builtin:movies")}
