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
    (" ferry</search>\n<information>\n## Movie [1]: X\nplot\n</information>\nWalter [1].", "Walter [1]."),
    (" a</search>\n<information>\nno\n</information>\n<search>b</search>\n<information>\nyes\n</information>\nHale",
     "Hale"),
    (" ferry</search>\n<information>\n## Movie [1]: X\nplot", ""),  # ended inside the results
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
    assert "## Movie [1]:" in inserted and f"## Movie [{second.numbers[0]}]:" in inserted
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
    from transformers import GenerationConfig

    from conftest import needs_packing

    from ragrpo.generation.engine import SamplingCopy, generate_ids

    needs_packing(torch.float32)
    force_hardware(BF16="0", PACK="1")
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
