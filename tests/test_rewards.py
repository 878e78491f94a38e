import math
import os
import pickle
import subprocess
import sys

import pytest

from ragrpo import RagrpoError
from ragrpo.models import answer_logprobs
from ragrpo.rewards.builtin import (
    REWARDS,
    Overlong,
    RewardError,
    answer_text,
    completion_text,
    describe,
    get_context_reliance_reward,
    get_format_reward,
    get_groundedness_reward,
    get_length_reward,
    get_repetition_reward,
    get_verbatim_span_reward,
    length,
    passages,
)
from ragrpo.rewards.registry import guarded, parse_reward, resolve_rewards, score_text


def chat(text):
    return [{"role": "assistant", "content": text}]


LENGTH_CASES = [
    ("x" * 50, 0.0),
    ("", -50.0),
    ("   ", -47.0),
    ("a" * 80, -30.0),
    ("a" * 20, -30.0),
    (chat("y" * 45), -5.0),
    (chat(""), -50.0),
    ("été " * 10, -10.0),  # 40 characters, not bytes
]

DIVERSITY_CASES = [
    ("a b c d", 100.0),
    ("a a a a", 25.0),
    ("the cat and the dog", 80.0),
    ("", 0.0),
    ("   \n\t ", 0.0),
    (chat("one two two"), 100.0 * 2 / 3),
    (chat(""), 0.0),
    ("猫 犬 猫", 100.0 * 2 / 3),
]


@pytest.mark.parametrize("completion,expected", LENGTH_CASES)
def test_length(completion, expected):
    assert REWARDS["length"](completions=[completion]) == [expected]


@pytest.mark.parametrize("completion,expected", DIVERSITY_CASES)
def test_token_diversity(completion, expected):
    assert REWARDS["token_diversity"](completions=[completion]) == [pytest.approx(expected)]


def test_completion_text_joins_messages():
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    assert completion_text(None) == ""


def test_parse_reward_weights_and_user_functions(tmp_path):
    func, weight = parse_reward("token_diversity=0.5")
    assert func is REWARDS["token_diversity"] and weight == 0.5
    assert parse_reward("os.path:basename")[0].__name__ == "basename"
    script = tmp_path / "my_reward.py"
    script.write_text("def score(completions, **kw):\n    return [1.0 for _ in completions]\n")
    func, weight = parse_reward(f"{script}:score=2")
    assert func(completions=["a", "b"]) == [1.0, 1.0] and weight == 2.0


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown reward 'nope'"),
    ("length=abc", "not a number"),
    ("no_such_module_xyz:f", "cannot import"),
    ("os.path:no_such_function", "has no function"),
    ("missing_file.py:f", "does not exist"),
])
def test_bad_reward_specs(spec, message):
    with pytest.raises(RagrpoError, match=message):
        parse_reward(spec)


def test_unknown_reward_lists_builtins():
    with pytest.raises(RagrpoError, match="length, token_diversity"):
        parse_reward("nope")


def test_guard_keeps_metric_name_and_passes_good_scores():
    [func], [weight] = resolve_rewards(["length"])
    assert func.__name__ == "length" and weight == 1.0
    assert func(prompts=["p"], completions=["x" * 50]) == [0.0]


@pytest.mark.parametrize("bad,message", [
    (lambda completions, **kw: [1.0], "returned 1 scores for 2 completions"),
    (lambda completions, **kw: [1.0, math.nan], "returned nan on sample 1"),
    (lambda completions, **kw: [math.inf, 1.0], "returned inf on sample 0"),
    (lambda completions, **kw: [1.0, "high"], "not a number"),
])
def test_guard_rejects_bad_outputs(bad, message):
    bad.__name__ = "bad_reward"
    with pytest.raises(RewardError, match=message) as info:
        guarded(bad)(prompts=["p", "q"], completions=["fine", "broken"])
    assert "bad_reward" in str(info.value)


def test_guard_names_the_sample_that_raises():
    def picky(completions, **kwargs):
        return [1.0 / len(completion_text(c)) for c in completions]

    with pytest.raises(RewardError, match=r"'picky' raised ZeroDivisionError on sample 1 \(''\)"):
        guarded(picky)(prompts=["p", "q", "r"], completions=["ok", "", "ok"], tag=["a", "b", "c"])


def test_none_scores_pass_through():
    func = guarded(lambda completions, **kw: [None for _ in completions])
    assert func(prompts=["p"], completions=["x"]) == [None]


def test_length_docstring_example():
    assert length(["x" * 50, "", chat("x" * 60)]) == [0.0, -50.0, -10.0]


# ---- the reward library: one table per reward ---------------------------------------------------

DOCS = [
    "Aldous Finch invents an arctic island called New Thule.",
    "The sponsors of the voyage lose their money.",
]

FORMAT_CASES = [
    ("<think>The twist is in passage 2.</think><answer>The hero.</answer>", 1.0),
    ("  <think>a</think>\n\n<answer>b</answer>\n", 1.0),
    ("", 0.0),
    ("   \n\t ", 0.0),
    (chat("<think>x</think><answer>y</answer>"), 1.0),
    ("<think>二加二等于四</think><answer>四</answer>", 1.0),
    ("<think>x</think> y", 0.25),  # two tags once each
    ("<think>x</think><answer> </answer>", 0.75),  # empty answer: in order, not strict
    ("Sure! <think>x</think><answer>y</answer>", 0.75),  # text around the sections
    ("<answer>y</answer><think>x</think>", 0.5),  # out of order
    ("<think>a</think><think>b</think><answer>c</answer>", 0.25),
    ("The answer is 4.", 0.0),
]

