"""EPLB baseline: the published example, the fixed variant, validity on random loads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetuner import PlaceOptions, Profile, make_cluster, place
from moetuner.methods.eplb import rebalance_experts

WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                   [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_published_example_exactly():
    phy2log, log2phy, logcnt = rebalance_experts(WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == PHY2LOG
    np.testing.assert_array_equal(logcnt, np.stack([np.bincount(r, minlength=12)
                                                    for r in phy2log]))
    for layer in range(2):
        for expert in range(12):
            slots = log2phy[layer, expert][log2phy[layer, expert] >= 0]
            assert sorted(slots.tolist()) == np.flatnonzero(phy2log[layer] == expert).tolist()


def test_published_eplb_can_share_a_gpu_and_fixed_does_not():
    # One expert far hotter than the rest: EPLB gives it several copies on the same GPU.
    weight = np.array([[1000, 1, 1, 1]])
    phy2log, _, _ = rebalance_experts(weight, 8, 1, 1, 2)
    assert (place_counts(phy2log, 2) > 1).any()
    fixed, _, _ = rebalance_experts(weight, 8, 1, 1, 2, fixed=True)
    assert (place_counts(fixed, 2) <= 1).all()
    fixed, _, logcnt = rebalance_experts(WEIGHT, 16, 4, 2, 8, fixed=True)
    per_gpu = fixed.reshape(2, 8, 2)
    assert not (per_gpu[:, :, 0] == per_gpu[:, :, 1]).any()
    assert (logcnt.sum(axis=1) == 16).all()


def place_counts(phy2log: np.ndarray, gpus: int) -> np.ndarray:
    """``[L, G, E]`` copies of each expert on each GPU."""
    per_gpu = phy2log.reshape(phy2log.shape[0], gpus, -1)
    experts = int(phy2log.max()) + 1
    return (per_gpu[..., None] == np.arange(experts)).sum(axis=2)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3),
       st.sampled_from([(8, 4, 1), (8, 4, 2), (12, 4, 2), (16, 8, 2), (4, 2, 2)]),
       st.integers(0, 2), st.integers(0, 2**31 - 1), st.booleans())
def test_fixed_variant_never_shares_a_gpu(layers, shape, extra, seed, hot):
    experts, gpus, nodes = shape
    rng = np.random.default_rng(seed)
    load = rng.integers(0, 1000, (layers, experts))
    if hot:
        load[:, 0] *= 50                                        # many copies of one expert
    options = PlaceOptions(redundant=extra * gpus, params={"num_groups": nodes})
    for method in ("eplb", "eplb_fixed"):
        placement, _ = place(Profile.from_load(load), make_cluster(gpus, nodes), method, options)
        assert placement.num_slots == experts + extra * gpus
        assert (placement.logcnt >= 1).all()
        if method == "eplb_fixed":
            assert placement.replicas_on_gpu.max() <= 1


def test_fixed_variant_with_one_gpu_per_node_falls_back_to_global_policy():
    load = np.array([[100, 10, 10, 10]])
    phy2log, _, logcnt = rebalance_experts(load, 6, 2, 2, 2, fixed=True)
    per_gpu = phy2log.reshape(2, 3)
    assert all(len(set(row)) == 3 for row in per_gpu.tolist())
    assert logcnt[0, 0] == 2 and logcnt.sum() == 6


def test_groups_come_from_the_model_preset_and_param_overrides():
    from moetuner.models import get_model

    v3 = get_model("deepseek-v3")
    assert v3.num_expert_groups == 8 and get_model("mixtral-8x7b").num_expert_groups == 1
    rng = np.random.default_rng(3)
    load = rng.pareto(1.5, (v3.num_moe_layers, v3.num_experts)) * 100 + 1
    profile = Profile.from_load(load, top_k=v3.top_k)
    cluster = make_cluster(16, 2)
    options = PlaceOptions(redundant=32)
    placement, record = place(profile, cluster, "eplb", options)
    # As SGLang and vLLM run it: 8 groups over 2 nodes select the hierarchical policy.
    engines = rebalance_experts(load, 288, 8, 2, 16)[0]
    assert np.array_equal(placement.phy2log, engines) and record.log == "num_groups=8"
    one_group = rebalance_experts(load, 288, 1, 2, 16)[0]
    assert not np.array_equal(engines, one_group)
    override, _ = place(profile, cluster, "eplb",
                        PlaceOptions(redundant=32, params={"num_groups": 1}))
    assert np.array_equal(override.phy2log, one_group)
    # A shape no preset has: one group.
    _, record = place(Profile.from_load(load[:2, :16]), make_cluster(4, 2), "eplb")
    assert record.log == "num_groups=1"


@pytest.mark.parametrize("groups", ["0", "abc", "2.5", "6"])   # 6 groups: E = 8 does not split
def test_cli_bad_num_groups_exit_2(tmp_path, capsys, groups):
    from moetuner.cli import run

    src = tmp_path / "prof.npz"
    Profile.from_load(np.arange(1, 9).reshape(1, 8)).save(src)
    out = tmp_path / "p.json"
    assert run(["place", str(src), "--method", "eplb", "--gpus", "2", "--nodes", "2",
                "--param", f"num_groups={groups}", "-o", str(out)]) == 2
    assert "--param: num_groups" in capsys.readouterr().err and not out.exists()
