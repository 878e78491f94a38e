"""Run configuration: the few fields that are ours, with TRL's GRPOConfig and PEFT's LoraConfig passed through.

A run is described by `RunConfig`. What TRL or PEFT already define is not re-declared here: the `grpo`
and `lora` tables hold overrides that go straight into `GRPOConfig(...)` and `LoraConfig(...)`, and
their keys are checked against those classes' own fields. Precedence, lowest first:

    preset  <  config file ([grpo], [lora] and top-level keys)  <  command-line flags
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ragrpo import RagrpoError

# ---- presets --------------------------------------------------------------------------------------
# Values are GRPOConfig fields. "seed" is the write-up's configuration, term for term. TRL changed two
# defaults since the write-up: `beta` is now 0 (no KL term, no reference model) and `loss_type` is now
# "dapo"; the preset sets both back to what the write-up ran with (beta 0.04, the per-sequence "grpo"
# loss). TRL also multiplies the KL term by the policy ratio by default (`use_bias_correction_kl`); the
# write-up's per-token penalty is the plain k3 estimator, so that is switched off too.
# transformers 5 has no `warmup_ratio`: a float `warmup_steps` below 1 is the ratio.
SEED_PRESET = {
    "learning_rate": 5e-6,
    "adam_beta1": 0.9,
    "adam_beta2": 0.99,
    "weight_decay": 0.1,
    "warmup_steps": 0.1,
    "lr_scheduler_type": "cosine",
    "optim": "paged_adamw_8bit",
    "logging_steps": 1,
    "per_device_train_batch_size": 6,
    "gradient_accumulation_steps": 1,
    "num_generations": 6,
    "max_completion_length": 128,
    "max_steps": 250,
    "save_steps": 250,
    "max_grad_norm": 0.1,
    "beta": 0.04,
    "loss_type": "grpo",
    "use_bias_correction_kl": False,
}

# The everyday preset: the write-up's shape (G=6, 128 tokens, KL to the adapter-free model, `grpo` loss)
# with a learning rate that moves a rank-8 adapter within a CPU-sized run, grad clip 1.0 and the plain
# torch optimizer; `grpo_config` adds `engine_settings()` under it. Chosen by `bench/preset_sweep.py`
# (bench/results/preset_sweep-cpu-2core.json): 40 steps at lr 2e-4, 5e-4 and 1e-3, seeds 0 and 1, each
# scored by `ragrpo eval` on the 14 held-out movies x 2 samples. Every point met the criterion
# (held-out length error |len - 50| at most half the base model's, token diversity not lower); 2e-4 had
# the lowest error on both seeds (138.9 -> 19.3 and 19.1 characters, diversity 87.7 -> 98.6 and 96.3) in
# 9.0 and 6.5 minutes of training on 2 CPU cores.
DEFAULT_PRESET = {
    **SEED_PRESET,
    "learning_rate": 2e-4,
    "optim": "adamw_torch",
    "max_grad_norm": 1.0,
    "max_steps": 40,
    "save_steps": 20,
    "save_total_limit": 2,
}

PRESETS = {"default": DEFAULT_PRESET, "seed": SEED_PRESET}
ENGINES = ("fast", "trl")

# The write-up's adapter: rank 8, alpha 32, every linear layer.
LORA_DEFAULTS = {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": "all-linear"}

DEFAULT_PROMPT_TEMPLATE = "Summarize this movie plot in one sentence:\n{movie_plot}"


@dataclass
class RunConfig:
    # ---- model and data ----
    model: str | None = field(
        default=None,
        metadata={"help": "Hugging Face id or local folder; None means the packaged SmolLM2-135M-Instruct."},
    )
    dataset: str = field(
        default="builtin:movies",
        metadata={"help": "JSONL/CSV/Parquet file, Hugging Face dataset name, or builtin:movies."},
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Python format string over the dataset's columns, e.g. 'Summarize:\\n{movie_plot}'. "
            "Without it the dataset needs a `prompt` column (text or chat messages); builtin:movies "
            "uses DEFAULT_PROMPT_TEMPLATE."
        },
    )
    max_prompt_length: int = field(
        default=512,
        metadata={"help": "Prompts longer than this many tokens are cut from the left (TRL no longer does it)."},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many rows (after the split and shuffling)."}
    )
    held_out: float = field(
        default=0.1,
        metadata={
            "help": "Share of prompts kept out of training for `ragrpo eval`, chosen by a stable hash of each "
            "prompt, so the same prompts are held out in every run and every evaluation."
        },
    )
    # ---- rewards ----
    rewards: list[str] = field(
        default_factory=lambda: ["length", "token_diversity"],
        metadata={"help": "Reward specs NAME[=WEIGHT]; NAME is a built-in or package.module:function."},
    )
    # ---- run ----
    preset: str = field(default="default", metadata={"help": f"One of {sorted(PRESETS)}."})
    output: str = field(default="runs/latest", metadata={"help": "Folder for adapter, merged model, logs."})
    seed: int = field(default=42, metadata={"help": "Seed for data shuffling, sampling and initialisation."})
    engine: str | None = field(
        default=None,
        metadata={
            "help": "'fast' (bf16 frozen base where the hardware has fast bf16, sampling on a merged copy with a "
            "static cache; see ragrpo.engine) or 'trl' (plain GRPOTrainer). None: 'fast' under the default "
            "preset, 'trl' under the seed preset."
        },
    )
    # ---- passed through ----
    grpo: dict = field(default_factory=dict, metadata={"help": "Overrides for trl.GRPOConfig."})
    lora: dict = field(default_factory=dict, metadata={"help": "Overrides for peft.LoraConfig."})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise RagrpoError(f"unknown preset {self.preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        if not self.rewards:
            raise RagrpoError("no reward given: pass at least one --reward NAME")
        if self.max_prompt_length < 1:
            raise RagrpoError(f"max_prompt_length must be at least 1, got {self.max_prompt_length}")
        if not 0 <= self.held_out < 1:
            raise RagrpoError(f"held_out must be in [0, 1), got {self.held_out}")
        if self.engine not in (None, *ENGINES):
            raise RagrpoError(f"unknown engine {self.engine!r}; known engines: {', '.join(ENGINES)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise RagrpoError(f"max_samples must be at least 1, got {self.max_samples}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def fast_engine(self) -> bool:
        return (self.engine or ("fast" if self.preset == "default" else "trl")) == "fast"


def _known(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def load_config_file(path: str | Path) -> dict:
    """Read a TOML run file into a dict of RunConfig fields; unknown keys are errors."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RagrpoError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RagrpoError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RagrpoError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = set(data) - _known(RunConfig)
    if unknown:
        raise RagrpoError(
            f"config file {path}: unknown key {min(unknown)!r}; "
            f"known keys: {', '.join(sorted(_known(RunConfig)))}"
        )
    for table in ("grpo", "lora"):
        if table in data and not isinstance(data[table], dict):
            raise RagrpoError(f"config file {path}: [{table}] must be a table of settings")
    return data


