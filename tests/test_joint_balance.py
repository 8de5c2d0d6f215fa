"""joint at serving scale: the balance search's surrogate and convergence, hedged steps,
determinism, and hand-built optima."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetuner import PlaceOptions, make_cluster, place, profile_trace
from moetuner.methods._joint_balance import search_layer
from moetuner.profile import request_groups
from moetuner.steps import StepPlan, mixture_steps
from moetuner.trace import Trace


def surrogate(counts, weight, floor, row, num_gpus, num_experts, seconds):
    """The balance search's cost, written plainly: per step, the busiest GPU's compute plus
    max(floor, X x busiest GPU's pairs); weighted mean over steps."""
    a, r, x = seconds
    copies = np.bincount(row, minlength=num_experts)
    work = counts[:, row] / copies[row]                                      # [S, P]
    load = work.reshape(len(counts), num_gpus, -1).sum(axis=2)
    active = (work > 0).reshape(len(counts), num_gpus, -1).sum(axis=2)
    cost = np.maximum(a * load, r * active).max(axis=1) + np.maximum(floor, x * load.max(1))
    return float(weight @ cost)


def legal(row, num_gpus):
    per_gpu = row.size // num_gpus
    return all(len(set(row[g * per_gpu:(g + 1) * per_gpu])) == per_gpu
               for g in range(num_gpus))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(4, 8, 0), (4, 6, 2), (3, 6, 3), (2, 4, 2)]),
       st.sampled_from([(1.0, 0.0, 0.0), (1.0, 3.0, 0.5), (0.1, 5.0, 2.0)]))
