"""Fast document embedding for ingest, and token-based chunking with the embedder's own tokenizer.

Queries are embedded by the table's registry function (sentence-transformers, float32), so any LanceDB
client gets the same query vectors. Documents are many, so ingest takes a faster path that must stay
within `MAX_COSINE_GAP` of that float32 reference:

- texts are tokenized once (a text that stays one chunk keeps the chunking pass's ids), sorted by
  length and cut into batches under a token budget, so a batch pads to a length close to its own
  texts' instead of the longest text in the corpus; each worker pads its own batch;
- the transformer runs in bfloat16 where the hardware has native bf16 (CUDA, or a CPU with
  avx512_bf16 / AMX), with mean pooling and normalisation done in float32. Pooling in bf16 is what
  costs accuracy (a 256-term sum in 8 mantissa bits); with float32 pooling the gap measured on the
  built-in corpus is below 1e-4.
- on a CPU, the bf16 copy's linear layers run through oneDNN with their weights packed once
  (`pack_linears`), the GELU fused into the intermediate layer;
- 8 rows of the first batch of every ingest are also embedded in float32 and compared; if any vector
  is further than `MAX_COSINE_GAP` from its reference, the whole ingest falls back to float32;
- on CPU, batches run in parallel in single-threaded workers (`hardware.cpu_workers`).

Measured on a 2-core avx512_bf16 CPU (no AMX): bf16 about 2.3x faster than float32. Not used, measured
on 300 generated documents, one thread: ONNX Runtime 1.32 on the model exported with `torch.onnx`
(float32, with and without ORT's BERT fusions) was no faster than torch float32 (0.90 to 0.98x), and
its dynamic int8 quantization (per channel) about matched bf16's speed at 2.4e-2 cosine from the
reference; torch's dynamic int8 was 0.08 away.

Models whose sentence-transformers pipeline is not Transformer -> mean Pooling (-> Normalize) take
sentence-transformers' own `encode` in float32 instead.
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ragrpo import RagrpoError, hardware

MAX_COSINE_GAP = 1e-3
BATCH_TOKENS = 8192  # padded tokens per forward pass: (B, T) with B * T <= this
MAX_BATCH = 64
CHECK_ROWS = 8  # rows of the first batch also embedded in float32 to check the fast path


def _is_mean_pooled(folder: Path) -> bool:
    """True when the sentence-transformers folder is Transformer -> mean Pooling (-> Normalize)."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        types = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pooling = next(m for m in modules if m["type"].endswith("Pooling"))
        config = json.loads((folder / pooling["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, StopIteration):
        return False
    modes = [key for key, on in config.items() if key.startswith("pooling_mode") and on]
    return types[:2] == ["Transformer", "Pooling"] and set(types[2:]) <= {"Normalize"} and modes == [
        "pooling_mode_mean_tokens"]


@dataclass
class Embedder:
    """The embedder's tokenizer and a float32 or bf16 copy of its transformer, for batch ingest."""

    name: str
    tokenizer: object
    max_tokens: int  # the model's max_seq_length, special tokens included
    model: object = None  # None: no fast path, use `fallback` (a sentence-transformers model)
    fallback: object = None
    reference: object = None  # the float32 transformer, kept to check the first batch of each encode
    dtype: str = "float32"
    device: str = "cpu"
    first_batch_gap: float | None = None  # max 1 - cosine of the fast path on the last first batch

    @classmethod
    def load(cls, name: str, *, precision: str = "auto") -> Embedder:
        """`name` is a resolved sentence-transformers name or folder; precision auto|float32|bfloat16."""
        import torch
        from transformers import AutoModel, AutoTokenizer

        from ragrpo.models import device, quiet_transformers

        if precision not in ("auto", "float32", "bfloat16"):
            raise RagrpoError(f"precision {precision!r}: use auto, float32 or bfloat16")
        quiet_transformers()
        where = device()
        folder = Path(name)
        if not (folder.is_dir() and _is_mean_pooled(folder)):
            from sentence_transformers import SentenceTransformer

            try:
                model = SentenceTransformer(name, device=where)
            except Exception as exc:
                raise RagrpoError(f"embedding model {name!r} could not be loaded: {exc}") from None
            return cls(name, model.tokenizer, model.max_seq_length, fallback=model, device=where)
        bert = json.loads((folder / "sentence_bert_config.json").read_text()) if (
            folder / "sentence_bert_config.json").exists() else {}
        tokenizer = AutoTokenizer.from_pretrained(folder)
        max_tokens = int(bert.get("max_seq_length") or min(tokenizer.model_max_length, 512))
        dtype = "bfloat16" if precision == "bfloat16" or (precision == "auto" and hardware.bf16()) else "float32"
        reference = AutoModel.from_pretrained(folder, dtype=torch.float32).to(where).eval()
        model = copy.deepcopy(reference).to(getattr(torch, dtype)) if dtype != "float32" else reference
        if dtype == "bfloat16" and hardware.pack(torch.bfloat16):
            pack_linears(model)
        return cls(name, tokenizer, max_tokens, model=model, reference=reference, dtype=dtype, device=where)

    @property
    def dim(self) -> int:
        """The size of the vectors `encode` returns."""
        if self.model is None:
            return self.fallback.get_sentence_embedding_dimension()
        return self.model.config.hidden_size

    # -- chunking --------------------------------------------------------------------------------

    def chunk(self, texts: list[str], size: int, overlap: int, *, return_ids: bool = False):
        """Each text as windows of at most `size` tokens, consecutive windows sharing `overlap` tokens.

        Windows are cut at token boundaries and sliced from the original text (via the tokenizer's
        character offsets), so a chunk is verbatim text. A text of `size` tokens or fewer is one chunk,
        unchanged. With `return_ids`, also each chunk's model input ids (special tokens added), in the
        order of the flattened chunks, for `encode(ids=)`: known for a text that stayed whole, None for
        the windows of a longer one, whose own tokenization may differ at the cut.
        """
        if not 0 <= overlap < size:
            raise RagrpoError(f"--chunk-overlap must be at least 0 and below --chunk-size ({size}), got {overlap}")
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        step = size - overlap
        chunks, ids = [], []
        for text, tokens, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
            if len(offsets) <= size:
                chunks.append([text])
                ids.append(self._with_special_tokens(tokens))
                continue
            starts = range(0, max(len(offsets) - overlap, 1), step)
            chunks.append([text[offsets[s][0]:offsets[min(s + size, len(offsets)) - 1][1]] for s in starts])
            ids += [None] * len(starts)
        return (chunks, ids) if return_ids else chunks

    @cached_property
    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after one text's own ([CLS] and [SEP] for BERT)."""
        framed = self.tokenizer("probe")["input_ids"]
        bare = self.tokenizer("probe", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(framed)) if framed[i:i + len(bare)] == bare)
        return framed[:start], framed[start + len(bare):]

    def _with_special_tokens(self, tokens: list[int]) -> list[int]:
        prefix, suffix = self._special_frame
        return prefix + tokens + suffix

    # -- embedding -------------------------------------------------------------------------------

    def encode(self, texts: list[str], *, ids: list | None = None, on_batch=None) -> np.ndarray:
        """(N, dim) unit vectors, float32. `ids`: input ids already known per text (None where not), as
        `chunk(return_ids=True)` gives them. `on_batch(indices)` is called after each batch."""
        if self.model is None:
            vectors = np.zeros((len(texts), self.dim), np.float32)
            for start in range(0, len(texts), MAX_BATCH):
                indices = list(range(start, min(start + MAX_BATCH, len(texts))))
                vectors[indices] = self.fallback.encode([texts[i] for i in indices], normalize_embeddings=True)
                if on_batch:
                    on_batch(indices)
            return vectors
        ids = list(ids) if ids is not None else [None] * len(texts)
        missing = [i for i, row in enumerate(ids) if row is None or len(row) > self.max_tokens]
        if missing:
            fresh = self.tokenizer([texts[i] for i in missing], truncation=True, max_length=self.max_tokens)
            for i, row in zip(missing, fresh["input_ids"], strict=True):
                ids[i] = row
        order = np.argsort([len(row) for row in ids], kind="stable")
        batches = list(self._batches(order, ids))
        first = self._forward([ids[i] for i in batches[0]], self.model)  # (B, dim)
        if self.dtype != "float32":
            first = self._check_first_batch([ids[i] for i in batches[0]], first)
        vectors = np.zeros((len(texts), first.shape[1]), np.float32)
        vectors[batches[0]] = first
        if on_batch:
            on_batch(batches[0])
        with hardware.cpu_workers(self.device) as workers, ThreadPoolExecutor(workers) as pool:
            forwards = pool.map(lambda batch: self._forward([ids[i] for i in batch], self.model), batches[1:])
            for batch, rows in zip(batches[1:], forwards, strict=True):
                vectors[batch] = rows
                if on_batch:
                    on_batch(batch)
        return vectors

    def _batches(self, order, ids):
        batch: list[int] = []
        for i in order:  # ascending length: the last text added is the longest in its batch
            if batch and (len(batch) + 1) * len(ids[i]) > BATCH_TOKENS or len(batch) == MAX_BATCH:
                yield batch
                batch = []
            batch.append(int(i))
        if batch:
            yield batch

    def _pad(self, ids: list[list[int]]) -> dict:
        """(B, T) input ids and attention mask, padded on the tokenizer's side. Plain numpy, not the
        tokenizer's `pad`: it runs inside the worker threads, which must not share the fast tokenizer."""
        import torch

        width = max(len(row) for row in ids)
        input_ids = np.full((len(ids), width), self.tokenizer.pad_token_id or 0, np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for r, row in enumerate(ids):
            span = slice(width - len(row), width) if self.tokenizer.padding_side == "left" else slice(0, len(row))
            input_ids[r, span], mask[r, span] = row, 1
        return {"input_ids": torch.from_numpy(input_ids).to(self.device),
                "attention_mask": torch.from_numpy(mask).to(self.device)}

    def _forward(self, ids: list[list[int]], model) -> np.ndarray:
        import torch

        padded = self._pad(ids)
        with torch.inference_mode():
            hidden = model(**padded).last_hidden_state.float()  # (B, T, dim), pooled in float32
        mask = padded["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, dim)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    def _check_first_batch(self, ids, rows: np.ndarray) -> np.ndarray:
        """Compare CHECK_ROWS fast rows with float32 ones; on a gap above MAX_COSINE_GAP redo the batch
        in float32 and stay there."""
        picks = np.linspace(0, len(ids) - 1, min(CHECK_ROWS, len(ids))).round().astype(int)
        reference = self._forward([ids[i] for i in picks], self.reference)
        self.first_batch_gap = float((1.0 - (rows[picks] * reference).sum(1)).max())
        if self.first_batch_gap <= MAX_COSINE_GAP:
            return rows
        self.dtype, self.model = "float32", self.reference  # float32 from here on
        return self._forward(ids, self.model)


def pack_linears(model) -> int:
    """Run a bf16 BERT's linear layers through oneDNN with weights packed once into its blocked layout, and
    fuse the exact GELU into the intermediate layer. A plain `F.linear` reorders the weight on every call.
    Returns how many layers were packed: 0 for another architecture. The caller asks `hardware.pack` first."""
    import torch

    class PackedLinear(torch.nn.Module):
        def __init__(self, linear, gelu: bool = False):
            super().__init__()
            self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())  # not a Parameter
            self.bias = None if linear.bias is None else linear.bias.detach()
            self.gelu = gelu

        def forward(self, x):
            if self.gelu:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "none")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")

    packed = 0
    for layer in getattr(getattr(model, "encoder", None), "layer", None) or []:
        attention, intermediate = getattr(layer, "attention", None), getattr(layer, "intermediate", None)
        if attention is None or intermediate is None:
            return packed
        for owner, name in ((attention.self, "query"), (attention.self, "key"), (attention.self, "value"),
                            (attention.output, "dense"), (layer.output, "dense")):
            setattr(owner, name, PackedLinear(getattr(owner, name)))
        # BERT's "gelu" is the exact (erf) GELU, which is what oneDNN's "gelu" with algorithm "none" computes
        act = intermediate.intermediate_act_fn
        exact = type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu
        intermediate.dense = PackedLinear(intermediate.dense, gelu=exact)
        if exact:
            intermediate.intermediate_act_fn = torch.nn.Identity()
        packed += 6
    return packed
