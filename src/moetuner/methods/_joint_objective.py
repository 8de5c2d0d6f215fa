"""The objective of the ``joint`` method: a pairwise surrogate of the predicted MoE-layer time.

For one profile p (T tokens, top-k) on G GPUs in N nodes, a placement gives every expert e of
layer l the fractions ``X_l[e, g]`` of its tokens served on GPU g (replicas split an expert's
tokens evenly, as vLLM's hashing does; ``Y_l = X_l`` summed per node). The predicted time of
layer l for one batch of ``batch_tokens`` tokens (``scale = batch_tokens / T``) is

    max_g (c_pair * scale * load_l @ X_l)[g]                         slowest GPU's expert work
    + u_gpu  * (cg_l * D_gpu_l  - s_l * Stay_gpu_l  - t_l * T)        messages between GPUs
    + u_node * (cn_l * D_node_l - s_l * Stay_node_l - t_l * T)        extra cost across nodes

with ``u_gpu = scale * c_intra / G`` (a message's NVLink time, averaged over the G GPUs that
send in parallel) and ``u_node = scale * max(c_inter - c_intra, 0) / G`` (0 on one node), so a
cross-node message costs the bandwidth ratio times an intra-node one. The terms:

- ``D_gpu_l = k T - (2/k) R_gpu_l``: expected (token, distinct GPU) pairs, where ``R_gpu_l =
  sum over expert pairs i < j of coactivation[l, i, j] * (X_l X_l^T)[i, j]`` counts tokens
  whose two chosen experts share a GPU. The estimate is anchored at the primary expert (a
  token uses at most 1 + (non-primary experts off the primary's GPU) GPUs; pairs through the
  primary are 2/k of a token's pairs), so it is exact for k <= 2 and never below one GPU per
  token, where the plain pairwise count (k T - R) overcounts savings when three experts share
  a GPU. ``D_node`` is the same with nodes.
- ``Stay_gpu_l = sum_ij transitions_top1[l-1, i, j] (X_{l-1} X_l^T)[i, j]``: tokens whose
  primary experts of layers l-1 and l share a GPU (``follow``: the token is already there;
  at most one per token, a lower bound on the saving). Without ``transitions_top1``,
  ``transitions / k^2`` stands in. ``Stay_node`` is the same with nodes.
- coefficients per execution model (section 4 of the brief; home GPU uniform over tokens):
  ``return``: dispatch and combine each send to the used GPUs other than home,
  ``cg = 2 (1 - 1/G)``, ``cn = 2 (1 - 1/N)``, ``s = t = 0``. ``follow``: layer 0 dispatches
  from home (``cg = 2 - 1/G``, ``cn = 2 - 1/N``), later layers from the primary expert's GPU
  of the layer before (``cg = cn = 2``, ``s = 1``); combine goes to the primary's GPU
  (``t = 1``).

Unit costs come from the evaluator's cost model (``moetuner.costmodel.CostCoefficients``, a
calibration included): a token-expert pair costs ``2 * expert_params`` FLOPs at
``compute_efficiency`` of peak; a message is one token activation at ``network_efficiency``
of the link bandwidth; a batch is ``tokens_per_gpu_batch * G`` tokens. Latencies and weight
reads are left out (they hardly depend on the placement), and traffic is averaged over GPUs
where the evaluator takes the busiest, so the objective is in seconds per batch and tracks,
not equals, the evaluator's prediction (``bench/quality.py`` measures how well).

Several profiles (workloads, time windows) give one objective each; ``robust="mean"``
minimises their weighted mean, ``"max"`` the worst of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetuner.cluster import Cluster
from moetuner.costmodel import CostCoefficients
from moetuner.errors import InputError
from moetuner.models import MODELS, ModelSpec, model_with_shape
from moetuner.profile import Profile

# A stand-in model for shapes no preset matches (a mid-size BF16 MoE).
GENERIC_MODEL = ModelSpec("generic", "-", 1, (), 1, 1, 4096, 2048)
ROBUST = ("mean", "max")
EXEC_MODELS = ("return", "follow")


@dataclass(frozen=True)
class JointProblem:
    """Everything the objective needs, for Q profiles of L layers x E experts on G GPUs.

    Attributes:
        work: ``[Q, L, E]`` seconds per batch of each expert's whole load on one GPU.
        coact: ``[Q, L, E, E]`` same-layer pair counts times 2/k, diagonal zeroed.
        follow_pairs: ``[Q, L-1, E, E]`` primary-to-primary counts of consecutive layers.
        u_gpu: ``[Q]`` seconds per batch of one counted message between GPUs.
        u_node: ``[Q]`` extra seconds per batch of one counted message across nodes.
        tokens: ``[Q]`` tokens of each profile (T).
        cg, cn, s, t: ``[L]`` execution-model coefficients (module docstring).
        weights: ``[Q]`` profile weights, summing to 1.
        robust: ``mean`` or ``max`` over profiles.
        top_k: experts per token (k).
        num_gpus, num_nodes, slots_per_gpu: G, N and P / G.
        exec_model: ``return`` or ``follow``.
    """

    work: np.ndarray
    coact: np.ndarray
    follow_pairs: np.ndarray
    u_gpu: np.ndarray
    u_node: np.ndarray
    tokens: np.ndarray
    cg: np.ndarray
    cn: np.ndarray
    s: np.ndarray
    t: np.ndarray
    weights: np.ndarray
    robust: str
    top_k: int
    num_gpus: int
    num_nodes: int
    slots_per_gpu: int
    exec_model: str

    @property
    def num_profiles(self) -> int:
        return int(self.work.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.work.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.work.shape[2])

    @property
    def node_of_gpu(self) -> np.ndarray:
        return np.arange(self.num_gpus) // (self.num_gpus // self.num_nodes)

    def per_node(self, per_gpu: np.ndarray) -> np.ndarray:
        """Sum the last axis of ``per_gpu [..., G]`` over each node's GPUs: ``[..., N]``."""
        return per_gpu.reshape(*per_gpu.shape[:-1], self.num_nodes, -1).sum(axis=-1)

    def combine(self, totals: np.ndarray) -> float:
        """The objective from ``[Q]`` per-profile totals (weighted mean or max)."""
        return float(totals.max() if self.robust == "max" else totals @ self.weights)


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
) -> JointProblem:
    """Turn profiles, cluster, model and cost coefficients (default: the cost model's) into
    the objective's arrays (module docstring)."""
    if exec_model not in EXEC_MODELS:
        raise InputError("--exec", "exec_model", f"one of {', '.join(EXEC_MODELS)}",
                         repr(exec_model))
    if robust not in ROBUST:
        raise InputError("--robust", "robust", f"one of {', '.join(ROBUST)}", repr(robust))
    first = profiles[0]
    for other in profiles[1:]:
        if other.load.shape != first.load.shape or other.top_k != first.top_k:
            raise InputError(other.source, "load", f"the shape {list(first.load.shape)} and "
                             f"k = {first.top_k} of {first.source}",
                             f"{list(other.load.shape)}, k = {other.top_k}")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(profiles),) or (weights < 0).any() or weights.sum() <= 0:
        raise InputError("params", "weights", f"{len(profiles)} non-negative weights, not all 0",
                         weights.tolist())
    L, E = first.load.shape
    k, G, N = first.top_k, cluster.num_gpus, cluster.num_nodes
    tokens = np.array([max(p.tokens, 1) for p in profiles], dtype=np.float64)
    c = coefficients or CostCoefficients()
    hw = c.resolved(cluster)
    scale = c.tokens_per_gpu_batch * G / tokens                                # [Q]
    pair_seconds = 2 * model.expert_params / (hw["peak_flops"] * c.compute_efficiency)
    intra = model.token_bytes / (hw["intra_bandwidth"] * c.network_efficiency)
    inter = model.token_bytes / (hw["inter_bandwidth"] * c.network_efficiency)
    work = np.stack([p.load for p in profiles]).astype(np.float64) * (scale * pair_seconds
                                                                      )[:, None, None]
    coact = np.zeros((len(profiles), L, E, E))
    follow_pairs = np.zeros((len(profiles), max(L - 1, 0), E, E))
    for q, p in enumerate(profiles):
        if p.coactivation is not None:
            coact[q] = p.coactivation * (2 / k)
        if p.transitions_top1 is not None:
            follow_pairs[q] = p.transitions_top1
        elif p.transitions is not None:
            follow_pairs[q] = p.transitions / k ** 2
    diagonal = np.arange(E)
    coact[:, :, diagonal, diagonal] = 0.0
    if exec_model == "return":
        cg = np.full(L, 2 * (1 - 1 / G))
        cn = np.full(L, 2 * (1 - 1 / N))
        s = np.zeros(L)
        t = np.zeros(L)
    else:
        cg, cn, s, t = np.full(L, 2.0), np.full(L, 2.0), np.ones(L), np.ones(L)
        cg[0], cn[0], s[0] = 2 - 1 / G, 2 - 1 / N, 0.0
    return JointProblem(
        work=work, coact=coact, follow_pairs=follow_pairs,
        u_gpu=scale * intra / G, u_node=scale * max(inter - intra, 0.0) / G * (N > 1),
        tokens=tokens, cg=cg, cn=cn, s=s, t=t, weights=weights / weights.sum(), robust=robust,
        top_k=k, num_gpus=G, num_nodes=N, slots_per_gpu=slots_per_gpu, exec_model=exec_model)


