"""The fast engine samples from the same policy the trainer optimises (ragrpo.generation.engine)."""

import pytest
import torch

from ragrpo.generation.engine import SamplingCopy, fast_trainer_class


@pytest.fixture()
def policy(tiny_causal_lm):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_causal_lm
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules="all-linear",
                        init_lora_weights=False)  # a random B: the adapter changes the outputs from the start
    return get_peft_model(model, config).eval(), tokenizer


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, vocab)


def test_sampling_copy_follows_the_adapter_after_each_sync(policy):
    model, _ = policy
    ids = torch.randint(0, 1000, (3, 9))
    copy = SamplingCopy(model, dtype=torch.float32)
    copy.sync(step=0)
    torch.testing.assert_close(_logits(copy.model, ids), _logits(model, ids), atol=1e-5, rtol=1e-4)
    with model.disable_adapter():
        assert not torch.allclose(_logits(copy.model, ids), _logits(model, ids), atol=1e-3)

    with torch.no_grad():  # an optimizer step on the adapter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    assert not torch.allclose(_logits(copy.model, ids), _logits(model, ids), atol=1e-3), "stale until synced"
    copy.sync(step=1)
    torch.testing.assert_close(_logits(copy.model, ids), _logits(model, ids), atol=1e-5, rtol=1e-4)
    assert copy.synced_step == 1


def test_sampling_copy_generates_what_the_policy_generates(policy):
    from transformers import GenerationConfig

    model, tokenizer = policy
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]
               for text in ("Name a red fruit.", "Describe the sea at night in a few words.")]
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    copy = SamplingCopy(model, dtype=torch.float32)
    copy.sync()
    got = copy.generate(prompts, config, tokenizer.pad_token_id, [tokenizer.eos_token_id])

    expected = []
    for ids in prompts:  # one at a time: no padding in the reference
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), generation_config=config)
        new = out[0, len(ids):].tolist()
        cut = new.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in new else len(new)
        expected.append(new[:cut])
    assert got == expected
    assert all(1 <= len(c) <= 10 for c in got)


def test_sampling_copy_keeps_its_dtype_and_leaves_the_policy_alone(policy):
    model, _ = policy
    before = {n: p.clone() for n, p in model.named_parameters()}
    copy = SamplingCopy(model, dtype=torch.bfloat16)
    copy.sync()
    assert {p.dtype for p in copy.model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any("lora" in n for n, _ in copy.model.named_parameters())


def test_fast_trainer_trains_the_adapter_and_samples_from_the_copy(tiny_causal_lm, tmp_path):
    from datasets import Dataset

    from ragrpo.config import build_run_config
    from ragrpo.tuning.train import make_trainer

    model, tokenizer = tiny_causal_lm
    cfg = build_run_config(engine="fast", num_generations=2, max_completion_length=8, learning_rate=1e-2,
                           output=str(tmp_path), grpo={"per_device_train_batch_size": 4, "max_steps": 2,
                                                       "save_strategy": "no", "bf16": False})
    prompts = [[{"role": "user", "content": f"Name {n} colours."}] for n in ("two", "three", "four", "five")]
    trainer = make_trainer(cfg, model, tokenizer, Dataset.from_dict({"prompt": prompts}), tmp_path)
    assert type(trainer) is fast_trainer_class()
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer._sampler is not None and trainer._sampler.synced_step == 1  # re-synced after step 1
    assert trainer.model.config.use_cache is False  # the Trainer turns the cache off for training ...
    assert trainer._sampler.model.config.use_cache is True  # ... the sampler keeps it: decoding is O(n), not O(n^2)
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in lora.items()), "the adapter learned"
    assert all(torch.equal(params[n], p) for n, p in base.items()), "the base stayed frozen"


@pytest.mark.parametrize("bf16, forced, expected", [(False, None, "sdpa"), (True, None, "eager"),
                                                     (True, "sdpa", "sdpa"), (False, "eager", "eager")])
