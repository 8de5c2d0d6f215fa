"""Replay a routing trace through a placement: per-GPU load and token traffic, layer by layer.

The replay is pure numpy over the trace's ``topk_ids [T, L, k]``: one vectorised pass per
MoE layer (no Python loop over tokens). ``replay`` returns the counts, ``predict`` (in
``moetuner.costmodel``) turns them into predicted time, ``evaluate`` does both.

Replica choice, per (token t, layer l, chosen expert e) with the replicas of e listed in
ascending slot order (``Placement.log2phy``):

- ``even`` (vLLM): replica number ``t mod replicas(e)``, a hash of the token index.
- ``nearest`` (SGLang's default): the replicas on the token's current GPU if there are any,
  else those on its current node, else all replicas; among that tier, number
  ``t mod size(tier)``.

Every token t has a home GPU ``t mod G`` (data-parallel attention spreads tokens evenly); a
caller may pass other homes. Execution models (section 4 of the brief):

- ``return``: in every layer the token leaves from its home GPU h. Dispatch sends its
  activation once to each distinct GPU holding one of its k chosen replicas, other than h;
  combine sends one result back to h from each of those GPUs. Two exchanges per layer.
- ``follow``: before layer 0 the token sits on its home GPU. In layer l it sits on GPU c
  (home for l = 0, else the GPU of its primary expert's replica in layer l - 1). Dispatch
  sends its activation from c once to each distinct GPU of its k chosen replicas, other than
  c. The results are combined on p, the GPU of the replica of its primary (first) expert:
  each distinct expert GPU other than p sends one partial result to p. The token then sits
  on p for layer l + 1. A layer costs one dispatch exchange plus a combine exchange that
  carries only the partial results of the k - 1 non-primary experts (none when k = 1 or
  when they ran on p), so with top-1 routing a layer is exactly one exchange. After the last
  layer the token stays on p (the return home for the next step is not counted).

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

from dataclasses import dataclass

import numpy as np

from moetuner.cluster import Cluster
from moetuner.costmodel import CostBreakdown, CostCoefficients, predict
from moetuner.errors import InputError
from moetuner.methods.linear import linear_phy2log
from moetuner.models import ModelSpec, model_with_shape
from moetuner.placement import Placement
from moetuner.trace import Trace

EXEC_MODELS = ("return", "follow")
REPLICA_POLICIES = ("even", "nearest")


@dataclass(frozen=True)
class Exchange:
    """One all-to-all step of every layer (dispatch or combine), counted in token messages.

    Attributes:
        tokens: int ``[L, G, G]`` messages from GPU (row) to GPU (column); diagonal 0.
        node_sent: int ``[L, G]`` cross-node messages each GPU sends (one per token and
            distinct remote node, as DeepEP does).
        node_received: int ``[L, G]`` cross-node messages each GPU receives.
    """

    tokens: np.ndarray
    node_sent: np.ndarray
    node_received: np.ndarray


@dataclass(frozen=True)
class Replay:
    """What a trace does on a placement under one execution model and replica policy.

    Attributes:
        exec_model: ``return`` or ``follow``.
        replica_policy: ``even`` or ``nearest``.
        num_tokens: tokens replayed (T).
        node_of_gpu: int ``[G]`` node of each GPU.
        load: int ``[L, G]`` token-expert pairs computed by each GPU.
        tokens_in: int ``[L, G]`` distinct tokens each GPU computes for.
        active_experts: int ``[L, G]`` slots of each GPU that received at least one token.
        dispatch: tokens sent to the experts' GPUs.
        combine: results sent back (``return``) or to the primary expert's GPU (``follow``).
        moves: int ``[L]`` (token, distinct destination GPU) pairs of dispatch.
        moves_cross_gpu: int ``[L]`` of those, destinations other than the token's GPU.
        moves_cross_node: int ``[L]`` of those, destinations on another node.
    """

    exec_model: str
    replica_policy: str
    num_tokens: int
    node_of_gpu: np.ndarray
    load: np.ndarray
    tokens_in: np.ndarray
    active_experts: np.ndarray
    dispatch: Exchange
    combine: Exchange
    moves: np.ndarray
    moves_cross_gpu: np.ndarray
    moves_cross_node: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_gpus(self) -> int:
        return int(self.load.shape[1])

    @property
    def imbalance_per_layer(self) -> np.ndarray:
        """``[L]`` max GPU load / mean GPU load (1.0 is perfect; 1.0 for an empty layer)."""
        mean = self.load.mean(axis=1)
        return np.divide(self.load.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)

    @property
    def imbalance(self) -> float:
        return float(self.imbalance_per_layer.mean())

    @property
    def balancedness(self) -> float:
        """Sum over layers of mean GPU load / sum of max GPU load (1.0 is perfect)."""
        peak = float(self.load.max(axis=1).sum())
        return float(self.load.mean(axis=1).sum()) / peak if peak else 1.0

    @property
    def tokens_received(self) -> np.ndarray:
        """``[L, G]`` tokens each GPU receives from other GPUs in dispatch."""
        return self.dispatch.tokens.sum(axis=1)

    @property
    def traffic(self) -> np.ndarray:
        """``[L, G, G]`` token messages of dispatch and combine together."""
        return self.dispatch.tokens + self.combine.tokens

    @property
    def share_cross_gpu(self) -> float:
        return _share(self.moves_cross_gpu, self.moves)

    @property
    def share_cross_node(self) -> float:
        return _share(self.moves_cross_node, self.moves)

    def traffic_bytes(self, model: ModelSpec) -> np.ndarray:
        """``[L, G, G]`` bytes of dispatch and combine (one token activation per message)."""
        return self.traffic * model.token_bytes

    def summary(self) -> dict:
        """The scalar metrics, for tables and JSON."""
        return {
            "exec_model": self.exec_model,
            "replica_policy": self.replica_policy,
            "tokens": self.num_tokens,
            "imbalance": self.imbalance,
            "balancedness": self.balancedness,
            "share_cross_gpu": self.share_cross_gpu,
            "share_cross_node": self.share_cross_node,
            "traffic_tokens": int(self.traffic.sum()),
            "node_messages": int(self.dispatch.node_sent.sum() + self.combine.node_sent.sum()),
        }


def _share(part: np.ndarray, whole: np.ndarray) -> float:
    total = int(whole.sum())
    return int(part.sum()) / total if total else 0.0


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
) -> Replay:
    """Replay ``trace`` through ``placement`` on ``cluster`` (semantics: module docstring).

    Args:
        placement: ``phy2log [L, P]`` on G GPUs; replicas and empty slots (-1) allowed.
        trace: ``topk_ids [T, L, k]`` with the placement's E and L.
        cluster: G GPUs on N nodes.
        exec_model: ``return`` or ``follow``.
        replica_policy: ``even`` or ``nearest``.
        home: int ``[T]`` home GPU of each token; default ``t mod G``.
    """
    if exec_model not in EXEC_MODELS:
        raise InputError("--exec", "exec_model", f"one of {', '.join(EXEC_MODELS)}",
                         repr(exec_model))
    if replica_policy not in REPLICA_POLICIES:
        raise InputError("--replica-policy", "replica_policy",
                         f"one of {', '.join(REPLICA_POLICIES)}", repr(replica_policy))
    check_compatible(placement, trace, cluster)
    G, L, T = cluster.num_gpus, trace.num_layers, trace.num_tokens
    token = np.arange(T)
    home = token % G if home is None else np.asarray(home, dtype=np.int64)
    if home.shape != (T,) or (T and (home.min() < 0 or home.max() >= G)):
        raise InputError("home", "home", f"GPU ids in [0, {G}) for each of {T} tokens",
                         list(home.shape))
    node_of_gpu = cluster.node_of_gpu
    log2phy, logcnt = placement.log2phy, placement.logcnt
    slots_per_gpu = placement.slots_per_gpu

    load = np.zeros((L, G), dtype=np.int64)
    tokens_in = np.zeros((L, G), dtype=np.int64)
    active = np.zeros((L, G), dtype=np.int64)
    dispatch = _empty_exchange(L, G)
    combine = _empty_exchange(L, G)
    moves = np.zeros((3, L), dtype=np.int64)  # all, cross-GPU, cross-node
    current = home
    for layer in range(L):
        ids = trace.topk_ids[:, layer, :].astype(np.int64)               # [T, k]
        slot = _choose_replicas(ids, token, current, log2phy[layer], logcnt[layer],
                                slots_per_gpu, node_of_gpu, replica_policy)
        gpu = slot // slots_per_gpu                                      # [T, k]
        load[layer] = np.bincount(gpu.ravel(), minlength=G)
        used = np.bincount(slot.ravel(), minlength=placement.num_slots) > 0
        active[layer] = used.reshape(G, slots_per_gpu).sum(axis=1)
        present = np.zeros((T, G), dtype=bool)                           # [T, G]
        present[token[:, None], gpu] = True
        tokens_in[layer] = present.sum(axis=0)
        sent = _scatter(current, present, node_of_gpu)
        _store(dispatch, layer, *sent)
        moves[:, layer] = (tokens_in[layer].sum(), sent[0].sum(),
                           sent[0][node_of_gpu[:, None] != node_of_gpu[None, :]].sum())
        if exec_model == "return":
            matrix, centre_messages, relay_messages = sent
        else:
            primary = gpu[:, 0]
            matrix, centre_messages, relay_messages = _scatter(primary, present, node_of_gpu)
            current = primary
        # Combine runs the same messages backwards: relays send, centres receive.
        _store(combine, layer, matrix.T, relay_messages, centre_messages)
    return Replay(exec_model=exec_model, replica_policy=replica_policy, num_tokens=T,
                  node_of_gpu=node_of_gpu, load=load, tokens_in=tokens_in, active_experts=active,
                  dispatch=dispatch, combine=combine, moves=moves[0], moves_cross_gpu=moves[1],
                  moves_cross_node=moves[2])


def _empty_exchange(num_layers: int, num_gpus: int) -> Exchange:
    return Exchange(np.zeros((num_layers, num_gpus, num_gpus), dtype=np.int64),
                    np.zeros((num_layers, num_gpus), dtype=np.int64),
                    np.zeros((num_layers, num_gpus), dtype=np.int64))


def _store(exchange: Exchange, layer: int, matrix: np.ndarray, node_sent: np.ndarray,
           node_received: np.ndarray) -> None:
    exchange.tokens[layer] = matrix
    exchange.node_sent[layer] = node_sent
    exchange.node_received[layer] = node_received


def _choose_replicas(
    ids: np.ndarray,
    token: np.ndarray,
    current: np.ndarray,
    log2phy: np.ndarray,
    logcnt: np.ndarray,
    slots_per_gpu: int,
    node_of_gpu: np.ndarray,
    policy: str,
) -> np.ndarray:
    """Physical slot serving each chosen expert of one layer.

    Args:
        ids: int ``[T, k]`` chosen experts.
        token: int ``[T]`` token indices (the hash of ``even`` and the spread of ``nearest``).
        current: int ``[T]`` GPU each token sits on.
        log2phy: int ``[E, X]`` slots of each expert, ascending, padded with -1.
        logcnt: int ``[E]`` replicas of each expert.

    Returns:
        int ``[T, k]`` chosen slots.
    """
    slot = log2phy[ids, 0]
    multi = logcnt[ids] > 1                                              # [T, k]
    if not multi.any():
        return slot
    # Only experts with replicas need a choice: work on those (token, expert) pairs alone.
    experts = ids[multi]                                                 # [M]
    tokens = np.broadcast_to(token[:, None], ids.shape)[multi]
    candidates = log2phy[experts]                                        # [M, X]
    valid = candidates >= 0
    if policy == "even":
        tier = valid
    else:
        here = np.broadcast_to(current[:, None], ids.shape)[multi][:, None]
        cand_gpu = np.where(valid, candidates // slots_per_gpu, 0)
        on_gpu = valid & (cand_gpu == here)
        on_node = valid & (node_of_gpu[cand_gpu] == node_of_gpu[here])
        tier = np.where(on_gpu.any(axis=1, keepdims=True), on_gpu,
                        np.where(on_node.any(axis=1, keepdims=True), on_node, valid))
    rank = tokens % tier.sum(axis=1)                                     # [M]
    # The rank-th member of the tier, in ascending slot order.
    pick = tier & (np.cumsum(tier, axis=1) - 1 == rank[:, None])
    slot[multi] = candidates[np.arange(len(experts)), pick.argmax(axis=1)]
    return slot


def _scatter(
    center: np.ndarray, present: np.ndarray, node_of_gpu: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Messages from each token's ``center`` GPU to the other GPUs it is ``present`` on.

    Args:
        center: int ``[T]`` the GPU each token leaves from.
        present: bool ``[T, G]`` the GPUs holding one of the token's chosen replicas.
        node_of_gpu: int ``[G]``.

    Returns:
        matrix: int ``[G, G]`` GPU-to-GPU messages (centre to destination, centre excluded).
        node_sent: int ``[G]`` cross-node messages sent by centres, one per token and
            distinct remote node.
        node_received: int ``[G]`` those messages received, by the GPU of the centre's local
            index on the destination node (DeepEP's pairing).
    """
    T, G = present.shape
    N = int(node_of_gpu.max()) + 1
    per_node = G // N
    token, dest = np.nonzero(present)                                   # one per message
    matrix = np.bincount(center[token] * G + dest, minlength=G * G).reshape(G, G)
    np.fill_diagonal(matrix, 0)
    remote_node = present.reshape(T, N, per_node).any(axis=2)           # [T, N]
    remote_node[np.arange(T), node_of_gpu[center]] = False
    token, node = np.nonzero(remote_node)
    per_source = np.bincount(center[token] * N + node, minlength=G * N).reshape(G, N)
    receivers = np.arange(N)[None, :] * per_node + (np.arange(G) % per_node)[:, None]
    return (matrix, per_source.sum(axis=1),
            np.bincount(receivers.ravel(), weights=per_source.ravel(), minlength=G
                        ).astype(np.int64))

