"""Mixed-order groups (`ragrpo.tuning.groups`): a question's G answers made under orders that put its
source at every position, held together through TRL's sampler, so the group's own mean charges a
position habit."""

import json
from collections import Counter

import pytest

from ragrpo import RagrpoError
from ragrpo.tuning.curriculum import IndexSource
from ragrpo.tuning.groups import (
    GROUP_COLUMN,
    GroupSampler,
    grouped_trainer_class,
    question_groups,
)
from ragrpo.tuning.orders import mixed_orders


def test_each_question_gets_its_group_of_orders_with_the_source_at_every_position():
    ids = [[f"d{q}", f"e{q}", f"f{q}"] for q in range(300)]
    sources = [row[0] for row in ids]  # the retriever put the source first every time
    orders = mixed_orders(ids, sources, group=8, seed=3)
    assert len(orders) == 300 and all(len(group) == 8 for group in orders)
    assert all(sorted(order) == [0, 1, 2] for group in orders for order in group)
    for group in orders:  # 8 answers over 3 positions: 3, 3 and 2
        assert sorted(Counter(order.index(0) for order in group).values()) == [2, 3, 3]
        assert len({tuple(order) for order in group}) == 3  # k prompts to prefill, not 8
    # which position gets the short share is dealt per question, so no position is short over a run
    short = Counter(min(Counter(o.index(0) for o in group), key=Counter(o.index(0) for o in group).get)
                    for group in orders)
    assert set(short) == {0, 1, 2} and min(short.values()) > 60
    assert orders == mixed_orders(ids, sources, group=8, seed=3) != mixed_orders(ids, sources, group=8, seed=4)


def test_a_question_marked_not_first_gets_its_group_over_the_later_positions_only():
    ids = [["s", "y", "z"], ["t", "u", "v"]]
    [late, plain] = mixed_orders(ids, ["s", "t"], group=8, seed=0, not_first=[True, False])
    assert Counter(order.index(0) for order in late) == {1: 4, 2: 4}
    assert {order.index(0) for order in plain} == {0, 1, 2}


def test_a_question_without_its_source_gets_shuffles_and_a_short_hit_list_fewer_orders():
    [group] = mixed_orders([["x", "y", "z"]], ["missing"], group=4, seed=0)
    assert all(sorted(order) == [0, 1, 2] for order in group)
    [group] = mixed_orders([["s", "y"]], ["s"], group=4, seed=0)
    assert Counter(order.index(0) for order in group) == {0: 2, 1: 2}
    with pytest.raises(RagrpoError, match="at least one answer"):
        mixed_orders([["s"]], ["s"], group=0, seed=0)


@pytest.mark.parametrize("batch_questions, repeats", [(1, 1), (2, 1), (2, 3)])
def test_the_sampler_yields_each_questions_rows_where_trl_repeats_it(batch_questions, repeats):
    from trl.trainer.utils import RepeatSampler

    keys = [q for q in range(10) for _ in range(4)]
    rows = {GROUP_COLUMN: [keys[i] for i in (7 * n % 40 for n in range(40))]}  # rows shuffled, as build_dataset does
    groups = question_groups(rows, 4)
    trl_sampler = lambda: RepeatSampler(range(len(groups)), mini_repeat_count=4, batch_size=batch_questions,
                                        repeat_count=repeats, seed=0)
    questions = list(trl_sampler())[::4]  # the question TRL would repeat in each block of 4, in its order
    sampler = GroupSampler(trl_sampler(), groups)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 10 // batch_questions * batch_questions * 4 * repeats
    blocks = [drawn[i:i + 4] for i in range(0, len(drawn), 4)]
    for block, question in zip(blocks, questions, strict=True):
        assert sorted(block) == sorted(groups[question])  # all four of its rows, not one row four times
        assert len({rows[GROUP_COLUMN][i] for i in block}) == 1
    assert Counter(tuple(b) for b in blocks) == Counter({tuple(groups[q]): repeats for q in set(questions)})


def test_a_group_of_the_wrong_size_is_refused_with_one_line():
    with pytest.raises(RagrpoError, match="question 1 has 3 training rows, but num_generations is 4"):
        question_groups({GROUP_COLUMN: [0, 0, 0, 0, 1, 1, 1]}, 4)


