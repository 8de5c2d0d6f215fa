"""Engine steps: continuous batching, prefill chunks and the follow combine rule, by hand and
on random instances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moetuner.cluster import make_cluster
from moetuner.engine import EngineSettings
from moetuner.errors import InputError
from moetuner.evaluate import compare, evaluate, replay
from moetuner.models import ModelSpec
from moetuner.placement import Placement
from moetuner.steps import (
    StepPlan,
    Steps,
    block_homes,
    combine_gpu,
    decode_steps,
    make_steps,
    prefill_steps,
    serving_steps,
    whole_trace,
)
from moetuner.trace import Trace


def test_decode_schedule_by_hand():
    # Sequences of 3, 1, 2 tokens (tokens 0-2, 3, 4-5) on 2 slots and 2 GPUs.
    # Slot 0 runs seq 0 at steps 0-2; slot 1 runs seq 1 at step 0, then seq 2 at steps 1-2.
    steps = decode_steps(np.array([3, 1, 2]), 6, concurrency=2, num_gpus=2)
    assert steps.bounds.tolist() == [0, 2, 4, 6]
    assert steps.order.tolist() == [0, 3, 1, 4, 2, 5]
    assert steps.home.tolist() == [0, 1, 0, 1, 0, 1]


def test_decode_slot_freed_takes_next_lowest_slot_first():
    # Both slots free after step 0; seq 2 goes to slot 0, seq 3 to slot 1.
    steps = decode_steps(np.array([1, 1, 1, 1, 2]), 6, concurrency=2, num_gpus=2)
    assert steps.order.tolist() == [0, 1, 2, 3, 4, 5]
    assert steps.bounds.tolist() == [0, 2, 4, 5, 6]
    assert steps.home.tolist() == [0, 1, 0, 1, 0, 0]


def test_prefill_and_whole_trace():
    steps = prefill_steps(10, 4, 2)
    assert steps.bounds.tolist() == [0, 4, 8, 10]
    assert steps.home.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 1]
    whole = whole_trace(5, 2)
    assert whole.bounds.tolist() == [0, 5] and whole.home.tolist() == [0, 1, 0, 1, 0]


@given(st.lists(st.integers(0, 6), min_size=1, max_size=30), st.integers(1, 9),
       st.integers(1, 4))
def test_decode_properties(seq_lens, concurrency, gpus):
    lens = np.array(seq_lens)
    total = int(lens.sum())
    steps = decode_steps(lens, total, concurrency, gpus)
    assert sorted(steps.order.tolist()) == list(range(total))
    assert (steps.sizes <= concurrency).all()
    assert ((steps.home >= 0) & (steps.home < gpus)).all()
    # Tokens of a sequence run in order, one per step, on one slot's GPU.
    token_step = np.empty(total, dtype=np.int64)
    token_step[steps.order] = steps.step_of
    token_home = np.empty(total, dtype=np.int64)
    token_home[steps.order] = steps.home
    start = 0
    for length in lens:
        run = token_step[start:start + length]
        assert (np.diff(run) == 1).all()
        assert len(set(token_home[start:start + length].tolist())) <= 1
        start += length
    # Chunks cover every step once, in order.
    covered = [s for lo, hi in steps.chunks(5) for s in range(lo, hi)]
    assert covered == list(range(steps.num_steps))


def test_take_and_sample():
    steps = decode_steps(np.array([3, 1, 2]), 6, concurrency=2, num_gpus=2)
    part = steps.take(np.array([2, 0]))
    assert part.order.tolist() == [2, 5, 0, 3] and part.bounds.tolist() == [0, 2, 4]
    assert part.home.tolist() == [0, 1, 0, 1]
    sample = steps.sample(2, seed=1)
    assert sample.num_steps == 2 and sample.num_tokens == 4
    assert steps.sample(10).num_tokens == 6


@given(st.integers(0, 2**32 - 1))
def test_combine_gpu_ignores_column_order(seed):
    rng = np.random.default_rng(seed)
    gpu = rng.integers(0, 4, (50, 3))
    current = rng.integers(0, 4, 50)
    base = combine_gpu(gpu, current, 4, ordered=False)
    shuffled = combine_gpu(gpu[:, rng.permutation(3)], current, 4, ordered=False)
    assert (base == shuffled).all()


def test_combine_gpu_by_hand():
    gpu = np.array([[1, 2, 2], [0, 1, 3], [3, 0, 1], [2, 2, 1]])
    current = np.array([0, 3, 2, 1])
    assert combine_gpu(gpu, current, 4, ordered=True).tolist() == [1, 0, 3, 2]
    # Most experts; else the current GPU when tied; else the lowest tied id.
    assert combine_gpu(gpu, current, 4, ordered=False).tolist() == [2, 3, 0, 2]


def test_bad_phase():
    with pytest.raises(InputError, match="--phase"):
        make_steps(None, 4, 2, phase="steps")
    with pytest.raises(InputError):
        decode_steps(None, 4, 0, 2)


# --- Serving-scale steps (moetuner.steps.serving_steps) ---------------------------------

def request_of(seq_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per trace token: its request, the request's first token and its last token."""
    starts = np.concatenate([[0], np.cumsum(seq_lens)[:-1]])
    request = np.repeat(np.arange(seq_lens.size), seq_lens)
    return request, starts[request], (starts + seq_lens - 1)[request]


