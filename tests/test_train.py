"""GRPO on the real packaged model: the adapter learns, the base stays put, the merge changes the logits."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


def _logits(model, tokenizer, text="Summarize this movie plot in one sentence: a dog finds its way home."):
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits  # (1, T, vocab)


def test_run_folder_contents(tiny_run):
    out = tiny_run.output
    assert tiny_run.steps == 2
    for name in ("config.json", "metrics.jsonl", "adapter/adapter_config.json", "merged/config.json",
                 "merged/model.safetensors", "merged/tokenizer.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["rewards"] == ["length", "token_diversity"]
    assert config["grpo"]["max_steps"] == 2 and config["grpo"]["num_generations"] == 2
    assert config["lora"]["r"] == 8 and config["lora"]["lora_alpha"] == 32
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [s for s in steps if "rewards/length/mean" in s]
    assert [s["step"] for s in logged] == [1, 2]
    for record in logged:
        assert record["rewards/token_diversity/mean"] >= 0 and record["rewards/length/mean"] <= 0
        assert "kl" in record and "completions/mean_length" in record
    peaks = [s["peak_rss_gib"] for s in steps]  # the process's peak so far: never falls, and holds the model
    assert peaks == sorted(peaks) and peaks[0] > 0.5


def test_lora_weights_changed_and_base_weights_did_not(tiny_run, base_model_dir):
    from safetensors.torch import load_file

    adapter = load_file(tiny_run.adapter / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b, "the adapter has no LoRA B matrices"
    # PEFT starts every B at zero: any non-zero entry was written by the optimizer.
    assert sum(int(v.abs().sum() > 0) for v in lora_b.values()) > len(lora_b) // 2

    base = load_file(base_model_dir / "model.safetensors")
    merged = load_file(tiny_run.merged / "model.safetensors")
    scale = 32 / 8  # lora_alpha / r
    changed = 0
    for name, weight in base.items():
        delta = merged[name] - weight
        prefix = name.removesuffix(".weight")
        a_key = next((k for k in adapter if k.endswith(f"{prefix}.lora_A.weight")), None)
        if a_key is None:  # not adapted (embeddings, norms): bit-for-bit the base weight
            assert torch.equal(merged[name], weight), name
            continue
        expected = scale * adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key]  # (out, r) @ (r, in)
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-3)
        changed += int(delta.abs().max() > 0)
    assert changed > 0


def test_merged_logits_differ_from_base(tiny_run, base_model):
    from ragrpo.models import load_model

    model, tokenizer = base_model
    merged, _ = load_model(str(tiny_run.merged))
    assert not torch.allclose(_logits(model, tokenizer), _logits(merged, tokenizer))


def test_generate_command_uses_the_merged_model(tiny_run):
    result = subprocess.run([sys.executable, "-m", "ragrpo.cli", "generate", str(tiny_run.merged),
                             "Name a colour.", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_nan_reward_stops_training_with_one_line(tmp_path):
    reward = tmp_path / "bad_reward.py"
    reward.write_text("def shaky(completions, **kw):\n    return [float('nan')] * len(completions)\n")
    result = subprocess.run(
        [sys.executable, "-m", "ragrpo.cli", "train", "--reward", f"{reward}:shaky", "--max-steps", "1",
         "--num-generations", "2", "--max-completion-length", "8", "--output", str(tmp_path / "run"),
         "--config", str(_tiny_toml(tmp_path))],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: reward 'shaky' returned nan on sample 0"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def _tiny_toml(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text("max_samples = 4\n[grpo]\nper_device_train_batch_size = 2\nsave_strategy = \"no\"\n")
    return path