def build_run_config(config_file: str | Path | None = None, **overrides) -> RunConfig:
    """Merge a config file and explicit overrides (None means 'not given') into a RunConfig.

    Overrides named like GRPOConfig fields (max_steps, beta, ...) go into the `grpo` table; `grpo=` and
    `lora=` dicts are merged over the file's tables.
    """
    data = load_config_file(config_file) if config_file else {}
    grpo = {**data.pop("grpo", {}), **(overrides.pop("grpo", None) or {})}
    lora = {**data.pop("lora", {}), **(overrides.pop("lora", None) or {})}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _known(RunConfig):
            data[key] = value
        else:
            grpo[key] = value
    try:
        return RunConfig(**data, grpo=grpo, lora=lora)
    except TypeError as exc:
        raise RagrpoError(f"bad run configuration: {exc}") from None


def _cuda_8bit_available() -> bool:
    import importlib.util

    from ragrpo import hardware

    return hardware.device() == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def engine_settings(steps_per_generation: int = 1) -> dict:
    """GRPOConfig settings that change how fast a step runs, not what it optimises (the fast engine's;
    `ragrpo.engine` does the rest).

    bf16 autocast where `hardware.bf16()` says bf16 pays (1.27x per step on an AVX512-BF16 CPU, 3 steps of the
    benchmark); no gradient checkpointing (a 135M-parameter model's activations fit in memory); and,
    optionally, generation for several optimizer steps in one generate call (measured: no gain on 2 CPU
    cores, because TRL then needs an extra forward pass for the old policy's log-probabilities).
    """
    from ragrpo import hardware

    settings = {"gradient_checkpointing": False, "steps_per_generation": steps_per_generation}
    if hardware.bf16():
        settings.update(bf16=True, use_cpu=hardware.device() == "cpu")
    return settings


def grpo_config(cfg: RunConfig, output_dir: str | Path, **extra):
    """The trl.GRPOConfig for a run: preset, then the run's [grpo] overrides, then `extra`."""
    from trl import GRPOConfig

    engine = engine_settings() if cfg.fast_engine else {}
    settings = {**PRESETS[cfg.preset], **engine, "seed": cfg.seed, "report_to": "none", **cfg.grpo, **extra}
    unknown = set(settings) - _known(GRPOConfig)
    if unknown:
        raise RagrpoError(f"unknown GRPO setting {min(unknown)!r} (not a field of trl.GRPOConfig)")
    if "8bit" in str(settings.get("optim", "")) and not _cuda_8bit_available():
        print(
            f"notice: {settings['optim']} needs CUDA and bitsandbytes; using adamw_torch instead",
            file=sys.stderr,
        )
        settings["optim"] = "adamw_torch"
    from ragrpo import hardware

    if hardware.device() == "cpu":
        # TRL turns bf16 on by default; plain float32 is the safe CPU default (issue 3 measures bf16 CPUs).
        settings.setdefault("use_cpu", True)
        settings.setdefault("bf16", False)
    settings["output_dir"] = str(output_dir)
    try:
        return GRPOConfig(**settings)
    except (ValueError, TypeError) as exc:
        raise RagrpoError(f"bad GRPO setting: {str(exc).splitlines()[0]}") from None


def lora_config(cfg: RunConfig):
    """The peft.LoraConfig for a run: the write-up's adapter, then the run's [lora] overrides."""
    from peft import LoraConfig

    settings = {**LORA_DEFAULTS, **cfg.lora}
    unknown = set(settings) - _known(LoraConfig)
    if unknown:
        raise RagrpoError(f"unknown LoRA setting {min(unknown)!r} (not a field of peft.LoraConfig)")
    try:
        return LoraConfig(**settings)
    except (ValueError, TypeError) as exc:
        raise RagrpoError(f"bad LoRA setting: {str(exc).splitlines()[0]}") from None
