"""``joint``'s fast search under ``return``: per layer, the slots' per-step loads.

Under ``return`` the layers are independent and, at serving scale, a layer of a step waits
for its busiest GPU three times: its expert compute (FLOPs or weight reads of its active
slots) and, on pair kernels (DeepEP low-latency, NCCL EP), the pairs it receives in
dispatch and sends back in combine (homes are spread over all GPUs, so each received pair
crosses nodes with probability 1 - 1/N), but never faster than its busiest sender (a GPU
sends the pairs of the tokens homed on it, which the placement barely changes). Per sampled
step s and GPU g, with ``L[s, g]`` the token-expert pairs of g (an expert's pairs split
evenly over its copies) and ``A[s, g]`` its slots that receive a token:

    cost(s) = max_g max(a L[s, g], r A[s, g]) + max(F[s], X max_g L[s, g])

(a: seconds per pair of compute, r: per active slot read, X: exchange seconds per received
pair, dispatch plus combine; F[s]: the senders' floor, seconds; the kernels' latencies are
the same for every placement).
``search_layer`` minimises the weighted mean of cost(s) over the steps with two moves, each
priced exactly for this surrogate in O(S) from every step's three largest values: swapping
the experts of two slots on different GPUs, and giving a slot of an expert with copies to
spare to another expert (replica counts are the search's own). Moves are tried in a fixed
order and the first improving one applied, so the result depends on the inputs alone; it
stops when a whole pass finds no improving move (converged) or after ``max_passes``.
The exact objective (``_joint_objective``) judges the result.
"""

from __future__ import annotations

import numba
import numpy as np

# Experts considered for a moved replica slot in one pass: the most loaded per copy.
REPLICA_CANDIDATES = 8


def search_layer(counts: np.ndarray, weight: np.ndarray, floor: np.ndarray, row: np.ndarray,
                 num_gpus: int, num_experts: int, seconds: tuple[float, float, float],
                 max_passes: int, replicas: bool) -> tuple[np.ndarray, int, bool]:
    """Improve one layer's ``row`` for the surrogate (module docstring).

    Args:
        counts: float64 ``[S, E]`` token-expert pairs of each expert in each sampled step.
        weight: float64 ``[S]`` each step's weight in the mean.
        floor: float64 ``[S]`` the senders' floor F of each step (seconds).
        row: int ``[P]`` expert of each slot (every expert at least once); slot p on GPU
            p // (P / G).
        seconds: (a, r, X) of the module docstring.
        max_passes: passes over all moves at most.
        replicas: whether slots may change expert (replica counts move).

    Returns:
        The new row, the moves applied and whether the last pass found none (converged).
    """
    row = np.array(row, dtype=np.int64)
    copies = np.bincount(row, minlength=num_experts).astype(np.int64)
    a, r, x = seconds
    moves, converged = _search(np.ascontiguousarray(counts, dtype=np.float64),
                               np.ascontiguousarray(weight, dtype=np.float64),
                               np.ascontiguousarray(floor, dtype=np.float64), row, copies,
                               num_gpus, float(a), float(r), float(x), int(max_passes),
                               bool(replicas))
    return row, int(moves), bool(converged)


@numba.njit(cache=True, nogil=True)
def _top3(values, out_index, out_value):  # pragma: no cover - compiled
    """Per row of ``values [S, G]``: the three largest values and their columns."""
    S, G = values.shape
    for s in range(S):
        for i in range(3):
            out_index[s, i] = -1
            out_value[s, i] = -np.inf
        for g in range(G):
            v = values[s, g]
            if v > out_value[s, 0]:
                out_value[s, 2], out_index[s, 2] = out_value[s, 1], out_index[s, 1]
                out_value[s, 1], out_index[s, 1] = out_value[s, 0], out_index[s, 0]
                out_value[s, 0], out_index[s, 0] = v, g
            elif v > out_value[s, 1]:
                out_value[s, 2], out_index[s, 2] = out_value[s, 1], out_index[s, 1]
                out_value[s, 1], out_index[s, 1] = v, g
            elif v > out_value[s, 2]:
                out_value[s, 2], out_index[s, 2] = v, g