def test_balance_search_converges_to_a_row_no_swap_or_replica_move_improves(
        seed, shape, seconds):
    """On random small layers: the result is a legal row with every expert placed, no
    worse than the start under the surrogate written plainly, and -- converged -- no swap of
    two slots on different GPUs and no single replica move improves it (brute force)."""
    G, E, R = shape
    rng = np.random.default_rng(seed)
    S = 6
    counts = rng.poisson(rng.gamma(0.7, 8.0, size=E), size=(S, E)).astype(float)
    weight = np.full(S, 1 / S)
    floor = rng.random(S) * 5
    # A legal start: the experts and R replicas sorted, dealt round-robin over the GPUs (a
    # replica sits beside its original in the sorted list, so on another GPU).
    items = np.sort(np.concatenate([np.arange(E), rng.choice(E, R, replace=False)]))
    per_gpu = (E + R) // G
    index = np.arange(E + R)
    row0 = np.empty(E + R, dtype=np.int64)
    row0[(index % G) * per_gpu + index // G] = items
    assert legal(row0, G)
    before = surrogate(counts, weight, floor, row0, G, E, seconds)
    row, moves, evaluated, converged = search_layer(counts, weight, floor, row0, G, E, seconds,
                                                    50, R > 0)
    assert legal(row, G) and set(row) == set(range(E))
    after = surrogate(counts, weight, floor, row, G, E, seconds)
    assert after <= before + 1e-9 and evaluated >= moves
    assert converged
    gpu = np.arange(row.size) // per_gpu
    for p in range(row.size):
        for q in range(p + 1, row.size):
            trial = row.copy()
            trial[p], trial[q] = row[q], row[p]
            if gpu[p] != gpu[q] and legal(trial, G):
                assert surrogate(counts, weight, floor, trial, G, E, seconds) >= after - 1e-9


def test_a_hot_expert_gets_replicas_on_both_nodes():
    """Top-1, expert 0 takes 70% of the tokens; 4 GPUs in 2 nodes, 7 experts + 1 replica.
    With SGLang's nearest replica choice on DeepEP normal kernels, the two copies of expert
    0 belong on different nodes (every token then reaches one on its own node) and the
    replica is the hot expert's."""
    rng = np.random.default_rng(1)
    tokens = 8192
    ids = np.where(rng.random(tokens) < 0.7, 0, rng.integers(1, 7, tokens))[:, None, None]
    trace = Trace(topk_ids=np.repeat(ids, 2, axis=1), num_experts=7,
                  seq_lens=np.full(64, tokens // 64))
    profile = profile_trace(trace, step_gpus=4, plan=StepPlan(phase="prefill",
                                                              tokens_per_gpu=512))
    options = PlaceOptions(redundant=1, exec_model="return", time_limit=20, params={
        "phase": "prefill", "tokens_per_gpu": 512, "replica_policy": "nearest",
        "model": "qwen3-30b-a3b", "hedge": None})
    placement, _ = place(profile, make_cluster(4, 2), "joint", options)
    for row in placement.phy2log:
        slots = np.flatnonzero(row == 0)
        assert slots.size == 2
        assert len({int(s) // 2 // 2 for s in slots}) == 2     # GPU // 2 = node


def test_same_inputs_and_seed_give_the_same_placement():
    rng = np.random.default_rng(3)
    ids = np.argsort(rng.random((3000, 4, 16)) * rng.gamma(0.5, 1, 16), axis=2)[:, :, :2]
    trace = Trace(topk_ids=ids, num_experts=16, seq_lens=np.full(30, 100))
    plan = StepPlan(tokens_per_gpu=32, hedge=0.5)
    profile = profile_trace(trace, step_gpus=4, plan=plan)
    options = PlaceOptions(redundant=4, exec_model="return", seed=7, time_limit=30,
                           params={"tokens_per_gpu": 32})
    first, record = place(profile, make_cluster(4, 2), "joint", options)
    second, _ = place(profile, make_cluster(4, 2), "joint", options)
    assert record.status == "heuristic" and "converged" in record.log
    assert np.array_equal(first.phy2log, second.phy2log)


def test_request_groups_separate_requests_that_route_apart():
    # Requests 0-9 route to experts {0, 1}, 10-19 to {6, 7}: two groups, found exactly.
    ids = np.concatenate([np.tile([0, 1], (200, 3, 1)), np.tile([6, 7], (200, 3, 1))])
    trace = Trace(topk_ids=ids, num_experts=8, seq_lens=np.full(20, 20))
    groups = request_groups(trace, count=2)
    assert len(set(groups[:10])) == 1 and len(set(groups[10:])) == 1
    assert groups[0] != groups[10]
    assert np.array_equal(groups, request_groups(trace, count=2))      # seeded


def test_mixture_steps_draw_each_step_from_its_own_mix_of_groups():
    seq_lens = np.full(20, 50)
    groups = np.repeat([0, 1], 10)
    steps = mixture_steps(seq_lens, 1000, 4, "decode", 64, 40, groups, alpha=0.1, seed=0)
    assert steps.num_steps == 40 and (steps.sizes == 256).all()
    assert np.array_equal(steps.home, np.tile(np.arange(256) % 4, 40))
    assert np.unique(steps.key).size == steps.num_tokens
    # Token t belongs to request t // 50, group (t // 50) // 10; with alpha = 0.1 most steps
    # are dominated by one group, and both groups lead some step.
    share = (steps.order // 500).reshape(40, 256).mean(axis=1)
    assert ((share < 0.1) | (share > 0.9)).mean() > 0.6
    assert (share < 0.5).any() and (share > 0.5).any()
    again = mixture_steps(seq_lens, 1000, 4, "decode", 64, 40, groups, alpha=0.1, seed=0)
    assert np.array_equal(steps.order, again.order)
    prefill = mixture_steps(seq_lens, 1000, 4, "prefill", 64, 5, groups, alpha=1.0, seed=1)
    assert (prefill.sizes == 256).all() and prefill.home.max() == 3


def test_hedge_needs_request_groups():
    from moetuner.errors import InputError
    with pytest.raises(InputError, match="hedge"):
        StepPlan(hedge=0.5).steps(np.full(4, 10), 40, 2)
    with pytest.raises(InputError, match="hedge"):
        StepPlan(hedge=-1.0)
    # Requests without tokens leave nothing to draw from: one line, as serving_steps says.
    with pytest.raises(InputError, match="at least one request with tokens"):
        mixture_steps(np.zeros(3, dtype=int), 0, 2, "decode", 4, 2, np.zeros(3, dtype=int),
                      0.5)
