"""The quickstart's wiring, end to end on the real models, with a 2-step run and 6 gold questions
instead of its full run."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_quickstart_prints_gold_before_after_and_both_answers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ragrpo.cli", "quickstart", "--workdir", str(tmp_path / "qs"), "--max-steps", "2",
         "--max-questions", "6"],
        capture_output=True, text=True, timeout=1500, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Gold questions about the 32 held-out films (6 questions, passages in balanced order" in out
    for row in ("answer accuracy", "cites source only, source not passage 1", "distinct-2"):
        line = next(line for line in out.splitlines() if line.startswith(row + " "))
        base, tuned = (float(x) for x in line.split()[-2:])
        assert 0 <= base <= 1 and 0 <= tuned <= 1
    assert out.count("BASE MODEL") == 2 and out.count("GRPO-TUNED MODEL") == 2
    assert "Gold answer: " in out and "Query: What's common in movies" in out
    run = tmp_path / "qs" / "run"
    assert (run / "merged" / "config.json").exists() and (run / "merged" / "ragrpo.json").exists()
    assert (run / "eval-index" / "report.md").exists()
    assert [line for line in result.stderr.splitlines() if line.startswith("[")][-1].startswith("[5/5]")