def test_fast_trainer_trains_with_the_attention_the_hardware_module_picks(tiny_causal_lm, tmp_path, force_hardware,
                                                                          bf16, forced, expected):
    from datasets import Dataset

    from ragrpo.config import build_run_config
    from ragrpo.tuning.train import make_trainer

    force_hardware(ATTENTION=forced, DEVICE="cpu")
    model, tokenizer = tiny_causal_lm
    cfg = build_run_config(engine="fast", num_generations=2, output=str(tmp_path),
                           grpo={"per_device_train_batch_size": 2, "bf16": bf16, "use_cpu": True})
    trainer = make_trainer(cfg, model, tokenizer, Dataset.from_dict({"prompt": ["hi"] * 2}), tmp_path)
    assert trainer.model.config._attn_implementation == expected
    assert trainer.model.get_input_embeddings().weight.dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_eager_and_fused_attention_give_the_training_passes_the_same_log_probabilities(tiny_causal_lm):
    """Which attention the training passes run is a speed choice only. In float32 eager and fused attention
    give the same log-probabilities and adapter gradients. In bf16 both round: eager rounds the scores to bf16
    as transformers' eager layer does, and its gradient stays about as close to float32's as the fused
    kernel's (relative error 0.12 against 0.10 on this model; the bf16 base moves it that far either way)."""
    import contextlib
    import copy

    from peft import LoraConfig, get_peft_model

    from ragrpo.generation.engine import shared_prompt_logps

    model, _ = tiny_causal_lm
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False))
    input_ids, mask, width = _trl_batch()
    keep = mask[:, -width:].bool()

    def passes(model, implementation, autocast=contextlib.nullcontext):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        logps, _, _ = shared_prompt_logps(model, input_ids, mask, width, False, autocast)
        (logps * mask[:, -width:]).sum().backward()
        grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if "lora_" in n])
        return logps[keep].detach().float(), grads

    (eager_logps, eager), (fused_logps, fused) = passes(model, "eager"), passes(model, "sdpa")
    torch.testing.assert_close(eager_logps, fused_logps, atol=1e-5, rtol=1e-5)
    assert fused.norm() > 0 and (eager - fused).norm() / fused.norm() < 1e-5
    # as the fast engine trains where bf16 pays: the frozen base in bf16, the adapter in float32, under autocast
    halved = copy.deepcopy(model)
    for name, parameter in halved.named_parameters():
        if "lora_" not in name:
            parameter.data = parameter.data.bfloat16()
    error = {}
    for name in ("eager", "sdpa"):
        logps, grads = passes(halved, name, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        torch.testing.assert_close(logps, fused_logps, atol=0.05, rtol=0.02)
        error[name] = (grads - fused).norm() / fused.norm()
    assert error["eager"] < max(1.5 * error["sdpa"], 0.01), error


def test_trl_engine_is_plain_grpo_trainer(tiny_causal_lm, tmp_path):
    from datasets import Dataset
    from trl import GRPOTrainer

    from ragrpo.config import build_run_config
    from ragrpo.tuning.train import make_trainer

    model, tokenizer = tiny_causal_lm
    cfg = build_run_config(engine="trl", output=str(tmp_path), grpo={"bf16": False})
    trainer = make_trainer(cfg, model, tokenizer, Dataset.from_dict({"prompt": ["hi"] * 6}), tmp_path)
    assert type(trainer) is GRPOTrainer
    assert build_run_config(preset="seed").fast_engine is False
    assert build_run_config().fast_engine is True


def _trl_batch():
    """Two prompts (different lengths, left-padded) x 3 completions (right-padded), as TRL lays them out."""
    torch.manual_seed(1)
    prompts = [torch.randint(5, 1000, (7,)).tolist(), torch.randint(5, 1000, (4,)).tolist()]
    rows, masks = [], []
    for prompt in prompts:
        for length in (5, 3, 6):
            completion = torch.randint(5, 1000, (length,)).tolist()
            pad_left, pad_right = 7 - len(prompt), 6 - length
            rows.append([0] * pad_left + prompt + completion + [0] * pad_right)
            masks.append([0] * pad_left + [1] * len(prompt) + [1] * length + [0] * pad_right)
    return torch.tensor(rows), torch.tensor(masks), 6  # (6, 13), (6, 13), completion width


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_shared_prompt_logps_equal_the_full_forward_and_its_gradients(tiny_causal_lm, temperature):
    import contextlib

    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from ragrpo.generation.engine import shared_prompt_logps

    model, _ = tiny_causal_lm
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False))
    input_ids, mask, width = _trl_batch()
    adapter = [p for n, p in model.named_parameters() if "lora_" in n]

    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :-width] = -100
    full = model(input_ids=input_ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    expected_logps, expected_entropy = full.log_probs[:, -width:], full.entropy[:, -width:]
    (expected_logps * mask[:, -width:]).sum().backward()
    expected_grads = [p.grad.clone() for p in adapter]
    model.zero_grad()

    keep = mask[:, -width:].bool()
    for max_logits in (2**28, 0):  # the float32 log-softmax, then TRL's tiled head for batches too big to hold
        model.zero_grad()
        logps, entropy, _ = shared_prompt_logps(model, input_ids, mask, width, True, contextlib.nullcontext,
                                                temperature=temperature, max_logits=max_logits)
        (logps * mask[:, -width:]).sum().backward()
        torch.testing.assert_close(logps[keep], expected_logps[keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[keep], expected_entropy[keep], atol=1e-5, rtol=1e-5)
        for grad, expected in zip((p.grad for p in adapter), expected_grads):
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
        with torch.no_grad():  # the reference pass: log-probabilities only
            reference, no_entropy, _ = shared_prompt_logps(model, input_ids, mask, width, False,
                                                           contextlib.nullcontext, temperature=temperature,
                                                           max_logits=max_logits)
        assert no_entropy is None
        torch.testing.assert_close(reference[keep], expected_logps[keep], atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in expected_grads)


def test_shared_prompt_logps_steps_aside_when_no_prompt_repeats(tiny_causal_lm):
    import contextlib

    from ragrpo.generation.engine import shared_prompt_logps

    model, _ = tiny_causal_lm
    input_ids, mask, width = _trl_batch()
    assert shared_prompt_logps(model, input_ids[[0, 3]], mask[[0, 3]], width, False, contextlib.nullcontext) is None


def _greedy(max_new_tokens=10, **settings):
    from transformers import GenerationConfig

    return GenerationConfig(**{"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": 0, "eos_token_id": 2,
                               **settings})


def _generate_one_by_one(model, prompts, config, eos=2):
    """transformers' generate, one prompt at a time (no padding), cut after the first end of sequence."""
    out = []
    for ids in prompts:
        with torch.no_grad():
            new = model.generate(input_ids=torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
        out.append(new[: new.index(eos) + 1] if eos in new else new)
    return out


def test_decode_loop_is_greedy_generate_with_repeats_padding_and_repetition_penalty(policy):
    model, _ = policy
    copy = SamplingCopy(model, dtype=torch.float32)
    copy.sync()
    torch.manual_seed(3)
    short, long = torch.randint(5, 1000, (4,)).tolist(), torch.randint(5, 1000, (9,)).tolist()
    prompts = [long, short, long, short, short]  # repeated and of two lengths: deduplicated, left-padded
    for config in (_greedy(), _greedy(repetition_penalty=1.5)):
        assert copy._decode(prompts, config, [2]) == _generate_one_by_one(copy.model, prompts, config)


def test_decode_loop_honours_min_new_tokens_and_top_k(policy):
    from transformers import GenerationConfig

    model, _ = policy
    copy = SamplingCopy(model, dtype=torch.float32)
    copy.sync()
    vocab = copy.model.config.vocab_size
    torch.manual_seed(0)
    prompt = torch.randint(5, 1000, (6,)).tolist()
    # every token but the last ends a sequence: until min_new_tokens only the last one may be drawn
    ends = list(range(vocab - 1))
    config = GenerationConfig(max_new_tokens=9, min_new_tokens=4, do_sample=True, top_k=0, pad_token_id=0)
    for row in copy._decode([prompt] * 3, config, ends):
        assert row[:4] == [vocab - 1] * 4 and len(row) == 5 and row[4] in ends
    # top_k=1 sampling is greedy decoding
    sampled = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7, pad_token_id=0)
    assert copy._decode([prompt] * 2, sampled, [2]) == copy._decode([prompt] * 2, _greedy(8), [2])


def test_settings_beyond_the_loop_fall_back_to_generate():
    from transformers import GenerationConfig

    from ragrpo.generation.engine import _loop_settings

    defaults = GenerationConfig()
    settings = _loop_settings(GenerationConfig(max_new_tokens=5, do_sample=True), defaults)
    assert settings["top_k"] == 50 and settings["temperature"] == 1.0  # transformers' defaults
    assert _loop_settings(GenerationConfig(max_new_tokens=5, top_k=7), GenerationConfig(top_k=3))["top_k"] == 7
    assert _loop_settings(GenerationConfig(max_new_tokens=5), GenerationConfig(top_k=3))["top_k"] == 3
    for beyond in ({"num_beams": 2}, {"no_repeat_ngram_size": 2}, {"typical_p": 0.5}):
        assert _loop_settings(GenerationConfig(max_new_tokens=5, **beyond), defaults) is None


def test_inverse_cdf_sampling_draws_from_the_distribution():
    from ragrpo.generation.decode import Row, Sampling, choose

    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    rows = [Row([1], Sampling(max_new_tokens=1), [], "cpu") for _ in range(20000)]
    draws = choose(probs.log().expand(20000, -1), rows, torch.zeros((20000, 2), dtype=torch.long))
    counts = torch.bincount(draws, minlength=6).float() / 20000
    assert counts[[0, 2, 5]].sum() == 0, "a zero-probability token is never drawn"
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


def _loop_tracks_the_forward(copy, prompt, continuation, max_gap, mean_gap, top_gap):
    """Along `continuation`, the loop's per-step logits stay within `max_gap` (largest) and `mean_gap` (mean) of
    transformers' full forward, and the loop's pick is within `top_gap` of the forward's best logit."""
    from ragrpo.generation.decode import Engine, Row, Sampling
    from ragrpo.generation.engine import _projections

    sequence = torch.tensor([prompt + continuation])
    projections = copy.packed or _projections(copy.model, copy.fused, "plain")
    engine = Engine(copy.model, projections, slots=1, capacity=sequence.size(1) + 1)
    with torch.no_grad():
        expected = copy.model(input_ids=sequence).logits[0, len(prompt):].float()  # (new, vocab)
        engine.add([Row(prompt, Sampling(max_new_tokens=len(continuation), do_sample=False), [], "cpu")])
        for n, token in enumerate(continuation[:-1]):
            column = len(prompt) + n
            logits = engine._step(torch.tensor([token]), torch.tensor([column]))[0]
            difference = (logits - expected[n]).abs()
            assert difference.max() < max_gap and difference.mean() < mean_gap
            assert expected[n, logits.argmax()] >= expected[n].max() - top_gap  # the loop's pick is (near) the top


# (dtype, how the loop holds the weights) and the variables that force it
LOOP_WEIGHTS = {("float32", "onednn"): {"PACK": "1", "FP16": "0"}, ("float32", "fp16"): {"FP16": "1"},
                ("float32", "plain"): {"PACK": "0", "FP16": "0"}, ("bfloat16", "onednn"): {"PACK": "1"},
                ("bfloat16", "plain"): {"PACK": "0"}}


@pytest.mark.parametrize("dtype_name, kind", list(LOOP_WEIGHTS), ids=["-".join(k) for k in LOOP_WEIGHTS])
def test_decode_loop_follows_the_packaged_model_token_by_token(base_model_dir, force_hardware, dtype_name, kind):
    """On the real model the loop's logits track transformers' forward along a greedy continuation, however its
    weights are held, in float32 and bf16. (Tokens are not compared in bf16: its logits tie exactly, e.g. 22.375
    for two tokens, and either may win.)"""
    from conftest import needs_fp16, needs_packing
    from peft import LoraConfig, get_peft_model

    from ragrpo.models import load_model

    dtype = getattr(torch, dtype_name)
    if kind == "onednn":
        needs_packing(dtype)
    if kind == "fp16":
        needs_fp16()
    force_hardware(**LOOP_WEIGHTS[dtype_name, kind])
    model, tokenizer = load_model(None)
    policy = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, target_modules="all-linear"))
    copy = SamplingCopy(policy, dtype=dtype)
    copy.sync()
    assert copy.packed is None if kind == "plain" else {p.kind for layer in copy.packed[:-1] for p in layer} == {kind}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a red fruit and say why it is red."}],
                                           add_generation_prompt=True)["input_ids"]
    config = _greedy(12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    continuation = _generate_one_by_one(copy.model, [prompt], config, tokenizer.eos_token_id)[0]
    if dtype == torch.bfloat16 and kind == "onednn":
        # transformers' own cached decode differs from its full forward by up to 0.47 (mean 0.20) here; the loop
        # by up to 0.78 (mean 0.41) on an AMX CPU, whose single-row bf16 steps sit further from float32
        _loop_tracks_the_forward(copy, prompt, continuation, 1.0, 0.5, 0.25)
    elif dtype == torch.bfloat16:
        # plain bf16 matmuls: where bf16 is emulated (ISA capped to AVX2) the loop differs by up to 1.47 (mean
        # 0.42) at one step, and transformers' own cached decode by up to 0.63; the picks stay the top ones
        _loop_tracks_the_forward(copy, prompt, continuation, 2.0, 0.5, 0.25)
    elif kind == "fp16":
        # each weight rounded to 11 significant bits: measured up to 0.022 apart (mean 0.0045), the same picks
        _loop_tracks_the_forward(copy, prompt, continuation, 0.1, 0.01, 0.0)
    else:
        _loop_tracks_the_forward(copy, prompt, continuation, 2e-3, 2e-4, 0.0)


def test_the_fp16_loop_samples_from_the_float32_distribution(base_model_dir, force_hardware):
    """The check for sampling from fp16 weights: along sampled continuations of real prompts, the KL divergence
    from the float32 model's next-token distribution to the fp16 loop's stays near zero (measured: mean 2.4e-6,
    largest 2.4e-5 over 8 movie prompts; bf16 weights and activations give 1.3e-3 on the same tokens)."""
    from conftest import needs_fp16

    from ragrpo.generation.decode import Engine, Row, Sampling
    from ragrpo.models import load_model

    needs_fp16()
    force_hardware(FP16="1")
    model, tokenizer = load_model(None)
    copy = SamplingCopy(model, dtype=torch.float32)
    copy.sync()
    divergences = []
    for text in ("Summarize this movie plot in one sentence:\nA retired detective is pulled back for one last case.",
                 "Name a red fruit and say why it is red."):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               return_dict=False)
        torch.manual_seed(0)
        with torch.no_grad():
            sampled = model.generate(input_ids=torch.tensor([prompt]), do_sample=True, max_new_tokens=24,
                                     min_new_tokens=24)[0, len(prompt):].tolist()
            expected = model(input_ids=torch.tensor([prompt + sampled])).logits[0, len(prompt) - 1:-1].float()
            engine = Engine(copy.model, copy.packed, slots=1, capacity=len(prompt) + 25)
            engine.add([Row(prompt, Sampling(max_new_tokens=24), [], "cpu")])
            logits = [engine.pending[0]]
            for n, token in enumerate(sampled[:-1]):
                logits.append(engine._step(torch.tensor([token]), torch.tensor([len(prompt) + n]))[0])
        reference, got = expected.log_softmax(-1), torch.stack(logits).log_softmax(-1)  # (24, vocab)
        divergences.append((reference.exp() * (reference - got)).sum(-1))
    divergence = torch.cat(divergences)
    assert divergence.mean() < 1e-4 and divergence.max() < 1e-3


