"""Search while answering: the tag protocol, the search loop (scripted and on a tiny model), the loss mask
TRL receives, the search limit, malformed calls and the search rewards."""

import pytest

from ragrpo.generation.agentic import SearchTool, Transcript, agentic_prompt_ids, run
from ragrpo.prompts import (
    INFORMATION_CLOSE,
    INFORMATION_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    agentic_answer,
    build_agentic_prompt,
    segment_query,
)
from ragrpo.rewards.agentic import SearchCost, SearchFormat, SearchFoundSource
from ragrpo.rewards.base import answer_text
from ragrpo.rewards.builtin import hedges


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="module")
def movies(movie_db):
    from ragrpo.retrieval.index import open_table

    return open_table("movies", movie_db)


class Scripted:
    """A `sample(prefixes, budgets)` that continues each row with its next scripted segment (text), cut to the
    row's budget as a real sampler is; records the budgets it was given."""

    def __init__(self, tokenizer, prompts: list[list[int]], segments: list[list[str]]):
        self.tokenizer, self.prompts = tokenizer, prompts
        self.left = [[tokenizer(s, add_special_tokens=False)["input_ids"] for s in row] for row in segments]
        self.budgets: list[list[int]] = []
        self.stops: list[tuple[str, ...]] = []

    def __call__(self, prefixes, budgets, stop):
        self.budgets.append(list(budgets))
        self.stops.append(stop)
        out = []
        for prefix, budget in zip(prefixes, budgets, strict=True):
            row = next(n for n, p in enumerate(self.prompts) if prefix[:len(p)] == p)
            out.append(self.left[row].pop(0)[:budget])
        return out


def _prompt(tokenizer, question: str) -> list[int]:
    return agentic_prompt_ids(tokenizer, [{"role": "user", "content": build_agentic_prompt(question, 2, "Movie")}])


def _inserted(tokenizer, row: Transcript) -> str:
    return tokenizer.decode([t for t, m in zip(row.ids, row.mask, strict=True) if m == 0])


def _written(tokenizer, row: Transcript) -> str:
    return tokenizer.decode([t for t, m in zip(row.ids, row.mask, strict=True) if m == 1])


@pytest.mark.parametrize("segment, expected", [
    ("<search> ferryman  ledger </search>", "ferryman ledger"),
    ("I think <search>a</search> then <search>b c</search>", "b c"),  # the last query the segment opened
    ("<search></search>", ""),
    ("ferryman ledger</search>", None),  # closes a search it never opened
])
def test_a_segment_query_is_the_text_of_its_last_search(segment, expected):
    assert segment_query(segment) == expected


@pytest.mark.parametrize("completion, expected", [
    # TRL's completion starts after the <search> that opened the turn
    (" ferry</search>\n<information>\n## Movie 1: X\nplot\n</information>\nWalter [1].", "Walter [1]."),
    (" a</search>\n<information>\nno\n</information>\n<search>b</search>\n<information>\nyes\n</information>\nHale",
     "Hale"),
    (" ferry</search>\n<information>\n## Movie 1: X\nplot", ""),  # ended inside the results
    (" ferry</search>\n<information>\nplot\n</information>\n<search>more", ""),  # ended inside a query
    (" ferry</search>", ""),  # stopped at a query
    (" ferry</search>\n<information>\nplot\n</information>\nIt is <search>x</search> Hale [2].", "It is   Hale [2]."),
])
def test_the_answer_of_an_agentic_completion_follows_its_last_results(completion, expected):
    assert agentic_answer(completion) == expected
    assert answer_text([{"role": "assistant", "content": completion}]) == expected.strip()


