"""One decode engine: a batch of rows, each at its own position, over a slotted key/value cache.

After nanochat's `Engine`. Every row owns a slot: one row of a preallocated (slots, kv_heads, capacity,
head_dim) buffer per layer, filled from column 0 with its prompt, then one column per new token. A decode
step runs the live rows together: each writes its new key/value at its own column and attends over the
filled columns of its own slot, so rows of different lengths, started at different times, share one
matmul per projection. Live rows are kept in slots 0..n-1 (a finished row's slot takes the last row's),
so the step reads the buffer's first n rows as a view, never a gathered copy.

Sampling settings are applied per row, in `generate`'s order and with transformers' semantics
(repetition penalty, temperature, top-k, top-p, min-p), by `choose`: rows with different settings share
a step. A row with a seed draws from its own generator, so its tokens do not depend on its neighbours.

The layer arithmetic mirrors transformers' Llama, Qwen2 and Qwen3 layers; `engine.loop_family` says which
models it covers. Attention is torch's fused `scaled_dot_product_attention`, with each key/value head's group
of query heads as its query rows, so no head is repeated. A step runs about 35 small ops per layer, and on
a CPU their dispatch costs as much as the matmuls. So the step avoids the ones it can. Fused attention
replaces five. Where every row writes the same column (the G completions of one prompt), a slice stands in
for an indexed write, and no mask is built. 6 x 128 tokens on 2 cores took 3.7 s this way against 4.2 s
(float32, ISA capped to AVX2) and 4.4 s (bf16) before.
"""

from __future__ import annotations

from dataclasses import dataclass


def project(x, linear):
    """`x @ weight.T + bias`, by the kernel the weight was packed for (`engine._Linear`)."""
    import torch
    import torch.nn.functional as F

    if linear.kind == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "none", [None], "")
    if linear.kind == "fp16":  # fp16 weights (bias inside), float32 x and sums
        return torch.ops.quantized.linear_dynamic_fp16(x, linear.weight)
    return F.linear(x, linear.weight, linear.bias)


def left_pad(prompt_ids, pad_token_id: int):
    """Prompts as one left-padded batch, so that every row continues from the right edge: ids and
    attention mask, (B, longest)."""
    import torch

    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


@dataclass
class Sampling:
    """One row's sampling settings (transformers' names and meanings; top_k 0 is off)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: counts this row's generated tokens only, not the prompt's
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            self.do_sample, self.temperature = False, 1.0  # temperature 0 is greedy, as OpenAI's API means it


def eos_ids(model, tokenizer) -> list[int]:
    """The tokens that end a row: the model's generation config's end-of-sequence ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return sorted(ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def holds_stop(new: list[int], stop: tuple[str, ...], decode) -> bool:
    """Whether the text of a row's new tokens holds one of the `stop` strings. Only the last tokens are read:
    a token holds at least one character, so as many tokens as the longest string has characters suffice."""
    text = decode(new[-max(len(s) for s in stop):])
    return any(s in text for s in stop)


class Row:
    """A sequence being decoded: its tokens so far, its settings, and whether it has ended.

    `stop` strings end the row (finish reason 'stop', the string's tokens kept) as soon as the text of its
    last tokens holds one; `decode` (a tokenizer's) turns those tokens into text. The agentic loop stops
    a row at `</search>` this way, whatever tokens the model spelled it with."""

    def __init__(self, prompt: list[int], sampling: Sampling, eos: list[int], device, stop: tuple[str, ...] = (),
                 decode=None):
        import torch

        self.prompt, self.sampling, self.eos = list(prompt), sampling, set(eos)
        self.stop, self.decode = tuple(s for s in stop if s), decode
        if self.stop and decode is None:
            raise ValueError("stop strings need a decode function to read the row's text")
        self.new: list[int] = []
        self.finish_reason: str | None = None
        self.generator = None
        if sampling.do_sample and sampling.seed is not None:
            self.generator = torch.Generator(device).manual_seed(sampling.seed)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.new)

    def accept(self, token: int) -> None:
        self.new.append(token)
        if token in self.eos or self.stop and holds_stop(self.new, self.stop, self.decode):
            self.finish_reason = "stop"
        elif len(self.new) >= self.sampling.max_new_tokens:
            self.finish_reason = "length"


