"""Replay and cost model: hand counts on traces of a few tokens, a per-token reference
implementation on random instances, relabelling invariance, and CLI exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetuner.cluster import make_cluster
from moetuner.costmodel import CostCoefficients, load_coefficients, predict
from moetuner.engine import KERNELS, EngineSettings
from moetuner.errors import InputError
from moetuner.evaluate import compare, evaluate, replay
from moetuner.methods.linear import linear_phy2log
from moetuner.models import ModelSpec
from moetuner.placement import Placement
from moetuner.steps import StepPlan
from moetuner.trace import Trace

# Three layers, two tokens, E = 4, k = 2; linear on 2 GPUs puts {0, 1} on GPU 0, {2, 3} on 1.
HAND_IDS = [[[0, 2], [3, 1], [2, 3]],
            [[2, 3], [0, 2], [1, 0]]]
TOY = ModelSpec("toy", "none", 3, (), 4, 2, hidden_size=8, expert_intermediate_size=4)


def make_trace(ids, num_experts: int = 4, ordered: bool = True) -> Trace:
    """A trace of ``ids``; ordered ones get weights falling with the column (column 0 is
    the primary expert), unordered ones none."""
    ids = np.asarray(ids, dtype=np.int64)
    weights = np.broadcast_to(np.arange(ids.shape[2], 0, -1, dtype=np.float32), ids.shape)
    return Trace(topk_ids=ids, num_experts=num_experts,
                 topk_weights=weights.copy() if ordered else None)


def linear(num_layers: int = 3, num_experts: int = 4, num_gpus: int = 2) -> Placement:
    return Placement(linear_phy2log(num_layers, num_experts, num_experts), num_gpus, num_experts)


@pytest.mark.parametrize("policy", ["even", "nearest"])
def test_return_hand_count(policy):
    r = replay(linear(), make_trace(HAND_IDS), make_cluster(2, 1),
               EngineSettings("return", policy))
    np.testing.assert_array_equal(r.load, [[1, 3], [2, 2], [2, 2]])
    np.testing.assert_array_equal(r.tokens_in, [[1, 2], [2, 2], [1, 1]])
    np.testing.assert_array_equal(r.tokens_received, [[0, 1], [1, 1], [1, 1]])
    np.testing.assert_array_equal(r.dispatch.tokens, [[[0, 1], [0, 0]], [[0, 1], [1, 0]],
                                                      [[0, 1], [1, 0]]])
    np.testing.assert_array_equal(r.combine.tokens, r.dispatch.tokens.transpose(0, 2, 1))
    np.testing.assert_array_equal(r.moves, [3, 4, 2])
    np.testing.assert_array_equal(r.moves_cross_gpu, [1, 2, 2])
    assert r.share_cross_gpu == 5 / 9 and r.share_cross_node == 0
    assert r.imbalance == pytest.approx((1.5 + 1 + 1) / 3)
    assert r.balancedness == pytest.approx(6 / 7)
    assert r.dispatch.node_sent.sum() == 0 and r.combine.node_received.sum() == 0
    # The default kernel (DeepEP low-latency): NVLink messages per (token, expert) pair off
    # the token's GPU; in layer 2 each token sends both its experts to the other GPU.
    assert r.kernel == "deepep-ll"
    np.testing.assert_array_equal(r.dispatch.messages[0], [[1, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(r.dispatch.messages[1], [[0, 1], [1, 1], [2, 2]])
    np.testing.assert_array_equal(r.combine.messages[0], r.dispatch.messages[1])
    np.testing.assert_array_equal(r.remote_nodes, [0, 0, 0])


@pytest.mark.parametrize("policy", ["even", "nearest"])
def test_follow_hand_count(policy):
    r = replay(linear(), make_trace(HAND_IDS), make_cluster(2, 1),
               EngineSettings("follow", policy))
    np.testing.assert_array_equal(r.load, [[1, 3], [2, 2], [2, 2]])
    # Token 0: on 0, layer 0 sends 0->1 and combines 1->0 on its primary GPU 0; layer 1 sends
    # 0->1, primary expert 3 is on GPU 1 so GPU 0's partial goes 0->1; layer 2 is all local.
    # Token 1: on 1, layer 0 local; layer 1 primary expert 0 on GPU 0: 1->0 and 1->0.
    np.testing.assert_array_equal(r.dispatch.tokens, [[[0, 1], [0, 0]], [[0, 1], [1, 0]],
                                                      [[0, 0], [0, 0]]])
    np.testing.assert_array_equal(r.combine.tokens, [[[0, 0], [1, 0]], [[0, 1], [1, 0]],
                                                     [[0, 0], [0, 0]]])
    np.testing.assert_array_equal(r.moves, [3, 4, 2])
    np.testing.assert_array_equal(r.moves_cross_gpu, [1, 2, 0])
    assert r.share_cross_gpu == 3 / 9


def test_two_nodes_count_deepep_messages():
    # DeepEP normal (the prefill kernel): one message per token and remote node.
    normal = EngineSettings("return", kernel="deepep-normal")
    r = replay(linear(), make_trace(HAND_IDS), make_cluster(2, 2), normal)
    np.testing.assert_array_equal(r.moves_cross_node, r.moves_cross_gpu)
    np.testing.assert_array_equal(r.dispatch.node_sent, [[1, 0], [1, 1], [1, 1]])
    np.testing.assert_array_equal(r.dispatch.node_received, [[0, 1], [1, 1], [1, 1]])
    np.testing.assert_array_equal(r.combine.node_sent, r.dispatch.node_received)
    np.testing.assert_array_equal(r.remote_nodes, [1, 2, 2])
    assert r.dispatch.messages[:2].sum() == 0 and r.kernel == "deepep-normal"
    # One token sent to GPUs 2 and 3 of the other node is one message, received by GPU 2
    # (local index 0, the sender's); the GPU x GPU matrix still holds both pairs.
    four = Placement(linear_phy2log(1, 4, 4), 4, 4)
    r = replay(four, make_trace([[[2, 3]]]), make_cluster(4, 2), normal)
    np.testing.assert_array_equal(r.dispatch.node_sent, [[1, 0, 0, 0]])
    np.testing.assert_array_equal(r.dispatch.node_received, [[0, 0, 1, 0]])
    assert r.dispatch.tokens[0, 0].tolist() == [0, 0, 1, 1]
    assert r.moves_cross_node.tolist() == [2] and r.remote_nodes.tolist() == [1]


@pytest.mark.parametrize("kernel", ["deepep-ll", "nccl"])
def test_two_nodes_count_pair_messages(kernel):
    # Low-latency kernels: one message per (token, expert) pair off the token's GPU. Layer 2:
    # token 0 (GPU 0) picks experts 2 and 3, both on GPU 1: two messages, not one; token 1
    # (GPU 1) picks 1 and 0, both on GPU 0: two more.
    settings = EngineSettings("return", kernel=kernel)
    r = replay(linear(), make_trace(HAND_IDS), make_cluster(2, 2), settings)
    np.testing.assert_array_equal(r.dispatch.node_sent, [[1, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(r.dispatch.node_received, [[0, 1], [1, 1], [2, 2]])
    np.testing.assert_array_equal(r.combine.node_sent, [[0, 1], [1, 1], [2, 2]])
    np.testing.assert_array_equal(r.combine.node_received, [[1, 0], [1, 1], [2, 2]])
    assert r.dispatch.messages[:2].sum() == 0 and r.combine.messages[:2].sum() == 0
    # The GPU x GPU token moves and remote nodes do not depend on the kernel.
    np.testing.assert_array_equal(r.dispatch.tokens, [[[0, 1], [0, 0]], [[0, 1], [1, 0]],
                                                      [[0, 1], [1, 0]]])
    np.testing.assert_array_equal(r.remote_nodes, [1, 2, 2])
    assert r.summary()["node_messages"] == 2 * (1 + 2 + 4)
    # A token on GPU 0 sending to GPUs 2 and 3 of the other node: two messages, each
    # received by the expert's own GPU.
    four = Placement(linear_phy2log(1, 4, 4), 4, 4)
    r = replay(four, make_trace([[[2, 3]]]), make_cluster(4, 2), settings)
    np.testing.assert_array_equal(r.dispatch.node_sent, [[2, 0, 0, 0]])
    np.testing.assert_array_equal(r.dispatch.node_received, [[0, 0, 1, 1]])
    assert r.remote_nodes.tolist() == [1] and r.kernel == kernel


def test_replica_policies_hand_count():
    # Expert 0 has replicas on GPU 0 (slot 0) and GPU 1 (slot 3); homes 0, 0, 1, 1.
    placement = Placement(np.array([[0, 1, 2, 0]]), 2, 3)
    trace = make_trace([[[0]]] * 4, num_experts=3)
    home = np.array([0, 0, 1, 1])
    even = replay(placement, trace, make_cluster(2, 1), EngineSettings("return", "even"),
                  home=home)
    assert even.load.tolist() == [[2, 2]]          # token t takes replica t mod 2
    assert even.dispatch.tokens[0].tolist() == [[0, 1], [1, 0]]
    assert even.active_experts.tolist() == [[1, 1]]
    near = replay(placement, trace, make_cluster(2, 1), EngineSettings("return", "nearest"),
                  home=home)
    assert near.load.tolist() == [[2, 2]]
    assert near.dispatch.tokens.sum() == 0


def test_nearest_prefers_gpu_then_node_then_spreads():
    # GPU 0 [1, 2], GPU 1 [0, 3], GPU 2 [0, 1], GPU 3 [0, 2]; nodes {0, 1} and {2, 3}.
    placement = Placement(np.array([[1, 2, 0, 3, 0, 1, 0, 2]]), 4, 4)
    trace = make_trace([[[0]], [[0]], [[0]], [[0]], [[1]], [[3]]])
    home = np.array([0, 1, 2, 3, 1, 3])
    near = replay(placement, trace, make_cluster(4, 2), EngineSettings("return", "nearest"),
                  home=home)
    # expert 0: from GPU 0 its node's GPU 1; from 1, 2, 3 local. expert 1 from GPU 1 -> GPU 0
    # (same node); expert 3 from GPU 3 -> GPU 1 (its only replica, other node).
    assert near.load.tolist() == [[1, 3, 1, 1]]
    assert near.moves_cross_gpu.tolist() == [3] and near.moves_cross_node.tolist() == [1]
    # even: expert 0's replicas in slot order are on GPUs 1, 2, 3: token t takes t mod 3.
    even = replay(placement, trace, make_cluster(4, 2), EngineSettings("return", "even"),
                  home=home)
    # t0 -> 1, t1 -> 2, t2 -> 3, t3 -> 1; expert 1 (GPUs 0, 2): t4 -> replica 4 mod 2 = GPU 0.
    assert even.load.tolist() == [[1, 3, 1, 1]]
    assert even.moves_cross_gpu.tolist() == [6] and even.moves_cross_node.tolist() == [3]


def test_empty_slots_are_never_chosen():
    placement = Placement(np.array([[0, 1, 2, -1]]), 2, 3, allow_empty_slots=True)
    trace = make_trace([[[0, 2]], [[1, 2]], [[2, 0]]], num_experts=3)
    for policy in ("even", "nearest"):
        r = replay(placement, trace, make_cluster(2, 1), EngineSettings("follow", policy))
        assert r.load.tolist() == [[3, 3]]
        assert r.active_experts.tolist() == [[2, 1]]
        assert r.imbalance == 1.0


@pytest.mark.parametrize("exec_model", ["return", "follow"])
def test_linear_gives_no_traffic_when_tokens_stay_on_their_gpu(exec_model):
    # Token t (home t mod 4) picks both experts of GPU t mod 4 in every layer.
    tokens = np.arange(12)
    ids = np.stack([2 * (tokens % 4), 2 * (tokens % 4) + 1], axis=1)
    trace = make_trace(np.repeat(ids[:, None, :], 5, axis=1), num_experts=8)
    for kernel in KERNELS:
        r = replay(linear(5, 8, 4), trace, make_cluster(4, 2), EngineSettings(exec_model,
                                                                              kernel=kernel))
        assert r.traffic.sum() == 0 and r.share_cross_gpu == 0
        assert r.dispatch.messages.sum() == 0 and r.combine.messages.sum() == 0
        assert r.remote_nodes.sum() == 0


def kernel_messages(kernel, src, gpus, per_node):
    """(kind, sender, receiver) of each message of a token on GPU ``src`` whose experts are
    on ``gpus`` (with repeats), under ``kernel``; kind 0 inside the node, 1 across (the
    kernels of moetuner.engine's docstring, written independently)."""
    out = []
    if kernel in ("deepep-ll", "nccl"):
        for g in gpus:
            if g != src:
                out.append((int(g // per_node != src // per_node), src, g))
        return out
    for g in sorted(set(gpus)):
        if g != src and g // per_node == src // per_node:
            out.append((0, src, g))
    for n in sorted({g // per_node for g in gpus} - {src // per_node}):
        out.append((1, src, n * per_node + src % per_node))
    return out


def reference_replay(placement, trace, cluster, exec_model, policy, home, kernel):
    """Per-token transcription of the module docstring, for checking the vectorised replay:
    loads, distinct tokens per GPU, token moves, messages ``[4, L, G]`` of dispatch and
    combine (intra sent, received, inter sent, received) and remote nodes per layer."""
    G, S = placement.num_gpus, placement.slots_per_gpu
    per_node = cluster.gpus_per_node
    L = trace.num_layers
    load = np.zeros((L, G), int)
    tok_in = np.zeros((L, G), int)
    exchanges = [np.zeros((L, G, G), int) for _ in range(2)]
    messages = [np.zeros((4, L, G), int) for _ in range(2)]
    remote = np.zeros(L, int)
    for t in range(trace.num_tokens):
        here = home[t]
        for layer in range(L):
            gpus = []
            for e in trace.topk_ids[t, layer]:
                slots = [p for p in range(placement.num_slots) if placement.phy2log[layer, p] == e]
                if policy == "nearest":
                    tiers = [[p for p in slots if p // S == here],
                             [p for p in slots if p // S // per_node == here // per_node], slots]
                    slots = next(tier for tier in tiers if tier)
                gpus.append(slots[t % len(slots)] // S)
            for g in gpus:
                load[layer, g] += 1
            for g in set(gpus):
                tok_in[layer, g] += 1
            remote[layer] += len({g // per_node for g in gpus} - {here // per_node})
            centre = here if exec_model == "return" else gpus[0]
            for which, src_of in ((0, here), (1, centre)):
                for g in set(gpus):
                    if g != src_of:
                        if which == 0:
                            exchanges[0][layer, src_of, g] += 1
                        else:
                            exchanges[1][layer, g, src_of] += 1
                for kind, sender, receiver in kernel_messages(kernel, src_of, gpus, per_node):
                    if which == 1:   # results flow back, from the experts to src_of
                        sender, receiver = receiver, sender
                    messages[which][2 * kind, layer, sender] += 1
                    messages[which][2 * kind + 1, layer, receiver] += 1
            if exec_model == "follow":
                here = gpus[0]
    return load, tok_in, exchanges, messages, remote


def random_placement(draw, num_layers, num_experts, num_gpus, slots_per_gpu, replicas):
    rows = []
    for _ in range(num_layers):
        if replicas:
            # Every expert once, then extra replicas on GPUs without a copy (or empty slots).
            slots = np.full((num_gpus, slots_per_gpu), -1)
            order = draw(st.permutations(range(num_gpus * slots_per_gpu)))
            flat = slots.ravel()
            for i, e in enumerate(range(num_experts)):
                flat[order[i]] = e
            for p in order[num_experts:]:
                e = draw(st.integers(-1, num_experts - 1))
                if e < 0 or e not in slots[p // slots_per_gpu]:
                    flat[p] = e
            rows.append(flat)
        else:
            perm = draw(st.permutations(range(num_gpus * slots_per_gpu)))
            rows.append(np.where(np.array(perm) < num_experts, perm, -1))
    return Placement(np.array(rows), num_gpus, num_experts, allow_empty_slots=True)


@st.composite
def instances(draw, replicas=True):
    num_gpus, num_nodes = draw(st.sampled_from([(2, 1), (2, 2), (4, 2), (4, 1), (6, 3)]))
    num_experts = draw(st.integers(num_gpus, 2 * num_gpus))
    slots = -(-num_experts // num_gpus) + draw(st.integers(0, 1))
    num_layers = draw(st.integers(1, 3))
    k = draw(st.integers(1, min(3, num_experts)))
    tokens = draw(st.integers(0, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = np.argsort(rng.random((tokens, num_layers, num_experts)), axis=2)[:, :, :k]
    placement = random_placement(draw, num_layers, num_experts, num_gpus, slots, replicas)
    home = rng.integers(0, num_gpus, tokens)
    return placement, make_trace(ids, num_experts), make_cluster(num_gpus, num_nodes), home


@settings(max_examples=90, deadline=None)
@given(instances(), st.sampled_from(["return", "follow"]), st.sampled_from(["even", "nearest"]),
       st.sampled_from(KERNELS))
def test_replay_matches_per_token_reference(instance, exec_model, policy, kernel):
    placement, trace, cluster, home = instance
    r = replay(placement, trace, cluster, EngineSettings(exec_model, policy, kernel),
               home=home)
    load, tok_in, exchanges, messages, remote = reference_replay(
        placement, trace, cluster, exec_model, policy, home, kernel)
    np.testing.assert_array_equal(r.load, load)
    np.testing.assert_array_equal(r.tokens_in, tok_in)
    np.testing.assert_array_equal(r.remote_nodes, remote)
    for got, want, msgs in ((r.dispatch, exchanges[0], messages[0]),
                            (r.combine, exchanges[1], messages[1])):
        np.testing.assert_array_equal(got.tokens, want)
        np.testing.assert_array_equal(got.messages, msgs)
        np.testing.assert_array_equal(got.node_sent, msgs[2])
        np.testing.assert_array_equal(got.node_received, msgs[3])


@settings(max_examples=40, deadline=None)
@given(instances(replicas=False), st.sampled_from(["return", "follow"]),
       st.sampled_from(["even", "nearest"]), st.sampled_from(KERNELS),
       st.randoms(use_true_random=False))
def test_metrics_invariant_under_gpu_relabelling(instance, exec_model, policy, kernel, rnd):
    placement, trace, cluster, home = instance
    G, N, S = cluster.num_gpus, cluster.num_nodes, placement.slots_per_gpu
    per_node = G // N
    nodes, inside = list(range(N)), list(range(per_node))
    rnd.shuffle(nodes)
    rnd.shuffle(inside)
    relabel = np.array([nodes[g // per_node] * per_node + inside[g % per_node] for g in range(G)])
    phy2log = np.empty_like(placement.phy2log)
    for g in range(G):
        phy2log[:, relabel[g] * S:(relabel[g] + 1) * S] = placement.phy2log[:, g * S:(g + 1) * S]
    moved = Placement(phy2log, G, placement.num_experts, allow_empty_slots=True)
    engine = EngineSettings(exec_model, policy, kernel)
    a = replay(placement, trace, cluster, engine, home=home)
    b = replay(moved, trace, cluster, engine, home=relabel[home])
    np.testing.assert_array_equal(b.load[:, relabel], a.load)
    np.testing.assert_array_equal(b.traffic[:, relabel][:, :, relabel], a.traffic)
    assert a.summary() == b.summary()
    model = ModelSpec("t", "none", trace.num_layers, (), trace.num_experts, trace.top_k, 64, 32)
    assert predict(a, model, cluster).total == pytest.approx(predict(b, model, cluster).total)


def hand_kernels(latency: float = 0.5) -> dict:
    """Every kernel's constants such that any message (FP8 dispatch of DeepEP: 8 + 4 = 12
    bytes; BF16: 8 x 2 = 16 bytes) takes 1 s on NVLink (16 B/s) and 2 s across nodes
    (8 B/s), and every exchange ``latency`` s."""
    out = {}
    for kernel in KERNELS:
        # DeepEP's FP8 dispatch message is 12 of BF16's 16 bytes: 12 / 16 of the bandwidth.
        dispatch = 0.75 if kernel.startswith("deepep") else 1.0
        out[kernel] = {"dispatch": {"latency": latency, "intra_efficiency": dispatch,
                                    "inter_efficiency": dispatch},
                       "combine": {"latency": latency, "intra_efficiency": 1.0,
                                   "inter_efficiency": 1.0}}
    return out


def hand_coefficients(**overrides) -> CostCoefficients:
    # One token per GPU per batch (the whole 2-token trace is one batch); one pair = 1 s of
    # FLOPs (2 x 3 x 8 x 4 = 192 FLOPs); a message = 1 s on NVLink, 2 s across
    # (``hand_kernels``); 0.5 s latency per exchange.
    return CostCoefficients(**{"tokens_per_gpu_batch": 1, "compute_efficiency": 1,
                               "memory_efficiency": 1, "network_efficiency": 1,
                               "peak_flops": 192, "memory_bandwidth": 1e30,
                               "intra_bandwidth": 16, "inter_bandwidth": 8,
                               "kernels": hand_kernels(), **overrides})


AVERAGE = StepPlan(source="average")


def test_cost_model_hand_count():
    # The whole-trace average: one step of the cost model's batch (here the whole trace).
    trace = make_trace(HAND_IDS)
    normal = EngineSettings("return", "even", "deepep-normal")
    _, one_node = evaluate(linear(), trace, make_cluster(2, 1), TOY, normal,
                           hand_coefficients(), plan=AVERAGE)
    np.testing.assert_allclose(one_node.compute, [[3, 2, 2]])
    # One NVLink message per token and other GPU (1 s), plus 0.5 s latency.
    np.testing.assert_allclose(one_node.dispatch, [[1.5, 1.5, 1.5]])
    np.testing.assert_allclose(one_node.combine, [[1.5, 1.5, 1.5]])
    assert one_node.total == pytest.approx(16) and one_node.mean_step_time == pytest.approx(16)
    assert one_node.tokens_per_s == pytest.approx(2 / 16)
    assert one_node.step_imbalance == pytest.approx(7 / 6)
    # The pair kernels: in layer 2 each token sends both its experts to the other GPU, two
    # messages each way (2 s + 0.5 s).
    for kernel in ("deepep-ll", "nccl"):
        _, pairs = evaluate(linear(), trace, make_cluster(2, 1), TOY,
                            EngineSettings("return", "even", kernel), hand_coefficients(),
                            plan=AVERAGE)
        np.testing.assert_allclose(pairs.dispatch, [[1.5, 1.5, 2.5]])
        np.testing.assert_allclose(pairs.combine, [[1.5, 1.5, 2.5]])
        assert pairs.total == pytest.approx(18)
    # Two nodes, follow: layers 0 and 1 send one cross-node message per GPU each way (2 s);
    # layer 2 is all local, but the exchange still costs its latency.
    _, two_nodes = evaluate(linear(), trace, make_cluster(2, 2), TOY,
                            EngineSettings("follow", "even", "deepep-normal"),
                            hand_coefficients(), plan=AVERAGE)
    np.testing.assert_allclose(two_nodes.dispatch, [[2.5, 2.5, 0.5]])
    np.testing.assert_allclose(two_nodes.combine, [[2.5, 2.5, 0.5]])
    # Weight reads dominate when memory is slow: layer 0, GPU 1 reads 2 experts x 192 bytes.
    result, slow = evaluate(linear(), trace, make_cluster(2, 1), TOY, normal,
                            hand_coefficients(memory_bandwidth=38.4), plan=AVERAGE)
    breakdown = predict(result, TOY, make_cluster(2, 1), hand_coefficients(memory_bandwidth=38.4))
    np.testing.assert_allclose(breakdown.compute_per_gpu[0], [5, 10])
    np.testing.assert_allclose(slow.compute[0], breakdown.compute)


def test_cost_model_hand_count_per_step():
    # The two tokens as two steps of the recorded order (one running sequence): step 0 holds
    # token 0 (home 0), step 1 token 1 (home 0, slot 0). DeepEP low-latency, one node.
    trace = make_trace(HAND_IDS)
    plan = StepPlan(source="recorded", concurrency=1)
    _, times = evaluate(linear(), trace, make_cluster(2, 1), TOY, EngineSettings("return"),
                        hand_coefficients(), plan=plan)
    np.testing.assert_array_equal(times.tokens, [1, 1])
    # Token 0 pairs per layer on GPUs (0, 1): (1, 1), (1, 1), (0, 2); token 1 from GPU 0:
    # (0, 2), (1, 1), (2, 0) -- 1 s per pair on the busiest GPU.
    np.testing.assert_allclose(times.compute, [[1, 1, 2], [2, 1, 2]])
    # Messages off GPU 0: token 0 sends 1, 1, 2; token 1 sends 2, 1, 0 (1 s each, + 0.5 s).
    np.testing.assert_allclose(times.dispatch, [[1.5, 1.5, 2.5], [2.5, 1.5, 0.5]])
    np.testing.assert_allclose(times.combine, times.dispatch)
    np.testing.assert_allclose(times.step_time, [15, 14])
    np.testing.assert_allclose(times.peak_load, [[1, 1, 2], [2, 1, 2]])
    np.testing.assert_allclose(times.mean_load, np.ones((2, 3)))


def test_coefficients_round_trip_and_bad_input(tmp_path):
    coefficients = hand_coefficients()
    path = tmp_path / "calibration.json"
    coefficients.save(path)
    assert load_coefficients(path) == coefficients
    path.write_text(json.dumps({"compute_efficiency": 2}))
    with pytest.raises(InputError, match="compute_efficiency"):
        load_coefficients(path)
    path.write_text(json.dumps({"flops": 1}))
    with pytest.raises(InputError, match="keys"):
        load_coefficients(path)
    with pytest.raises(InputError, match="file"):
        load_coefficients(tmp_path / "missing.json")


def test_bad_requests_raise_input_error():
    trace = make_trace(HAND_IDS)
    with pytest.raises(InputError, match="exec"):
        replay(linear(), trace, make_cluster(2, 1), EngineSettings("stay"))
    with pytest.raises(InputError, match="replica"):
        replay(linear(), trace, make_cluster(2, 1), EngineSettings("return", "random"))
    with pytest.raises(InputError, match="--kernel"):
        replay(linear(), trace, make_cluster(2, 1), EngineSettings(kernel="deepep"))
    with pytest.raises(InputError, match="num_gpus"):
        replay(linear(num_gpus=2), trace, make_cluster(4, 1))
    with pytest.raises(InputError, match="layers"):
        replay(linear(num_layers=2), trace, make_cluster(2, 1))
    with pytest.raises(InputError, match="--model"):
        evaluate(linear(), trace, make_cluster(2, 1), TOY.__class__(**{**TOY.to_dict(),
                                                                         "top_k": 1}))


def test_compare_adds_linear_and_speedups():
    trace = make_trace(HAND_IDS)
    swapped = Placement(np.array([[0, 2, 1, 3]] * 3), 2, 4)
    rows, replays = compare({"swapped": swapped}, trace, make_cluster(2, 1), TOY,
                            ("return", "follow"), coefficients=hand_coefficients(),
                            plan=StepPlan(source="recorded"))
    assert [(r["placement"], r["exec_model"]) for r in rows] == [
        ("linear", "return"), ("swapped", "return"), ("linear", "follow"), ("swapped", "follow")]
    assert set(replays) == {("linear", "return"), ("swapped", "return"), ("linear", "follow"),
                            ("swapped", "follow")}
    assert rows[0]["speedup_vs_linear"] == 1.0
    assert rows[0]["traffic_tokens"] == 10 and rows[0]["traffic_bytes"] == 160
    assert rows[1]["speedup_vs_linear"] == pytest.approx(rows[0]["mean_step_time_s"]
                                                         / rows[1]["mean_step_time_s"])


def test_linear_reference_has_no_redundant_experts():
    replicated = Placement(np.array([[0, 1, 2, 3, 2, 1]] * 3), 2, 4)
    rows, replays = compare({"replicated": replicated}, make_trace(HAND_IDS), make_cluster(2, 1),
                            TOY, coefficients=hand_coefficients())
    assert rows[0]["placement"] == "linear" and rows[0]["slots_per_gpu"] == 2
    assert rows[1]["slots_per_gpu"] == 3
    # E = 4 over 3 GPUs: the fewest slots 3 divides, 6, with experts 0 and 1 repeated.
    odd = Placement(np.array([[0, 1, 2, 3, 0, 1]] * 3), 3, 4)
    rows, _ = compare({"odd": odd}, make_trace(HAND_IDS), make_cluster(3, 1), TOY,
                      coefficients=hand_coefficients())
    assert rows[0]["slots_per_gpu"] == 2


def test_follow_with_top1_is_one_exchange_per_layer():
    rng = np.random.default_rng(1)
    trace = make_trace(rng.integers(0, 8, (50, 4, 1)), num_experts=8)
    model = ModelSpec("top1", "none", 4, (), 8, 1, 8, 4)
    for kernel in KERNELS:
        result, cost = evaluate(linear(4, 8, 4), trace, make_cluster(4, 2), model,
                                EngineSettings("follow", kernel=kernel), plan=AVERAGE)
        assert result.dispatch.tokens.sum() > 0
        assert result.combine.tokens.sum() == 0 and result.combine.messages.sum() == 0
        # No combine message: the exchange costs its kernel's latency alone.
        latency = CostCoefficients().kernel(kernel)
        assert (cost.combine == latency["combine"]["latency"]).all()
        assert (cost.dispatch > latency["dispatch"]["latency"]).all()
    np.testing.assert_array_equal(result.traffic_bytes(model), result.traffic * 16)
