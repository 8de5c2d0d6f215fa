"""Compiled (numba) kernels: the counting of ``profile`` and ``shards``, the replay
(``moetuner.engine``) and ``joint``'s balance search (``moetuner.methods._joint_balance``).

They live apart so that importing moetuner does not import numba (about 0.1 s): the modules
that count import this one inside the functions that call it.
"""

from __future__ import annotations

import numba
import numpy as np

# Experts considered for a moved replica slot in one pass of the balance search: the most
# loaded per copy.
REPLICA_CANDIDATES = 8


@numba.njit(cache=True, nogil=True)
def count_chunk(ids: np.ndarray, load: np.ndarray, transitions: np.ndarray,
                 transitions_top1: np.ndarray, coactivation_upper: np.ndarray) -> None:
    """Add one chunk ``ids [t, L, k]`` to the int64 counts ``load [L, E]``, ``transitions``
    and ``transitions_top1 [L-1, E, E]`` and ``coactivation_upper [L, E, E]`` (column a < b
    pairs only; ``RoutingCounter.profile`` makes it symmetric).

    Layers are the outer loop and the k x k pairs of one layer go to an int32 ``[E, E]``
    scratch table first (a chunk's counts fit int32): one hot table of 256 KB for E = 256
    instead of 58 int64 tables of 512 KB, which roughly doubles the speed at that size.
    """
    tokens, layers, k = ids.shape
    experts = load.shape[1]
    scratch = np.zeros((experts, experts), np.int32)
    for layer in range(layers):
        for token in range(tokens):
            for a in range(k):
                i = ids[token, layer, a]
                load[layer, i] += 1
                for b in range(a + 1, k):
                    scratch[i, ids[token, layer, b]] += 1
        flush(scratch, coactivation_upper[layer])
        if layer + 1 < layers:
            for token in range(tokens):
                for a in range(k):
                    i = ids[token, layer, a]
                    for b in range(k):
                        scratch[i, ids[token, layer + 1, b]] += 1
                transitions_top1[layer, ids[token, layer, 0], ids[token, layer + 1, 0]] += 1
            flush(scratch, transitions[layer])


@numba.njit(cache=True, nogil=True)
def flush(scratch: np.ndarray, counts: np.ndarray) -> None:
    """``counts += scratch``, then zero ``scratch`` (both ``[E, E]``)."""
    experts = scratch.shape[0]
    for i in range(experts):
        for j in range(experts):
            counts[i, j] += scratch[i, j]
            scratch[i, j] = 0


@numba.njit(cache=True, nogil=True)
def ids_valid(ids: np.ndarray, num_experts: int) -> bool:
    """Whether every ``ids [t, L, k]`` row holds k distinct ids in ``[0, num_experts)``: the
    check ``Trace`` makes, compiled (sorting each row costs twice the counting)."""
    tokens, layers, k = ids.shape
    for token in range(tokens):
        for layer in range(layers):
            for a in range(k):
                i = ids[token, layer, a]
                if i < 0 or i >= num_experts:
                    return False
                for b in range(a):
                    if ids[token, layer, b] == i:
                        return False
    return True