@given(st.lists(st.integers(0, 7), min_size=1, max_size=12).filter(lambda x: sum(x) > 0),
       st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**16))
def test_serving_decode_steps_run_slots_through_whole_requests(seq_lens, gpus, per_gpu,
                                                               num_steps, seed):
    lens = np.array(seq_lens)
    total = int(lens.sum())
    steps = serving_steps(lens, total, gpus, "decode", per_gpu, num_steps, seed)
    width = per_gpu * gpus
    # S steps of exactly N x G tokens; the home of slot j is j mod G; keys are unique.
    assert steps.num_steps == num_steps and steps.num_gpus == gpus
    np.testing.assert_array_equal(steps.bounds, np.arange(num_steps + 1) * width)
    np.testing.assert_array_equal(steps.home, np.tile(np.arange(width) % gpus, num_steps))
    assert np.unique(steps.keys).size == steps.num_tokens == width * num_steps
    assert ((steps.order >= 0) & (steps.order < total)).all()
    # Slot j holds position j of every step: it runs on within its request, and after a
    # request's last token starts another request at its first token.
    table = steps.order.reshape(num_steps, width)
    request, first, last = request_of(lens)
    for before, after in zip(table[:-1].ravel(), table[1:].ravel(), strict=True):
        if before == last[before]:
            assert after == first[after]
        else:
            assert after == before + 1 and request[after] == request[before]


@given(st.lists(st.integers(0, 7), min_size=1, max_size=12).filter(lambda x: sum(x) > 0),
       st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**16))
