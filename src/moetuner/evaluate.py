"""Replay a routing trace through a placement, engine step by engine step: per-GPU load and
token traffic, layer by layer, and the predicted MoE time of every step.

Engines run steps (``moetuner.steps``: by default synthesised at serving scale from the
recorded requests, or the recorded order), and a layer of a step waits for that step's
busiest GPU. ``evaluate`` / ``replay_steps`` count everything per step with the replay
kernel ``moetuner.engine.count_layer`` (replica choice, pairs and active slots per GPU, the
messages of the phase's kernel, the execution model: rules in ``moetuner.engine``), the same
function ``joint``'s objective uses, and apply the cost model to each step's own counts
(``costmodel.StepCost``): step time = sum over layers of dispatch + slowest GPU's compute +
combine (``moetuner.counts.StepTimes``: mean, p50, p99, tokens/s, ``step_imbalance``). A
step plan of source ``average`` keeps the whole-trace average (``costmodel.predict``).
``replay`` returns the counts summed over all tokens. The replay runs over chunks of whole
steps (``Steps.chunks``), one compiled pass per MoE layer; memory holds a chunk's per-token
arrays, its per-(step, slot) counts, per-(step, layer) scalars and ``[L, G, G]`` totals.
``evaluate_online`` replays with online rebalancing (``moetuner.online``).
``replay_step_loads`` / ``compare_step_loads`` cost the steps an engine recorded as per-step
loads (``Profile.step_loads``) instead of a token-level trace (``STEP_LOADS_NOTE`` says what
loads alone cannot tell).

Every token has a home GPU: its step's (``Steps.home``: in decode, its running sequence's
rank); without steps ``t mod G`` (data-parallel attention spreads tokens evenly) or what the
caller passes. Under ``follow`` a token sits on its home GPU at the start of its step
(layer 0) and where the layer before combined it afterwards; after the last layer it stays
there (the return home for the next step is not counted).

Metrics: ``load`` = token-expert pairs per GPU; ``tokens_in`` = distinct tokens a GPU
computes for (local ones included); ``imbalance`` = mean over layers of max / mean GPU load;
``balancedness`` = sum over layers of mean load / sum of max load; moves = (token, layer,
distinct destination GPU) triples of dispatch, of which ``share_cross_gpu`` leave the GPU
the token sits on and ``share_cross_node`` leave its node; ``remote_nodes_per_token`` =
distinct remote nodes a token's dispatch reaches per layer.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from moetuner.cluster import Cluster
from moetuner.costmodel import CostBreakdown, CostCoefficients, StepCost, predict
from moetuner.counts import Exchange, Replay, StepTimes
from moetuner.engine import EngineSettings, LayerCounts, LayerTotals, count_layer, replica_table
from moetuner.errors import InputError
from moetuner.methods.linear import linear_phy2log
from moetuner.models import ModelSpec, model_with_shape
from moetuner.online import Moves, OnlinePolicy, move_cost, window_load
from moetuner.placement import Placement
from moetuner.profile import check_step_loads
from moetuner.steps import StepPlan, Steps, whole_trace
from moetuner.trace import Trace

# Tokens replayed at once (whole steps): bounds the per-token arrays of a chunk; and
# (step, slot) cells of a chunk's per-step counts.
CHUNK_TOKENS = 65536
CHUNK_CELLS = 1 << 22
STEP_LOADS_NOTE = (
    "recorded per-step loads give each GPU's pairs and active slots exactly (replicas "
    "sharing their expert's count evenly); they cannot tell which experts a token chose "
    "together nor on which GPU it started, so messages assume tokens spread evenly over "
    "GPUs, the deepep-normal kernel's per-node de-duplication is not applied (one message "
    "per pair: an upper bound), the return execution model is used, and remote nodes per "
    "token are unknown; token-level traces (SGLang per_token dumps, vLLM routed_experts) "
    "tell them")


def check_compatible(placement: Placement, trace: Trace, cluster: Cluster) -> None:
    """Raise ``InputError`` unless the placement, trace and cluster describe the same shapes."""
    if placement.num_gpus != cluster.num_gpus:
        raise InputError(placement.source, "num_gpus", f"the cluster's {cluster.num_gpus} GPUs",
                         placement.num_gpus)
    if placement.num_layers != trace.num_layers:
        raise InputError(placement.source, "phy2log",
                         f"{trace.num_layers} layers (those of {trace.source})",
                         placement.num_layers)
    if placement.num_experts != trace.num_experts:
        raise InputError(placement.source, "num_experts",
                         f"{trace.num_experts} experts (those of {trace.source})",
                         placement.num_experts)


def replay(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    settings: EngineSettings = EngineSettings(),
    home: np.ndarray | None = None,
    steps: Steps | None = None,
) -> Replay:
    """Replay ``trace`` through ``placement`` on ``cluster`` (semantics: module docstring);
    the counts summed over all tokens.

    Args:
        placement: ``phy2log [L, P]`` on G GPUs; replicas and empty slots (-1) allowed.
        trace: ``topk_ids [T, L, k]`` with the placement's E and L.
        cluster: G GPUs on N nodes.
        settings: execution model, replica policy and kernel.
        home: int ``[T]`` home GPU of each token; default ``t mod G``.
        steps: the engine steps (``moetuner.steps``), which fix the tokens' homes (not
            together with ``home``); default one step of every token.
    """
    if steps is None:
        steps = whole_trace(trace.num_tokens, cluster.num_gpus)
        if home is not None:
            steps = replace(steps, home=_checked_home(home, trace.num_tokens, cluster.num_gpus))
    elif home is not None:
        raise InputError("home", "home", "either home or steps (the steps fix the homes)")
    return _replay(placement, trace, cluster, steps, settings)[0]


def replay_steps(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    model: ModelSpec,
    steps: Steps,
    settings: EngineSettings = EngineSettings(),
    coefficients: CostCoefficients | None = None,
) -> tuple[Replay, StepTimes]:
    """Replay ``trace`` step by step and predict every step's MoE time (the cost model's
    per-step semantics: each step's own counts, unscaled).

    Steps are processed in chunks of whole steps, so memory holds one chunk's per-token
    arrays, per-(step, layer) scalars and ``[L, G]`` / ``[L, G, G]`` totals, never
    ``[S, L, G]``.

    Returns:
        The replay summed over all steps and the per-step times.
    """
    cost = StepCost(model, cluster, coefficients, settings.kernel)
    return _replay(placement, trace, cluster, steps, settings, cost)


def _checked_home(home: np.ndarray, num_tokens: int, num_gpus: int) -> np.ndarray:
    home = np.asarray(home, dtype=np.int64)
    if home.shape != (num_tokens,) or (num_tokens and (home.min() < 0
                                                       or home.max() >= num_gpus)):
        raise InputError("home", "home",
                         f"GPU ids in [0, {num_gpus}) for each of {num_tokens} tokens",
                         list(home.shape))
    return home


def _replay(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    steps: Steps,
    settings: EngineSettings,
    cost: StepCost | None = None,
) -> tuple[Replay, StepTimes | None]:
    """The replay of ``steps`` (totals) and, when ``cost`` is given, its per-step times."""
    check_compatible(placement, trace, cluster)
    if steps.num_gpus != cluster.num_gpus or (
            steps.num_tokens and int(steps.order.max()) >= trace.num_tokens):
        raise InputError("steps", "steps", f"steps of tokens of the trace's {trace.num_tokens} "
                         f"on {cluster.num_gpus} GPUs", f"{steps.num_tokens} on "
                         f"{steps.num_gpus}")
    G, L = cluster.num_gpus, trace.num_layers
    node = cluster.node_of_gpu
    tables = [replica_table(placement.phy2log[layer], placement.num_experts, G, node,
                            settings.replica_policy) for layer in range(L)]
    totals = _Totals(L, G, placement.num_slots)
    per_step: list[np.ndarray] = []
    for lo, hi in steps.chunks(CHUNK_TOKENS, max(1, CHUNK_CELLS // placement.num_slots)):
        begin, end = steps.bounds[lo], steps.bounds[hi]
        ids = trace.topk_ids[steps.order[begin:end]]                      # [n, L, k]
        step = np.repeat(np.arange(hi - lo), np.diff(steps.bounds[lo:hi + 1]))
        key, position = steps.keys[begin:end], steps.home[begin:end]
        times = None if cost is None else np.zeros((5, hi - lo, L))
        for layer in range(L):
            counts, layer_totals, position = count_layer(
                ids[:, layer, :], key, position, step, hi - lo, tables[layer],
                placement.slots_per_gpu, node, settings, trace.ordered)
            totals.add(layer, counts, layer_totals)
            if cost is not None:
                pairs = counts.gpu_pairs(placement.slots_per_gpu)
                times[:3, :, layer] = cost.layer(counts, placement.slots_per_gpu)
                times[3, :, layer] = pairs.max(axis=1)
                times[4, :, layer] = pairs.mean(axis=1)
        if cost is not None:
            per_step.append(times)
    result = totals.replay(settings, steps.num_tokens, node, placement.slots_per_gpu)
    if cost is None:
        return result, None
    # [5, S, L]: dispatch, compute, combine, peak load, mean load.
    stacked = np.concatenate(per_step, axis=1) if per_step else np.zeros((5, 0, L))
    return result, StepTimes(steps.sizes, *stacked, batching=steps.description)


class _Totals:
    """Counts summed over the chunks: the fields of ``Replay``, filled in place."""

    def __init__(self, num_layers: int, num_gpus: int, num_slots: int):
        L, G = num_layers, num_gpus
        self.load = np.zeros((L, G), dtype=np.int64)
        self.tokens_in = np.zeros((L, G), dtype=np.int64)
        self.used_slots = np.zeros((L, num_slots), dtype=bool)
        self.matrix = np.zeros((2, L, G, G), dtype=np.int64)       # dispatch, combine
        self.messages = np.zeros((2, 4, L, G), dtype=np.int64)     # exchange, kind
        self.moves = np.zeros((4, L), dtype=np.int64)              # LayerTotals.moves

    def add(self, layer: int, counts: LayerCounts, totals: LayerTotals) -> None:
        """Add one layer's counts over a chunk of steps."""
        self.load[layer] += counts.slot_pairs.sum(axis=0).reshape(self.load.shape[1], -1
                                                                   ).sum(axis=1)
        self.used_slots[layer] |= counts.slot_pairs.any(axis=0)
        self.tokens_in[layer] += totals.tokens_in
        self.matrix[:, layer] += totals.matrix
        self.messages[0, :, layer] += counts.dispatch.sum(axis=1)
        back = counts.dispatch if counts.combine is None else counts.combine
        # Results flow back: what a GPU sent in the counted direction it receives.
        self.messages[1, :, layer] += back.sum(axis=1)[[1, 0, 3, 2]]
        self.moves[:, layer] += totals.moves

    def replay(self, settings: EngineSettings, num_tokens: int, node_of_gpu: np.ndarray,
               slots_per_gpu: int) -> Replay:
        L, G = self.load.shape
        active = self.used_slots.reshape(L, G, slots_per_gpu).sum(axis=2)
        dispatch, combine = (Exchange(self.matrix[i], self.messages[i]) for i in (0, 1))
        return Replay(exec_model=settings.exec_model, replica_policy=settings.replica_policy,
                      kernel=settings.kernel, num_tokens=num_tokens, node_of_gpu=node_of_gpu,
                      load=self.load, tokens_in=self.tokens_in, active_experts=active,
                      dispatch=dispatch, combine=combine, moves=self.moves[0],
                      moves_cross_gpu=self.moves[1], moves_cross_node=self.moves[2],
                      remote_nodes=self.moves[3])


