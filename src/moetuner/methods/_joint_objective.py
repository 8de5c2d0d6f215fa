"""The objective of the ``joint`` method: the mean step time over sampled engine steps.

Each workload (a profile) carries engine steps sampled token by token from its trace
(``moetuner.profile.StepSample``: decode continuous batching at C running sequences, or
prefill chunks, formed as the evaluator forms them). For a placement, every sampled step s
and layer l is costed with the shared per-step semantics of the cost model, counting only
that step's tokens:

- replica choice: the engine's policy (``even`` or ``nearest``, ``moetuner.evaluate``);
- ``pairs[g]``: token-expert pairs on GPU g; ``active[g]``: distinct slots of GPU g that
  received a token; compute = max_g ``costmodel.gpu_compute_time(pairs, active)``;
- dispatch: a token leaves its centre GPU (``return``: its home; ``follow``: where the layer
  before combined it) once to each distinct other GPU holding one of its chosen replicas;
  across nodes DeepEP sends one message per token and remote node, received by the GPU of
  the sender's local index; combine runs the same messages back (``return``) or gathers the
  partial results on the combine GPU (``follow``: ``moetuner.steps.combine_gpu``, the primary
  expert's GPU for an ordered trace, the GPU holding most of the token's experts otherwise);
  each exchange costs ``costmodel.exchange_time`` with one token activation per message;
- step time = sum over layers of dispatch + compute + combine.

The objective of one workload is the mean step time over its sampled steps; several
workloads give their weighted mean (``robust="mean"``) or the worst (``"max"``). The same
function scores the warm starts, the search's candidate moves (layer by layer), the exact
solver's candidates and the result, and ``lower_bound`` bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetuner.cluster import Cluster
from moetuner.costmodel import CostCoefficients, exchange_time, gpu_compute_time
from moetuner.errors import InputError
from moetuner.models import MODELS, ModelSpec, model_with_shape
from moetuner.profile import STEP_ENTRIES, Profile, StepSample
from moetuner.steps import DEFAULT_SEQUENCES_PER_GPU, combine_gpu

# A stand-in model for shapes no preset matches (a mid-size BF16 MoE).
GENERIC_MODEL = ModelSpec("generic", "-", 1, (), 1, 1, 4096, 2048)
ROBUST = ("mean", "max")
EXEC_MODELS = ("return", "follow")
REPLICA_POLICIES = ("even", "nearest")


@dataclass(frozen=True)
class StepProblem:
    """Everything the objective needs, for Q workloads of L layers x E experts on G GPUs.

    Attributes:
        samples: Q sampled steps (``StepSample``), one per workload.
        homes: Q int64 ``[n_q]`` home GPU of each sampled token.
        weights: ``[Q]`` workload weights, summing to 1.
        robust: ``mean`` or ``max`` over workloads.
        exec_model: ``return`` or ``follow``.
        replica_policy: ``even`` or ``nearest``.
        num_gpus, num_nodes, slots_per_gpu, num_experts: G, N, P / G and E.
        model: the model whose sizes give the costs.
        hw: ``CostCoefficients.resolved(cluster)``.
        coefficients: the cost model's coefficients.
    """

    samples: list[StepSample]
    homes: list[np.ndarray]
    weights: np.ndarray
    robust: str
    exec_model: str
    replica_policy: str
    num_gpus: int
    num_nodes: int
    slots_per_gpu: int
    num_experts: int
    model: ModelSpec
    hw: dict
    coefficients: CostCoefficients

    @property
    def num_profiles(self) -> int:
        return len(self.samples)

    @property
    def num_layers(self) -> int:
        return int(self.samples[0].ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.samples[0].ids.shape[2])

    @property
    def node_of_gpu(self) -> np.ndarray:
        return np.arange(self.num_gpus) // (self.num_gpus // self.num_nodes)

    def combine(self, means: np.ndarray) -> float:
        """The objective from ``[Q]`` per-workload mean step times (weighted mean or max)."""
        return float(means.max() if self.robust == "max" else means @ self.weights)


def model_for(profile: Profile, name: str | None = None) -> ModelSpec:
    """The model whose costs weigh the objective: ``name``, else the preset with the
    profile's (layers, experts, k), else ``GENERIC_MODEL``."""
    if name is not None:
        if name not in MODELS:
            raise InputError("params", "model", f"one of {', '.join(MODELS)}", repr(name))
        return MODELS[name]
    model = model_with_shape(profile.num_layers, profile.num_experts, profile.top_k)
    return GENERIC_MODEL if model is None else model