def fractions(problem: JointProblem, phy2log: np.ndarray) -> np.ndarray:
    """``[L, E, G]`` share of each expert's tokens served on each GPU (replicas split evenly)."""
    L, P = phy2log.shape
    E, G = problem.num_experts, problem.num_gpus
    gpu = np.arange(P) // (P // G)
    index = (np.arange(L)[:, None] * E + phy2log) * G + gpu[None, :]
    copies = np.bincount(index.ravel(), minlength=L * E * G).reshape(L, E, G).astype(float)
    return copies / copies.sum(axis=2, keepdims=True)


def layer_costs(problem: JointProblem, phy2log: np.ndarray) -> np.ndarray:
    """``[Q, L]`` the objective's seconds per batch, per profile and layer."""
    X = fractions(problem, phy2log)                                            # [L, E, G]
    Y = problem.per_node(X)                                                    # [L, E, N]
    same_gpu = np.einsum("leg,lfg->lef", X, X)                                 # [L, E, E]
    same_node = np.einsum("len,lfn->lef", Y, Y)
    compute = (problem.work[:, :, None, :] @ X)[:, :, 0].max(axis=2)          # [Q, L]
    kT = problem.top_k * problem.tokens[:, None]                               # [Q, 1]
    d_gpu = kT - 0.5 * np.einsum("qlef,lef->ql", problem.coact, same_gpu)
    d_node = kT - 0.5 * np.einsum("qlef,lef->ql", problem.coact, same_node)
    stay_gpu = np.zeros_like(d_gpu)
    stay_node = np.zeros_like(d_gpu)
    if problem.num_layers > 1:
        together = np.einsum("leg,lfg->lef", X[:-1], X[1:])
        stay_gpu[:, 1:] = np.einsum("qlef,lef->ql", problem.follow_pairs, together)
        together = np.einsum("len,lfn->lef", Y[:-1], Y[1:])
        stay_node[:, 1:] = np.einsum("qlef,lef->ql", problem.follow_pairs, together)
    T = problem.tokens[:, None]
    traffic = (problem.u_gpu[:, None] * (problem.cg * d_gpu - problem.s * stay_gpu
                                         - problem.t * T)
               + problem.u_node[:, None] * (problem.cn * d_node - problem.s * stay_node
                                            - problem.t * T))
    return compute + traffic


