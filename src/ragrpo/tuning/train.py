"""GRPO fine-tuning with a LoRA adapter through TRL's GRPOTrainer, then merging the adapter.

For every prompt the trainer samples G completions, scores each with the reward functions (weighted
sum), turns the scores into group z-score advantages `(r - mean) / (std + 1e-4)`, and optimises the
clipped policy ratio with an optional per-token KL penalty (beta) to the reference model. With a
LoRA-wrapped model the reference is the same network with its adapter switched off, so no second
copy of the weights is held in memory.

A run folder holds:
    config.json      the run configuration, the resolved GRPOConfig and LoraConfig
    metrics.jsonl    one JSON object per logged step (rewards, KL, clip ratio, lengths, step_time)
    adapter/         the trained LoRA adapter (PEFT format) and tokenizer
    merged/          base + adapter merged (`merge_and_unload`): an ordinary Hugging Face model folder
    checkpoints/     trainer checkpoints every `save_steps` steps, for `--resume` (kept only if any were saved)

A stable tenth of the prompts (by a hash of each prompt, `held_out`) never reaches the trainer, so that
`ragrpo eval` can score base and tuned models on prompts neither has trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import sys
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from ragrpo import RagrpoError, hardware
from ragrpo.config import DEFAULT_PROMPT_TEMPLATE, RunConfig, grpo_config, lora_config
from ragrpo.data import read_records, require_columns
from ragrpo.rewards.registry import resolve_rewards
from ragrpo.tuning.restart import SEED_STEP, RestartRule, Stalled, record_files


@dataclass
class TrainResult:
    output: Path
    adapter: Path
    merged: Path
    metrics: Path
    steps: int


# ---- prompts --------------------------------------------------------------------------------------


def _template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise RagrpoError(f"--prompt-template {template!r} is not a valid format string: {exc}") from None


def _truncate_content(text: str, tokenizer, budget: int) -> str:
    """Keep the first `budget` tokens of `text` (the instruction of a template sits at its start)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= budget else tokenizer.decode(ids[:max(budget, 1)])


def build_prompts(frame, source: str, template: str | None, tokenizer, max_prompt_length: int) -> list:
    """Training prompts: chat messages from `template`, else the dataset's `prompt` column as it is.

    Template prompts become one user message each, so the instruct model sees them through its chat
    template, as `generate` and `ask` do. A `prompt` column may hold text (used raw, as TRL does) or
    chat messages. Prompts over `max_prompt_length` tokens are shortened in their content, keeping
    the chat framing.
    """
    from ragrpo.retrieval.index import normalize_columns

    if template:
        names = _template_fields(template)
        if any(n not in frame.columns for n in names):
            frame = normalize_columns(frame, {}, source)  # the names `ragrpo index` gives, e.g. movie_plot
        require_columns(frame, names, source)
        texts = [template.format(**row) for row in frame.to_dict("records")]
        # a base model without a chat template (Gemma 3 270M) continues the text as it is
        prompts = [[{"role": "user", "content": t}] for t in texts] if tokenizer.chat_template else texts
    else:
        require_columns(frame, ["prompt"], source)
        prompts = frame["prompt"].tolist()
    shaped = []
    for i, prompt in enumerate(prompts):
        if hasattr(prompt, "tolist"):  # parquet/arrow lists arrive as numpy arrays
            prompt = prompt.tolist()
        if isinstance(prompt, str) and prompt.strip():
            shaped.append(_truncate_content(prompt, tokenizer, max_prompt_length))
            continue
        if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt)):
            raise RagrpoError(f"{source}: prompt {i} is neither text nor a list of chat messages: {str(prompt)[:60]!r}")
        if not tokenizer.chat_template:
            raise RagrpoError(f"{source}: prompt {i} is chat messages, but the model has no chat template; "
                              "give plain-text prompts or a --prompt-template")
        messages = [dict(m) for m in prompt]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if total > max_prompt_length:
            last = messages[-1]
            framing = total - len(tokenizer(last["content"], add_special_tokens=False)["input_ids"])
            last["content"] = _truncate_content(last["content"], tokenizer, max_prompt_length - framing)
        shaped.append(messages)
    return shaped


