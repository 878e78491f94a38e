"""Training on your own index: questions, the document split, the RAG rows, the source-citation reward,
and a real (tiny-model) from-index run evaluated on its held-out documents."""

import json
import re
from collections import Counter

import pytest

from ragrpo import RagrpoError
from ragrpo.generation.rag import retrieve
from ragrpo.prompts import REASONING_INSTRUCTION, build_prompt, cite_instruction, table_style
from ragrpo.rewards.builtin import REWARDS, cited_passages, get_source_citation_reward, source_citation
from ragrpo.rewards.registry import guarded
from ragrpo.tuning.curriculum import (
    QUESTION_KINDS,
    IndexSource,
    build_curriculum,
    document_frequencies,
    document_id,
    is_held_out,
    keywords,
    parse_kinds,
    template_questions,
    training_kinds,
)

ROW = {"title": "The Ferryman's Ledger", "release_year": 1923,
       "movie_plot": "Thames ferryman Walter Crouch keeps a ledger. The ledger lists every passenger; "
                     "a rival boatman is blamed, but the ferryman hid a second ledger with watches."}
OTHER = {"title": "Salt", "release_year": 1921, "movie_plot": "A widow restores a clock tower. The ferryman waits."}


def test_keywords_prefer_words_distinctive_to_the_document():
    texts = [ROW["movie_plot"], OTHER["movie_plot"]]
    found = keywords(ROW["movie_plot"], document_frequencies(texts), len(texts))
    assert found[0] == "ledger"  # three times here, in no other document
    assert "ferryman" not in found[:3]  # in both documents: less distinctive than words only here
    assert all(len(w) >= 4 and w.isalpha() for w in found)


def test_template_questions_ask_for_the_title_the_year_and_names_in_the_text():
    texts = [ROW["movie_plot"], OTHER["movie_plot"]]
    questions = template_questions(ROW, "movie_plot", document_frequencies(texts), 2)
    by_kind = {q.kind: q for q in questions}
    assert by_kind["keyword"].query.startswith("Which film involves ledger, ")
    assert by_kind["keyword"].meta["targets"] == ["The Ferryman's Ledger"]
    assert by_kind["when"].query.startswith("In what year was the film about ") and by_kind["when"].query.endswith(
        " released?") and by_kind["when"].meta["targets"] == ["1923"]
    assert {q.source_id for q in questions} == {document_id(ROW, "movie_plot")}
    assert all(q.meta.get("targets") for q in questions)  # every question asks for something it can check


def test_a_row_with_nothing_to_ask_for_gets_the_open_questions():
    row = {"title": "Salt", "movie_plot": "a widow waits."}  # too few distinctive words, no name
    assert [q.kind for q in template_questions(row, "movie_plot", Counter(), 1)] == ["what", "summary"]


def test_blank_questions_take_a_name_from_inside_a_sentence():
    from ragrpo.tuning.curriculum import blank_questions

    text = ("In a Utah salt-mining town, the widow Clara Voss inherits a broken clock tower. Short one here. "
            "Mine owner Ezra Pike wants the tower torn down so he can dig.")
    found = [(q.query, q.meta["targets"]) for q in blank_questions(text, "The Salt Clock", "s1")]
    assert found == [
        (('Which name fills the blank in "In a ___ salt-mining town, the widow Clara Voss inherits a '
          'broken clock tower."?'), ["Utah"]),  # the first name of the sentence: a place here
        ('Which name fills the blank in "Mine owner ___ wants the tower torn down so he can dig."?',
         ["Ezra Pike", "Pike"])]


def test_a_blank_line_ends_a_sentence_so_no_name_runs_across_paragraphs():
    from ragrpo.tuning.curriculum import blank_questions

    # pydoc's "assert" topic: a code line without a full stop, then a paragraph that opens with a capital
    text = ("The simple form is equivalent to an if statement that will raise AssertionError\n\n"
            "The extended form passes the second expression to the exception it will raise in the end.")
    targets = [q.meta["targets"] for q in blank_questions(text, None, "assert")]
    assert targets == [["AssertionError"]]


@pytest.mark.parametrize("text, expected", [
    ("The widow Clara Voss inherits a clock. Clara teams up with a deaf watch repairer named Samuel.",
     ("Who teams up with a deaf watch repairer named Samuel?", ["Clara"])),
    ("Mine owner Ezra Pike arrives. Ezra Pike wants the tower torn down so he can dig.",
     ("Who wants the tower torn down so he can dig?", ["Ezra Pike", "Pike"])),
    ("Copper kettles whistle louder when the harbour freezes over.", None),  # a capital because the sentence begins
    ("Thames ferryman Walter Crouch keeps a careful ledger of every passenger.", None),  # no verb after the name
    ("Jakob's search leads him to the landlady in the cellar.", None),
    ("After Beppe burns his hands, his daughter does the work.", None),
])
def test_who_questions_are_cut_from_sentences_that_open_with_a_name(text, expected):
    from ragrpo.tuning.curriculum import subject_questions

    found = [(q.query, q.meta["targets"]) for q in subject_questions(text, "s1")]
    assert found == ([expected] if expected else [])


def test_template_questions_without_title_or_year_still_ask_about_the_text():
    row = {"text": "Copper kettles whistle louder when the harbour freezes over in winter nights."}
    questions = template_questions(row, "text", Counter(), 1)
    assert [q.kind for q in questions] == ["keyword", "summary"]
    assert "document" in questions[0].query
    titled = template_questions({"heading": "The assert statement", "text": "it checks."},
                                "text", Counter(), 1)
    assert titled[0].query == "What does The assert statement explain?"


def test_document_ids_and_split_are_stable():
    assert document_id({"id": 7, "text": "x"}, "text") == "7"
    assert document_id({"text": "x"}, "text") == document_id({"text": "x", "title": "other"}, "text")
    ids = [f"doc-{i}" for i in range(400)]
    held = [i for i in ids if is_held_out(i, 0.1)]
    assert held == [i for i in reversed(ids) if is_held_out(i, 0.1)][::-1]
    assert 20 < len(held) < 60


def test_reasoning_and_cite_prompts_extend_the_ask_prompt():
    plain = build_prompt("Who lied?", ["Finch lied."])
    assert plain.endswith("Answer concisely but creatively")
    assert build_prompt("Who lied?", ["Finch lied."], reasoning=True) == f"{plain}\n\n{REASONING_INSTRUCTION}"
    assert build_prompt("Who lied?", ["Finch lied."], reasoning=True, cite=True) == \
        f"{plain}\n\n{cite_instruction(1)}\n\n{REASONING_INSTRUCTION}"
    # every passage's number is listed, none singled out as the example
    assert build_prompt("Who lied?", ["Finch lied.", "Gulls."], cite=True, label="Movie").endswith(
        "cite the movie it comes from by its number: [1], [2].")