def objective(problem: JointProblem, phy2log: np.ndarray) -> float:
    """The objective (seconds per batch, mean or max over profiles) of a placement."""
    return problem.combine(layer_costs(problem, phy2log).sum(axis=1))


def _top_sum(matrix: np.ndarray, count: int, axis: int) -> np.ndarray:
    """Sum of the ``count`` largest entries along ``axis`` (all entries if fewer)."""
    size = matrix.shape[axis]
    if count <= 0:
        return np.zeros(np.delete(matrix.shape, axis))
    if count >= size:
        return matrix.sum(axis=axis)
    return np.partition(matrix, size - count, axis=axis).take(
        range(size - count, size), axis=axis).sum(axis=axis)


def lower_bound(problem: JointProblem, num_redundant: int) -> float:
    """A lower bound on ``objective`` over all placements with ``num_redundant`` replicas.

    Per layer: the slowest GPU does at least the mean work, and at least the hottest
    expert's work plus S - 1 of the lightest slots (without replicas: the S - 1 lightest
    experts; with them, the lightest expert's work, all over the most possible copies
    min(G, R + 1)); an expert shares a GPU with at
    most S - 1 others (a node with S G/N - 1), so its co-activation saving is at most its
    S - 1 largest pair counts; a primary expert's stay saving is at most its S largest
    follow counts (and, by columns, each next-layer expert's). Replicas only split savings.
    """
    Q, L, E = problem.work.shape
    G, N, S = problem.num_gpus, problem.num_nodes, problem.slots_per_gpu
    per_node = S * (G // N)
    copies = min(G, num_redundant + 1)
    # The GPU serving the hottest expert also serves S - 1 other slots, each at least the
    # lightest expert's work over its most possible copies.
    hottest = (problem.work.max(axis=2) + (S - 1) * problem.work.min(axis=2)) / copies
    if num_redundant == 0:
        hottest = problem.work.max(axis=2) - _top_sum(-problem.work, S - 1, 2)
    compute = np.maximum(problem.work.sum(axis=2) / G, hottest)
    kT = problem.top_k * problem.tokens[:, None]
    half_pairs = 0.5 * problem.coact.sum(axis=(2, 3))
    save_gpu = np.minimum(half_pairs, 0.5 * _top_sum(problem.coact, S - 1, 3).sum(axis=2))
    save_node = np.minimum(half_pairs,
                           0.5 * _top_sum(problem.coact, per_node - 1, 3).sum(axis=2))
    stay_gpu = np.zeros((Q, L))
    stay_node = np.zeros((Q, L))
    if L > 1:
        A = problem.follow_pairs
        stay_gpu[:, 1:] = np.minimum(_top_sum(A, S, 3).sum(axis=2),
                                     _top_sum(A, S, 2).sum(axis=2))
        stay_node[:, 1:] = np.minimum(_top_sum(A, per_node, 3).sum(axis=2),
                                      _top_sum(A, per_node, 2).sum(axis=2))
    T = problem.tokens[:, None]
    traffic = (problem.u_gpu[:, None] * (problem.cg * (kT - save_gpu) - problem.s * stay_gpu
                                         - problem.t * T)
               + problem.u_node[:, None] * (problem.cn * (kT - save_node)
                                            - problem.s * stay_node - problem.t * T))
    return problem.combine((compute + traffic).sum(axis=1))


def load_correlation(profiles: list[Profile]) -> np.ndarray:
    """``[Q, Q, L]`` Pearson correlation of each layer's expert loads between two profiles."""
    loads = np.stack([p.load for p in profiles]).astype(np.float64)            # [Q, L, E]
    centred = loads - loads.mean(axis=2, keepdims=True)
    norm = np.sqrt((centred ** 2).sum(axis=2))                                  # [Q, L]
    dot = np.einsum("ale,ble->abl", centred, centred)
    denom = norm[:, None, :] * norm[None, :, :]
    return np.divide(dot, denom, out=np.ones_like(dot), where=denom > 0)
