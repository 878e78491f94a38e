"""The accelerate config files shipped for GPU users load as accelerate reads them, with the strategy each
file is named for. Running them needs GPUs; tests/test_distributed.py runs the same training on two CPU
processes."""

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


@pytest.mark.parametrize(("name", "kind", "setting"), [
    ("multi-gpu", "MULTI_GPU", None),
    ("zero2", "DEEPSPEED", ("deepspeed_config", "zero_stage", 2)),
    ("zero3", "DEEPSPEED", ("deepspeed_config", "zero_stage", 3)),
    ("fsdp", "FSDP", ("fsdp_config", "fsdp_version", 2)),
])
def test_shipped_accelerate_configs_load_with_their_strategy(name, kind, setting):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.mixed_precision == "bf16"
    if setting:
        table, key, value = setting
        assert getattr(config, table)[key] == value
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == ["fsdp", "multi-gpu", "zero2", "zero3"]