class Prefill:
    """A row whose prompt is prefilled a chunk at a time (`Engine.begin`, `Engine.advance`): `done` prompt
    tokens so far, their keys and values in a transformers cache until the row joins the batch."""

    def __init__(self, row: Row, cache):
        self.row, self.cache, self.done = row, cache, 0


class Engine:
    """Decode steps for up to `slots` rows of at most `capacity` tokens each, on `model` through
    `projections` (`engine._projections`: fused, and packed for fbgemm's fp16 or oneDNN where it pays)."""

    def __init__(self, model, projections, *, slots: int, capacity: int):
        import torch

        self.model, self.projections = model, projections
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.slots, self.capacity = slots, capacity
        self.dtype, self.device = model.get_input_embeddings().weight.dtype, model.device
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        self.caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                        torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in model.model.layers]
        self.rows: list[Row] = []  # row i lives in slot i
        self.tokens = torch.zeros((slots, capacity), dtype=torch.long, device=self.device)  # for the penalty
        self.pending = None  # (rows, vocab) logits of each live row's next token

    # ---- rows in, rows out ----
    def add(self, rows: list[Row]) -> None:
        """Prefill `rows` (each distinct prompt once) into free slots; their next-token logits join `pending`."""
        self._check_fits(rows)
        distinct = {ids: n for n, ids in enumerate(dict.fromkeys(tuple(r.prompt) for r in rows))}
        logits, keys_values = self._prefill([list(ids) for ids in distinct])
        self._join(rows, [distinct[tuple(r.prompt)] for r in rows], logits, keys_values)

    def begin(self, row: Row) -> Prefill:
        """Start prefilling `row` a chunk at a time (`advance`), so that a long prompt does not hold up the rows
        already decoding for its whole prefill: between two chunks the batch takes a step."""
        from transformers import DynamicCache

        self._check_fits([row], joining=0)
        return Prefill(row, DynamicCache(config=self.model.config))

    def advance(self, prefill: Prefill, tokens: int) -> bool:
        """Prefill the next `tokens` of the row's prompt, after the keys and values of the chunks before; after
        the last chunk the row joins the batch in a free slot. Returns whether it has joined."""
        import torch

        row, start = prefill.row, prefill.done
        end = min(start + tokens, len(row.prompt))
        if end == len(row.prompt):
            self._check_fits([row])
        out = self.model(input_ids=torch.tensor([row.prompt[start:end]], device=self.device),
                         position_ids=torch.arange(start, end, device=self.device)[None],
                         past_key_values=prefill.cache, use_cache=True, logits_to_keep=1)
        prefill.done = end
        if end < len(row.prompt):
            return False
        layers = [(layer.keys, layer.values) for layer in prefill.cache.layers]  # (1, kv_heads, prompt, head_dim)
        self._join([row], [0], out.logits[:, -1].float(), layers)
        return True

    def _check_fits(self, rows: list[Row], joining: int | None = None) -> None:
        """Refuse rows that would not fit: `joining` of them (all by default) into free slots, each into its
        slot's capacity with its whole budget of new tokens."""
        joining = len(rows) if joining is None else joining
        if len(self.rows) + joining > self.slots:
            raise ValueError(f"{len(self.rows) + joining} rows do not fit {self.slots} slots")
        for row in rows:
            if row.length + row.sampling.max_new_tokens > self.capacity:
                raise ValueError(f"a row of {row.length} + {row.sampling.max_new_tokens} tokens exceeds the "
                                 f"engine's capacity of {self.capacity}")

    def _join(self, rows: list[Row], prompt_of: list[int], logits, keys_values) -> None:
        """Put `rows` into the next free slots: row i's prompt is prefilled prompt `prompt_of[i]`, whose next-token
        logits are `logits[prompt_of[i]]` and whose keys and values (left-padded) are in `keys_values`."""
        import torch

        first = len(self.rows)
        for offset, (row, n) in enumerate(zip(rows, prompt_of, strict=True)):
            slot, length = first + offset, len(row.prompt)
            for (keys, values), (new_keys, new_values) in zip(self.caches, keys_values):
                keys[slot, :, :length] = new_keys[n, :, -length:]
                values[slot, :, :length] = new_values[n, :, -length:]
            self.tokens[slot, :length] = torch.tensor(row.prompt, device=self.device)
        self.rows += rows
        new = logits[torch.tensor(prompt_of, device=self.device)]
        self.pending = new if self.pending is None else torch.cat([self.pending, new])

    def remove(self, row: Row) -> None:
        """Free `row`'s slot: the last live row moves into it."""
        index, last = self.rows.index(row), len(self.rows) - 1
        if index != last:
            for keys, values in self.caches:
                keys[index], values[index] = keys[last], values[last]
            self.tokens[index] = self.tokens[last]
            self.rows[index] = self.rows[last]
            self.pending[index] = self.pending[last]
        self.rows.pop()
        self.pending = self.pending[:last] if last else None

    def step(self) -> list[Row]:
        """Choose every live row's next token from `pending`, then run the decode step for the rows that go
        on. Returns the rows that ended in this step (they stay until `remove`d)."""
        import torch

        rows = self.rows
        tokens = choose(self.pending, rows, self.tokens)  # (B,)
        ended = []
        for slot, (row, token) in enumerate(zip(rows, tokens.tolist())):
            self.tokens[slot, row.length] = token
            row.accept(token)
            if row.finish_reason:
                ended.append(row)
        if len(ended) < len(rows):
            columns = torch.tensor([row.length - 1 for row in rows], device=self.device)  # where each token goes
            self.pending = self._step(tokens, columns)
        return ended

    # ---- the model ----
    def _prefill(self, prompts: list[list[int]]):
        """Logits of each prompt's next token (P, vocab) and per layer its keys and values, left-padded."""

        ids, mask = left_pad(prompts, 0)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as `generate` numbers left-padded rows
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits[:, -1].float(), layers

    def _step(self, tokens, columns):
        """Logits (B, vocab) after `tokens` (B,) placed at `columns` (B,): their positions and cache columns."""
        import torch
        import torch.nn.functional as F

        body, rows = self.model.model, tokens.size(0)
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        at = columns.tolist()
        width = max(at) + 1
        aligned = min(at) == width - 1  # every row writes the same column and sees all columns before it
        mask = slots = None
        if not aligned:  # a row sees its own columns only, and writes its own column
            mask = torch.zeros((rows, 1, 1, width), dtype=self.dtype, device=self.device)
            mask.masked_fill_(torch.arange(width, device=self.device) > columns[:, None, None, None],
                              torch.finfo(self.dtype).min)
            slots = torch.arange(rows, device=self.device)
        x = body.embed_tokens(tokens[:, None])  # (B, 1, hidden)
        cos, sin = body.rotary_emb(x, columns[:, None])  # (B, 1, head_dim)
        # transformers' rotation is t * cos + rotate_half(t) * sin, rotate_half(t) = cat(-t2, t1); here that is
        # t.roll(half) * cat(-sin1, sin2), the same products, in 3 ops for q and k together instead of 14
        half = head_dim // 2
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        for layer, (qkv, o, gate_up, down), (keys, values) in zip(body.layers, self.projections[:-1], self.caches):
            attention = layer.self_attn
            qkv_out = project(_norm(layer.input_layernorm, x), qkv).view(rows, heads + 2 * kv_heads, head_dim)
            qk, v = qkv_out[:, :heads + kv_heads], qkv_out[:, heads + kv_heads:]  # (B, heads + kv, d), (B, kv, d)
            if hasattr(attention, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
                qk = torch.cat([attention.q_norm(qk[:, :heads]), attention.k_norm(qk[:, heads:])], dim=1)
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), signed_sin)
            if aligned:
                keys[:rows, :, width - 1], values[:rows, :, width - 1] = qk[:, heads:], v
            else:
                keys[slots, :, columns], values[slots, :, columns] = qk[:, heads:], v
            # query heads grouped under the key/value head they share: (B, kv_heads, heads / kv_heads, head_dim)
            q = qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, head_dim)
            mixed = F.scaled_dot_product_attention(q, keys[:rows, :, :width], values[:rows, :, :width],
                                                   attn_mask=mask, scale=attention.scaling)
            x = x + project(mixed.reshape(rows, 1, heads * head_dim), o)
            gate, up = project(_norm(layer.post_attention_layernorm, x), gate_up).chunk(2, dim=-1)
            x = x + project(F.silu(gate) * up, down)
        return project(body.norm(x)[:, 0], self.projections[-1]).float()  # (B, vocab)