def test_the_loop_masks_the_results_it_inserts_and_numbers_passages_on(tokenizer, movies):
    tool = SearchTool(movies, k=2, mode="hybrid")
    prompt = _prompt(tokenizer, "Who keeps the ledger of the Thames ferry?")
    assert tokenizer.decode(prompt).endswith(SEARCH_OPEN)  # the reply opens inside a search
    segments = [" ferryman ledger Thames</search>", "\n<search>lamplighter Baltic fog</search>",
                " Walter Crouch keeps it [1]." + tokenizer.eos_token]
    sample = Scripted(tokenizer, [prompt], [segments])
    [row] = run(sample, tokenizer, [prompt], tool, max_searches=2, max_new_tokens=64)

    assert row.finish_reason == "stop" and [s.query for s in row.searches] == ["ferryman ledger Thames",
                                                                               "lamplighter Baltic fog"]
    first, second = row.searches
    assert first.error is None and first.numbers == [1, 2]
    assert "The Ferryman's Ledger" in tokenizer.decode(row.ids) and first.found[0] in row.context_ids
    # a passage already shown is not shown again; new ones are numbered on from the last
    assert second.numbers == list(range(3, 3 + len(second.numbers)))
    assert len(set(row.context_ids)) == len(row.context_ids) == len(row.context)
    # what the model wrote is exactly the script; everything else is the two result blocks, masked out
    assert _written(tokenizer, row) == "".join(segments)
    inserted = _inserted(tokenizer, row)
    assert inserted.count(INFORMATION_OPEN) == inserted.count(INFORMATION_CLOSE) == 2
    assert "## Movie 1:" in inserted and f"## Movie {second.numbers[0]}:" in inserted
    assert row.written == sum(row.mask) == sum(len(tokenizer(s, add_special_tokens=False)["input_ids"])
                                               for s in segments)
    # each round's budget is what is left of the model's own tokens; inserted results do not count
    assert sample.budgets == [[64], [64 - row.mask[:row.mask.index(0)].count(1)],
                              [64 - sum(row.mask[:len(row.mask) - row.mask[::-1].index(0)])]]
    assert agentic_answer(tokenizer.decode(row.ids, skip_special_tokens=True)) == "Walter Crouch keeps it [1]."


def test_searches_beyond_the_limit_are_refused_and_the_loop_goes_on(tokenizer, movies):
    tool = SearchTool(movies, k=1, mode="vector")
    prompt = _prompt(tokenizer, "Which film is about a lamplighter?")
    segments = [" lamplighter</search>", "<search>ferry</search>", "<search>glass</search>", " Nocturne [1]."]
    [row] = run(Scripted(tokenizer, [prompt], [segments]), tokenizer, [prompt], tool, max_searches=2,
                max_new_tokens=64)
    assert [s.error is None for s in row.searches] == [True, True, False]
    assert row.searches[2].error.startswith("No searches left") and row.searches[2].ids == []
    assert len(row.context) == 2  # the refused call showed nothing
    assert "No searches left" in _inserted(tokenizer, row)
    assert row.finish_reason == "length"  # the script ran out without an end of turn: cut at its budget


def test_malformed_calls_get_a_note_and_never_raise(tokenizer, movies):
    bad_filter = SearchTool(movies, k=2, where="no_such_column > 3")  # LanceDB refuses it at search time
    prompts = [_prompt(tokenizer, "q one"), _prompt(tokenizer, "q two"), _prompt(tokenizer, "q three")]
    scripts = [[" </search>", " answer."],  # empty query
               [" ferry</search>", "more words</search>", " answer."],  # closes a search it never opened
               [" ferry</search>", " answer."]]  # the search itself fails
    tools = {0: SearchTool(movies, k=2), 1: SearchTool(movies, k=2), 2: bad_filter}
    rows = []
    for n in range(3):
        rows += run(Scripted(tokenizer, [prompts[n]], [scripts[n]]), tokenizer, [prompts[n]], tools[n],
                    max_searches=3, max_new_tokens=48)
    empty, unopened, failed = rows
    assert empty.searches[0].error == "The query was empty; no search was run."
    assert unopened.searches[0].error is None and unopened.searches[1].error.startswith("A search starts with")
    assert failed.searches[0].error.startswith("The search failed:") and failed.context == []
    for row in rows:
        assert "no search was run" in _inserted(tokenizer, row) or "failed" in _inserted(tokenizer, row)
        assert _written(tokenizer, row).endswith(" answer.")