def build_problem(
    profiles: list[Profile],
    weights: np.ndarray,
    cluster: Cluster,
    slots_per_gpu: int,
    exec_model: str,
    robust: str,
    model: ModelSpec,
    coefficients: CostCoefficients | None = None,
    replica_policy: str = "even",
) -> StepProblem:
    """The objective's data from profiles with sampled steps (module docstring)."""
    if exec_model not in EXEC_MODELS:
        raise InputError("--exec", "exec_model", f"one of {', '.join(EXEC_MODELS)}",
                         repr(exec_model))
    if robust not in ROBUST:
        raise InputError("--robust", "robust", f"one of {', '.join(ROBUST)}", repr(robust))
    if replica_policy not in REPLICA_POLICIES:
        raise InputError("params", "replica_policy", f"one of {', '.join(REPLICA_POLICIES)}",
                         repr(replica_policy))
    first = profiles[0]
    for other in profiles:
        if other.load.shape != first.load.shape or other.top_k != first.top_k:
            raise InputError(other.source, "load", f"the shape {list(first.load.shape)} and "
                             f"k = {first.top_k} of {first.source}",
                             f"{list(other.load.shape)}, k = {other.top_k}")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(profiles),) or (weights < 0).any() or weights.sum() <= 0:
        raise InputError("params", "weights", f"{len(profiles)} non-negative weights, not all 0",
                         weights.tolist())
    c = coefficients or CostCoefficients()
    G = cluster.num_gpus
    samples = [p.steps if p.steps is not None and p.steps.num_steps else steps_from_load(p, G)
               for p in profiles]
    return StepProblem(
        samples=samples, homes=[sample.home(G) for sample in samples],
        weights=weights / weights.sum(), robust=robust, exec_model=exec_model,
        replica_policy=replica_policy, num_gpus=G, num_nodes=cluster.num_nodes,
        slots_per_gpu=slots_per_gpu, num_experts=first.num_experts, model=model,
        hw=c.resolved(cluster), coefficients=c)


