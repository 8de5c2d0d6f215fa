import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_rejects_npz, random_trace
from moetuner.errors import InputError
from moetuner.profile import Profile, load_profile, mutual_information, profile_trace


def test_hand_counted_profile(tiny_trace):
    p = profile_trace(tiny_trace)
    assert p.tokens == 3 and p.top_k == 2
    np.testing.assert_array_equal(p.load, [[2, 2, 1, 1], [1, 1, 2, 2]])
    # token 0: {0,1} -> {2,3}; token 1: {1,0} -> {2,0}; token 2: {3,2} -> {3,1}
    expected = np.zeros((4, 4), int)
    for a, b in [({0, 1}, {2, 3}), ({0, 1}, {0, 2}), ({2, 3}, {1, 3})]:
        for i in a:
            for j in b:
                expected[i, j] += 1
    np.testing.assert_array_equal(p.transitions[0], expected)
    top1 = np.zeros((4, 4), int)
    top1[0, 2] += 1
    top1[1, 2] += 1
    top1[3, 3] += 1
    np.testing.assert_array_equal(p.transitions_top1[0], top1)
    co = np.zeros((4, 4), int)
    for pair in [(0, 1), (0, 1), (2, 3)]:
        for i in pair:
            for j in pair:
                co[i, j] += 1
    np.testing.assert_array_equal(p.coactivation[0], co)
    np.testing.assert_array_equal(np.diagonal(p.coactivation, axis1=1, axis2=2), p.load)


def test_mutual_information_by_hand():
    assert mutual_information(np.eye(4) * 5) == pytest.approx(2.0)   # layer l+1 = layer l
    assert mutual_information(np.ones((4, 4))) == pytest.approx(0.0)  # independent
    assert mutual_information(np.zeros((3, 3))) == 0.0


def test_streaming_equals_one_shot():
    trace = random_trace(np.random.default_rng(1), tokens=97, layers=3, experts=6, k=2)
    whole = profile_trace(trace, chunk_tokens=10_000)
    for chunk in (1, 7, 50):
        chunked = profile_trace(trace, chunk_tokens=chunk)
        for name in ("load", "transitions", "transitions_top1", "coactivation"):
            np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name))


def test_halves_sum_to_whole():
    trace = random_trace(np.random.default_rng(2), tokens=120, layers=4, experts=8, k=3,
                         sequences=9)
    first, second = trace.split(0.5)
    assert first.num_tokens + second.num_tokens == trace.num_tokens
    total = profile_trace(first) + profile_trace(second)
    whole = profile_trace(trace)
    for name in ("load", "transitions", "transitions_top1", "coactivation"):
        np.testing.assert_array_equal(getattr(total, name), getattr(whole, name))
    assert total.tokens == whole.tokens
    assert len(total.provenance) == 2
    assert total.stability_load is None


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.integers(1, 4), st.integers(2, 9), st.data())
def test_count_invariants(tokens, layers, experts, data):
    k = data.draw(st.integers(1, experts))
    seed = data.draw(st.integers(0, 2**31))
    trace = random_trace(np.random.default_rng(seed), tokens, layers, experts, k)
    p = profile_trace(trace, chunk_tokens=data.draw(st.integers(1, 64)))
    np.testing.assert_array_equal(p.load.sum(axis=1), tokens * k)
    np.testing.assert_array_equal(p.transitions.sum(axis=2), k * p.load[:-1])
    np.testing.assert_array_equal(p.transitions.sum(axis=1), k * p.load[1:])
    np.testing.assert_array_equal(p.transitions_top1.sum(axis=(1, 2)), tokens)
    np.testing.assert_array_equal(p.coactivation, np.swapaxes(p.coactivation, 1, 2))
    np.testing.assert_array_equal(p.coactivation.sum(axis=2), k * p.load)


def test_save_load_round_trip(tmp_path, tiny_trace):
    p = profile_trace(tiny_trace)
    p.save(tmp_path / "p.npz")
    q = load_profile(tmp_path / "p.npz")
    for name in ("load", "transitions", "transitions_top1", "coactivation", "stability_load"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
    assert q.provenance == p.provenance and q.tokens == 3 and q.top_k == 2


@pytest.mark.parametrize("arrays, field", [
    ({"load": np.ones(4)}, "load"),
    ({"load": -np.ones((2, 4))}, "load"),
    ({"load": np.full((2, 4), np.nan)}, "load"),
    ({"load": np.ones((2, 4)), "transitions": np.ones((2, 4, 4))}, "transitions"),
    ({"load": np.ones((2, 4)), "bogus": np.ones(3)}, "bogus"),
])
def test_bad_profile_files(tmp_path, arrays, field):
    assert_rejects_npz(tmp_path, load_profile, arrays, field)


def test_adding_mismatched_profiles_fails():
    with pytest.raises(InputError, match="load"):
        Profile.from_load(np.ones((2, 4))) + Profile.from_load(np.ones((2, 5)))
