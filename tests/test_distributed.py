"""Data-parallel GRPO: `accelerate launch` with two CPU processes on the gloo backend, a tiny Llama.

Each rank must train on its own prompts, hold the same adapter after every step (DDP averages the
gradients), and leave the run folder to the main process: metrics logged once, checkpoints once, and
`--resume` continuing from them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOML = """
max_samples = 8
rewards = ["length", "{reward}"]
[grpo]
max_steps = 2
num_generations = 2
per_device_train_batch_size = 2
max_completion_length = 8
learning_rate = 0.01
logging_steps = 1
save_steps = 1
"""

# A reward that records what each rank scored, and a callback that records each rank's adapter after each step.
PROBES = '''
import hashlib, json, os
from transformers import TrainerCallback

def seen(prompts=None, completions=None, **kwargs):
    with open(os.path.join(os.environ["PROBE_DIR"], f"prompts-{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps([str(p) for p in prompts]) + "\\n")
    return [0.0] * len(completions)

class AdapterDigest(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        lora = sorted((n, p) for n, p in model.named_parameters() if "lora_" in n)
        digest = hashlib.sha256(b"".join(p.detach().float().numpy().tobytes() for _, p in lora)).hexdigest()
        with open(os.path.join(os.environ["PROBE_DIR"], f"adapter-{os.environ['RANK']}.jsonl"), "a") as f:
            f.write(json.dumps({"step": state.global_step, "digest": digest}) + "\\n")
'''

TRAIN = '''
import sys
from ragrpo.config import build_run_config
from ragrpo.tuning.train import train
sys.path.insert(0, sys.argv[3])
from probes import AdapterDigest
train(build_run_config(sys.argv[1], model=sys.argv[2], output=sys.argv[4]), callbacks=[AdapterDigest()])
'''


def launch(*args, env):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def two_rank_setup(tmp_path, tiny_model_dir):
    (tmp_path / "probes.py").write_text(PROBES)
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "run.toml").write_text(TOML.format(reward=f"{tmp_path / 'probes.py'}:seen"))
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PROBE_DIR": str(tmp_path), "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return tmp_path, env


def test_two_cpu_ranks_train_on_their_own_prompts_in_step_and_the_main_one_writes_the_run(two_rank_setup):
    tmp_path, env = two_rank_setup
    run = tmp_path / "run"
    done = launch(str(tmp_path / "train.py"), str(tmp_path / "run.toml"), str(tmp_path / "tiny-model"), str(tmp_path),
                  str(run), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    prompts = [lines(tmp_path / f"prompts-{rank}.jsonl") for rank in (0, 1)]
    assert len(prompts[0]) == len(prompts[1]) == 2  # two steps on each rank
    for step in range(2):
        assert not set(prompts[0][step]) & set(prompts[1][step])  # each rank its own share of the batch
    digests = [lines(tmp_path / f"adapter-{rank}.jsonl") for rank in (0, 1)]
    assert [d["step"] for d in digests[0]] == [1, 2]
    assert digests[0] == digests[1]  # the same adapter on both ranks after every step
    assert digests[0][0]["digest"] != digests[0][1]["digest"]  # and it did change
    logged = [r["step"] for r in lines(run / "metrics.jsonl") if "loss" in r]
    assert logged == [1, 2]  # once, not once per rank
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (run / "merged" / "config.json").exists() and (run / "adapter" / "adapter_config.json").exists()
    assert not list(tmp_path.glob("run.staging-*"))

    # --resume from the first checkpoint, through the CLI under the same launcher: step 2 again, logged once
    import shutil

    shutil.rmtree(run / "checkpoints" / "checkpoint-2")
    resumed = launch("-m", "ragrpo.cli", "train", "--resume", "--output", str(run), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("trained 2 steps") == 1  # the main process speaks for the run
    logged = [r["step"] for r in lines(run / "metrics.jsonl") if "loss" in r]
    assert logged == [1, 2]
    assert (run / "checkpoints" / "checkpoint-2").exists()