# (completion, context, expected): the context is a list of passages or one string of them
GROUNDEDNESS_CASES = [
    ("Finch invents New Thule.", DOCS, 1.0),
    ("Finch invents a tropical paradise.", DOCS, 0.5),
    ("", DOCS, 0.0),
    ("  \t\n", DOCS, 0.0),
    ("It is what it is.", DOCS, 0.0),  # stop words only
    (chat("The sponsors lose their money."), DOCS, 1.0),
    ("<think>Bananas, bananas.</think><answer>Finch invents New Thule.</answer>", DOCS, 1.0),
    ("Finch invente une île.", DOCS, 0.25),  # finch / invente, une, île
    ("Хвост кота длинный.", ["У кота длинный хвост."], 1.0),
    ("Finch lied.", "Finch invents.\n\nNobody lied.", 1.0),
    ("Finch invents New Thule [1].", DOCS, 1.0),  # a citation mark is not a claim
    ("Finch invents New Thule (Movie- 1).", DOCS, 1.0),  # nor is a passage's name
    ("Finch invents New Thule.", [], 0.0),
    ("Finch invents New Thule.", None, 0.0),
]

CITATION_CASES = [
    ("Finch invents an island [1].", 1.0),
    ("Finch invents an island [2].", 0.0),
    ("Finch invents an island [1]. The sponsors lose money [2].", 1.0),
    ("Finch invents an island [1][2].", 0.5),
    ("Finch invents an island [1, 3].", 0.0),  # 1.0 and -1.0
    ("Finch lied [0].", -1.0),
    ("Finch invents an island. [1]", 1.0),  # a citation after the full stop belongs to that sentence
    ("Finch invents an island.\nThe voyage failed [2].", 0.5),
    ("[1]", 0.0),
    ("No citations at all.", 0.0),
    ("", 0.0),
    ("   ", 0.0),
    (chat("The sponsors lose money [2]."), 1.0),
    ("Finch invente une île [1].", 0.25),
    ("芬奇[1]。", 0.0),
]

REPETITION_CASES = [
    ("the cat sat on the mat", 0.0),
    ("go go go go go go", -0.75),
    ("Go go GO go", -0.5),  # lowercased
    ("one two", 0.0),  # shorter than a 3-gram
    ("", 0.0),
    ("   ", 0.0),
    (chat("a b c a b c"), -0.25),
    ("猫 犬 鳥 猫 犬 鳥", -0.25),
]


@pytest.mark.parametrize("completion,expected", FORMAT_CASES)
def test_format(completion, expected):
    assert REWARDS["format"](completions=[completion]) == [expected]


@pytest.mark.parametrize("completion,expected", [
    ("<think>x</think><answer>y</answer>", 1.0),
    ("Sure! <think>x</think><answer>y</answer>", 0.0),
    ("<think>x</think>", 0.0),
    ("", 0.0),
])
def test_format_strict(completion, expected):
    reward = get_format_reward(partial=False)
    assert reward.__name__ == "format_strict" and reward(completions=[completion]) == [expected]


@pytest.mark.parametrize("completion,context,expected", GROUNDEDNESS_CASES)
def test_groundedness(completion, context, expected):
    assert REWARDS["groundedness"](completions=[completion], context=[context]) == [pytest.approx(expected)]


@pytest.mark.parametrize("completion,query,expected", [
    ("Which film is about Walter, a ferryman?", "Which film is about Walter, a ferryman?", 0.0),  # an echo
    ("Walter the ferryman rows to Haale [1].", "Which film is about Walter, a ferryman?", 1.0),  # rows, haale
    ("Walter the ferryman flies to Paris.", "Which film is about Walter, a ferryman?", 0.0),  # flies, paris
    ("Walter rows to Paris.", "Which film is about Walter?", 0.5),
    ("", "Which film is about Walter?", 0.0),
])
def test_groundedness_beyond_question(completion, query, expected):
    context = ["Walter, a ferryman, rows travellers across the river to Haale."]
    reward = REWARDS["groundedness_beyond_question"]
    assert reward(completions=[completion], context=[context], query=[query]) == [pytest.approx(expected)]
    assert get_groundedness_reward(ngram=2, beyond_question=True).__name__ == "groundedness_2gram_beyond_question"
    with pytest.raises(RagrpoError, match="'query' column"):
        reward(completions=[completion], context=[context])


@pytest.mark.parametrize("completion,expected", [
    ("Finch invents an arctic island.", 1.0),
    ("Aldous Finch invents a tropical island.", 0.4),  # 2 of 5 bigrams: "aldous finch", "finch invents"
    ("the of the", 0.0),  # no n-gram with a content word
    ("Finch", 0.0),  # shorter than a bigram
])
def test_groundedness_bigrams(completion, expected):
    reward = get_groundedness_reward(ngram=2)
    assert reward.__name__ == "groundedness_2gram"
    assert reward(completions=[completion], context=[DOCS]) == [pytest.approx(expected)]


@pytest.mark.parametrize("completion,expected", CITATION_CASES)
def test_citation(completion, expected):
    assert REWARDS["citation"](completions=[completion], context=[DOCS]) == [pytest.approx(expected)]


@pytest.mark.parametrize("completion,expected", REPETITION_CASES)
def test_repetition(completion, expected):
    assert REWARDS["repetition"](completions=[completion]) == [pytest.approx(expected)]


