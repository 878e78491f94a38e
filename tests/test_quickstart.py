"""The quickstart's wiring, end to end on the real models, with a 2-step run instead of its full one."""

import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_quickstart_prints_both_answers_and_the_before_after_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ragrpo.cli", "quickstart", "--workdir", str(tmp_path / "qs"), "--max-steps", "2"],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for row in ("length (mean)", "token_diversity (mean)", "total reward (mean)", "completion length, chars"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        base, tuned = (float(x) for x in line.split()[-2:])
        assert not math.isnan(base) and not math.isnan(tuned)
    assert "BASE MODEL" in out and "GRPO-TUNED MODEL" in out
    drawn = next(line for line in out.splitlines() if line.startswith("Drawn from"))
    sources = next(line for line in out.splitlines() if line.startswith("Sources: ")).removeprefix("Sources: ").split("; ")
    for side, named in zip(("base", "tuned"), drawn.split(": ", 1)[1].split("; "), strict=True):
        # each side names one of the five sources shown, by its number, or says there is none
        assert named.startswith(f"{side} none") or any(named == f"{side} [{n}] {label}"
                                                       for n, label in enumerate(sources, 1)), named
    # the gold questions about the held-out movies, before and after, as fractions of the questions asked
    asked = int(out.split("Gold questions about the held-out movies (", 1)[1].split(",", 1)[0])
    assert 0 < asked <= 40
    for row in ("answer accuracy ", "cites source only "):
        line = next(line for line in out.splitlines() if line.startswith(row))
        for value in (float(x) for x in line.split()[-2:]):  # printed to 3 decimals: a count over `asked`
            assert 0 <= value <= 1 and abs(value * asked - round(value * asked)) <= asked * 0.0005
    assert "Filter: release_year < 1990" in out
    assert (tmp_path / "qs" / "run" / "merged" / "config.json").exists()
    assert [line for line in result.stderr.splitlines() if line.startswith("[")][-1].startswith("[5/5]")
