"""How a GRPO step is computed fast, without changing what it optimises.

A plain TRL step on a small model on a CPU spends most of its time sampling: `generate` runs the
LoRA-wrapped policy token by token, and every decode step pays for the adapter's extra matmuls, the
float32 -> bf16 weight casts that autocast makes on every call, and the key/value cache growing by
concatenation. The rest goes to forward and backward passes that run each prompt once per completion.
Four changes remove most of that (54.0 -> 13.4 s per step of 6 x 128 tokens on 2 cores of an AMX CPU,
`bench/train_throughput.py`):

1. The frozen base weights are kept in bf16 (where `hardware.bf16()` says bf16 pays). Under autocast the
   base matmuls already ran on bf16-rounded weights, so storing them that way computes the same thing and skips the
   per-call casts. The LoRA matrices stay float32 and are what the optimizer updates.
2. Sampling runs on a `SamplingCopy`: an ordinary (un-wrapped) model whose linear weights are
   `W + scaling * B @ A`, refreshed from the adapter once per optimizer step. The training weights are
   never merged in place, so they cannot drift by rounding.
3. On a CPU, for the families the loop implements (`loop_family`: Llama, Qwen2, Qwen3), the copy decodes
   with its own loop (`SamplingCopy._decode`) instead of `generate`: each distinct prompt is prefilled once,
   q/k/v and gate/up are one matmul each, the weights are packed into oneDNN's layout once per sync (twice
   as fast for a handful of rows, in bf16 and in float32), and the cache is one preallocated buffer per
   layer. Where bf16 is emulated (AVX2 CPUs) the copy stays float32 and its linears hold fp16 weights for
   fbgemm's fp16 GEMM (`hardware.fp16`): 4.4 s for 6 x 128 tokens with the ISA capped to AVX2, against 8.1 s
   with packed float32 weights and `generate`'s 19.6 s. Sampling settings go through transformers' own logits
   processors; settings beyond the loop (beams, n-gram bans, ...) and other families fall back to `generate`.
4. The trainer's log-probabilities are computed with each prompt run once (`shared_prompt_logps`). All G
   completions of a prompt share it, so the policy, reference and backward passes run the prompt once,
   repeat its key/value cache G times, and run only the completions over it: about half the tokens for a
   165-token prompt and 128-token completions. Gradients flow back through the repeated cache into the
   one prompt pass, so they equal those of the full batch.

The objective is unchanged: the old-policy and reference log-probabilities, the advantages and the loss
are all computed by the trainer's code on the LoRA-wrapped model, as in plain TRL (tests/test_objective.py
checks the formulas on both engines). What changes is only
the numerics of the sampler (merged bf16 weights instead of base + adapter in bf16 autocast): the same
policy up to rounding, as with TRL's vLLM sampler.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import weakref

from ragrpo import hardware
from ragrpo.generation.decode import Engine, Row, Sampling, holds_stop, left_pad


class SamplingCopy:
    """An ordinary model holding the policy's merged weights, used only to sample completions."""

    def __init__(self, peft_model, dtype=None):
        """`peft_model`: the LoRA-wrapped policy, whose adapters each `sync` merges in; a plain model is
        sampled as it is (`sync` once to pack its weights). `dtype`: the sampling weights' dtype; by default
        that of the policy's frozen base weights."""
        import torch
        from transformers import AutoModelForCausalLM

        base = _plain(peft_model)
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
        self.fused = _fuse_projections(self.model) if loop_family(self.model.config) else None
        self.packed = None  # the loop's projections, after `sync`, where `hardware.decode_weights` packs them

    def sync(self, step: int | None = None) -> None:
        """Copy `W + scaling * B @ A` of every adapted layer into the sampling model."""
        import torch

        with torch.no_grad():
            for name, layer in self.lora_layers.items():
                merged = layer.base_layer.weight.float() + layer.get_delta_weight("default").float()
                self.targets[name].weight.copy_(merged.to(self.dtype))
        self.synced_step = step
        kind = hardware.decode_weights(self.dtype)
        if self.fused is not None and kind != "plain":
            # an LM head without an adapter never changes: packed at the first sync only (fp16: 0.37 s a time)
            head = self.packed[-1] if self.packed and self.packed[-1].kind == kind and "lm_head" not in self.lora_layers else None
            self.packed = _projections(self.model, self.fused, kind, head)

    def generate(self, prompt_ids: list[list[int]], generation_config, pad_token_id: int,
                 eos_token_ids: list[int], *, stop: tuple[str, ...] = (), tokenizer=None,
                 budgets: list[int] | None = None) -> list[list[int]]:
        """Sample one completion per prompt (token ids, cut after the first end-of-sequence token or `stop`
        string): with the decode loop below where it covers the model and the settings, else with transformers'
        `generate`. `budgets`: each row's own `max_new_tokens` (default the config's); `stop` needs `tokenizer`."""
        import torch

        # inference mode rather than no_grad: no version counters or view tracking on the loop's ~1,000 small ops
        # a step (6 x 128 tokens in bf16: 3.75 against 3.95 s)
        with torch.inference_mode():
            # the loop wins where its weights are packed (fp16 for fbgemm or oneDNN's layout: bf16 on a CPU, 5.2 s
            # against generate's 9.8 s for 6 x 128 tokens); unpacked, generate with a static cache is as fast
            if self.packed is not None and _loop_settings(generation_config, self.model.generation_config):
                return self._decode(prompt_ids, generation_config, eos_token_ids, stop, tokenizer, budgets)
            return generate_ids(self.model, prompt_ids, generation_config, pad_token_id, eos_token_ids, stop=stop,
                                tokenizer=tokenizer, budgets=budgets, cache_implementation="static")

    def _decode(self, prompt_ids, generation_config, eos_token_ids: list[int], stop=(), tokenizer=None,
                budgets=None) -> list[list[int]]:
        """transformers' sampling, token by token, without `generate`: the rows go through `decode.Engine`
        (each distinct prompt prefilled once, one fused projection for q/k/v and one for gate/up per layer)."""
        sampling = loop_sampling(_loop_settings(generation_config, self.model.generation_config))
        budgets = budgets or [sampling.max_new_tokens] * len(prompt_ids)
        projections = self.packed or _projections(self.model, self.fused, "plain")
        capacity = max(len(ids) + budget for ids, budget in zip(prompt_ids, budgets, strict=True))
        engine = Engine(self.model, projections, slots=len(prompt_ids), capacity=capacity)
        decode = tokenizer.decode if tokenizer is not None else None
        rows = [Row(ids, dataclasses.replace(sampling, max_new_tokens=budget), eos_token_ids, self.model.device,
                    stop=stop, decode=decode) for ids, budget in zip(prompt_ids, budgets)]
        engine.add(rows)
        while engine.rows:
            for row in engine.step():
                engine.remove(row)
        return [row.new for row in rows]