@pytest.mark.parametrize("completion, expected", [
    ("The source is Movie 2.", 0.0),  # a name is how a header starts, no citation
    ("Per [2] and [1].", 0.5),
    ("Per [2].", 1.0),
    ("Per [1, 3].", 0.0),
    ("See [4] and [2].", 0.0),
    ("No reference at all.", 0.0),
    ("<think>[1] is wrong</think><answer>It is [2]</answer>", 1.0),
    ("Per [2] and [2] again, as Movie 2 says.", 1.0),  # one passage, counted once
    ("", 0.0),
])
def test_source_citation(completion, expected):
    assert source_citation([completion], context_ids=[["a", "b", "c"]], source_id=["b"]) == [expected]


PASSAGES = ["Thames ferryman Walter Crouch keeps a ledger.",
            "A rival boatman is blamed, but the ferryman hid a second ledger with watches.",
            "A widow restores a clock tower."]


@pytest.mark.parametrize("completion, expected", [
    ("Movie- 2 [2].", 0.0),  # the right passage cited, nothing said
    ("The ferryman is Movie 2 [2].", 0.0),  # "ferryman" is the question's word; nothing else is claimed
    ("He hid a second ledger with watches [2].", 1.0),  # hid, second, ledger, watches: all in passage 2
    ("He hid a second ledger with gold [2].", 0.75),
    ("He hid a second ledger with watches [1].", 0.0),  # another retrieved passage
    ("He hid a second ledger with watches [2][3].", 0.5),
    ("He hid watches [2][7].", 0.0),  # (1 - 1) / 2: a passage that does not exist costs 1
    ("Nothing to cite.", 0.0),
])
def test_grounded_source_citation(completion, expected):
    reward = get_source_citation_reward(grounded=True)
    assert reward.__name__ == "source_citation_grounded"
    assert reward([completion], context_ids=[["a", "b", "c"]], source_id=["b"], context=[PASSAGES],
                  query=["What does the ferryman do?"]) == [expected]


@pytest.mark.parametrize("completion, expected", [
    ("Movie- 2 [2].", 0.0),  # the right passage cited, nothing said
    ("The ferryman is Movie 2 [2].", 0.0),
    ("He hid a second ledger with watches [2].", 0.0),  # hid, second, ledger, watches: four words, not five
    ("He hid a second ledger full of gold watches [2].", 1.0),  # five words, not all in the passage
    ("He hid a second ledger full of gold watches [1].", 0.0),  # another retrieved passage
    ("He hid a second ledger full of gold watches [2][3].", 0.5),
    ("He hid a second ledger full of gold watches [2][7].", 0.0),
    ("Say [7].", -1.0),  # a passage that does not exist costs 1, whatever the answer says
])
def test_answered_source_citation(completion, expected):
    reward = REWARDS["source_citation_answered"]
    assert reward.__name__ == "source_citation_answered"
    assert reward([completion], context_ids=[["a", "b", "c"]], source_id=["b"],
                  query=["What does the ferryman do?"]) == [expected]
    with pytest.raises(RagrpoError, match="not both"):
        get_source_citation_reward(grounded=True, min_words=5)


@pytest.mark.parametrize("completion, expected", [
    ("He hid a second ledger full of gold watches [2].", 1.0),
    ("He hid a second ledger full of gold watches [2][3].", 0.0),  # the source and another: no better than none
    ("He hid a second ledger full of gold watches [1].", -1.0),
    ("He hid a second ledger [2].", 0.0),  # too few words of its own: the source earns nothing, as above
    ("He hid a second ledger [1].", -1.0),
    ("Nothing to cite.", 0.0),
])
def test_source_only_citation(completion, expected):
    reward = REWARDS["source_citation_only"]
    assert reward.__name__ == "source_citation_only"
    assert reward([completion], context_ids=[["a", "b", "c"]], source_id=["b"],
                  query=["What does the ferryman do?"]) == [expected]
    with pytest.raises(RagrpoError, match="within"):
        get_source_citation_reward(min_words=5, others=0.5)
    with pytest.raises(RagrpoError, match="only with min_words"):
        get_source_citation_reward(others=-1.0)


@pytest.mark.parametrize("completion, expected", [
    ("He hid a second ledger full of gold watches [2].", 1.0),
    ("He hid a second ledger full of gold watches [2][2] and Movie 2.", 1.0),  # one passage, named three times
    ("He hid a second ledger full of gold watches [2][3].", 0.0),  # the source and another: as good as none
    ("He hid a second ledger full of gold watches [3].", 0.0),  # a wrong guess costs no more than silence
    ("He hid a second ledger full of gold watches [2][7].", -1.0),  # a passage that does not exist
    ("He hid a second ledger [2].", 0.0),  # too few words of its own
    ("Nothing to cite.", 0.0),
])
def test_exact_source_citation(completion, expected):
    reward = REWARDS["source_citation_exact"]
    assert reward.__name__ == "source_citation_exact"
    assert reward([completion], context_ids=[["a", "b", "c"]], source_id=["b"],
                  query=["What does the ferryman do?"]) == [expected]
    with pytest.raises(RagrpoError, match="exclusive"):
        get_source_citation_reward(min_words=5, others=-1.0, exclusive=True)
    with pytest.raises(RagrpoError, match="exclusive"):
        get_source_citation_reward(exclusive=True)
    with pytest.raises(RagrpoError, match="exclusive"):
        get_source_citation_reward(grounded=True, exclusive=True)


@pytest.mark.parametrize("completion, expected", [
    ("Inspector Hale [2].", 1.0),  # a short answer naming what was asked is an answer
    ("Hale [2][3].", 0.0),
    ("[2]", 0.0),  # a bare reference says nothing
    ("The ferryman [2].", 0.0),  # only the question's words
])
def test_exact_source_citation_of_a_short_answer(completion, expected):
    reward = REWARDS["source_citation_exact_1w"]
    assert reward.__name__ == "source_citation_exact_1w"
    assert reward([completion], context_ids=[["a", "b", "c"]], source_id=["b"],
                  query=["Which inspector does the ferryman help?"]) == [expected]


def test_source_citation_needs_its_columns():
    with pytest.raises(RagrpoError, match="context_ids"):
        guarded(source_citation)(prompts=["q"], completions=["x [1]"])


def test_cited_passages_reads_bracketed_numbers_only():
    assert cited_passages("As [1][3] and Movie-2 say") == [1, 3]