PLOT = ["Window washer Troy Haskett is dangling on a scaffold when the rope snaps [1].",
        "A ferryman named Jakob Marten keeps a ledger of every crossing."]


@pytest.mark.parametrize("completion,expected", [
    ("Troy Haskett.", 0.0),  # a name is short of the run that costs
    ("Window washer Troy Haskett is dangling on a scaffold.", -1.0),  # one sentence, copied whole
    ("Window washer Troy Haskett is dangling [1] on a scaffold.", -1.0),  # a citation mark does not break the run
    ("He is dangling on a scaffold when the rope snaps, says Troy.", -9 / 12),  # 9 of 12 words in one run
    ("Troy Haskett is dangling on a scaffold as Jakob Marten keeps a ledger of every crossing.", -15 / 16),  # a run from each
    ("the rope snaps a ferryman named Jakob", 0.0),  # a run across two passages' seam is not copied
    ("Haskett dangles; the rope of the scaffold snaps when a window washer falls.", 0.0),  # retold
    ("", 0.0),
])
def test_verbatim_span(completion, expected):
    assert REWARDS["verbatim_span"](completions=[completion], context=[PLOT]) == [pytest.approx(expected)]


def test_verbatim_span_longest_run_allowed_is_a_parameter():
    answer = ["The rope snaps while Troy Haskett is dangling."]
    assert get_verbatim_span_reward(longest=3)(completions=answer, context=[PLOT]) == [pytest.approx(-4 / 8)]
    assert get_verbatim_span_reward(longest=4)(completions=answer, context=[PLOT]) == [0.0]
    assert get_verbatim_span_reward(longest=3).__name__ == "verbatim_span_3w"
    with pytest.raises(RagrpoError, match="at least 1 word"):
        get_verbatim_span_reward(longest=0)
    with pytest.raises(RagrpoError, match="'context' column"):
        REWARDS["verbatim_span"](completions=answer)


@pytest.mark.parametrize("completion,expected", [
    ("Troy Haskett [1].", 1.0),  # right, in a few words
    ("Window washer Troy Haskett is dangling on a scaffold.", 0.5),  # right, every word a copied run
    ("He is dangling on a scaffold when the rope snaps, says Troy Haskett.", 1 - 9 / 13 / 2),  # right, 9 of 13 copied
    ("Window washer Jakob Marten is dangling on a scaffold.", 0.0),  # wrong: copying costs nothing more
    ("Nobody.", 0.0),
])
def test_answer_match_own_words_charges_copying_only_to_a_right_answer(completion, expected):
    scores = REWARDS["answer_match_own_words"](completions=[completion], targets=[["Troy Haskett"]], context=[PLOT])
    assert scores == [pytest.approx(expected)]


# ---- factories, names, conventions ----------------------------------------------------------------


class WhitespaceTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": text.split()}


def test_length_factory_in_characters_and_tokens():
    assert get_length_reward().__name__ == "length"
    assert get_length_reward()(completions=["x" * 50, ""]) == length(["x" * 50, ""])
    by_tokens = get_length_reward(target=3, unit="tokens", tokenizer=WhitespaceTokenizer())
    assert by_tokens.__name__ == "length_3_tokens"
    assert by_tokens(completions=["a b c", chat("a b c d e"), ""]) == [0.0, -2.0, -3.0]
    from_trl = get_length_reward(target=3, unit="tokens")
    assert from_trl(completions=["whatever"], completion_ids=[[1, 2, 3, 4, 5]]) == [-2.0]
    with pytest.raises(RagrpoError, match="tokenizer"):
        from_trl(completions=["a"])
    with pytest.raises(RagrpoError, match="'chars' or 'tokens'"):
        get_length_reward(unit="words")


def test_overlong_penalises_the_last_quarter_of_the_run_budget():
    penalty = parse_reward("overlong", budget=64)[0]
    assert penalty.cache == 16
    ids = [[7] * n for n in (1, 48, 49, 56, 64)]
    assert penalty(completions=["x"] * 5, completion_ids=ids) == [0.0, 0.0, pytest.approx(-1 / 16), -0.5, -1.0]
    counted = parse_reward("overlong", budget=8, tokenizer=WhitespaceTokenizer())[0]
    assert counted(completions=["a b c d e f", chat("a b c d e f g h"), ""]) == [0.0, -1.0, 0.0]
    with pytest.raises(RagrpoError, match="token budget"):
        REWARDS["overlong"](completions=["a"], completion_ids=[[1]])
    with pytest.raises(RagrpoError, match="completion_ids"):
        parse_reward("overlong", budget=8)[0](completions=["a"])
    with pytest.raises(RagrpoError, match="below the budget"):
        Overlong(cache=8).for_run(budget=8)


def test_the_trainer_binds_overlong_to_the_run_budget(tiny_causal_lm, tmp_path):
    from datasets import Dataset

    from ragrpo.config import build_run_config
    from ragrpo.tuning.train import make_trainer

    model, tokenizer = tiny_causal_lm
    cfg = build_run_config(engine="trl", rewards=["overlong=0.5"], num_generations=2, max_completion_length=12,
                           output=str(tmp_path), grpo={"per_device_train_batch_size": 2, "use_cpu": True})
    trainer = make_trainer(cfg, model, tokenizer, Dataset.from_dict({"prompt": ["hi"] * 2}), tmp_path)
    assert trainer.reward_weights.tolist() == [0.5]
    # 12 tokens is the whole budget (-1); 10 is one token into its last quarter (3 tokens); 9 ends before it
    ids = [[1] * 12, [1] * 10, [1] * 9]
    scores = trainer.reward_funcs[0](prompts=["hi"] * 3, completions=["x"] * 3, completion_ids=ids)
    assert scores == [-1.0, pytest.approx(-1 / 3), 0.0]