def evaluate(
    placement: Placement,
    trace: Trace,
    cluster: Cluster,
    model: ModelSpec,
    exec_model: str = "return",
    replica_policy: str = "even",
    coefficients: CostCoefficients | None = None,
) -> tuple[Replay, CostBreakdown]:
    """Replay ``trace`` through ``placement`` and predict the MoE layers' time per batch."""
    check_model(model, trace)
    result = replay(placement, trace, cluster, exec_model, replica_policy)
    return result, predict(result, model, cluster, coefficients)


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
) -> tuple[list[dict], dict[tuple[str, str], Replay]]:
    """Evaluate every placement under every execution model, with the speedup over ``linear``.

    ``linear`` without redundant experts (``linear_reference`` of the first placement) is added
    as the reference unless a placement is already named so.

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
    rows, replays = [], {}
    for exec_model in exec_models:
        times = {}
        for name, placement in placements.items():
            result, cost = evaluate(placement, trace, cluster, model, exec_model,
                                    replica_policy, coefficients)
            replays[name, exec_model] = result
            times[name] = cost.total
            rows.append({"placement": name, "slots_per_gpu": placement.slots_per_gpu,
                         **result.summary(),
                         "traffic_bytes": float(result.traffic.sum() * model.token_bytes),
                         **cost.summary()})
        for row in rows[-len(placements):]:
            row["speedup_vs_linear"] = (times["linear"] / row["moe_time_per_batch_s"]
                                        if row["moe_time_per_batch_s"] else float("inf"))
    return rows, replays
