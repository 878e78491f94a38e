"""Search while answering: the model writes queries, the loop runs them and shows the results, the model answers.

The prompt gives the question and the instructions, no passages (`prompts.build_agentic_prompt`), and the
assistant's turn opens with `<search>`, so a small model that has never seen the protocol still writes a
query first. That first query ends at `</search>` or at the end of its line (the loop then inserts the
`</search>` itself): the base 135M model writes a line and rarely the tag, and a query it never closes
gives GRPO nothing to compare. Each later round samples every unfinished row until it writes `</search>`,
ends its turn, or spends its token budget. A row that closed a query gets the results of that query appended as
`<information> ... </information>` (the prompt's passage layout, numbered on from earlier results) and goes
into the next round. The tokens the loop inserted are recorded in `mask` as 0: GRPO trains only on what the
model wrote (TRL's `env_mask`).

Nothing the model writes can stop the loop. A query that is empty, a `</search>` without `<search>`, a
search beyond `max_searches` or a search that fails (a full-text query LanceDB cannot parse, say) each get a
one-line note inside the `<information>` tags instead of results. The note is recorded on the call
(`Search.error`), and the rewards score it low.

One engine serves every caller: `sample(prefixes, budgets, stop)` is a `SamplingCopy`'s decode loop in
training and evaluation, and a plain model's `generate` elsewhere (`copy_sampler`, `model_sampler`).
Simplified: each round prefills a row's whole text again (prompt, earlier rounds, results) instead of
extending its cache; a round costs one prefill per row, about 0.1 s per 100 tokens here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ragrpo.prompts import (
    SEARCH_CLOSE,
    SEARCH_OPEN,
    PassageStyle,
    build_agentic_prompt,
    passage_names,
    render_information,
    segment_query,
)
from ragrpo.retrieval.index import document_id

DEFAULT_MAX_SEARCHES = 3
FIRST_QUERY_ENDS = (SEARCH_CLOSE, "\n")  # the query the prompt opened ends at the tag or with its line


@dataclass
class Search:
    """One search call: the query as written, the documents it showed (`ids`, under passage `numbers`) and,
    when it did not run or failed, why (`error`)."""

    query: str
    ids: list[str] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    found: list[str] = field(default_factory=list)  # every document the search returned, shown before or not
    error: str | None = None


@dataclass
class Transcript:
    """One row of the loop: its prompt, the completion so far (model and inserted tokens) and what it found."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1: written by the model, 0: inserted by the loop
    searches: list[Search] = field(default_factory=list)
    context: list[str] = field(default_factory=list)  # every passage shown, in number order (header and text)
    context_ids: list[str] = field(default_factory=list)
    names: list[list[str]] = field(default_factory=list)  # what names each shown passage (title, year)
    hits: list[dict] = field(default_factory=list)  # the shown rows, for `sources`
    finish_reason: str | None = None

    @property
    def written(self) -> int:
        return sum(self.mask)

    def extend(self, ids: list[int], written: bool) -> None:
        self.ids += ids
        self.mask += [int(written)] * len(ids)

    def text(self, tokenizer) -> str:
        """The completion as text (searches, results and answer), without special tokens."""
        return tokenizer.decode(self.ids, skip_special_tokens=True)

    def record(self) -> dict:
        """What the rewards read beside the completion (TRL hands these to them as columns)."""
        return {"context": self.context, "context_ids": self.context_ids,
                "searches": [asdict(s) for s in self.searches]}


class SearchTool:
    """The search the loop runs: `ask`'s retrieval over `table` (its filter, k, mode and passage style).
    Calling it never raises: a failure comes back as the error text the model will read."""

    def __init__(self, table, *, where: str | None = None, k: int = 3, mode: str = "hybrid",
                 style: PassageStyle | None = None):
        from ragrpo.prompts import table_style
        from ragrpo.retrieval.search import text_column

        self.table, self.where, self.k, self.mode = table, where, k, mode
        self.column = text_column(table)
        self.style = style or table_style(table)

    def __call__(self, query: str) -> tuple[list[dict], str | None]:
        from ragrpo.retrieval.search import search

        try:
            return search(self.table, query, where=self.where, k=self.k, mode=self.mode), None
        except Exception as exc:  # the model's query must not end the run; it reads why instead
            return [], f"The search failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"


