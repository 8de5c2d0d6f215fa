import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SLICE
from moetuner import (
    InputError,
    PlaceOptions,
    Profile,
    Trace,
    load_placement,
    load_trace,
    make_cluster,
    place,
    profile_trace,
)
from moetuner.cli import run
from moetuner.methods._joint_objective import (
    build_problem,
    fractions,
    layer_costs,
    load_correlation,
    lower_bound,
    model_for,
    objective,
)
from moetuner.methods.joint import (
    LayerSearch,
    enumerate_rows,
    exact_placement,
)
from moetuner.profile import profiles_by_label

# The instant baselines: ``moetuner`` as a warm start is cut by a wall-clock share.
INSTANT = ["eplb_fixed", "linear", "round_robin"]


def random_profile(layers, experts, k, tokens=400, seed=0, skew=2.0):
    """A profile of a random trace with skewed experts and some cross-layer structure."""
    rng = np.random.default_rng(seed)
    popularity = rng.random((layers, experts)) ** skew
    scores = rng.random((tokens, layers, experts)) * popularity
    scores[:, 1:] += 0.5 * scores[:, :-1]  # a token's next-layer choice leans on this one's
    ids = np.argsort(-scores, axis=2)[:, :, :k]
    return profile_trace(Trace(topk_ids=ids, num_experts=experts))


def problem_for(profiles, cluster, redundant, exec_model, robust="mean", weights=None):
    slots = (profiles[0].num_experts + redundant) // cluster.num_gpus
    weights = np.ones(len(profiles)) if weights is None else np.asarray(weights)
    return build_problem(profiles, weights, cluster, slots, exec_model, robust,
                         model_for(profiles[0]))


def brute_force(problem):
    rows = enumerate_rows(problem.num_experts, problem.num_gpus, problem.slots_per_gpu)
    return min(objective(problem, rows[list(choice)])
               for choice in itertools.product(range(len(rows)), repeat=problem.num_layers))


@pytest.mark.parametrize("exec_model", ["return", "follow"])
@pytest.mark.parametrize(("experts", "gpus", "nodes", "redundant"),
                         [(4, 2, 1, 0), (4, 2, 2, 0), (4, 2, 2, 2), (6, 3, 3, 0)])
def test_tiny_instances_reach_the_brute_force_optimum(exec_model, experts, gpus, nodes,
                                                      redundant):
    layers = 3 if experts == 4 else 2
    profile = random_profile(layers, experts, 2, seed=experts + redundant)
    cluster = make_cluster(gpus, nodes)
    placement, record = place(profile, cluster, "joint",
                              PlaceOptions(redundant=redundant, exec_model=exec_model))
    problem = problem_for([profile], cluster, redundant, exec_model)
    assert record.status == "optimal"
    assert record.objective == pytest.approx(brute_force(problem), rel=1e-9)
    assert objective(problem, placement.phy2log) == pytest.approx(record.objective, rel=1e-9)


def test_exact_program_matches_brute_force_with_two_profiles():
    profiles = [random_profile(3, 4, 2, seed=s) for s in (1, 2)]
    problem = problem_for(profiles, make_cluster(2, 2), 0, "follow", weights=[0.3, 0.7])
    assert objective(problem, exact_placement(problem)) == pytest.approx(brute_force(problem))


@pytest.mark.parametrize("exec_model", ["return", "follow"])
def test_swap_search_deltas_match_the_objective(exec_model):
    profiles = [random_profile(3, 12, 3, seed=s) for s in (3, 4)]
    cluster = make_cluster(4, 2)
    problem = problem_for(profiles, cluster, 4, exec_model, robust="max")
    phy2log = place(profiles[0], cluster, "linear", PlaceOptions(redundant=4))[0].phy2log
    totals = layer_costs(problem, phy2log).sum(axis=1)
    X = fractions(problem, phy2log)
    search = LayerSearch(problem, 1, phy2log[1], X[0], X[2], totals)
    search.kick(np.random.default_rng(0), 5)
    search.descend(float("inf"))
    after = phy2log.copy()
    after[1] = search.row()
    assert np.allclose(layer_costs(problem, after).sum(axis=1), totals + search.delta,
                       rtol=1e-9, atol=0)