def test_a_row_that_spends_its_budget_inside_a_query_ends_there(tokenizer, movies):
    prompt = _prompt(tokenizer, "Which film?")
    [row] = run(Scripted(tokenizer, [prompt], [[" a very long query that never closes at all"]]), tokenizer,
                [prompt], SearchTool(movies, k=1), max_new_tokens=5)
    assert row.finish_reason == "length" and row.searches == [] and row.written == 5 and 0 not in row.mask


@pytest.mark.parametrize("searches, source, expected", [
    ([{"found": ["a", "b"]}], "b", 1.0),
    ([{"found": ["a"]}, {"found": ["c", "b"]}], "b", 1.0),  # a later search counts
    ([{"found": ["a"]}], "b", 0.0),
    ([{"found": [], "error": "The query was empty; no search was run."}], "b", 0.0),
    ([], "b", 0.0),  # never searched
])
def test_search_found_source(searches, source, expected):
    assert SearchFoundSource()(["x"], searches=[searches], source_id=[source]) == [expected]


@pytest.mark.parametrize("completion, searches, expected", [
    (" q</search>\n<information>\np\n</information>\nHale [1].", [{"error": None}], 1.0),
    (" q</search>\n<information>\np\n</information>\nHale [1].", [{"error": None}, {"error": "No searches left"}],
     0.75),
    (" q</search>\n<information>\np", [{"error": None}], 0.5),  # no answer after the results
    (" </search>\n<information>\nThe query was empty\n</information>\nHale.", [{"error": "empty"}], 0.5),
    (" an answer that never closed the opening query", [], 0.0),  # neither a call nor an answer
])
def test_search_format(completion, searches, expected):
    assert SearchFormat()([completion], searches=[searches]) == [expected]


def test_search_cost_charges_each_search_beyond_the_first():
    assert SearchCost()(["a", "b", "c"], searches=[[], [{}], [{}, {}, {}]]) == [0.0, 0.0, pytest.approx(-0.2)]
    assert SearchCost(0.5).__name__ == "search_cost_0.5"


def test_search_rewards_need_the_rollout_columns():
    from ragrpo import RagrpoError

    with pytest.raises(RagrpoError, match="--agentic"):
        SearchFoundSource()(["x"], source_id=["a"])
    with pytest.raises(RagrpoError, match="at least 0"):
        SearchCost(-1)


def test_groundedness_and_citation_score_an_agentic_answer_on_what_its_searches_showed():
    """The rollout's `context` is the passages the searches showed: the answer after the results is scored
    against them, and the query and the results themselves are not part of the answer."""
    from ragrpo.rewards.builtin import REWARDS

    context = ["The Ferryman's Ledger (1923)\nThames ferryman Walter Crouch helps Inspector Hale.",
               "The Salt Clock (1921)\nA widow."]
    shown = " ferryman pirates</search>\n<information>\n## Movie 1: ...\n</information>\n"
    answer = "Walter Crouch, the Thames ferryman, helps Inspector Hale"
    completions = [shown + answer + " [1].", shown + "Captain Pirate [1].", shown + answer + " [2]."]
    columns = {"context": [context] * 3, "context_ids": [["ferry", "salt"]] * 3, "source_id": ["ferry"] * 3,
               "query": ["Who helps?"] * 3}
    assert REWARDS["groundedness"](completions, **columns) == [1.0, 0.0, 1.0]  # "pirates" in the query is no claim
    cited = REWARDS["source_citation_exact"](completions, **columns)
    assert cited[0] > 0 and cited[2] <= 0  # [2] is not the source's passage