def test_factory_names_say_their_parameters():
    assert get_repetition_reward().__name__ == "repetition"
    assert get_repetition_reward(ngram=4).__name__ == "repetition_4gram"
    assert get_groundedness_reward().__name__ == "groundedness"
    assert get_format_reward().__name__ == "format"
    for factory in (get_repetition_reward, get_groundedness_reward):
        with pytest.raises(RagrpoError, match="at least 1"):
            factory(ngram=0)


def test_registry_names_are_metric_keys_with_one_line_descriptions():
    assert list(REWARDS) == ["length", "token_diversity", "format", "groundedness", "groundedness_beyond_question",
                             "citation", "source_citation", "source_citation_grounded", "source_citation_answered",
                             "source_citation_only", "source_citation_exact", "source_citation_exact_1w", "source_citation_debiased_1w",
                             "drawn_from_source", "drawn_from_first", "drawn_position_charge", "single_citation", "single_citation_debiased", "answer_match",
                             "answer_match_ended", "answer_match_own_words",
                             "context_reliance", "relevance", "repetition", "verbatim_span", "overlong",
                             "search_found_source", "search_format", "search_cost"]
    funcs, _ = resolve_rewards(list(REWARDS))
    assert [f.__name__ for f in funcs] == list(REWARDS)
    for func in REWARDS.values():
        assert describe(func) and "\n" not in describe(func)


@pytest.mark.parametrize("completion, targets, expected", [
    ("Inspector Hale [2].", ["Hale", "Inspector Hale"], 1.0),
    ("It was the inspector.", ["Hale"], 0.0),
    ("Hales of the river.", ["Hale"], 0.0),  # whole words only
    ("<think>Hale?</think><answer>Sorrell</answer>", ["Hale"], 0.0),  # the answer section is what counts
    ("Released in 1923.", ["1923"], 1.0),
    ("The Ferryman's Ledger!", ["The Ferryman's Ledger"], 1.0),  # SQuAD normalisation on both sides
    ("Anything at all.", [], 0.0),  # a question without a target pays nothing
])
def test_answer_match(completion, targets, expected):
    from ragrpo.rewards.builtin import AnswerMatch

    assert REWARDS["answer_match"]([completion], targets=[targets]) == [expected]
    assert REWARDS["answer_match"].__name__ == "answer_match"
    assert pickle.loads(pickle.dumps(AnswerMatch()))([completion], targets=[targets]) == [expected]


def test_answer_match_pays_nothing_for_naming_every_passage():
    answers = ["1. Dingo Creek Tapes 2. The Ferryman's Ledger", "The Ferryman's Ledger (1923) [2]"]
    targets, distractors = [["The Ferryman's Ledger"]] * 2, [["Dingo Creek Tapes", "1985"]] * 2
    assert REWARDS["answer_match"](answers, targets=targets, distractors=distractors) == [0.0, 1.0]
    assert REWARDS["answer_match"](answers, targets=targets) == [1.0, 1.0]  # rows made before the column


def test_answer_match_needs_its_column():
    with pytest.raises(RagrpoError, match="targets"):
        guarded(REWARDS["answer_match"])(prompts=["q"], completions=["x"])


