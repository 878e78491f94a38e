import pytest

from ragrpo import RagrpoError
from ragrpo.config import PRESETS, build_run_config, grpo_config, load_config_file, lora_config


def test_seed_preset_is_the_write_up():
    seed = PRESETS["seed"]
    assert seed["learning_rate"] == 5e-6
    assert (seed["adam_beta1"], seed["adam_beta2"], seed["weight_decay"]) == (0.9, 0.99, 0.1)
    assert seed["warmup_steps"] == 0.1 and seed["lr_scheduler_type"] == "cosine"
    assert seed["optim"] == "paged_adamw_8bit"
    assert (seed["per_device_train_batch_size"], seed["num_generations"]) == (6, 6)
    assert (seed["max_completion_length"], seed["max_steps"], seed["max_grad_norm"]) == (128, 250, 0.1)
    assert seed["beta"] > 0  # the write-up's KL term; TRL's default is now 0


def test_precedence_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "seed"\n[grpo]\nmax_steps = 7\nbeta = 0.1\n[lora]\nr = 4\n')
    cfg = build_run_config(path, max_steps=3, learning_rate=None)
    assert cfg.preset == "seed" and cfg.lora == {"r": 4}
    args = grpo_config(cfg, tmp_path / "out")
    assert args.max_steps == 3  # flag beats file
    assert args.beta == 0.1  # file beats preset
    assert args.learning_rate == 5e-6  # preset where nothing else speaks
    assert args.max_grad_norm == 0.1
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.1
    lora = lora_config(cfg)
    assert lora.r == 4 and lora.lora_alpha == 32 and lora.target_modules == "all-linear"


def test_paged_optimizer_falls_back_on_cpu(tmp_path, capsys):
    import torch

    args = grpo_config(build_run_config(preset="seed"), tmp_path)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the paged optimizer is kept")
    assert args.optim == "adamw_torch"
    assert "paged_adamw_8bit needs CUDA" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ("[grpo\n", "not valid TOML"),
    ("grpo = 3\n", "must be a table"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RagrpoError, match=message):
        load_config_file(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(RagrpoError, match="does not exist"):
        load_config_file(tmp_path / "nope.toml")


def test_unknown_grpo_and_lora_keys(tmp_path):
    with pytest.raises(RagrpoError, match="unknown GRPO setting 'not_a_field'"):
        grpo_config(build_run_config(grpo={"not_a_field": 1}), tmp_path)
    with pytest.raises(RagrpoError, match="unknown LoRA setting 'rank'"):
        lora_config(build_run_config(lora={"rank": 4}))


def test_bad_values():
    with pytest.raises(RagrpoError, match="unknown preset"):
        build_run_config(preset="fast")
    with pytest.raises(RagrpoError, match="no reward"):
        build_run_config(rewards=[])


@pytest.mark.parametrize("bf16", ["1", "0"])
def test_engine_settings_apply_to_the_default_preset_only(tmp_path, force_hardware, bf16):
    force_hardware(BF16=bf16)
    default = grpo_config(build_run_config(), tmp_path)
    seed = grpo_config(build_run_config(preset="seed"), tmp_path)
    assert default.gradient_checkpointing is False and default.bf16 is (bf16 == "1")
    assert seed.gradient_checkpointing is True and seed.bf16 is False  # the write-up's run, as TRL does it
    assert grpo_config(build_run_config(grpo={"bf16": False}), tmp_path).bf16 is False  # the user wins


def test_trl_vllm_generation_is_reachable_from_the_config(tmp_path):
    """GPU users turn on TRL's vLLM sampling through [grpo]; the fast engine then hands sampling to TRL."""
    args = grpo_config(build_run_config(grpo={"use_vllm": True, "vllm_mode": "colocate",
                                              "vllm_gpu_memory_utilization": 0.3}), tmp_path)
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization) == (True, "colocate", 0.3)