def _is_held_out(prompt, share: float) -> bool:
    """A stable, order-free choice: the first 4 bytes of the prompt's SHA-1 as a fraction of 2**32."""
    digest = hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def split_prompts(cfg: RunConfig, tokenizer):
    """(training frame, training prompts, held-out prompts) from the run's dataset."""
    frame = read_records(cfg.dataset)
    template = cfg.prompt_template or (DEFAULT_PROMPT_TEMPLATE if cfg.dataset == "builtin:movies" else None)
    prompts = build_prompts(frame, cfg.dataset, template, tokenizer, cfg.max_prompt_length)
    if len({isinstance(p, str) for p in prompts}) > 1:
        raise RagrpoError(f"{cfg.dataset}: the prompt column mixes plain text and chat messages; use one kind")
    held = [_is_held_out(p, cfg.held_out) for p in prompts]
    if all(held):
        raise RagrpoError(f"{cfg.dataset}: every prompt is held out; lower held_out or add rows")
    frame = frame.assign(prompt=prompts)[[not h for h in held]]
    return frame, frame["prompt"].tolist(), [p for p, h in zip(prompts, held) if h]


def build_dataset(cfg: RunConfig, tokenizer):
    """A `datasets.Dataset` of the training prompts, shuffled with the run's seed (kept in file order where the
    GRPO settings say `shuffle_dataset = false`, as TRL's sampler then does).

    The dataset's other columns travel with it: TRL hands them to every reward function as keyword
    arguments (a `context` column for `groundedness`, say).
    """
    from datasets import Dataset

    from ragrpo.tuning.groups import GROUP_COLUMN

    frame, _, _ = split_prompts(cfg, tokenizer)
    if cfg.grpo.get("shuffle_dataset") is not False:
        frame = frame.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)
    if cfg.max_samples and GROUP_COLUMN in frame.columns:  # a mixed-order curriculum: whole questions
        frame = frame[frame[GROUP_COLUMN].isin(frame[GROUP_COLUMN].unique()[:cfg.max_samples])]
    elif cfg.max_samples:
        frame = frame.head(cfg.max_samples)
    columns = {str(c): frame[c].tolist() for c in frame.columns}
    try:
        return Dataset.from_dict(columns)
    except Exception as exc:  # e.g. a column mixing lists and scalars
        raise RagrpoError(f"{cfg.dataset}: cannot be used as a training set: {str(exc).splitlines()[0]}") from None


# ---- logging --------------------------------------------------------------------------------------


def _metrics_logger(path: Path):
    """A TrainerCallback writing every log event as one JSON line (TRL's own keys, plus `step` and the process's
    peak resident memory so far, `peak_rss_gib`)."""
    from transformers import TrainerCallback

    class MetricsLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:  # every rank logs the same gathered metrics; one writes them
                return
            record = {"step": state.global_step, **(logs or {}), "peak_rss_gib": hardware.peak_memory_gib()}
            with path.open("a") as handle:
                handle.write(json.dumps(record, default=float) + "\n")

    return MetricsLogger()