@pytest.mark.parametrize("kind", ["fp16", "onednn"])
def test_sync_packs_an_lm_head_without_an_adapter_once(tiny_causal_lm, force_hardware, kind):
    """The head is packed at the first sync and kept (nothing trains it); with an adapter on it, every sync packs
    the merged head afresh, and the loop's head computes with the new weights."""
    import copy as copying

    from conftest import needs_fp16, needs_packing
    from peft import LoraConfig, get_peft_model

    from ragrpo.generation.decode import project

    if kind == "fp16":
        needs_fp16()
    else:
        needs_packing(torch.float32)
    force_hardware(**{"fp16": {"FP16": "1"}, "onednn": {"FP16": "0", "PACK": "1"}}[kind])
    model, _ = tiny_causal_lm
    plain = SamplingCopy(get_peft_model(copying.deepcopy(model), LoraConfig(r=4, target_modules="all-linear")))
    plain.sync(0)
    head = plain.packed[-1]
    plain.sync(1)
    assert plain.packed[-1] is head and plain.packed[0][0] is not plain.packed[-1]

    policy = get_peft_model(copying.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    adapted = SamplingCopy(policy)
    adapted.sync(0)
    before = adapted.packed[-1]
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lm_head" in name and "lora_B" in name:
                parameter.normal_(std=0.5)
    adapted.sync(1)
    assert adapted.packed[-1] is not before
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, adapted.model.lm_head.weight)
        torch.testing.assert_close(project(x, adapted.packed[-1]), expected, atol=2e-3, rtol=2e-3)
        assert (project(x, before) - expected).abs().max() > 0.1


