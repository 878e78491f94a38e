"""Mixed-order groups: a question's G answers, each made under its own order of the same passages.

GRPO ranks a completion against the other completions of its group: TRL subtracts the group's mean
reward. When the G answers share one prompt, they share one passage order, and in a group whose source
is passage 1, retelling passage 1 is exactly as right as reading. A model can learn that habit and still
climb (bench/results/from-index/NOTES.md, session 22: seed 42 drew 0.76 of its held-out answers from
passage 1). Here a group's answers see the passages in k orders that put the source at each position
1..k, so an answer that retells passage 1 is right only in the rows whose source is first, and the
group's own mean charges the habit. No reward term and no label is added.

Measured, it did not break the habit: on training seed 43, where the balanced default reads, a mixed-order run
learned to retell passage 1 (held-out accuracy 0.144 against 0.375; NOTES.md, session 24). Advantages sum to
zero within a group, so the habit is charged in some rows and paid in others; right answers still come most
easily from the rows whose source is first. It stays opt-in (`--order mixed`).

TRL takes a group to be `num_generations` consecutive rows of what its sampler yields and never checks
that their prompts match. The curriculum writes G rows per question, tagged with `GROUP_COLUMN`, and
`grouped_trainer_class` swaps TRL's sampler for one that yields each question's rows together, with TRL's
own shuffling, batching and repeats. The fast engine prefills each distinct prompt once, so a step costs
k prefills and k prompt passes instead of one.

TRL's vLLM server mode generates `num_generations` answers for every G-th prompt, so it cannot serve
mixed-order groups; colocate mode generates for every row and can.
"""

from __future__ import annotations

from ragrpo import RagrpoError

GROUP_COLUMN = "question_group"  # the question a training row belongs to, when its group mixes orders


def question_groups(dataset, size: int) -> list[list[int]]:
    """The dataset's row indices grouped by `GROUP_COLUMN`, in order of first appearance; every group must
    hold `size` rows (TRL's `num_generations`), since TRL cuts groups by count."""
    groups: dict = {}
    for index, key in enumerate(dataset[GROUP_COLUMN]):
        groups.setdefault(key, []).append(index)
    wrong = next(((key, len(rows)) for key, rows in groups.items() if len(rows) != size), None)
    if wrong:
        raise RagrpoError(f"question {wrong[0]} has {wrong[1]} training rows, but num_generations is {size}: a "
                          "mixed-order curriculum is written for one group size; train it with that size")
    return list(groups.values())


class GroupSampler:
    """TRL's `RepeatSampler` over questions, yielding each question's rows in place of its G repeats.

    `inner` is TRL's sampler built over one entry per question: it yields question q `num_generations`
    times in a row, and this yields q's rows in those places, so the batching, shuffling, repeats across
    gradient steps and iterations, and the split across processes stay TRL's.
    """

    def __init__(self, inner, groups: list[list[int]]):
        self.inner, self.groups = inner, groups

    def __iter__(self):
        size = len(self.groups[0])
        for n, question in enumerate(self.inner):
            yield self.groups[question][n % size]

    def __len__(self):
        return len(self.inner)


def grouped_trainer_class(base):
    """`base` (GRPOTrainer or a subclass) with `GroupSampler` as its training sampler."""

    class MixedOrderGRPOTrainer(base):
        def __init__(self, *args, **kwargs):
            trainer_args = kwargs.get("args")
            if trainer_args is not None and trainer_args.use_vllm and trainer_args.vllm_mode == "server":
                raise RagrpoError("vLLM server mode answers every G-th prompt G times, so it cannot train "
                                  "mixed-order groups; use vllm_mode = \"colocate\" or another --order")
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, dataset=None):
            dataset = self.train_dataset if dataset is None else dataset
            groups = question_groups(dataset, self.num_generations)
            return GroupSampler(super()._get_train_sampler(range(len(groups))), groups)

    MixedOrderGRPOTrainer.__name__ = f"MixedOrder{base.__name__}"
    return MixedOrderGRPOTrainer