# ---- on the real table ----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["hybrid", "vector"])  # hybrid is the default; vector embeds in one batch
def test_curriculum_rows_are_what_ask_would_see(movie_db, mode):
    from ragrpo.retrieval.index import open_table

    source = IndexSource("movies", str(movie_db), where="release_year < 1990", k=3, mode=mode, max_documents=40)
    curriculum = build_curriculum(source)
    assert set(curriculum.train_ids).isdisjoint(curriculum.held_ids)
    assert {e["source_id"] for e in curriculum.examples} <= set(curriculum.train_ids)
    assert {q.source_id for q in curriculum.held_questions} <= set(curriculum.held_ids)
    table = open_table("movies", movie_db)
    years = {document_id(r, "movie_plot"): r["release_year"] for r in table.to_pandas().to_dict("records")}
    style = table_style(table)
    for example in curriculum.examples[:12]:
        hits, column = retrieve(table, example["query"], where="release_year < 1990", k=3, mode=mode)
        shown = [style.passage(hits[n - 1], column) for n in example["retrieved_order"]]  # the same hits, reordered
        assert sorted(example["retrieved_order"]) == list(range(1, len(hits) + 1))
        assert example["context"] == [p.context() for p in shown]
        assert example["context"][0].startswith(f"{hits[example['retrieved_order'][0] - 1]['title']} (")
        assert example["prompt"][0]["content"] == build_prompt(example["query"], shown, cite=True, label="Movie")
        assert "## Movie 1: " in example["prompt"][0]["content"]
        assert all(years[i] < 1990 for i in example["context_ids"])
        rank = example["source_rank"]
        assert rank == 0 or example["context_ids"][rank - 1] == example["source_id"]
    # the source is shown at every position about equally often, whatever the retriever ranked first
    positions = Counter(e["source_rank"] for e in curriculum.examples if e["source_rank"])
    assert max(positions.values()) - min(positions.values()) <= 1 and set(positions) == {1, 2, 3}
    # a fill-the-blank question quotes a sentence of its film, so it finds that film nearly always
    blank = [e for e in curriculum.examples if e["kind"] == "blank"]
    assert blank and sum(e["source_rank"] > 0 for e in blank) / len(blank) > 0.8


@pytest.mark.integration
def test_a_curriculum_of_chosen_kinds_asks_only_those(movie_db):
    def curriculum(kinds):
        return build_curriculum(IndexSource("movies", str(movie_db), k=3, held_out=0.2, max_documents=30,
                                            kinds=parse_kinds(kinds)))

    everything, names, default = curriculum("all"), curriculum("who, blank"), curriculum(None)
    assert {e["kind"] for e in everything.examples} >= {"keyword", "when", "who", "blank"}
    assert {e["kind"] for e in names.examples} == {"who", "blank"}
    # the same name questions as in the full curriculum, and none of its title or year questions
    assert [e["query"] for e in names.examples] == [e["query"] for e in everything.examples
                                                    if e["kind"] in ("who", "blank")]
    # by default, the questions a passage's header answers are left out where the table gives others
    assert [e["query"] for e in default.examples] == [e["query"] for e in names.examples]
    record = json.loads(json.dumps(names.split_record()))
    assert record["source"]["kinds"] == ["who", "blank"] and IndexSource(**record["source"]).kinds == ("who", "blank")
    assert record["train_kinds"] == dict(Counter(e["kind"] for e in names.examples))
    with pytest.raises(RagrpoError, match="no question of kinds what could be made"):
        curriculum("what")


def test_header_questions_marked_not_first_show_their_source_below_passage_1(movie_db):
    late = build_curriculum(IndexSource("movies", str(movie_db), k=3, held_out=0.2, max_documents=30,
                                        kinds=QUESTION_KINDS, not_first=("keyword", "when")))
    ranks = {kind: Counter(e["source_rank"] for e in late.examples if e["kind"] == kind and e["source_rank"])
             for kind in ("keyword", "when", "who", "blank")}
    for kind in ("keyword", "when"):
        assert set(ranks[kind]) == {2, 3}, ranks
    names = ranks["who"] + ranks["blank"]
    assert set(names) == {1, 2, 3} and max(names.values()) - min(names.values()) <= 1
    assert IndexSource(**json.loads(json.dumps(late.split_record()))["source"]).not_first == ("keyword", "when")


def test_the_first_questions_trained_show_their_source_below_passage_1_then_every_position(movie_db):
    from ragrpo.config import build_run_config
    from ragrpo.tuning.curriculum import from_index_config

    def curriculum(**options):
        return build_curriculum(IndexSource("movies", str(movie_db), k=3, held_out=0.2, max_documents=30, **options))

    early = curriculum(not_first_questions=9)
    first = [e["source_rank"] for e in early.examples[:9]]
    assert set(first) - {0} == {2, 3} and sum(1 for r in first if r) >= 7, first
    rest = Counter(e["source_rank"] for e in early.examples[9:] if e["source_rank"])
    assert set(rest) == {1, 2, 3} and max(rest.values()) - min(rest.values()) <= 1, rest
    # the same questions as a run without it, in an order of their own that the seed repeats
    queries = lambda c: [e["query"] for e in c.examples]
    plain = curriculum()
    assert sorted(queries(early)) == sorted(queries(plain)) and queries(early) != queries(plain)
    assert queries(curriculum(not_first_questions=9)) == queries(early)
    assert queries(curriculum(not_first_questions=9, order_seed=1)) != queries(early)
    assert IndexSource(**json.loads(json.dumps(early.split_record()))["source"]).not_first_questions == 9
    # the rows train in the order written: TRL's shuffling is off, and a configuration that turns it on is refused
    cfg = from_index_config(build_run_config(output="r"), early.source, rewards_given=False)
    assert cfg.grpo["shuffle_dataset"] is False
    assert "shuffle_dataset" not in from_index_config(build_run_config(output="r"), plain.source, False).grpo
    with pytest.raises(RagrpoError, match="remove shuffle_dataset = true"):
        from_index_config(build_run_config(output="r", grpo={"shuffle_dataset": True}), early.source, False)
    for options, says in [({"not_first_questions": -1}, "--not-first-questions must be 0 or more, got -1"),
                          ({"not_first_questions": 5, "order": "mixed"}, "needs --order balanced"),
                          ({"not_first_questions": 5, "agentic": True}, "without --agentic")]:
        with pytest.raises(RagrpoError, match=says):
            IndexSource("movies", **options)


