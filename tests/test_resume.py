"""Checkpoints and --resume: a run killed with SIGKILL resumes and ends with all its optimizer steps."""

import json
import os
import subprocess
import sys

from conftest import kill_at_checkpoint

RUN_TOML = """
max_samples = 16
[grpo]
max_steps = 12
save_steps = 2
num_generations = 2
per_device_train_batch_size = 2
max_completion_length = 8
logging_steps = 1
"""


def _train(*args):
    return [sys.executable, "-m", "ragrpo.cli", "train", *map(str, args)]


def test_killed_run_resumes_to_the_same_number_of_steps(tmp_path, tiny_causal_lm):
    model, tokenizer = tiny_causal_lm
    model.save_pretrained(tmp_path / "tiny-model")
    tokenizer.save_pretrained(tmp_path / "tiny-model")
    (tmp_path / "run.toml").write_text(RUN_TOML)
    output = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    kill_at_checkpoint(_train("--model", tmp_path / "tiny-model", "--config", tmp_path / "run.toml", "--output", output),
                       output / "checkpoints" / "checkpoint-2", env)

    result = subprocess.run(_train("--output", output, "--resume"), env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 12 steps" in result.stdout
    state = json.loads((output / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == list(range(1, 13))  # each step logged once
    assert (output / "merged" / "config.json").exists()


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    result = subprocess.run(_train("--output", tmp_path / "nothing", "--resume"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "no config.json" in result.stderr
