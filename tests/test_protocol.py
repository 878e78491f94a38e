"""The prompt protocol (`ragrpo.prompts`): passage headers and labels from the table, the citation
syntax and its parser, the balanced passage order of training prompts, and the answer settings that
travel with a model."""

import json
from collections import Counter

import pytest

from ragrpo import RagrpoError
from ragrpo.answer_settings import FILE, AnswerSettings, resolve_settings, saved_settings
from ragrpo.prompts import (
    Passage,
    PassageStyle,
    build_prompt,
    cite_instruction,
    cited_passages,
    default_header,
    label_for,
    style_for,
    without_references,
)
from ragrpo.rewards.builtin import source_citation
from ragrpo.tuning.orders import balanced_orders


def test_prompt_is_the_write_ups_with_a_header_per_passage():
    shown = [Passage("The Salt Clock (1921)", "First plot."), Passage("", "Second plot.")]
    prompt = build_prompt("Why?", shown, label="Movie")
    assert prompt.startswith("Given the Query: Why?\n\nAnd the context\n#Context\n"
                             "## Movie 1: The Salt Clock (1921)\nFirst plot.\n\n## Movie 2:\nSecond plot.")
    assert prompt.endswith("Answer concisely but creatively")
    assert build_prompt("Why?", ["First plot."]).startswith(
        "Given the Query: Why?\n\nAnd the context\n#Context\n## Passage 1:\nFirst plot.")


@pytest.mark.parametrize("table, label", [("movies", "Movie"), ("pydocs", "Pydoc"), ("stories", "Story"),
                                          ("support_notes", "Support note"), ("glass", "Glass"), ("7s", "Passage")])
def test_the_label_is_the_table_name_singular(table, label):
    assert label_for(table) == label


def test_the_default_header_names_title_and_year_from_the_columns():
    assert default_header(["release_year", "title", "movie_plot"]) == "{title} ({release_year})"
    assert default_header(["id", "heading", "text"]) == "{heading}"
    assert default_header(["path", "text"]) == ""
    style = style_for("movies", ["release_year", "title", "movie_plot"])
    passage = style.passage({"title": "The Salt Clock", "release_year": 1921, "movie_plot": "Clara..."}, "movie_plot")
    assert passage == Passage("The Salt Clock (1921)", "Clara...")
    assert passage.context() == "The Salt Clock (1921)\nClara..."  # what rewards see: the title is grounded


def test_a_header_naming_a_missing_column_or_malformed_is_one_line():
    with pytest.raises(RagrpoError, match="'director', which the table does not have; columns are: title, plot"):
        style_for("movies", ["title", "plot"], header="{title} by {director}")
    with pytest.raises(RagrpoError, match="not a valid template"):
        PassageStyle(header="{title")
    with pytest.raises(RagrpoError, match="plain column names"):
        PassageStyle(header="{title.upper}")


def test_the_cite_instruction_lists_every_number_with_the_label():
    assert cite_instruction(3, "Movie") == "After the answer, cite the movie it comes from by its number: [1], [2], [3]."
    assert cite_instruction(1, "Pydoc").endswith("cite the pydoc it comes from by its number: [1].")


def test_a_citation_is_a_bracketed_number_and_a_copied_header_cites_nothing():
    assert cited_passages("As [1][3] and Movie-2 say, [2, 1].") == [1, 3, 2, 1]
    # r16 and r17 opened every answer with the first header when headers carried "[1]" and were paid for it
    header = build_prompt("Why?", [Passage("The Salt Clock (1921)", "Clara...")], label="Movie").split("\n")[4]
    assert header == "## Movie 1: The Salt Clock (1921)"
    assert cited_passages(header.removeprefix("## ") + " is about Clara.") == []
    assert without_references("Clara [2] restores it (Movie- 1).").split() == ["Clara", "restores", "it", "(", ")."]
    ids = [["a", "b", "c"]]
    assert source_citation(["Clara restores the clock [2]."], context_ids=ids, source_id=["b"]) == [1.0]


def test_balanced_orders_spread_the_source_over_every_position():
    ids = [[f"d{q}", f"e{q}", f"f{q}"] for q in range(300)]
    sources = [row[0] for row in ids]  # the retriever put the source first every time
    orders = balanced_orders(ids, sources, seed=3)
    positions = Counter(order.index(0) + 1 for order in orders)
    assert positions == {1: 100, 2: 100, 3: 100}
    assert all(sorted(order) == [0, 1, 2] for order in orders)
    assert orders == balanced_orders(ids, sources, seed=3) != balanced_orders(ids, sources, seed=4)
    # a source that was not retrieved: the passages are shuffled, nothing is invented
    [order] = balanced_orders([["x", "y"]], ["z"], seed=0)
    assert sorted(order) == [0, 1]


def test_questions_marked_not_first_never_show_their_source_first_and_the_rest_stay_balanced():
    ids = [[f"d{q}", f"e{q}", f"f{q}"] for q in range(300)]
    sources = [row[0] for row in ids]
    late = [q % 3 == 0 for q in range(300)]  # 100 marked questions among 200 others
    orders = balanced_orders(ids, sources, seed=3, not_first=late)
    marked = Counter(order.index(0) + 1 for order, m in zip(orders, late) if m)
    others = Counter(order.index(0) + 1 for order, m in zip(orders, late) if not m)
    assert marked == {2: 50, 3: 50}
    assert sorted(others.values()) == [66, 67, 67]  # 200 questions dealt from blocks of 3
    # one passage: the source can only be first, so it is
    assert balanced_orders([["s"]], ["s"], seed=0, not_first=[True]) == [[0]]


def test_answer_settings_saved_with_a_model_are_the_defaults_and_flags_win(tmp_path):
    assert saved_settings(tmp_path) is None
    assert resolve_settings(tmp_path, k=None, mode=None) == (AnswerSettings(), [])
    (tmp_path / FILE).write_text(AnswerSettings(mode="hybrid", k=3, cite=True).to_json())
    settings, notices = resolve_settings(tmp_path, k=None, mode=None, cite=None)
    assert settings == AnswerSettings(mode="hybrid", k=3, cite=True) and notices == []
    settings, notices = resolve_settings(tmp_path, k=5, mode="hybrid", cite=None)
    assert settings.k == 5 and settings.mode == "hybrid" and settings.cite
    assert notices == [f"note: {tmp_path} was trained with k=3; answering with k=5"]
    (tmp_path / FILE).write_text(json.dumps({"k": "three", "mode": "hybrid"}) + "{")
    with pytest.raises(RagrpoError, match="not a valid settings file"):
        saved_settings(tmp_path)