@numba.njit(cache=True, nogil=True)
def count_layer(ids, key, position, step, members, size, slots_per_gpu, node_of_gpu,
                per_node, pair_messages, follow, ordered, slot_pairs, dispatch, combine,
                matrix, tokens_in, moves, after):  # pragma: no cover - compiled
    """The replay kernel of one layer (``moetuner.engine.count_layer`` documents the
    arguments and semantics): adds into ``slot_pairs``, ``dispatch``, ``combine``,
    ``matrix``, ``tokens_in`` and ``moves`` and writes ``after``."""
    m, k = ids.shape
    G = node_of_gpu.shape[0]
    gpus = np.empty(k, dtype=np.int64)
    distinct = np.empty(k, dtype=np.int64)
    hits = np.zeros(G, dtype=np.int64)
    for t in range(m):
        c = position[t]
        s = step[t]
        count = 0
        for j in range(k):
            e = ids[t, j]
            slot = members[e, c, key[t] % size[e, c]]
            slot_pairs[s, slot] += 1
            g = slot // slots_per_gpu
            gpus[j] = g
            if hits[g] == 0:
                distinct[count] = g
                count += 1
            hits[g] += 1
        for i in range(count):
            g = distinct[i]
            tokens_in[g] += 1
            moves[0] += 1
            if g != c:
                matrix[0, c, g] += 1
                moves[1] += 1
                if node_of_gpu[g] != node_of_gpu[c]:
                    moves[2] += 1
        moves[3] += layer_messages(c, s, gpus, distinct, count, node_of_gpu, per_node,
                                   pair_messages, dispatch)
        if follow:
            if ordered:
                p = gpus[0]
            else:
                p = c if hits[c] > 0 else distinct[0]
                for i in range(count):
                    g = distinct[i]
                    if hits[g] > hits[p] or (hits[g] == hits[p] and p != c and g < p):
                        p = g
            layer_messages(p, s, gpus, distinct, count, node_of_gpu, per_node, pair_messages,
                           combine)
            for i in range(count):
                if distinct[i] != p:
                    matrix[1, distinct[i], p] += 1
            after[t] = p
        else:
            after[t] = c
        for i in range(count):
            hits[distinct[i]] = 0
    return 0


@numba.njit(cache=True, nogil=True)
def layer_messages(c, s, gpus, distinct, count, node_of_gpu, per_node, pair_messages,
                   out):  # pragma: no cover - compiled
    """Messages of one token leaving GPU c in step s into ``out [4, S, G]``; returns the
    distinct remote nodes it reaches."""
    node = node_of_gpu[c]
    remote = 0
    if pair_messages:
        for j in range(gpus.shape[0]):
            g = gpus[j]
            if g == c:
                continue
            if node_of_gpu[g] == node:
                out[0, s, c] += 1
                out[1, s, g] += 1
            else:
                out[2, s, c] += 1
                out[3, s, g] += 1
    for i in range(count):
        g = distinct[i]
        if g == c:
            continue
        if node_of_gpu[g] == node:
            if not pair_messages:
                out[0, s, c] += 1
                out[1, s, g] += 1
            continue
        # One message per distinct remote node: count it at its first GPU in the list.
        first = True
        for j in range(i):
            if node_of_gpu[distinct[j]] == node_of_gpu[g]:
                first = False
                break
        if first:
            remote += 1
            if not pair_messages:
                out[2, s, c] += 1
                out[3, s, node_of_gpu[g] * per_node + c % per_node] += 1
    return remote


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
def balance_search(counts, weight, floor, row, copies, num_gpus, a, r, x, max_passes,
                   replicas):  # pragma: no cover - compiled
    """``joint``'s balance search of one layer (``moetuner.methods._joint_balance``
    documents the surrogate and the moves): improves ``row`` and ``copies`` in place and
    returns the moves applied, the moves evaluated and whether the last pass found none."""
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
    evaluated = 0
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
                evaluated += 1
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
            gained, tried = _replica_pass(counts, weight, floor, row, copies, holds, G, a, r,
                                          x, eps)
            improved = gained > 0 or improved
            moves += gained
            evaluated += tried
            if improved:
                load, active, compute = _state(counts, row, copies, G, a, r)
                _top3(compute, top_c_i, top_c_v)
                _top3(load, top_l_i, top_l_v)
                for s in range(S):
                    now[s] = top_c_v[s, 0] + max(floor[s], x * top_l_v[s, 0])
        if not improved:
            converged = True
            break
    return moves, evaluated, converged


@numba.njit(cache=True, nogil=True)
def _replica_pass(counts, weight, floor, row, copies, holds, num_gpus, a, r, x,
                  eps):  # pragma: no cover - compiled
    """One pass of replica moves (slot p of an expert with several copies given to an
    expert not on p's GPU), each priced by recomputing the steps' costs; first improving
    move applied. Returns the moves applied and the moves evaluated."""
    S, E = counts.shape
    P = row.shape[0]
    per_gpu = P // num_gpus
    applied = 0
    tried = 0
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
            tried += 1
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
                applied += 1
                e1 = e2
                if copies[e1] < 2:
                    break
    return applied, tried