def test_the_default_kinds_keep_header_questions_only_where_nothing_else_was_made():
    made = {"keyword", "when", "who", "blank"}
    assert training_kinds(IndexSource("movies"), made) == {"who", "blank"}
    assert training_kinds(IndexSource("movies"), {"keyword", "when"}) == {"keyword", "when"}
    assert training_kinds(IndexSource("movies", agentic=True), made) == made  # it searches: no position to learn
    assert training_kinds(IndexSource("movies", questions="model"), {"model", "keyword"}) == {"model", "keyword"}
    assert training_kinds(IndexSource("movies", kinds=("when",)), made) == {"when"}
    assert parse_kinds("all") == QUESTION_KINDS and parse_kinds(" who ,blank,") == ("who", "blank")
    for kinds, says in [(("who", "title"), "--kinds title: unknown question kind"), ((), "--kinds names no kind")]:
        with pytest.raises(RagrpoError, match=says):
            IndexSource("movies", kinds=kinds)
    for kinds, says in [(("year",), "--not-first year: unknown question kind"), ((), "--not-first names no kind")]:
        with pytest.raises(RagrpoError, match=says):
            IndexSource("movies", not_first=kinds)


@pytest.mark.integration
@pytest.mark.parametrize("where", ["release_yr < 1990", "release_year <<< 1990"])
def test_bad_filter_fails_with_one_line(movie_db, where):
    from ragrpo.retrieval.index import open_table
    from ragrpo.tuning.curriculum import retrieve_all

    with pytest.raises(RagrpoError, match="invalid --where") as error:
        build_curriculum(IndexSource("movies", str(movie_db), where=where))
    assert "\n" not in str(error.value)
    with pytest.raises(RagrpoError, match="invalid --where"):
        retrieve_all(open_table("movies", str(movie_db)), ["a question"], where=where, k=2)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, base_model_dir):
    """A 2-layer Llama with the real tokenizer, saved as a model folder (what `--model` takes)."""
    from conftest import tiny_llama

    model, tokenizer = tiny_llama(base_model_dir, max_position_embeddings=2048)  # RAG prompts run long
    folder = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def index_run(tmp_path_factory, movie_db, tiny_model_dir):
    from ragrpo.config import build_run_config
    from ragrpo.tuning.curriculum import from_index_config, train_from_index

    source = IndexSource("movies", str(movie_db), k=2, reasoning=True, held_out=0.2, max_documents=30)
    cfg = build_run_config(output=str(tmp_path_factory.mktemp("runs") / "rag"), model=str(tiny_model_dir),
                           max_steps=2, num_generations=2, max_completion_length=12, learning_rate=1e-3,
                           grpo={"per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no"})
    return train_from_index(from_index_config(cfg, source, rewards_given=False), source)


