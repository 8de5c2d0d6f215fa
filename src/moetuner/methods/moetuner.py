"""``moetuner``: the MoETuner method (Go and Mahajan, arXiv 2502.06643), faithful and usable.

Stage 1, ILP 1 per layer (balance): split the layer's experts into G clusters minimising
``sum_c |load_c - mean|``, each expert in exactly one cluster (the printed model omits this).
Option B (``sizes="equal"``, the default): exactly S = P / G experts per cluster, because
SGLang, vLLM and Megatron need the same number of expert slots on every GPU in every layer.
Option A (``sizes="free"``, the paper's): any size of at least one expert; the placement then
pads GPUs with empty slots (-1) and no engine can load it. Warm start: greedy longest-first
packing (EPLB's ``balanced_packing``); CP-SAT polishes with that complete hint, clusters
ordered by load to break their symmetry (the hint relabelled to match). Before CP-SAT the
greedy answer is improved by best-improvement swaps of two experts (milliseconds).

Stage 2, ILP 2 across layers (traffic): choose per layer a permutation of its clusters onto
the GPUs minimising ``sum_l max_{g != h} cost[g, h] * traffic_l(g, h)``, where
``traffic_l(g, h)`` counts tokens going from the cluster on GPU g in layer l to the cluster on
GPU h in layer l+1 and ``cost`` is the relative cost of that link (1 inside a node, the
NVLink / network bandwidth ratio across nodes). Solved by one of:

- ``dp`` (exact, the default when G! <= ``dp_max_states``, 120, i.e. G <= 5; G = 6 takes
  about 3.5 s for 24 layers): a shortest path over layers whose states are the G!
  cluster-to-GPU permutations of a layer;
- ``polish``: the heuristic below (half the time), then CP-SAT re-solves of one layer at a
  time with both neighbours fixed (then the layer's terms are linear in its assignment, a
  small exact model), sweeping until nothing changes or time is up. No global bound;
- ``cpsat`` (the default with free sizes while the model fits): the whole ILP, the products
  ``y[l,c,g] * y[l+1,d,h]`` of assignment binaries linearised by ``z >= y + y' - 1, z >= 0``.
  Only this lower McCormick envelope is needed and it is exact: z enters with non-negative
  weight only into constraints that bound the minimised per-layer maximum from below, so an
  optimal solution never keeps z above the product. Symmetry: GPUs of one node, and nodes,
  are interchangeable, so layer 0's clusters are ordered along each node's GPUs and the nodes
  by their first cluster. Warm-started from the heuristic below (relabelled by the same
  symmetry to satisfy those constraints). Built only when it has at most ``max_terms``
  product variables (else the heuristic stands);
- ``heuristic`` (the default beyond the DP with equal sizes: ``polish`` matched it or did
  worse on GPT-OSS and the synthetic shapes, in up to twice the time; see BENCHMARKS.md):
  layer by layer, a linear assignment maximising the tokens that stay on their GPU, then
  best-improvement swap sweeps on (objective, total weighted traffic) until no swap helps or
  time runs out. No bound.

The heuristic incumbent is always kept: CP-SAT's answer replaces it only when strictly better.
With free sizes (option A) the paper's memory-balance constraint (every GPU holds the same
number of experts summed over layers) is enforced as ``lo <= total_g <= hi`` where [lo, hi]
is the spread reached by the warm start (per layer, larger clusters to the GPUs holding the
fewest experts so far); it is the paper's equality whenever the warm start is balanced, and
it keeps the warm start feasible. Swaps then only exchange clusters of equal size; the exact
DP and the layer re-solves do not apply.

Replicas (R > 0, which the paper has not): each layer first replicates its hottest experts as
EPLB does (each new copy to the expert with the largest load per copy, at most G copies), each
copy taking an equal share of its expert's load and traffic; stage 1 then clusters the P
physical experts into G clusters of S with at most one copy of an expert per cluster, so no
GPU ever holds two copies. Free sizes with replicas are refused.

Traffic counts: ``transitions_top1`` (a token moves with its primary expert, the ``follow``
model) when the profile has it, else the k x k ``transitions``; ``params["transitions"]``
(``top1`` / ``topk``) overrides. A loads-only profile skips stage 2.

Time: stage 1 gets ``stage1_share`` of ``time_limit`` (0.9 when stage 2 is the exact DP,
else 0.4), split over layers; stage 2 the rest. Both stop at ``options.gap`` (the paper's
2.5%). CP-SAT limits are deterministic work limits (see ``_cpsat``) and the heuristics are
deterministic, so the same inputs and seed give the same placement, unless a wall-clock limit
cuts a run first (the swap sweeps, or HiGHS with ``ilp1=highs``, which has no work limit).

Record: objective = stage 2's (bound and gap where proved); status ``optimal`` when both
stages proved their gap, ``heuristic`` when a stage had no solver run, else ``time_limit``;
the log names the stage 2 algorithm used and stage 1's objective, bound and status.

Params: ``sizes`` (equal | free), ``ilp1`` (cpsat | highs: the stage 1 solver), ``ilp2``
(auto | dp | polish | cpsat | heuristic), ``transitions`` (top1 | topk), ``workers`` (CP-SAT
workers, default 1), ``dp_max_states`` (120), ``max_terms`` (100000), ``stage1_share``
(0.9 / 0.4).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from moetuner.cluster import Cluster
from moetuner.errors import InputError
from moetuner.methods import MethodParams, PlaceOptions, SolveRecord, register, relative_gap
from moetuner.methods._cpsat import integer_scale, solve_cpsat
from moetuner.methods.eplb import balanced_packing, replicate_experts
from moetuner.placement import Placement, pack_slots
from moetuner.profile import Profile

ILP2_ALGORITHMS = ("auto", "dp", "polish", "cpsat", "heuristic")


# ----------------------------------------------------------------------------- stage 1

def balance_objective(weight: np.ndarray, cluster: np.ndarray, num_clusters: int) -> np.ndarray:
    """ILP 1's objective per row: ``sum_c |load_c - mean load|``.

    Args:
        weight: float ``[X, n]`` item loads.
        cluster: int ``[X, n]`` cluster of each item.
        num_clusters: G.

    Returns:
        float ``[X]``.
    """
    rows = weight.shape[0]
    index = (np.arange(rows)[:, None] * num_clusters + cluster).ravel()
    load = np.bincount(index, weights=weight.ravel(), minlength=rows * num_clusters)
    load = load.reshape(rows, num_clusters)
    return np.abs(load - load.mean(axis=1, keepdims=True)).sum(axis=1)


def greedy_free_clusters(weight: np.ndarray, num_clusters: int) -> np.ndarray:
    """Longest-first packing without size limits: each item (heaviest first) to the lightest
    cluster, ties to the one with fewer items, so that every cluster gets at least one item.

    Args:
        weight: float ``[X, n]`` item loads, n >= num_clusters.

    Returns:
        int ``[X, n]`` cluster of each item.
    """
    rows, n = weight.shape
    order = np.argsort(-weight, axis=1, kind="stable")
    load = np.zeros((rows, num_clusters))
    count = np.zeros((rows, num_clusters), dtype=np.int64)
    cluster = np.empty((rows, n), dtype=np.int64)
    row = np.arange(rows)
    for step in range(n):
        item = order[:, step]
        # Empty clusters first (every cluster needs an item), then the lightest.
        target = np.where((count == 0).any(axis=1), np.argmax(count == 0, axis=1),
                          np.argmin(load, axis=1))
        cluster[row, item] = target
        load[row, target] += weight[row, item]
        count[row, target] += 1
    return cluster


def improve_balance_by_swaps(weight: np.ndarray, cluster: np.ndarray, num_clusters: int,
                             keys: np.ndarray | None = None, max_rounds: int = 1000
                             ) -> np.ndarray:
    """Best-improvement swaps of two items in different clusters until none lowers
    ``sum_c |load_c - mean|`` (sizes are kept; items with one key never share a cluster).

    Args:
        weight: float ``[n]`` item loads.
        cluster: int ``[n]`` starting cluster of each item.

    Returns:
        int ``[n]`` improved clusters (a copy).
    """
    cluster = cluster.copy()
    mean = weight.sum() / num_clusters
    keyed = keys if keys is not None else np.arange(len(weight))
    for _ in range(max_rounds):
        load = np.bincount(cluster, weights=weight, minlength=num_clusters)
        moved = weight[:, None] - weight[None, :]              # [i, j] load leaving i's cluster
        load_i = load[cluster][:, None]
        load_j = load[cluster][None, :]
        change = (np.abs(load_i - moved - mean) + np.abs(load_j + moved - mean)
                  - np.abs(load_i - mean) - np.abs(load_j - mean))
        allowed = cluster[:, None] != cluster[None, :]
        if keys is not None:
            holds = np.zeros((num_clusters, int(keyed.max()) + 1), dtype=bool)
            holds[cluster, keyed] = True
            allowed &= ~holds[cluster[None, :], keyed[:, None]]  # i's key not where j is
            allowed &= ~holds[cluster[:, None], keyed[None, :]]  # j's key not where i is
        change = np.where(allowed, change, 0.0)
        best = int(np.argmin(change))
        if change.flat[best] >= -1e-9 * max(1.0, mean):
            break
        i, j = divmod(best, len(weight))
        cluster[i], cluster[j] = cluster[j], cluster[i]
    return cluster


def solve_balance(
    weight: np.ndarray, num_clusters: int, size: int | None, keys: np.ndarray | None = None,
    budget: float = 1.0, seed: int = 0, gap: float = 0.025, workers: int = 1,
    solver: str = "cpsat",
) -> tuple[np.ndarray, float, float, str, str]:
    """ILP 1 for one layer: greedy plus swaps as warm start, then an exact solver.

    Args:
        weight: float ``[n]`` item loads.
        num_clusters: G.
        size: items per cluster (option B) or None (option A: at least one each).
        keys: int ``[n]`` or None; items with one key (copies of one expert) never share a
            cluster.
        budget: solver seconds; 0 keeps the warm start.
        solver: ``cpsat`` (hinted with the warm start) or ``highs`` (scipy.milp, which takes
            no warm start; the warm start is kept when it is better).

    Returns:
        cluster: int ``[n]`` cluster of each item.
        objective: ``sum_c |load_c - mean|`` of that clustering.
        bound: a lower bound on the optimum (0 when no solver ran).
        status: ``optimal``, ``time_limit`` or ``heuristic``.
        summary: one line for the log.
    """
    if size is None:
        hint = greedy_free_clusters(weight[None], num_clusters)[0]
    else:
        hint = balanced_packing(weight[None], num_clusters,
                                None if keys is None else keys[None])[0][0]
    hint = improve_balance_by_swaps(weight, hint, num_clusters, keys)
    greedy = float(balance_objective(weight[None], hint[None], num_clusters)[0])
    if budget <= 0 or greedy <= 0:
        return hint, greedy, 0.0, "optimal" if greedy <= 0 else "heuristic", "greedy"
    scale = integer_scale(weight)
    w = np.rint(weight * scale).astype(np.int64)
    if solver == "highs":
        found, bound, status, summary = _balance_highs(w, num_clusters, size, keys, budget, gap)
    else:
        found, bound, status, summary = _balance_cpsat(w, num_clusters, size, keys, hint,
                                                       budget, seed, gap, workers)
    if found is None:
        return hint, greedy, 0.0, "heuristic", summary
    bound = max(0.0, bound / num_clusters / scale)
    value = float(balance_objective(weight[None], found[None], num_clusters)[0])
    if value < greedy:
        return found, value, bound, status, summary
    status = "optimal" if relative_gap(greedy, bound) <= gap else status
    return hint, greedy, bound, status, summary


def _balance_cpsat(w: np.ndarray, num_clusters: int, size: int | None, keys: np.ndarray | None,
                   hint: np.ndarray, budget: float, seed: int, gap: float, workers: int
                   ) -> tuple[np.ndarray | None, float, str, str]:
    """ILP 1 on CP-SAT over integer loads ``w [n]``; the objective is G times
    ``sum |load - mean|`` so that it stays integral. Returns (clusters or None, bound on that
    objective, status, log line)."""
    from ortools.sat.python import cp_model

    n = len(w)
    total = int(w.sum())
    model = cp_model.CpModel()
    x = [[model.new_bool_var(f"x{i}_{c}") for c in range(num_clusters)] for i in range(n)]
    for i in range(n):
        model.add_exactly_one(x[i])
    for c in range(num_clusters):
        members = [x[i][c] for i in range(n)]
        if size is None:
            model.add(sum(members) >= 1)
        else:
            model.add(sum(members) == size)
    if keys is not None:
        for key in np.unique(keys):
            copies = np.flatnonzero(keys == key)
            if len(copies) > 1:
                for c in range(num_clusters):
                    model.add_at_most_one(x[i][c] for i in copies)
    loads = [sum(int(w[i]) * x[i][c] for i in range(n)) for c in range(num_clusters)]
    devs = [model.new_int_var(0, num_clusters * total, f"d{c}") for c in range(num_clusters)]
    for load, dev in zip(loads, devs, strict=True):
        model.add(dev >= num_clusters * load - total)
        model.add(dev >= total - num_clusters * load)
    # Clusters are unlabelled: order them by load; relabel the hint to match.
    for c in range(num_clusters - 1):
        model.add(loads[c] <= loads[c + 1])
    hint_load = np.bincount(hint, weights=w, minlength=num_clusters)
    rank = np.empty(num_clusters, dtype=np.int64)
    rank[np.lexsort((np.arange(num_clusters), hint_load))] = np.arange(num_clusters)
    hint = rank[hint]
    for i in range(n):
        for c in range(num_clusters):
            model.add_hint(x[i][c], int(hint[i] == c))
    model.minimize(sum(devs))
    result = solve_cpsat(model, budget, seed, gap, workers)
    if result.solver is None:
        return None, 0.0, "heuristic", result.summary
    found = np.array([[result.solver.boolean_value(x[i][c]) for c in range(num_clusters)]
                      for i in range(n)]).argmax(axis=1)
    return found, result.bound, result.status, result.summary


def _balance_highs(w: np.ndarray, num_clusters: int, size: int | None, keys: np.ndarray | None,
                   budget: float, gap: float) -> tuple[np.ndarray | None, float, str, str]:
    """The same model as ``_balance_cpsat`` on HiGHS (scipy.milp). Variables: ``x[i, c]``
    (i * G + c) binaries, then the G deviations."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n, G = len(w), num_clusters
    total = float(w.sum())
    item = np.repeat(np.arange(n), G)
    cluster = np.tile(np.arange(G), n)
    x = np.arange(n * G)
    blocks = [  # (rows, cols, values, lower, upper) of each constraint family
        (item, x, np.ones(n * G), np.ones(n), np.ones(n)),                    # one cluster each
        (cluster, x, np.ones(n * G), np.full(G, size or 1.0),
         np.full(G, size or np.inf)),                                         # cluster sizes
        (np.r_[cluster, np.arange(G)], np.r_[x, n * G + np.arange(G)],
         np.r_[-G * w[item], np.ones(G)], np.full(G, -total), np.full(G, np.inf)),
        (np.r_[cluster, np.arange(G)], np.r_[x, n * G + np.arange(G)],
         np.r_[G * w[item], np.ones(G)], np.full(G, total), np.full(G, np.inf)),
    ]
    if G > 1:                                                                 # loads ascending
        first = cluster < G - 1
        rows = np.r_[cluster[first], cluster[first]]
        cols = np.r_[x[first], x[first] + 1]
        vals = np.r_[w[item[first]], -w[item[first]]].astype(float)
        blocks.append((rows, cols, vals, np.full(G - 1, -np.inf), np.zeros(G - 1)))
    if keys is not None:                                                      # copies apart
        key_rows = keys[item] * G + cluster
        blocks.append((key_rows, x, np.ones(n * G), np.zeros((keys.max() + 1) * G),
                       np.ones((keys.max() + 1) * G)))
    constraints = [LinearConstraint(coo_matrix((vals, (rows, cols)),
                                               shape=(len(lower), n * G + G)), lower, upper)
                   for rows, cols, vals, lower, upper in blocks]
    result = milp(np.r_[np.zeros(n * G), np.ones(G)], constraints=constraints,
                  integrality=np.r_[np.ones(n * G), np.zeros(G)],
                  bounds=Bounds(0, np.r_[np.ones(n * G), np.full(G, np.inf)]),
                  options={"time_limit": budget, "mip_rel_gap": gap})
    summary = f"HiGHS {result.message}"
    if result.x is None:
        return None, 0.0, "heuristic", summary
    found = result.x[:n * G].reshape(n, G).argmax(axis=1)
    bound = float(getattr(result, "mip_dual_bound", 0.0) or 0.0)
    return found, bound, "optimal" if result.status == 0 else "time_limit", summary