def test_fresh_projections_are_kept_until_a_weight_changes(tiny_causal_lm, force_hardware):
    """`ask` packs a model's weights once, not per answer; a changed weight, or another decision, packs afresh."""
    from conftest import needs_packing

    from ragrpo.generation.decode import project
    from ragrpo.generation.engine import fresh_projections

    model, _ = tiny_causal_lm
    force_hardware(PACK="0", FP16="0")
    first = fresh_projections(model)
    assert fresh_projections(model) is first
    down = model.model.layers[1].mlp.down_proj.weight
    hidden = torch.randn(2, down.size(1))
    with torch.no_grad():
        down.mul_(2)  # in place, as training or loading weights would
        changed = fresh_projections(model)
        assert changed is not first
        torch.testing.assert_close(project(hidden, changed[1][3]), torch.nn.functional.linear(hidden, down))
    needs_packing(torch.float32)
    force_hardware(PACK="1", FP16="0")
    assert fresh_projections(model) is not changed and fresh_projections(model)[0][0].kind == "onednn"


def test_generate_takes_the_loop_only_with_packed_weights(policy, force_hardware, monkeypatch):
    """RAGRPO_PACK=1 (and no fp16): `generate` decodes with the packed float32 loop; neither packing: with
    transformers' `generate`. Both give what the policy's own greedy `generate` gives."""
    from conftest import needs_packing

    needs_packing(torch.float32)
    model, _ = policy
    torch.manual_seed(5)
    prompts = [torch.randint(5, 1000, (n,)).tolist() for n in (6, 3, 6)]
    expected = _generate_one_by_one(model, prompts, _greedy())
    loops = []
    decode = SamplingCopy._decode
    monkeypatch.setattr(SamplingCopy, "_decode", lambda self, *a: loops.append(1) or decode(self, *a))
    for pack, looped in (("1", True), ("0", False)):
        force_hardware(PACK=pack, FP16="0")
        loops.clear()
        copy = SamplingCopy(model, dtype=torch.float32)
        copy.sync()
        assert copy.generate(prompts, _greedy(), 0, [2]) == expected
        assert bool(loops) is looped and (copy.packed is not None) is looped


