"""Passage orders for training prompts: where each question's source sits among the passages it is shown.

The retriever ranks a question's source first for most questions, so prompts in retrieved order teach a
model to cite [1]. `balanced_orders` gives each question one order and spreads its source evenly over the
positions 1..k (the from-index default); `mixed_orders` gives each question one order per answer of its
GRPO group, with the source at every position (`--order mixed`, tuning/groups.py). Both are seeded, so a
run's prompts can be rebuilt from its split.
"""

from __future__ import annotations

import random

from ragrpo import RagrpoError


def source_and_others(ids: list[str], source: str) -> tuple[int | None, list[int]]:
    """Where the source is among a question's hits (None: not retrieved), and the other hits' indices. A second
    chunk of the source counts as another passage."""
    first = ids.index(source) if source in ids else None
    return first, [i for i in range(len(ids)) if i != first]


def balanced_orders(hit_ids: list[list[str]], sources: list[str], seed: int,
                    not_first: list[bool] | None = None) -> list[list[int]]:
    """A passage order per question that puts the source at each position 1..k equally often.

    The retriever ranks the source first for most questions, so a model trained on retrieved order can
    score by always citing [1] (a measured run did: bench/results/from-index/NOTES.md). Positions are
    dealt from shuffled blocks of 1..k, so over any k questions holding their source each position comes
    up once; the other passages are shuffled around it. A question marked in `not_first` is dealt from
    its own blocks of 2..k (where it has two passages or more): retelling passage 1 never answers it.
    Seeded, so a run's prompts can be rebuilt.
    """
    rng = random.Random(seed)
    blocks: dict[bool, list[int]] = {False: [], True: []}
    out = []
    for ids, source, late in zip(hit_ids, sources, not_first or [False] * len(sources), strict=True):
        first, others = source_and_others(ids, source)
        rng.shuffle(others)
        if first is None:
            out.append(others)
            continue
        late = late and len(ids) > 1
        if not blocks[late]:
            blocks[late] = list(range(1 if late else 0, len(ids)))
            rng.shuffle(blocks[late])
        position = min(blocks[late].pop(), len(others))
        out.append(others[:position] + [first] + others[position:])
    return out


def mixed_orders(hit_ids: list[list[str]], sources: list[str], group: int, seed: int,
                 not_first: list[bool] | None = None) -> list[list[list[int]]]:
    """For each question, `group` passage orders (indices into its hits), one per answer.

    A question whose source was retrieved gets one order per source position 1..k', k' the number of its
    hits, dealt in turn over the group from a seeded starting position (so where G is not a multiple of k',
    the positions that get the extra answers vary from question to question); the other passages are
    shuffled around the source in each; one marked in `not_first` gets the positions 2..k' only. A question
    whose source was not retrieved gets k' shuffles.

    >>> orders = mixed_orders([["a", "s", "b"]], ["s"], 8, seed=0)[0]
    >>> len(orders), sorted({order.index(1) for order in orders})
    (8, [0, 1, 2])
    """
    if group < 1:
        raise RagrpoError(f"a mixed-order group needs at least one answer, got {group}")
    rng = random.Random(seed)
    out = []
    for ids, source, late in zip(hit_ids, sources, not_first or [False] * len(sources), strict=True):
        first, others = source_and_others(ids, source)
        variants = []
        for position in range(1 if late and first is not None and len(ids) > 1 else 0, max(len(ids), 1)):
            shuffled = others[:]
            rng.shuffle(shuffled)
            variants.append(shuffled if first is None else shuffled[:position] + [first] + shuffled[position:])
        start = rng.randrange(len(variants))
        out.append([variants[(start + j) % len(variants)] for j in range(group)])
    return out
