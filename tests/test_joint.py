import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SLICE, random_trace
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
from moetuner.costmodel import CostCoefficients
from moetuner.engine import KERNELS, EngineSettings
from moetuner.methods import Workload, parse_params
from moetuner.methods._joint_objective import (
    build_problem,
    layer_step_costs,
    lower_bound,
    model_for,
    objective,
    step_costs,
)
from moetuner.methods.joint import LayerSearch, enumerate_rows, peak_loads
from moetuner.models import get_model
from moetuner.profile import load_profile, profiles_by_label, sample_steps
from moetuner.steps import StepPlan

# The instant baselines: ``moetuner`` as a warm start is cut by a wall-clock share.
INSTANT = "eplb_fixed,linear,round_robin"


def stepped_profile(layers, experts, k, gpus, tokens=400, seed=0, sequences=12):
    """A profile with sampled decode steps of a random skewed trace."""
    rng = np.random.default_rng(seed)
    popularity = rng.random((layers, experts)) ** 2
    scores = rng.random((tokens, layers, experts)) * popularity
    ids = np.argsort(-scores, axis=2)[:, :, :k]
    cuts = np.sort(rng.integers(1, tokens, sequences - 1))
    seq_lens = np.diff(np.concatenate([[0], cuts, [tokens]]))
    # Weights make the trace ordered (column 0 the primary), as the reference assumes.
    weights = np.take_along_axis(scores, ids, axis=2)
    trace = Trace(topk_ids=ids, num_experts=experts, seq_lens=seq_lens, topk_weights=weights)
    assert trace.ordered
    return profile_trace(trace, step_gpus=gpus,
                         plan=StepPlan(source="recorded", concurrency=4 * gpus))


def problem_for(profile, cluster, redundant, exec_model, policy="even", kernel="deepep-ll"):
    slots = (profile.num_experts + redundant) // cluster.num_gpus
    return build_problem([profile], np.ones(1), cluster, slots,
                         EngineSettings(exec_model, policy, kernel), "mean",
                         get_model("olmoe-1b-7b"))