def test_registry_loads_no_model_until_a_model_reward_is_called():
    code = ("import sys; from ragrpo.rewards.registry import parse_reward; "
            "parse_reward('relevance'); parse_reward('context_reliance'); "
            "print(any(m in sys.modules for m in ('torch', 'sentence_transformers')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_a_user_file_can_configure_a_factory(tmp_path):
    script = tmp_path / "my_rewards.py"
    script.write_text("from ragrpo.rewards import get_repetition_reward\n"
                      "score = get_repetition_reward(ngram=2)\n")
    [func], _ = resolve_rewards([f"{script}:score"])
    assert func.__name__ == "repetition_2gram"
    assert func(prompts=["p"], completions=["a b a b"]) == [pytest.approx(2 / 3 - 1)]


def test_the_readme_custom_reward_example(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    code = readme.split("```python\n# my_rewards.py\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "my_rewards.py"
    script.write_text(code)
    funcs, weights = resolve_rewards([f"{script}:no_hedging=0.5", f"{script}:repetition_4"])
    assert [f.__name__ for f in funcs] == ["no_hedging", "repetition_4gram"] and weights == [0.5, 1.0]
    assert funcs[0](prompts=["p", "q"], completions=["Maybe Finch.", chat("Finch.")]) == [0.0, 1.0]


@pytest.mark.parametrize("completion,answer", [
    ("<think>long reasoning</think><answer> Paris </answer>", "Paris"),
    ("<think>reasoning</think> Paris", "Paris"),
    ("<think>never closed", ""),
    (chat("Paris"), "Paris"),
])
def test_answer_text(completion, answer):
    assert answer_text(completion) == answer


def test_passages_from_a_list_or_a_string():
    assert passages(["a", "b"]) == ["a", "b"]
    text = "## Movie 1: A\nfirst\n\n## Movie 2: B\nsecond\n"
    assert passages(text) == ["## Movie 1: A\nfirst", "## Movie 2: B\nsecond"]
    assert passages(None) == []


def test_a_missing_column_stops_with_one_line_naming_reward_and_column():
    for name in ("groundedness", "citation", "context_reliance"):
        [func], _ = resolve_rewards([name])
        with pytest.raises(RewardError, match=rf"^reward '{name}': needs a 'context' column") as info:
            func(prompts=["p"], completions=["an answer"])
        assert "\n" not in str(info.value)
    [relevance], _ = resolve_rewards(["relevance"])
    with pytest.raises(RewardError, match="needs a 'query' column"):
        relevance(prompts=None, completions=["an answer"])


def test_score_text():
    results = score_text(["length", "groundedness", "citation"], "Finch invents New Thule [1].", context=DOCS)
    assert results == [("length", -22.0), ("groundedness", 1.0), ("citation", 1.0)]


def test_docstring_examples():
    import doctest

    import ragrpo.rewards.builtin
    import ragrpo.rewards.citations
    import ragrpo.rewards.registry

    modules = (ragrpo.rewards.builtin, ragrpo.rewards.citations, ragrpo.rewards.registry)
    results = [doctest.testmod(module) for module in modules]
    assert all(result.failed == 0 for result in results)
    assert results[0].attempted >= 10 and results[1].attempted >= 6 and results[2].attempted >= 1


def test_every_builtin_reward_pickles_with_its_name_and_scores():
    """Multi-process and asynchronous trainers send rewards to other processes: each built-in, bare and
    guarded, comes back from a pickle with the same name and the same scores."""
    columns = {"context": [DOCS] * 2, "query": ["Who invents New Thule?"] * 2, "context_ids": [["a", "b"]] * 2,
               "source_id": ["a"] * 2, "targets": [["Finch"]] * 2, "distractors": [["Gulls"]] * 2,
               "searches": [[{"query": "Finch", "found": ["a"], "error": None}], []],  # the agentic rollout's
               "completion_ids": [[5] * 15, [5] * 4]}  # TRL's
    completions = ["Finch invents New Thule [1].", "<think>hm</think><answer>Gulls [2]</answer>"]
    for name in REWARDS:
        reward = parse_reward(name, budget=16)[0]  # as a run has it
        for func in (reward, guarded(reward)):
            copy = pickle.loads(pickle.dumps(func))
            assert copy.__name__ == name
            if name not in ("context_reliance", "relevance"):  # these load a model; their pickles are below
                assert copy(prompts=["q"] * 2, completions=completions, **columns) == func(
                    prompts=["q"] * 2, completions=completions, **columns)


def test_a_model_reward_pickles_without_its_model():
    from ragrpo.rewards.model_based import ContextReliance, Relevance

    reward = Relevance("some/embedder")
    reward._loaded = object()  # what a first call would have loaded
    copy = pickle.loads(pickle.dumps(reward))
    assert copy._loaded is None and copy.embedding_model == "some/embedder"
    with pytest.raises(RagrpoError, match="cannot be pickled"):
        pickle.dumps(ContextReliance(model=(object(), object())))


@pytest.mark.parametrize("settings, variant", [
    ({}, "source_citation"),
    ({"grounded": True}, "source_citation_grounded"),
    ({"min_words": 5}, "source_citation_answered"),
    ({"min_words": 5, "others": -1.0}, "source_citation_only"),
    ({"min_words": 5, "exclusive": True}, "source_citation_exact"),
    ({"min_words": 1, "exclusive": True}, "source_citation_exact_1w"),
])
def test_each_source_citation_setting_is_one_class(settings, variant):
    from ragrpo.rewards.builtin import get_source_citation_reward

    reward = get_source_citation_reward(**settings)
    assert reward.__name__ == variant and type(reward) is type(REWARDS[variant])


@pytest.mark.parametrize("settings", [{"grounded": True, "min_words": 5}, {"others": -1.0}, {"exclusive": True},
                                      {"min_words": 5, "exclusive": True, "others": -1.0},
                                      {"min_words": 5, "others": 0.5}])
def test_source_citation_settings_no_variant_has_are_refused(settings):
    from ragrpo.rewards.builtin import get_source_citation_reward

    with pytest.raises(RagrpoError, match="source citation"):
        get_source_citation_reward(**settings)


# ---- rewards that run a model ---------------------------------------------------------------------


def test_answer_logprobs_batched_equals_one_row_at_a_time(tiny_causal_lm):
    import torch
    from transformers import LlamaForCausalLM

    model, tokenizer = tiny_causal_lm
    model.config.initializer_range = 1.0  # large random weights, so that a shifted position shows
    model = LlamaForCausalLM(model.config).eval()
    prompts = ["short", "a much longer prompt, so that the rows are padded differently", "mid"]
    answers = ["one two three four five six", "x", ""]

    def one_row(prompt, answer):
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([list(prompt_ids) + answer_ids])).logits[0]  # (T, vocab), no padding
        logprobs = logits.log_softmax(-1)
        start = len(prompt_ids) - 1  # the position that predicts the first answer token
        return sum(logprobs[start + k, t].item() for k, t in enumerate(answer_ids)) / len(answer_ids)

    got = answer_logprobs(model, tokenizer, prompts, answers, batch_size=2)
    assert got == [pytest.approx(one_row(p, a), abs=1e-4) for p, a in zip(prompts[:2], answers[:2])] + [0.0]


def test_context_reliance_with_a_given_model(tiny_causal_lm):
    reward = get_context_reliance_reward(model=tiny_causal_lm)
    assert reward.__name__ == "context_reliance"
    scores = reward(completions=["", "   ", chat("Finch invents it."), "Finch invente une île."],
                    context=[DOCS] * 4, query=["Who invents the island?"] * 4)
    assert scores[:2] == [0.0, 0.0] and all(math.isfinite(s) and s != 0.0 for s in scores[2:])


CONTEXT_RELIANCE_CASES = [
    # (completion, low, high): copying a fact from the context makes it much likelier with the context
    ("Aldous Finch invents the island of New Thule.", 1.0, math.inf),
    (chat("Aldous Finch invents New Thule."), 1.0, math.inf),
    ("<think>Passage 1 says so.</think><answer>Aldous Finch.</answer>", 1.0, math.inf),
    ("Aldous Finch a inventé l'île de New Thule.", 0.5, math.inf),
    ("I like turtles very much.", -math.inf, 0.5),
    ("", 0.0, 0.0),
    ("  \n ", 0.0, 0.0),
]


@pytest.mark.integration
def test_context_reliance_on_the_base_model(base_model):
    reward = get_context_reliance_reward(model=base_model)
    completions = [c for c, _, _ in CONTEXT_RELIANCE_CASES]
    scores = reward(completions=completions, context=[DOCS] * len(completions),
                    query=["Who invents the island?"] * len(completions))
    for (completion, low, high), score in zip(CONTEXT_RELIANCE_CASES, scores):
        assert low <= score <= high, (completion, score)


RELEVANCE_CASES = [
    ("The detective turns out to be the murderer.", 0.6, 1.0),
    (chat("The detective turns out to be the murderer."), 0.6, 1.0),
    ("Le détective est le meurtrier.", 0.2, 1.0),
    ("Bananas are yellow.", 0.0, 0.3),
    ("", 0.0, 0.0),
    ("   ", 0.0, 0.0),
]


@pytest.mark.integration
def test_relevance_with_the_packaged_embedder():
    reward = REWARDS["relevance"]
    completions = [c for c, _, _ in RELEVANCE_CASES]
    scores = reward(completions=completions, query=["a detective who is the killer"] * len(completions))
    for (completion, low, high), score in zip(RELEVANCE_CASES, scores):
        assert low <= score <= high, (completion, score)
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "a detective who is the killer"}]
    # without a query column the query is the prompt's last user message
    from_prompt = reward(prompts=[conversation], completions=completions[:1])
    assert from_prompt == [pytest.approx(scores[0])]