def evaluate(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    model: ModelSpec,
    settings: EngineSettings = EngineSettings(),
    coefficients: CostCoefficients | None = None,
    steps: Steps | None = None,
    plan: StepPlan = StepPlan(),
) -> tuple[Replay, StepTimes]:
    """Replay ``trace`` through ``placement`` and predict the MoE layers' time step by step.

    The steps are ``steps`` when given, else those of ``plan`` (default: decode at serving
    scale, ``moetuner.steps.serving_steps``). A plan of ``source="average"`` (without
    ``steps``) is the whole-trace average of ``costmodel.predict``: one step of
    ``tokens_per_gpu_batch x G`` tokens with the trace's counts scaled to it.
    """
    check_model(model, trace)
    if steps is None:
        steps = plan.steps(trace.seq_lens, trace.num_tokens, cluster.num_gpus)
    if steps is None:
        result = replay(placement, trace, cluster, settings)
        return result, averaged_step(result, predict(result, model, cluster, coefficients))
    return replay_steps(placement, trace, cluster, model, steps, settings, coefficients)


def averaged_step(result: Replay, cost: CostBreakdown) -> StepTimes:
    """The whole-trace average as one step of the cost model's batch."""
    mean = result.load.mean(axis=1)
    scale = cost.batch_tokens / max(result.num_tokens, 1)
    return StepTimes(tokens=np.array([cost.batch_tokens]), dispatch=cost.dispatch[None],
                     compute=cost.compute[None], combine=cost.combine[None],
                     peak_load=result.load.max(axis=1)[None] * scale,
                     mean_load=mean[None] * scale, batching="whole-trace average")


