"""Run configuration: the few fields that are ours, with TRL's GRPOConfig and PEFT's LoraConfig passed through.

A run is described by `RunConfig`. What TRL or PEFT already define is not re-declared here: the `grpo`
and `lora` tables hold overrides that go straight into `GRPOConfig(...)` and `LoraConfig(...)`, and
their keys are checked against those classes' own fields. Precedence, lowest first:

    preset  <  config file ([grpo], [lora] and top-level keys)  <  command-line flags
"""

from __future__ import annotations

import enum
import sys
import tomllib
import types
import typing
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
        default=None, metadata={"help": "Train on at most this many rows (after the split and shuffling); in a "
                                          "mixed-order curriculum, this many questions, each with its G rows."}
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
    restart_if: str | None = field(
        default=None,
        metadata={"help": "REWARD<VALUE@STEP: stop a run whose reward averaged below VALUE over the steps after "
                          "STEP/2 up to STEP, and train again on the seed plus 1000 (ragrpo.tuning.restart). "
                          "From-index runs on the default rewards and every question kind record answer_match<0.22@100 "
                          "(0 restarts)."},
    )
    restarts: int | None = field(
        default=None,
        metadata={"help": "How many times `restart_if` may start a run again; 0 only records the check. None: 1 "
                          "(from-index runs set 0 where they supply the rule themselves)."},
    )
    engine: str | None = field(
        default=None,
        metadata={
            "help": "'fast' (bf16 frozen base where the hardware has fast bf16, sampling on a merged copy with a "
            "static cache; see ragrpo.generation.engine) or 'trl' (plain GRPOTrainer). None: 'fast' under "
            "the default preset, 'trl' under the seed preset."
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
        if self.restarts is not None and self.restarts < 0:
            raise RagrpoError(f"restarts must be 0 or more, got {self.restarts}")
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
    """Read a TOML run file into a dict of RunConfig fields; unknown keys and values of the wrong type are
    errors. Top-level values are checked against RunConfig's field types, [grpo] against trl.GRPOConfig's
    and [lora] against peft.LoraConfig's (their unknown keys are left to `grpo_config` and `lora_config`)."""
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
    check_types(data, RunConfig, f"config file {path}: ")
    if data.get("grpo"):
        from trl import GRPOConfig

        check_types(data["grpo"], GRPOConfig, f"config file {path}: [grpo] ", owner="trl.GRPOConfig")
    if data.get("lora"):
        from peft import LoraConfig

        check_types(data["lora"], LoraConfig, f"config file {path}: [lora] ", owner="peft.LoraConfig")
    return data


# ---- value checks ---------------------------------------------------------------------------------
# TOML values arrive untyped as far as the dataclasses are concerned: `seed = "abc"` would only fail
# (or silently misbehave) once a model is loaded. Each value is matched against its field's annotation.


def check_types(values: dict, cls, prefix: str = "", *, owner: str | None = None) -> None:
    """Raise RagrpoError for the first value whose type does not fit `cls`'s annotation of that field.
    Keys that are not fields of `cls` are skipped (reported elsewhere, with the list of known ones)."""
    hints = _field_hints(cls)
    for key, value in values.items():
        if key in hints and not _fits(value, hints[key]):
            where = f" (a field of {owner})" if owner else ""
            raise RagrpoError(f"{prefix}{key} = {value!r}: expected {_describe(hints[key])}{where}")


def _field_hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve here: check the fields whose annotation does
        return {f.name: f.type for f in fields(cls) if not isinstance(f.type, str)}


def _members(hint) -> tuple:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)


def _fits(value, hint) -> bool:
    """Whether `value` (as TOML or a click option gives it) fits the annotation `hint`. Classes other than
    the builtin types and enums cannot be judged from a TOML value and pass (the library checks them)."""
    if hint is typing.Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        # PEFT documents one pattern inside a Literal: 'pissa_niter_[number of iters]'
        return value in args or any(isinstance(a, str) and "[" in a and isinstance(value, str)
                                    and value.startswith(a.split("[")[0]) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (len(args) != 2 or all(_fits(v, args[1]) for v in value.values()))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    return True


def _describe(hint) -> str:
    names = []
    for member in _members(hint):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if member is type(None) or member is None:
            continue  # TOML has no null; a value left out keeps the default
        if origin is typing.Literal:
            names.append("one of " + ", ".join(repr(a) for a in args))
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            names.append("one of " + ", ".join(repr(m.value) for m in member))
        elif member is bool:
            names.append("true or false")
        elif member is int:
            names.append("an integer")
        elif member is float:
            names.append("a number")
        elif member is str:
            names.append("a string")
        elif origin in (list, tuple, set) or member in (list, tuple, set):
            names.append(f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
                         if args and args[-1] is not Ellipsis and origin is not tuple else "a list")
        elif origin is dict or member is dict:
            names.append("a table")
        else:
            names.append(getattr(member, "__name__", str(member)))
    return " or ".join(names) or "nothing"


# GRPOConfig fields that count something and must be positive: transformers reads max_steps <= 0 as
# "train num_train_epochs epochs instead", and a zero or negative count elsewhere trains nothing, saves
# nothing, or divides by zero inside TRL.
POSITIVE_GRPO = (
    "max_steps", "save_steps", "logging_steps", "eval_steps", "num_train_epochs", "save_total_limit",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "num_generations", "num_generations_eval", "generation_batch_size", "steps_per_generation",
    "num_iterations", "max_completion_length",
)


def check_positive(grpo: dict, given: dict[str, str]) -> None:
    """Raise RagrpoError for a count in `grpo` that is zero or negative; `given` names where each key came
    from (a flag or a config file), for the message."""
    for key in POSITIVE_GRPO:
        value = grpo.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            least = "at least 1" if isinstance(value, int) else "greater than 0"
            raise RagrpoError(f"{given.get(key, key)} must be {least}, got {value}")


def build_run_config(config_file: str | Path | None = None, **overrides) -> RunConfig:
    """Merge a config file and explicit overrides (None means 'not given') into a RunConfig.

    Overrides named like GRPOConfig fields (max_steps, beta, ...) go into the `grpo` table; `grpo=` and
    `lora=` dicts are merged over the file's tables.
    """
    data = load_config_file(config_file) if config_file else {}
    given = {key: f"config file {config_file}: [grpo] {key}" for key in data.get("grpo", {})}
    grpo = {**data.pop("grpo", {}), **(overrides.pop("grpo", None) or {})}
    lora = {**data.pop("lora", {}), **(overrides.pop("lora", None) or {})}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _known(RunConfig):
            data[key] = value
        else:
            grpo[key] = value
            given[key] = f"--{key.replace('_', '-')}"
    check_positive(grpo, given)
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
    `ragrpo.generation.engine` does the rest).

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