def _rounded_to_fp16(model):
    """A copy of `model` whose linear weights (not embeddings or norms) are rounded to fp16 and back."""
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.half().float())
    return rounded


def test_the_fp16_loop_decodes_what_generate_decodes_on_fp16_rounded_weights(policy, force_hardware, monkeypatch):
    """RAGRPO_FP16=1: `generate` decodes with the loop on fp16 weights (float32 activations and sums), and gives
    the tokens transformers' own greedy `generate` gives on the merged weights rounded to fp16."""
    from conftest import needs_fp16

    needs_fp16()
    model, _ = policy
    torch.manual_seed(5)
    prompts = [torch.randint(5, 1000, (n,)).tolist() for n in (6, 3, 6)]
    loops = []
    decode = SamplingCopy._decode
    monkeypatch.setattr(SamplingCopy, "_decode", lambda self, *a: loops.append(1) or decode(self, *a))
    force_hardware(PACK="0", FP16="1")
    copy = SamplingCopy(model, dtype=torch.float32)
    copy.sync()
    assert {p.kind for p in copy.packed[-1:] + [p for layer in copy.packed[:-1] for p in layer]} == {"fp16"}
    expected = _generate_one_by_one(_rounded_to_fp16(copy.model), prompts, _greedy())
    assert copy.generate(prompts, _greedy(), 0, [2]) == expected and loops