def _progress_bar():
    """A TrainerCallback drawing one progress bar (on stderr) with the latest reward and step time.

    It replaces transformers' own bar, which also prints every log dict to the terminal.
    """
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RewardProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            # disable=None: no bar when stderr is not a terminal (CI logs, captured output).
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="GRPO", unit="step",
                            dynamic_ncols=True, disable=None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is None or not logs or "reward" not in logs:
                return
            self.bar.n = state.global_step
            self.bar.set_postfix(reward=f"{logs['reward']:.2f}", step_s=f"{logs.get('step_time', 0):.1f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.n = state.global_step
                self.close()

        def close(self):
            """Also called when training fails, so that the bar is gone before the error line is printed."""
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return RewardProgress()


# ---- training -------------------------------------------------------------------------------------


def make_trainer(cfg: RunConfig, model, tokenizer, dataset, output: Path, callbacks=(), rollout=None):
    """A GRPOTrainer that trains the run's LoRA adapter on `model`; `callbacks` are added to ragrpo's own;
    `rollout` is TRL's `rollout_func` (the agentic search loop, `tuning.agentic`). The trainer takes `model`
    over, as TRL's does (it injects the LoRA layers in place): with the fast engine it may also be cast to
    bf16 and given the attention implementation `hardware.attention` picks, so a caller that wants the
    untouched model loads another."""
    import torch
    from transformers import PrinterCallback, ProgressCallback
    from trl import GRPOTrainer

    from ragrpo.tuning.groups import GROUP_COLUMN, grouped_trainer_class

    args = grpo_config(cfg, output / "checkpoints")
    reward_funcs, args.reward_weights = resolve_rewards(cfg.rewards, budget=args.max_completion_length)
    trainer_class = GRPOTrainer
    if cfg.fast_engine:
        from ragrpo.generation.engine import fast_trainer_class

        trainer_class = fast_trainer_class()
        if args.bf16:  # the frozen base in bf16: what autocast computed anyway, without a cast per call
            model = model.to(torch.bfloat16)
        model.set_attn_implementation(hardware.attention(torch.bfloat16 if args.bf16 else torch.float32))
    if GROUP_COLUMN in dataset.column_names:  # rows of one question under several passage orders
        trainer_class = grouped_trainer_class(trainer_class)
    try:
        # TRL wraps the model with the LoRA config itself; for a new adapter its KL reference is then the same
        # network with the adapter disabled. (Handing it an already-wrapped model makes it keep a copy of the
        # adapter as a "ref" adapter instead.)
        trainer = trainer_class(
            model=model,
            peft_config=lora_config(cfg),
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[_metrics_logger(output / "metrics.jsonl"), _progress_bar(), *callbacks],
            rollout_func=rollout,
        )
    except ValueError as exc:  # TRL checks batch/generation divisibility and similar settings here
        raise RagrpoError(f"bad GRPO setting: {str(exc).splitlines()[0]}") from None
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


def save_run(trainer, tokenizer, output: Path) -> tuple[Path, Path]:
    """Save the adapter, then merge it into the base weights and save an ordinary model folder."""
    from ragrpo.answer_settings import FILE as SETTINGS_FILE
    from ragrpo.answer_settings import RUN_FILE

    adapter, merged = output / "adapter", output / "merged"
    trainer.model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    model = _float32_policy(trainer.model, adapter).merge_and_unload()
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    if (output / RUN_FILE).exists():  # a from-index run's answer settings travel with its model
        shutil.copy(output / RUN_FILE, merged / SETTINGS_FILE)
    return adapter, merged


def _float32_policy(peft_model, adapter: Path):
    """The trained policy over the float32 base weights. The fast engine trains over a bf16 copy of the base
    (what autocast computes with); the saved merged model is the original base plus the adapter's delta."""
    import torch
    from peft import PeftModel

    from ragrpo.models import load_model

    base = peft_model.get_base_model()
    if base.get_input_embeddings().weight.dtype == torch.float32:
        return peft_model
    float_base, _ = load_model(base.config._name_or_path)
    return PeftModel.from_pretrained(float_base, adapter)


def _write_config(cfg: RunConfig, trainer, work: Path, output: Path) -> None:
    """config.json in `work`, naming the checkpoint folder where it will be once the run is at `output`."""
    grpo = trainer.args.to_dict()
    grpo["output_dir"] = str(output / "checkpoints")
    record = {"run": cfg.to_dict(), "grpo": grpo, "lora": trainer.model.peft_config["default"].to_dict()}
    (work / "config.json").write_text(json.dumps(record, indent=2, default=str))


def write_files(folder: Path, files: dict[str, str]) -> None:
    """Write `files` (relative path -> text) under `folder`, making their folders."""
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def load_run_config(output: str | Path) -> RunConfig:
    """The RunConfig a run folder was started with (its config.json)."""
    path = Path(output) / "config.json"
    try:
        return RunConfig(**json.loads(path.read_text())["run"])
    except FileNotFoundError:
        raise RagrpoError(f"{output} is not a run folder: no config.json") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise RagrpoError(f"{path} is not a ragrpo run configuration: {exc}") from None


def _latest_checkpoint(output: Path) -> Path | None:
    found = sorted((output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return found[-1] if found else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines after `step`: the resumed run logs those steps again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def check_output(output: Path) -> None:
    """A run folder must be a folder: fail before anything loads when it, or a folder above it, is a file."""
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                raise RagrpoError(f"--output {output}: {path} is a file, not a folder; name a folder")
            return


def _staging_folder(output: Path) -> Path:
    """A new, empty folder beside `output` to train into while the old run stays where it is. Under
    `accelerate launch` every rank must name the same one: its name comes from the launch's rendezvous."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if world()[1] > 1:
        staging = output.with_name(f"{output.name}.staging-{os.environ.get('MASTER_PORT', 'ranks')}")
        staging.mkdir(exist_ok=True)
        return staging
    return Path(tempfile.mkdtemp(prefix=f"{output.name}.staging-", dir=output.parent))


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes) as `accelerate launch` or torchrun set them."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _wait_for_ranks() -> None:
    """A barrier across the ranks of a multi-process run (accelerate's; nothing with one process)."""
    if world()[1] > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _swap_in(staging: Path, output: Path) -> None:
    """Put the finished run in `staging` at `output` and delete the run it replaces. Two renames on one
    filesystem: the old run is moved aside first and moved back if the new one cannot take its place."""
    old = output.with_name(f"{output.name}.replaced-{uuid.uuid4().hex[:8]}")
    output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: RunConfig, *, overwrite: bool = False, resume: bool = False, dataset=None,
          files: dict[str, str] | None = None, callbacks=(), rollout=None) -> TrainResult:
    """Run GRPO as `cfg` says and write the run folder.

    `resume=True` continues the run in `cfg.output` from its last checkpoint, with the configuration it
    was started with. A run that fails before its first checkpoint leaves no folder behind; one that
    fails later keeps its checkpoints, so that it can be resumed. `overwrite=True` over an existing run
    trains into a staging folder beside it and swaps it in only once the new run is saved: a run that
    fails leaves the old one as it was (and its own staging folder is removed).

    `dataset` (a `datasets.Dataset`) replaces the one built from `cfg.dataset` on a fresh start, and
    `files` (relative path -> text) are written into the run folder next to config.json; the
    from-index curriculum uses both. `callbacks` (transformers TrainerCallbacks) join the trainer's, and
    `rollout` is TRL's `rollout_func` (an agentic run's search loop; `curriculum.resume` rebuilds it).

    Under `accelerate launch` (or torchrun) every rank runs this: each trains on its share of the
    prompts, and the main process alone writes the run folder (config, metrics, adapter, merged model).

    With `cfg.restart_if` (`tuning.restart`), an attempt whose training reward is still below the rule's
    bound at its step is stopped, and the run starts again from step 0 on the seed plus 1000, at most
    `cfg.restarts` times (1 unless set; 0 only records the check); the run folder records each check. A
    resumed run is never stopped.
    """
    rule = RestartRule.parse(cfg.restart_if, cfg.rewards) if cfg.restart_if and not resume else None
    restarts = 1 if cfg.restarts is None else cfg.restarts
    stopped: list[Stalled] = []
    while True:
        check = rule.callback(stop=len(stopped) < restarts) if rule else None
        try:
            return _train_once(cfg, overwrite=overwrite or bool(stopped), resume=resume, dataset=dataset,
                               files=files, callbacks=callbacks, rollout=rollout, check=check, stopped=stopped)
        except Stalled as stall:
            stopped.append(stall)
            seed = cfg.seed + SEED_STEP
            if world()[0] == 0:
                c = stall.check
                print(f"notice: {c['reward']} averaged {c['mean']:.3f} over steps {c['steps'][0]}-{c['steps'][1]} "
                      f"on seed {c['seed']}, below {c['below']}: training again from step 0 on seed {seed} "
                      f"(restart {len(stopped)} of {restarts})", file=sys.stderr, flush=True)
            cfg = replace(cfg, seed=seed)


def _train_once(cfg: RunConfig, *, overwrite: bool, resume: bool, dataset, files, callbacks, rollout, check,
                stopped: list[Stalled]) -> TrainResult:
    """One attempt of `train`; raises `Stalled` when `check` (a restart rule's callback) stopped it."""
    from ragrpo.models import load_model

    output = Path(cfg.output)
    check_output(output)
    checkpoint = None
    if resume and overwrite:
        raise RagrpoError("--resume continues the run in --output and --overwrite replaces it; pass one of them")
    if resume:
        cfg = load_run_config(output)
        cfg.output = str(output)
        checkpoint = _latest_checkpoint(output)
        if checkpoint is None:
            raise RagrpoError(f"{output} has no checkpoint to resume from; start the run again with --overwrite")
        split = output / "curriculum" / "split.json"
        if rollout is None and split.exists() and json.loads(split.read_text())["source"].get("agentic"):
            raise RagrpoError(f"{output} is an agentic run: resume it with `ragrpo train --resume` or "
                              "`tuning.curriculum.resume`, which bring its search loop back")
    elif output.exists() and any(output.iterdir()) and not overwrite:
        raise RagrpoError(f"output folder {output} is not empty; pass --overwrite, --resume or another --output")
    resolve_rewards(cfg.rewards)  # fail on an unknown reward before loading anything heavy
    grpo_config(cfg, output / "checkpoints")
    lora_config(cfg)
    _wait_for_ranks()  # every rank has checked the folder before the main one writes to it
    main = world()[0] == 0
    model, tokenizer = load_model(cfg.model)
    dataset = build_dataset(cfg, tokenizer) if dataset is None or resume else dataset

    replacing = overwrite and output.exists() and any(output.iterdir())
    created = not output.exists()
    # `work` is where the trainer writes: the run folder itself, or a staging folder that replaces it at the end.
    work = _staging_folder(output) if replacing else output
    work.mkdir(parents=True, exist_ok=True)
    trainer = None
    try:
        callbacks = (*callbacks, check) if check else callbacks
        trainer = make_trainer(cfg, model, tokenizer, dataset, work, callbacks, rollout)
        if checkpoint is None and main:
            _write_config(cfg, trainer, work, output)
            write_files(work, files or {})
        elif main:
            _truncate_metrics(work / "metrics.jsonl", int(checkpoint.name.rsplit("-", 1)[1]))
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        result = {**check.result, "seed": cfg.seed} if check and check.result else None
        if check and check.stopped:
            metrics = work / "metrics.jsonl"
            raise Stalled(result, metrics.read_text() if metrics.exists() else "")
        if main:
            write_files(work, record_files(stopped, result))
            save_run(trainer, tokenizer, work)
            checkpoints = work / "checkpoints"
            if checkpoints.exists() and not any(checkpoints.glob("checkpoint-*")):
                shutil.rmtree(checkpoints)  # TRL creates the folder even when no checkpoint was saved
            if replacing:
                _swap_in(work, output)
        _wait_for_ranks()  # no rank returns before the run folder is whole
    except BaseException:
        for callback in trainer.callback_handler.callbacks if trainer else []:
            getattr(callback, "close", lambda: None)()
        if not main:
            raise
        if replacing:
            shutil.rmtree(work, ignore_errors=True)
        elif (created or overwrite) and _latest_checkpoint(output) is None:
            shutil.rmtree(output, ignore_errors=True)
        raise
    return TrainResult(output, output / "adapter", output / "merged", output / "metrics.jsonl",
                       trainer.state.global_step)