def test_answer_match_takes_an_agentic_rows_distractors_from_what_its_searches_showed():
    from ragrpo.rewards.builtin import answer_match

    names = [["The Salt Clock", "1921"], ["The Ferryman's Ledger", "1923"]]
    assert hedges(names, ["salt", "ferry"], "ferry") == ["The Salt Clock", "1921"]
    completion = " ferry</search>\n<information>\n...\n</information>\n"
    scores = answer_match([completion + "The Ferryman's Ledger [2].", completion + "The Salt Clock or The Ferryman's "
                           "Ledger."], targets=[["The Ferryman's Ledger"]] * 2, passage_names=[names] * 2,
                          context_ids=[["salt", "ferry"]] * 2, source_id=["ferry"] * 2)
    assert scores == [1.0, 0.0]  # naming the other shown film as well is a hedge


def test_the_decode_loop_and_generate_stop_at_the_same_token_for_a_stop_string(tiny_causal_lm, force_hardware):
    """The sampler's stop strings: the decode loop and `generate` both end a row on the token that completes
    the string (found in the greedy text), so the search loop sees the same segments on either path."""
    import torch
    from conftest import needs_packing
    from transformers import GenerationConfig

    from ragrpo.generation.engine import SamplingCopy, generate_ids

    needs_packing(torch.float32)
    force_hardware(BF16="0", PACK="1", FP16="0")  # float32 weights on both paths: the same tokens to compare
    model, tokenizer = tiny_causal_lm
    prompts = [tokenizer("the ferryman keeps", add_special_tokens=False)["input_ids"],
               tokenizer("a lamplighter in the fog of", add_special_tokens=False)["input_ids"]]
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    eos = [tokenizer.eos_token_id]
    copy = SamplingCopy(model, dtype=torch.float32)
    copy.sync()
    assert copy.packed is not None  # the decode loop, not generate, samples the copy
    free = copy.generate(prompts, config, tokenizer.pad_token_id, eos)
    assert all(len(row) == 12 for row in free)
    stop = tokenizer.decode(free[0][5:7])  # a string the first row writes at tokens 5..6
    looped = copy.generate(prompts, config, tokenizer.pad_token_id, eos, stop=(stop,), tokenizer=tokenizer,
                           budgets=[12, 4])
    plain = generate_ids(model, prompts, config, tokenizer.pad_token_id, eos, stop=(stop,), tokenizer=tokenizer,
                         budgets=[12, 4])
    assert looped == plain
    assert looped[0] == free[0][:len(looped[0])] and stop in tokenizer.decode(looped[0]) and len(looped[0]) <= 7
    assert stop not in tokenizer.decode(looped[0][:-1])  # cut at the first token that completes it
    assert looped[1] == free[1][:4]  # its own budget


