"""The one decode engine (ragrpo.generation.decode): rows at their own positions share steps without
changing what each row would have produced alone."""

import pytest
import torch

from ragrpo.generation.decode import Engine, Row, Sampling, choose
from ragrpo.generation.engine import SamplingCopy, _projections


def _engine(model, slots=4, capacity=64, kind="plain"):
    copy = SamplingCopy(model, dtype=torch.float32)
    return Engine(copy.model, _projections(copy.model, copy.fused, kind), slots=slots, capacity=capacity), copy


def _alone(model, prompt, sampling, eos=(2,), capacity=64):
    engine, _ = _engine(model, capacity=capacity)
    row = Row(prompt, sampling, list(eos), "cpu")
    engine.add([row])
    while engine.rows:
        for ended in engine.step():
            engine.remove(ended)
    return row.new


def _run_staggered(engine, arrivals: dict[int, list[Row]], steps=200):
    """Add each step's arrivals before that step (continuous batching); remove rows as they end."""
    for step in range(steps):
        if arrivals.get(step):
            engine.add(arrivals[step])
        if engine.rows:
            for ended in engine.step():
                engine.remove(ended)
        elif step > max(arrivals):
            return
    raise AssertionError("rows still running")


def test_rows_joining_and_leaving_a_running_batch_decode_as_they_would_alone(tiny_causal_lm):
    model, _ = tiny_causal_lm
    torch.manual_seed(4)
    prompts = [torch.randint(5, 1000, (n,)).tolist() for n in (7, 3, 11, 5, 7)]
    greedy = [Sampling(max_new_tokens=n, do_sample=False) for n in (12, 4, 9, 15, 6)]
    expected = [_alone(model, p, s) for p, s in zip(prompts, greedy)]
    engine, _ = _engine(model, slots=3)
    rows = [Row(p, s, [2], "cpu") for p, s in zip(prompts, greedy)]
    # two at first, one after 2 steps, one after 5 (the 4-token row has left), one after 12 (so has the first)
    _run_staggered(engine, {0: rows[:2], 2: rows[2:3], 5: rows[3:4], 12: rows[4:]})
    assert [r.new for r in rows] == expected
    assert all(r.finish_reason == ("stop" if r.new[-1] == 2 else "length") for r in rows)
    assert engine.rows == [] and engine.pending is None


@pytest.mark.parametrize("chunk", [1, 4, 17, 64])
def test_a_prompt_prefilled_in_chunks_between_steps_decodes_as_it_would_prefilled_whole(tiny_causal_lm, chunk):
    """A long prompt prefilled a chunk at a time while another row decodes: both rows give the tokens they give
    alone, and the other row takes a step between every two chunks."""
    model, _ = tiny_causal_lm
    torch.manual_seed(8)
    running, long = torch.randint(5, 1000, (5,)).tolist(), torch.randint(5, 1000, (40,)).tolist()
    budgets = [Sampling(max_new_tokens=n, min_new_tokens=n, do_sample=False) for n in (50, 20)]
    expected = [_alone(model, running, budgets[0]), _alone(model, long, budgets[1])]
    engine, _ = _engine(model, slots=2)
    first, second = Row(running, budgets[0], [2], "cpu"), Row(long, budgets[1], [2], "cpu")
    engine.add([first])
    prefill, chunks = engine.begin(second), 0
    while not engine.advance(prefill, chunk):
        chunks += 1
        engine.step()  # the running row goes on between chunks
    assert chunks == -(-len(long) // chunk) - 1 and len(first.new) == chunks
    assert engine.rows == [first, second] and prefill.done == len(long)
    while engine.rows:
        for ended in engine.step():
            engine.remove(ended)
    assert [first.new, second.new] == expected


def test_a_prefill_that_would_not_fit_is_refused_before_it_starts_and_when_it_would_join(tiny_causal_lm):
    model, _ = tiny_causal_lm
    engine, _ = _engine(model, slots=1, capacity=32)
    with pytest.raises(ValueError, match="exceeds the engine's capacity of 32"):
        engine.begin(Row(list(range(5, 30)), Sampling(max_new_tokens=10), [2], "cpu"))
    prefill = engine.begin(Row(list(range(5, 15)), Sampling(max_new_tokens=4), [2], "cpu"))
    engine.add([Row([5, 6], Sampling(max_new_tokens=4), [2], "cpu")])  # the one slot is taken meanwhile
    assert engine.advance(prefill, 4) is False
    with pytest.raises(ValueError, match="2 rows do not fit 1 slots"):
        engine.advance(prefill, 100)


def test_greedy_rows_equal_transformers_generate(tiny_causal_lm):
    model, _ = tiny_causal_lm
    torch.manual_seed(6)
    prompts = [torch.randint(5, 1000, (n,)).tolist() for n in (8, 4)]
    for prompt in prompts:
        with torch.no_grad():
            want = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                  pad_token_id=0, eos_token_id=2)[0, len(prompt):].tolist()
        assert _alone(model, prompt, Sampling(max_new_tokens=10, do_sample=False)) == want[: want.index(2) + 1
                                                                                                 if 2 in want else None]


