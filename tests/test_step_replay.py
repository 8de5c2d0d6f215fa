"""Step-level replay, top-k order and online rebalancing: a per-token reference of the
step replay on random instances, column-permutation invariance of weightless traces,
online replay against static replay, move costs by hand and the CLI."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_evaluate import kernel_messages, random_placement

from conftest import SLICE
from moetuner.cli import run
from moetuner.cluster import make_cluster
from moetuner.costmodel import CostCoefficients
from moetuner.engine import KERNELS, EngineSettings
from moetuner.errors import InputError
from moetuner.evaluate import compare, evaluate, evaluate_online, replay, replay_steps
from moetuner.export import to_megatron, to_vllm, write_engine_files
from moetuner.methods import PlaceOptions, place
from moetuner.models import ModelSpec
from moetuner.online import OnlinePolicy, move_cost, online_policy, window_load
from moetuner.placement import Placement
from moetuner.profile import profile_trace
from moetuner.steps import StepPlan, make_steps, serving_steps
from moetuner.trace import Trace, load_trace, sort_by_weight

# Slow memory and fast FLOPs would hide the pair counts; these make both terms matter. Each
# kernel and direction gets its own latency and efficiencies, so a mix-up shows.
KERNEL_CONSTANTS = {
    kernel: {"dispatch": {"latency": 1e-3 * (i + 1), "intra_efficiency": 0.9 - 0.1 * i,
                          "inter_efficiency": 0.7 - 0.1 * i},
             "combine": {"latency": 2e-3 * (i + 1), "intra_efficiency": 0.8 - 0.1 * i,
                         "inter_efficiency": 0.5 - 0.1 * i}}
    for i, kernel in enumerate(KERNELS)}
COEFFICIENTS = CostCoefficients(peak_flops=1e6, memory_bandwidth=5e5, intra_bandwidth=1e4,
                                inter_bandwidth=2e3, kernels=KERNEL_CONSTANTS)
AVERAGE = StepPlan(source="average")


def toy_model(trace: Trace) -> ModelSpec:
    return ModelSpec("toy", "none", trace.num_layers, (), trace.num_experts, trace.top_k,
                     hidden_size=8, expert_intermediate_size=4)


def reference_exchange(msgs, kernel, direction, model, hw, c):
    """Seconds of one exchange from ``msgs [4, G]`` (intra sent, received, inter sent,
    received): the kernel's latency (G > 1) + the slowest GPU's max(sent, received) x
    message bytes over bandwidth x efficiency, inside and across nodes."""
    if kernel.startswith("deepep") and direction == "dispatch":
        size = model.hidden_size + 4 * math.ceil(model.hidden_size / 128)   # FP8 + scales
    else:
        size = 2 * model.hidden_size                                        # BF16
    k = c.kernels[kernel][direction]
    busy = (np.maximum(msgs[0], msgs[1]) * size / (hw["intra_bandwidth"]
                                                   * k["intra_efficiency"])
            + np.maximum(msgs[2], msgs[3]) * size / (hw["inter_bandwidth"]
                                                     * k["inter_efficiency"]))
    return busy.max() + (k["latency"] if msgs.shape[1] > 1 else 0.0)


def reference_step_times(placement, trace, cluster, steps, settings, model, c):
    """Per-token, per-step transcription of the step replay: ``[5, S, L]`` dispatch,
    compute, combine seconds, busiest and mean GPU load. Replayed tokens are positions in
    the steps (a trace token may be replayed more than once), each with its key."""
    exec_model, policy, kernel = settings.exec_model, settings.replica_policy, settings.kernel
    G, S, P = placement.num_gpus, placement.slots_per_gpu, placement.num_slots
    per_node, L = cluster.gpus_per_node, trace.num_layers
    hw = c.resolved(cluster)
    pair_s = 2 * 3 * model.hidden_size * model.expert_intermediate_size / (
        hw["peak_flops"] * c.compute_efficiency)
    read_s = model.expert_weight_bytes / (hw["memory_bandwidth"] * c.memory_efficiency)
    out = np.zeros((5, steps.num_steps, L))
    for s in range(steps.num_steps):
        lo, hi = steps.bounds[s], steps.bounds[s + 1]
        here = {i: int(steps.home[i]) for i in range(lo, hi)}
        for layer in range(L):
            pairs, used = np.zeros(G), set()
            msgs = {"dispatch": np.zeros((4, G)), "combine": np.zeros((4, G))}
            for i in here:
                t, key = steps.order[i], steps.keys[i]
                gpus = []
                for e in trace.topk_ids[t, layer]:
                    slots = [p for p in range(P) if placement.phy2log[layer, p] == e]
                    if policy == "nearest":
                        tiers = [[p for p in slots if p // S == here[i]],
                                 [p for p in slots
                                  if p // S // per_node == here[i] // per_node], slots]
                        slots = next(tier for tier in tiers if tier)
                    used.add(slots[key % len(slots)])
                    gpus.append(slots[key % len(slots)] // S)
                for g in gpus:
                    pairs[g] += 1
                if exec_model == "return":
                    centre = here[i]
                elif trace.ordered:
                    centre = gpus[0]
                else:
                    counts = Counter(gpus)
                    tied = [g for g in range(G) if counts[g] == max(counts.values())]
                    centre = here[i] if here[i] in tied else min(tied)
                for which, src in (("dispatch", here[i]), ("combine", centre)):
                    m = msgs[which]
                    back = which == "combine"   # results flow from the experts to src
                    for kind, sender, receiver in kernel_messages(kernel, src, gpus, per_node):
                        if back:
                            sender, receiver = receiver, sender
                        m[2 * kind, sender] += 1
                        m[2 * kind + 1, receiver] += 1
                if exec_model == "follow":
                    here[i] = centre
            active = np.bincount([p // S for p in used], minlength=G)
            out[0, s, layer] = reference_exchange(msgs["dispatch"], kernel, "dispatch", model,
                                                  hw, c)
            out[1, s, layer] = np.maximum(pairs * pair_s, active * read_s).max()
            out[2, s, layer] = reference_exchange(msgs["combine"], kernel, "combine", model,
                                                  hw, c)
            out[3, s, layer], out[4, s, layer] = pairs.max(), pairs.mean()
    return out


@st.composite
def traced_placements(draw, ordered=None):
    """A random small placement, a trace of a few requests for it (ordered or not) and the
    cluster."""
    num_gpus, num_nodes = draw(st.sampled_from([(2, 1), (2, 2), (4, 2), (4, 1), (6, 3)]))
    num_experts = draw(st.integers(num_gpus, 2 * num_gpus))
    slots = -(-num_experts // num_gpus) + draw(st.integers(0, 1))
    num_layers = draw(st.integers(1, 3))
    k = draw(st.integers(1, min(3, num_experts)))
    tokens = draw(st.integers(1, 14))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = np.argsort(rng.random((tokens, num_layers, num_experts)), axis=2)[:, :, :k]
    cuts = np.sort(rng.integers(0, tokens + 1, draw(st.integers(0, 4))))
    seq_lens = np.diff(np.concatenate([[0], cuts, [tokens]])).astype(np.int64)
    ordered = draw(st.booleans()) if ordered is None else ordered
    weights = np.sort(rng.random(ids.shape), axis=2)[:, :, ::-1].copy() if ordered else None
    trace = Trace(topk_ids=ids, num_experts=num_experts, topk_weights=weights,
                  seq_lens=seq_lens)
    placement = random_placement(draw, num_layers, num_experts, num_gpus, slots, True)
    return placement, trace, make_cluster(num_gpus, num_nodes)


@st.composite
def step_instances(draw, ordered=None):
    placement, trace, cluster = draw(traced_placements(ordered))
    seq_lens, tokens, num_gpus = trace.seq_lens, trace.num_tokens, cluster.num_gpus
    source = draw(st.sampled_from(["decode", "prefill", "serving"]))
    if source == "decode":
        steps = make_steps(seq_lens, tokens, num_gpus, "decode",
                           concurrency=draw(st.integers(1, 6)))
    elif source == "prefill":
        steps = make_steps(seq_lens, tokens, num_gpus, "prefill",
                           step_tokens=draw(st.integers(1, 6)))
    else:   # serving scale: requests drawn with replacement, tokens replayed repeatedly
        steps = serving_steps(seq_lens, tokens, num_gpus, draw(st.sampled_from(
            ["decode", "prefill"])), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
            draw(st.integers(0, 100)))
    return placement, trace, cluster, steps


@settings(max_examples=90, deadline=None)
@given(step_instances(), st.sampled_from(["return", "follow"]),
       st.sampled_from(["even", "nearest"]), st.sampled_from(KERNELS))
def test_step_replay_matches_per_token_reference(instance, exec_model, policy, kernel):
    placement, trace, cluster, steps = instance
    model = toy_model(trace)
    engine = EngineSettings(exec_model, policy, kernel)
    result, times = replay_steps(placement, trace, cluster, model, steps, engine,
                                 COEFFICIENTS)
    want = reference_step_times(placement, trace, cluster, steps, engine, model,
                                COEFFICIENTS)
    got = np.stack([times.dispatch, times.compute, times.combine, times.peak_load,
                    times.mean_load])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(times.tokens, steps.sizes)
    if steps.key is not None:
        return      # replayed tokens repeat: no one-batch replay of the trace equals them
    # Totals: the same tokens with the steps' homes, replayed as one batch.
    whole = replay(placement, trace, cluster, engine,
                   home=steps.home[np.argsort(steps.order)])
    np.testing.assert_array_equal(result.load, whole.load)
    np.testing.assert_array_equal(result.traffic, whole.traffic)
    assert result.summary() == whole.summary()
    assert times.step_imbalance == pytest.approx(want[3].sum() / want[4].sum())


@settings(max_examples=40, deadline=None)
@given(step_instances(ordered=False), st.sampled_from(["return", "follow"]),
       st.sampled_from(["even", "nearest"]), st.sampled_from(KERNELS),
       st.integers(0, 2**32 - 1))
def test_permuting_columns_of_a_weightless_trace_changes_no_metric(instance, exec_model,
                                                                    policy, kernel, seed):
    placement, trace, cluster, steps = instance
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random(trace.topk_ids.shape), axis=2)
    shuffled = Trace(topk_ids=np.take_along_axis(trace.topk_ids, order, axis=2),
                     num_experts=trace.num_experts, seq_lens=trace.seq_lens)
    model = toy_model(trace)
    engine = EngineSettings(exec_model, policy, kernel)
    a, ta = replay_steps(placement, trace, cluster, model, steps, engine, COEFFICIENTS)
    b, tb = replay_steps(placement, shuffled, cluster, model, steps, engine, COEFFICIENTS)
    assert a.summary() == b.summary() and ta.summary() == tb.summary()
    np.testing.assert_array_equal(a.traffic, b.traffic)


def test_weights_order_the_columns_and_say_the_trace_is_ordered(tmp_path):
    ids = np.array([[[0, 1, 2]], [[3, 1, 0]]])
    weights = np.array([[[0.1, 0.7, 0.2]], [[0.5, 0.2, 0.3]]], dtype=np.float32)
    path = tmp_path / "t.npz"
    np.savez(path, topk_ids=ids, topk_weights=weights)
    trace = load_trace(path)
    assert trace.ordered
    np.testing.assert_array_equal(trace.topk_ids, [[[1, 2, 0]], [[3, 0, 1]]])
    np.testing.assert_array_equal(trace.topk_weights[:, 0, 0], weights[[0, 1], 0, [1, 0]])
    np.savez(path, topk_ids=ids)
    assert not load_trace(path).ordered
    assert sort_by_weight(trace.topk_ids, trace.topk_weights)[0] is trace.topk_ids


def test_unordered_follow_combines_where_most_experts_are():
    # Linear, 2 GPUs: experts {0, 1} on GPU 0, {2, 3} on GPU 1. Token 0 (home 0) picks
    # [2, 0, 3]: GPU 1 holds two, so it combines there whatever the column order.
    placement = Placement(np.array([[0, 1, 2, 3]]), 2, 4)
    trace = Trace(topk_ids=np.array([[[2, 0, 3]]]), num_experts=4)
    result = replay(placement, trace, make_cluster(2, 1), EngineSettings("follow"))
    assert result.dispatch.tokens[0].tolist() == [[0, 1], [0, 0]]
    assert result.combine.tokens[0].tolist() == [[0, 1], [0, 0]]


def test_batching_none_is_the_whole_trace_average():
    rng = np.random.default_rng(3)
    trace = Trace(topk_ids=np.argsort(rng.random((40, 2, 8)), axis=2)[:, :, :2],
                  num_experts=8)
    placement = Placement(np.array([np.arange(8)] * 2), 4, 8)
    model = toy_model(trace)
    cluster = make_cluster(4, 2)
    rows, _ = compare({"p": placement}, trace, cluster, model, ("return", "follow"),
                      coefficients=COEFFICIENTS, plan=AVERAGE)
    for row in rows:
        result, times = evaluate(placement, trace, cluster, model,
                                 EngineSettings(row["exec_model"]), COEFFICIENTS, plan=AVERAGE)
        assert times.num_steps == 1 and row["steps"] == 1
        assert row["mean_step_time_s"] == row["p99_step_time_s"] == times.total
        assert row["step_imbalance"] == pytest.approx(1 / result.balancedness)


def online_instance():
    rng = np.random.default_rng(5)
    trace = Trace(topk_ids=np.argsort(rng.random((60, 2, 4)), axis=2)[:, :, :2],
                  num_experts=4, seq_lens=np.full(12, 5))
    placement = Placement(np.array([[0, 1, 2, 3]] * 2), 2, 4)
    return trace, placement, make_cluster(2, 2), toy_model(trace)


@pytest.mark.parametrize("exec_model", ["return", "follow"])
def test_online_with_an_interval_longer_than_the_trace_is_the_static_replay(exec_model):
    trace, placement, cluster, model = online_instance()
    steps = make_steps(trace.seq_lens, trace.num_tokens, 2, "decode", concurrency=4)
    policy = OnlinePolicy(lambda load, old: old[:, ::-1], window=2,
                          interval=steps.num_steps)
    result, times, moves = evaluate_online(placement, trace, cluster, model, policy, steps,
                                           EngineSettings(exec_model), COEFFICIENTS)
    static, static_times = evaluate(placement, trace, cluster, model,
                                    EngineSettings(exec_model), COEFFICIENTS, steps=steps)
    assert result.summary() == static.summary()
    np.testing.assert_array_equal(times.step_time, static_times.step_time)
    assert moves.summary()["rebalances"] == 0 and moves.bytes_moved == 0


def test_online_switches_maps_every_interval_and_counts_moves():
    trace, placement, cluster, model = online_instance()
    steps = make_steps(trace.seq_lens, trace.num_tokens, 2, "decode", concurrency=4)
    seen = []

    def swap_gpus(load, old):
        seen.append(load.copy())
        return np.concatenate([old[:, 2:], old[:, :2]], axis=1)

    policy = OnlinePolicy(swap_gpus, window=3, interval=5)
    result, times, moves = evaluate_online(placement, trace, cluster, model, policy, steps,
                                           EngineSettings("return"), COEFFICIENTS)
    assert steps.num_steps == 15 and moves.at_step.tolist() == [5, 10]
    np.testing.assert_array_equal(seen[0], window_load(trace, steps, 2, 5))
    assert seen[0].sum() == 2 * 2 * steps.sizes[2:5].sum()
    # Every slot of both layers changes; each copy crosses nodes (GPU 0 and 1 on two nodes).
    assert moves.experts_moved.tolist() == [8, 8]
    per_copy = model.expert_weight_bytes / 0.8 / COEFFICIENTS.inter_bandwidth
    np.testing.assert_allclose(moves.seconds, [4 * per_copy] * 2)
    assert moves.summary()["move_time_per_step_s"] == pytest.approx(8 * per_copy / 15)
    swapped = Placement(np.array([[2, 3, 0, 1]] * 2), 2, 4)
    _, middle = evaluate(swapped, trace, cluster, model, coefficients=COEFFICIENTS,
                         steps=steps.take(np.arange(5, 10)))
    np.testing.assert_array_equal(times.step_time[5:10], middle.step_time)


def test_online_presets_are_the_engines_defaults():
    cluster = make_cluster(2, 1)
    vllm = online_policy("eplb", cluster)
    sglang = online_policy("eplb", cluster, "sglang", interval=50)
    assert (vllm.window, vllm.interval, vllm.name) == (1000, 3000, "online eplb")
    assert (sglang.window, sglang.interval) == (1000, 50)
    with pytest.raises(InputError, match="preset"):
        online_policy("eplb", cluster, "trtllm")


def test_move_cost_charges_the_link_a_copy_crosses():
    model = ModelSpec("m", "none", 1, (), 4, 1, hidden_size=10, expert_intermediate_size=10)
    c = CostCoefficients(intra_bandwidth=100, inter_bandwidth=10, network_efficiency=1)
    # GPUs 0-3, two slots each, nodes {0, 1} and {2, 3}: every expert on both nodes.
    old = np.array([[0, 1, 2, 3, 0, 1, 2, 3]])
    # GPU 0 takes expert 2 from GPU 1 and GPU 2 takes 2 from GPU 3 (NVLink); GPU 3 swaps
    # its own two slots (no copy).
    new = np.array([[0, 2, 2, 3, 0, 2, 3, 2]])
    moved, seconds = move_cost(old, new, make_cluster(4, 2), model, c)
    assert moved == 4
    assert seconds == pytest.approx(model.expert_weight_bytes / 100)
    # Two GPUs on two nodes swap experts 0 and 2: each copy crosses nodes.
    moved, seconds = move_cost(np.array([[0, 1, 2, 3]]), np.array([[2, 1, 0, 3]]),
                               make_cluster(2, 2), model, c)
    assert moved == 2 and seconds == pytest.approx(model.expert_weight_bytes / 10)


def test_evaluate_cli_batching_online_and_engine_formats(tmp_path, capsys):
    trace = load_trace(SLICE, drop=["seq_repetition"])
    cluster = make_cluster(4, 2)
    placement = place(profile_trace(trace), cluster, "eplb_fixed", PlaceOptions(redundant=4))[0]
    plain = place(profile_trace(trace), cluster, "linear")[0]
    files = {"eplb.json": placement, "plain.json": plain}
    for name, p in files.items():
        p.save(tmp_path / name)
    (tmp_path / "vllm.json").write_text(json.dumps(to_vllm(placement)))
    np.save(tmp_path / "megatron.npy", to_megatron(plain))
    write_engine_files(placement, "sglang", tmp_path / "sglang.json")
    write_engine_files(placement, "vllm-ascend", tmp_path / "ascend.json")
    base = ["evaluate", str(tmp_path / "eplb.json"), "--trace", str(SLICE), "--drop",
            "seq_repetition", "--nodes", "2", "--json"]
    assert run(base + ["--online", "eplb", "--window", "64", "--interval", "128",
                       "--replay", "recorded", "--concurrency", "64", "--exec", "return"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [row["placement"] for row in out["rows"]]
    assert names[:4] == ["linear", "linear + online eplb", "eplb", "eplb + online eplb"]
    online = out["rows"][1]
    assert online["rebalances"] == 3 and online["experts_moved"] > 0
    assert online["move_time_per_step_s"] > 0 and out["online"]["interval"] == 128
    assert out["rows"][0]["batching"].startswith("decode, 64 running")
    assert run(base + ["--replay", "average", "--exec", "return"]) == 0
    none = json.loads(capsys.readouterr().out)["rows"]
    assert {row["steps"] for row in none} == {1}
    assert run(base[:2] + [str(tmp_path / name) for name in
                           ("vllm.json", "megatron.npy", "sglang.json", "ascend.json")]
               + base[2:] + ["--gpus", "4", "--phase", "prefill", "--replay", "recorded",
                             "--step-tokens", "1024", "--exec", "follow"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    time = {row["placement"]: row["mean_step_time_s"] for row in rows}
    for name in ("vllm", "sglang", "ascend"):
        assert time[name] == pytest.approx(time["eplb"])
    assert time["megatron"] == pytest.approx(time["linear"])
    assert run(base[:2] + [str(tmp_path / "vllm.json")] + base[2:]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert run(base + ["--replay", "steps"]) == 2
    assert "--replay" in capsys.readouterr().err
    assert run(base + ["--online", "eplb", "--interval", "0"]) == 2
    assert run(base + ["--online", "nope"]) == 2
    capsys.readouterr()
    assert run(["info", str(SLICE)]) == 0
    assert "top-k ordered" in capsys.readouterr().out


# MoE seconds per batch, traffic tokens and node messages printed by the evaluator before
# per-step replay (commit c9e0275) for golden_instance(), per (exec model, replica policy).
BEFORE_STEPS = {("return", "even"): (6.0374508895522397e-05, 3098, 1596),
                ("return", "nearest"): (6.034538178441128e-05, 3022, 1502),
                ("follow", "even"): (6.035463571033721e-05, 2865, 1493),
                ("follow", "nearest"): (6.035000874737424e-05, 2843, 1467)}


def golden_instance():
    """300 ordered tokens, 3 layers, E = 12, top-3; 4 GPUs on 2 nodes, 4 slots each: three
    experts and a replica of the next GPU's first."""
    rng = np.random.default_rng(11)
    ids = np.argsort(rng.random((300, 3, 12)), axis=2)[:, :, :3]
    weights = np.sort(rng.random(ids.shape), axis=2)[:, :, ::-1].copy()
    trace = Trace(topk_ids=ids, num_experts=12, topk_weights=weights)

    def layer_row(perm):
        return np.concatenate([np.append(perm[3 * g:3 * g + 3], perm[(3 * g + 3) % 12])
                               for g in range(4)])

    phy2log = np.stack([layer_row(rng.permutation(12)) for _ in range(3)])
    model = ModelSpec("g", "none", 3, (), 12, 3, hidden_size=64, expert_intermediate_size=32)
    return trace, Placement(phy2log, 4, 12), model