def test_an_agentic_run_hands_trl_the_mask_of_inserted_tokens(tmp_path, movie_db, tiny_model_dir):
    """A real GRPOTrainer with the agentic rollout on a tiny model: what TRL scores carries a tool mask that is
    0 exactly on the tokens the loop inserted, and the loss mask is the completion mask times it."""
    from ragrpo.config import build_run_config
    from ragrpo.tuning.curriculum import IndexSource, build_curriculum, from_index_config
    from ragrpo.tuning.train import make_trainer

    source = IndexSource("movies", str(movie_db), k=2, held_out=0.2, max_documents=12, agentic=True, max_searches=2)
    cfg = from_index_config(build_run_config(output=str(tmp_path / "run"), model=str(tiny_model_dir), max_steps=1,
                                             num_generations=2, max_completion_length=16, learning_rate=1e-3,
                                             grpo={"per_device_train_batch_size": 4, "save_strategy": "no"}),
                            source, rewards_given=False)
    curriculum = build_curriculum(source)
    assert all(SEARCH_OPEN in r["prompt"][0]["content"] and "## Movie" not in r["prompt"][0]["content"]
               for r in curriculum.examples)  # no passages up front
    from datasets import Dataset

    from ragrpo.models import load_model
    from ragrpo.tuning.agentic import AgenticRollout

    model, tokenizer = load_model(str(tiny_model_dir))
    calls = []

    class Recording(AgenticRollout):
        def __call__(self, prompts, trainer):
            out = super().__call__(prompts, trainer)
            calls.append(out)
            return out

    from ragrpo.retrieval.index import open_table

    tool = SearchTool(open_table("movies", movie_db), k=2)
    # a tiny random model never closes a query by itself: its first segment is forced to, so results go in
    trainer = make_trainer(cfg, model, tokenizer, Dataset.from_list(curriculum.examples[:2]), tmp_path / "work",
                           rollout=Recording(tool, 2))
    original = trainer.sampling_copy

    def closing_sampler():
        copy = original()
        generate = copy.generate

        def first_closes(prefixes, *args, **kwargs):
            out = generate(prefixes, *args, **kwargs)
            return [row if row and SEARCH_CLOSE in tokenizer.decode(row) or len(p) > 200 else
                    tokenizer(" ferry" + SEARCH_CLOSE, add_special_tokens=False)["input_ids"]
                    for p, row in zip(prefixes, out)]

        copy.generate = first_closes
        return copy

    trainer.sampling_copy = closing_sampler
    inputs = [dict(trainer.train_dataset[i % 2]) for i in range(4)]
    scored = trainer._generate_and_score_completions(inputs)
    [out] = calls
    assert all(0 in mask for mask in out["env_mask"])  # every row had results inserted
    tool_mask = scored["tool_mask"]
    for n, mask in enumerate(out["env_mask"]):
        assert tool_mask[n, :len(mask)].tolist() == mask
        assert out["completion_ids"][n] == scored["completion_ids"][n, :len(mask)].tolist()
        inserted = tokenizer.decode([t for t, m in zip(out["completion_ids"][n], mask) if not m])
        assert inserted.lstrip("\n").startswith(INFORMATION_OPEN)
    assert len(out["context"]) == 4 and all(out["context_ids"]) and all(len(s) >= 1 for s in out["searches"])
    # TRL normalises the loss by the tokens it trains on: the model's own, not the inserted results
    written = sum(min(sum(m), int(c.sum())) for m, c in zip(out["env_mask"], scored["completion_mask"]))
    assert int(scored["num_items_in_batch"]) == int((scored["completion_mask"] * tool_mask).sum()) == written


def test_the_first_query_also_ends_with_its_line_and_the_loop_closes_the_tag(tokenizer, movies):
    prompt = _prompt(tokenizer, "Who keeps the ledger?")
    sample = Scripted(tokenizer, [prompt], [[" Thames ferryman ledger\n", " Hale [1]." + tokenizer.eos_token]])
    [row] = run(sample, tokenizer, [prompt], SearchTool(movies, k=2), max_new_tokens=40)
    assert [s.query for s in row.searches] == ["Thames ferryman ledger"] and row.searches[0].error is None
    assert sample.stops == [(SEARCH_CLOSE, "\n"), (SEARCH_CLOSE,)]  # only the query the prompt opened ends so
    assert _inserted(tokenizer, row).startswith(SEARCH_CLOSE + "\n" + INFORMATION_OPEN)  # not the model's token
    assert _written(tokenizer, row) == " Thames ferryman ledger\n Hale [1]." + tokenizer.eos_token
    assert agentic_answer(tokenizer.decode(row.ids, skip_special_tokens=True)) == "Hale [1]."


def test_a_scripted_model_searches_answers_and_can_be_cancelled(searcher_dir, movies):
    """The whole loop on a real (tiny, scripted) model through `generate`: the search it writes, the results it
    reads, its answer; and a loop cancelled before its first round samples nothing."""
    from ragrpo.generation.agentic import search_and_answer
    from ragrpo.models import load_model

    model, tokenizer = load_model(str(searcher_dir))
    tool = SearchTool(movies, k=3, mode="hybrid")
    rows = search_and_answer(model, tokenizer, ["Who helps the inspector?", "Which film has bees?"], tool,
                             max_searches=2, max_new_tokens=32)
    for row in rows:
        assert [s.query for s in row.searches] == ["Thames ferryman ledger"] and row.finish_reason == "stop"
        assert row.searches[0].numbers == [1, 2, 3] and "The Ferryman's Ledger (1923)" in row.context[0]
        assert agentic_answer(row.text(tokenizer)) == "Inspector Hale [1]."
        assert tokenizer.decode([t for t, m in zip(row.ids, row.mask) if m]) == (
            " Thames ferryman ledger\n Inspector Hale [1]." + tokenizer.eos_token)
    [cancelled] = search_and_answer(model, tokenizer, ["q"], tool, cancelled=lambda: True)
    assert cancelled.finish_reason == "cancelled" and cancelled.ids == [] and cancelled.searches == []


