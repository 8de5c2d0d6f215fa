"""Replay a routing trace through a placement, engine step by engine step: per-GPU load and
token traffic, layer by layer, and the predicted MoE time of every step.

Engines run steps (``moetuner.steps``: continuous-batching decode, prefill chunks), and a
layer of a step waits for that step's busiest GPU. ``evaluate`` / ``replay_steps`` count
everything per step (loads, active slots, dispatch and combine messages, DeepEP node
messages) and apply the cost model to each step's own counts (``gpu_compute_time``,
``exchange_time``): step time = sum over layers of dispatch + slowest GPU's compute +
combine (``moetuner.counts.StepTimes``: mean, p50, p99, tokens/s, ``step_imbalance``).
``batching="none"`` keeps the whole-trace average (``costmodel.predict``). ``replay``
returns the counts summed over all tokens. The replay is vectorised numpy over chunks of
whole steps (``Steps.chunks``), one pass per MoE layer; memory holds a chunk's per-token
arrays, per-(step, layer) scalars and ``[L, G]`` / ``[L, G, G]`` totals.
``evaluate_online`` replays with online rebalancing (``moetuner.online``).

Replica choice, per (token t, layer l, chosen expert e) with the replicas of e listed in
ascending slot order (``Placement.log2phy``):

- ``even`` (vLLM): replica number ``t mod replicas(e)``, a hash of the token index.
- ``nearest`` (SGLang's default): the replicas on the token's current GPU if there are any,
  else those on its current node, else all replicas; among that tier, number
  ``t mod size(tier)``.

Every token has a home GPU: its step's (``Steps.home``: in decode, its running sequence's
rank); without steps ``t mod G`` (data-parallel attention spreads tokens evenly) or what the
caller passes. Execution models (section 4 of the brief):

- ``return``: in every layer the token leaves from its home GPU h. Dispatch sends its
  activation once to each distinct GPU holding one of its k chosen replicas, other than h;
  combine sends one result back to h from each of those GPUs. Two exchanges per layer.
- ``follow``: at the start of its step (layer 0) the token sits on its home GPU; its
  current GPU then carries across the layers of the step. In layer l it sits on GPU c.
  Dispatch sends its activation from c once to each distinct GPU of its k chosen replicas,
  other than c. The results are combined on p (``moetuner.steps.combine_gpu``): the GPU of
  the replica of its primary expert when the trace is ordered (``Trace.ordered``: column 0
  after sorting by weight), else the GPU holding most of its k experts (ties: c, then the
  lowest id), so an unordered trace's column order changes nothing. Each distinct expert
  GPU other than p sends one partial result to p; the token then sits on p for layer
  l + 1. With top-1 routing a layer is exactly one exchange. After the last layer the token
  stays on p (the return home for the next step is not counted).

Across nodes, traffic is also counted as DeepEP sends it: one message per token and distinct
remote destination node (not per GPU), sent by the source GPU and received by the GPU of the
same local index on the destination node, which forwards it over NVLink (combine mirrors
this: results are reduced inside a node and sent once per node). ``Exchange.node_sent`` and
``node_received`` hold those messages; ``Exchange.tokens`` holds the GPU x GPU pairs.

Metrics: ``load`` = token-expert pairs per GPU; ``tokens_in`` = distinct tokens a GPU
computes for (local ones included); ``imbalance`` = mean over layers of max / mean GPU load;
``balancedness`` = sum over layers of mean load / sum of max load; moves = (token, layer,
distinct destination GPU) triples of dispatch, of which ``share_cross_gpu`` leave the GPU
the token sits on and ``share_cross_node`` leave its node.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from moetuner.cluster import Cluster
from moetuner.costmodel import (
    CostBreakdown,
    CostCoefficients,
    exchange_time,
    gpu_compute_time,
    predict,
)
from moetuner.counts import Exchange, Replay, StepTimes
from moetuner.errors import InputError
from moetuner.methods.linear import linear_phy2log
from moetuner.models import ModelSpec, model_with_shape
from moetuner.online import Moves, OnlinePolicy, move_cost, window_load
from moetuner.placement import Placement
from moetuner.steps import Steps, combine_gpu, make_steps, whole_trace
from moetuner.trace import Trace

EXEC_MODELS = ("return", "follow")
REPLICA_POLICIES = ("even", "nearest")
# Tokens replayed at once (whole steps): bounds the per-token arrays of a chunk.
CHUNK_TOKENS = 65536


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
    exec_model: str = "return",
    replica_policy: str = "even",
    home: np.ndarray | None = None,
    steps: Steps | None = None,
) -> Replay:
    """Replay ``trace`` through ``placement`` on ``cluster`` (semantics: module docstring);
    the counts summed over all tokens.

    Args:
        placement: ``phy2log [L, P]`` on G GPUs; replicas and empty slots (-1) allowed.
        trace: ``topk_ids [T, L, k]`` with the placement's E and L.
        cluster: G GPUs on N nodes.
        exec_model: ``return`` or ``follow``.
        replica_policy: ``even`` or ``nearest``.
        home: int ``[T]`` home GPU of each token; default ``t mod G``.
        steps: the engine steps (``moetuner.steps.make_steps``), which fix the tokens' homes
            (not together with ``home``); default one step of every token.
    """
    if steps is None:
        steps = whole_trace(trace.num_tokens, cluster.num_gpus)
        if home is not None:
            steps = replace(steps, home=_checked_home(home, trace.num_tokens, cluster.num_gpus))
    elif home is not None:
        raise InputError("home", "home", "either home or steps (the steps fix the homes)")
    return _replay(placement, trace, cluster, steps, exec_model, replica_policy)[0]


def replay_steps(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    model: ModelSpec,
    steps: Steps,
    exec_model: str = "return",
    replica_policy: str = "even",
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
    cost = _StepCost(model, cluster, coefficients or CostCoefficients())
    return _replay(placement, trace, cluster, steps, exec_model, replica_policy, cost)


def _checked_home(home: np.ndarray, num_tokens: int, num_gpus: int) -> np.ndarray:
    home = np.asarray(home, dtype=np.int64)
    if home.shape != (num_tokens,) or (num_tokens and (home.min() < 0
                                                       or home.max() >= num_gpus)):
        raise InputError("home", "home",
                         f"GPU ids in [0, {num_gpus}) for each of {num_tokens} tokens",
                         list(home.shape))
    return home


class _StepCost:
    """The cost model applied to one chunk of steps, layer by layer (costmodel assumptions
    2-5 with each step's own counts)."""

    def __init__(self, model: ModelSpec, cluster: Cluster, coefficients: CostCoefficients):
        self.model, self.coefficients = model, coefficients
        self.hw = coefficients.resolved(cluster)

    def compute(self, pairs: np.ndarray, active: np.ndarray) -> np.ndarray:
        """``[s]`` seconds of the slowest GPU from ``[s, G]`` pairs and active slots."""
        return gpu_compute_time(pairs, active, self.model, self.hw,
                                self.coefficients).max(axis=1)

    def exchange(self, messages: tuple[np.ndarray, ...]) -> np.ndarray:
        """``[s]`` seconds of one exchange from its four ``[s, G]`` message counts."""
        return exchange_time(*messages, self.hw, self.coefficients, self.model.token_bytes)


def _replay(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    steps: Steps,
    exec_model: str,
    replica_policy: str,
    cost: _StepCost | None = None,
) -> tuple[Replay, StepTimes | None]:
    """The replay of ``steps`` (totals) and, when ``cost`` is given, its per-step times."""
    if exec_model not in EXEC_MODELS:
        raise InputError("--exec", "exec_model", f"one of {', '.join(EXEC_MODELS)}",
                         repr(exec_model))
    if replica_policy not in REPLICA_POLICIES:
        raise InputError("--replica-policy", "replica_policy",
                         f"one of {', '.join(REPLICA_POLICIES)}", repr(replica_policy))
    check_compatible(placement, trace, cluster)
    if steps.num_gpus != cluster.num_gpus or steps.num_tokens > trace.num_tokens:
        raise InputError("steps", "steps", f"steps of at most {trace.num_tokens} tokens on "
                         f"{cluster.num_gpus} GPUs", f"{steps.num_tokens} on {steps.num_gpus}")
    G, L, P = cluster.num_gpus, trace.num_layers, placement.num_slots
    totals = _Totals(L, G, P)
    tables = (None if placement.log2phy.shape[2] == 1
              else _replica_tables(placement, cluster.node_of_gpu, replica_policy))
    per_step: list[np.ndarray] = []
    for lo, hi in steps.chunks(CHUNK_TOKENS):
        begin, end = steps.bounds[lo], steps.bounds[hi]
        token = steps.order[begin:end]
        step = np.repeat(np.arange(hi - lo), np.diff(steps.bounds[lo:hi + 1]))
        times = _replay_chunk(placement, trace, cluster, token, step, hi - lo,
                              steps.home[begin:end], exec_model, tables, totals, cost)
        if cost is not None:
            per_step.append(times)
    result = totals.replay(exec_model, replica_policy, steps.num_tokens, cluster.node_of_gpu,
                           placement.slots_per_gpu)
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
        self.node_messages = np.zeros((2, 2, L, G), dtype=np.int64)  # exchange, sent/received
        self.moves = np.zeros((3, L), dtype=np.int64)               # all, cross-GPU, -node

    def replay(self, exec_model: str, replica_policy: str, num_tokens: int,
               node_of_gpu: np.ndarray, slots_per_gpu: int) -> Replay:
        L, G = self.load.shape
        active = self.used_slots.reshape(L, G, slots_per_gpu).sum(axis=2)
        dispatch, combine = (Exchange(self.matrix[i], *self.node_messages[i]) for i in (0, 1))
        return Replay(exec_model=exec_model, replica_policy=replica_policy,
                      num_tokens=num_tokens, node_of_gpu=node_of_gpu, load=self.load,
                      tokens_in=self.tokens_in, active_experts=active, dispatch=dispatch,
                      combine=combine, moves=self.moves[0], moves_cross_gpu=self.moves[1],
                      moves_cross_node=self.moves[2])


def _replay_chunk(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    token: np.ndarray,
    step: np.ndarray,
    num_steps: int,
    home: np.ndarray,
    exec_model: str,
    tables: tuple[np.ndarray, np.ndarray] | None,
    totals: _Totals,
    cost: _StepCost | None,
) -> np.ndarray | None:
    """Replay the tokens of a few whole steps through every layer.

    Args:
        token: int ``[n]`` trace indices of the chunk's tokens.
        step: int ``[n]`` step of each token within the chunk, in ``[0, num_steps)``.
        home: int ``[n]`` home GPU of each token.
        tables: ``_replica_tables``, or None when no expert has replicas.
        totals: accumulates the chunk's counts.

    Returns:
        float ``[5, num_steps, L]`` per step and layer: dispatch, compute and combine
        seconds, busiest GPU's load, mean GPU load; None without ``cost``.
    """
    G, L, n = cluster.num_gpus, trace.num_layers, token.shape[0]
    node_of_gpu = cluster.node_of_gpu
    slots_per_gpu, P = placement.slots_per_gpu, placement.num_slots
    log2phy = placement.log2phy
    ids_chunk = trace.topk_ids[token]                                     # [n, L, k]
    rows = np.arange(n)
    times = None if cost is None else np.zeros((5, num_steps, L))
    current = home
    for layer in range(L):
        ids = ids_chunk[:, layer, :].astype(np.int64)                     # [n, k]
        if tables is None:
            slot = log2phy[layer, ids, 0]
        else:
            where = (ids, current[:, None])
            slot = tables[0][layer][(*where, token[:, None] % tables[1][layer][where])]
        gpu = slot // slots_per_gpu                                       # [n, k]
        step_load = np.bincount((step[:, None] * G + gpu).ravel(),
                                minlength=num_steps * G).reshape(num_steps, G)
        totals.load[layer] += step_load.sum(axis=0)
        totals.used_slots[layer] |= np.bincount(slot.ravel(), minlength=P) > 0
        present = np.zeros((n, G), dtype=bool)                            # [n, G]
        present[rows[:, None], gpu] = True
        pairs = np.nonzero(present)                                       # (token, GPU)
        totals.tokens_in[layer] += np.bincount(pairs[1], minlength=G)
        dispatch = _scatter(current, pairs, n, node_of_gpu, step, num_steps)
        if exec_model == "follow":
            current = combine_gpu(gpu, current, G, trace.ordered)
            combine = _backwards(_scatter(current, pairs, n, node_of_gpu, step, num_steps))
        else:
            combine = _backwards(dispatch)
        for index, (matrix, messages) in enumerate((dispatch, combine)):
            totals.matrix[index, layer] += matrix
            totals.node_messages[index, :, layer] += (messages[2].sum(axis=0),
                                                      messages[3].sum(axis=0))
        cross_gpu = int(dispatch[0].sum())
        cross_node = int(np.where(node_of_gpu[:, None] != node_of_gpu[None, :],
                                  dispatch[0], 0).sum())
        totals.moves[:, layer] += (pairs[0].size, cross_gpu, cross_node)
        if cost is None:
            continue
        active = _active_slots(step, slot, num_steps, P, slots_per_gpu)
        times[0, :, layer] = cost.exchange(dispatch[1])
        times[1, :, layer] = cost.compute(step_load, active)
        times[2, :, layer] = cost.exchange(combine[1])
        times[3, :, layer] = step_load.max(axis=1)
        times[4, :, layer] = step_load.mean(axis=1)
    return times


def _active_slots(step: np.ndarray, slot: np.ndarray, num_steps: int, num_slots: int,
                  slots_per_gpu: int) -> np.ndarray:
    """int ``[num_steps, G]`` slots of each GPU that received a token in each step.

    Args:
        step: int ``[n]`` step of each token; slot: int ``[n, k]`` chosen slots.
    """
    step_slot = (step[:, None] * num_slots + slot).ravel()
    # (step, slot) // slots_per_gpu is (step, GPU) since P = G x slots per GPU. A dense
    # table is cheaper than sorting unless the chunk has many steps and few tokens each.
    if num_steps * num_slots <= 8 * step_slot.size:
        used = np.flatnonzero(np.bincount(step_slot, minlength=num_steps * num_slots))
    else:
        used = np.unique(step_slot)
    G = num_slots // slots_per_gpu
    return np.bincount(used // slots_per_gpu, minlength=num_steps * G).reshape(num_steps, G)


def _replica_tables(placement: Placement, node_of_gpu: np.ndarray, policy: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The replica choice as a lookup: the tier of replicas an expert's token on a GPU picks
    from (module docstring), for every (layer, expert, current GPU).

    Returns:
        members: int ``[L, E, G, X]`` the tier's slots in ascending order, padded.
        size: int ``[L, E, G]`` slots in the tier; a token t takes ``members[..., t mod
        size]``.
    """
    log2phy = placement.log2phy                                            # [L, E, X]
    G = placement.num_gpus
    valid = (log2phy >= 0)[:, :, None, :]                                  # [L, E, 1, X]
    if policy == "even":
        tier = np.broadcast_to(valid, (*log2phy.shape[:2], G, log2phy.shape[2]))
    else:
        slot_gpu = (np.where(log2phy >= 0, log2phy, 0) // placement.slots_per_gpu)[:, :, None]
        here = np.arange(G)[None, None, :, None]
        on_gpu = valid & (slot_gpu == here)
        on_node = valid & (node_of_gpu[slot_gpu] == node_of_gpu[here])
        tier = np.where(on_gpu.any(axis=3, keepdims=True), on_gpu,
                        np.where(on_node.any(axis=3, keepdims=True), on_node, valid))
    # Members first, keeping ascending slot order (a stable sort of "not a member").
    order = np.argsort(~tier, axis=3, kind="stable")
    members = np.take_along_axis(np.broadcast_to(log2phy[:, :, None, :], tier.shape), order,
                                 axis=3)
    return members, tier.sum(axis=3)


def _scatter(
    center: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], num_tokens: int,
    node_of_gpu: np.ndarray, step: np.ndarray, num_steps: int,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Messages from each token's ``center`` GPU to the other GPUs holding its replicas.

    Args:
        center: int ``[n]`` the GPU each token leaves from.
        pairs: int ``[m]`` tokens and int ``[m]`` GPUs: each distinct (token, GPU holding
            one of its chosen replicas) once.
        num_tokens: n.
        node_of_gpu: int ``[G]``.
        step: int ``[n]`` step of each token, in ``[0, num_steps)``.

    Returns:
        matrix: int ``[G, G]`` GPU-to-GPU messages of all steps (centre to destination,
            centre excluded).
        per step, each int ``[num_steps, G]``: messages each GPU sends and receives inside
        its node, cross-node messages sent by centres (one per token and distinct remote
        node) and those received, by the GPU of the centre's local index on the destination
        node (DeepEP's pairing).
    """
    G = node_of_gpu.shape[0]
    N = int(node_of_gpu.max()) + 1
    per_node = G // N
    token, dest = pairs
    source = center[token]
    away = dest != source
    token, dest, source = token[away], dest[away], source[away]          # one per message
    matrix = np.bincount(source * G + dest, minlength=G * G).reshape(G, G)
    inside = node_of_gpu[source] == node_of_gpu[dest]
    step_base = step[token][inside] * G
    intra_sent = _per_step(step_base + source[inside], num_steps, G)
    intra_received = _per_step(step_base + dest[inside], num_steps, G)
    remote_node = np.zeros((num_tokens, N), dtype=bool)                 # [n, N]
    remote_node[token[~inside], node_of_gpu[dest[~inside]]] = True
    token, node = np.nonzero(remote_node)
    source = center[token]
    step_base = step[token] * G
    node_sent = _per_step(step_base + source, num_steps, G)
    node_received = _per_step(step_base + node * per_node + source % per_node, num_steps, G)
    return matrix, (intra_sent, intra_received, node_sent, node_received)


def _per_step(step_gpu: np.ndarray, num_steps: int, num_gpus: int) -> np.ndarray:
    """int ``[num_steps, G]`` occurrences of each ``step x G + gpu`` index."""
    return np.bincount(step_gpu, minlength=num_steps * num_gpus).reshape(num_steps, num_gpus)


def _backwards(messages: tuple[np.ndarray, tuple[np.ndarray, ...]]
               ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The messages of ``_scatter`` sent the other way (combine mirrors dispatch): the
    matrix transposed, what a GPU sent it receives and the reverse."""
    matrix, (intra_sent, intra_received, node_sent, node_received) = messages
    return matrix.T, (intra_received, intra_sent, node_received, node_sent)


def evaluate(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    model: ModelSpec,
    exec_model: str = "return",
    replica_policy: str = "even",
    coefficients: CostCoefficients | None = None,
    steps: Steps | None = None,
    batching: str = "decode",
    concurrency: int | None = None,
    step_tokens: int | None = None,
) -> tuple[Replay, StepTimes]:
    """Replay ``trace`` through ``placement`` and predict the MoE layers' time step by step.

    The steps are ``steps`` when given, else ``moetuner.steps.make_steps(batching,
    concurrency, step_tokens)`` (default: decode, 128 x G running sequences). ``batching =
    "none"`` (without ``steps``) is the whole-trace average of ``costmodel.predict``: one
    step of ``tokens_per_gpu_batch x G`` tokens with the trace's counts scaled to it.
    """
    check_model(model, trace)
    if steps is None and batching == "none":
        result = replay(placement, trace, cluster, exec_model, replica_policy)
        return result, averaged_step(result, predict(result, model, cluster, coefficients))
    if steps is None:
        steps = make_steps(trace.seq_lens, trace.num_tokens, cluster.num_gpus, batching,
                           concurrency, step_tokens)
    return replay_steps(placement, trace, cluster, model, steps, exec_model, replica_policy,
                        coefficients)


def averaged_step(result: Replay, cost: CostBreakdown) -> StepTimes:
    """The whole-trace average as one step of the cost model's batch."""
    mean = result.load.mean(axis=1)
    scale = cost.batch_tokens / max(result.num_tokens, 1)
    return StepTimes(tokens=np.array([cost.batch_tokens]), dispatch=cost.dispatch[None],
                     compute=cost.compute[None], combine=cost.combine[None],
                     peak_load=result.load.max(axis=1)[None] * scale,
                     mean_load=mean[None] * scale, batching="none (whole-trace average)")


def evaluate_online(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    model: ModelSpec,
    policy: OnlinePolicy,
    steps: Steps,
    exec_model: str = "return",
    replica_policy: str = "even",
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
                                    steps.take(np.arange(first, last)), exec_model,
                                    replica_policy, coefficients)
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
    replica_policy: str = "even",
    coefficients: CostCoefficients | None = None,
    steps: Steps | None = None,
    batching: str = "decode",
    concurrency: int | None = None,
    step_tokens: int | None = None,
    online: OnlinePolicy | None = None,
) -> tuple[list[dict], dict[tuple[str, str], Replay]]:
    """Evaluate every placement under every execution model, with the speedup over ``linear``.

    ``linear`` without redundant experts (``linear_reference`` of the first placement) is added
    as the reference unless a placement is already named so. Steps as in ``evaluate``. With
    ``online``, every placement is also replayed online from its map (row ``NAME +
    online METHOD``, with the moves beside), except under ``batching = "none"`` (a single
    averaged batch: nothing to rebalance).

    Returns:
        rows: one dict of metrics per (execution model, placement), in that order.
        replays: (placement name, execution model) -> its replay.
    """
    check_model(model, trace)
    placements = dict(placements)
    if "linear" not in placements:
        first = next(iter(placements.values()), None)
        if first is None:
            raise InputError("placements", "placements", "at least one placement")
        placements = {"linear": linear_reference(first), **placements}
    if steps is None and batching != "none":
        steps = make_steps(trace.seq_lens, trace.num_tokens, cluster.num_gpus, batching,
                           concurrency, step_tokens)
    rows, replays = [], {}
    for exec_model in exec_models:
        first_row = len(rows)
        for name, placement in placements.items():
            runs = [(name, *evaluate(placement, trace, cluster, model, exec_model,
                                     replica_policy, coefficients, steps, batching), None)]
            if online is not None and steps is not None:
                runs.append((f"{name} + {online.name}",
                             *evaluate_online(placement, trace, cluster, model, online, steps,
                                              exec_model, replica_policy, coefficients)))
            for label, result, times, moves in runs:
                replays[label, exec_model] = result
                rows.append({"placement": label, "slots_per_gpu": placement.slots_per_gpu,
                             **result.summary(),
                             "traffic_bytes": float(result.traffic.sum() * model.token_bytes),
                             **times.summary(),
                             **({} if moves is None else moves.summary())})
        linear_time = rows[first_row]["mean_step_time_s"]
        for row in rows[first_row:]:
            row["speedup_vs_linear"] = (linear_time / row["mean_step_time_s"]
                                        if row["mean_step_time_s"] else float("inf"))
    return rows, replays