def run(sample, tokenizer, prompt_ids: list[list[int]], tool: SearchTool, *, max_searches: int = DEFAULT_MAX_SEARCHES,
        max_new_tokens: int = 96, eos_token_ids=(), on_search=None, cancelled=None) -> list[Transcript]:
    """The loop over a batch of prompts (token ids ending in `<search>`, `prompt_ids`). `sample(prefixes,
    budgets, stop)` continues each prefix by at most its budget of tokens, stopping after one of the `stop`
    strings or an end of sequence. `max_new_tokens` counts the model's own tokens only. `on_search(row_index,
    Search)` is called after each call (streaming shows it); `cancelled()`, asked between rounds, ends every
    unfinished row (finish reason 'cancelled': a client that left)."""
    rows = [Transcript(list(ids)) for ids in prompt_ids]
    eos = set(eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    first = True
    while live := [(n, row) for n, row in enumerate(rows) if row.finish_reason is None]:
        if cancelled is not None and cancelled():
            for _, row in live:
                row.finish_reason = "cancelled"
            break
        budgets = [max_new_tokens - row.written for _, row in live]
        stop = FIRST_QUERY_ENDS if first else (SEARCH_CLOSE,)
        segments = sample([row.prompt_ids + row.ids for _, row in live], budgets, stop)
        for (index, row), new in zip(live, segments, strict=True):
            row.extend(list(new), written=True)
            text = tokenizer.decode(new, skip_special_tokens=False)
            if new and new[-1] in eos:
                row.finish_reason = "stop"
            elif SEARCH_CLOSE not in text and not (first and text.endswith("\n")):
                row.finish_reason = "length"
            else:
                closed = "" if SEARCH_CLOSE in text else SEARCH_CLOSE  # a first query that ended with its line
                call = _call(row, segment_query(SEARCH_OPEN + text + closed if first else text), tool, max_searches)
                shown = closed + _shown(row, call, tool)
                row.extend(tokenizer(shown, add_special_tokens=False)["input_ids"], written=False)
                if on_search is not None:
                    on_search(index, call)
                if row.written >= max_new_tokens:
                    row.finish_reason = "length"
        first = False
    return rows


def _call(row: Transcript, query: str | None, tool: SearchTool, max_searches: int) -> Search:
    """Run one call of `row` (or refuse it) and record it."""
    if query is None:
        call = Search("", error=f"A search starts with {SEARCH_OPEN}; no search was run.")
    elif not query:
        call = Search("", error="The query was empty; no search was run.")
    elif len(row.searches) >= max_searches:
        call = Search(query, error=f"No searches left: answer from the {tool.style.label.lower()}s above.")
    else:
        hits, error = tool(query)
        call = Search(query, error=error, found=[document_id(hit, tool.column) for hit in hits])
        shown = {(i, c) for i, c in zip(row.context_ids, row.context)}
        for hit, doc in zip(hits, call.found):
            passage = tool.style.passage(hit, tool.column)
            if (doc, passage.context()) in shown:
                continue
            row.context.append(passage.context())
            row.context_ids.append(doc)
            row.names.append(passage_names(hit, passage.header))
            row.hits.append(hit)
            call.ids.append(doc)
            call.numbers.append(len(row.context))
    row.searches.append(call)
    return call


def _shown(row: Transcript, call: Search, tool: SearchTool) -> str:
    """The `<information>` block the model reads after `call`."""
    label = tool.style.label
    if call.error:
        return render_information([], 1, label, note=call.error)
    if not call.numbers:
        note = (f"No new {label.lower()}s; the results were shown above." if call.found
                else f"No {label.lower()} matches the query.")
        return render_information([], 1, label, note=note)
    passages = [tool.style.passage(hit, tool.column) for hit in row.hits[call.numbers[0] - 1:]]
    return render_information(passages, call.numbers[0], label)


def search_and_answer(model, tokenizer, questions: list[str], tool: SearchTool, *,
                      max_searches: int = DEFAULT_MAX_SEARCHES, max_new_tokens: int = 96, temperature: float = 0.0,
                      seed: int | None = None, sampler=None, on_search=None, cancelled=None) -> list[Transcript]:
    """Each question through the loop with `model` (greedy at temperature 0): the prompt training uses
    (`prompts.build_agentic_prompt`), sampled by `sampler` (an `engine.evaluation_sampler`) where given, else by
    the model's `generate`. `ask --agentic`, `serve` and `eval --agentic` all come here."""
    import torch
    from transformers import GenerationConfig

    from ragrpo.generation.decode import eos_ids

    settings = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **({"do_sample": True, "temperature": temperature, "top_k": 50, "top_p": 1.0}
                                   if temperature > 0 else {"do_sample": False}))
    eos = eos_ids(model, tokenizer)
    sample = (copy_sampler(sampler, settings, tokenizer, eos) if sampler is not None
              else model_sampler(model, settings, tokenizer, eos))
    label = tool.style.label
    prompts = [agentic_prompt_ids(tokenizer, [{"role": "user", "content": build_agentic_prompt(q, max_searches, label)}])
               for q in questions]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return run(sample, tokenizer, prompts, tool, max_searches=max_searches, max_new_tokens=max_new_tokens,
                   eos_token_ids=eos, on_search=on_search, cancelled=cancelled)


