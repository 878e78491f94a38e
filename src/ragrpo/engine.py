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

    return FastGRPOTrainer
