"""Engine steps: continuous batching, prefill chunks and the follow combine rule, by hand and
on random instances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moetuner.errors import InputError
from moetuner.steps import combine_gpu, decode_steps, make_steps, prefill_steps, whole_trace


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


def test_bad_batching():
    with pytest.raises(InputError):
        make_steps(None, 4, 2, batching="steps")
    with pytest.raises(InputError):
        decode_steps(None, 4, 0, 2)
