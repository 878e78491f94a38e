"""Restarting a stalled run (`ragrpo.tuning.restart`): the rule, the stop, the second attempt on another seed, and
what the run folder keeps of the stopped one."""

import json
import subprocess
import sys

import pytest
from conftest import TINY_RUN

from ragrpo import RagrpoError
from ragrpo.config import build_run_config
from ragrpo.tuning.restart import SEED_STEP, RestartRule
from ragrpo.tuning.train import train

REWARDS = ["length", "token_diversity"]


def test_a_rule_names_a_reward_of_the_run_a_bound_and_a_step():
    rule = RestartRule.parse("answer_match<0.22@100", ["answer_match=2", "source_citation_debiased_1w"])
    assert (rule.reward, rule.below, rule.step, rule.window) == ("answer_match", 0.22, 100, (51, 100))
    assert RestartRule.parse(" length < -1e3 @ 7 ", REWARDS).below == -1000.0
    assert RestartRule.parse("shaky<1@4", ["my_rewards.py:shaky=0.5"]).reward == "shaky"
    assert RestartRule.parse("terse<1@4", ["my_pkg.rewards.terse"]).reward == "terse"
    for spec, says in [("answer_match>0.2@100", "write REWARD<VALUE@STEP"), ("length<0.2", "write REWARD<VALUE@STEP"),
                       ("answer_match<0.2@100", "not one of this run's rewards (length, token_diversity)"),
                       ("length<0.2@1", "the step must be at least 2")]:
        with pytest.raises(RagrpoError, match=r"--restart-if .*" + says.replace("(", r"\(").replace(")", r"\)")):
            RestartRule.parse(spec, REWARDS)


def _config(tmp_path, name, **extra):
    run = {**TINY_RUN, "max_steps": 4, "rewards": REWARDS, "grpo": {**TINY_RUN["grpo"]}, **extra}
    return build_run_config(output=str(tmp_path / name), seed=7, **run)


def _logged(metrics_text: str, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics_text.splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def test_a_run_below_its_bound_stops_at_the_step_and_trains_again_on_another_seed(tmp_path, capsys):
    # Any completion's length reward is at most 0, so "below 1" stalls every attempt; a rule given without a count
    # of restarts allows one.
    result = train(_config(tmp_path, "stalls", restart_if="length<1@2"))
    assert result.steps == 4  # the last attempt is never stopped
    assert "length averaged" in capsys.readouterr().err
    record = json.loads((result.output / "restarts.json").read_text())
    [stopped] = record["stopped"]
    assert stopped["seed"] == 7 and stopped["steps"] == [2, 2] and stopped["stalled"] is True
    kept = (result.output / "stalled" / "seed-7.metrics.jsonl").read_text()
    assert max(_logged(kept, "rewards/length/mean")) == 2  # the stopped attempt ended at the rule's step
    assert stopped["mean"] == pytest.approx(_logged(kept, "rewards/length/mean")[2])
    last = record["last"]
    assert last["seed"] == 7 + SEED_STEP and last["stalled"] is True
    assert json.loads((result.output / "config.json").read_text())["run"]["seed"] == 7 + SEED_STEP
    final = _logged((result.output / "metrics.jsonl").read_text(), "rewards/length/mean")
    assert sorted(final) == [1, 2, 3, 4]  # the kept run's metrics start from its own step 1
    assert last["mean"] == pytest.approx(final[2])
    assert (result.merged / "config.json").exists()


def test_a_run_above_its_bound_and_a_run_with_no_restarts_left_go_to_the_end(tmp_path):
    fine = train(_config(tmp_path, "fine", restart_if="length<-1e9@2"))
    record = json.loads((fine.output / "restarts.json").read_text())
    assert fine.steps == 4 and record["stopped"] == [] and record["last"]["stalled"] is False
    assert not (fine.output / "stalled").exists()
    observed = train(_config(tmp_path, "observed", restart_if="length<1@2", restarts=0))
    record = json.loads((observed.output / "restarts.json").read_text())
    assert observed.steps == 4 and record["stopped"] == [] and record["last"]["stalled"] is True
    assert json.loads((observed.output / "config.json").read_text())["run"]["seed"] == 7


def test_a_bad_rule_is_one_line_and_exit_2_before_anything_loads(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ragrpo.cli", "train", "--restart-if", "answer_match<0.2@100", "--max-steps", "1",
         "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        ("Error: --restart-if 'answer_match<0.2@100': 'answer_match' is not one of this run's rewards "
        "(length, token_diversity)")]
    assert not (tmp_path / "run").exists()
