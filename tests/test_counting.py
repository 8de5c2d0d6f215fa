"""The compiled counter against the np.bincount counting it replaced (kept here as reference)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_trace
from moetuner.profile import _correlation_rows, profile_trace
from moetuner.trace import Trace


def reference_counts(ids: np.ndarray, num_experts: int) -> dict[str, np.ndarray]:
    """The counting of moetuner <= 0.1: one np.bincount per statistic over materialised
    k x k pair indices of ``ids [t, L, k]``."""
    t, L, k = ids.shape
    E = num_experts
    ids = ids.astype(np.int64)
    flat = ids + (np.arange(L) * E)[None, :, None]
    load = np.bincount(flat.ravel(), minlength=L * E)
    pairs = flat[:, :, :, None] * E + ids[:, :, None, :]
    coactivation = np.bincount(pairs.ravel(), minlength=L * E * E)
    nxt = flat[:, :-1, :, None] * E + ids[:, 1:, None, :]
    transitions = np.bincount(nxt.ravel(), minlength=(L - 1) * E * E)
    top1 = flat[:, :-1, 0] * E + ids[:, 1:, 0]
    transitions_top1 = np.bincount(top1.ravel(), minlength=(L - 1) * E * E)
    return {"load": load.reshape(L, E),
            "transitions": transitions.reshape(L - 1, E, E),
            "transitions_top1": transitions_top1.reshape(L - 1, E, E),
            "coactivation": coactivation.reshape(L, E, E)}


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 80), st.integers(1, 5), st.integers(1, 40), st.data())
def test_compiled_counting_equals_bincount(tokens, layers, experts, data):
    k = data.draw(st.integers(1, min(experts, 9)))
    dtype = data.draw(st.sampled_from(["u1", "i2", ">u2", "i4", ">i8", "i8"]))
    seed = data.draw(st.integers(0, 2**31))
    sequences = data.draw(st.sampled_from([None, 1, 5]))
    trace = random_trace(np.random.default_rng(seed), tokens, layers, experts, k, sequences)
    ids = trace.topk_ids.astype(dtype)
    trace = Trace(topk_ids=ids, num_experts=experts, seq_lens=trace.seq_lens)
    profile = profile_trace(trace, chunk_tokens=data.draw(st.integers(1, 100)))
    for name, expected in reference_counts(ids, experts).items():
        got = getattr(profile, name)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected, err_msg=name)
    if tokens > 1:  # stability: the two halves of Trace.split, each counted on its own
        first, second = (reference_counts(half.topk_ids, experts) for half in trace.split())
        np.testing.assert_array_equal(profile.stability_load,
                                      _correlation_rows(first["load"], second["load"]))
        if layers > 1:
            np.testing.assert_array_equal(
                profile.stability_transitions,
                _correlation_rows(first["transitions"], second["transitions"]))
    else:
        assert profile.stability_load is None


def test_skewed_counts_equal_bincount():
    """Heavily repeated pairs (one expert pair on every token) count exactly too."""
    rng = np.random.default_rng(7)
    ids = random_trace(rng, 500, 3, 16, 4).topk_ids
    ids[:250] = [5, 9, 0, 12]
    profile = profile_trace(Trace(topk_ids=ids, num_experts=16), chunk_tokens=64)
    for name, expected in reference_counts(ids, 16).items():
        np.testing.assert_array_equal(getattr(profile, name), expected, err_msg=name)
