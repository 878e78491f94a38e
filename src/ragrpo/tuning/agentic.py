"""GRPO rollouts that search: TRL's `rollout_func` running `generation.agentic`'s loop.

SmolLM2's chat template has no tool support (it reads only each message's role and content, so TRL's
`tools=` and `environment_factory=` refuse it), so the search calls use tags in the assistant's own text
instead (`ragrpo.prompts`: `<search>` and `<information>`). TRL hands `rollout_func` the batch's prompts,
each already repeated once per completion of its group, and takes back per row the prompt's ids, the
completion's ids, `env_mask` (1 for tokens the model wrote, 0 for the results the loop inserted: the loss
and the completion-length metrics count only the 1s) and any other column, which reaches the rewards
in place of the dataset's: here `context`, `context_ids` (the passages the searches showed), `searches`
and `passage_names`.

Sampling runs on the fast engine's `SamplingCopy` where the run has one (`--engine fast`), else on the
LoRA-wrapped policy's own `generate`. The rollout returns no sampling log-probabilities, so TRL
computes the old policy's itself, as it does for the fast engine's ordinary completions.
"""

from __future__ import annotations

import os

from ragrpo.generation.agentic import (
    SearchTool,
    agentic_prompt_ids,
    copy_sampler,
    model_sampler,
    run,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL warns that rollout_func is experimental


class AgenticRollout:
    """`rollout_func(prompts, trainer)` for GRPOTrainer: each prompt's row through the search loop."""

    def __init__(self, tool: SearchTool, max_searches: int):
        self.tool, self.max_searches = tool, max_searches

    def __call__(self, prompts, trainer) -> dict:
        import torch

        tokenizer = trainer.processing_class
        prompt_ids = [agentic_prompt_ids(tokenizer, prompt) for prompt in prompts]
        eos = list(trainer.eos_token_ids)
        sampler = trainer.sampling_copy() if hasattr(trainer, "sampling_copy") else None
        if sampler is not None:
            sample = copy_sampler(sampler, trainer.generation_config, tokenizer, eos)
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
            sample = model_sampler(model, trainer.generation_config, tokenizer, eos)
        with torch.no_grad():
            rows = run(sample, tokenizer, prompt_ids, self.tool, max_searches=self.max_searches,
                       max_new_tokens=trainer.max_completion_length, eos_token_ids=eos)
        out = {"prompt_ids": prompt_ids, "completion_ids": [row.ids for row in rows], "logprobs": None,
               "env_mask": [row.mask for row in rows]}
        for name in ("context", "context_ids", "searches"):
            out[name] = [row.record()[name] for row in rows]
        out["passage_names"] = [row.names for row in rows]  # `answer_match` counts the non-source ones as hedges
        return out


def run_tool(split: dict, table) -> SearchTool:
    """The search an agentic from-index run trained with, over `table`: its filter, k, mode and passage header."""
    from ragrpo.prompts import table_style

    source = split["source"]
    return SearchTool(table, where=source.get("where"), k=source["k"], mode=source["mode"],
                      style=table_style(table, source.get("header")))
