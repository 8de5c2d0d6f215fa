"""The online ``joint`` policy on the engines' tensor shapes (no engine installed)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetuner import InputError, Trace, profile_trace
from moetuner.integrations.joint_online import (
    CONFIG_ENV,
    JointEplbPolicy,
    JointOnline,
    JointOnlineConfig,
    layer_score,
    sglang_rebalance_experts,
    vllm_policy,
)

torch = pytest.importorskip("torch", reason="the online joint policy works on torch tensors "
                            "(pip install 'moetuner[torch]')")


def paired_profile(tmp_path, layers=2, experts=8):
    """Experts 2i and 2i + 1 always chosen together (top-2)."""
    rng = np.random.default_rng(0)
    pair = rng.integers(0, experts // 2, size=(500, layers))
    ids = np.stack([2 * pair, 2 * pair + 1], axis=2)
    path = tmp_path / "profile.npz"
    profile_trace(Trace(topk_ids=ids, num_experts=experts)).save(path)
    return str(path)


def check_map(phy2log, experts, gpus):
    """Every expert present; copies of one expert on distinct GPUs."""
    L, P = phy2log.shape
    gpu = np.arange(P) // (P // gpus)
    for row in phy2log:
        assert set(row.tolist()) == set(range(experts))
        pairs = {(int(e), int(g)) for e, g in zip(row, gpu, strict=True)}
        assert len(pairs) == P


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), moves=st.integers(0, 6), extra=st.sampled_from([0, 4]))
def test_vllm_policy_respects_max_moves_and_never_worsens(seed, moves, extra):
    rng = np.random.default_rng(seed)
    L, E, G = 3, 8, 4
    weight = torch.tensor(rng.integers(0, 100, (L, E)), dtype=torch.int64)
    old = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.permutation(E)[:extra]]))
                    for _ in range(L)])
    old = np.stack([_spread(row, G) for row in old])
    policy = vllm_policy(JointOnlineConfig(max_moves=moves))
    new = policy.rebalance_experts(weight, E + extra, 1, 2, G, torch.from_numpy(old))
    assert isinstance(new, torch.Tensor) and new.dtype == torch.int64
    assert tuple(new.shape) == (L, E + extra)
    new = new.numpy()
    check_map(new, E, G)
    assert ((new != old).sum(axis=1) <= moves).all()
    load = weight.numpy().astype(float)
    for layer in range(L):
        assert (layer_score(load[layer], new[layer], G, 2, None, 0.0)
                <= layer_score(load[layer], old[layer], G, 2, None, 0.0) + 1e-12)


def _spread(row, gpus):
    """``row`` rearranged so that copies of one expert sit on distinct GPUs."""
    per = row.size // gpus
    order = np.argsort(row, kind="stable")
    out = np.empty_like(row)
    out[(np.arange(row.size) % gpus) * per + np.arange(row.size) // gpus] = row[order]
    return out


def test_without_a_current_map_it_starts_from_eplb_and_balances():
    weight = torch.tensor([[90, 10, 10, 10, 10, 10, 10, 10]], dtype=torch.float32)
    new = JointEplbPolicy.rebalance_experts(weight, 12, 1, 1, 4).numpy()
    check_map(new, 8, 4)
    assert np.bincount(new[0], minlength=8)[0] >= 2  # the hot expert gets replicas


def test_affinity_from_the_profile_keeps_pairs_on_a_node(tmp_path):
    """Equal live loads: the load term is flat, so the offline affinity decides, and the
    policy brings pairs that fire together onto one node (within its move budget)."""
    # DeepEP normal: one message per token and node, so a pair on one node saves one.
    online = JointOnline(JointOnlineConfig(profile=paired_profile(tmp_path), max_moves=8,
                                           affinity=1.0, kernel="deepep-normal"))
    old = np.array([[0, 2, 1, 3, 4, 6, 5, 7]] * 2)     # every pair split over the 2 nodes
    new = online.rebalance(np.ones((2, 8)), old, num_gpus=4, num_nodes=2)
    node = np.empty(8, dtype=int)
    for row in new:
        node[row] = np.arange(8) // 4
        assert all(node[2 * i] == node[2 * i + 1] for i in range(4))
    blind = JointOnline(JointOnlineConfig(max_moves=8)).rebalance(np.ones((2, 8)), old, 4, 2)
    assert np.array_equal(blind, old)                   # no affinity, nothing to gain
    # DeepEP low-latency (the default) sends one message per pair wherever the expert sits:
    # the same profile moves nothing.
    pairs = JointOnline(JointOnlineConfig(profile=paired_profile(tmp_path), max_moves=8,
                                          affinity=1.0))
    assert pairs.config.node_affinity == 0.0
    assert np.array_equal(pairs.rebalance(np.ones((2, 8)), old, 4, 2), old)


def test_sglang_entry_point_has_sglangs_shapes(tmp_path, monkeypatch):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"profile": paired_profile(tmp_path, layers=3), "max_moves": 4,
                                  "num_nodes": 2}))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    counts = torch.randint(0, 50, (5, 3, 8))           # [window, L, E]
    phy2log, log2phy, logcnt = sglang_rebalance_experts(counts, 12, 3, None, 2)
    assert phy2log.shape == (3, 12) and log2phy.shape == (3, 8, 5) and logcnt.shape == (3, 8)
    check_map(phy2log.numpy(), 8, 4)
    for layer in range(3):
        for e in range(8):
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert len(slots) == logcnt[layer, e]
            assert (phy2log[layer, slots] == e).all()


@pytest.mark.parametrize(("config", "field"), [
    ({"max_moves": -1}, "max_moves"), ({"affinity": -0.5}, "affinity"),
    ({"kernel": "nvshmem"}, "kernel"),
    ({"num_nodes": 0}, "num_nodes")])
def test_bad_config_is_an_input_error(config, field):
    with pytest.raises(InputError, match=field):
        JointOnlineConfig(**config)


def test_bad_maps_are_input_errors():
    online = JointOnline(JointOnlineConfig())
    with pytest.raises(InputError):
        online.rebalance(np.ones((2, 8)), np.zeros((3, 8), dtype=int), 4)
    with pytest.raises(InputError):
        online.rebalance(np.ones((2, 8)), np.full((2, 8), 9), 4)


def test_two_argument_callable_for_the_online_replay():
    online = JointOnline(JointOnlineConfig(num_gpus=4, num_nodes=2, max_moves=2))
    old = np.tile(np.arange(8), (2, 1))
    new = online(np.arange(16.0).reshape(2, 8), old)
    check_map(new, 8, 4)
    assert ((new != old).sum(axis=1) <= 2).all() and (new != old).any()
    with pytest.raises(InputError, match="num_gpus"):
        JointOnline(JointOnlineConfig())(np.ones((2, 8)), old)
    with pytest.raises(InputError, match="num_gpus"):
        JointOnlineConfig(num_gpus=0)