def _norm(module, x):
    """A Llama/Qwen RMSNorm `module` applied to `x`, equal to the bit to the module's eight ops in fewer: in float32
    torch's one op; in bf16 the module's own order (normalise in float32, round, then scale), in four. The
    module's call was 12% of a bf16 server's decode thread in a profile."""
    import torch

    if x.dtype == torch.float32:
        return torch.rms_norm(x, (x.size(-1),), module.weight, module.variance_epsilon)
    return module.weight * torch.rms_norm(x.float(), (x.size(-1),), None, module.variance_epsilon).to(x.dtype)


def penalize_generated(scores, generated: list[int], frequency: float, presence: float) -> None:
    """OpenAI's frequency and presence penalties, in place on one row's `scores` (vocab,): each token the answer
    has produced c > 0 times loses `frequency * c + presence`. Unlike the repetition penalty, the prompt's
    tokens are not counted, so copying a name out of a passage costs nothing."""
    import torch

    counts = torch.bincount(torch.tensor(generated, device=scores.device), minlength=scores.size(-1))  # (vocab,)
    scores -= frequency * counts + presence * (counts > 0)


def choose(logits, rows: list[Row], history):
    """Each row's next token from its `logits` (B, vocab), float32, under its own settings. `history`
    (slots, capacity) holds each row's tokens so far, for the repetition penalty."""
    import torch

    scores = logits.clone()
    device, vocab = scores.device, scores.size(-1)
    settings = [row.sampling for row in rows]
    for index, row in enumerate(rows):  # at most B small updates; each row's own tokens
        if row.sampling.repetition_penalty != 1.0:
            seen = history[index, : row.length]
            picked = scores[index, seen]
            penalty = row.sampling.repetition_penalty
            scores[index, seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
        if row.new and (row.sampling.frequency_penalty or row.sampling.presence_penalty):
            penalize_generated(scores[index], row.new, row.sampling.frequency_penalty, row.sampling.presence_penalty)
        if len(row.new) < row.sampling.min_new_tokens and row.eos:
            scores[index, sorted(row.eos)] = float("-inf")  # no end of sequence yet
    greedy = torch.tensor([not s.do_sample for s in settings], device=device)
    if greedy.all():
        return scores.argmax(dim=-1)
    temperature = torch.tensor([s.temperature if s.do_sample else 1.0 for s in settings], device=device)
    scores = scores / temperature[:, None]
    top_k = torch.tensor([min(s.top_k, vocab) if s.do_sample and s.top_k else vocab for s in settings],
                         device=device)
    if (top_k < vocab).any():  # TopKLogitsWarper: below the k-th largest score is out
        largest = int(top_k[top_k < vocab].max())
        kth = torch.topk(scores, largest, dim=-1).values.gather(-1, (top_k.clamp(max=largest) - 1)[:, None])
        kth = kth.masked_fill((top_k == vocab)[:, None], float("-inf"))  # rows without top-k keep everything
        scores = scores.masked_fill(scores < kth, float("-inf"))
    top_p = torch.tensor([s.top_p if s.do_sample else 1.0 for s in settings], device=device)
    if (top_p < 1.0).any():  # TopPLogitsWarper: the smallest tokens whose mass is at most 1 - top_p are out
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)[:, None]
        remove[:, -1] = False  # at least one token stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    min_p = torch.tensor([s.min_p if s.do_sample and s.min_p is not None else 0.0 for s in settings], device=device)
    if (min_p > 0).any():  # MinPLogitsWarper: below min_p times the top probability is out
        probs = scores.softmax(dim=-1)
        remove = probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        scores = scores.masked_fill(remove, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    cumulative = probs.cumsum(dim=-1)  # (B, vocab)
    draws = torch.rand(len(rows), 1, device=device)
    for index, row in enumerate(rows):
        if row.generator is not None:
            draws[index] = torch.rand(1, generator=row.generator, device=device)
    # inverse CDF: the first entry whose cumulative mass exceeds the draw, so a zero-probability token is never drawn
    sampled = torch.searchsorted(cumulative, draws * cumulative[:, -1:], right=True).squeeze(1).clamp(max=vocab - 1)
    return torch.where(greedy, scores.argmax(dim=-1), sampled)
