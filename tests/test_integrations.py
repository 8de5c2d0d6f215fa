"""Engine-facing adapters: vLLM 0.33's EPLB policy interface and SGLang's EPLB entry point.

The vLLM cases are those of vLLM 0.33's ``tests/distributed/test_eplb_algo.py``, run
against ``moetuner.integrations.vllm`` policies for every registered method (the exact
DeepSeek results only for ``eplb``; the load-aware checks for the load-aware methods).
"""

from __future__ import annotations

import numpy as np
import pytest

from moetuner.errors import InputError
from moetuner.integrations import sglang, vllm
from moetuner.methods import methods

torch = pytest.importorskip("torch")

ALL_METHODS = sorted(methods())
# Methods that give hot experts more replicas (the others place replicas by position).
LOAD_AWARE = ("eplb", "eplb_fixed", "joint", "moetuner")


def logical_maps(phy2log, num_experts):
    """``(log2phy [L, E, X], logcnt [L, E])`` of a phy2log, as vLLM's compute_logical_maps."""
    phy2log = np.asarray(phy2log)
    logcnt = np.stack([np.bincount(row[row >= 0], minlength=num_experts) for row in phy2log])
    log2phy = np.full((*logcnt.shape, max(int(logcnt.max()), 1)), -1)
    for layer, row in enumerate(phy2log):
        for expert in range(num_experts):
            slots = np.flatnonzero(row == expert)
            log2phy[layer, expert, :len(slots)] = slots
    return torch.from_numpy(log2phy), torch.from_numpy(logcnt)


def policy_for(method):
    return vllm.policy(method, time_limit=2) if method != "eplb" else vllm.MoetunerEplbPolicy


def test_basic_rebalance_published_example():
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log = vllm.MoetunerEplbPolicy.rebalance_experts(weight, 16, 4, 2, 8)
    assert isinstance(phy2log, torch.Tensor) and phy2log.dtype == torch.int64
    log2phy, logcnt = logical_maps(phy2log, 12)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                               [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy.shape[:2] == (2, 12)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_vllm_cases_shapes_and_counts(method):
    policy = policy_for(method)
    cases = [  # (weight, num_replicas, num_groups, num_nodes, num_ranks)
        ([[10, 20, 30, 40]], 4, 1, 1, 1),                                   # single GPU
        ([[50] * 8], 8, 2, 2, 4),                                           # equal weights
        ([[1000, 1, 1, 1, 1, 1, 1, 1]], 12, 2, 2, 4),                       # extreme skew
        ([[10, 20, 30, 40, 50, 60], [60, 50, 40, 30, 20, 10], [25] * 6], 8, 2, 2, 4),
        ([[10, 20, 30, 40]], 8, 3, 2, 4),                  # 3 groups on 2 nodes: global policy
        ([[100, 50, 200, 75, 150, 25, 300, 80]], 12, 4, 2, 4),              # small hierarchical
        ([[10, 20, 30, 40, 50, 60]], 8, 3, 2, 4),                           # global fallback
        ([[10, 20, 30, 40]], 6, 2, 1, 2),                                   # device case (CPU)
        ([[50, 100, 75, 120, 90, 60, 80, 110, 40, 70, 95, 85, 65, 55, 45, 35]], 24, 8, 4, 8),
        ([[200, 150, 100, 50, 25, 12], [12, 25, 50, 100, 150, 200]], 10, 3, 1, 2),
    ]
    for weight, replicas, groups, nodes, ranks in cases:
        weight = torch.tensor(weight)
        phy2log = policy.rebalance_experts(weight, replicas, groups, nodes, ranks)
        L, E = weight.shape
        _, logcnt = logical_maps(phy2log, E)
        assert phy2log.shape == (L, replicas) and logcnt.shape == (L, E)
        assert (phy2log >= 0).all() and (phy2log < E).all()
        assert (logcnt >= 1).all() and (logcnt.sum(dim=1) == replicas).all()
        if replicas == E:
            assert (logcnt == 1).all()


@pytest.mark.parametrize("method", LOAD_AWARE)
def test_vllm_cases_hot_experts_get_replicas(method):
    policy = policy_for(method)
    weight = torch.tensor([[1000, 1, 1, 1, 1, 1, 1, 1]])
    _, logcnt = logical_maps(policy.rebalance_experts(weight, 12, 2, 2, 4), 8)
    assert logcnt[0, 0] == logcnt[0].max()
    if method != "eplb_fixed":     # one copy per GPU caps expert 0 at its node's 2 GPUs
        assert logcnt[0, 0] > logcnt[0, 1]
    weight = torch.tensor([[100, 50, 200, 75, 150, 25, 300, 80]])
    _, logcnt = logical_maps(policy.rebalance_experts(weight, 12, 4, 2, 4), 8)
    assert logcnt[0, 6] >= 2
    weight = torch.tensor([[200, 150, 100, 50, 25, 12], [12, 25, 50, 100, 150, 200]])
    _, logcnt = logical_maps(policy.rebalance_experts(weight, 10, 3, 1, 2), 6)
    assert logcnt[0, 0] >= 2 and logcnt[1, 5] >= 2


@pytest.mark.parametrize("method", ALL_METHODS)
def test_vllm_parameter_validation_raises_assertion_error(method):
    # vLLM's test: 7 physical experts do not divide over 4 ranks.
    with pytest.raises(AssertionError):
        policy_for(method).rebalance_experts(torch.tensor([[10, 20, 30, 40]]), 7, 2, 2, 4)


@pytest.mark.parametrize("ranks, old, new", [
    (2, [[0, 1, 2, 3, 4, 5, 6, 7]], [[1, 5, 0, 4, 6, 2, 7, 3]]),
    (2, [[0, 1, 0, 2, 3, 4, 5, 6, 1, 2]], [[0, 5, 4, 0, 1, 6, 2, 3, 2, 1]]),
    (3, [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]], [[0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 0]]),
])
def test_keep_slots_vllm_cases(ranks, old, new):
    old, new = np.array(old), np.array(new)
    kept = vllm.keep_slots(new, old, ranks)
    per_gpu = new.shape[1] // ranks
    for gpu in range(ranks):
        part = slice(gpu * per_gpu, (gpu + 1) * per_gpu)
        # Same experts on the GPU; an expert that stays keeps (one of) its old slots.
        assert sorted(kept[0, part]) == sorted(new[0, part])
        for expert in set(old[0, part]) & set(new[0, part]):
            assert kept[0, part][list(old[0, part]).index(expert)] == expert