def test_agentic_figures_from_transcripts():
    from ragrpo.evaluation.agentic import score_transcripts
    from ragrpo.tuning.curriculum import Question

    questions = [Question("Who helps?", "person", "ferry", {"answers": ["Hale"]}),
                 Question("Which film?", "title", "salt", {"answers": ["The Salt Clock"]}),
                 Question("Who?", "person", "ferry", {"answers": ["Hale"]})]
    shown = [["The Ferryman's Ledger", "1923"], ["The Salt Clock", "1921"]]
    records = [
        # found the source, answered it, cited its passage
        {"completion": " ferry</search>\n<information>\n.\n</information>\nHale [1].", "context_ids": ["ferry", "salt"],
         "names": shown, "searches": [{"query": "ferry", "found": ["ferry", "salt"], "error": None}]},
        # found the source at [2], but hedged between both films and cited [1]
        {"completion": " clock</search>\n<information>\n.\n</information>\nThe Salt Clock or The Ferryman's Ledger [1].",
         "context_ids": ["ferry", "salt"], "names": shown,
         "searches": [{"query": "clock", "found": ["ferry", "salt"], "error": None},
                      {"query": "", "found": [], "error": "The query was empty; no search was run."}]},
        # never closed its query: no search, no answer
        {"completion": " who is it", "context_ids": [], "names": [], "searches": []},
    ]
    figures, counts = score_transcripts(records, questions)
    assert figures["search found source"] == pytest.approx(2 / 3)
    assert figures["searches per answer"] == pytest.approx(1.0) and figures["failed calls per answer"] == pytest.approx(1 / 3)
    assert figures["text after the results"] == pytest.approx(2 / 3)
    assert figures["answer accuracy"] == pytest.approx(1 / 3)  # the hedge does not count
    assert figures["answer accuracy, hedges allowed"] == pytest.approx(2 / 3)
    assert figures["cites source only"] == pytest.approx(1 / 3)
    assert figures["answer accuracy, kind person"] == pytest.approx(0.5) and counts["answer accuracy, kind title"] == 1


def test_ask_agentic_prints_each_search_and_the_answer(searcher_dir, movie_db):
    import json

    from click.testing import CliRunner

    from ragrpo.cli import main

    args = ["ask", "Who helps the Thames police?", "--table", "movies", "--db", str(movie_db), "--agentic",
            "--model", str(searcher_dir), "-k", "2", "--mode", "hybrid", "--max-new-tokens", "32"]
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == "search: Thames ferryman ledger -> passages [1, 2]"
    # Inspector Hale is in The Ferryman's Ledger's plot, not the other's: the answer is marked as drawn from it
    assert "Inspector Hale [1]." in lines and lines[-2:] == [
        "  [1] The Ferryman's Ledger (1923)   <- the answer's words are drawn from this one",
        "  [2] Last Ferry to Cheung Chau (1998)"]
    record = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert record["searches"] == [{"query": "Thames ferryman ledger", "passages": [1, 2], "error": None}]
    assert record["answer"] == "Inspector Hale [1]." and record["sources"][0]["label"] == "The Ferryman's Ledger (1923)"
    assert record["drawn_from"] == 1