def ask_agentic(query: str, table: str, model: str | None, *, db="lancedb", where: str | None = None, k: int = 3,
                mode: str = "hybrid", header: str | None = None, max_searches: int = DEFAULT_MAX_SEARCHES,
                max_new_tokens: int = 128, temperature: float = 0.0, storage_options: dict[str, str] | None = None,
                on_search=None):
    """`ask` where the model searches for itself: the table opens (and a bad filter fails) before the model
    loads; returns a `rag.Answer` whose `searches` are the calls made and `sources` the rows they showed."""
    from ragrpo.generation.rag import Answer, answer_sources, retrieve
    from ragrpo.models import load_model
    from ragrpo.prompts import agentic_answer, table_style
    from ragrpo.retrieval.index import open_table
    from ragrpo.rewards.citations import drawn_from

    handle = open_table(table, db, storage_options)
    retrieve(handle, query, where=where, k=k, mode=mode)  # a bad filter or mode is one line before the model loads
    tool = SearchTool(handle, where=where, k=k, mode=mode, style=table_style(handle, header))
    lm, tokenizer = load_model(model)
    [row] = search_and_answer(lm, tokenizer, [query], tool, max_searches=max_searches, max_new_tokens=max_new_tokens,
                              temperature=temperature, on_search=None if on_search is None else
                              (lambda _, call: on_search(call)))
    raw, shown = row.text(tokenizer), tool.style.passages(row.hits, tool.column)
    answer = agentic_answer(raw)
    return Answer(query=query, text=answer, sources=answer_sources(row.hits, tool.column), raw=raw,
                  searches=[public(call) for call in row.searches], drawn_from=drawn_from(answer, shown, query))


def public(call: Search) -> dict:
    """A search call as `ask --json` and the server show it: the query, the numbers of the passages it showed
    (indexes into the answer's sources, from 1) and why it did not run, if it did not."""
    return {"query": call.query, "passages": call.numbers, "error": call.error}


def agentic_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of an agentic prompt (chat messages, or text for a model without a chat template) with the
    assistant's turn opened by `<search>`."""
    if isinstance(prompt, str):
        text = f"{prompt}\n{SEARCH_OPEN}"
    else:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) + SEARCH_OPEN
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def copy_sampler(sampler, generation_config, tokenizer, eos_token_ids: list[int]):
    """`sample` for `run` over a `SamplingCopy` (training's and evaluation's decode loop)."""
    def sample(prefixes, budgets, stop):
        return sampler.generate(prefixes, generation_config, tokenizer.pad_token_id, eos_token_ids,
                                stop=stop, tokenizer=tokenizer, budgets=budgets)

    return sample


def model_sampler(model, generation_config, tokenizer, eos_token_ids: list[int]):
    """`sample` for `run` through a model's own `generate` (a GPU, a family the decode loop does not cover,
    the plain TRL engine's LoRA-wrapped policy)."""
    from ragrpo.generation.engine import generate_ids

    def sample(prefixes, budgets, stop):
        return generate_ids(model, prefixes, generation_config, tokenizer.pad_token_id, eos_token_ids,
                            stop=stop, tokenizer=tokenizer, budgets=budgets)

    return sample
