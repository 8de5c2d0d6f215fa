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


# ---------------------------------------------------------------- DeepSeek's behaviour


def reference_packing(weights: list, num_packs: int) -> list[tuple[int, int]]:
    """(pack, rank in pack) of each item: DeepSeek's greedy, one item at a time, in float32;
    one item per pack keeps the identity, as DeepSeek's shortcut does."""
    per_pack = len(weights) // num_packs
    if per_pack == 1:
        return [(item, 0) for item in range(len(weights))]
    loads, sizes = [np.float32(0)] * num_packs, [0] * num_packs
    result = [None] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        pack = min((p for p in range(num_packs) if sizes[p] < per_pack),
                   key=lambda p: loads[p])
        result[item] = (pack, sizes[pack])
        loads[pack] = np.float32(loads[pack] + weights[item])
        sizes[pack] += 1
    return result


def reference_eplb(weight: np.ndarray, P: int, groups: int, nodes: int, gpus: int):
    """DeepSeek EPLB's steps written out layer by layer (float32, as DeepSeek computes)."""
    weight = np.asarray(weight, dtype=np.float32)
    if groups % nodes:
        groups, nodes = 1, 1
    L, E = weight.shape
    size, per_node = E // groups, P // nodes
    phy2log = np.empty((L, P), dtype=np.int64)
    log2phy: dict = {}
    for layer in range(L):
        row = weight[layer]
        group_load = [row[g * size:(g + 1) * size].sum(dtype=np.float32) for g in range(groups)]
        group_packing = reference_packing(group_load, nodes)
        node_groups = sorted(range(groups), key=lambda g: group_packing[g])
        per = groups // nodes
        experts_per_node = [[e for g in node_groups[n * per:(n + 1) * per]
                             for e in range(g * size, (g + 1) * size)] for n in range(nodes)]
        for node, experts in enumerate(experts_per_node):
            copies = {e: 1 for e in experts}
            physical = [(e, 0) for e in experts]
            while len(physical) < per_node:
                hottest = max(experts, key=lambda e: (np.float32(row[e] / copies[e]),
                                                      -experts.index(e)))
                physical.append((hottest, copies[hottest]))
                copies[hottest] += 1
            loads = [np.float32(row[e] / copies[e]) for e, _ in physical]
            packing = reference_packing(loads, gpus // nodes)
            ordered = sorted(range(per_node), key=lambda i: packing[i])
            for offset, i in enumerate(ordered):
                slot = node * per_node + offset
                phy2log[layer, slot] = physical[i][0]
                log2phy[layer, physical[i][0], physical[i][1]] = slot
    logcnt = np.stack([np.bincount(r, minlength=E) for r in phy2log])
    table = np.full((L, E, logcnt.max()), -1, dtype=np.int64)
    for (layer, expert, rank), slot in log2phy.items():
        table[layer, expert, rank] = slot
    return phy2log, table, logcnt


def test_reference_reproduces_published_example():
    assert reference_eplb(WEIGHT, 16, 4, 2, 8)[0].tolist() == PUBLISHED_PHY2LOG


SHAPES = [(12, 16, 4, 2, 8), (8, 12, 2, 2, 4), (8, 12, 4, 1, 4), (16, 24, 8, 4, 8),
          (6, 8, 3, 2, 4), (8, 16, 8, 2, 4), (4, 4, 1, 1, 2), (32, 40, 8, 2, 8)]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SHAPES), st.integers(1, 3), st.integers(0, 2**32 - 1),
       st.sampled_from([1.0, 4.0]))
def test_equals_deepseek_on_tie_free_inputs(shape, L, seed, skew):
    E, P, groups, nodes, gpus = shape
    # Continuous random loads: no two compared float32 values are equal (almost surely).
    weight = np.random.default_rng(seed).pareto(skew, (L, E)) * 100 + 1
    ours = rebalance_experts(weight, P, groups, nodes, gpus)
    for got, want in zip(ours, reference_eplb(weight, P, groups, nodes, gpus), strict=True):
        assert got.shape == want.shape
        assert np.array_equal(got, want)


def test_tie_rule_lower_index_first():
    # Equal loads: the replicas go to experts 0 then 1; packing takes slots 2, 3 (load 5),
    # then 0, 1, 4, 5 (load 2.5), each to the lighter GPU, GPU 0 on equal loads.
    phy2log, log2phy, logcnt = rebalance_experts(np.full((1, 4), 5.0), 6, 1, 1, 2)
    assert phy2log.tolist() == [[2, 0, 0, 3, 1, 1]]
    assert logcnt.tolist() == [[2, 2, 1, 1]]
    assert log2phy.tolist() == [[[1, 2], [4, 5], [0, -1], [3, -1]]]
    assert np.array_equal(phy2log, reference_eplb(np.full((1, 4), 5.0), 6, 1, 1, 2)[0])


@pytest.mark.parametrize("args", [(7, 2, 2, 4), (8, 2, 2, 3), (2, 1, 1, 1), (8, 3, 1, 4),
                                  (8, 0, 1, 4), (8, 2, 0, 4)])
def test_invalid_arguments_raise_input_and_assertion_error(args):
    from moetuner.errors import InputError

    with pytest.raises(InputError) as err:
        rebalance_experts(np.array([[10, 20, 30, 40]]), *args)
    assert isinstance(err.value, AssertionError)


def test_groups_that_do_not_divide_the_nodes_fall_back_to_global():
    # vLLM's parameter-validation case: 3 groups over 2 nodes -> global policy, no error.
    phy2log, _, logcnt = rebalance_experts(np.array([[10, 20, 30, 40]]), 8, 3, 2, 4)
    assert phy2log.shape == (1, 8) and logcnt.sum() == 8