def generate_ids(model, prompt_ids: list[list[int]], generation_config, pad_token_id: int, eos_token_ids: list[int],
                 *, stop: tuple[str, ...] = (), tokenizer=None, budgets: list[int] | None = None,
                 **generate_kwargs) -> list[list[int]]:
    """`SamplingCopy.generate` through transformers' `generate` on any model: one left-padded batch, each row
    cut after its end-of-sequence token or `stop` string, and to its own budget (the batch runs to the largest)."""
    import torch

    if budgets:
        generation_config = copy.deepcopy(generation_config)
        generation_config.max_new_tokens = max(budgets)
    input_ids, attention_mask = left_pad(prompt_ids, pad_token_id)
    width = input_ids.size(1)
    if stop:  # the decode loop's rule (`decode.holds_stop`: the new tokens' text), not generate's stop_strings,
        # which also match across the prompt's end, so both paths cut a row at the same token
        generate_kwargs["stopping_criteria"] = _stop_criteria(width, stop, tokenizer.decode)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                generation_config=generation_config, use_cache=True, **generate_kwargs)  # (B, width + new)
    rows = [_cut(row, eos_token_ids) for row in output[:, width:].tolist()]
    if budgets:
        rows = [row[:budget] for row, budget in zip(rows, budgets, strict=True)]
    return [_cut_at_stop(row, stop, tokenizer.decode) for row in rows] if stop else rows


