import math

import pytest

from ragrpo import RagrpoError
from ragrpo.rewards import REWARDS, RewardError, completion_text, guarded, length, parse_reward, resolve_rewards


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
