import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SLICE
from moetuner import InputError, Profile, load_trace, profile_trace
from moetuner.cli import run
from moetuner.synth import (
    _search,
    default_like,
    is_synthetic,
    layer_shares,
    synthesis_fit,
    synthesize_trace,
)


@pytest.fixture(scope="module")
def like() -> Profile:
    return default_like()


def _assert_valid(trace, layers, experts, k, tokens):
    ids = trace.topk_ids
    assert ids.shape == (tokens, layers, k)
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < experts)
    ordered = np.sort(ids, axis=2)
    assert (ordered[:, :, 1:] != ordered[:, :, :-1]).all()


@settings(max_examples=15, deadline=None)
@given(layers=st.integers(1, 5), experts=st.integers(1, 12), k=st.integers(1, 12),
       tokens=st.integers(0, 300), seed=st.integers(0, 3))
def test_shapes_ids_and_distinct_topk(like, layers, experts, k, tokens, seed):
    k = min(k, experts)
    trace = synthesize_trace(layers, experts, k, tokens, like=like, seed=seed)
    _assert_valid(trace, layers, experts, k, tokens)
    assert trace.num_experts == experts and int(trace.seq_lens.sum()) == tokens


def test_same_seed_same_trace_other_seed_differs(like):
    a = synthesize_trace(6, 16, 2, 500, like=like, seed=3)
    b = synthesize_trace(6, 16, 2, 500, like=like, seed=3)
    c = synthesize_trace(6, 16, 2, 500, like=like, seed=4)
    assert np.array_equal(a.topk_ids, b.topk_ids)
    assert not np.array_equal(a.topk_ids, c.topk_ids)


def test_skew_and_mi_follow_the_real_profile(like):
    trace = synthesize_trace(like.num_layers, like.num_experts, like.top_k, 20000, like=like)
    fit = synthesis_fit(like, trace)
    assert np.abs(fit.synth_skew / fit.real_skew - 1).max() < 0.2
    assert np.corrcoef(fit.synth_skew, fit.real_skew)[0, 1] > 0.8
    assert abs(fit.synth_mi.mean() / fit.real_mi.mean() - 1) < 0.1
    assert "skew" in fit.summary() and "MI" in fit.summary()


def test_larger_shape_keeps_skew(like):
    trace = synthesize_trace(10, 128, 8, 20000, like=like)
    fit = synthesis_fit(like, trace)
    assert np.abs(fit.synth_skew / fit.real_skew - 1).max() < 0.2
    assert fit.synth_mi.mean() > 0.5  # cross-layer structure is there (independent: ~0)


def test_loads_only_profile_gives_independent_layers(like):
    loads_only = Profile.from_load(like.load, top_k=like.top_k)
    trace = synthesize_trace(4, 32, 4, 20000, like=loads_only)
    fit = synthesis_fit(like, trace)
    assert fit.synth_mi.max() < 0.05


def test_layer_shares_keep_max_over_mean(like):
    shares = layer_shares(like, like.num_layers, like.num_experts, np.random.default_rng(0))
    assert np.allclose(shares.sum(axis=1), 1)
    assert np.allclose(shares.max(axis=1) * like.num_experts, like.skew())


def test_search_matches_numpy():
    rng = np.random.default_rng(1)
    cumulative = np.cumsum(rng.random(50) * (rng.random(50) < 0.7))
    keys = rng.random((200, 3)) * cumulative[-1]
    assert np.array_equal(_search(cumulative, keys), np.searchsorted(cumulative, keys))


def test_synthetic_label_survives_the_file(like, tmp_path):
    trace = synthesize_trace(3, 8, 2, 1200, like=like, seed=1)
    assert is_synthetic(trace) and trace.source.startswith("synthetic")
    trace.save(tmp_path / "s.npz")
    back = load_trace(tmp_path / "s.npz")
    assert is_synthetic(back)
    assert np.array_equal(back.topk_ids, trace.topk_ids)
    assert all(str(v).startswith("synthetic") for v in back.seq_labels["seq_dataset"])
    assert not is_synthetic(load_trace(str(SLICE)))
    assert profile_trace(back).stability_load is not None


@pytest.mark.parametrize("args", [(0, 8, 2, 10), (3, 8, 9, 10), (3, 8, 2, -1), (2, 0, 1, 5)])
def test_bad_shape_is_an_input_error(like, args):
    with pytest.raises(InputError):
        synthesize_trace(*args, like=like)


def test_cli_writes_trace_and_prints_fit(tmp_path, capsys):
    out = tmp_path / "t.npz"
    code = run(["synth", "--like", str(SLICE), "--layers", "5", "--experts",
                "64", "--topk", "6", "--tokens", "2000", "--seed", "2", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "skew" in printed
    trace = load_trace(out)
    _assert_valid(trace, 5, 64, 6, 2000)
    assert is_synthetic(trace)


def test_cli_bad_input_exits_2_without_output(tmp_path):
    out = tmp_path / "t.npz"
    assert run(["synth", "--layers", "2", "--experts", "4", "--topk", "5", "--tokens", "10",
                "-o", str(out)]) == 2
    assert run(["synth", "--like", str(tmp_path / "missing.npz"), "--layers", "2", "--experts",
                "4", "--topk", "2", "--tokens", "10", "-o", str(out)]) == 2
    assert not out.exists()