def test_rows_with_different_settings_share_a_step(tiny_causal_lm):
    """A greedy row, a seeded sampled row, a penalised row and a top-p/min-p row in one batch give what each
    gives alone; the seeded row's tokens do not depend on who else is in the batch."""
    model, _ = tiny_causal_lm
    torch.manual_seed(8)
    prompt = torch.randint(5, 1000, (6,)).tolist()
    settings = [Sampling(max_new_tokens=10, do_sample=False),
                Sampling(max_new_tokens=10, temperature=0.8, top_k=20, seed=11),
                Sampling(max_new_tokens=10, do_sample=False, repetition_penalty=1.8),
                Sampling(max_new_tokens=10, temperature=1.3, top_p=0.9, min_p=0.05, seed=12),
                Sampling(max_new_tokens=10, do_sample=False, frequency_penalty=1.5, presence_penalty=0.5)]
    alone = [_alone(model, prompt, s) for s in settings]
    engine, _ = _engine(model, slots=5)
    rows = [Row(prompt, s, [2], "cpu") for s in settings]
    _run_staggered(engine, {0: rows})
    assert [r.new for r in rows] == alone
    assert alone[0] != alone[2], "the penalty changed the greedy row"
    assert alone[0] != alone[4], "so did OpenAI's penalties"
    sampled_again = _alone(model, prompt, Sampling(max_new_tokens=10, temperature=0.8, top_k=20, seed=11))
    assert sampled_again == alone[1]


@pytest.mark.parametrize("frequency,presence,expected,pick", [
    # scores before: token 3 1.0 (generated twice), token 7 0.8 (once), token 5 0.5, token 9 0.2 (only in the
    # prompt), the rest 0
    (0.0, 0.0, {3: 1.0, 7: 0.8, 9: 0.2}, 3),
    (0.5, 0.0, {3: 0.0, 7: 0.3, 9: 0.2}, 5),
    (0.0, 0.25, {3: 0.75, 7: 0.55, 9: 0.2}, 3),
    (0.5, 0.25, {3: -0.25, 7: 0.05, 9: 0.2}, 5),
    (-1.0, 0.0, {3: 3.0, 7: 1.8, 9: 0.2}, 3),  # negative values favour repeats, as OpenAI allows
])
def test_frequency_and_presence_penalties_count_only_generated_tokens(frequency, presence, expected, pick):
    from ragrpo.generation.decode import penalize_generated

    row = Row([9, 9, 9], Sampling(do_sample=False, frequency_penalty=frequency, presence_penalty=presence), [], "cpu")
    row.new = [3, 7, 3]
    history = torch.tensor([[9, 9, 9, 3, 7, 3]])
    logits = torch.zeros(1, 12)
    logits[0, [3, 7, 5, 9]] = torch.tensor([1.0, 0.8, 0.5, 0.2])
    scores = logits.clone()
    penalize_generated(scores[0], row.new, frequency, presence)
    assert {token: scores[0, token].item() for token in expected} == pytest.approx(expected)
    untouched = [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]
    assert scores[0, untouched].tolist() == logits[0, untouched].tolist()
    assert choose(logits, [row], history).tolist() == [pick]


@pytest.mark.parametrize("case", ["top_k", "top_p", "min_p"])
def test_choose_keeps_exactly_the_tokens_transformers_warpers_keep(case):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    warper, sampling = {"top_k": (TopKLogitsWarper(7), Sampling(top_k=7)),
                        "top_p": (TopPLogitsWarper(0.8), Sampling(top_p=0.8)),
                        "min_p": (MinPLogitsWarper(0.1), Sampling(min_p=0.1))}[case]
    allowed = torch.isfinite(warper(None, logits.clone()))
    rows = [Row([1], sampling, [], "cpu") for _ in range(3)]
    drawn = torch.stack([choose(logits, rows, torch.ones((3, 2), dtype=torch.long)) for _ in range(400)])  # (400, 3)
    for r in range(3):
        assert set(drawn[:, r].tolist()) <= set(allowed[r].nonzero().flatten().tolist())
    if case == "top_k":
        assert all(len(set(drawn[:, r].tolist())) > 1 for r in range(3))  # it does sample