def _stop_criteria(width: int, stop: tuple[str, ...], decode):
    """A `generate` stopping criterion that ends each row once its new tokens (after `width`) hold a stop string."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class OnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # input_ids: (B, width + new so far)
            return torch.tensor([holds_stop(row[width:].tolist(), stop, decode) for row in input_ids],
                                dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([OnText()])


def _cut_at_stop(row: list[int], stop: tuple[str, ...], decode) -> list[int]:
    """A completion up to the token that completes its first `stop` string (`generate` pads after it)."""
    for end in range(1, len(row) + 1):
        if holds_stop(row[:end], stop, decode):
            return row[:end]
    return row


# ---- the decode loop's reach ----
# transformers' defaults for settings neither the call nor the model's generation config sets
_GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None,
                        "repetition_penalty": 1.0, "min_new_tokens": None, "max_new_tokens": None}
# settings that do not change what is sampled, or that the loop implements; anything else goes to `generate`
_HARMLESS = {"pad_token_id", "bos_token_id", "eos_token_id", "cache_implementation", "disable_compile", "use_cache",
             "transformers_version", "_from_model_config", "output_attentions", "output_hidden_states"}


# Per architecture: what the decode loop implements. Llama (SmolLM2, Llama 3 with its rope scaling), Qwen2
# (q/k/v biases) and Qwen3 (q/k norms) share one layer shape; Gemma 3 (sliding windows, scaled embeddings,
# four norms per layer, GELU) and everything else sample through `generate`.
LOOP_FAMILIES = ("llama", "qwen2", "qwen3")


def loop_family(config) -> str | None:
    """The architecture if the decode loop implements this model's layers, else None."""
    if config.model_type not in LOOP_FAMILIES or config.hidden_act != "silu" or getattr(config, "mlp_bias", False):
        return None
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return None  # a sliding-window layer attends differently from the loop
    if config.model_type == "llama" and getattr(config, "attention_bias", False):
        return None  # Llama's attention bias is on the output projection too
    return config.model_type


def _loop_settings(generation_config, model_config) -> dict | None:
    """The sampling settings `generate` would use, or None if any setting is beyond the decode loop."""
    named = set(generation_config.to_diff_dict()) | set(model_config.to_diff_dict())
    if named - _HARMLESS - set(_GENERATION_DEFAULTS):
        return None
    settings = {}
    for name, default in _GENERATION_DEFAULTS.items():  # the call's setting, else the model's, else the default
        value = getattr(generation_config, name, None)
        value = getattr(model_config, name, None) if value is None else value
        settings[name] = default if value is None else value
    return settings if settings["max_new_tokens"] else None


def loop_sampling(settings: dict):
    """`_loop_settings`' dict as the decode engine's per-row `Sampling`."""
    return Sampling(max_new_tokens=settings["max_new_tokens"], min_new_tokens=settings["min_new_tokens"] or 0,
                    do_sample=settings["do_sample"], temperature=settings["temperature"], top_k=settings["top_k"] or 0,
                    top_p=settings["top_p"], min_p=settings["min_p"], repetition_penalty=settings["repetition_penalty"])


def _fuse_projections(model) -> list:
    """Store each layer's q/k/v weights (and biases, Qwen2's) in one tensor and its gate/up weights in
    another. The modules' own parameters become views into them, so `sync` (and the model's ordinary
    forward) keep working unchanged. Per layer: ((qkv weight, qkv bias or None), (gate_up weight, None))."""
    import torch

    fused = []
    for layer in model.model.layers:
        pair = []
        for parts in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                      (layer.mlp.gate_proj, layer.mlp.up_proj)):
            tensors = []
            for name in ("weight", "bias"):
                if getattr(parts[0], name, None) is None:
                    tensors.append(None)
                    continue
                joined = torch.cat([getattr(module, name) for module in parts])  # (sum of outputs, ...)
                start = 0
                for module in parts:
                    end = start + module.weight.size(0)
                    setattr(module, name, torch.nn.Parameter(joined[start:end], requires_grad=False))
                    start = end
                tensors.append(joined)
            pair.append(tuple(tensors))
        fused.append(tuple(pair))
    return fused