def before_steps_coefficients() -> CostCoefficients:
    """The cost model of before steps as kernel constants: DeepEP normal's messages (one per
    token and GPU inside the node, per token and remote node across), BF16 (128 bytes at
    hidden 64) at network efficiency 0.8 both ways, and the 10 us cross-node latency (every
    layer of the golden instance crosses nodes). The FP8 dispatch message is 68 bytes, so
    its efficiency is scaled by 68 / 128 to cost what a 128-byte one did."""
    fp8 = 0.8 * (64 + 4) / 128
    return CostCoefficients(tokens_per_gpu_batch=16, kernels={"deepep-normal": {
        "dispatch": {"latency": 10e-6, "intra_efficiency": fp8, "inter_efficiency": fp8},
        "combine": {"latency": 10e-6, "intra_efficiency": 0.8, "inter_efficiency": 0.8}}})


@pytest.mark.parametrize(("exec_model", "policy"), list(BEFORE_STEPS))
def test_batching_none_reproduces_the_numbers_from_before_steps(exec_model, policy):
    trace, placement, model = golden_instance()
    result, times = evaluate(placement, trace, make_cluster(4, 2), model,
                             EngineSettings(exec_model, policy, "deepep-normal"),
                             before_steps_coefficients(), plan=AVERAGE)
    summary = result.summary()
    want_time, want_traffic, want_messages = BEFORE_STEPS[exec_model, policy]
    assert (summary["traffic_tokens"], summary["node_messages"]) == (want_traffic,
                                                                     want_messages)
    assert times.total == pytest.approx(want_time, rel=1e-12)
    assert (result.remote_nodes > 0).all()      # so the old latency was the 10 us one


