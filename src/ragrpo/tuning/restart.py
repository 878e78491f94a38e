"""Restart a run that stalls: when a training reward is still low halfway to a step, train again on another seed.

On the 135M model the from-index recipe reads its passages on some training seeds and learns to retell
passage 1 on others. Over steps 51-100 the runs that went on to read (seeds 43 and 44 of the default recipe)
averaged 0.31 and 0.28 `answer_match` on their own training rows; the five that learned the habit (seed 42 of
the default, and four runs of other recipes) averaged 0.12 to 0.17. Hence the rule `answer_match<0.22@100`:
only the run's own reward is read, no label, no held-out answer.

Measured as a restart (bench/results/from-index/NOTES.md, session 25), it did not pay: it stopped two new
default runs at step 100, and neither second attempt read (held-out answer accuracy 0.15 and 0.24, against
0.32 to 0.38 for runs that read), while each stop cost 100 steps. So the from-index default records the
check and does not act on it (`restarts` 0); `--restarts 1` acts on it.

A rule is `REWARD<VALUE@STEP`: the mean of TRL's logged `rewards/REWARD/mean` over the steps after STEP/2 up
to STEP. The last allowed attempt is never stopped; its check is recorded all the same. A stopped attempt's
seed, mean and training metrics are kept in the final run folder (`restarts.json`, `stalled/`), so the run
says what it cost.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from ragrpo import RagrpoError

SEED_STEP = 1000  # attempt n trains on seed + n * SEED_STEP: clear of the neighbouring seeds users try by hand
RECORD = "restarts.json"
_RULE = re.compile(r"^\s*([A-Za-z_][\w.:-]*)\s*<\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*@\s*([0-9]+)\s*$")


class Stalled(Exception):
    """An attempt stopped by its restart rule; carries what the run folder keeps of it."""

    def __init__(self, check: dict, metrics: str):
        super().__init__(f"stalled: {check}")
        self.check, self.metrics = check, metrics


@dataclass(frozen=True)
class RestartRule:
    reward: str
    below: float
    step: int

    @classmethod
    def parse(cls, spec: str, rewards: list[str]) -> RestartRule:
        """The rule `spec` names, checked against the run's reward specs (NAME[=WEIGHT])."""
        match = _RULE.match(spec)
        if not match:
            raise RagrpoError(f"--restart-if {spec!r}: write REWARD<VALUE@STEP, e.g. answer_match<0.22@100")
        reward, below, step = match.group(1), float(match.group(2)), int(match.group(3))
        # TRL logs a reward under its function's name: the last part of `pkg.module:function` or `pkg.module.function`
        names = [r.split("=", 1)[0].rsplit(":", 1)[-1].rsplit(".", 1)[-1] for r in rewards]
        if reward not in names:
            raise RagrpoError(f"--restart-if {spec!r}: {reward!r} is not one of this run's rewards "
                              f"({', '.join(names)})")
        if step < 2:
            raise RagrpoError(f"--restart-if {spec!r}: the step must be at least 2, got {step}")
        return cls(reward, below, step)

    @property
    def window(self) -> tuple[int, int]:
        """The first and last step whose logged means are averaged."""
        return self.step // 2 + 1, self.step

    def callback(self, stop: bool):
        """A TrainerCallback that averages the reward over the window and, with `stop`, ends training at
        `step` when the average is below the bound. Its `result` is then the check (None before `step`)."""
        from transformers import TrainerCallback

        rule, key = self, f"rewards/{self.reward}/mean"
        first, last = self.window

        class RestartCheck(TrainerCallback):
            values: list[float]
            result: dict | None = None  # the check, once the window is over
            stopped = False  # whether it ended training

            def on_train_begin(self, args, state, control, **kwargs):
                self.values, self.result, self.stopped = [], None, False

            def on_log(self, args, state, control, logs=None, **kwargs):
                if self.result is not None or not logs or key not in logs:
                    return
                if first <= state.global_step <= last:
                    self.values.append(float(logs[key]))
                if state.global_step >= last and self.values:
                    mean = sum(self.values) / len(self.values)
                    self.result = {**asdict(rule), "steps": [first, last], "mean": mean, "stalled": mean < rule.below}
                    if stop and self.result["stalled"] and state.global_step < state.max_steps:
                        control.should_training_stop = self.stopped = True

        return RestartCheck()


def record_files(attempts: list[Stalled], last: dict | None) -> dict[str, str]:
    """The files a run folder gets for its stopped attempts and the last attempt's check."""
    if not attempts and last is None:
        return {}
    record = {"stopped": [a.check for a in attempts], "last": last}
    files = {RECORD: json.dumps(record, indent=2) + "\n"}
    for attempt in attempts:
        files[f"stalled/seed-{attempt.check['seed']}.metrics.jsonl"] = attempt.metrics
    return files


def read_record(run) -> dict | None:
    """A run folder's restart record (None when it had no rule)."""
    from pathlib import Path

    path = Path(run) / RECORD
    return json.loads(path.read_text()) if path.exists() else None