@pytest.mark.integration
def test_from_index_run_records_its_split_and_trains_on_its_rewards(index_run):
    result, curriculum = index_run
    run = result.output
    split = json.loads((run / "curriculum" / "split.json").read_text())
    assert split["held_out_documents"] == curriculum.held_ids and split["source"]["reasoning"] is True
    rows = [json.loads(line) for line in (run / "curriculum" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == len(curriculum.examples)
    assert {r["source_id"] for r in rows}.isdisjoint(curriculum.held_ids)
    assert all(REASONING_INSTRUCTION in r["prompt"][0]["content"] for r in rows)
    config = json.loads((run / "config.json").read_text())["run"]
    assert config["dataset"] == str(run / "curriculum" / "train.jsonl") and config["held_out"] == 0.0
    assert config["rewards"] == ["answer_match_own_words=2", "source_citation_debiased_1w", "drawn_from_first=0",
                                 "answer_match=0", "verbatim_span=0", "format=0.5"]
    assert config["grpo"]["multi_objective_aggregation"] == "sum_then_normalize"
    assert config["grpo"]["beta"] == 0.0 and config["grpo"]["use_adaptive_entropy"] is True
    assert config["grpo"]["num_generations"] == 2  # the group size given is kept
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "reward" in r]
    assert steps and all("rewards/drawn_from_first/mean" in r for r in steps)
    for r in steps:  # the gauges are logged at weight 0: the reward is the paid terms' weighted sum alone
        paid = 2 * r["rewards/answer_match_own_words/mean"] + r["rewards/source_citation_debiased_1w/mean"] + 0.5 * r[
            "rewards/format/mean"]
        assert r["reward"] == pytest.approx(paid, abs=1e-5)
        assert 0.0 <= r["rewards/drawn_from_first/mean"] <= 1.0 and -1.0 <= r["rewards/verbatim_span/mean"] <= 0.0
        # a right answer in its own words earns what answer_match pays, a copied one down to half of it
        assert r["rewards/answer_match/mean"] / 2 - 1e-6 <= r["rewards/answer_match_own_words/mean"] \
            <= r["rewards/answer_match/mean"] + 1e-6
    assert result.steps == 2


@pytest.mark.integration
def test_eval_from_index_scores_both_models_per_seed(index_run, tiny_model_dir, tmp_path, force_hardware):
    import torch
    from conftest import needs_packing

    from ragrpo.evaluation.from_index import compare_from_index

    needs_packing(torch.float32)
    force_hardware(BF16="0", PACK="1", FP16="0")
    result, _ = index_run
    comparison = compare_from_index(result.output, base=str(tiny_model_dir), seeds=[0, 1], max_new_tokens=6,
                                    max_questions=4, output=tmp_path / "report")
    assert comparison.questions == 4 and [s.seed for s in comparison.base] == [0, 1]
    assert 0 <= comparison.hit_at_k <= 1
    # the run held out films that the packaged gold set asks about: its questions, not the run's templates
    assert comparison.gold == "builtin:movies" and comparison.order == "balanced"
    summary = comparison.summary("tuned")
    for name in ("answer accuracy", "token F1", "groundedness", "groundedness beyond question", "source_citation",
                 "source_citation_grounded", "cites source only", "distinct-2", "reward format"):
        values = summary[name]["seeds"]
        assert len(values) == 2 and summary[name]["spread"] == max(values) - min(values)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "hit@2" in report and "| groundedness |" in report and "Gain against seed spread" in report
    assert "## Done when" in report and "- cites source only, worst source position gains beyond the spread" in report
    assert "- drawn from the source, source not passage 1 gains beyond the spread" in report
    for name in ("curves.png", "histograms.png", "by-position.png", "results.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "| answer accuracy | 4 |" in report  # each figure says how many answers it is over
    # with oneDNN packing forced on (and fp16 off), both models are sampled through the float32 decode loop,
    # and the cache says so
    recorded = json.loads((tmp_path / "report" / "answers" / "base-seed0.json").read_text())
    assert recorded["sampler"] == "decode loop, float32"
    assert all(isinstance(c, str) for c in recorded["completions"]) and len(recorded["completions"]) == 4


def test_eval_asks_the_same_prompts_whatever_the_run_dealt_its_training_questions(index_run, tiny_model_dir,
                                                                                   tmp_path):
    import shutil

    from ragrpo.evaluation.from_index import compare_from_index

    result, _ = index_run
    late = tmp_path / "late-run"
    shutil.copytree(result.output, late)
    split = json.loads((late / "curriculum" / "split.json").read_text())
    split["source"].update(not_first_questions=20, not_first=["who", "blank"])  # what training alone uses
    (late / "curriculum" / "split.json").write_text(json.dumps(split))
    for retrieved in (False, True):
        order = {"order": "retrieved"} if retrieved else {}
        sha = {}
        for name, run in (("plain", result.output), ("late", late)):
            compare_from_index(run, base=str(tiny_model_dir), seeds=[0], max_new_tokens=2, max_questions=12,
                               output=tmp_path / f"{name}-{retrieved}", **order)
            sha[name] = json.loads((tmp_path / f"{name}-{retrieved}" / "answers" / "base-seed0.json").read_text())[
                "prompts_sha256"]
        assert sha["plain"] == sha["late"]


def test_done_when_flags_a_run_that_answers_fewer_passage_1_questions_than_the_base():
    from ragrpo.evaluation.from_index import IndexComparison, SeedScores, done_when

    def side(accuracy, first, third, seeds=(0, 1)):
        return [SeedScores(seed, {"answer accuracy": accuracy + 0.01 * seed, "distinct-2": 0.7,
                                  "answer accuracy, source at passage 1": first,
                                  "answer accuracy, source at passage 2": 0.2,
                                  "answer accuracy, source at passage 3": third}, {}) for seed in seeds]

    def guard(tuned):
        result = IndexComparison("run", "movies", 90, 1.0, 3, 0.33, [0, 1], side(0.05, 0.10, 0.04), tuned)
        return [line for line in done_when(result) if line.startswith("- guard")]

    # the mirror habit: more right answers overall, fewer where the source is passage 1
    said = ("- guard against a position habit, answer accuracy at every source position at least the base's: "
            "**NOT met** (below the base's at passage 1: 0.100 -> 0.040)")
    assert guard(side(0.18, 0.04, 0.31)) == [said]
    assert guard(side(0.25, 0.40, 0.12))[0].endswith("**met**")


def test_citation_accuracy_counts_the_source_alone_and_separates_lower_ranked_sources():
    from ragrpo.evaluation.from_index import score_answers

    def row(rank):  # the source is passage `rank` of two (0: not retrieved)
        ids = {0: ["x", "y"], 1: ["s", "y"], 2: ["x", "s"]}[rank]
        return {"context": [PASSAGES[0], PASSAGES[1]], "context_ids": ids, "source_id": "s", "query": "Who?",
                "prompt": "Who?", "source_rank": rank}

    rows = [row(1), row(1), row(2), row(2), row(0)]
    answers = ["Crouch keeps it [1].", "Crouch keeps it [1][2].", "Crouch keeps it [1].", "Crouch [2].", "[1]"]
    figures = score_answers(answers, rows, ["length"]).figures
    assert figures["cites source only"] == 2 / 5  # rows 1 and 4; naming both passages does not count
    assert figures["cites source only, source not passage 1"] == 1 / 2  # over the two rank-2 rows only
    assert figures["cites source only, worst source position"] == 1 / 2  # [1] 1/2, [2] 1/2
    assert figures["cites one passage"] == 4 / 5  # "[1][2]" names two
    assert figures["cites one passage, that is the source"] == 2 / 4  # rows 1 and 4 of the four single citations


def test_drawn_from_the_source_reads_the_answer_words_not_its_citation():
    from ragrpo.evaluation.from_index import score_answers
    from ragrpo.rewards.citations import drawn_from

    question = "What does the ferryman do?"  # its words ("ferryman") name no passage
    assert drawn_from("He hid a second ledger with watches [1].", PASSAGES, question) == 2  # the words, not the [1]
    assert drawn_from("Walter Crouch keeps a ledger.", PASSAGES, question) == 1
    assert drawn_from("A widow restores the tower.", PASSAGES, question) == 3
    assert drawn_from("The ferryman [2].", PASSAGES, question) is None  # no words of its own
    assert drawn_from("Bananas.", PASSAGES, question) is None  # in no passage
    assert drawn_from("A ledger.", PASSAGES, question) is None  # in passages 1 and 2 alike: a tie names none
    assert drawn_from("Walter Crouch keeps a ledger.", [], question) is None  # no passage was shown

    def row(rank):  # the source is passage `rank` of three
        ids = [["s", "y", "z"], ["x", "s", "z"], ["x", "y", "s"]][rank - 1]
        return {"context": PASSAGES, "context_ids": ids, "source_id": "s", "query": question, "prompt": question,
                "source_rank": rank}

    rows = [row(1), row(2), row(3), row(2)]
    answers = ["Walter Crouch keeps a ledger [2].", "He hid watches [1].", "Walter Crouch [3].", "No idea."]
    figures = score_answers(answers, rows, ["length"]).figures
    assert figures["drawn from the source"] == 2 / 4  # rows 1 and 2, whatever they cite
    assert figures["drawn from one passage"] == 3 / 4  # "No idea." names none
    assert figures["drawn from one passage, that is the source"] == 2 / 3
    assert figures["drawn from one passage, that is the source, source not passage 1"] == 1 / 2  # rows 2, 3
    assert figures["drawn from the source, source not passage 1"] == 1 / 3
    assert figures["drawn from passage 1"] == 2 / 4  # rows 1 and 3 read passage 1, whichever is the source


def test_words_in_copied_runs_count_a_retold_source_sentence_not_a_quoted_name():
    from ragrpo.evaluation.from_index import score_answers

    rows = [{"context": PASSAGES, "context_ids": ["s", "y", "z"], "source_id": "s", "query": "Who keeps a ledger?",
             "prompt": "Who keeps a ledger?", "source_rank": 1}] * 3
    answers = ["Thames ferryman Walter Crouch keeps a ledger [1].", "Walter Crouch [1].",
               "The ferryman Walter Crouch keeps a ledger, and a widow fixes a tower."]
    figures = score_answers(answers, rows, ["length"]).figures
    assert figures["words in copied runs"] == pytest.approx((1 + 0 + 6 / 13) / 3)  # 7 of 7, 0 of 2, 6 of 13


def test_a_habit_of_citing_the_last_passage_passes_below_passage_1_but_not_the_worst_position():
    from ragrpo.evaluation.from_index import score_answers

    def row(rank):
        ids = ["s", "y"] if rank == 1 else ["x", "s"]
        return {"context": PASSAGES[:2], "context_ids": ids, "source_id": "s", "query": "Who?", "prompt": "Who?",
                "source_rank": rank, "kind": "person", "answers": ["Hale"]}

    rows = [row(1), row(2), row(1), row(2)]
    figures = score_answers(["Hale [2]."] * 4, rows, ["length"]).figures  # r13's habit, with two passages
    assert figures["cites source only, source not passage 1"] == 1.0
    assert figures["cites source only, worst source position"] == 0.0
    assert figures["answer accuracy, worst source position"] == 1.0  # "Hale" is right at both positions
    assert figures["cites one passage"] == 1.0
    assert figures["cites one passage, that is the source"] == 1 / 2  # a habit is right as often as chance, 1/k


def test_answer_accuracy_by_kind_and_source_position():
    from ragrpo.evaluation.from_index import score_answers

    def row(rank, kind, answers):
        ids = {0: ["x", "y"], 1: ["s", "y"], 2: ["x", "s"]}[rank]
        return {"context": PASSAGES[:2], "context_ids": ids, "source_id": "s", "query": "Who?", "prompt": "Who?",
                "source_rank": rank, "kind": kind, "answers": answers}

    rows = [row(1, "person", ["Hale"]), row(2, "person", ["Hale"]), row(2, "year", ["1923"]), row(0, "year", ["1923"])]
    answers = ["Inspector Hale [1].", "Sorrell [2].", "In 1923 [2].", "1923"]
    scores = score_answers(answers, rows, ["length"])
    figures = scores.figures
    assert figures["answer accuracy"] == 3 / 4 and figures["answer accuracy, kind person"] == 1 / 2
    assert figures["answer accuracy, kind year"] == 1.0
    assert figures["answer accuracy, source at passage 2"] == 1 / 2
    assert figures["answer accuracy, source not retrieved"] == 1.0
    assert figures["cites source only, source at passage 2"] == 1.0 and figures["cites source only, source at passage 1"] == 1.0
    assert scores.counts["answer accuracy, source at passage 2"] == 2 and scores.counts["answer accuracy"] == 4
    assert 0 < figures["token F1"] < 1


def test_hedged_answers_count_only_where_hedges_are_allowed():
    from ragrpo.evaluation.from_index import score_answers

    rows = [{"context": PASSAGES[:2], "context_ids": ["s", "y"], "source_id": "s", "query": "Which film?",
             "prompt": "Which film?", "source_rank": 1, "kind": "title", "answers": ["The Ferryman's Ledger"],
             "distractors": ["The Painter's Alibi", "1938"]}] * 2
    answers = ["The Ferryman's Ledger [1].", "The Ferryman's Ledger or The Painter's Alibi (1938)"]
    figures = score_answers(answers, rows, ["answer_match"]).figures
    assert figures["answer accuracy"] == 1 / 2 and figures["answer accuracy, hedges allowed"] == 1.0
    late = score_answers(["x" * 100 + " The Ferryman's Ledger"] * 2, rows, ["length"]).figures
    assert late["answer accuracy"] == 1.0 and late["answer accuracy, first 100 chars"] == 0.0
    assert figures["reward answer_match"] == 1 / 2  # the training reward reads the same column


def test_a_row_names_the_other_passages_but_not_its_source():
    from ragrpo.prompts import PassageStyle
    from ragrpo.tuning.curriculum import Question, rag_example

    hits = [{"title": "The Ferryman's Ledger", "release_year": 1923, "movie_plot": "Walter rows."},
            {"title": "Dingo Creek Tapes", "release_year": 1985, "movie_plot": "Tapes hiss."},
            {"title": "The Painter's Alibi", "release_year": 1923, "movie_plot": "Felix paints."}]
    question = Question("Who rows?", "who", document_id(hits[0], "movie_plot"), {"targets": ["Walter"]})
    row = rag_example(question, hits, "movie_plot", reasoning=False, order=[2, 0, 1],
                      style=PassageStyle("Movie", "{title} ({release_year})"))
    assert row["source_rank"] == 2
    # the third film shares the source's year, which an answer naming the source may well write
    assert row["distractors"] == ["The Painter's Alibi", "Dingo Creek Tapes", "1985"]


@pytest.mark.integration
def test_eval_from_index_takes_the_users_gold_file(index_run, tmp_path):
    from ragrpo.evaluation.from_index import gold_questions
    from ragrpo.evaluation.gold import load_gold

    result, curriculum = index_run
    split = json.loads((result.output / "curriculum" / "split.json").read_text())
    trained, held = curriculum.train_ids[0], curriculum.held_ids[0]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Who?", "answers": ["Hale"], "source_id": held}) + "\n"
                  + json.dumps({"question": "Where?", "answers": ["Kent"], "source_id": trained}) + "\n"
                  + json.dumps({"question": "When?", "answers": "1923"}) + "\n")
    name, questions = gold_questions(split, qa)
    # a question about a document the run trained on is no held-out question; one without a source is kept
    assert name == str(qa) and [q.query for q in questions] == ["Who?", "When?"]
    assert questions[0].meta["answers"] == ["Hale"] and questions[0].source_id == held
    qa.write_text(json.dumps({"question": "Where?", "answers": ["Kent"], "source_id": trained}) + "\n")
    with pytest.raises(RagrpoError, match="none of its questions is about a document the run held out"):
        gold_questions(split, qa)
    assert load_gold("builtin:movies")  # and without --qa the packaged set of the corpus is found


@pytest.mark.integration
def test_ask_on_a_from_index_model_retrieves_and_prompts_as_the_run_trained(index_run, movie_db, monkeypatch):
    from click.testing import CliRunner

    from ragrpo.answer_settings import AnswerSettings, saved_settings
    from ragrpo.cli import main
    from ragrpo.generation import rag
    from ragrpo.retrieval.index import open_table

    result, curriculum = index_run
    merged = result.output / "merged"
    assert saved_settings(merged) == AnswerSettings(mode="hybrid", k=2, cite=True, reasoning=True)
    seen = []
    monkeypatch.setattr(rag, "generate", lambda model, tokenizer, conversations, **kw: seen.append(
        conversations[0][0]["content"]) or ["<answer>x</answer>"])
    row = curriculum.examples[0]
    outcome = CliRunner().invoke(main, ["ask", row["query"], "--table", "movies", "--db", str(movie_db),
                                        "--model", str(merged)])
    assert outcome.exit_code == 0, outcome.output
    table = open_table("movies", movie_db)
    hits, column = retrieve(table, row["query"], k=2, mode="hybrid")
    expected = build_prompt(row["query"], table_style(table).passages(hits, column), reasoning=True, cite=True,
                            label="Movie")
    assert seen == [expected]
    # the training prompt showed the same passages, headed the same way (in its balanced order)
    assert sorted(row["context"]) == sorted(p.context() for p in table_style(table).passages(hits, column))
    # an explicit flag still wins, with a notice
    outcome = CliRunner().invoke(main, ["ask", row["query"], "--table", "movies", "--db", str(movie_db),
                                        "--model", str(merged), "-k", "3"])
    assert outcome.exit_code == 0 and "was trained with k=2; answering with k=3" in outcome.output
    assert len(re.findall(r"## Movie \d+:", seen[-1])) == 3


@pytest.mark.integration
def test_serve_on_a_from_index_model_answers_with_its_settings(index_run, movie_db):
    from ragrpo.answer_settings import AnswerSettings
    from ragrpo.serving.request_bodies import ChatRequest
    from ragrpo.serving.server import load_server

    result, _ = index_run
    server = load_server("movies", str(result.output / "merged"), db=movie_db, max_batch=1)
    assert server.answering == AnswerSettings(mode="hybrid", k=2, cite=True, reasoning=True)
    assert server.style.label == "Movie" and server.style.header == "{title} ({release_year})"
    asked = ChatRequest(messages=[{"role": "user", "content": "Who?"}])
    assert server.cites(asked) and not server.cites(ChatRequest(messages=asked.messages, cite=False))


def test_eval_answers_are_reused_only_for_the_same_prompts(tmp_path, monkeypatch):
    from ragrpo.evaluation import from_index

    calls = []

    def fake_answer_all(model, tokenizer, rows, **kwargs):
        calls.append([r["prompt"] for r in rows])
        return [f"answer {len(calls)}" for _ in rows]

    monkeypatch.setattr(from_index, "answer_all", fake_answer_all)
    rows = [{"query": "What happens in Ledger?", "prompt": "Query ... cite e.g. [2]"}]
    loaded = {"base": (None, None, None)}  # model, tokenizer and sampler already in memory: nothing to load

    def answers(prompt_rows):
        return from_index.cached_answers(tmp_path, "base", None, prompt_rows, seed=0, max_new_tokens=8,
                                         loaded=loaded)

    assert answers(rows) == ["answer 1"]
    assert answers(rows) == ["answer 1"] and len(calls) == 1  # same prompts: read back
    # same question, new instructions in the prompt: the old answers do not answer it
    assert answers([{**rows[0], "prompt": "Query ... cite [1] or [2]"}]) == ["answer 2"]
    assert len(calls) == 2


def test_eval_from_index_needs_a_from_index_run(tmp_path):
    from ragrpo.evaluation.from_index import compare_from_index

    with pytest.raises(RagrpoError, match="not a from-index run folder"):
        compare_from_index(tmp_path)


def test_cli_from_index_errors_are_one_line(tmp_path):
    from test_cli import assert_user_error, ragrpo

    assert_user_error(ragrpo("eval", "--from-index", "movies", tmp_path), "not a from-index run folder")
    assert_user_error(ragrpo("train", "--from-index", "nope", "--db", tmp_path, "--output", tmp_path / "run"),
                      "no table 'nope'")
    assert not (tmp_path / "run").exists()
    assert_user_error(ragrpo("eval", "--from-index", "movies", tmp_path, "--seeds", "0,x"), "--seeds")
    assert_user_error(ragrpo("train", "--from-index", "movies", "--db", tmp_path, "--kinds", "who,title",
                             "--output", tmp_path / "run"), "--kinds title: unknown question kind")
    assert_user_error(ragrpo("train", "--from-index", "movies", "--db", tmp_path, "--not-first", "",
                             "--output", tmp_path / "run"), "--not-first names no kind")
    assert_user_error(ragrpo("train", "--from-index", "movies", "--db", tmp_path, "--not-first-questions", "-3",
                             "--output", tmp_path / "run"), "--not-first-questions must be 0 or more")
    assert not (tmp_path / "run").exists()


def test_ask_with_reasoning_shows_only_the_answer(monkeypatch):
    from ragrpo.generation import rag

    seen = {}

    def fake_generate(model, tokenizer, conversations, **kwargs):
        seen["prompt"] = conversations[0][0]["content"]
        return ["<think>Passage 1 says Finch lied.</think>\n<answer>Finch made it up [1].</answer>"]

    monkeypatch.setattr(rag, "generate", fake_generate)
    hits = [{"title": "The Cartographer's Lie", "movie_plot": "Finch invented an island."}]
    answer = rag.answer_from_hits(None, None, "Who lied?", hits, "movie_plot", reasoning=True, cite=True)
    assert answer.text == "Finch made it up [1]."
    assert answer.raw.startswith("<think>") and seen["prompt"].endswith(REASONING_INSTRUCTION)
    assert cite_instruction(1) in seen["prompt"]
    assert answer.sources == [{"title": "The Cartographer's Lie"}]


# ---- questions written by the model ---------------------------------------------------------------


def test_model_questions_take_the_question_line_and_fall_back_to_keywords(monkeypatch):
    from ragrpo.generation import rag
    from ragrpo.tuning.curriculum import QUESTION_PROMPT, model_questions

    seen = []

    def fake_generate(model, tokenizer, conversations, **kwargs):
        seen.extend(c[0]["content"] for c in conversations)
        return ["Sure! Here it is:\nWhat does   Walter hide from the rival boatman?\nHope that helps.",
                "The widow restores a clock."]  # no question mark: the keyword question stands in

    monkeypatch.setattr(rag, "generate", fake_generate)
    questions = model_questions([ROW, OTHER], "movie_plot", None, None)
    assert seen == [QUESTION_PROMPT.format(text=r["movie_plot"]) for r in (ROW, OTHER)]
    assert [q.kind for q in questions] == ["model", "keyword"]
    assert questions[0].query == "What does Walter hide from the rival boatman?"
    assert [q.source_id for q in questions] == [document_id(r, "movie_plot") for r in (ROW, OTHER)]
    assert questions[1].query.endswith("?") and "clock" in questions[1].query.lower()


@pytest.mark.integration
def test_packaged_model_writes_one_question_per_document(movie_db, base_model):
    from ragrpo.retrieval.index import open_table
    from ragrpo.tuning.curriculum import make_questions, read_documents

    rows = read_documents(open_table("movies", movie_db))[:4]
    model, tokenizer = base_model
    questions = make_questions(rows, "movie_plot", "model", model, tokenizer)
    assert [q.source_id for q in questions] == [document_id(r, "movie_plot") for r in rows]
    assert all(q.query.endswith("?") and len(q.query.split()) >= 3 for q in questions)
    assert any(q.kind == "model" for q in questions)  # the 135M model does write questions on this corpus


# ---- resuming a from-index run --------------------------------------------------------------------

RESUME_TOML = """
[grpo]
max_steps = 4
save_steps = 1
num_generations = 2
per_device_train_batch_size = 2
max_completion_length = 8
logging_steps = 1
"""


@pytest.mark.integration
def test_killed_from_index_run_resumes_on_its_own_curriculum(movie_db, tiny_model_dir, tmp_path):
    """`--resume` rebuilds nothing: it reads the recorded curriculum back, so the resumed steps still see the
    context, ids and source columns that the citation reward needs."""
    import os
    import subprocess
    import sys

    from conftest import kill_at_checkpoint

    (tmp_path / "run.toml").write_text(RESUME_TOML)
    output = tmp_path / "run"
    command = [sys.executable, "-m", "ragrpo.cli", "train", "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kill_at_checkpoint(command + ["--from-index", "movies", "--db", str(movie_db), "-k", "2", "--max-documents", "30",
                                  "--model", str(tiny_model_dir), "--config", str(tmp_path / "run.toml")],
                       output / "checkpoints" / "checkpoint-2", env)
    recorded = (output / "curriculum" / "train.jsonl").read_text()

    result = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 4 steps" in result.stdout
    assert (output / "curriculum" / "train.jsonl").read_text() == recorded
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # each step logged once
    assert all("rewards/source_citation_debiased_1w/mean" in r for r in steps)
    assert (output / "merged" / "config.json").exists()