@numba.njit(cache=True, nogil=True)
def _max_other(index, value, s, g1, g2):  # pragma: no cover - compiled
    """The largest of row s outside columns g1 and g2 (0 when there is none)."""
    for i in range(3):
        if index[s, i] != g1 and index[s, i] != g2 and index[s, i] >= 0:
            return value[s, i]
    return 0.0


@numba.njit(cache=True, nogil=True)
def _state(counts, row, copies, num_gpus, a, r):  # pragma: no cover - compiled
    S = counts.shape[0]
    P = row.shape[0]
    per_gpu = P // num_gpus
    load = np.zeros((S, num_gpus))
    active = np.zeros((S, num_gpus))
    for p in range(P):
        e = row[p]
        g = p // per_gpu
        for s in range(S):
            c = counts[s, e]
            load[s, g] += c / copies[e]
            if c > 0:
                active[s, g] += 1.0
    compute = np.maximum(a * load, r * active)
    return load, active, compute


@numba.njit(cache=True, nogil=True)
def _search(counts, weight, floor, row, copies, num_gpus, a, r, x, max_passes,
            replicas):  # pragma: no cover - compiled
    S, E = counts.shape
    P = row.shape[0]
    G = num_gpus
    per_gpu = P // G
    holds = np.zeros((E, G), dtype=np.int64)
    for p in range(P):
        holds[row[p], p // per_gpu] += 1
    load, active, compute = _state(counts, row, copies, G, a, r)
    top_c_i = np.empty((S, 3), dtype=np.int64)
    top_c_v = np.empty((S, 3))
    top_l_i = np.empty((S, 3), dtype=np.int64)
    top_l_v = np.empty((S, 3))
    _top3(compute, top_c_i, top_c_v)
    _top3(load, top_l_i, top_l_v)
    now = np.empty(S)
    for s in range(S):
        now[s] = top_c_v[s, 0] + max(floor[s], x * top_l_v[s, 0])
    scale = 0.0
    for s in range(S):
        scale += weight[s] * now[s]
    eps = 1e-12 * max(scale, 1e-30)
    moves = 0
    converged = False
    for _ in range(max_passes):
        improved = False
        for p in range(P):
            g1 = p // per_gpu
            for q in range(p + 1, P):
                g2 = q // per_gpu
                e1, e2 = row[p], row[q]
                if g1 == g2 or e1 == e2 or holds[e1, g2] > 0 or holds[e2, g1] > 0:
                    continue
                delta = 0.0
                for s in range(S):
                    w1 = counts[s, e1] / copies[e1]
                    w2 = counts[s, e2] / copies[e2]
                    if w1 == w2:
                        continue
                    l1 = load[s, g1] - w1 + w2
                    l2 = load[s, g2] - w2 + w1
                    a1 = active[s, g1] - (w1 > 0) + (w2 > 0)
                    a2 = active[s, g2] - (w2 > 0) + (w1 > 0)
                    c = max(_max_other(top_c_i, top_c_v, s, g1, g2),
                            max(a * l1, r * a1), max(a * l2, r * a2))
                    m = max(_max_other(top_l_i, top_l_v, s, g1, g2), l1, l2)
                    delta += weight[s] * (c + max(floor[s], x * m) - now[s])
                if delta < -eps:
                    row[p], row[q] = e2, e1
                    holds[e1, g1] -= 1
                    holds[e2, g2] -= 1
                    holds[e2, g1] += 1
                    holds[e1, g2] += 1
                    for s in range(S):
                        w1 = counts[s, e1] / copies[e1]
                        w2 = counts[s, e2] / copies[e2]
                        load[s, g1] += w2 - w1
                        load[s, g2] += w1 - w2
                        active[s, g1] += (w2 > 0) - (w1 > 0)
                        active[s, g2] += (w1 > 0) - (w2 > 0)
                        for g in (g1, g2):
                            compute[s, g] = max(a * load[s, g], r * active[s, g])
                    _top3(compute, top_c_i, top_c_v)
                    _top3(load, top_l_i, top_l_v)
                    for s in range(S):
                        now[s] = top_c_v[s, 0] + max(floor[s], x * top_l_v[s, 0])
                    moves += 1
                    improved = True
        if replicas:
            improved = _replica_pass(counts, weight, floor, row, copies, holds, G, a, r, x,
                                     eps) or improved
            if improved:
                load, active, compute = _state(counts, row, copies, G, a, r)
                _top3(compute, top_c_i, top_c_v)
                _top3(load, top_l_i, top_l_v)
                for s in range(S):
                    now[s] = top_c_v[s, 0] + max(floor[s], x * top_l_v[s, 0])
        if not improved:
            converged = True
            break
    return moves, converged


@numba.njit(cache=True, nogil=True)
def _replica_pass(counts, weight, floor, row, copies, holds, num_gpus, a, r, x,
                  eps):  # pragma: no cover - compiled
    """One pass of replica moves (slot p of an expert with several copies given to an
    expert not on p's GPU), each priced by recomputing the steps' costs; first improving
    move applied. Returns whether any was."""
    S, E = counts.shape
    P = row.shape[0]
    per_gpu = P // num_gpus
    improved = False
    load, active, compute = _state(counts, row, copies, num_gpus, a, r)
    base = 0.0
    for s in range(S):
        base += weight[s] * (compute[s].max() + max(floor[s], x * load[s].max()))
    trial_load = np.empty(num_gpus)
    trial_active = np.empty(num_gpus)
    # Candidates to receive a slot: the experts with the most pairs per copy.
    per_copy = np.zeros(E)
    for e in range(E):
        for s in range(S):
            per_copy[e] += weight[s] * counts[s, e] / copies[e]
    hottest = np.argsort(-per_copy)[:REPLICA_CANDIDATES]
    for p in range(P):
        e1 = row[p]
        if copies[e1] < 2:
            continue
        g = p // per_gpu
        for e2 in hottest:
            if e2 == e1 or holds[e2, g] > 0:
                continue
            total = 0.0
            for s in range(S):
                for h in range(num_gpus):
                    trial_load[h] = load[s, h]
                    trial_active[h] = active[s, h]
                # e1 loses slot p: its other copies take a larger share; e2 gains slot p.
                old1 = counts[s, e1] / copies[e1]
                new1 = counts[s, e1] / (copies[e1] - 1)
                old2 = counts[s, e2] / copies[e2]
                new2 = counts[s, e2] / (copies[e2] + 1)
                for q in range(P):
                    h = q // per_gpu
                    if row[q] == e1 and q != p:
                        trial_load[h] += new1 - old1
                    elif row[q] == e2:
                        trial_load[h] += new2 - old2
                trial_load[g] += new2 - old1
                trial_active[g] += (counts[s, e2] > 0) - (counts[s, e1] > 0)
                peak_c = 0.0
                peak_l = 0.0
                for h in range(num_gpus):
                    peak_c = max(peak_c, max(a * trial_load[h], r * trial_active[h]))
                    peak_l = max(peak_l, trial_load[h])
                total += weight[s] * (peak_c + max(floor[s], x * peak_l))
            if total < base - eps:
                row[p] = e2
                holds[e1, g] -= 1
                holds[e2, g] += 1
                copies[e1] -= 1
                copies[e2] += 1
                load, active, compute = _state(counts, row, copies, num_gpus, a, r)
                base = total
                improved = True
                e1 = e2
                if copies[e1] < 2:
                    break
    return improved
