"""The loss GRPOTrainer optimises is the GRPO objective, checked against the formula on a tiny model.

For G completions of one prompt with total rewards r_1..r_G:
    A_i   = (r_i - mean(r)) / (std(r) + 1e-4)                       group z-score advantage
    rho   = exp(logp_theta - logp_old)                              per-token policy ratio
    L_tok = -min(rho * A_i, clip(rho, 1 - eps, 1 + eps) * A_i)
            + beta * (exp(logp_ref - logp_theta) - (logp_ref - logp_theta) - 1)   k3 KL estimator
    loss  = mean over sequences of (mean over that sequence's completion tokens of L_tok)   loss_type "grpo"
The reference policy is the same network with its LoRA adapter switched off. Both engines are checked:
plain TRL and ragrpo's fast engine, which samples from a merged copy but computes every term on the policy.
"""

import pytest
import torch

from ragrpo.config import build_run_config
from ragrpo.rewards.registry import resolve_rewards
from ragrpo.tuning.train import make_trainer

G, EPSILON, BETA = 4, 0.05, 0.2
REWARDS = ["length", "token_diversity=0.5"]


def _logps(model, input_ids, attention_mask, n_completion):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, vocab)
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
    targets = input_ids[:, 1:]
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T - 1)
    return token_logps[:, -n_completion:]  # (B, C)


@pytest.fixture(params=["fast", "trl"])
def trainer_and_batch(request, tiny_causal_lm, tmp_path):
    from datasets import Dataset

    model, tokenizer = tiny_causal_lm
    prompts = [[{"role": "user", "content": "Name a red fruit."}], [{"role": "user", "content": "Name a big cat."}]]
    lengths = {len(tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"]) for p in prompts}
    assert len(lengths) == 1, "equal prompt lengths keep the micro example free of padding"
    cfg = build_run_config(
        engine=request.param, rewards=REWARDS, num_generations=G, max_completion_length=12, beta=BETA, epsilon=EPSILON,
        output=str(tmp_path), grpo={"per_device_train_batch_size": 2 * G, "num_iterations": 2, "loss_type": "grpo",
                                    "temperature": 1.0, "max_steps": 1, "save_strategy": "no",
                                    "bf16": False},  # exact float32 arithmetic for the comparison
        lora={"init_lora_weights": False},  # a random B, so that policy and reference differ from the start
    )
    torch.manual_seed(0)
    trainer = make_trainer(cfg, model, tokenizer, Dataset.from_dict({"prompt": prompts}), tmp_path)
    batch = [{"prompt": p} for p in prompts for _ in range(G)]
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(batch)
    return trainer, tokenizer, inputs


def test_advantages_are_group_z_scores(trainer_and_batch):
    _, tokenizer, inputs = trainer_and_batch
    texts = tokenizer.batch_decode(inputs["completion_ids"] * inputs["completion_mask"], skip_special_tokens=True)
    funcs, weights = resolve_rewards(REWARDS)
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    rewards = sum(w * torch.tensor(f(prompts=[None] * len(texts), completions=completions), dtype=torch.float32)
                  for f, w in zip(funcs, weights))
    grouped = rewards.view(-1, G)  # (prompts, G)
    expected = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    torch.testing.assert_close(inputs["advantages"].view(-1), expected, atol=1e-4, rtol=1e-4)
    assert expected.abs().sum() > 0


def test_loss_is_the_clipped_objective_with_k3_kl(trainer_and_batch):
    trainer, _, inputs = trainer_and_batch
    model = trainer.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    n = inputs["completion_ids"].size(1)
    mask = inputs["completion_mask"].float()  # (B, C)

    with torch.no_grad():
        old = _logps(model, ids, attention, n)
        with model.disable_adapter():
            ref = _logps(model, ids, attention, n)
    torch.testing.assert_close(inputs["old_per_token_logps"], old, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inputs["ref_per_token_logps"], ref, atol=1e-4, rtol=1e-4)

    with torch.no_grad():  # move the policy away from the old one, as a first optimiser step would
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))

    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
    loss = trainer.compute_loss(model, inputs)
    logp = _logps(model, ids, attention, n)
    ratio = torch.exp(logp - old)
    advantages = inputs["advantages"].unsqueeze(1)  # (B, 1)
    clipped = torch.clamp(ratio, 1 - EPSILON, 1 + EPSILON)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = -torch.min(ratio * advantages, clipped * advantages) + BETA * kl
    expected = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()

    assert ((ratio - clipped).abs() > 1e-3)[mask.bool()].any(), "the micro example must exercise the clip"
    assert (kl * mask).sum() > 0
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