@pytest.mark.parametrize("exec_model", ["return", "follow"])
def test_chunking_the_steps_changes_nothing(monkeypatch, exec_model):
    import moetuner.evaluate as evaluate_module

    rng = np.random.default_rng(2)
    ids = np.argsort(rng.random((200, 3, 8)), axis=2)[:, :, :2]
    trace = Trace(topk_ids=ids, num_experts=8, seq_lens=rng.multinomial(200, [0.05] * 20))
    placement = Placement(np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 5, 2, 7]] * 3), 4, 8)
    cluster, model = make_cluster(4, 2), toy_model(trace)
    steps = make_steps(trace.seq_lens, trace.num_tokens, 4, "decode", concurrency=6)
    for kernel in KERNELS:
        monkeypatch.setattr(evaluate_module, "CHUNK_TOKENS", 65536)
        engine = EngineSettings(exec_model, "nearest", kernel)
        whole, times = replay_steps(placement, trace, cluster, model, steps, engine,
                                    COEFFICIENTS)
        for chunk in (1, 7, 50):
            monkeypatch.setattr(evaluate_module, "CHUNK_TOKENS", chunk)
            part, part_times = replay_steps(placement, trace, cluster, model, steps, engine,
                                            COEFFICIENTS)
            assert part.summary() == whole.summary()
            np.testing.assert_array_equal(part.active_experts, whole.active_experts)
            np.testing.assert_array_equal(part.traffic, whole.traffic)
            np.testing.assert_array_equal(part.dispatch.messages, whole.dispatch.messages)
            np.testing.assert_array_equal(part.combine.messages, whole.combine.messages)
            np.testing.assert_array_equal(part_times.step_time, times.step_time)