def evaluate_online(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    model: ModelSpec,
    policy: OnlinePolicy,
    steps: Steps,
    settings: EngineSettings = EngineSettings(),
    coefficients: CostCoefficients | None = None,
) -> tuple[Replay, StepTimes, Moves]:
    """Replay ``steps`` in order starting on ``placement``, re-placing with ``policy`` every
    ``policy.interval`` steps from the loads of the last ``policy.window`` steps
    (``moetuner.online``). A window without tokens keeps the map."""
    check_model(model, trace)
    replays, times, at_step, moved, seconds = [], [], [], [], []
    current = placement
    for first in range(0, max(steps.num_steps, 1), policy.interval):
        if first:
            load = window_load(trace, steps, max(0, first - policy.window), first)
            if load.any():
                new_map = np.asarray(policy.rebalance(load, current.phy2log), dtype=np.int64)
                count, duration = move_cost(current.phy2log, new_map, cluster, model,
                                            coefficients)
                at_step.append(first)
                moved.append(count)
                seconds.append(duration)
                current = Placement(new_map, current.num_gpus, current.num_experts,
                                    allow_shared_gpu=True, allow_empty_slots=True,
                                    source=policy.name)
        last = min(first + policy.interval, steps.num_steps)
        result, part = replay_steps(current, trace, cluster, model,
                                    steps.take(np.arange(first, last)), settings, coefficients)
        replays.append(result)
        times.append(part)
    moves = Moves(np.array(at_step, dtype=np.int64), np.array(moved, dtype=np.int64),
                  np.array(seconds, dtype=np.float64), model.expert_weight_bytes,
                  steps.num_steps)
    return sum(replays[1:], replays[0]), StepTimes.concatenate(times), moves