def test_an_agentic_answer_after_a_search_that_showed_nothing_names_no_source(base_model_dir, movie_db, tmp_path):
    """A model that calls the tool with an empty query gets no passages, then answers: the reply lists no source
    and marks none (the attribution took the best of no passages, and `ask --agentic` failed with a traceback)."""
    import json

    from click.testing import CliRunner
    from conftest import scripted_searcher

    from ragrpo.cli import main

    searcher = scripted_searcher(base_model_dir, tmp_path / "blank", query="")
    args = ["ask", "Who helps the Thames police?", "--table", "movies", "--db", str(movie_db), "--agentic",
            "--model", str(searcher), "--max-new-tokens", "32", "--json"]
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.output)
    assert [call["passages"] for call in record["searches"]] == [[]] and record["searches"][0]["error"]
    assert record["answer"] == "Inspector Hale [1]." and record["sources"] == [] and record["drawn_from"] is None


@pytest.mark.parametrize("extra, fragment", [
    (["--where", "release_year >"], "invalid --where"),
    (["--max-searches", "0"], "--max-searches must be at least 1"),
])
def test_ask_agentic_bad_input_is_one_line(movie_db, tmp_path, extra, fragment):
    from test_cli import assert_user_error, ragrpo

    # the model path does not exist: the input is refused before any model would load
    assert_user_error(ragrpo("ask", "q", "--table", "movies", "--db", movie_db, "--agentic", "--model",
                             tmp_path / "none", *extra), fragment)


def test_eval_agentic_needs_an_agentic_from_index_run(index_run_dir, tmp_path):
    from test_cli import assert_user_error, ragrpo

    assert_user_error(ragrpo("train", "--agentic", "--output", tmp_path / "run"), "add --from-index TABLE")
    assert not (tmp_path / "run").exists()

    assert_user_error(ragrpo("eval", str(index_run_dir), "--agentic"), "add --from-index TABLE")
    assert_user_error(ragrpo("eval", "--from-index", "movies", str(index_run_dir), "--agentic"),
                      "was not trained with --agentic")


@pytest.fixture(scope="module")
def agentic_run(tmp_path_factory, movie_db, searcher_dir):
    """A 2-step agentic from-index run that starts from the scripted searcher (so the run searches from step 1)."""
    from ragrpo.config import build_run_config
    from ragrpo.tuning.curriculum import IndexSource, from_index_config, train_from_index

    source = IndexSource("movies", str(movie_db), k=2, mode="hybrid", held_out=0.2, max_documents=40, agentic=True,
                         max_searches=2)
    cfg = build_run_config(output=str(tmp_path_factory.mktemp("runs") / "agentic"), model=str(searcher_dir),
                           max_steps=2, num_generations=2, max_completion_length=16, learning_rate=1e-3,
                           grpo={"per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no"})
    result, curriculum = train_from_index(from_index_config(cfg, source, rewards_given=False), source)
    return result, curriculum


