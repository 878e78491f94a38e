"""How a GRPO step is computed fast, without changing what it optimises.

A plain TRL step on a small model spends most of its time sampling: `generate` runs the LoRA-wrapped
policy token by token, and every decode step pays for the adapter's extra matmuls, the float32 -> bf16
weight casts that autocast makes on every call, and the key/value cache growing by concatenation. Two
changes remove those costs:

1. The frozen base weights are kept in bf16 (on hardware with fast bf16). Under autocast the base matmuls
   already ran on bf16-rounded weights, so storing them that way computes the same thing and skips the
   per-call casts. The LoRA matrices stay float32 and are what the optimizer updates.
2. Sampling runs on a `SamplingCopy`: an ordinary (un-wrapped) model whose linear weights are
   `W + scaling * B @ A`, refreshed from the adapter once per optimizer step, decoding with a static
   key/value cache. The training weights are never merged in place, so they cannot drift by rounding.

3. The log-probabilities of a group are computed with its prompt run once. All G completions of a prompt
   share it, so the trainer's forward (policy, reference and backward) runs the prompt once, repeats its
   key/value cache G times, and runs only the completions over it: about half the tokens for a 165-token
   prompt and 128-token completions. Gradients flow back through the repeated cache into the one prompt
   pass, so they equal those of the full batch.

The objective is unchanged: the old-policy and reference log-probabilities, the advantages and the loss
are all computed by the trainer on the LoRA-wrapped model, exactly as in plain TRL. What changes is only
the numerics of the sampler (merged bf16 weights instead of base + adapter in bf16 autocast): the same
policy up to rounding, as with TRL's vLLM sampler.
"""

from __future__ import annotations

import copy
import functools


class SamplingCopy:
    """An ordinary model holding the policy's merged weights, used only to sample completions."""

    def __init__(self, peft_model, dtype=None):
        """`dtype`: the sampling weights' dtype; by default that of the policy's frozen base weights."""
        import torch
        from transformers import AutoModelForCausalLM

        base = peft_model.get_base_model()
        self.dtype = dtype or base.get_input_embeddings().weight.dtype
        # transformers' Trainer sets `use_cache = False` on the training model's config; sampling needs the cache
        config = copy.deepcopy(base.config)
        config.use_cache = True
        with torch.device(base.device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        # every weight except the adapters', under the plain model's names
        self.model.load_state_dict(_base_state_dict(peft_model), strict=False)
        self.model.eval().requires_grad_(False)
        self.lora_layers = _lora_layers(peft_model)
        targets = dict(self.model.named_modules())
        self.targets = {name: targets[name] for name in self.lora_layers}
        self.synced_step = None

    def sync(self, step: int | None = None) -> None:
        """Copy `W + scaling * B @ A` of every adapted layer into the sampling model."""
        import torch

        with torch.no_grad():
            for name, layer in self.lora_layers.items():
                merged = layer.base_layer.weight.float() + layer.get_delta_weight("default").float()
                self.targets[name].weight.copy_(merged.to(self.dtype))
        self.synced_step = step

    def generate(self, prompt_ids: list[list[int]], generation_config, pad_token_id: int,
                 eos_token_ids: list[int]) -> list[list[int]]:
        """Sample one completion per prompt (token ids, cut after the first end-of-sequence token)."""
        import torch

        device = self.model.device
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):  # left padding: every row continues from the right edge
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                generation_config=generation_config, cache_implementation="static", use_cache=True,
            )  # (B, width + new)
        completions = []
        for row in output[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in eos_token_ids), None)
            completions.append(row if end is None else row[: end + 1])
        return completions


def _lora_layers(peft_model) -> dict:
    """The adapted layers by their name in the plain model ('model.layers.0.self_attn.q_proj', ...)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and hasattr(module, "base_layer")}


def _base_state_dict(peft_model) -> dict:
    state = {}
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep: int, compute_entropy: bool, autocast):
    """Per-token log-probabilities (and entropies) of the completions, as TRL's forward computes them, with each
    distinct prompt run once. Returns None when no prompt repeats (nothing to share).

    `input_ids` is TRL's batch: left-padded prompts then right-padded completions, (B, P + C), with C =
    `logits_to_keep`. The prompt pass covers the first P - 1 positions of each distinct prompt; the second
    pass runs the last prompt token and the completions, (B, C + 1), over the repeated cache. Positions are
    the same as in one full pass (`cache_position` counts on from the cache), so each row is computed from
    exactly the inputs it would have seen.
    """
    import torch

    width = input_ids.size(1) - logits_to_keep  # P
    if width < 2:
        return None
    prompts = torch.cat([input_ids[:, : width - 1], attention_mask[:, : width - 1]], dim=1)
    unique, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    if unique.size(0) == input_ids.size(0):
        return None
    with autocast():
        prefix = model(input_ids=unique[:, : width - 1], attention_mask=unique[:, width - 1:], use_cache=True,
                       logits_to_keep=1)
    cache = prefix.past_key_values
    cache.reorder_cache(inverse)  # (U, heads, P - 1, d) -> (B, heads, P - 1, d), differentiable
    tail = input_ids[:, width - 1:]  # (B, C + 1)
    labels = tail.masked_fill(attention_mask[:, width - 1:] == 0, -100)
    labels[:, 0] = -100  # the last prompt token is not scored
    with autocast():
        outputs = model(input_ids=tail, attention_mask=attention_mask, past_key_values=cache, labels=labels,
                        fused_lm_head=True)
    # log_probs: (B, C), the log-probability of each completion token given everything before it
    entropy = outputs.entropy[:, -logits_to_keep:] if compute_entropy else None
    return outputs.log_probs[:, -logits_to_keep:], entropy, None


@functools.cache
def fast_trainer_class():
    """GRPOTrainer whose sampling runs on a `SamplingCopy` (text-only prompts, no vLLM)."""
    from trl import GRPOTrainer

    class FastGRPOTrainer(GRPOTrainer):
        _sampler: SamplingCopy | None = None

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if self.use_vllm or self.use_transformers_continuous_batching or images is not None or multimodal_fields:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            model = self.accelerator.unwrap_model(self.model)
            if self._sampler is None:
                self._sampler = SamplingCopy(model)
            if self._sampler.synced_step != self.state.global_step:
                self._sampler.sync(self.state.global_step)
            completions = self._sampler.generate(prompt_ids, self.generation_config,
                                                 self._tokenizer.pad_token_id, self.eos_token_ids)
            return completions, None

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):
            if compute_aux_loss or any(value is not None for value in multimodal.values()):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                    compute_aux_loss, **multimodal)
            import torch

            batch_size = batch_size or input_ids.size(0)
            parts = []
            for start in range(0, input_ids.size(0), batch_size):
                ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
                parts.append(shared_prompt_logps(model, ids, mask, logits_to_keep, compute_entropy,
                                                 self.accelerator.autocast)
                             or super()._get_per_token_logps_and_entropies(model, ids, mask, logits_to_keep,
                                                                           compute_entropy=compute_entropy))
            logps = torch.cat([part[0] for part in parts])
            entropies = torch.cat([part[1] for part in parts]) if compute_entropy else None
            return logps, entropies, None

    return FastGRPOTrainer