def test_robust_max_equals_mean_with_one_profile():
    profile = random_profile(4, 16, 4, seed=5)
    cluster = make_cluster(4, 2)
    results = []
    for robust in ("mean", "max"):
        placement, record = place(profile, cluster, "joint", PlaceOptions(
            redundant=4, exec_model="follow",
            params={"robust": robust, "workers": 1, "warm_start": INSTANT}))
        results.append((placement.phy2log, record.objective))
    assert np.array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_never_worse_than_the_best_baseline_and_deterministic():
    profile = random_profile(4, 16, 4, seed=6)
    cluster = make_cluster(8, 2)
    problem = problem_for([profile], cluster, 8, "return")
    runs = [place(profile, cluster, "joint", PlaceOptions(
        redundant=8, exec_model="return", seed=3, params={"warm_start": INSTANT}))
            for _ in range(2)]
    assert np.array_equal(runs[0][0].phy2log, runs[1][0].phy2log)
    for name in ("linear", "round_robin", "eplb_fixed"):
        baseline, _ = place(profile, cluster, name, PlaceOptions(redundant=8))
        assert runs[0][1].objective <= objective(problem, baseline.phy2log) + 1e-15
    assert runs[0][1].status == "heuristic" and "warm start" in runs[0][1].log


def test_time_limit_path_returns_a_valid_placement():
    profile = random_profile(6, 32, 4, seed=7)
    cluster = make_cluster(8, 2)
    placement, record = place(profile, cluster, "joint",
                              PlaceOptions(redundant=8, time_limit=0.01, exec_model="follow"))
    assert placement.replicas_on_gpu.max() == 1
    assert record.status in ("time_limit", "heuristic")
    problem = problem_for([profile], cluster, 8, "follow")
    linear, _ = place(profile, cluster, "linear", PlaceOptions(redundant=8))
    assert record.objective <= objective(problem, linear.phy2log) + 1e-15
    assert record.bound <= record.objective


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), gpus=st.sampled_from([2, 4]), nodes=st.sampled_from([1, 2]),
       extra=st.integers(0, 2), exec_model=st.sampled_from(["return", "follow"]),
       robust=st.sampled_from(["mean", "max"]))
def test_replicas_never_share_a_gpu_and_bounds_hold(seed, gpus, nodes, extra, exec_model,
                                                    robust):
    experts, redundant = 8, extra * gpus
    profiles = [random_profile(3, experts, 2, tokens=200, seed=seed + i) for i in range(2)]
    cluster = make_cluster(gpus, nodes)
    options = PlaceOptions(redundant=redundant, exec_model=exec_model, time_limit=2,
                           params={"profiles": profiles, "robust": robust, "workers": 1})
    placement, record = place(profiles[0] + profiles[1], cluster, "joint", options)
    assert placement.replicas_on_gpu.max() == 1
    problem = problem_for(profiles, cluster, redundant, exec_model, robust)
    bound = lower_bound(problem, redundant)
    assert record.bound <= record.objective + 1e-15
    assert bound <= objective(problem, placement.phy2log) + 1e-15
    rng = np.random.default_rng(seed)
    for name in ("linear", "round_robin", "eplb_fixed"):
        baseline, _ = place(profiles[0], cluster, name, PlaceOptions(redundant=redundant))
        assert bound <= objective(problem, baseline.phy2log) + 1e-15
        shuffled = rng.permuted(baseline.phy2log, axis=1)
        if (np.sort(shuffled.reshape(3, gpus, -1), axis=2)[:, :, 1:]
                != np.sort(shuffled.reshape(3, gpus, -1), axis=2)[:, :, :-1]).all():
            assert bound <= objective(problem, shuffled) + 1e-15