@pytest.fixture(scope="module")
def index_run_dir(tmp_path_factory, movie_db, tiny_model_dir_module):
    """A plain (not agentic) from-index run folder with its curriculum: what `eval --agentic` must refuse."""
    from ragrpo.tuning.curriculum import IndexSource, build_curriculum
    from ragrpo.tuning.train import write_files

    folder = tmp_path_factory.mktemp("runs") / "plain"
    write_files(folder, build_curriculum(IndexSource("movies", str(movie_db), k=2, held_out=0.2, max_documents=20)).files())
    (folder / "merged").mkdir()
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir_module(tmp_path_factory, base_model_dir):
    from conftest import tiny_llama

    model, tokenizer = tiny_llama(base_model_dir, max_position_embeddings=2048)
    folder = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_an_agentic_run_trains_on_its_searches_and_eval_reports_them(agentic_run, movie_db, searcher_dir, tmp_path):
    import json

    from ragrpo.evaluation.agentic import compare_agentic
    from ragrpo.retrieval.index import open_table
    from ragrpo.tuning.curriculum import document_id

    result, _ = agentic_run
    run = result.output
    split = json.loads((run / "curriculum" / "split.json").read_text())
    assert split["source"]["agentic"] is True and split["source"]["max_searches"] == 2
    config = json.loads((run / "config.json").read_text())["run"]
    assert config["rewards"] == ["answer_match=2", "source_citation_debiased_1w", "search_found_source",
                                 "search_format=0.5", "search_cost"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "rewards/search_found_source/mean" in r]
    assert len(steps) == 2
    # the scripted model searched once per completion: every call ran, so the format reward is at least 1/2
    assert all(r["rewards/search_format/mean"] >= 0.5 and r["rewards/search_cost/mean"] == 0 for r in steps)

    comparison = compare_agentic(run, base=str(searcher_dir), seeds=[0, 1], max_questions=6, output=tmp_path / "e")
    base = comparison.summary("base")
    assert comparison.questions == 6 and base["searches per answer"]["mean"] == 1.0
    assert base["failed calls per answer"]["mean"] == 0.0 and base["text after the results"]["mean"] == 1.0
    # the scripted query finds what a search for it finds, whatever the question: checked against LanceDB directly
    table = open_table("movies", movie_db)
    from ragrpo.evaluation.from_index import gold_questions
    from ragrpo.retrieval.search import search

    _, golds = gold_questions(split, None)
    from ragrpo.evaluation.agentic import spread_over

    asked = spread_over(golds, 6)
    found = {document_id(hit, "movie_plot") for hit in search(table, "Thames ferryman ledger", k=2, mode="hybrid")}
    assert base["search found source"]["mean"] == pytest.approx(sum(q.source_id in found for q in asked) / 6)
    report = (tmp_path / "e" / "report.md").read_text()
    assert "## Done when" in report and "search found source" in report and "single-shot" in report
    assert (tmp_path / "e" / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "e" / "results.json").read_text())["verbatim_found"] == comparison.verbatim_found


@pytest.mark.integration
def test_a_killed_agentic_run_resumes_with_its_search_loop(movie_db, searcher_dir, tmp_path):
    """`--resume` brings the search loop back: the resumed steps still search (their search rewards are logged,
    which the rewards can only do with the rollout's `searches` column), and a library `train(resume=True)`
    without the loop is refused rather than trained without searches."""
    import json
    import os
    import subprocess
    import sys

    from conftest import kill_at_checkpoint

    from ragrpo import RagrpoError
    from ragrpo.config import build_run_config
    from ragrpo.tuning.train import train

    (tmp_path / "run.toml").write_text("[grpo]\nmax_steps = 3\nsave_steps = 1\nnum_generations = 2\n"
                                       "per_device_train_batch_size = 2\nmax_completion_length = 12\nlogging_steps = 1\n")
    output = tmp_path / "run"
    command = [sys.executable, "-m", "ragrpo.cli", "train", "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kill_at_checkpoint(command + ["--from-index", "movies", "--db", str(movie_db), "-k", "2", "--max-documents", "30",
                                  "--agentic", "--model", str(searcher_dir), "--config", str(tmp_path / "run.toml")],
                       output / "checkpoints" / "checkpoint-1", env)
    with pytest.raises(RagrpoError, match="agentic run"):
        train(build_run_config(output=str(output), model=str(searcher_dir)), resume=True)

    result = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 3 steps" in result.stdout
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # the scripted searcher searches once per answer on every step, resumed ones included
    assert all(r["rewards/search_format/mean"] >= 0.5 for r in steps)
    assert (output / "merged" / "config.json").exists()


@pytest.mark.parametrize("items, limit, expected", [
    (list(range(10)), 4, [0, 2, 5, 7]),  # evenly over the whole list, not its first part
    (list(range(274)), 120, None),
    (list(range(3)), 5, [0, 1, 2]),
    (list(range(3)), None, [0, 1, 2]),
])
def test_a_question_limit_spreads_over_the_gold_set(items, limit, expected):
    from ragrpo.evaluation.agentic import spread_over

    kept = spread_over(items, limit)
    if expected is None:
        assert len(kept) == limit == len(set(kept)) and kept[-1] >= len(items) - 3
    else:
        assert kept == expected
