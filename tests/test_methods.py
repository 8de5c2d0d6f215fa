"""Placement methods: brute-force optima of both ILPs, validity, limits, determinism, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SLICE, random_trace
from moetuner import InputError, PlaceOptions, Profile, load_placement, make_cluster, place
from moetuner import methods as registered
from moetuner.cli import run
from moetuner.methods.eplb import balanced_packing
from moetuner.methods.moetuner import (
    _initial_assignment,
    balance_objective,
    cluster_traffic,
    improve_balance_by_swaps,
    placement_traffic,
    polish_layers_cpsat,
    solve_balance,
    solve_traffic_cpsat,
    solve_traffic_dp,
    traffic_objective,
)
from moetuner.profile import profile_trace


def brute_balance(weight: np.ndarray, clusters: int, size: int | None,
                  keys: np.ndarray | None = None) -> float:
    """Smallest sum |load_c - mean| over every assignment of items to clusters."""
    best = np.inf
    for labels in itertools.product(range(clusters), repeat=len(weight)):
        labels = np.array(labels)
        counts = np.bincount(labels, minlength=clusters)
        if (size is not None and (counts != size).any()) or (counts == 0).any():
            continue
        if keys is not None and len(set(zip(keys, labels, strict=True))) < len(keys):
            continue
        best = min(best, float(balance_objective(weight[None], labels[None], clusters)[0]))
    return best


@pytest.mark.parametrize("solver", ["cpsat", "highs"])
@pytest.mark.parametrize("size", [2, None])
def test_ilp1_equals_brute_force(size, solver):
    rng = np.random.default_rng(1)
    for _ in range(3):                           # three layers of L=3, E=4, G=2
        weight = rng.integers(0, 100, 4).astype(float)
        cluster, objective, bound, status, _ = solve_balance(weight, 2, size, budget=5.0,
                                                             solver=solver)
        assert status == "optimal"
        assert objective == pytest.approx(brute_balance(weight, 2, size))
        assert objective == pytest.approx(
            balance_objective(weight[None], cluster[None], 2)[0])
        assert bound <= objective + 1e-9
        counts = np.bincount(cluster, minlength=2)
        assert (counts == size).all() if size else (counts >= 1).all()


@pytest.mark.parametrize("solver", ["cpsat", "highs"])
def test_ilp1_keeps_copies_apart(solver):
    weight = np.array([50.0, 50.0, 40.0, 10.0, 30.0, 20.0, 7.0, 3.0, 61.0])
    keys = np.array([0, 0, 1, 2, 3, 4, 5, 6, 7])  # items 0 and 1 are copies of one expert
    cluster, objective, _, _, _ = solve_balance(weight, 3, 3, keys, budget=5.0, solver=solver)
    assert cluster[0] != cluster[1]
    assert objective == pytest.approx(brute_balance(weight, 3, 3, keys))


def brute_traffic(traffic: np.ndarray, cost: np.ndarray) -> float:
    """Smallest ILP 2 objective over every per-layer permutation."""
    layers, gpus = traffic.shape[0] + 1, traffic.shape[1]
    perms = list(itertools.permutations(range(gpus)))
    return min(traffic_objective(traffic, cost, np.array(choice))
               for choice in itertools.product(perms, repeat=layers))


@pytest.mark.parametrize("gpus,nodes", [(2, 1), (3, 1), (4, 2)])
def test_ilp2_dp_and_cpsat_equal_brute_force(gpus, nodes):
    rng = np.random.default_rng(gpus)
    traffic = rng.integers(0, 50, (2, gpus, gpus)).astype(float)     # L = 3 layers
    cost = make_cluster(gpus, nodes).link_cost()
    best = brute_traffic(traffic, cost)
    gpu_of_cluster, value = solve_traffic_dp(traffic, cost)
    assert value == pytest.approx(best)
    assert traffic_objective(traffic, cost, gpu_of_cluster) == pytest.approx(best)
    hint = _initial_assignment(traffic, None)
    found, bound, status, _ = solve_traffic_cpsat(traffic, cost, hint, gpus // nodes, None, None,
                                                  _deadline(10.0), 0, 0.0)
    assert status == "optimal"
    assert traffic_objective(traffic, cost, np.argsort(found, axis=1)) == pytest.approx(best)
    assert bound == pytest.approx(best)


def test_layer_resolve_is_exact_for_two_layers():
    # With one layer pair on one node, fixing layer 0 loses nothing (GPUs are symmetric), so
    # one re-solve of layer 1 must reach the brute-force optimum.
    rng = np.random.default_rng(9)
    traffic = rng.integers(0, 50, (1, 4, 4)).astype(float)
    cost = make_cluster(4).link_cost()
    start = np.tile(np.arange(4), (2, 1))
    polished = polish_layers_cpsat(traffic, cost, start, _deadline(10.0), 0)
    assert traffic_objective(traffic, cost, np.argsort(polished, axis=1)) == pytest.approx(
        brute_traffic(traffic, cost))


def _deadline(seconds: float) -> float:
    import time
    return time.perf_counter() + seconds


def test_ilp2_cpsat_free_sizes_holds_memory_balance():
    rng = np.random.default_rng(5)
    traffic = rng.integers(0, 50, (2, 2, 2)).astype(float)
    sizes = np.array([[3, 1], [1, 3], [2, 2]])
    cost = make_cluster(2).link_cost()
    hint = _initial_assignment(traffic, sizes)
    found, _, status, _ = solve_traffic_cpsat(traffic, cost, hint, 2, sizes, (6, 6),
                                              _deadline(10.0), 0, 0.0)
    held = np.zeros(2, dtype=int)
    np.add.at(held, found, sizes)
    assert status == "optimal" and (held == 6).all()
    feasible = [np.array(c) for c in itertools.product([(0, 1), (1, 0)], repeat=3)
                if (np.bincount(np.array(c).ravel(), weights=sizes.ravel()) == 6).all()]
    assert traffic_objective(traffic, cost, np.argsort(found, axis=1)) == pytest.approx(
        min(traffic_objective(traffic, cost, np.argsort(c, axis=1)) for c in feasible))


def test_moetuner_objective_is_its_placements_traffic():
    rng = np.random.default_rng(0)
    profile = profile_trace(random_trace(rng, 400, 3, 4, 2))
    for params in ({}, {"ilp2": "cpsat"}, {"ilp2": "heuristic"}):
        placement, record = place(profile, make_cluster(2), "moetuner",
                                  PlaceOptions(time_limit=5, params=params))
        cost = make_cluster(2).link_cost()
        assert record.objective == pytest.approx(
            placement_traffic(placement, profile.transitions_top1, cost))
    assert "dp" in place(profile, make_cluster(2), "moetuner")[1].log


def random_profile(seed: int, layers: int, experts: int, k: int) -> Profile:
    return profile_trace(random_trace(np.random.default_rng(seed), 200, layers, experts, k))


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([4, 6, 8]),
       st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]), st.integers(0, 1))
def test_every_method_returns_a_valid_placement(seed, layers, experts, shape, extra):
    gpus, nodes = shape
    counted = random_profile(seed, layers, experts, 2)
    # A loads-only profile too: moetuner then skips ILP 2.
    profile = counted if seed % 2 else Profile.from_load(counted.load, top_k=2)
    redundant = (-experts) % gpus + (extra * gpus if gpus > 1 else 0)
    for name in registered():
        for params in ({}, {"sizes": "free"}) if name == "moetuner" else ({},):
            # eplb_fixed's hierarchical policy cannot spread replicas inside a one-GPU node
            # (a ValueError, reported); it runs the global policy here.
            groups = 1 if name == "eplb_fixed" else nodes
            groups_param = {"num_groups": groups} if name.startswith("eplb") else {}
            options = PlaceOptions(redundant=0 if params else redundant, time_limit=0.3,
                                   params={**groups_param, **params})
            if params and experts % gpus:
                continue
            placement, record = place(profile, make_cluster(gpus, nodes), name, options)
            assert placement.num_layers == layers
            assert (placement.logcnt >= 1).all()
            if name != "eplb":
                assert placement.replicas_on_gpu.max() <= 1
            if name == "moetuner" and not params:
                assert placement.num_slots == experts + options.redundant
                assert not placement.allow_empty_slots


def test_free_sizes_balance_memory_and_mark_empty_slots():
    load = np.array([[100, 1, 1, 1], [1, 1, 1, 100], [25, 25, 25, 25]])
    profile = Profile.from_load(load)
    placement, record = place(profile, make_cluster(2), "moetuner",
                              PlaceOptions(time_limit=5, params={"sizes": "free"}))
    assert placement.allow_empty_slots and (placement.phy2log < 0).any()
    per_gpu = (placement.phy2log.reshape(3, 2, -1) >= 0).sum(axis=2)      # [L, G]
    assert per_gpu[0].tolist() in ([1, 3], [3, 1])                       # hot expert alone
    assert per_gpu.sum(axis=0).tolist() == [6, 6]                        # memory balance


@pytest.mark.parametrize("ilp2", ["cpsat", "polish", "heuristic"])
def test_time_limit_returns_valid_placement_no_worse_than_warm_start(ilp2):
    profile = random_profile(3, 6, 16, 2)
    cluster = make_cluster(8, 2)
    options = PlaceOptions(time_limit=0.05, params={"ilp2": ilp2, "stage1_share": 0.0})
    placement, record = place(profile, cluster, "moetuner", options)
    assert record.status in ("heuristic", "time_limit")
    # Stage 1 without a budget is greedy packing plus swaps; rebuild the warm start from it.
    weight = profile.load.astype(float)
    clusters = np.stack([improve_balance_by_swaps(w, c, 8)
                         for w, c in zip(weight, balanced_packing(weight, 8)[0], strict=True)])
    share = np.zeros((6, 16, 8))
    np.put_along_axis(share, clusters[:, :, None], 1.0, axis=2)
    traffic = cluster_traffic(profile.transitions_top1.astype(float), share)
    warm = np.argsort(_initial_assignment(traffic, None), axis=1)
    assert record.objective <= traffic_objective(traffic, cluster.link_cost(), warm) + 1e-9


def test_same_seed_same_placement():
    profile = random_profile(4, 3, 8, 2)
    options = PlaceOptions(time_limit=2, seed=7, params={"ilp2": "cpsat"})
    first, _ = place(profile, make_cluster(4, 2), "moetuner", options)
    second, _ = place(profile, make_cluster(4, 2), "moetuner", options)
    np.testing.assert_array_equal(first.phy2log, second.phy2log)


@pytest.mark.parametrize("experts,gpus,redundant,params,field", [
    (6, 4, 0, {}, "num_gpus"),              # E not divisible into equal slots
    (8, 4, -4, {}, "redundant"),            # R < 0
    (4, 8, 0, {}, "num_gpus"),              # more GPUs than slots
    (8, 4, 4, {"sizes": "free"}, "redundant"),
    (8, 4, 0, {"sizes": "odd"}, "sizes"),
    (8, 4, 0, {"ilp2": "gurobi"}, "ilp2"),
    (8, 4, 0, {"sizes": "free", "ilp2": "dp"}, "ilp2"),
    (8, 4, 0, {"transitions": "all"}, "transitions"),
    (8, 4, 0, {"ilp1": "gurobi"}, "ilp1"),
])
def test_impossible_requests_fail_before_solving(experts, gpus, redundant, params, field):
    profile = random_profile(0, 2, experts, 2)
    with pytest.raises(InputError) as caught:
        place(profile, make_cluster(gpus), "moetuner",
              PlaceOptions(redundant=redundant, params=params))
    assert caught.value.field == field


def test_unknown_method_is_an_input_error():
    with pytest.raises(InputError, match="one of"):
        place(random_profile(0, 2, 4, 2), make_cluster(2), "nope")


def test_cli_place_round_trip_and_bad_input(tmp_path, capsys):
    out = tmp_path / "placement.json"
    assert run(["place", str(SLICE), "--gpus", "4", "--redundant", "4", "--time-limit", "1",
                "--select", "seq_dataset=mmlu*", "--drop", "seq_repetition",
                "--param", "ilp2=heuristic", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "moetuner" in text and "ILP 2 algorithm: heuristic" in text
    placement = load_placement(out)
    assert placement.num_slots == 36 and placement.replicas_on_gpu.max() <= 1
    meta = json.loads(out.read_text())["metadata"]
    assert meta["options"]["params"]["ilp2"] == "heuristic"
    assert meta["record"]["objective"] is not None
    bad = tmp_path / "bad.json"
    for args in (["--gpus", "5"], ["--gpus", "4", "--redundant", "-1"],
                 ["--gpus", "4", "--method", "nope"], ["--gpus", "4", "--param", "x"],
                 ["--gpus", "4", "--time-limit", "0"]):
        assert run(["place", str(SLICE), *args, "-o", str(bad)]) == 2
    assert not bad.exists()
    assert "error" in capsys.readouterr().err


def test_only_per_step_methods_ask_for_sampled_steps():
    from moetuner.methods import uses_steps

    assert uses_steps("joint")
    assert not any(uses_steps(m) for m in ("linear", "round_robin", "eplb", "eplb_fixed",
                                           "moetuner"))