def test_serving_prefill_steps_cut_whole_requests(seq_lens, gpus, per_gpu, num_steps, seed):
    lens = np.array(seq_lens)
    total = int(lens.sum())
    steps = serving_steps(lens, total, gpus, "prefill", per_gpu, num_steps, seed)
    width = per_gpu * gpus
    np.testing.assert_array_equal(steps.bounds, np.arange(num_steps + 1) * width)
    # Each step split into G contiguous blocks, block r homed on GPU r.
    np.testing.assert_array_equal(steps.home, block_homes(steps.bounds, gpus))
    np.testing.assert_array_equal(steps.home[:width], np.arange(width) * gpus // width)
    assert np.unique(steps.keys).size == steps.num_tokens == width * num_steps
    # The stream is whole requests one after another, from their first token (the last
    # one cut short).
    request, first, last = request_of(lens)
    assert steps.order[0] == first[steps.order[0]]
    for before, after in zip(steps.order[:-1], steps.order[1:], strict=True):
        if before == last[before]:
            assert after == first[after]
        else:
            assert after == before + 1 and request[after] == request[before]


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_serving_steps_are_seeded(phase):
    lens = np.array([5, 1, 9, 3, 7, 2, 4])
    draw = [serving_steps(lens, int(lens.sum()), 2, phase, 4, 6, seed) for seed in (0, 0, 1)]
    for name in ("order", "bounds", "home", "key"):
        np.testing.assert_array_equal(getattr(draw[0], name), getattr(draw[1], name))
    assert draw[0].description == draw[1].description
    assert not np.array_equal(draw[0].order, draw[2].order)
    plan = StepPlan(phase, tokens_per_gpu=4, num_steps=6, seed=1)
    np.testing.assert_array_equal(plan.steps(lens, int(lens.sum()), 2).order, draw[2].order)


def test_serving_step_description_says_what_was_done():
    lens = np.array([3, 4, 5])
    decode = StepPlan().steps(lens, 12, 2)
    assert decode.description == ("decode: 256 running sequences per step, resampled from 3 "
                                  "recorded requests, 64 steps")
    assert decode.sizes.tolist() == [256] * 64
    prefill = StepPlan("prefill", num_steps=2).steps(lens, 12, 2)
    assert prefill.sizes.tolist() == [8192, 8192]
    assert prefill.description.startswith("prefill: 8,192 tokens per step (")
    assert prefill.description.endswith("resampled from 3 recorded requests, 2 steps")


TOY = ModelSpec("toy", "none", 2, (), 4, 2, hidden_size=8, expert_intermediate_size=4)


def one_request_trace() -> Trace:
    """One recorded request of 3 tokens, 2 layers, 4 experts, top-2."""
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[3, 0], [1, 2]]])
    return Trace(topk_ids=ids, num_experts=4, seq_lens=np.array([3]))


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_a_request_drawn_again_is_counted_again(phase):
    trace = one_request_trace()
    steps = serving_steps(trace.seq_lens, 3, 2, phase, 2, 5, seed=3)
    assert steps.num_tokens == 20       # 5 steps of 2 x 2 tokens from a 3-token request
    if phase == "prefill":
        # Copies of the request one after another.
        np.testing.assert_array_equal(steps.order, np.arange(20) % 3)
    else:
        # Each slot runs the request round and round from its random offset.
        table = steps.order.reshape(5, 4)
        np.testing.assert_array_equal(table[1:], (table[:-1] + 1) % 3)
    placement = Placement(np.array([[0, 1, 2, 3]] * 2), 2, 4)
    result = replay(placement, trace, make_cluster(2, 1), EngineSettings(), steps=steps)
    # Every replay of a token counts: expert e's pairs are the replays of the tokens that
    # chose it.
    replays = np.bincount(steps.order, minlength=3)
    for layer in range(2):
        per_expert = np.zeros(4, dtype=int)
        for t in range(3):
            per_expert[trace.topk_ids[t, layer]] += replays[t]
        np.testing.assert_array_equal(result.load[layer], per_expert.reshape(2, 2).sum(axis=1))
    assert result.load.sum() == 20 * 2 * 2 and result.num_tokens == 20
    # The per-step times see the same counts.
    _, times = evaluate(placement, trace, make_cluster(2, 1), TOY, steps=steps)
    np.testing.assert_array_equal(times.tokens, [4] * 5)
    np.testing.assert_array_equal(times.mean_load.sum(axis=0) * 2, result.load.sum(axis=1))


def test_take_keeps_the_keys_of_serving_steps():
    steps = serving_steps(np.array([2, 3]), 5, 2, "decode", 1, 4, seed=0)
    part = steps.take(np.array([3, 1]))
    np.testing.assert_array_equal(part.keys, np.concatenate([steps.keys[6:8],
                                                             steps.keys[2:4]]))
    np.testing.assert_array_equal(part.order, np.concatenate([steps.order[6:8],
                                                              steps.order[2:4]]))


@pytest.mark.parametrize(("phase", "concurrency", "step_tokens"), [
    ("decode", None, None), ("decode", 3, None), ("prefill", None, None),
    ("prefill", None, 5)])