def test_a_row_beyond_the_capacity_or_the_slots_is_refused(tiny_causal_lm):
    model, _ = tiny_causal_lm
    engine, _ = _engine(model, slots=1, capacity=16)
    with pytest.raises(ValueError, match="exceeds the engine's capacity of 16"):
        engine.add([Row(list(range(5, 15)), Sampling(max_new_tokens=8), [2], "cpu")])
    engine.add([Row([5, 6], Sampling(max_new_tokens=4), [2], "cpu")])
    with pytest.raises(ValueError, match="do not fit 1 slots"):
        engine.add([Row([5, 6], Sampling(max_new_tokens=4), [2], "cpu")])


@pytest.mark.parametrize("kind", ["onednn", "fp16"])
def test_staggered_greedy_rows_on_the_packaged_model(base_model, force_hardware, kind):
    """The packaged SmolLM2 in float32, with its weights packed for oneDNN or in fp16 for fbgemm: rows that join
    a running batch decode the tokens they decode alone."""
    from conftest import needs_fp16, needs_packing

    if kind == "onednn":
        needs_packing(torch.float32)
    else:
        needs_fp16()
    model, tokenizer = base_model
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_dict=False)
               for text in ("Name a red fruit.", "What is the capital of France?", "Count to five.")]
    sampling = Sampling(max_new_tokens=16, do_sample=False)
    eos = [tokenizer.eos_token_id]
    copy = SamplingCopy(model, dtype=torch.float32)

    def engine():
        return Engine(copy.model, _projections(copy.model, copy.fused, kind), slots=3, capacity=128)

    alone = []
    for prompt in prompts:
        single = engine()
        row = Row(prompt, sampling, eos, "cpu")
        _run_staggered(single, {0: [row]})
        alone.append(row.new)
    rows = [Row(p, sampling, eos, "cpu") for p in prompts]
    _run_staggered(engine(), {0: rows[:1], 3: rows[1:2], 7: rows[2:]})
    assert [r.new for r in rows] == alone
    assert all(len(r.new) > 3 for r in rows)


def test_the_batcher_bounds_its_queue_and_frees_a_cancelled_row(tiny_causal_lm):
    import time

    from ragrpo.generation.batching import Batcher, QueueFull

    model, tokenizer = tiny_causal_lm
    copy = SamplingCopy(model, dtype=torch.float32)
    batcher = Batcher(copy.model, _projections(copy.model, copy.fused, "plain"), tokenizer, max_batch=1,
                      max_waiting=1, capacity=256)
    try:
        long = Sampling(max_new_tokens=200, min_new_tokens=200, do_sample=False)
        first = batcher.submit([5, 6, 7], long, [2], [])
        deadline = time.monotonic() + 30
        while batcher.health()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = batcher.submit([8, 9], Sampling(max_new_tokens=3, do_sample=False), [2], [])  # waits
        with pytest.raises(QueueFull, match="1 requests waiting"):
            batcher.submit([8, 9], Sampling(max_new_tokens=3, do_sample=False), [2], [])
        first.cancel()
        while second.pieces.get(timeout=30) is not None:
            pass
        assert second.finish_reason in ("stop", "length") and first.finish_reason is None
        assert batcher.health() == {"running": 0, "waiting": 0, "max_batch": 1, "served": 1, "cancelled": 1,
                                    "errors": 0}
    finally:
        batcher.close()