def steps_from_load(profile: Profile, num_gpus: int, count: int = 32, seed: int = 0
                    ) -> StepSample:
    """Decode steps for a profile without sampled steps (e.g. loads only): ``count`` steps
    of 128 x G tokens (fewer to stay within ``STEP_ENTRIES``), each token's k experts drawn
    without replacement in proportion to the layer's loads, independently per layer and
    token (no co-activation is known)."""
    L, E, k = profile.num_layers, profile.num_experts, profile.top_k
    per_step = DEFAULT_SEQUENCES_PER_GPU * num_gpus
    count = max(1, min(count, STEP_ENTRIES // (per_step * L * max(k, E // 4))))
    n = count * per_step
    rng = np.random.default_rng(seed)
    log_load = np.log(np.maximum(profile.load.astype(np.float64), 1e-12))      # [L, E]
    ids = np.empty((n, L, k), dtype=np.uint16)
    for layer in range(L):
        # Gumbel top-k: k distinct experts drawn in proportion to load, heaviest first.
        keys = log_load[layer] + rng.gumbel(size=(n, E))
        ids[:, layer] = np.argsort(-keys, axis=1)[:, :k]
    token = np.arange(n, dtype=np.int64)
    return StepSample(ids=ids, bounds=np.arange(0, n + 1, per_step, dtype=np.int64),
                      slot=token % per_step, token=token, batching="decode",
                      concurrency=per_step)


def replica_table(row: np.ndarray, num_experts: int, num_gpus: int, node_of_gpu: np.ndarray,
                  policy: str) -> tuple[np.ndarray, np.ndarray]:
    """The engine's replica choice for one layer's ``row [P]`` as a lookup (the evaluator's
    rule, ``moetuner.evaluate``): a token t on GPU c choosing expert e takes slot
    ``members[e, c, t mod size[e, c]]``.

    ``even`` (vLLM): the tier is all of e's slots; ``nearest`` (SGLang): those on GPU c if
    any, else those on c's node, else all. Tiers list slots in ascending order.

    Returns:
        members: int ``[E, G, X]`` each tier's slots, padded; size: int ``[E, G]``.
    """
    P = row.size
    order = np.argsort(row, kind="stable")
    counts = np.bincount(row, minlength=num_experts)
    rank = np.arange(P) - (np.cumsum(counts) - counts)[row[order]]
    log2phy = np.full((num_experts, max(int(counts.max()), 1)), -1, dtype=np.int64)
    log2phy[row[order], rank] = order                                         # [E, X]
    valid = (log2phy >= 0)[:, None, :]                                        # [E, 1, X]
    tier = np.broadcast_to(valid, (num_experts, num_gpus, log2phy.shape[1]))
    if policy == "nearest":
        slot_gpu = (np.maximum(log2phy, 0) // (P // num_gpus))[:, None, :]   # [E, 1, X]
        here = np.arange(num_gpus)[None, :, None]
        on_gpu = valid & (slot_gpu == here)
        on_node = valid & (node_of_gpu[slot_gpu] == node_of_gpu[here])
        tier = np.where(on_gpu.any(axis=2, keepdims=True), on_gpu,
                        np.where(on_node.any(axis=2, keepdims=True), on_node, valid))
    # Members first, in ascending slot order (a stable sort of "not a member").
    pick = np.argsort(~tier, axis=2, kind="stable")
    members = np.take_along_axis(np.broadcast_to(log2phy[:, None, :], tier.shape), pick,
                                 axis=2)
    return members, tier.sum(axis=2)


@dataclass(frozen=True)
class LayerCounts:
    """What one layer does in every sampled step, counted over a set of tokens; counts of
    disjoint token sets add (``+``, ``-``), so a move is re-counted on the tokens it
    touches only.

    Attributes:
        slot_pairs: ``[S, P]`` token-expert pairs each slot computes per step.
        dispatch: four ``[S, G]`` message counts of dispatch: intra-node sent, intra-node
            received, cross-node sent, cross-node received.
        combine: the same for combine (``follow``), or None (``return``: the dispatch
            messages run back).
    """

    slot_pairs: np.ndarray
    dispatch: tuple[np.ndarray, ...]
    combine: tuple[np.ndarray, ...] | None

    def __add__(self, other: LayerCounts) -> LayerCounts:
        return self._merge(other, 1.0)

    def __sub__(self, other: LayerCounts) -> LayerCounts:
        return self._merge(other, -1.0)

    def _merge(self, other: LayerCounts, sign: float) -> LayerCounts:
        combine = None if self.combine is None else tuple(
            a + sign * b for a, b in zip(self.combine, other.combine, strict=True))
        return LayerCounts(self.slot_pairs + sign * other.slot_pairs,
                           tuple(a + sign * b for a, b in zip(self.dispatch, other.dispatch,
                                                              strict=True)), combine)


def layer_counts(problem: StepProblem, q: int, layer: int, row: np.ndarray,
                 position: np.ndarray, tokens: np.ndarray | None = None
                 ) -> tuple[LayerCounts, np.ndarray]:
    """Count one layer of workload q over ``tokens`` (indices into the sample; all when
    None).

    Args:
        row: int ``[P]`` the layer's placement (expert per slot).
        position: int64 ``[m]`` GPU each of those tokens sits on entering the layer (its
            home under ``return``).

    Returns:
        The counts, and int64 ``[m]`` the GPU each token sits on after the layer (``follow``:
        its combine GPU; ``return``: ``position``).
    """
    sample = problem.samples[q]
    G, N, spg = problem.num_gpus, problem.num_nodes, problem.slots_per_gpu
    S, P = sample.num_steps, G * spg
    node = problem.node_of_gpu
    if tokens is None:
        ids, token, step = sample.ids[:, layer, :], sample.token, sample.step_of
    else:
        ids, token, step = (sample.ids[tokens, layer, :], sample.token[tokens],
                            sample.step_of[tokens])
    ids = ids.astype(np.int64)                                                 # [m, k]
    members, size = replica_table(np.asarray(row, dtype=np.int64), problem.num_experts, G,
                                  node, problem.replica_policy)
    here = position[:, None]
    slot = members[ids, here, token[:, None] % size[ids, here]]
    gpu = slot // spg                                                          # [m, k]
    slot_pairs = np.bincount((step[:, None] * P + slot).ravel(), minlength=S * P)
    m = ids.shape[0]
    present = np.zeros((m, G), dtype=bool)
    present[np.arange(m)[:, None], gpu] = True
    dispatch = _messages(present, position, step, S, node, N)
    if problem.exec_model == "return":
        return LayerCounts(slot_pairs.reshape(S, P).astype(np.float64), dispatch, None), position
    centre = combine_gpu(gpu, position, G, sample.ordered)
    combine = _messages(present, centre, step, S, node, N)
    return (LayerCounts(slot_pairs.reshape(S, P).astype(np.float64), dispatch, combine),
            centre)


def counts_cost(problem: StepProblem, counts: LayerCounts) -> np.ndarray:
    """``[S]`` seconds of dispatch + slowest GPU compute + combine per step."""
    G, spg = problem.num_gpus, problem.slots_per_gpu
    m, c, hw = problem.model, problem.coefficients, problem.hw
    per_slot = counts.slot_pairs.reshape(-1, G, spg)
    pairs, active = per_slot.sum(axis=2), (per_slot > 0.5).sum(axis=2)
    compute = gpu_compute_time(pairs, active, m, hw, c).max(axis=1)
    dispatch = exchange_time(*counts.dispatch, hw, c, m.token_bytes)
    if counts.combine is None:
        # Combine runs the same messages back: max(sent, received) is the same per GPU.
        return compute + 2 * dispatch
    sent, received, node_sent, node_received = counts.combine
    return compute + dispatch + exchange_time(received, sent, node_received, node_sent, hw,
                                              c, m.token_bytes)


def layer_step_costs(problem: StepProblem, q: int, layer: int, row: np.ndarray,
                     position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[S]`` seconds of one layer in every sampled step of workload q (module docstring),
    and int64 ``[n]`` where each token sits after it (``layer_counts``)."""
    counts, after = layer_counts(problem, q, layer, row, position)
    return counts_cost(problem, counts), after


def _messages(present: np.ndarray, centre: np.ndarray, step: np.ndarray, num_steps: int,
              node: np.ndarray, num_nodes: int) -> tuple[np.ndarray, ...]:
    """Per-step messages from each token's ``centre`` GPU to the other GPUs it is
    ``present [m, G]`` on (``step [m]``: each token's step): ``[S, G]`` intra-node sent,
    intra-node received, cross-node sent and cross-node received (DeepEP: one per token and
    remote node, received by the GPU of the sender's local index)."""
    m, G = present.shape
    per_node = G // num_nodes
    S = num_steps
    local = node[None, :] == node[centre][:, None]                            # [m, G]
    intra = present & local
    intra[np.arange(m), centre] = False
    key = step * G + centre                                                    # [m]
    intra_sent = np.bincount(key, weights=intra.sum(axis=1), minlength=S * G)
    token, dest = np.nonzero(intra)
    intra_received = np.bincount(step[token] * G + dest, minlength=S * G)
    remote = present.reshape(m, num_nodes, per_node).any(axis=2)             # [m, N]
    remote[np.arange(m), node[centre]] = False
    node_sent = np.bincount(key, weights=remote.sum(axis=1), minlength=S * G)
    token, dest = np.nonzero(remote)
    receiver = dest * per_node + centre[token] % per_node
    node_received = np.bincount(step[token] * G + receiver, minlength=S * G)
    return tuple(a.reshape(S, G).astype(np.float64) for a in (
        intra_sent, intra_received, node_sent, node_received))


def step_costs(problem: StepProblem, phy2log: np.ndarray, q: int) -> np.ndarray:
    """``[L, S]`` seconds of every layer in every sampled step of workload q."""
    position = problem.homes[q]
    out = np.empty((problem.num_layers, problem.samples[q].num_steps))
    for layer in range(problem.num_layers):
        out[layer], position = layer_step_costs(problem, q, layer, phy2log[layer], position)
    return out


def workload_means(problem: StepProblem, phy2log: np.ndarray) -> np.ndarray:
    """``[Q]`` mean step time (seconds) of each workload."""
    return np.array([step_costs(problem, phy2log, q).sum(axis=0).mean()
                     for q in range(problem.num_profiles)])


def objective(problem: StepProblem, phy2log: np.ndarray) -> float:
    """The objective (mean step seconds; weighted mean or max over workloads)."""
    return problem.combine(workload_means(problem, phy2log))


def lower_bound(problem: StepProblem, num_redundant: int) -> float:
    """A lower bound on ``objective`` over all placements with ``num_redundant`` replicas.

    Per step and layer, the slowest GPU computes at least the mean pairs, at least the
    hottest expert's pairs over its most possible copies min(G, R + 1), and reads at least
    the step's used experts over G (rounded up); exchanges cost at least nothing.
    """
    G = problem.num_gpus
    copies = min(G, num_redundant + 1)
    m, c, hw = problem.model, problem.coefficients, problem.hw
    means = []
    for sample in problem.samples:
        S, L, E = sample.num_steps, problem.num_layers, problem.num_experts
        step = np.repeat(sample.step_of[:, None, None], L, axis=1)
        layer = np.arange(L)[None, :, None]
        index = (step * L + layer) * E + sample.ids.astype(np.int64)
        counts = np.bincount(index.ravel(), minlength=S * L * E).reshape(S, L, E)
        pairs = np.maximum(counts.sum(axis=2) / G, counts.max(axis=2) / copies)
        active = np.ceil((counts > 0).sum(axis=2) / G)
        means.append(gpu_compute_time(pairs, active, m, hw, c).sum(axis=1).mean())
    return problem.combine(np.array(means))
