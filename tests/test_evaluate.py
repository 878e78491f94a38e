"""`ragrpo eval` (base vs tuned on held-out prompts) and `ragrpo plot` (training curves)."""

import json
import os
import subprocess
import sys

import pytest

from ragrpo import RagrpoError
from ragrpo.config import build_run_config
from ragrpo.evaluation.evaluate import plot_run


def ragrpo(*args):
    return subprocess.run([sys.executable, "-m", "ragrpo.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_plot_writes_a_png_of_the_logged_curves(tmp_path):
    lines = [{"step": s, "reward": -50 + 5 * s, "rewards/length/mean": -60 + 5 * s, "rewards/token_diversity/mean": 90,
              "kl": 0.01 * s, "completions/mean_length": 40 - s, "step_time": 20.0} for s in range(1, 6)]
    lines.append({"step": 5, "train_runtime": 100.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    png = plot_run(tmp_path)
    assert png == tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_of_a_folder_without_metrics_is_a_user_error(tmp_path):
    with pytest.raises(RagrpoError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    result = ragrpo("plot", tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("Error: ")


def test_held_out_split_is_stable_and_disjoint(base_model_dir):
    from transformers import AutoTokenizer

    from ragrpo.tuning.train import split_prompts

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    frame, train, held = split_prompts(build_run_config(), tokenizer)
    _, train_again, held_again = split_prompts(build_run_config(seed=7), tokenizer)
    assert held == held_again and train == train_again  # the seed shuffles training, not the split
    assert not {json.dumps(p) for p in held} & {json.dumps(p) for p in train}
    assert 0.04 < len(held) / (len(held) + len(train)) < 0.2
    assert len(frame) == len(train)


@pytest.mark.integration
def test_eval_compares_a_run_with_its_base(tiny_run):
    result = ragrpo("eval", tiny_run.output, "--max-prompts", "2", "--samples", "1", "--max-new-tokens", "8",
                    "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    assert figures["prompts"] == 2 and figures["samples"] == 1
    for side in ("base", "tuned"):
        assert set(figures[side]["rewards"]) == {"length", "token_diversity"}
        assert figures[side]["rewards"]["length"] <= 0 and figures[side]["completion_chars"] >= 0
    table = ragrpo("eval", tiny_run.output, "--max-prompts", "1", "--samples", "1", "--max-new-tokens", "8")
    assert "base" in table.stdout and "tuned" in table.stdout and "length (mean)" in table.stdout