def test_keep_slots_exact_small_case():
    assert vllm.keep_slots(np.array([[1, 5, 0, 4, 6, 2, 7, 3]]),
                           np.array([[0, 1, 2, 3, 4, 5, 6, 7]]), 2).tolist() == \
        [[0, 1, 5, 4, 2, 3, 6, 7]]


def test_policy_applies_old_map():
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
    fresh = vllm.MoetunerEplbPolicy.rebalance_experts(weight, 16, 4, 2, 8)
    old = fresh.flip(1)
    again = vllm.MoetunerEplbPolicy.rebalance_experts(weight, 16, 4, 2, 8, old)
    assert np.array_equal(again.numpy(), vllm.keep_slots(fresh.numpy(), old.numpy(), 8))


def test_policy_factory_and_plugin(monkeypatch):
    cls = vllm.policy("eplb_fixed")
    assert issubclass(cls, vllm.MoetunerEplbPolicy) and cls.method == "eplb_fixed"
    with pytest.raises(InputError):
        vllm.policy("nope")
    monkeypatch.delenv(vllm.METHOD_VARIABLE, raising=False)
    vllm.register_plugin()                       # unset: does nothing, imports no vLLM
    monkeypatch.setenv(vllm.METHOD_VARIABLE, "eplb")
    monkeypatch.setenv(vllm.PARAMS_VARIABLE, "[1]")
    with pytest.raises(InputError):
        vllm.register_plugin()


def test_sglang_rebalancer_matches_eplb_and_sums_steps():
    from moetuner.eplb import rebalance_experts

    steps = torch.tensor(np.random.default_rng(0).integers(0, 50, (3, 2, 8)))
    rebalance = sglang.rebalancer("eplb")
    got = rebalance(steps, 12, 3, None, 1)
    want = rebalance_experts(steps.sum(0).numpy(), 12, 1, 1, 4)
    assert all(np.array_equal(g.numpy(), w) for g, w in zip(got, want, strict=True))
    with pytest.raises(InputError):
        sglang.rebalancer("nope")
