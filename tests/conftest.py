"""Shared fixtures. Unit tests use tiny models built in memory; integration tests use the real packaged
SmolLM2 and MiniLM weights, loaded once per session. Nothing here reaches the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

PARAPHRASES = {
    # query (a paraphrase written for the test) -> the corpus title it describes
    "A fake explorer invents an arctic island and spends the money of the people funding his voyage":
        "The Cartographer's Lie",
    "An elderly bee keeper helps a police sergeant hunt a poisoner, but he poisoned the honey himself":
        "The Beekeeper's Confession",
    "A girl finishes her injured father's crystal chandelier in Venice and her hidden signature is found":
        "The Glassblower's Debt",
    "The commander of an asteroid mine learns from a restored recording that she sabotaged the airlocks":
        "Saboteur of Ceres Station",
}


@pytest.fixture(scope="session")
def base_model_dir():
    from ragrpo.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def base_model(base_model_dir):
    from ragrpo.models import load_model

    return load_model(str(base_model_dir))


@pytest.fixture(scope="session")
def movie_db(tmp_path_factory):
    """builtin:movies indexed once into a LanceDB folder; returns the folder."""
    from ragrpo.retrieval.index import index

    db = tmp_path_factory.mktemp("lancedb")
    index("builtin:movies", "movies", db)
    return db


def kill_at_checkpoint(command: list, checkpoint, env: dict, timeout: float = 300) -> None:
    """Start `command` (a training run), SIGKILL it once `checkpoint`'s trainer state is on disk, and check
    that it had not finished by then."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not (checkpoint / "trainer_state.json").exists():
        assert process.poll() is None, f"the run ended before {checkpoint.name}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (checkpoint.parent.parent / "merged").exists(), "the run finished before it was killed"


def tiny_llama(base_model_dir, max_position_embeddings: int = 1024):
    """A 2-layer Llama built from a config in memory (seeded), with the real tokenizer (for the vocabulary)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config), tokenizer


@pytest.fixture()
def tiny_causal_lm(base_model_dir):
    """A 2-layer Llama built from a config in memory, with the real tokenizer (for the vocabulary)."""
    return tiny_llama(base_model_dir)


TINY_RUN = {
    # 2 optimizer steps, 2 prompts x G=2 completions of at most 16 tokens each: seconds on a CPU.
    "max_steps": 2,
    "num_generations": 2,
    "max_completion_length": 16,
    "learning_rate": 1e-3,
    "max_samples": 8,
    "grpo": {"per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no"},
}


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_causal_lm):
    """The tiny in-memory model and its tokenizer saved as a model folder, `tmp_path / "tiny-model"`."""
    model, tokenizer = tiny_causal_lm
    model.save_pretrained(tmp_path / "tiny-model")
    tokenizer.save_pretrained(tmp_path / "tiny-model")
    return tmp_path / "tiny-model"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, base_model_dir):
    """A real 2-step GRPO run of the packaged model on builtin:movies; returns its TrainResult."""
    from ragrpo.config import build_run_config
    from ragrpo.tuning.train import train

    output = tmp_path_factory.mktemp("runs") / "tiny"
    return train(build_run_config(output=str(output), **TINY_RUN))


@pytest.fixture()
def force_hardware(monkeypatch):
    """Set RAGRPO_* hardware variables for one test: `force_hardware(BF16="0", PACK="1")`. The decisions are
    taken afresh after each change and again after the test."""
    from ragrpo import hardware

    def force(**values):
        for name, value in values.items():
            if value is None:
                monkeypatch.delenv(f"RAGRPO_{name}", raising=False)
            else:
                monkeypatch.setenv(f"RAGRPO_{name}", value)
        hardware.reset()

    yield force
    monkeypatch.undo()
    hardware.reset()


def needs_packing(dtype):
    """Skip where oneDNN physically cannot pack weights of `dtype` (bf16 on a CPU without AVX512-BF16/AMX)."""
    from ragrpo import hardware

    if not hardware.can_pack(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU (bf16 needs AVX512-BF16, AMX or "
                    f"AVX-NE-CONVERT); the plain path is tested instead")


def needs_fp16():
    """Skip where torch has no fbgemm fp16 GEMM (it needs an x86 CPU with AVX2)."""
    from ragrpo import hardware

    if not hardware.can_fp16():
        pytest.skip("no fbgemm fp16 GEMM here (x86 CPUs with AVX2 only); the float32 paths are tested instead")


def scripted_searcher(base_model_dir, folder, query: str = " Thames ferryman ledger", answer: str = " Inspector Hale [1]."):
    """A tiny Llama, built in memory and saved to `folder`, that greedily writes `query` and a newline after any
    agentic prompt (which ends with `<search>`), and `answer` and its end of turn after any search results.

    Attention and MLP outputs are zero, so each position's hidden state is its own token's embedding and the
    model is a bigram table: the output head maps each token of the script to the next. Its behaviour is fixed
    by construction, not learned, so tests of the search loop, `ask --agentic`, `serve` and `eval --agentic`
    know what it will search for on any CPU."""
    import itertools

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ragrpo.generation.agentic import agentic_prompt_ids
    from ragrpo.prompts import SEARCH_CLOSE, render_information

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    opened = agentic_prompt_ids(tokenizer, [{"role": "user", "content": "a question"}])[-1]  # the prompt's last
    results = encode(SEARCH_CLOSE + render_information([], 1, note="results"))[-1]  # the inserted block's last
    first = [opened, *encode(query + "\n")]
    second = [results, *encode(answer), tokenizer.eos_token_id]
    pairs = list(itertools.pairwise(first)) + list(itertools.pairwise(second))
    assert len({a for a, _ in pairs}) == len(pairs), "each token of the script needs one successor"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.mul_(0.01)
        for a, b in pairs:
            e = embed[a] / embed[a].pow(2).mean().sqrt()
            head[b] += 50.0 * e / e.norm()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def searcher_dir(tmp_path_factory, base_model_dir):
    """`scripted_searcher` saved once per session: it searches " Thames ferryman ledger" and answers
    " Inspector Hale [1]."."""
    return scripted_searcher(base_model_dir, tmp_path_factory.mktemp("searcher"))


def openmp_team(work):
    """In a fresh thread with 2 intra-op threads: the thread ids its first parallel op started (its OpenMP team's
    workers), what `work()` returned when run next in the same thread, and which of those workers are still alive."""
    import os
    import threading
    import time

    import torch

    found = {}

    def run():
        torch.set_num_threads(2)
        before = set(os.listdir("/proc/self/task"))
        torch.ones(512, 512) @ torch.ones(512, 512)
        found["team"] = set(os.listdir("/proc/self/task")) - before
        found["returned"] = work()
        deadline = time.monotonic() + 2  # an ended worker leaves the task list a moment after the call returns
        while (alive := found["team"] & set(os.listdir("/proc/self/task"))) and time.monotonic() < deadline:
            time.sleep(0.01)
        found["alive"] = alive

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return found


def needs_openmp_release():
    from pathlib import Path

    from ragrpo import hardware

    if not Path("/proc/self/task").is_dir() or not hardware._openmp_runtimes():
        pytest.skip("no /proc or no OpenMP runtime with omp_pause_resource_all: nothing to release")