def test_evaluation_samples_a_float32_model_on_fp16_weights_and_says_so(tiny_causal_lm, force_hardware):
    from conftest import needs_fp16

    from ragrpo.generation.engine import evaluation_sampler, evaluation_sampler_name

    needs_fp16()
    model, _ = tiny_causal_lm
    force_hardware(BF16="0", PACK="0", FP16="1")
    sampler = evaluation_sampler(model)
    assert evaluation_sampler_name(model.config) == "decode loop, float32 with fp16 weights"
    torch.manual_seed(4)
    prompts = [torch.randint(5, 1000, (6,)).tolist(), torch.randint(5, 1000, (3,)).tolist()]
    expected = _generate_one_by_one(_rounded_to_fp16(model), prompts, _greedy())
    assert sampler.generate(prompts, _greedy(), 0, [2]) == expected
    force_hardware(FP16="0")
    assert evaluation_sampler_name(model.config) == "generate"  # neither fp16 nor oneDNN packing: generate


def test_a_plain_model_is_sampled_as_it_is(tiny_causal_lm, force_hardware):
    """Evaluation samples base and merged models (no adapter) through the same copy and decode loop: in bf16
    where bf16 pays and oneDNN packs it, else in float32."""
    from conftest import needs_packing

    from ragrpo.generation.engine import evaluation_sampler

    model, _ = tiny_causal_lm
    force_hardware(FP16="0")  # float32 weights: the loop's tokens are generate's (fp16's are checked above)
    copy = SamplingCopy(model, dtype=torch.float32)
    copy.sync()
    assert copy.lora_layers == {}
    ids = torch.randint(0, 1000, (2, 7))
    torch.testing.assert_close(_logits(copy.model, ids), _logits(model, ids))
    prompts = [torch.randint(5, 1000, (6,)).tolist(), torch.randint(5, 1000, (3,)).tolist()]
    assert copy._decode(prompts, _greedy(), [2]) == _generate_one_by_one(model, prompts, _greedy())

    force_hardware(BF16="1", PACK="0")
    assert evaluation_sampler(model) is None  # no packed weights: generate on the model as it is
    force_hardware(BF16="0", PACK="1")
    sampler = evaluation_sampler(model)  # float32 packs wherever torch has oneDNN
    assert sampler.packed is not None and {p.dtype for p in sampler.model.parameters()} == {torch.float32}
    assert sampler.generate(prompts, _greedy(), 0, [2]) == _generate_one_by_one(model, prompts, _greedy())
    needs_packing(torch.bfloat16)
    force_hardware(BF16="1", PACK="1")
    sampler = evaluation_sampler(model)
    assert {p.dtype for p in sampler.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}, "the evaluated model is left alone"
