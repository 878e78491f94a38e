"""Retrieval-augmented answers: retrieve, build the write-up's prompt, generate through the chat template.

The prompt is the write-up's, word for word, with one newline added after `#Context` (the write-up
glued the first passage's header to it):

    Given the Query: {query}

    And the context
    #Context
    ## Movie- 1:
    {text of hit 1}
    ...
    Answer concisely but creatively
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ragrpo import RagrpoError
from ragrpo.index import DEFAULT_DB, open_table
from ragrpo.retrieve import search, text_column

PROMPT_TEMPLATE = "Given the Query: {query}\n\nAnd the context\n#Context\n{context}\n\nAnswer concisely but creatively"
PASSAGE_TEMPLATE = "## Movie- {n}:\n{text}"
# `--reasoning` (ask and train --from-index) appends this to the prompt; written for this project.
REASONING_INSTRUCTION = ("First reason about the context inside <think> </think>, then give only the answer "
                         "inside <answer> </answer>.")
# `--cite` appends this: the write-up's prompt never asks for sources, so a model has no reason to name one.
CITE_INSTRUCTION = "After the answer, cite the movie it comes from by its number, e.g. [2] for Movie- 2."
DEFAULT_QUERY = "What's common in movies where the protagonist turns out to be the bad guy"


@dataclass
class Answer:
    query: str
    text: str
    sources: list[dict] = field(default_factory=list)
    prompt: str = ""
    raw: str = ""  # the whole completion; with reasoning, `text` is its <answer> section only


def build_prompt(query: str, passages: list[str], reasoning: bool = False, cite: bool = False) -> str:
    """The write-up's prompt; `cite` and `reasoning` each append one sentence of instructions."""
    context = "\n\n".join(PASSAGE_TEMPLATE.format(n=i + 1, text=text) for i, text in enumerate(passages))
    prompt = PROMPT_TEMPLATE.format(query=query, context=context)
    prompt = f"{prompt}\n\n{CITE_INSTRUCTION}" if cite else prompt
    return f"{prompt}\n\n{REASONING_INSTRUCTION}" if reasoning else prompt


def source_label(row: dict) -> str:
    """'Title (1987)' when the row has a title and a year, else its id or first short field."""
    title = row.get("title")
    year = row.get("release_year", row.get("year"))
    if title:
        return f"{title} ({year})" if year is not None else str(title)
    for key, value in row.items():
        if not key.startswith("_") and isinstance(value, (int, str)) and len(str(value)) <= 80:
            return f"{key}={value}"
    return "(untitled)"


def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Completions for a batch of chat conversations; temperature 0 means greedy decoding.

    `repetition_penalty` > 1 divides the scores of tokens already in the text (transformers' CTRL-style
    penalty); it keeps small models' greedy answers out of loops.
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            repetition_penalty=repetition_penalty, **sampling
        )  # (B, prompt + new)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new_tokens]


def retrieve(table, query: str, *, where: str | None = None, k: int = 5, mode: str = "vector",
             rerank: str | None = None) -> tuple[list[dict], str]:
    """The hits for `query` (by `mode`: vector, fts or hybrid) and the name of the text column they carry."""
    hits = search(table, query, where=where, k=k, mode=mode, rerank=rerank)
    if not hits:
        raise RagrpoError(f"no rows match --where {where!r}; nothing to answer from" if where else "the table is empty")
    return hits, text_column(table)


def answer_from_hits(model, tokenizer, query: str, hits: list[dict], column: str, *,
                     max_new_tokens: int = 128, temperature: float = 0.0, repetition_penalty: float = 1.0,
                     reasoning: bool = False, cite: bool = False) -> Answer:
    from ragrpo.rewards import answer_text

    prompt = build_prompt(query, [hit[column] for hit in hits], reasoning=reasoning, cite=cite)
    [text] = generate(model, tokenizer, [[{"role": "user", "content": prompt}]], max_new_tokens=max_new_tokens,
                      temperature=temperature, repetition_penalty=repetition_penalty)
    sources = [{key: value for key, value in hit.items() if key != column} for hit in hits]
    shown = answer_text(text) if reasoning else text.strip()
    return Answer(query=query, text=shown, sources=sources, prompt=prompt, raw=text.strip())


def ask(query: str, table: str, model: str | None, *, db: str | Path = DEFAULT_DB, where: str | None = None,
        k: int = 5, max_new_tokens: int = 128, temperature: float = 0.0, repetition_penalty: float = 1.0,
        mode: str = "vector", rerank: str | None = None, reasoning: bool = False, cite: bool = False) -> Answer:
    """Retrieve `k` passages for `query` (prefiltered by `where`), then answer from them with `model`.

    Retrieval runs first, so a bad table or filter fails before the model is loaded.
    """
    from ragrpo.models import load_model

    hits, column = retrieve(open_table(table, db), query, where=where, k=k, mode=mode, rerank=rerank)
    lm, tokenizer = load_model(model)
    return answer_from_hits(lm, tokenizer, query, hits, column, max_new_tokens=max_new_tokens,
                            temperature=temperature, repetition_penalty=repetition_penalty, reasoning=reasoning,
                            cite=cite)