def test_profile_disagreement_is_reported():
    a, b = random_profile(3, 8, 2, seed=1), random_profile(3, 8, 2, seed=2)
    corr = load_correlation([a, a, b])
    assert corr.shape == (3, 3, 3) and np.allclose(corr[0, 1], 1.0)
    assert np.all(corr[0, 2] < 1.0)
    _, record = place(a + b, make_cluster(2), "joint",
                      PlaceOptions(params={"profiles": [a, b], "weights": [1, 3]}))
    assert "per-layer load correlation" in record.log


@pytest.mark.parametrize(("options", "field"), [
    (PlaceOptions(exec_model="sideways"), "exec_model"),
    (PlaceOptions(params={"robust": "median"}), "robust"),
    (PlaceOptions(params={"weights": [1, 2]}), "weights"),
    (PlaceOptions(params={"model": "gpt-5"}), "model"),
    (PlaceOptions(params={"warm_start": ["nothing"]}), "warm_start"),
])
def test_bad_requests_are_input_errors(options, field):
    with pytest.raises(InputError) as error:
        place(random_profile(2, 8, 2), make_cluster(2), "joint", options)
    assert error.value.field == field


def test_profiles_of_another_shape_are_rejected():
    options = PlaceOptions(params={"profiles": [random_profile(2, 8, 2),
                                                random_profile(3, 8, 2)]})
    with pytest.raises(InputError):
        place(random_profile(2, 8, 2), make_cluster(2), "joint", options)


def test_profiles_by_label_partition_the_trace():
    trace = load_trace(str(SLICE))
    parts = profiles_by_label(trace, "seq_dataset")
    values = set(trace.seq_labels["seq_dataset"].tolist())
    assert len(parts) == len(values) >= 2
    assert sum(p.tokens for p in parts) == trace.num_tokens
    whole = profile_trace(trace)
    assert np.array_equal(sum(p.load for p in parts), whole.load)
    assert np.array_equal(sum(p.transitions_top1 for p in parts), whole.transitions_top1)
    assert {p.provenance[0]["selection"] for p in parts} == {f"seq_dataset={v}" for v in values}
    with pytest.raises(InputError):
        profiles_by_label(trace, "seq_colour")


def test_cli_place_joint_with_workloads(tmp_path, capsys):
    slice_path = str(SLICE)
    out = tmp_path / "joint.json"
    assert run(["place", slice_path, "--gpus", "4", "--nodes", "2", "--redundant", "4",
                "--method", "joint", "--exec", "return", "--split-by", "seq_dataset",
                "--robust", "max", "--time-limit", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-layer load correlation" in printed
    placement = load_placement(out)
    assert placement.replicas_on_gpu.max() == 1
    assert placement.metadata["options"]["exec_model"] == "return"
    assert len(placement.metadata["profile"]) == 3  # one provenance entry per data set
    # Workloads are recorded by provenance, not by their count arrays.
    workloads = placement.metadata["options"]["params"]["profiles"]
    assert [set(w) for w in workloads] == [{"provenance", "tokens"}] * 3
    assert out.stat().st_size < 50_000
    profile = tmp_path / "p.npz"
    assert run(["profile", slice_path, "-o", str(profile)]) == 0
    assert run(["place", slice_path, str(profile), "--gpus", "2", "--method", "joint",
                "--weight", "1", "--weight", "3", "--time-limit", "1", "-o", str(out)]) == 0


def test_cli_place_joint_bad_input_exits_2(tmp_path):
    slice_path = str(SLICE)
    out = tmp_path / "joint.json"
    for args in (["--exec", "sideways"], ["--robust", "median"],
                 ["--weight", "1", "--weight", "2"], ["--split-by", "seq_colour"]):
        assert run(["place", slice_path, "--gpus", "2", "--method", "joint", "--time-limit",
                    "1", *args, "-o", str(out)]) == 2
    assert not out.exists()


def test_one_slot_per_gpu_has_a_bound():
    load = np.array([[5, 3, 2, 1], [1, 2, 3, 4]])
    placement, record = place(Profile.from_load(load), make_cluster(4, 2), "joint",
                              PlaceOptions(time_limit=2))
    assert placement.slots_per_gpu == 1
    assert record.bound is not None and record.bound <= record.objective + 1e-12
