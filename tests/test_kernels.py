"""The replay kernel (moetuner.engine) and the cost of its messages: per-kernel message
counts solved by hand, the exchange formula, the published calibration, and the agreement
of the evaluator's per-step times with joint's objective on the same steps."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_step_replay import COEFFICIENTS, traced_placements

from moetuner.cluster import make_cluster
from moetuner.costmodel import CostCoefficients, StepCost
from moetuner.engine import KERNELS, EngineSettings, count_layer, replica_table
from moetuner.evaluate import replay, replay_steps
from moetuner.kernel_calibration import MEASUREMENTS, PUBLISHED_MODEL, predicted
from moetuner.methods._joint_objective import build_problem, step_costs
from moetuner.methods.linear import linear_phy2log
from moetuner.models import ModelSpec
from moetuner.placement import Placement
from moetuner.profile import profile_trace
from moetuner.steps import StepPlan, Steps
from moetuner.trace import Trace

# 4 GPUs on 2 nodes ({0, 1}, {2, 3}), 2 slots each, linear: GPU g holds experts 2g, 2g + 1.
# Four top-3 tokens in two steps; column 0 is the primary expert.
HAND_IDS = np.array([[2, 3, 4],     # step 0, on GPU 0: experts on GPUs 1, 1, 2
                     [4, 6, 7],     # step 0, on GPU 1: GPUs 2, 3, 3
                     [6, 0, 1],     # step 1, on GPU 3: GPUs 3, 0, 0
                     [5, 4, 2]])    # step 1, on GPU 2: GPUs 2, 2, 1
HAND_HOME = np.array([0, 1, 3, 2])
HAND_STEP = np.array([0, 0, 1, 1])
NODE = np.array([0, 0, 1, 1])

# Dispatch messages [4, S, G]: intra sent, intra received, inter sent, inter received.
PAIR_DISPATCH = [
    # Pairs off the token's GPU, each its own message, straight to the expert's GPU.
    [[2, 0, 0, 0], [0, 0, 0, 0]],       # t0: two NVLink messages 0 -> 1
    [[0, 2, 0, 0], [0, 0, 0, 0]],
    [[1, 3, 0, 0], [0, 0, 1, 2]],       # t0: 0 -> 2; t1: 1 -> 2, 1 -> 3 twice; t2: 3 -> 0
    [[0, 0, 2, 2], [2, 1, 0, 0]]]       # twice; t3: 2 -> 1
NORMAL_DISPATCH = [
    # One NVLink message per token and other GPU of its node; one RDMA message per token
    # and remote node, received by the GPU of the sender's local index there.
    [[1, 0, 0, 0], [0, 0, 0, 0]],       # t0: one message 0 -> 1 for both its pairs
    [[0, 1, 0, 0], [0, 0, 0, 0]],
    [[1, 1, 0, 0], [0, 0, 1, 1]],       # t0 -> node 1 (GPU 2), t1 -> node 1 (GPU 3);
    [[0, 0, 1, 1], [1, 1, 0, 0]]]       # t2 (GPU 3) -> GPU 1, t3 (GPU 2) -> GPU 0
# follow, ordered: combined on the primary's GPU p = 1, 2, 3, 2, counted from p.
PAIR_COMBINE = [
    [[0, 0, 2, 0], [0, 0, 0, 0]],       # t1: p = 2 and two pairs on GPU 3 (same node)
    [[0, 0, 0, 2], [0, 0, 0, 0]],
    [[0, 1, 0, 0], [0, 0, 1, 2]],       # t0: p = 1, GPU 2; t2: p = 3, GPU 0 twice;
    [[0, 0, 1, 0], [2, 1, 0, 0]]]       # t3: p = 2, GPU 1
NORMAL_COMBINE = [
    [[0, 0, 1, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 1], [0, 0, 0, 0]],
    [[0, 1, 0, 0], [0, 0, 1, 1]],       # t0: p = 1 reaches node 1 via GPU 3 (local index
    [[0, 0, 0, 1], [1, 1, 0, 0]]]       # 1); t2: p = 3 -> GPU 1; t3: p = 2 -> GPU 0


def hand_counts(kernel, exec_model):
    table = replica_table(np.arange(8), 8, 4, NODE, "even")
    return count_layer(HAND_IDS, np.arange(4), HAND_HOME, HAND_STEP, 2, table, 2, NODE,
                       EngineSettings(exec_model, "even", kernel), ordered=True)


@pytest.mark.parametrize("exec_model", ["return", "follow"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_count_layer_by_hand(kernel, exec_model):
    counts, totals, after = hand_counts(kernel, exec_model)
    pair = kernel != "deepep-normal"
    np.testing.assert_array_equal(counts.dispatch, PAIR_DISPATCH if pair else NORMAL_DISPATCH)
    if exec_model == "return":
        assert counts.combine is None
        np.testing.assert_array_equal(after, HAND_HOME)
        np.testing.assert_array_equal(totals.matrix[1], totals.matrix[0].T)
    else:
        np.testing.assert_array_equal(counts.combine,
                                      PAIR_COMBINE if pair else NORMAL_COMBINE)
        np.testing.assert_array_equal(after, [1, 2, 3, 2])
        # Partial results to the combine GPU: 2 -> 1, 3 -> 2, 0 -> 3, 1 -> 2.
        want = np.zeros((4, 4), dtype=int)
        want[[2, 3, 0, 1], [1, 2, 3, 2]] = 1
        np.testing.assert_array_equal(totals.matrix[1], want)
    # Kernel-independent: pairs per slot, active slots, token moves, remote nodes.
    slot_pairs = np.zeros((2, 8), dtype=int)
    np.add.at(slot_pairs, (0, [2, 3, 4, 4, 6, 7]), 1)
    np.add.at(slot_pairs, (1, [6, 0, 1, 5, 4, 2]), 1)
    np.testing.assert_array_equal(counts.slot_pairs, slot_pairs)
    np.testing.assert_array_equal(counts.gpu_pairs(2), [[0, 2, 2, 2], [2, 1, 2, 1]])
    np.testing.assert_array_equal(counts.active_slots(2), [[0, 2, 1, 2], [2, 1, 2, 1]])
    want = np.zeros((4, 4), dtype=int)
    want[[0, 0, 1, 1, 3, 2], [1, 2, 2, 3, 0, 1]] = 1
    np.testing.assert_array_equal(totals.matrix[0], want)
    np.testing.assert_array_equal(totals.tokens_in, [1, 2, 3, 2])
    # (token, destination GPU) pairs 8; off the token's GPU 6; off its node 5; remote nodes 4.
    np.testing.assert_array_equal(totals.moves, [8, 6, 5, 4])


@pytest.mark.parametrize("exec_model", ["return", "follow"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_replay_sums_the_hand_counts_over_steps(kernel, exec_model):
    trace = Trace(topk_ids=HAND_IDS[:, None, :], num_experts=8,
                  topk_weights=np.tile([3.0, 2.0, 1.0], (4, 1, 1)))
    steps = Steps(order=np.arange(4), bounds=np.array([0, 2, 4]), home=HAND_HOME, num_gpus=4)
    r = replay(Placement(linear_phy2log(1, 8, 8), 4, 8), trace, make_cluster(4, 2),
               EngineSettings(exec_model, "even", kernel), steps=steps)
    pair = kernel != "deepep-normal"
    dispatch = np.array(PAIR_DISPATCH if pair else NORMAL_DISPATCH).sum(axis=1)
    np.testing.assert_array_equal(r.dispatch.messages[:, 0], dispatch)
    back = dispatch if exec_model == "return" else np.array(
        PAIR_COMBINE if pair else NORMAL_COMBINE).sum(axis=1)
    # Results flow back: what the counted direction sends, the combine receives.
    np.testing.assert_array_equal(r.combine.messages[:, 0], back[[1, 0, 3, 2]])
    assert r.remote_nodes.tolist() == [4] and r.kernel == kernel
    assert r.summary()["node_messages"] == dispatch[2].sum() + back[3].sum()
    np.testing.assert_array_equal(r.load, [[2, 3, 4, 3]])


def shipped_constants() -> dict:
    path = resources.files("moetuner").joinpath("data/kernels.json")
    return json.loads(path.read_text())["kernels"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_exchange_costs_latency_plus_the_slowest_gpus_bytes(kernel):
    model = ModelSpec("m", "none", 1, (), 8, 2, hidden_size=7168, expert_intermediate_size=2048)
    cluster = make_cluster(4, 2, "h800")        # NVLink 200 GB/s, NIC 50 GB/s per GPU
    cost = StepCost(model, cluster, None, kernel)
    constants = shipped_constants()[kernel]
    # [4, G]: GPU 0 sends 3 over NVLink and 1 over RDMA; GPU 1 receives 3 and sends 2 RDMA;
    # GPU 2 receives 1 RDMA, GPU 3 receives 2.
    messages = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [1, 2, 0, 0], [0, 0, 1, 2]])
    fp8 = 7168 + 4 * 56
    sizes = {"dispatch": fp8 if kernel.startswith("deepep") else 2 * 7168,
             "combine": 2 * 7168}
    for d, direction in enumerate(("dispatch", "combine")):
        k, size = constants[direction], sizes[direction]
        nvlink = size / (200e9 * k["intra_efficiency"])
        rdma = size / (50e9 * k["inter_efficiency"])
        busy = [3 * nvlink + 1 * rdma, 3 * nvlink + 2 * rdma, rdma, 2 * rdma]
        assert cost.exchange(messages, d) == pytest.approx(k["latency"] + max(busy),
                                                           rel=1e-12)
        # Nothing routed still launches the kernel; one GPU has no exchange at all.
        assert cost.exchange(np.zeros((4, 4)), d) == k["latency"]
        single = StepCost(model, make_cluster(1, 1, "h800"), None, kernel)
        assert single.exchange(np.zeros((4, 1)), d) == 0.0


def test_compute_is_the_larger_of_flops_and_weight_reads():
    model = ModelSpec("m", "none", 1, (), 8, 2, hidden_size=64, expert_intermediate_size=32)
    c = CostCoefficients(peak_flops=1e9, compute_efficiency=0.5, memory_bandwidth=1e8,
                         memory_efficiency=0.25)
    cost = StepCost(model, make_cluster(2, 1), c)
    pair = 2 * 3 * 64 * 32 / 0.5e9
    read = 3 * 64 * 32 * 2 / 0.25e8
    np.testing.assert_allclose(cost.compute(np.array([10, 1000]), np.array([2, 1])),
                               [max(10 * pair, 2 * read), max(1000 * pair, read)], rtol=1e-12)


# Published figures (issue 15): DeepEP low-latency (H800, 128 tokens per GPU, hidden 7168,
# top-8) in microseconds, and NCCL EP low-latency (H100, BF16) in GB/s over all pairs.
DEEPEP_LL = {"ep": (8, 16, 32, 64, 128, 256), "dispatch": (77, 118, 155, 173, 192, 194),
             "combine": (114, 195, 273, 314, 369, 360)}
NCCL_GBPS = {"ep": (8, 16, 32, 64), "dispatch": (224, 77, 54, 49),
             "combine": (185, 73, 50, 44)}


def test_deepep_low_latency_calibration_is_within_25_percent_at_ep16_to_256():
    m = MEASUREMENTS["deepep-ll"]
    assert m.ep_sizes == DEEPEP_LL["ep"] and m.tokens_per_gpu == 128
    p = predicted(m)
    for d, direction in enumerate(("dispatch", "combine")):
        published = np.array(DEEPEP_LL[direction]) * 1e-6
        np.testing.assert_allclose(getattr(m, direction), published, rtol=1e-12)
        error = p[d] / published - 1
        assert (np.abs(error[1:]) <= 0.25).all(), (direction, error)


def test_nccl_calibration_is_within_25_percent():
    m = MEASUREMENTS["nccl"]
    assert m.ep_sizes == NCCL_GBPS["ep"]
    p = predicted(m)
    for d, direction in enumerate(("dispatch", "combine")):
        published = 128 * 8 * 7168 * 2 / (np.array(NCCL_GBPS[direction]) * 1e9)
        np.testing.assert_allclose(getattr(m, direction), published, rtol=1e-12)
        assert (np.abs(p[d] / published - 1) <= 0.25).all(), direction


def test_published_setting_replayed_by_the_evaluator_gives_the_fitted_times():
    # EP16 (2 nodes of 8 H800): uniform top-8 of 256 experts, linear, 128 tokens per GPU
    # homed round-robin -- replayed through the evaluator as one step.
    G, n = 16, 128 * 16
    rng = np.random.default_rng(0)  # published_setting's
    ids = np.argsort(rng.random((n, 256)), axis=1)[:, :8]
    trace = Trace(topk_ids=ids[:, None, :], num_experts=256)
    steps = Steps(order=np.arange(n), bounds=np.array([0, n]), home=np.arange(n) % G,
                  num_gpus=G)
    placement = Placement(linear_phy2log(1, 256, 256), G, 256)
    _, times = replay_steps(placement, trace, make_cluster(G, 2, "h800"), PUBLISHED_MODEL,
                            steps, EngineSettings())
    want = predicted(MEASUREMENTS["deepep-ll"])[:, 1]
    assert times.dispatch[0, 0] == pytest.approx(want[0], rel=1e-12)
    assert times.combine[0, 0] == pytest.approx(want[1], rel=1e-12)


def test_shipped_constants_say_where_they_come_from():
    path = resources.files("moetuner").joinpath("data/kernels.json")
    provenance = json.loads(path.read_text())["provenance"]
    assert set(provenance["sources"]) == set(KERNELS) and provenance["fitted"]
    defaults = CostCoefficients()
    for kernel in KERNELS:
        assert defaults.kernel(kernel) == shipped_constants()[kernel]


@st.composite
def agreement_instances(draw):
    placement, trace, cluster = draw(traced_placements())
    phase = draw(st.sampled_from(["decode", "prefill"]))
    if draw(st.booleans()):
        plan = StepPlan(phase, "serving", tokens_per_gpu=draw(st.integers(1, 3)),
                        num_steps=draw(st.integers(1, 4)), seed=draw(st.integers(0, 99)))
    else:
        plan = StepPlan(phase, "recorded", concurrency=draw(st.integers(1, 6)),
                        step_tokens=draw(st.integers(1, 6)))
    return placement, trace, cluster, plan


@settings(max_examples=120, deadline=None)
@given(agreement_instances(), st.sampled_from(["return", "follow"]),
       st.sampled_from(["even", "nearest"]), st.sampled_from(KERNELS))
def test_evaluator_step_times_equal_joints_objective(instance, exec_model, policy, kernel):
    placement, trace, cluster, plan = instance
    engine = EngineSettings(exec_model, policy, kernel)
    model = ModelSpec("toy", "none", trace.num_layers, (), trace.num_experts, trace.top_k,
                      hidden_size=8, expert_intermediate_size=4)
    steps = plan.steps(trace.seq_lens, trace.num_tokens, cluster.num_gpus)
    _, times = replay_steps(placement, trace, cluster, model, steps, engine, COEFFICIENTS)
    # joint's objective on the steps profile_trace samples for the same plan.
    profile = profile_trace(trace, step_gpus=cluster.num_gpus, plan=plan)
    sample = profile.steps
    busy = steps.sizes > 0                  # a sample never holds an empty step
    np.testing.assert_array_equal(np.diff(sample.bounds), steps.sizes[busy])
    np.testing.assert_array_equal(sample.ids, trace.topk_ids[steps.order])
    np.testing.assert_array_equal(sample.token, steps.keys)
    np.testing.assert_array_equal(sample.home(cluster.num_gpus), steps.home)
    problem = build_problem([profile], np.ones(1), cluster, placement.slots_per_gpu, engine,
                            "mean", model, COEFFICIENTS)
    objective = step_costs(problem, placement.phy2log, 0).sum(axis=0)
    evaluator = (times.dispatch + times.compute + times.combine).sum(axis=1)[busy]
    np.testing.assert_allclose(objective, evaluator, rtol=1e-12, atol=0)