# ----------------------------------------------------------------------------- stage 2

def cluster_traffic(transitions: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Tokens from each cluster of layer l to each cluster of layer l+1.

    Args:
        transitions: float ``[L-1, E, E]`` expert-to-expert token counts between layers.
        share: float ``[L, E, G]`` fraction of expert e's tokens that cluster c serves
            (1 / copies for each cluster holding a copy, 0 elsewhere).

    Returns:
        float ``[L-1, G, G]``: ``share[l].T @ transitions[l] @ share[l+1]``.
    """
    return np.einsum("lec,lef,lfd->lcd", share[:-1], transitions, share[1:], optimize=True)


def _gpu_traffic(traffic: np.ndarray, cost: np.ndarray, cluster_on_gpu: np.ndarray
                 ) -> np.ndarray:
    """``[L-1, G, G]`` link-cost-weighted traffic between GPU pairs.

    ``cluster_on_gpu [L, G]`` is the cluster each GPU holds in each layer.
    """
    src = cluster_on_gpu[:-1, :, None]
    dst = cluster_on_gpu[1:, None, :]
    layer = np.arange(traffic.shape[0])[:, None, None]
    return traffic[layer, src, dst] * cost[None]


def traffic_objective(traffic: np.ndarray, cost: np.ndarray, gpu_of_cluster: np.ndarray
                      ) -> float:
    """ILP 2's objective: ``sum_l max_{g,h} cost[g,h] * traffic_l(g,h)``.

    Args:
        traffic: float ``[L-1, G, G]`` cluster-to-cluster tokens (``cluster_traffic``).
        cost: float ``[G, G]`` relative link cost (0 on the diagonal).
        gpu_of_cluster: int ``[L, G]`` GPU of each cluster in each layer (permutations).
    """
    if traffic.shape[0] == 0:
        return 0.0
    cluster_on_gpu = np.argsort(gpu_of_cluster, axis=1)
    return float(_gpu_traffic(traffic, cost, cluster_on_gpu).max(axis=(1, 2)).sum())


def placement_traffic(placement: Placement, transitions: np.ndarray, cost: np.ndarray) -> float:
    """ILP 2's objective of any placement: each GPU's experts in a layer form its cluster.

    Args:
        placement: the placement (replicas share their expert's tokens evenly).
        transitions: float ``[L-1, E, E]`` expert-to-expert token counts between layers.
        cost: float ``[G, G]`` relative link cost.
    """
    share = placement.replicas_on_gpu / np.maximum(placement.logcnt, 1)[:, :, None]
    traffic = cluster_traffic(np.asarray(transitions, dtype=np.float64), share)
    identity = np.tile(np.arange(placement.num_gpus), (placement.num_layers, 1))
    return traffic_objective(traffic, cost, identity)


def solve_traffic_dp(traffic: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact ILP 2 (equal sizes) by a shortest path over layers through all G! permutations.

    Returns ``gpu_of_cluster [L, G]`` and its objective. Work is O(L * G!^2 * G^2).
    """
    num_gpus = cost.shape[0]
    perms = np.array(list(itertools.permutations(range(num_gpus))))   # [n!, G] cluster on GPU
    value = np.zeros(len(perms))
    parents = []
    for step in traffic:
        edge = np.zeros((len(perms), len(perms)))
        for g, h in zip(*np.nonzero(cost), strict=True):
            np.maximum(edge, cost[g, h] * step[perms[:, g][:, None], perms[:, h][None, :]],
                       out=edge)
        total = value[:, None] + edge
        parent = np.argmin(total, axis=0)
        parents.append(parent)
        value = total[parent, np.arange(len(perms))]
    state = int(np.argmin(value))
    path = [state]
    for parent in reversed(parents):
        state = int(parent[state])
        path.append(state)
    cluster_on_gpu = perms[path[::-1]]
    return np.argsort(cluster_on_gpu, axis=1), float(value.min())


def _initial_assignment(traffic: np.ndarray, sizes: np.ndarray | None) -> np.ndarray:
    """Warm start ``cluster_on_gpu [L, G]``.

    Equal sizes: layer 0 in order, then each layer by a linear assignment that keeps the most
    tokens on their GPU. Free sizes: larger clusters to the GPUs holding fewest experts so far
    (memory balance), ties kept in cluster order.
    """
    from scipy.optimize import linear_sum_assignment

    num_layers, num_gpus = traffic.shape[0] + 1, traffic.shape[1]
    cluster_on_gpu = np.empty((num_layers, num_gpus), dtype=np.int64)
    if sizes is not None:
        held = np.zeros(num_gpus, dtype=np.int64)
        for layer in range(num_layers):
            clusters = np.argsort(-sizes[layer], kind="stable")
            gpus = np.lexsort((np.arange(num_gpus), held))
            cluster_on_gpu[layer, gpus] = clusters
            held[gpus] += sizes[layer, clusters]
        return cluster_on_gpu
    cluster_on_gpu[0] = np.arange(num_gpus)
    for layer in range(1, num_layers):
        # stay[h, d]: tokens kept on GPU h if cluster d of this layer goes there.
        stay = traffic[layer - 1][cluster_on_gpu[layer - 1]]
        gpus, clusters = linear_sum_assignment(stay, maximize=True)
        cluster_on_gpu[layer, gpus] = clusters
    return cluster_on_gpu


def _layer_terms(traffic: np.ndarray, cost: np.ndarray, cluster_on_gpu: np.ndarray, layer: int,
                 candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max, sum) of the weighted traffic terms touching ``layer`` for each candidate
    ``cluster_on_gpu`` row of that layer; ``candidates [K, G]``. Returns two ``[K]``."""
    peak = np.zeros(len(candidates))
    total = np.zeros(len(candidates))
    if layer > 0:
        flows = traffic[layer - 1][cluster_on_gpu[layer - 1][None, :, None],
                                   candidates[:, None, :]] * cost
        peak += flows.max(axis=(1, 2))
        total += flows.sum(axis=(1, 2))
    if layer < traffic.shape[0]:
        flows = traffic[layer][candidates[:, :, None],
                               cluster_on_gpu[layer + 1][None, None, :]] * cost
        peak += flows.max(axis=(1, 2))
        total += flows.sum(axis=(1, 2))
    return peak, total


def improve_by_swaps(traffic: np.ndarray, cost: np.ndarray, cluster_on_gpu: np.ndarray,
                     sizes: np.ndarray | None, deadline: float) -> np.ndarray:
    """Best-improvement swaps of two GPUs' clusters within one layer, sweeping all layers
    until no swap lowers (objective, total weighted traffic) or ``deadline`` passes.

    ``sizes [L, G]`` (free sizes) restricts swaps to clusters of equal size.
    Returns the improved ``cluster_on_gpu [L, G]`` (a copy).
    """
    current = cluster_on_gpu.copy()
    num_layers, num_gpus = current.shape
    pair_a, pair_b = np.triu_indices(num_gpus, 1)
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for layer in range(num_layers):
            while time.perf_counter() < deadline:
                row = current[layer]
                allowed = np.ones(len(pair_a), dtype=bool)
                if sizes is not None:
                    allowed = sizes[layer, row[pair_a]] == sizes[layer, row[pair_b]]
                candidates = np.tile(row, (len(pair_a), 1))
                index = np.arange(len(pair_a))
                candidates[index, pair_a] = row[pair_b]
                candidates[index, pair_b] = row[pair_a]
                peak, total = _layer_terms(traffic, cost, current, layer, candidates)
                base_peak, base_total = _layer_terms(traffic, cost, current, layer, row[None])
                # Strictly better in (peak, total), with a tolerance against float noise.
                eps = 1e-9 * max(1.0, float(base_total[0]))
                lower_total = (peak <= base_peak[0] + eps) & (total < base_total[0] - eps)
                better = allowed & ((peak < base_peak[0] - eps) | lower_total)
                if not better.any():
                    break
                best = np.flatnonzero(better)[np.lexsort((total[better], peak[better]))[0]]
                current[layer] = candidates[best]
                improved = True
    return current


def polish_layers_cpsat(traffic: np.ndarray, cost: np.ndarray, cluster_on_gpu: np.ndarray,
                        deadline: float, seed: int, workers: int = 1) -> np.ndarray:
    """Re-solve one layer at a time with both neighbours fixed, sweeping until a sweep changes
    nothing or ``deadline`` passes; a layer's new permutation is kept only when it lowers
    that layer's two objective terms.

    With the neighbours fixed the two terms are linear in the layer's assignment binaries
    ``y[c, g]`` (``traffic_{l-1}(g, h) = sum_c T[prev(g), c] * y[c, h]``), so each sub-problem
    is a small exact CP-SAT model (G^2 binaries, two max variables), hinted with the current
    permutation. Returns the improved ``cluster_on_gpu [L, G]`` (a copy).
    """
    from ortools.sat.python import cp_model

    current = cluster_on_gpu.copy()
    num_layers, num_gpus = current.shape
    weighted = np.rint(traffic * integer_scale(traffic)).astype(np.int64)
    c_int = np.rint(cost * integer_scale(cost, 1e3)).astype(np.int64)
    pairs = list(zip(*np.nonzero(c_int), strict=True))
    changed = True
    while changed and time.perf_counter() < deadline:
        changed = False
        for layer in range(num_layers):
            left = deadline - time.perf_counter()
            if left <= 0.01:
                break
            before, _ = _layer_terms(traffic, cost, current, layer, current[layer][None])
            model = cp_model.CpModel()
            y = [[model.new_bool_var(f"y{c}_{g}") for g in range(num_gpus)]
                 for c in range(num_gpus)]
            for c in range(num_gpus):
                model.add_exactly_one(y[c])
                model.add_exactly_one(y[d][c] for d in range(num_gpus))
            peaks = []
            if layer > 0:
                prev = current[layer - 1]
                peak = model.new_int_var(0, int(weighted[layer - 1].sum() * c_int.max()), "in")
                for g, h in pairs:
                    model.add(peak >= int(c_int[g, h]) * sum(
                        int(weighted[layer - 1, prev[g], c]) * y[c][h] for c in range(num_gpus)))
                peaks.append(peak)
            if layer < num_layers - 1:
                nxt = current[layer + 1]
                peak = model.new_int_var(0, int(weighted[layer].sum() * c_int.max()), "out")
                for g, h in pairs:
                    model.add(peak >= int(c_int[g, h]) * sum(
                        int(weighted[layer, c, nxt[h]]) * y[c][g] for c in range(num_gpus)))
                peaks.append(peak)
            for g, c in enumerate(current[layer]):
                for d in range(num_gpus):
                    model.add_hint(y[d][g], int(d == c))
            model.minimize(sum(peaks))
            result = solve_cpsat(model, min(left, max(0.05, left / num_layers)), seed, 0.0,
                                 workers)
            if result.solver is None:
                continue
            row = np.array([[result.solver.boolean_value(y[c][g]) for g in range(num_gpus)]
                            for c in range(num_gpus)]).argmax(axis=0)
            after, _ = _layer_terms(traffic, cost, current, layer, row[None])
            if after[0] < before[0] - 1e-9 * max(1.0, before[0]) and result.objective is not None:
                current[layer] = row
                changed = True
    return current


def _canonical_relabel(cluster_on_gpu: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """Relabel GPUs (within nodes, and whole nodes) so that layer 0 satisfies the symmetry
    breaking of the CP-SAT model: clusters ascending along each node's GPUs, nodes ordered by
    their first cluster. The objective is unchanged (link costs depend on nodes only)."""
    num_gpus = cluster_on_gpu.shape[1]
    by_node = np.sort(cluster_on_gpu[0].reshape(-1, gpus_per_node), axis=1)
    by_node = by_node[np.argsort(by_node[:, 0])]
    new_row = by_node.ravel()                         # new layer-0 cluster on each GPU
    new_gpu_of_cluster = np.argsort(new_row)
    old_gpu_of_cluster = np.argsort(cluster_on_gpu[0])
    relabel = np.empty(num_gpus, dtype=np.int64)     # old GPU -> new GPU
    relabel[old_gpu_of_cluster] = new_gpu_of_cluster
    out = np.empty_like(cluster_on_gpu)
    out[:, relabel] = cluster_on_gpu
    return out


def solve_traffic_cpsat(
    traffic: np.ndarray, cost: np.ndarray, hint: np.ndarray, gpus_per_node: int,
    sizes: np.ndarray | None, memory_range: tuple[int, int] | None, deadline: float, seed: int,
    gap: float, workers: int = 1,
) -> tuple[np.ndarray | None, float | None, str, str]:
    """ILP 2 on CP-SAT with the complete hint ``hint`` (``cluster_on_gpu [L, G]``), solved
    until ``deadline`` (``time.perf_counter()`` seconds; building the model counts).

    Returns ``cluster_on_gpu [L, G]`` or None, the lower bound (None if no solution), the
    status and a log line. ``sizes [L, G]`` with ``memory_range (lo, hi)`` adds the memory
    balance ``lo <= sum_l size of the cluster on g <= hi``.
    """
    from ortools.sat.python import cp_model

    num_layers, num_gpus = hint.shape
    t_scale = integer_scale(traffic)
    c_scale = integer_scale(cost, 1e3)
    t_int = np.rint(traffic * t_scale).astype(np.int64)
    c_int = np.rint(cost * c_scale).astype(np.int64)
    model = cp_model.CpModel()
    y = [[[model.new_bool_var(f"y{t}_{c}_{g}") for g in range(num_gpus)]
          for c in range(num_gpus)] for t in range(num_layers)]
    for t in range(num_layers):
        for c in range(num_gpus):
            model.add_exactly_one(y[t][c])
        for g in range(num_gpus):
            model.add_exactly_one(y[t][c][g] for c in range(num_gpus))
    # Symmetry breaking on layer 0 (see the module docstring).
    on_gpu = [sum(c * y[0][c][g] for c in range(num_gpus)) for g in range(num_gpus)]
    for g in range(num_gpus - 1):
        same_node = (g + 1) % gpus_per_node != 0
        if same_node:
            model.add(on_gpu[g] < on_gpu[g + 1])
    for first in range(0, num_gpus - gpus_per_node, gpus_per_node):
        model.add(on_gpu[first] < on_gpu[first + gpus_per_node])
    if sizes is not None and memory_range is not None:
        for g in range(num_gpus):
            held = sum(int(sizes[t, c]) * y[t][c][g] for t in range(num_layers)
                       for c in range(num_gpus))
            model.add_linear_constraint(held, *memory_range)
    peaks = []
    top = int((t_int.sum(axis=(1, 2)).max() if len(t_int) else 0) * c_int.max())
    pairs = list(zip(*np.nonzero(c_int), strict=True))
    for t in range(num_layers - 1):
        peak = model.new_int_var(0, top, f"m{t}")
        flows = np.nonzero(t_int[t])
        z = {}
        for c, d in zip(*flows, strict=True):
            for g, h in pairs:
                var = model.new_bool_var(f"z{t}_{c}_{d}_{g}_{h}")
                model.add_bool_or([var, ~y[t][c][g], ~y[t + 1][d][h]])   # z >= y + y' - 1
                z[c, d, g, h] = var
        for g, h in pairs:
            flow = sum(int(t_int[t, c, d]) * z[c, d, g, h] for c, d in zip(*flows, strict=True))
            model.add(peak >= int(c_int[g, h]) * flow)
        peaks.append(peak)
    hint = _canonical_relabel(hint, gpus_per_node)
    hint_gpu = np.argsort(hint, axis=1)
    for t in range(num_layers):
        for c in range(num_gpus):
            for g in range(num_gpus):
                model.add_hint(y[t][c][g], int(hint_gpu[t, c] == g))
    model.minimize(sum(peaks))
    budget = deadline - time.perf_counter()
    if budget <= 0.01:
        return None, None, "heuristic", "CP-SAT skipped: no time left after building the model"
    result = solve_cpsat(model, budget, seed, gap, workers)
    if result.solver is None:
        return None, None, "heuristic", result.summary
    gpu_of_cluster = np.array([[[result.solver.boolean_value(y[t][c][g])
                                 for g in range(num_gpus)] for c in range(num_gpus)]
                               for t in range(num_layers)]).argmax(axis=2)
    bound = max(0.0, result.bound / (t_scale * c_scale))
    return np.argsort(gpu_of_cluster, axis=1), bound, result.status, result.summary


# ----------------------------------------------------------------------------- the method

def _replicated_items(load: np.ndarray, num_slots: int, num_gpus: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical experts per layer: ``item_expert [L, P]`` (logical id of each), ``item_load
    [L, P]`` (its share of the expert's load) and ``copies [L, E]``."""
    item_expert, _, copies = replicate_experts(load, num_slots, max_copies=num_gpus)
    item_load = np.take_along_axis(load / copies, item_expert, axis=1)
    return item_expert, item_load, copies


def _choose(params: dict, key: str, allowed: tuple[str, ...], default: str) -> str:
    value = str(params.get(key, default))
    if value not in allowed:
        raise InputError("--param", key, f"one of {', '.join(allowed)}", repr(value))
    return value


@dataclass(frozen=True)
class MoetunerParams(MethodParams):
    """Settings of ``moetuner`` (module docstring): cluster ``sizes``, the stage-2
    algorithm ``ilp2``, the stage-1 solver ``ilp1``, which ``transitions`` to use, solver
    ``workers``, the DP's state cap, stage 1's share of the time and the CP-SAT term cap."""

    sizes: str = field(default="equal", metadata={"choices": ("equal", "free")})
    ilp2: str = field(default="auto", metadata={"choices": ILP2_ALGORITHMS})
    ilp1: str = field(default="cpsat", metadata={"choices": ("cpsat", "highs")})
    transitions: str | None = field(default=None, metadata={"choices": ("top1", "topk")})
    workers: int = field(default=1, metadata={"min": 1})
    dp_max_states: int = field(default=120, metadata={"min": 1})
    stage1_share: float | None = field(default=None, metadata={"min": 0.0})
    max_terms: int = field(default=100_000, metadata={"min": 1})


@register("moetuner", may_leave_empty=True, params=MoetunerParams)
def solve(profile: Profile, cluster: Cluster, options: PlaceOptions
          ) -> tuple[np.ndarray, SolveRecord]:
    start = time.perf_counter()
    params = options.params
    sizes_mode = _choose(params, "sizes", ("equal", "free"), "equal")
    algorithm = _choose(params, "ilp2", ILP2_ALGORITHMS, "auto")
    ilp1_solver = _choose(params, "ilp1", ("cpsat", "highs"), "cpsat")
    which = _choose(params, "transitions", ("top1", "topk"),
                    "top1" if profile.transitions_top1 is not None else "topk")
    workers = int(params.get("workers", 1))
    num_gpus, num_layers = cluster.num_gpus, profile.num_layers
    slots = options.slots_per_gpu(profile.num_experts, num_gpus)
    if sizes_mode == "free" and algorithm in ("dp", "polish"):
        raise InputError("--param", "ilp2", "cpsat or heuristic with free sizes (the DP and "
                         "layer re-solves cannot hold the memory-balance constraint)", algorithm)
    if sizes_mode == "free" and options.redundant:
        raise InputError("--redundant", "redundant",
                         "0 with free cluster sizes (the paper's option A has no replicas)",
                         options.redundant)
    load = np.asarray(profile.load, dtype=np.float64)
    item_expert, item_load, copies = _replicated_items(load, slots * num_gpus, num_gpus)
    keys = item_expert if options.redundant else None

    # Stage 1: per-layer balanced clusters.
    dp_states = int(params.get("dp_max_states", 120))
    fits_dp = sizes_mode == "equal" and math.factorial(num_gpus) <= dp_states
    exact_stage2 = algorithm == "dp" or (algorithm == "auto" and fits_dp)
    # The exact DP takes well under a second: stage 1 then gets most of the time.
    stage1_budget = options.time_limit * float(params.get("stage1_share",
                                                          0.9 if exact_stage2 else 0.4))
    item_cluster = np.empty_like(item_expert)
    s1_obj = s1_bound = 0.0
    s1_status = set()
    for layer in range(num_layers):
        left = stage1_budget - (time.perf_counter() - start)
        budget = left / (num_layers - layer)
        found, obj, bound, status, _ = solve_balance(
            item_load[layer], num_gpus, None if sizes_mode == "free" else slots,
            None if keys is None else keys[layer], budget if budget >= 0.01 else 0.0,
            options.seed, options.gap, workers, ilp1_solver)
        item_cluster[layer] = found
        s1_obj += obj
        s1_bound += bound
        s1_status.add(status)
    stage1_status = ("heuristic" if "heuristic" in s1_status
                     else "time_limit" if "time_limit" in s1_status else "optimal")
    log = [f"ILP 1 ({sizes_mode} sizes, {ilp1_solver}): sum |load - mean| {s1_obj:.1f}, "
           f"bound {s1_bound:.1f}, {stage1_status}"]

    # Stage 2: clusters to GPUs across layers.
    deadline = start + options.time_limit
    cost = cluster.link_cost()
    layer_index = np.arange(num_layers)[:, None]
    share = np.zeros((num_layers, profile.num_experts, num_gpus))
    np.add.at(share, (layer_index, item_expert, item_cluster),
              1.0 / np.take_along_axis(copies, item_expert, axis=1))
    cluster_sizes = np.stack([np.bincount(row, minlength=num_gpus) for row in item_cluster])
    free_sizes = cluster_sizes if sizes_mode == "free" else None
    transitions = profile.transitions_top1 if which == "top1" else profile.transitions
    if transitions is None or num_layers < 2:
        gpu_of_cluster = np.tile(np.arange(num_gpus), (num_layers, 1))
        if free_sizes is not None:
            gpu_of_cluster = np.argsort(_initial_assignment(
                np.zeros((num_layers - 1, num_gpus, num_gpus)), free_sizes), axis=1)
        log.append("ILP 2 skipped: the profile has no transitions")
        objective, bound, stage2_status, used = None, None, "heuristic", "none"
    else:
        traffic = cluster_traffic(np.asarray(transitions, dtype=np.float64), share)
        terms = int(sum(np.count_nonzero(t) for t in traffic)) * int(np.count_nonzero(cost))
        fits_cpsat = terms <= int(params.get("max_terms", 100_000))
        used = algorithm
        if algorithm == "auto":
            used = ("dp" if fits_dp else "heuristic" if free_sizes is None
                    else "cpsat" if fits_cpsat else "heuristic")
        if used == "dp":
            gpu_of_cluster, objective = solve_traffic_dp(traffic, cost)
            bound, stage2_status = objective, "optimal"
            log.append(f"ILP 2 via dp (exact over {num_gpus}! permutations per layer)")
        else:
            initial = _initial_assignment(traffic, free_sizes)
            # Swaps get all the time alone, else half of what is left (they converge fast).
            swap_deadline = (deadline if used == "heuristic"
                             else (time.perf_counter() + deadline) / 2)
            heuristic = improve_by_swaps(traffic, cost, initial, free_sizes, swap_deadline)
            gpu_of_cluster = np.argsort(heuristic, axis=1)
            objective = traffic_objective(traffic, cost, gpu_of_cluster)
            bound, stage2_status = None, "heuristic"
            log.append(f"ILP 2 heuristic (assignment + swaps): {objective:.1f}")
            if used == "polish":
                polished = polish_layers_cpsat(traffic, cost, heuristic, deadline, options.seed,
                                               workers)
                value = traffic_objective(traffic, cost, np.argsort(polished, axis=1))
                log.append(f"ILP 2 layer re-solves (CP-SAT): {value:.1f}")
                if value < objective:
                    gpu_of_cluster, objective = np.argsort(polished, axis=1), value
            elif used == "cpsat" and fits_cpsat:
                memory = None
                if free_sizes is not None:
                    held = np.zeros(num_gpus, dtype=np.int64)
                    np.add.at(held, np.argsort(heuristic, axis=1), free_sizes)
                    memory = (int(held.min()), int(held.max()))
                found, cp_bound, cp_status, summary = solve_traffic_cpsat(
                    traffic, cost, heuristic, cluster.num_gpus // cluster.num_nodes, free_sizes,
                    memory, deadline, options.seed, options.gap, workers)
                log.append(f"ILP 2 via cpsat: {summary}")
                if found is not None:
                    bound = cp_bound
                    value = traffic_objective(traffic, cost, np.argsort(found, axis=1))
                    if value < objective:
                        gpu_of_cluster, objective = np.argsort(found, axis=1), value
                    stage2_status = ("optimal" if relative_gap(objective, bound) <= options.gap
                                     else "time_limit")
            elif used == "cpsat":
                log.append(f"ILP 2 cpsat skipped: {terms} product terms > max_terms; "
                           "heuristic kept")
    item_gpu = np.take_along_axis(gpu_of_cluster, item_cluster, axis=1)
    statuses = {stage1_status, stage2_status}
    status = ("heuristic" if "heuristic" in statuses
              else "time_limit" if "time_limit" in statuses else "optimal")
    record = SolveRecord(
        method="moetuner", status=status, objective=objective, bound=bound,
        solve_time=time.perf_counter() - start,
        objective_name="sum over layers of the max link-cost-weighted GPU-pair token traffic "
                       "(ILP 2)",
        log=f"ILP 2 algorithm: {used}; " + "; ".join(log))
    return pack_slots(item_expert, item_gpu, num_gpus), record