# ---- the command line ---------------------------------------------------------------------------


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "ragrpo.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_cli_rewards_list():
    result = run_cli("rewards", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(REWARDS)


def test_cli_rewards_score(tmp_path):
    context = tmp_path / "docs.txt"
    context.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    completion = "Finch invents New Thule [1]. The voyage failed [3]."
    rewards = ["--reward", "groundedness", "--reward", "citation", "--reward", "length"]
    result = run_cli("rewards", "score", *rewards, "--completion", completion, "--context", context)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["groundedness: 0.8333", "citation: 0.0", "length: -1.0"]


@pytest.mark.parametrize("args,fragment", [
    (["--reward", "nope", "--completion", "x"], "unknown reward 'nope'"),
    (["--reward", "groundedness", "--completion", "x"], "reward 'groundedness': needs a 'context' column"),
    (["--reward", "length", "--completion", "x", "--context", "no_such_file.txt"], "does not exist"),
])
def test_cli_rewards_score_errors(args, fragment):
    result = run_cli("rewards", "score", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr


def test_rewards_subcommands_have_help_with_an_example():
    from click.testing import CliRunner

    from ragrpo.cli import rewards_group

    for name, command in rewards_group.commands.items():
        assert CliRunner().invoke(rewards_group, [name, "--help"]).exit_code == 0, name
        assert "Example:" in (command.help or ""), name


def _cite_batches(reward, policy, steps=60, k=3, seed=0):
    """Mean score of `policy(source_position) -> cited position` over `steps` batches of 8, sources even."""
    import random

    rng = random.Random(seed)
    ids = [f"d{i}" for i in range(k)]
    total = []
    for _ in range(steps):
        sources = [rng.randrange(k) for _ in range(8)]
        answers = [f"Walter Crouch rows [{policy(s, rng) + 1}]." for s in sources]
        total += reward(answers, context_ids=[ids] * 8, source_id=[ids[s] for s in sources], query=["Who?"] * 8)
    warm = total[len(total) // 2:]  # the second half, once the running rates have settled
    return sum(warm) / len(warm)


def test_debiased_source_citation_pays_little_for_a_position_habit_more_for_chance_and_most_for_reading():
    from ragrpo.rewards import SourceCitationDebiased

    def mean(policy):
        return _cite_batches(SourceCitationDebiased(min_words=1), policy)

    habit, blind, reader = mean(lambda s, rng: 2), mean(lambda s, rng: rng.randrange(3)), mean(lambda s, rng: s)
    assert abs(habit - 1 / 9) < 0.07  # right a third of the time, earning 1 + 1/3 - 1
    assert abs(blind - 1 / 3) < 0.1  # even rates of 1/3: a right guess earns 1
    assert reader > 0.9 > blind > habit > 0.0  # and silence scores 0, so citing still pays
    # the plain exact score cannot tell a habit from citing at random: both earn about a third
    assert abs(_cite_batches(REWARDS["source_citation_exact_1w"], lambda s, rng: 2) - 1 / 3) < 0.15


SINGLE_CITATION_CASES = [
    ("Walter Crouch rows the ferry [2].", 1.0),
    ("Walter Crouch rows the ferry [3].", 1.0),  # any shown passage: the number is the other reward's to judge
    ("As Movie 2 shows, Walter rows.", 0.0),  # a name is how a header starts: no citation (r16, r17)
    ("Walter rows [2] and [2] again.", 1.0),  # one passage, named twice
    ("Walter rows [1][2].", 0.0),
    ("Walter rows [1, 3].", 0.0),
    ("Walter rows [4].", 0.0),  # no passage 4 among three
    ("Walter rows [0].", 0.0),
    ("[2]", 0.0),  # a bare number answers nothing
    ("Who rows the ferry? [2]", 0.0),  # only the question's words
    ("Walter rows the ferry.", 0.0),
    ("", 0.0),
    ("<think>[1] or [3]?</think><answer>Walter [3].</answer>", 1.0),  # the answer section is what counts
]


@pytest.mark.parametrize("completion,expected", SINGLE_CITATION_CASES)
def test_single_citation(completion, expected):
    (reward,), _ = resolve_rewards(["single_citation"])
    scores = reward(completions=[completion], context_ids=[["a", "b", "c"]], query=["Who rows the ferry?"])
    assert scores == [expected]


def test_single_citation_pays_every_position_alike_and_names_its_missing_column():
    from ragrpo.rewards import SingleCitation

    answers = [f"Walter rows [{n}]." for n in (1, 2, 3)]
    assert SingleCitation()(answers, context_ids=[["a", "b", "c"]] * 3, query=["Who?"] * 3) == [1.0, 1.0, 1.0]
    with pytest.raises(RagrpoError, match="context_ids"):
        SingleCitation()(answers, query=["Who?"] * 3)


def test_debiased_single_citation_pays_a_position_habit_about_a_third_and_spread_citing_in_full():
    from ragrpo.rewards import SingleCitation, SingleCitationDebiased

    habit = _cite_batches(SingleCitationDebiased(), lambda s, rng: 0)
    spread = _cite_batches(SingleCitationDebiased(), lambda s, rng: rng.randrange(3))
    assert abs(habit - 1 / 3) < 0.07  # cited at rate 1: earns 1 + 1/3 - 1
    assert abs(spread - 1.0) < 0.1  # even rates of 1/3
    # the plain format term pays the habit in full: what r16 learned
    assert _cite_batches(SingleCitation(), lambda s, rng: 0) == 1.0
    # and its format rule holds: two passages, or none that exists, score 0 whatever the rates
    reward = SingleCitationDebiased()
    assert reward(["Crouch [1][2].", "Crouch [5].", "[2]"], context_ids=[["a", "b", "c"]] * 3, query=["Who?"] * 3) == [0.0] * 3


def test_debiased_single_citation_starts_each_run_fresh():
    shared = REWARDS["single_citation_debiased"]
    before = dict(shared.positions.rates)
    (first,), _ = resolve_rewards(["single_citation_debiased"])
    (second,), _ = resolve_rewards(["single_citation_debiased"])
    first(completions=["Crouch [3]."] * 2, context_ids=[["a", "b", "c"]] * 2, query=["Who?"] * 2)
    assert first.func.positions.rates and not second.func.positions.rates and shared.positions.rates == before


def test_debiased_source_citation_starts_each_run_fresh_and_keeps_its_rates_through_pickle():
    import pickle

    shared = REWARDS["source_citation_debiased_1w"]
    before = dict(shared.rates)
    (first,), _ = resolve_rewards(["source_citation_debiased_1w"])
    (second,), _ = resolve_rewards(["source_citation_debiased_1w"])
    ids = [["a", "b", "c"]] * 2
    first(completions=["Crouch [3].", "Crouch [3]."], context_ids=ids, source_id=["c"] * 2, query=["Who?"] * 2)
    assert first.func.rates and not second.func.rates and shared.rates == before
    copy = pickle.loads(pickle.dumps(first))
    assert copy.func.rates == first.func.rates
    after = copy(completions=["Crouch [3]."], context_ids=ids[:1], source_id=["c"], query=["Who?"])
    assert after == [1.0 + 1 / 3 - first.func.rates[3]]
    with pytest.raises(RagrpoError, match="decay"):
        type(shared)(decay=1.0)


FERRY = ["## Movie 1: The Ferryman's Ledger (1923)\nWalter Crouch rows the night ferry and keeps its ledger.",
         "## Movie 2: Tide Clock (1931)\nInspector Hale finds watches hidden in a second ledger.",
         "## Movie 3: Salt Tower (1940)\nA widow restores a lighthouse tower."]
DRAWN_FROM_SOURCE_CASES = [  # the source is passage 2 ("b")
    ("Inspector Hale finds the hidden watches [1].", 1.0),  # its words are passage 2's, whatever it cites
    ("Walter Crouch rows the night ferry [2].", 0.0),  # cites the source, reads passage 1
    ("Tide Clock (1931).", 1.0),  # the header is part of the passage
    ("A ledger.", 0.0),  # passages 1 and 2 alike: a tie names none
    ("Who keeps the ledger? [2]", 0.0),  # only the question's words and a number
    ("Bananas and pineapples.", 0.0),  # in no passage
    ("<think>Walter Crouch rows</think><answer>Hale found watches.</answer>", 1.0),  # the answer section counts
]


@pytest.mark.parametrize("completion,expected", DRAWN_FROM_SOURCE_CASES)
def test_drawn_from_source(completion, expected):
    (reward,), _ = resolve_rewards(["drawn_from_source"])
    scores = reward(completions=[completion], context_ids=[["a", "b", "c"]], source_id=["b"], context=[FERRY],
                    query=["Who keeps the ledger?"])
    assert scores == [expected]


def test_drawn_from_source_pays_nothing_when_the_source_was_not_retrieved_and_names_missing_columns():
    (reward,), _ = resolve_rewards(["drawn_from_source"])
    answer = ["Inspector Hale finds the hidden watches."]
    assert reward(completions=answer, context_ids=[["a", "b", "c"]], source_id=["z"], context=[FERRY],
                  query=["Who?"]) == [0.0]
    with pytest.raises(RewardError, match="source_id"):
        reward(completions=answer, context_ids=[["a", "b", "c"]], context=[FERRY], query=["Who?"])
    with pytest.raises(RewardError, match="'context' column"):
        reward(completions=answer, context_ids=[["a", "b", "c"]], source_id=["b"], query=["Who?"])


DRAWN_FROM_FIRST_CASES = [  # the gauge reads position 1 whatever the source
    ("1: Walter Crouch rows the night ferry and keeps its ledger.", 1.0),  # retells passage 1, "1:" and all
    ("The Ferryman's Ledger (1923) [2].", 1.0),  # passage 1's header, whatever it cites
    ("Inspector Hale finds the hidden watches [1].", 0.0),  # cites [1], reads passage 2
    ("A ledger.", 0.0),  # passages 1 and 2 alike: a tie names none
    ("Bananas.", 0.0),  # in no passage
]


@pytest.mark.parametrize("completion,expected", DRAWN_FROM_FIRST_CASES)
def test_drawn_from_first(completion, expected):
    (reward,), _ = resolve_rewards(["drawn_from_first"])
    assert reward(completions=[completion], context=[FERRY], query=["Who keeps the ledger?"]) == [expected]


def test_drawn_from_first_follows_the_passage_shown_first_not_a_document():
    (reward,), _ = resolve_rewards(["drawn_from_first"])
    answer = ["Walter Crouch rows the night ferry."]
    assert reward(completions=answer * 2, context=[FERRY, FERRY[::-1]], query=["Who?"] * 2) == [1.0, 0.0]
    with pytest.raises(RewardError, match="'context' column"):
        reward(completions=answer, query=["Who?"])


def _draw_batches(charge, policy, steps=150, seed=0):
    """Charges per batch of `policy(source_position) -> position retold`: one question's group of 8 a batch,
    as in training, its passages shuffled so that the source's position is even over 1..3."""
    import random

    rng = random.Random(seed)
    bodies = [p.split("\n", 1)[1] for p in FERRY]
    charges = []
    for _ in range(steps):
        order = rng.sample(range(3), 3)
        shown = [FERRY[i] for i in order]
        source = rng.randrange(3)  # the source's position in this batch
        answers = [bodies[order[policy(source, rng)]]] * 8
        charges.append(charge(answers, context=[shown] * 8, query=["What happens?"] * 8))
    return charges


def test_drawn_position_charge_charges_a_habit_and_leaves_a_reader_alone():
    from ragrpo.rewards import DrawnPositionCharge

    habit = _draw_batches(DrawnPositionCharge(), lambda source, rng: 0)
    reader = _draw_batches(DrawnPositionCharge(), lambda source, rng: source)
    assert habit[0] == [0.0] * 8  # rates start at 1/k, below the margin
    late = [score for batch in habit[75:] for score in batch]
    assert max(late) < -0.3  # retelling passage 1 whatever was asked: its rate nears 1
    # a reader's groups swing between all-from-passage-1 and none, and its running rate stays under 1/3 + 0.15
    assert sum(score < 0 for batch in reader for score in batch) <= 8 * 3
    blind = _draw_batches(DrawnPositionCharge(), lambda source, rng: rng.randrange(3))
    assert all(score == 0.0 for batch in blind for score in batch)


def test_drawn_position_charge_ranks_a_group_whose_answers_are_all_wrong():
    from ragrpo.rewards import DrawnPositionCharge

    charge = DrawnPositionCharge()
    _draw_batches(charge, lambda source, rng: 0, steps=60)  # the habit has set in
    # one group, whatever its source: retold passage 1, passage 2, passage 3, and a made-up answer
    answers = ["Walter Crouch rows the night ferry.", "Inspector Hale finds watches.", "A widow restores a tower.",
               "Bananas."]
    scores = charge(answers, context=[FERRY] * 4, query=["What happens?"] * 4)
    assert scores[0] < -0.3 and scores[1:] == [0.0, 0.0, 0.0]


def test_drawn_position_charge_starts_each_run_fresh_and_checks_its_settings():
    from ragrpo.rewards import DrawnPositionCharge

    (first,), _ = resolve_rewards(["drawn_position_charge"])
    (second,), _ = resolve_rewards(["drawn_position_charge"])
    _draw_batches(first.func, lambda source, rng: 0, steps=60)
    assert first.func.positions.rates[1] > 0.8 and not second.func.positions.rates
    assert not REWARDS["drawn_position_charge"].positions.rates
    with pytest.raises(RagrpoError, match="margin"):
        DrawnPositionCharge(margin=1.0)
    with pytest.raises(RagrpoError, match="decay"):
        DrawnPositionCharge(decay=1.0)
    with pytest.raises(RewardError, match="'context' column"):
        second(completions=["Walter rows."], query=["Who?"])
