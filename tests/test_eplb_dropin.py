import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetuner.eplb import rebalance_experts
from moetuner.methods import methods

# DeepSeek EPLB's published example (README of github.com/deepseek-ai/EPLB).
WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                   [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
PUBLISHED_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                     [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def check_tuple(phy2log, log2phy, logcnt, L, E, P):
    """EPLB's shapes, padding and consistency between the three arrays."""
    assert phy2log.shape == (L, P) and log2phy.shape == (L, E, logcnt.max())   # DeepSeek's width
    assert logcnt.shape == (L, E)
    assert (logcnt >= 1).all() and (logcnt.sum(axis=1) == P).all()
    for layer in range(L):
        assert np.array_equal(np.bincount(phy2log[layer], minlength=E), logcnt[layer])
        for expert in range(E):
            slots = log2phy[layer, expert]
            valid = slots[: logcnt[layer, expert]]
            assert (slots[logcnt[layer, expert]:] == -1).all()
            assert (phy2log[layer, valid] == expert).all()


def test_reproduces_published_example():
    phy2log, log2phy, logcnt = rebalance_experts(WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == PUBLISHED_PHY2LOG
    check_tuple(phy2log, log2phy, logcnt, 2, 12, 16)
    assert isinstance(phy2log, np.ndarray) and phy2log.dtype == np.int64


@pytest.mark.parametrize("method", sorted(set(methods()) - {"eplb"}))
def test_every_method_returns_valid_tuple(method):
    phy2log, log2phy, logcnt = rebalance_experts(WEIGHT, 16, 4, 2, 8, method=method,
                                                 time_limit=5)
    check_tuple(phy2log, log2phy, logcnt, 2, 12, 16)


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    weight = torch.tensor(WEIGHT, dtype=torch.float32)
    for method in ("eplb", "linear"):
        result = rebalance_experts(weight, 16, 4, 2, 8, method=method)
        assert all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 for t in result)
        assert all(t.device == weight.device for t in result)
    phy2log, _, _ = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == PUBLISHED_PHY2LOG


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(2, 4), st.integers(0, 2), st.integers(0, 2**16))
def test_random_instances(L, G, extra, seed):
    E = 2 * G
    P = E + G * extra
    weight = np.random.default_rng(seed).integers(0, 100, (L, E))
    for method in ("eplb", "eplb_fixed", "round_robin"):
        check_tuple(*rebalance_experts(weight, P, 1, 1, G, method=method), L, E, P)