@pytest.mark.integration
def test_from_index_run_trains_on_the_rewards_its_config_file_names(movie_db, tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "run.toml").write_text('rewards = ["answer_match=2", "length"]\n' + RESUME_TOML.replace(
        "max_steps = 4", "max_steps = 1"))
    output = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "ragrpo.cli", "train", "--output", str(output), "--from-index",
                             "movies", "--db", str(movie_db), "-k", "2", "--max-documents", "30", "--model",
                             str(tiny_model_dir), "--config", str(tmp_path / "run.toml")],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((output / "config.json").read_text())["run"]["rewards"] == ["answer_match=2", "length"]


def test_from_index_settings_fill_only_what_the_configuration_leaves_open():
    from ragrpo.config import build_run_config
    from ragrpo.tuning.curriculum import IndexSource, from_index_config

    source = IndexSource("movies", "db")
    silent = from_index_config(build_run_config(output="r"), source, rewards_given=False)
    assert silent.rewards == ["answer_match_own_words=2", "source_citation_debiased_1w", "drawn_from_first=0",
                              "answer_match=0", "verbatim_span=0"]
    assert silent.grpo["num_generations"] == silent.grpo["per_device_train_batch_size"] == 8
    assert silent.grpo["multi_objective_aggregation"] == "sum_then_normalize" and silent.grpo["beta"] == 0.0
    given = from_index_config(build_run_config(output="r", rewards=["length"], beta=0.04,
                                               grpo={"per_device_train_batch_size": 4}), source, rewards_given=True)
    assert given.rewards == ["length"] and given.grpo["beta"] == 0.04
    assert "num_generations" not in given.grpo and given.grpo["per_device_train_batch_size"] == 4
    assert "multi_objective_aggregation" not in given.grpo
    # the step-100 check comes with the default rewards and the question kinds it was chosen on (every kind),
    # recorded only (0 restarts) unless asked
    assert silent.restart_if is None and given.restart_if is None
    every = IndexSource("movies", "db", kinds=QUESTION_KINDS)
    recorded = from_index_config(build_run_config(output="r"), every, rewards_given=False)
    assert recorded.restart_if == "answer_match<0.22@100" and recorded.restarts == 0
    asked = from_index_config(build_run_config(output="r", restarts=1), every, rewards_given=False)
    assert asked.restart_if == "answer_match<0.22@100" and asked.restarts == 1
    own = from_index_config(build_run_config(output="r", restart_if="answer_match<0.1@60"), source, rewards_given=False)
    assert own.restart_if == "answer_match<0.1@60" and own.restarts is None  # train() reads None as 1
    for other in (IndexSource("movies", "db", reasoning=True, kinds=QUESTION_KINDS),
                  IndexSource("movies", "db", agentic=True, kinds=QUESTION_KINDS)):
        assert from_index_config(build_run_config(output="r"), other, rewards_given=False).restart_if is None