def test_vllm_server_mode_is_refused_before_the_trainer_starts():
    class Base:
        def __init__(self, *args, **kwargs):
            self.started = True

    class Args:
        use_vllm, vllm_mode = True, "server"

    with pytest.raises(RagrpoError, match="server mode"):
        grouped_trainer_class(Base)(args=Args())
    Args.vllm_mode = "colocate"
    assert grouped_trainer_class(Base)(args=Args()).started


def test_max_samples_keeps_whole_questions(tmp_path, base_model):
    from ragrpo.config import build_run_config
    from ragrpo.tuning.train import build_dataset

    _, tokenizer = base_model
    rows = [{"prompt": [{"role": "user", "content": f"question {q}, order {o}"}], GROUP_COLUMN: q}
            for q in range(6) for o in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_run_config(output=str(tmp_path / "run"), dataset=str(tmp_path / "train.jsonl"), held_out=0.0,
                           max_samples=2, seed=5)
    dataset = build_dataset(cfg, tokenizer)
    assert sorted(Counter(dataset[GROUP_COLUMN]).values()) == [4, 4]


SEEN = []  # what `seen_groups` was handed, one list per reward call


def seen_groups(prompts, completions, query, source_rank, question_group=None, **kwargs):
    """A reward that records its batch (named in the run's rewards as `test_groups.seen_groups`)."""
    SEEN.append(list(zip(question_group or [None] * len(query), query, source_rank, strict=True)))
    return [0.0] * len(prompts)


@pytest.mark.integration
def test_a_mixed_order_run_scores_each_question_under_every_source_position(movie_db, tiny_model_dir, tmp_path):
    from ragrpo.config import build_run_config
    from ragrpo.tuning.curriculum import from_index_config, train_from_index

    SEEN.clear()
    source = IndexSource("movies", str(movie_db), k=2, held_out=0.2, max_documents=30, order="mixed")
    cfg = build_run_config(output=str(tmp_path / "run"), model=str(tiny_model_dir), max_steps=3, num_generations=2,
                           max_completion_length=8, rewards=["answer_match", "test_groups.seen_groups=0"],
                           grpo={"per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no"})
    result, curriculum = train_from_index(from_index_config(cfg, source, rewards_given=True), source)
    assert result.steps == 3
    rows = [json.loads(line) for line in (result.output / "curriculum" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * curriculum.train_questions
    split = json.loads((result.output / "curriculum" / "split.json").read_text())
    assert split["train_questions"] == curriculum.train_questions == len({r[GROUP_COLUMN] for r in rows})
    assert sum(split["train_kinds"].values()) == split["train_questions"]  # kinds count questions, not rows
    assert len(SEEN) == 3 and all(len(batch) == 4 for batch in SEEN)  # 2 questions a step, 2 answers each
    retrieved = 0
    for batch in SEEN:
        for first, second in (batch[0:2], batch[2:4]):  # TRL's groups: consecutive num_generations rows
            assert first[0] == second[0] and first[1] == second[1]  # one question
            if first[2]:  # its source was retrieved: once at each position
                assert {first[2], second[2]} == {1, 2}
                retrieved += 1
    assert retrieved >= 3


@pytest.mark.integration
def test_a_run_trains_its_first_questions_with_the_source_below_passage_1_in_the_order_written(
        movie_db, tiny_model_dir, tmp_path):
    from ragrpo.config import build_run_config
    from ragrpo.tuning.curriculum import from_index_config, train_from_index

    SEEN.clear()
    source = IndexSource("movies", str(movie_db), k=3, held_out=0.2, max_documents=30, not_first_questions=4)
    cfg = build_run_config(output=str(tmp_path / "run"), model=str(tiny_model_dir), max_steps=5, num_generations=2,
                           max_completion_length=8, rewards=["answer_match", "test_groups.seen_groups=0"],
                           grpo={"per_device_train_batch_size": 2, "logging_steps": 1, "save_strategy": "no"})
    result, _ = train_from_index(from_index_config(cfg, source, rewards_given=True), source)
    assert result.steps == 5 and len(SEEN) == 5
    rows = [json.loads(line) for line in (result.output / "curriculum" / "train.jsonl").read_text().splitlines()]
    # step n trains the n-th row written, in both of its answers; the first 4 never show their source first
    assert [{(query, rank) for _, query, rank in batch} for batch in SEEN] == [
        {(row["query"], row["source_rank"])} for row in rows[:5]]
    assert all(row["source_rank"] != 1 for row in rows[:4])