@pytest.mark.parametrize("release", [None, "0"])
def test_an_idle_batcher_ends_its_openmp_team(tiny_causal_lm, force_hardware, release):
    """Between requests the engine's thread hands its OpenMP workers back, so an agentic request's loop, which
    runs on its own thread meanwhile, has the only team (hardware.release_openmp); RAGRPO_OMP_RELEASE=0 keeps
    them."""
    import os
    import time

    from conftest import needs_openmp_release

    from ragrpo.generation.batching import Batcher

    needs_openmp_release()
    force_hardware(OMP_RELEASE=release)
    model, tokenizer = tiny_causal_lm
    copy = SamplingCopy(model, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a new thread takes the count last set: the engine's thread gets 2
    batcher = Batcher(copy.model, _projections(copy.model, copy.fused, "plain"), tokenizer, max_batch=2,
                      max_waiting=2, capacity=256)
    torch.set_num_threads(threads)
    try:
        before = set(os.listdir("/proc/self/task"))
        generation = batcher.submit([5, 6, 7], Sampling(max_new_tokens=200, min_new_tokens=200, do_sample=False),
                                    [2], [])
        seen, pieces = set(), []
        while not pieces or pieces[-1] is not None:  # the team lives while the row decodes: look all along
            seen |= set(os.listdir("/proc/self/task"))
            pieces += [generation.pieces.get_nowait() for _ in range(generation.pieces.qsize())]
        team = seen - before
        assert team, "decoding a row started no OpenMP worker"
        deadline = time.monotonic() + 10
        while release is None and team & set(os.listdir("/proc/self/task")) and time.monotonic() < deadline:
            time.sleep(0.01)
        alive = team & set(os.listdir("/proc/self/task"))
        assert (not alive) if release is None else alive == team
        assert batcher.health()["served"] == 1 and generation.completion_tokens == 200
    finally:
        batcher.close()


def test_the_batcher_prefills_a_long_prompt_in_chunks_while_its_rows_decode(tiny_causal_lm):
    """A 40-token prompt with 8-token chunks joins a running row after 5 chunks, the running row stepping between
    them; a prompt that arrives while nothing decodes is prefilled in one go. Both give their lone tokens."""
    import time

    from ragrpo.generation.batching import Batcher

    model, tokenizer = tiny_causal_lm
    torch.manual_seed(9)
    running, long = torch.randint(5, 1000, (5,)).tolist(), torch.randint(5, 1000, (40,)).tolist()
    budgets = [Sampling(max_new_tokens=n, min_new_tokens=n, do_sample=False) for n in (150, 20)]
    copy = SamplingCopy(model, dtype=torch.float32)
    batcher = Batcher(copy.model, _projections(copy.model, copy.fused, "plain"), tokenizer, max_batch=2,
                      max_waiting=2, capacity=256, prefill_chunk=8)
    try:
        first = batcher.submit(running, budgets[0], [2], [])
        deadline = time.monotonic() + 30
        while not first.row.new:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        second = batcher.submit(long, budgets[1], [2], [])
        for generation in (second, first):
            while generation.pieces.get(timeout=60) is not None:
                pass
        assert first.prefill_steps == 0  # nothing was decoding: one go
        assert second.prefill_steps == 4 and len(first.row.new) == 150  # a step after each of the first 4 chunks
        expected = [_alone(model, p, b, capacity=256) for p, b in zip((running, long), budgets)]
        assert [first.row.new, second.row.new] == expected
    finally:
        batcher.close()


def test_bf16_rows_decoded_together_or_alone_stay_within_rounding_of_float32(base_model, force_hardware):
    """In bf16 the packed matmuls' blocking depends on the number of rows, so a batched row's logits differ from
    its lone logits by rounding (and a near-tie may flip: the server's exact-token test runs in float32). Both
    stay within bf16 rounding of the float32 model's logits, and pick its token or one as good."""
    from conftest import needs_packing

    needs_packing(torch.bfloat16)
    model, tokenizer = base_model
    copy = SamplingCopy(model, dtype=torch.bfloat16)
    projections = _projections(copy.model, copy.fused, "onednn")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_dict=False) for text in ("Name a red fruit.", "Count to five.")]
    greedy = Sampling(max_new_tokens=8, do_sample=False)
    together = Engine(copy.model, projections, slots=2, capacity=96)
    together.add([Row(p, greedy, [], "cpu") for p in prompts])  # one left-padded prefill for both
    with torch.no_grad():
        steps = together._step(torch.tensor([17, 23]), torch.tensor([len(p) for p in prompts]))
        for n, prompt in enumerate(prompts):
            single = Engine(copy.model, projections, slots=1, capacity=96)
            single.add([Row(prompt, greedy, [], "cpu")])
            lone = single._step(torch.tensor([[17, 23][n]]), torch.tensor([len(prompt)]))[0]
            exact = model(input_ids=torch.tensor([prompt + [[17, 23][n]]])).logits[0, -1].float()  # (vocab,)
            # Measured, max / mean off float32 (logits up to 30): with AVX512-BF16 0.39 / 0.14 together and
            # 0.38 / 0.13 alone; with AMX 0.34 / 0.09 together and 0.65 / 0.34 alone (together and alone 0.53
            # apart at most). A bf16 step of a logit near 20 is 0.125.
            for logits in (steps[n], lone):
                assert (logits - exact).abs().max() < 1.0 and (logits - exact).abs().mean() < 0.5
                assert exact[logits.argmax()] >= exact.max() - 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loops_rms_norm_is_the_modules_to_the_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from ragrpo.generation.decode import _norm

    torch.manual_seed(0)
    for module in (LlamaRMSNorm(576, eps=1e-5), Qwen3RMSNorm(64, eps=1e-6)):
        module.weight.data = torch.randn(module.weight.shape) * 0.3 + 1
        module = module.to(dtype)
        x = (torch.randn(6, 1, module.weight.numel()) * 4).to(dtype)
        assert torch.equal(_norm(module, x), module(x))
