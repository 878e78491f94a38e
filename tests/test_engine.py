"""The fast engine samples from the same policy the trainer optimises (ragrpo.engine)."""

import pytest
import torch

from ragrpo.engine import SamplingCopy, fast_trainer_class


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
    from ragrpo.train import make_trainer

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


def test_trl_engine_is_plain_grpo_trainer(tiny_causal_lm, tmp_path):
    from datasets import Dataset
    from trl import GRPOTrainer

    from ragrpo.config import build_run_config
    from ragrpo.train import make_trainer

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


def test_shared_prompt_logps_equal_the_full_forward_and_its_gradients(tiny_causal_lm):
    import contextlib

    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from ragrpo.engine import shared_prompt_logps

    model, _ = tiny_causal_lm
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
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

    logps, entropy, _ = shared_prompt_logps(model, input_ids, mask, width, True, contextlib.nullcontext,
                                           temperature=0.7)
    (logps * mask[:, -width:]).sum().backward()
    keep = mask[:, -width:].bool()
    torch.testing.assert_close(logps[keep], expected_logps[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[keep], expected_entropy[keep], atol=1e-5, rtol=1e-5)
    for grad, expected in zip((p.grad for p in adapter), expected_grads):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in expected_grads)


def test_shared_prompt_logps_steps_aside_when_no_prompt_repeats(tiny_causal_lm):
    import contextlib

    from ragrpo.engine import shared_prompt_logps

    model, _ = tiny_causal_lm
    input_ids, mask, width = _trl_batch()
    assert shared_prompt_logps(model, input_ids[[0, 3]], mask[[0, 3]], width, False, contextlib.nullcontext) is None