def _projections(model, fused, kind: str, head=None) -> list:
    """Per layer (qkv, o, gate_up, down), then the LM head (`head` if given), each a `_Linear` of `kind` to
    `decode.project` with. 'onednn' reorders the weights into oneDNN's blocked layout once per sync: for a
    handful of rows its matmul reads them about twice as fast as the plain one (0.16 against 0.36 ms for bf16
    gate_up, 6 rows). 'fp16' halves the bytes a float32 model's decode step reads (gate_up, 6 rows, ISA capped
    to AVX2: 0.18 against 0.41 ms packed). fbgemm's fp16 packing runs on one core (30 SmolLM2 layers: 0.95 s),
    so the weights are packed on as many threads as torch has (0.48 s on 2)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    parts = [part for layer, (qkv, gate_up) in zip(model.model.layers, fused)
             for part in (qkv, (layer.self_attn.o_proj.weight, None), gate_up, (layer.mlp.down_proj.weight, None))]
    if head is None:
        parts.append((model.lm_head.weight, getattr(model.lm_head, "bias", None)))
    with ThreadPoolExecutor(torch.get_num_threads() if kind != "plain" else 1) as pool:
        linears = list(pool.map(lambda part: _Linear(*part, kind), parts))
    layers = [tuple(linears[n:n + 4]) for n in range(0, 4 * len(fused), 4)]
    return layers + [head or linears[-1]]


def fresh_projections(model) -> list | None:
    """`_projections` of a model as its weights are now, fused by copying (the model is left as it is) and
    packed where `hardware.decode_weights` says so; None where the decode loop does not cover the model or the
    device is not a CPU (`generate` is the path there). For one-off decoding (`ask`, the library's streams);
    training and `serve` keep a `SamplingCopy`. The result is kept with the model and handed out again while
    no weight has changed (packing fp16 takes about 0.6 s, once per model rather than once per answer)."""
    import torch

    dtype = model.get_input_embeddings().weight.dtype
    if model.device.type != "cpu" or not loop_family(model.config):
        return None
    kind = hardware.decode_weights(dtype)
    linears = [module for layer in model.model.layers for module in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)] + [model.lm_head]
    # a tensor's version counts its in-place changes: the same storage and versions are the same weights
    key = (kind, tuple((t.data_ptr(), t._version) for m in linears for t in (m.weight, m.bias) if t is not None))
    kept = _FRESH.get(model)
    if kept is not None and kept[0] == key:
        return kept[1]
    fused = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        parts = (attention.q_proj, attention.k_proj, attention.v_proj)
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        fused.append(((torch.cat([p.weight for p in parts]), bias),
                      (torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None)))
    projections = _projections(model, fused, kind)
    _FRESH[model] = key, projections
    return projections


_FRESH = weakref.WeakKeyDictionary()  # model -> (its weights' key, `fresh_projections`)


class _Linear:
    """A weight and its bias, held as `kind` says: 'plain' tensors, 'onednn' (the weight reordered into oneDNN's
    layout) or 'fp16' (weight and bias in fbgemm's packed fp16 form; not tensors any more)."""

    def __init__(self, weight, bias, kind: str):
        import torch

        self.kind, self.bias = kind, bias
        if kind == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight)
        elif kind == "fp16":
            self.weight = torch.ops.quantized.linear_prepack_fp16(weight.float(), None if bias is None else bias.float())
        else:
            self.weight = weight


def _cut(row: list[int], eos_token_ids: list[int]) -> list[int]:
    """A completion up to and including its first end-of-sequence token."""
    end = next((i for i, token in enumerate(row) if token in eos_token_ids), None)
    return row if end is None else row[: end + 1]


def _lora_layers(peft_model) -> dict:
    """The adapted layers by their name in the plain model ('model.layers.0.self_attn.q_proj', ...)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and hasattr(module, "base_layer")}


def _plain(model):
    """The model under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_state_dict(peft_model) -> dict:
    state = {}
    for name, tensor in _plain(peft_model).state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def evaluation_dtype(config):
    """The dtype of `evaluation_sampler`'s copy for a model of this config on this machine, or None where it
    samples through `generate` (not a CPU, a family the loop does not implement, weights oneDNN cannot pack)."""
    import torch

    dtype = torch.bfloat16 if hardware.bf16() else torch.float32
    if hardware.device() != "cpu" or not loop_family(config) or hardware.decode_weights(dtype) == "plain":
        return None
    return dtype


def evaluation_sampler_name(config) -> str:
    """How evaluation samples a model of this config here: 'decode loop, bfloat16', '... float32', '... float32
    with fp16 weights' or 'generate'."""
    dtype = evaluation_dtype(config)
    if dtype is None:
        return "generate"
    weights = " with fp16 weights" if hardware.decode_weights(dtype) == "fp16" else ""
    return f"decode loop, {str(dtype).removeprefix('torch.')}{weights}"


def evaluation_sampler(model) -> SamplingCopy | None:
    """A packed `SamplingCopy` of a plain model, for sampling many answers from it (evaluation), where
    `evaluation_dtype` allows: bf16 where it pays, else float32. Elsewhere None: `generate` on the model as it
    is. With bf16, like training's sampler, it samples from bf16-rounded weights."""
    dtype = evaluation_dtype(model.config)
    if model.device.type != "cpu" or dtype is None:
        return None
    sampler = SamplingCopy(model, dtype=dtype)
    sampler.sync()  # packs the weights for oneDNN; a plain model has no adapters to merge
    return sampler


def shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep: int, compute_entropy: bool, autocast,
                        temperature: float = 1.0, entropy_grad: bool = False, max_logits: int = 2**28):
    """Per-token log-probabilities (and entropies) of the completions, as TRL's forward computes them, with each
    distinct prompt run once. Returns None when no prompt repeats (nothing to share).

    `input_ids` is TRL's batch: left-padded prompts then right-padded completions, (B, P + C), with C =
    `logits_to_keep`. The prompt pass covers the first P - 1 positions of each distinct prompt; the second
    pass runs the last prompt token and the completions, (B, C + 1), over the repeated cache. Positions are
    the same as in one full pass (`cache_position` counts on from the cache), so each row is computed from
    exactly the inputs it would have seen.

    The log-probabilities come from the logits and a float32 log-softmax rather than TRL's fused, tiled LM
    head: on a CPU, with a few hundred completion tokens, that is 0.7 s against 1.8 s for forward and backward
    (768 tokens, 49k vocabulary), and the two agree to 2e-6. Entropies carry a gradient only with
    `entropy_grad` (TRL's entropy bonus); otherwise they feed masks and logs. Batches whose logits would
    exceed `max_logits` entries (2**28: 1 GiB in float32) go through TRL's tiled head instead.
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
    tail = input_ids[:, width - 1:]  # (B, C + 1): the last prompt token, then the completions
    if tail.numel() * model.config.vocab_size > max_logits:  # too big to hold: TRL's tiled LM head
        labels = tail.masked_fill(attention_mask[:, width - 1:] == 0, -100)
        labels[:, 0] = -100  # the last prompt token is not scored
        with autocast():
            outputs = model(input_ids=tail, attention_mask=attention_mask, past_key_values=cache, labels=labels,
                            fused_lm_head=True)
        entropy = outputs.entropy[:, -logits_to_keep:] if compute_entropy else None
        return outputs.log_probs[:, -logits_to_keep:], entropy, None
    with autocast():
        logits = model(input_ids=tail, attention_mask=attention_mask, past_key_values=cache, use_cache=True).logits
    scores = logits[:, :-1].float()  # (B, C, vocab)
    if temperature != 1.0:  # each pass over the scores is 150 MB for 768 tokens
        scores = scores / temperature
    targets = tail[:, 1:, None]  # (B, C, 1)
    if not compute_entropy and not torch.is_grad_enabled():  # the reference pass: no log-softmax to keep
        return scores.gather(-1, targets).squeeze(-1) - scores.logsumexp(dim=-1), None, None
    logps = scores.log_softmax(dim=-1)  # (B, C, vocab)
    token_logps = logps.gather(-1, targets).squeeze(-1)  # (B, C)
    entropy = None
    if compute_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logps.exp() * logps).sum(-1)  # (B, C)
    return token_logps, entropy, None


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
            completions = self.sampling_copy().generate(prompt_ids, self.generation_config,
                                                        self._tokenizer.pad_token_id, self.eos_token_ids)
            return completions, None

        def sampling_copy(self) -> SamplingCopy:
            """The policy's sampling copy, synced to the current optimizer step (the agentic rollout samples on it)."""
            if self._sampler is None:
                self._sampler = SamplingCopy(self.accelerator.unwrap_model(self.model))
            if self._sampler.synced_step != self.state.global_step:
                self._sampler.sync(self.state.global_step)
            return self._sampler

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):
            # A model wrapped for data parallelism (DDP under `accelerate launch`) takes TRL's own forward: its
            # gradient hooks expect one forward per backward, and the shared prompt pass is two.
            if (compute_aux_loss or self.args.cast_lm_head_to_fp32 or not hasattr(model, "config")
                    or any(value is not None for value in multimodal.values())):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                    compute_aux_loss, **multimodal)
            import torch

            batch_size = batch_size or input_ids.size(0)
            parts = []
            for start in range(0, input_ids.size(0), batch_size):
                ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
                parts.append(shared_prompt_logps(model, ids, mask, logits_to_keep, compute_entropy,
                                                 self.accelerator.autocast, self.temperature,
                                                 self.entropy_coef != 0.0 or self.use_adaptive_entropy)
                             or super()._get_per_token_logps_and_entropies(model, ids, mask, logits_to_keep,
                                                                           compute_entropy=compute_entropy))
            logps = torch.cat([part[0] for part in parts])
            entropies = torch.cat([part[1] for part in parts]) if compute_entropy else None
            return logps, entropies, None

    return FastGRPOTrainer