def reference_step_costs(problem, phy2log, cluster):
    """``[L, S]`` the per-step cost, token by token with Python loops (the semantics of
    ``moetuner.engine`` and ``costmodel``'s docstrings, written independently)."""
    sample, home = problem.samples[0], problem.homes[0]
    G, N, spg = problem.num_gpus, problem.num_nodes, problem.slots_per_gpu
    kernel = problem.settings.kernel
    per_node = G // N
    m, c = problem.model, problem.cost.coefficients
    hw = c.resolved(cluster)
    constants = c.kernel(kernel)
    pair_s = 2 * m.expert_params / (hw["peak_flops"] * c.compute_efficiency)
    read_s = m.expert_weight_bytes / (hw["memory_bandwidth"] * c.memory_efficiency)
    # Message bytes: DeepEP dispatches FP8 (with a 4-byte scale per 128 values), else BF16.
    fp8 = m.hidden_size + 4 * -(-m.hidden_size // 128)
    size = {"dispatch": fp8 if kernel.startswith("deepep") else 2 * m.hidden_size,
            "combine": 2 * m.hidden_size}
    L = problem.num_layers
    out = np.zeros((L, sample.num_steps))
    for s in range(sample.num_steps):
        tokens = range(sample.bounds[s], sample.bounds[s + 1])
        where = {t: int(home[t]) for t in tokens}
        for layer in range(L):
            row = list(phy2log[layer])
            pairs, used = [0] * G, set()
            sets = {}
            for t in tokens:
                gpus = []
                for e in sample.ids[t, layer]:
                    slots = [i for i, x in enumerate(row) if x == e]
                    if problem.replica_policy == "nearest":
                        here = [i for i in slots if i // spg == where[t]]
                        near = [i for i in slots if i // spg // per_node
                                == where[t] // per_node]
                        slots = here or near or slots
                    slot = slots[sample.token[t] % len(slots)]
                    used.add(slot)
                    pairs[slot // spg] += 1
                    gpus.append(slot // spg)
                sets[t] = gpus
            compute = max(max(pairs[g] * pair_s,
                              sum(1 for x in used if x // spg == g) * read_s)
                          for g in range(G))

            def exchange(centres, direction, tokens=tokens, sets=sets):
                sent, recv = [0] * G, [0] * G
                nsent, nrecv = [0] * G, [0] * G
                for t in tokens:
                    c0 = centres[t]
                    if kernel in ("deepep-ll", "nccl"):     # one message per pair
                        for g in sets[t]:
                            if g != c0 and g // per_node == c0 // per_node:
                                sent[c0] += 1
                                recv[g] += 1
                            elif g != c0:
                                nsent[c0] += 1
                                nrecv[g] += 1
                        continue
                    for g in set(sets[t]) - {c0}:
                        if g // per_node == c0 // per_node:
                            sent[c0] += 1
                            recv[g] += 1
                    for v in {g // per_node for g in sets[t]} - {c0 // per_node}:
                        nsent[c0] += 1
                        nrecv[v * per_node + c0 % per_node] += 1
                k = constants[direction]
                intra_s = size[direction] / (hw["intra_bandwidth"] * k["intra_efficiency"])
                inter_s = size[direction] / (hw["inter_bandwidth"] * k["inter_efficiency"])
                busy = [max(sent[g], recv[g]) * intra_s + max(nsent[g], nrecv[g]) * inter_s
                        for g in range(G)]
                return max(busy) + (k["latency"] if G > 1 else 0.0)

            dispatch = exchange(where, "dispatch")
            if problem.exec_model == "return":
                combine = exchange(where, "combine")
            else:
                where = {t: sets[t][0] for t in tokens}  # ordered: the primary's GPU
                combine = exchange(where, "combine")
            out[layer, s] = dispatch + compute + combine
    return out


@pytest.mark.parametrize("exec_model", ["return", "follow"])
@pytest.mark.parametrize(("gpus", "nodes", "redundant", "policy"), [
    (2, 1, 0, "even"), (4, 2, 0, "even"), (4, 2, 4, "even"), (4, 2, 4, "nearest"),
    (4, 2, 8, "nearest")])
@pytest.mark.parametrize("kernel", KERNELS)
def test_step_costs_match_a_per_token_reference(exec_model, gpus, nodes, redundant, policy,
                                                kernel):
    profile = stepped_profile(2, 8, 2, gpus, tokens=120)
    cluster = make_cluster(gpus, nodes)
    problem = problem_for(profile, cluster, redundant, exec_model, policy, kernel)
    options = PlaceOptions(redundant=redundant, exec_model=exec_model)
    for method in ("linear", "eplb_fixed", "round_robin"):
        phy2log = place(profile, cluster, method, options)[0].phy2log
        np.testing.assert_allclose(step_costs(problem, phy2log, 0),
                                   reference_step_costs(problem, phy2log, cluster),
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("exec_model", ["return", "follow"])
def test_incremental_move_costs_equal_a_full_recount(exec_model):
    profile = stepped_profile(3, 8, 2, 4, tokens=200)
    cluster = make_cluster(4, 2)
    problem = problem_for(profile, cluster, 4, exec_model)
    phy2log = place(profile, cluster, "eplb_fixed", PlaceOptions(redundant=4))[0].phy2log
    entering = layer_step_costs(problem, 0, 0, phy2log[0], problem.homes[0])[1]
    search = LayerSearch(problem, phy2log, 1, [entering])
    rng = np.random.default_rng(0)
    search.kick_and_descend(rng, 2, float("inf"))
    recount = search._combined_cost([search._count(0, search.row, None)])
    assert search.cost == pytest.approx(recount, rel=1e-12)
    trial = phy2log.copy()
    trial[1] = search.final_row()
    full = step_costs(problem, trial, 0)
    layers = [1, 2] if exec_model == "follow" else [1]
    assert search.cost == pytest.approx(full[layers].sum(axis=0).mean(), rel=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), exec_model=st.sampled_from(["return", "follow"]))
def test_bound_holds_and_joint_never_worse_than_its_warm_start(seed, exec_model):
    profile = stepped_profile(2, 8, 2, 4, tokens=160, seed=seed)
    cluster = make_cluster(4, 2)
    options = PlaceOptions(redundant=4, exec_model=exec_model, seed=seed, time_limit=3,
                           params={"warm_start": INSTANT, "kicks": 1})
    placement, record = place(profile, cluster, "joint", options)
    assert placement.replicas_on_gpu.max() == 1
    problem = build_problem([profile], np.ones(1), cluster, 3, EngineSettings(exec_model),
                            "mean", model_for(profile))
    value = objective(problem, placement.phy2log)
    assert value == pytest.approx(record.objective)
    assert lower_bound(problem, 4) <= value + 1e-15
    for name in INSTANT.split(","):
        baseline = place(profile, cluster, name, PlaceOptions(redundant=4))[0]
        assert value <= objective(problem, baseline.phy2log) * (1 + 1e-9)


@pytest.mark.parametrize(("exec_model", "layers"), [("return", 2), ("follow", 3)])
def test_tiny_instances_reach_the_brute_force_optimum(exec_model, layers):
    profile = stepped_profile(layers, 4, 2, 2, tokens=80)
    cluster = make_cluster(2, 2)
    placement, record = place(profile, cluster, "joint", PlaceOptions(
        exec_model=exec_model, time_limit=5, params={"warm_start": INSTANT}))
    problem = build_problem([profile], np.ones(1), cluster, 2, EngineSettings(exec_model),
                            "mean", model_for(profile))
    rows = enumerate_rows(4, 2, 2)
    best = min(objective(problem, rows[list(choice)])
               for choice in itertools.product(range(len(rows)), repeat=layers))
    assert record.status == "optimal"
    assert objective(problem, placement.phy2log) == pytest.approx(best)


def test_affine_experts_share_a_node_but_not_a_gpu():
    """Experts 2i and 2i + 1 always fire together (top-2), and most tokens of a step pick
    the same pair (bursts). On 4 GPUs in 2 nodes with 2 slots each, the best placement keeps
    every pair on one node (one DeepEP message) and on two GPUs of it (the burst splits)."""
    rng = np.random.default_rng(0)
    steps, per_step = 16, 2048
    burst = np.repeat(np.arange(steps) % 4, per_step)
    pair = np.where(rng.random(steps * per_step) < 0.8, burst,
                    rng.integers(0, 4, steps * per_step))[:, None]
    ids = np.stack([2 * pair, 2 * pair + 1], axis=2)                # [T, 1, 2]
    trace = Trace(topk_ids=ids, num_experts=8)
    profile = profile_trace(trace, step_gpus=4,
                            plan=StepPlan(source="recorded", concurrency=per_step))
    cluster = make_cluster(4, 2)
    # DeepEP normal (one message per token and node) is the kernel that rewards a node.
    options = PlaceOptions(exec_model="return", time_limit=10,
                           params={"warm_start": "linear", "model": "qwen3-30b-a3b",
                                   "kernel": "deepep-normal"})
    placement, _ = place(profile, cluster, "joint", options)
    gpu = np.empty(8, dtype=int)
    gpu[placement.phy2log[0]] = np.arange(8) // 2
    assert all(gpu[2 * i] // 2 == gpu[2 * i + 1] // 2 for i in range(4))   # one node
    assert all(gpu[2 * i] != gpu[2 * i + 1] for i in range(4))             # two GPUs


def test_per_step_imbalance_stays_within_the_slack_of_the_warm_start():
    profile = stepped_profile(3, 16, 4, 4, tokens=600)
    cluster = make_cluster(4, 2)
    problem = problem_for(profile, cluster, 0, "return")
    warm = place(profile, cluster, "eplb_fixed", PlaceOptions())[0].phy2log
    for slack in (0.0, 0.02):
        options = PlaceOptions(exec_model="return", time_limit=2, params={
            "warm_start": "eplb_fixed", "imbalance_slack": slack})
        placement = place(profile, cluster, "joint", options)[0]
        assert (peak_loads(problem, placement.phy2log)
                <= (1 + slack) * peak_loads(problem, warm) * (1 + 1e-12)).all()


def test_replica_counts_are_chosen_not_copied():
    """With one cold expert, a warm start replicating the hottest ones is not kept when
    replicas that stay idle in most steps save weight reads: the counts may change."""
    profile = stepped_profile(1, 8, 2, 4, tokens=200)
    cluster = make_cluster(4, 1)
    options = PlaceOptions(redundant=4, exec_model="return", time_limit=3,
                           params={"warm_start": "eplb_fixed"})
    placement, record = place(profile, cluster, "joint", options)
    warm = place(profile, cluster, "eplb_fixed", PlaceOptions(redundant=4))[0]
    problem = build_problem([profile], np.ones(1), cluster, 3, EngineSettings("return"),
                            "mean", model_for(profile))
    assert record.objective <= objective(problem, warm.phy2log)
    assert placement.replicas_on_gpu.max() == 1


@pytest.mark.parametrize(("method", "pairs", "field"), [
    ("eplb", ["num_groups=0"], "num_groups"),
    ("moetuner", ["workers=abc"], "workers"),
    ("joint", ["kicks=-1"], "kicks"),
    ("joint", ["replica_policy=random"], "replica_policy"),
    ("joint", ["colour=blue"], "colour"),
    ("linear", ["anything=1"], "anything"),
    ("joint", ["kicks"], "param"),
])
def test_bad_params_are_input_errors_naming_the_param(method, pairs, field):
    with pytest.raises(InputError) as err:
        parse_params(method, pairs)
    assert field in str(err.value)


def test_params_parse_to_typed_settings():
    eplb = parse_params("eplb", ["num_groups=4", "fixed=true"])
    assert (eplb.num_groups, eplb.fixed) == (4, True)
    assert parse_params("eplb", []).num_groups is None
    joint = parse_params("joint", ["kicks=3", "concurrency=256", "model=gpt-oss-20b"])
    assert (joint.kicks, joint.concurrency, joint.model) == (3, 256, "gpt-oss-20b")


def test_joint_params_plan_the_phase_kernel_and_steps():
    params = parse_params("joint", ["phase=prefill", "kernel=nccl", "tokens_per_gpu=64",
                                    "replay=recorded", "concurrency=512"])
    assert (params.phase, params.kernel, params.tokens_per_gpu) == ("prefill", "nccl", 64)
    assert params.step_plan() == StepPlan("prefill", "recorded", 64, step_tokens=512)
    # Serving steps are hedged by default (each from its own mix of request groups).
    assert parse_params("joint", []).step_plan() == StepPlan("decode", "serving", hedge=0.5)
    assert parse_params("joint", ["concurrency=8"]).step_plan() == StepPlan(hedge=0.5)
    assert parse_params("joint", ["hedge=none"]).step_plan() == StepPlan()
    for pair, field in (("phase=x", "phase"), ("kernel=y", "kernel"),
                        ("tokens_per_gpu=0", "tokens_per_gpu"), ("replay=average", "replay"),
                        ("batching=decode", "batching")):
        with pytest.raises(InputError, match=field):
            parse_params("joint", [pair])


def test_cli_place_joint_on_prefill_steps(tmp_path):
    out = tmp_path / "joint.json"
    assert run(["place", str(SLICE), "--gpus", "4", "--nodes", "2", "--method", "joint",
                "--exec", "return", "--param", "phase=prefill", "--param",
                "tokens_per_gpu=16", "--param", "warm_start=linear", "--time-limit", "2",
                "-o", str(out)]) == 0
    options = load_placement(out).metadata["options"]
    assert options["params"]["phase"] == "prefill"


def test_bad_seed_is_an_input_error():
    with pytest.raises(InputError, match="seed"):
        place(stepped_profile(1, 4, 2, 2), make_cluster(2), "linear", PlaceOptions(seed=-1))


@pytest.mark.parametrize(("workload", "field"), [
    (lambda p: Workload((p,), robust="median"), "robust"),
    (lambda p: Workload((p,), weights=(1.0, 2.0)), "weight"),
])
def test_bad_workloads_are_input_errors(workload, field):
    with pytest.raises(InputError, match=field):
        workload(stepped_profile(1, 4, 2, 2))


def test_profiles_of_another_shape_are_rejected():
    workload = Workload((stepped_profile(2, 8, 2, 2), stepped_profile(3, 8, 2, 2)))
    with pytest.raises(InputError):
        place(workload, make_cluster(2), "joint", PlaceOptions(time_limit=1))


def test_sampled_steps_round_trip_and_add(tmp_path):
    trace = load_trace(str(SLICE))
    profile = profile_trace(trace, step_gpus=4)
    steps = profile.steps
    assert steps is not None and steps.concurrency == 512
    assert np.array_equal(steps.home(4), steps.slot % 4)
    path = tmp_path / "p.npz"
    profile.save(path)
    back = load_profile(path).steps
    for name in ("ids", "bounds", "slot", "token"):
        assert np.array_equal(getattr(back, name), getattr(steps, name))
    both = (profile + profile).steps
    assert both.num_steps == 2 * steps.num_steps
    assert np.array_equal(both.ids[steps.num_tokens:], steps.ids)


def test_sampled_decode_steps_hold_one_token_per_running_sequence():
    rng = np.random.default_rng(1)
    trace = random_trace(rng, 300, 2, 8, 2, sequences=20)
    sample = sample_steps(trace, 2, StepPlan(source="recorded", concurrency=6),
                          count=10_000)
    assert sample.num_tokens == 300
    sizes = np.diff(sample.bounds)
    assert sizes.max() <= 6
    # A sequence's tokens are in consecutive steps on one slot.
    seq = np.repeat(np.arange(20), trace.seq_lens)[sample.token]
    for s in range(sample.num_steps):
        assert len(set(seq[sample.bounds[s]:sample.bounds[s + 1]])) == sizes[s]


def test_loads_only_profiles_get_steps_drawn_from_their_loads():
    load = np.array([[5, 3, 2, 1], [1, 2, 3, 4]])
    placement, record = place(Profile.from_load(load), make_cluster(4, 2), "joint",
                              PlaceOptions(time_limit=2, exec_model="return"))
    assert placement.slots_per_gpu == 1
    assert record.bound is not None and record.bound <= record.objective + 1e-12


def test_calibration_changes_costs(tmp_path):
    profile = stepped_profile(1, 8, 2, 2)
    path = tmp_path / "c.json"
    CostCoefficients(memory_efficiency=0.1, compute_efficiency=0.1).save(path)
    options = PlaceOptions(time_limit=1, exec_model="return",
                           params={"warm_start": "linear", "kicks": 0})
    slow = place(profile, make_cluster(2), "joint",
                 PlaceOptions(**{**options.__dict__, "params": {
                     "warm_start": "linear", "kicks": 0, "calibration": str(path)}}))[1]
    fast = place(profile, make_cluster(2), "joint", options)[1]
    assert slow.objective > fast.objective


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
    assert "per-layer load correlation" in capsys.readouterr().out
    placement = load_placement(out)
    assert placement.replicas_on_gpu.max() == 1
    assert placement.metadata["options"]["exec_model"] == "return"
    assert len(placement.metadata["profile"]) == 3  # one provenance entry per data set
    # Workloads are recorded by provenance, not by their count arrays.
    workloads = placement.metadata["options"]["workload"]["profiles"]
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




def test_cli_profile_keeps_sampled_steps(tmp_path):
    out = tmp_path / "p.npz"
    assert run(["profile", str(SLICE), "--step-gpus", "2", "--replay", "recorded",
                "--concurrency", "16", "-o", str(out)]) == 0
    steps = load_profile(out).steps
    assert steps is not None and steps.concurrency == 16
    assert np.diff(steps.bounds).max() <= 16
    assert run(["profile", str(SLICE), "-o", str(out)]) == 0
    assert load_profile(out).steps is None


def test_cli_profile_keeps_the_steps_joint_would_sample(tmp_path):
    """`profile --step-gpus` keeps the steps `place --method joint` samples from the trace
    (hedged by default); `--hedge 0` keeps steps of the profiled mix."""
    trace = load_trace(str(SLICE))
    path = tmp_path / "p.npz"
    for args, params in (([], []), (["--hedge", "0"], ["hedge=none"])):
        want = sample_steps(trace, 2, parse_params("joint", params).step_plan())
        assert run(["profile", str(SLICE), "--step-gpus", "2", *args, "-o", str(path)]) == 0
        got = load_profile(path).steps
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.bounds, want.bounds)
        assert np.array_equal(got.token, want.token)


def test_robust_max_minimises_the_worst_workload():
    a, b = stepped_profile(2, 8, 2, 4, seed=1), stepped_profile(2, 8, 2, 4, seed=2)
    cluster = make_cluster(4, 2)
    options = PlaceOptions(exec_model="follow", time_limit=3,
                           workload=Workload((a, b), robust="max"),
                           params={"warm_start": INSTANT, "kicks": 1})
    placement, record = place(a + b, cluster, "joint", options)
    problem = build_problem([a, b], np.ones(2), cluster, 2, EngineSettings("follow"), "max",
                            model_for(a))
    value = objective(problem, placement.phy2log)
    assert value == pytest.approx(record.objective)
    assert value == pytest.approx(max(step_costs(problem, placement.phy2log, q).sum(axis=0)
                                      .mean() for q in range(2)))
    for name in INSTANT.split(","):   # the warm starts: placed from the workloads' sum
        baseline = place(a + b, cluster, name, PlaceOptions())[0]
        assert value <= objective(problem, baseline.phy2log) * (1 + 1e-9)


@pytest.mark.parametrize(("method", "param"), [
    ("eplb", "num_groups=0"), ("moetuner", "workers=abc"), ("joint", "colour=blue")])
def test_cli_place_bad_params_exit_2(tmp_path, method, param):
    out = tmp_path / "p.json"
    assert run(["place", str(SLICE), "--gpus", "2", "--method", method, "--param", param,
                "-o", str(out)]) == 2
    assert not out.exists()