@pytest.mark.integration
def test_a_run_records_its_table_version_and_eval_reads_the_table_as_it_was(movie_db, tmp_path):
    import shutil

    from ragrpo.retrieval.index import open_table
    from ragrpo.tuning.curriculum import IndexSource, build_curriculum, checkout_version

    shutil.copytree(movie_db, tmp_path / "db")
    source = IndexSource("movies", str(tmp_path / "db"), k=2, held_out=0.2)
    record = build_curriculum(source).split_record()
    table = open_table("movies", tmp_path / "db")
    assert record["table_version"] == table.version and record["table_uri"].endswith("movies.lance")
    rows = table.count_rows()
    # an upsert after training: a film whose plot matches every ferry question better than the real one
    table.add([{"title": "The Ferryman's Ledger II", "release_year": 2030, "movie_plot": "Walter Crouch the "
                "Thames ferryman rows his passengers from Gravesend to Tilbury and keeps a ledger of names."}])
    assert open_table("movies", tmp_path / "db").count_rows() == rows + 1
    notices = []
    pinned = checkout_version(open_table("movies", tmp_path / "db"), record["table_version"], notices.append)
    assert pinned.count_rows() == rows and notices == []
    hits = retrieve(pinned, "Thames ferryman Walter Crouch ledger", k=3)[0]
    assert "The Ferryman's Ledger II" not in [h["title"] for h in hits]  # the evaluation sees the trained index
    latest = checkout_version(open_table("movies", tmp_path / "db"), None, notices.append)
    assert latest.count_rows() == rows + 1 and "recorded no table version" in notices[0]
    assert "The Ferryman's Ledger II" in [h["title"] for h in retrieve(latest, "Thames ferryman Walter Crouch ledger",
                                                                       k=3)[0]]  # which the new row would change
    with pytest.raises(RagrpoError, match="no version 999"):
        checkout_version(open_table("movies", tmp_path / "db"), 999, notices.append)
