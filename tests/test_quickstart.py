"""The quickstart: its gold table, and its wiring end to end on the real models (a 2-step run)."""

import json
import os
import subprocess
import sys

import pytest


def gold_figures(drawn_first: float) -> dict:
    return {"answer accuracy": 0.1, "drawn from passage 1": drawn_first}


@pytest.mark.parametrize("drawn_first,habit", [(0.9, True), (0.65, True), (0.6, False), (0.4, False), (0.0, False)])
def test_the_gold_table_names_a_passage_1_habit_and_the_seed_to_try_next(drawn_first, habit):
    from ragrpo.quickstart import QuickstartReport, gold_table

    rep = QuickstartReport(None, None, None, {}, 1.0, "run", 200, gold_questions=40,
                           gold={"base": gold_figures(0.3), "tuned": gold_figures(drawn_first)}, source_first=0.325,
                           seed=42)
    table = gold_table(rep)
    assert "source is passage 1 (share of questions)" in table and "0.325" in table
    assert ("Habit: the tuned model drew" in table) is habit
    if habit:
        assert f"drew {drawn_first:.0%} of its answers" in table and "`ragrpo quickstart --seed 43`" in table


@pytest.mark.integration
def test_quickstart_trains_from_the_index_and_prints_before_and_after(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ragrpo.cli", "quickstart", "--workdir", str(tmp_path / "qs"), "--max-steps", "2"],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    run = tmp_path / "qs" / "run"
    assert (run / "merged" / "config.json").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 2
    split = json.loads((run / "curriculum" / "split.json").read_text())
    assert split["source"]["held_out"] == 0.2 and split["held_out_documents"]
    # the training questions are about the other films only
    train_sources = {json.loads(line)["source_id"] for line in (run / "curriculum" / "train.jsonl").read_text().splitlines()}
    assert train_sources and not train_sources & set(split["held_out_documents"])

    # the gold questions about the held-out films, before and after, as fractions of the questions asked
    asked = int(out.split("Gold questions about the held-out films (", 1)[1].split(",", 1)[0])
    assert 0 < asked <= 40
    for row in ("answer accuracy ", "cites source only "):
        line = next(line for line in out.splitlines() if line.startswith(row))
        for value in (float(x) for x in line.split()[-2:]):  # printed to 3 decimals: a count over `asked`
            assert 0 <= value <= 1 and abs(value * asked - round(value * asked)) <= asked * 0.0005
    below = next(line for line in out.splitlines() if line.startswith("drawn from the source, source not passage 1"))
    assert all(0 <= float(x) <= 1 for x in below.split()[-2:])  # over the questions whose source is not passage 1
    first = next(line for line in out.splitlines() if line.startswith("drawn from passage 1"))
    assert all(0 <= float(x) <= 1 for x in first.split()[-2:])
    length = next(line for line in out.splitlines() if line.startswith("answer length, chars"))
    assert all(0 < float(x) <= 64 * 20 for x in length.split()[-2:])

    # the write-up's query over films before 1990, both models side by side, and the source each drew from
    assert "Filter: release_year < 1990" in out
    assert out.count("BASE MODEL") == 2 and out.count("GRPO-TUNED MODEL") == 2
    drawn = next(line for line in out.splitlines() if line.startswith("Drawn from"))
    sources = next(line for line in out.splitlines() if line.startswith("Sources: ")).removeprefix("Sources: ").split("; ")
    assert len(sources) == 3
    for side, named in zip(("base", "tuned"), drawn.split(": ", 1)[1].split("; "), strict=True):
        # each side names one of the sources shown, by its number, or says there is none
        assert named.startswith(f"{side} none") or any(named == f"{side} [{n}] {label}"
                                                       for n, label in enumerate(sources, 1)), named
    # and one gold question whose source is not passage 1, with its gold answer
    shown = next(line for line in out.splitlines() if line.startswith("Gold answer: "))
    assert "(source: passage 2 of 3)" in shown or "(source: passage 3 of 3)" in shown
    # about a person, as the run's name questions are
    assert next(line for line in out.splitlines() if line.startswith("Gold question (")).startswith("Gold question (person): ")
    assert f"Run folder: {run} (2 GRPO steps)" in out
    assert [line for line in result.stderr.splitlines() if line.startswith("[")][-1].startswith("[5/5]")


def test_the_report_says_what_the_restart_rule_did():
    from ragrpo.quickstart import restart_line

    def check(seed, mean):
        return {"reward": "answer_match", "below": 0.22, "step": 100, "steps": [51, 100], "seed": seed, "mean": mean,
                "stalled": mean < 0.22}

    assert restart_line(None) is None and restart_line({"stopped": [], "last": None}) is None
    assert restart_line({"stopped": [], "last": check(43, 0.31)}) == (
        "Restart rule (answer_match below 0.22): not needed (seed 43: answer_match 0.31 over steps 51-100).")
    recorded = restart_line({"stopped": [], "last": check(42, 0.18)})
    assert recorded.startswith("Step-100 check (answer_match below 0.22): seed 42: answer_match 0.18 over steps "
                               "51-100, below it;") and "--restarts 1" in recorded
    line = restart_line({"stopped": [check(42, 0.138)], "last": check(1042, 0.29)})
    assert line.startswith("Restart rule (answer_match below 0.22): stopped seed 42: answer_match 0.14 over steps 51-100")
    assert line.endswith("trained again, then seed 1042: answer_match 0.29 over steps 51-100.")