def test_recorded_plan_is_todays_recorded_order(phase, concurrency, step_tokens):
    lens = np.array([3, 1, 2, 6, 1, 4])
    plan = StepPlan(phase, "recorded", concurrency=concurrency, step_tokens=step_tokens)
    got = plan.steps(lens, 17, 2)
    want = make_steps(lens, 17, 2, phase, concurrency, step_tokens)
    for name in ("order", "bounds", "home"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert got.key is None and got.description == want.description
    np.testing.assert_array_equal(got.keys, want.order)
    if phase == "decode" and concurrency == 3:
        # By hand: 3 slots; seqs 0, 1, 2 start at step 0; seq 3 takes slot 1 at step 1, seq 4
        # slot 2 at step 2, seq 5 slot 0 at step 3.
        assert got.order[:3].tolist() == [0, 3, 4] and got.home[:3].tolist() == [0, 1, 0]
    assert StepPlan(phase, "average").steps(lens, 17, 2) is None


def test_compare_draws_the_steps_once(monkeypatch):
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((30, 2, 4)), axis=2)[:, :, :2]
    trace = Trace(topk_ids=ids, num_experts=4, seq_lens=np.array([10, 5, 15]))
    placements = {"a": Placement(np.array([[0, 1, 2, 3]] * 2), 2, 4),
                  "b": Placement(np.array([[3, 1, 2, 0]] * 2), 2, 4)}
    plan = StepPlan(tokens_per_gpu=3, num_steps=5, seed=7)
    drawn: list[Steps] = []
    original = StepPlan.steps

    def counting(self, *args):
        drawn.append(original(self, *args))
        return drawn[-1]

    monkeypatch.setattr(StepPlan, "steps", counting)
    cluster = make_cluster(2, 1)
    rows, _ = compare(placements, trace, cluster, TOY, ("return", "follow"), plan=plan)
    assert len(drawn) == 1 and len(rows) == 6
    # Each row is its placement evaluated on those very steps.
    for row in rows:
        placement = placements.get(row["placement"])
        if placement is None:
            continue
        _, times = evaluate(placement, trace, cluster, TOY, EngineSettings(row["exec_model"]),
                            steps=drawn[0])
        assert row["mean_step_time_s"] == times.mean_step_time
    assert len(drawn) == 1


def test_bad_plans_name_their_flag():
    for kwargs, flag in (({"phase": "x"}, "--phase"), ({"source": "trace"}, "--replay"),
                         ({"tokens_per_gpu": 0}, "--tokens-per-gpu"),
                         ({"num_steps": -1}, "--steps"), ({"concurrency": 0}, "--concurrency"),
                         ({"step_tokens": 0}, "--step-tokens")):
        with pytest.raises(InputError, match=flag):
            StepPlan(**kwargs)
    with pytest.raises(InputError, match="request"):
        serving_steps(np.array([0, 0]), 0, 2, "decode", 1, 1)


def test_even_replicas_are_not_chosen_by_the_home_gpu_in_serving_decode():
    # Every token picks expert 0, which has a replica on each of the 2 GPUs. Under ``even``
    # a token's replica must not follow from its home: both GPUs send tokens to the other's
    # replica, and the two replicas share the load exactly (keys are a permutation).
    trace = Trace(topk_ids=np.zeros((500, 1, 1), dtype=np.int64), num_experts=2,
                  seq_lens=np.full(50, 10))
    placement = Placement(np.array([[0, 1, 0, 1]]), 2, 2)
    for phase in ("decode", "prefill"):
        steps = StepPlan(phase, tokens_per_gpu=8, num_steps=4).steps(trace.seq_lens, 500, 2)
        for g in range(2):
            assert set((steps.keys[steps.home == g] % 2).tolist()) == {0, 1}
        r = replay(placement, trace, make_cluster(2, 1), EngineSettings("return", "even"),
                   steps=steps)
        assert r.load.tolist() == [[32, 32]]
        assert r.dispatch.tokens[0, 0, 1] > 0 and r.dispatch.tokens[0, 1, 0] > 0