def check_model(model: ModelSpec, trace: Trace) -> None:
    """Raise ``InputError`` unless ``model`` has the trace's experts, layers and k."""
    shape = (model.num_moe_layers, model.num_experts, model.top_k)
    if shape != (trace.num_layers, trace.num_experts, trace.top_k):
        raise InputError("--model", model.name,
                         f"a model with the trace's {trace.num_layers} MoE layers, "
                         f"{trace.num_experts} experts and top-{trace.top_k}",
                         f"{shape[0]} layers, {shape[1]} experts, top-{shape[2]}")


def model_for_trace(trace: Trace) -> ModelSpec:
    """The first model preset with the trace's MoE layers, experts and k."""
    model = model_with_shape(trace.num_layers, trace.num_experts, trace.top_k)
    if model is not None:
        return model
    raise InputError("--model", "model", f"a preset matching the trace's {trace.num_layers} "
                     f"layers, {trace.num_experts} experts and top-{trace.top_k} (none does; "
                     "pass --model)")


def linear_reference(placement: Placement) -> Placement:
    """``linear`` as engines run it by default: the GPUs, layers and experts of ``placement``
    without redundant experts (the fewest slots G divides, when G does not divide E)."""
    gpus, experts = placement.num_gpus, placement.num_experts
    phy2log = linear_phy2log(placement.num_layers, experts, -(-experts // gpus) * gpus)
    return Placement(phy2log=phy2log, num_gpus=placement.num_gpus,
                     num_experts=placement.num_experts, metadata={"method": "linear"},
                     source="linear")


def compare(
    placements: dict[str, Placement],
    trace: Trace,
    cluster: Cluster,
    model: ModelSpec,
    exec_models: tuple[str, ...] = ("return",),
    settings: EngineSettings = EngineSettings(),
    coefficients: CostCoefficients | None = None,
    steps: Steps | None = None,
    plan: StepPlan = StepPlan(),
    online: OnlinePolicy | None = None,
) -> tuple[list[dict], dict[tuple[str, str], Replay]]:
    """Evaluate every placement under every execution model, with the speedup over ``linear``.

    ``linear`` without redundant experts (``linear_reference`` of the first placement) is added
    as the reference unless a placement is already named so. Steps as in ``evaluate``, drawn
    once, so every placement is scored on the same steps. ``settings`` gives the replica
    policy and kernel (its execution model is replaced by each of ``exec_models``). With
    ``online``, every placement is also replayed online from its map (row ``NAME + online
    METHOD``, with the moves beside; its speedup counts the move time amortised per step),
    except for the whole-trace average (a single averaged batch: nothing to rebalance).

    Returns:
        rows: one dict of metrics per (execution model, placement), in that order; each
            names its regime (``batching``: how the steps were formed) and ``phase``.
        replays: (placement name, execution model) -> its replay.
    """
    check_model(model, trace)
    placements = dict(placements)
    if "linear" not in placements:
        first = next(iter(placements.values()), None)
        if first is None:
            raise InputError("placements", "placements", "at least one placement")
        placements = {"linear": linear_reference(first), **placements}
    if steps is None:
        steps = plan.steps(trace.seq_lens, trace.num_tokens, cluster.num_gpus)
    rows, replays = [], {}
    for exec_model in exec_models:
        run_settings = replace(settings, exec_model=exec_model)
        first_row = len(rows)
        for name, placement in placements.items():
            runs = [(name, *evaluate(placement, trace, cluster, model, run_settings,
                                     coefficients, steps, plan), None)]
            if online is not None and steps is not None:
                runs.append((f"{name} + {online.name}",
                             *evaluate_online(placement, trace, cluster, model, online, steps,
                                              run_settings, coefficients)))
            for label, result, times, moves in runs:
                replays[label, exec_model] = result
                rows.append({"placement": label, "phase": plan.phase,
                             "slots_per_gpu": placement.slots_per_gpu, **result.summary(),
                             "traffic_bytes": float(result.traffic.sum() * model.token_bytes),
                             **times.summary(),
                             **({} if moves is None else moves.summary())})
        linear_time = rows[first_row]["mean_step_time_s"]
        for row in rows[first_row:]:
            served = row["mean_step_time_s"] + row.get("move_time_per_step_s", 0.0)
            row["speedup_vs_linear"] = linear_time / served if served else float("inf")
    return rows, replays


def replay_step_loads(
    placement: Placement,
    step_loads: np.ndarray,
    cluster: Cluster,
    model: ModelSpec,
    settings: EngineSettings = EngineSettings(),
    coefficients: CostCoefficients | None = None,
) -> StepTimes:
    """Predict the MoE time of engine steps recorded as loads (``Profile.step_loads``).

    Per step and layer: each expert's count splits evenly over its replicas (``even``'s
    average), giving each slot's pairs (float) and each GPU's pairs and active slots. Tokens
    are assumed spread evenly over the GPUs, so a pair computed on GPU g comes from each GPU
    with probability 1/G: g receives its pairs x (G/N - 1)/G inside its node and x (1 -
    1/N) across, and GPU c sends 1/G of the pairs of every other GPU of its node inside it
    and 1/G of the pairs of every other node's GPUs across. Every kernel is counted as one
    message per pair (for ``deepep-normal``, which de-duplicates per node, an upper bound);
    combine is dispatch run backwards (``return``; ``settings`` gives the kernel only).
    ``costmodel.StepCost`` costs the counts (``STEP_LOADS_NOTE``).

    Args:
        placement: ``phy2log [L, P]`` on G GPUs.
        step_loads: int ``[S, L, E]`` tokens per step, layer and expert.
        cluster: G GPUs on N nodes.
        model: the model (its k counts a step's tokens: the busiest layer's pairs / k).

    Returns:
        ``StepTimes`` of the S steps.
    """
    check_step_loads(step_loads, placement.num_layers, placement.num_experts, "step_loads")
    if placement.num_gpus != cluster.num_gpus:
        raise InputError(placement.source, "num_gpus", f"the cluster's {cluster.num_gpus} GPUs",
                         placement.num_gpus)
    cost = StepCost(model, cluster, coefficients, settings.kernel)
    G, S, L = cluster.num_gpus, step_loads.shape[0], placement.num_layers
    node = cluster.node_of_gpu
    same = node[:, None] == node[None, :]                                      # [G, G]
    inside = (same & ~np.eye(G, dtype=bool)).astype(np.float64)
    per_node = G // cluster.num_nodes
    times = np.zeros((5, S, L))
    for layer in range(L):
        row = placement.phy2log[layer]
        used = row >= 0
        replicas = np.bincount(row[used], minlength=placement.num_experts)
        slot_pairs = np.zeros((S, row.size))
        slot_pairs[:, used] = step_loads[:, layer, row[used]] / replicas[row[used]]
        pairs = slot_pairs.reshape(S, G, -1).sum(axis=2)                       # [S, G]
        dispatch = np.stack([pairs @ inside / G, pairs * (per_node - 1) / G,
                             pairs @ (~same).astype(np.float64) / G,
                             pairs * (G - per_node) / G])                      # [4, S, G]
        times[:3, :, layer] = cost.layer(LayerCounts(slot_pairs, dispatch, None),
                                         placement.slots_per_gpu)
        times[3, :, layer] = pairs.max(axis=1)
        times[4, :, layer] = pairs.mean(axis=1)
    tokens = -(-step_loads.sum(axis=2).max(axis=1, initial=0) // model.top_k)
    return StepTimes(tokens.astype(np.int64), *times,
                     batching=f"{S} recorded engine steps (per-step loads)")


def compare_step_loads(
    placements: dict[str, Placement],
    step_loads: np.ndarray,
    cluster: Cluster,
    model: ModelSpec,
    settings: EngineSettings = EngineSettings(),
    coefficients: CostCoefficients | None = None,
) -> list[dict]:
    """``replay_step_loads`` of every placement (``linear`` added as in ``compare``): one row
    of ``StepTimes.summary`` per placement, with ``speedup_vs_linear``."""
    placements = dict(placements)
    if "linear" not in placements and placements:
        placements = {"linear": linear_reference(next(iter(placements.values()))),
                      **placements}
    rows = [{"placement": name, "slots_per_gpu": placement.slots_per_gpu,
             "kernel": settings.kernel,
             **replay_step_loads(placement, step_loads, cluster, model, settings,
                                 coefficients).summary()}
            for name, placement in placements.items()]
    for row in rows:
        served = row["mean_step_time_s"]
        row["speedup_vs_linear"] = rows[0]["mean_step_time_s"] / served if served else 1.0
    return rows
