"""``joint``: one placement optimising balance and traffic together, replica- and drift-aware.

Minimises the surrogate of the predicted MoE-layer time in ``_joint_objective`` (slowest
GPU's expert work plus same-layer co-activation and, under ``follow``, cross-layer traffic,
with cross-node messages weighted by the bandwidth ratio) for ``options.exec_model``.

How:

1. **Warm start.** The baselines ``linear``, ``round_robin``, ``eplb_fixed`` (and ``moetuner``
   when registered) are scored with the objective; the search starts from the best and never
   returns anything worse. Replica counts come from the warm start (EPLB's: each extra copy
   to the expert with the most load per copy); copies of one expert never share a GPU.
2. **Exact path.** When every layer has at most ``EXACT_STATES`` equal-slot placements (tiny
   instances), a dynamic program over layers finds the optimum of the mean objective (the
   cost is a chain: layer terms plus consecutive-layer terms); status ``optimal``.
3. **Search.** Layer by layer with both neighbours fixed, steepest-descent swaps of two
   slots' experts between GPUs (all swaps of a layer scored at once in numpy, ties broken
   towards flatter GPU loads), then random kicks (a few swaps) followed by descent, kept
   when they help. Layers whose neighbours are fixed are independent, so even and odd layers
   (all layers under ``return``) are improved in parallel by a process pool (``workers``).
4. **Bound.** Per-layer bounds (``lower_bound``): gap = (objective - bound) / objective.

Params (``options.params``): ``profiles`` (list of ``Profile``, default ``[profile]``),
``weights`` (one per profile, default equal), ``robust`` (``mean`` or ``max`` over
profiles), ``model`` (a preset name weighing compute against traffic; default: the preset
with the profile's shape), ``coefficients`` (a ``CostCoefficients`` calibration),
``workers`` (processes, default 2), ``warm_start`` (list of baseline names), ``kicks``
(random kicks per layer visit, default 2). The record's log
reports how much the profiles disagree (per-layer load correlation).

Deterministic for a seed when the search converges before the time limit and the
``moetuner`` warm start (a wall-clock share of the limit) finishes within its share; pass
``warm_start=["eplb_fixed", "linear", "round_robin"]`` for a run that depends on the seed only
(up to the limit).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np

from moetuner.cluster import Cluster
from moetuner.errors import InputError
from moetuner.methods import PlaceOptions, SolveRecord, methods, register
from moetuner.methods._joint_objective import (
    JointProblem,
    build_problem,
    fractions,
    layer_costs,
    load_correlation,
    lower_bound,
    model_for,
    objective,
)
from moetuner.placement import Placement
from moetuner.profile import Profile

WARM_STARTS = ("eplb_fixed", "linear", "round_robin", "moetuner")
# Largest number of placements of one layer for which the exact dynamic program runs, and of
# candidates tried when listing them.
EXACT_STATES = 1500
ENUMERATE = 50_000
# Share of the time limit the warm-start baselines may use, and the margin kept at the end.
WARM_SHARE = 0.15
INSTANT = ("eplb_fixed", "linear", "round_robin")
END_MARGIN = 0.03
# Steepest-descent moves per layer visit (a cap that guarantees termination).
MOVES_PER_SLOT = 4

# The problem a worker process optimises (set before the pool forks).
_PROBLEM: JointProblem | None = None


@register("joint")
def solve(profile: Profile, cluster: Cluster, options: PlaceOptions
          ) -> tuple[np.ndarray, SolveRecord]:
    """Place with the joint objective (module docstring)."""
    start = time.perf_counter()
    params = options.params
    profiles = list(params.get("profiles") or [profile])
    weights = np.asarray(params.get("weights") or [1.0] * len(profiles), dtype=np.float64)
    slots_per_gpu = options.slots_per_gpu(profile.num_experts, cluster.num_gpus)
    problem = build_problem(profiles, weights, cluster, slots_per_gpu, options.exec_model,
                            str(params.get("robust", "mean")),
                            model_for(profile, params.get("model")), params.get("coefficients"))
    log = [disagreement(profiles)]
    scores, eval_seconds = _warm_starts(profile, cluster, options, problem,
                                        params.get("warm_start", WARM_STARTS), start)
    # Keep time to score the last phase and the result: the limit holds within a few %.
    deadline = start + options.time_limit - max(options.time_limit * END_MARGIN,
                                                3 * eval_seconds)
    best_name = min(scores, key=lambda name: scores[name][1])
    phy2log, best = scores[best_name]
    log.append("warm start " + ", ".join(f"{name} {value[1]:.6g}"
                                         for name, value in scores.items())
               + f" -> {best_name}")
    bound = lower_bound(problem, options.redundant)
    rows = None
    if (_count_choices(problem.num_experts, cluster.num_gpus, slots_per_gpu) <= ENUMERATE
            and (problem.robust == "mean" or problem.num_profiles == 1)):
        rows = enumerate_rows(problem.num_experts, cluster.num_gpus, slots_per_gpu)
    if rows is not None and len(rows) <= EXACT_STATES:
        exact = exact_placement(problem, rows)
        value = objective(problem, exact)
        if value <= best:
            phy2log, best = exact, value
        log.append(f"exact dynamic program over {len(rows)} placements per layer")
        return phy2log, SolveRecord(method="joint", status="optimal", objective=best,
                                    bound=best, objective_name=_objective_name(problem),
                                    log="; ".join(log))
    workers = int(params.get("workers", min(2, os.cpu_count() or 1)))
    phy2log, sweeps, timed_out = local_search(problem, phy2log, deadline - 2 * eval_seconds,
                                              options.seed, workers,
                                              int(params.get("kicks", 2)))
    value = objective(problem, phy2log)
    if value > best:  # rounding in incremental deltas; keep the warm start
        phy2log, value = scores[best_name][0], best
    log.append(f"local search: {sweeps} sweeps, {workers} workers, from {best:.6g} to "
               f"{value:.6g}")
    return phy2log, SolveRecord(method="joint", status="time_limit" if timed_out else
                                "heuristic", objective=value, bound=min(bound, value),
                                objective_name=_objective_name(problem), log="; ".join(log))


def _objective_name(problem: JointProblem) -> str:
    return (f"surrogate predicted MoE-layer seconds per batch ({problem.exec_model}, "
            f"{problem.robust} over {problem.num_profiles} profile(s))")


def disagreement(profiles: list[Profile]) -> str:
    """How much the profiles disagree: per-layer load correlation between each pair."""
    if len(profiles) < 2:
        return "one profile"
    corr = load_correlation(profiles)
    pairs = np.triu_indices(len(profiles), k=1)
    values = corr[pairs[0], pairs[1]]                                          # [pairs, L]
    return (f"profile disagreement: per-layer load correlation mean {values.mean():.2f}, "
            f"min {values.min():.2f} over {len(profiles)} profiles")


def _warm_starts(profile: Profile, cluster: Cluster, options: PlaceOptions,
                 problem: JointProblem, names, start: float
                 ) -> tuple[dict[str, tuple[np.ndarray, float]], float]:
    """Score each available, engine-loadable baseline placement with the objective.

    Returns name -> (phy2log, objective) and the longest time one scoring took. A baseline
    other than the instant ones is skipped once ``WARM_SHARE`` of the time limit is used.
    """
    available = methods()
    budget = replace(options, time_limit=max(options.time_limit * WARM_SHARE, 0.1), params={})
    scores, eval_seconds = {}, 0.0
    for name in names:
        if name not in available or name == "joint":
            continue
        if name not in INSTANT and time.perf_counter() - start > (
                options.time_limit * WARM_SHARE):
            continue
        phy2log, _ = available[name](profile, cluster, budget)
        phy2log = np.asarray(phy2log, dtype=np.int64)
        try:
            Placement(phy2log=phy2log, num_gpus=cluster.num_gpus,
                      num_experts=profile.num_experts)
        except InputError:  # empty slots or shared GPUs: not a valid start
            continue
        scored = time.perf_counter()
        scores[name] = (phy2log, objective(problem, phy2log))
        eval_seconds = max(eval_seconds, time.perf_counter() - scored)
    if not scores:
        raise InputError("params", "warm_start", f"at least one of {', '.join(WARM_STARTS)}",
                         list(names))
    return scores, eval_seconds


def _count_choices(num_experts: int, num_gpus: int, slots_per_gpu: int) -> int:
    """Candidates ``enumerate_rows`` tries: C(E, S) choices on each GPU."""
    return math.comb(num_experts, slots_per_gpu) ** num_gpus


def enumerate_rows(num_experts: int, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """``[n, P]`` every placement of one layer: S distinct experts per GPU (ascending), every
    expert on some GPU. Only for tiny shapes (``_count_choices`` candidates are tried)."""
    choices = list(itertools.combinations(range(num_experts), slots_per_gpu))
    rows = [sum(combo, ()) for combo in itertools.product(choices, repeat=num_gpus)
            if len(set(sum(combo, ()))) == num_experts]
    return np.array(rows, dtype=np.int64).reshape(-1, num_gpus * slots_per_gpu)


def exact_placement(problem: JointProblem, rows: np.ndarray | None = None) -> np.ndarray:
    """``[L, P]`` the optimum of the weighted-mean objective by dynamic programming.

    The objective is a sum of per-layer terms and consecutive-layer terms (follow stays), so
    the best chain of per-layer placements is found layer by layer.
    """
    G, S, L = problem.num_gpus, problem.slots_per_gpu, problem.num_layers
    if rows is None:
        rows = enumerate_rows(problem.num_experts, G, S)                       # [n, P]
    n = len(rows)
    # Per-layer terms of each state: the objective of a placement repeating it in every layer
    # minus its stay terms, which are added per pair of states below.
    unary = np.empty((L, n))
    for index, row in enumerate(rows):
        costs = layer_costs(problem, np.tile(row, (L, 1)))                     # [Q, L]
        unary[:, index] = problem.weights @ (costs + _stay_terms(problem, row, row))
    X = np.stack([fractions(problem, row[None])[0] for row in rows])           # [n, E, G]
    Y = problem.per_node(X)
    total = unary[0].copy()
    back = np.zeros((L, n), dtype=np.int64)
    for layer in range(1, L):
        pair = np.zeros((n, n))
        for q, w in enumerate(problem.weights):
            A = problem.follow_pairs[q, layer - 1]
            stay_gpu = np.einsum("aeg,ef,bfg->ab", X, A, X)
            stay_node = np.einsum("aev,ef,bfv->ab", Y, A, Y)
            pair -= w * problem.s[layer] * (problem.u_gpu[q] * stay_gpu
                                            + problem.u_node[q] * stay_node)
        candidate = total[:, None] + pair                                      # [prev, next]
        back[layer] = candidate.argmin(axis=0)
        total = candidate.min(axis=0) + unary[layer]
    chosen = np.empty(L, dtype=np.int64)
    chosen[-1] = int(total.argmin())
    for layer in range(L - 1, 0, -1):
        chosen[layer - 1] = back[layer, chosen[layer]]
    return rows[chosen]


def _stay_terms(problem: JointProblem, prev_row: np.ndarray, row: np.ndarray) -> np.ndarray:
    """``[Q, L]`` the stay part of ``layer_costs`` negated, for ``prev_row`` before ``row`` in
    every layer (so that adding it removes the stay terms)."""
    L = problem.num_layers
    out = np.zeros((problem.num_profiles, L))
    if L == 1:
        return out
    Xp = fractions(problem, prev_row[None])[0]
    X = fractions(problem, row[None])[0]
    Yp, Y = problem.per_node(Xp), problem.per_node(X)
    stay_gpu = np.einsum("qlef,eg,fg->ql", problem.follow_pairs, Xp, X)
    stay_node = np.einsum("qlef,ev,fv->ql", problem.follow_pairs, Yp, Y)
    out[:, 1:] = problem.s[1:] * (problem.u_gpu[:, None] * stay_gpu
                                  + problem.u_node[:, None] * stay_node)
    return out


def local_search(problem: JointProblem, phy2log: np.ndarray, deadline: float, seed: int,
                 workers: int, kicks: int) -> tuple[np.ndarray, int, bool]:
    """Improve ``phy2log [L, P]`` layer by layer until no layer improves or the deadline.

    Returns the placement, the sweeps made and whether the deadline stopped the search.
    """
    global _PROBLEM
    _PROBLEM = problem
    phy2log = phy2log.copy()
    L = problem.num_layers
    independent = problem.exec_model == "return" or L == 1
    phases = [list(range(L))] if independent else [list(range(0, L, 2)),
                                                   list(range(1, L, 2))]
    pool = None
    if workers > 1 and L > 1:
        pool = ProcessPoolExecutor(max_workers=workers,
                                   mp_context=multiprocessing.get_context("fork"))
    sweeps = 0
    try:
        while time.perf_counter() < deadline:
            improved = False
            for phase in phases:
                totals = layer_costs(problem, phy2log).sum(axis=1)
                before = problem.combine(totals)
                X = fractions(problem, phy2log)
                tasks = [(layer, phy2log[layer], X[layer - 1] if layer else None,
                          X[layer + 1] if layer + 1 < L else None, totals, deadline,
                          seed * 1_000_003 + sweeps * L + layer, kicks) for layer in phase]
                results = list(pool.map(_improve_task, tasks)) if pool else [
                    _improve_task(task) for task in tasks]
                trial = phy2log.copy()
                for layer, (row, _) in zip(phase, results, strict=True):
                    trial[layer] = row
                after = objective(problem, trial)
                if after < before - 1e-12 * abs(before):
                    phy2log, improved = trial, True
                elif problem.robust == "max" and any(delta.min() < 0 for _, delta in results):
                    # Parallel layers may together raise another profile: redo one by one.
                    for layer in phase:
                        if time.perf_counter() >= deadline:
                            break
                        totals = layer_costs(problem, phy2log).sum(axis=1)
                        X = fractions(problem, phy2log)
                        row, _ = _improve_task((layer, phy2log[layer],
                                                X[layer - 1] if layer else None,
                                                X[layer + 1] if layer + 1 < L else None,
                                                totals, deadline, seed + layer, kicks))
                        trial = phy2log.copy()
                        trial[layer] = row
                        if objective(problem, trial) < objective(problem, phy2log):
                            phy2log, improved = trial, True
            sweeps += 1
            if not improved:
                return phy2log, sweeps, False
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return phy2log, sweeps, True


def _improve_task(task: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Descend on one layer, then try ``kicks`` random kicks from the best row found.

    Returns the layer's new row and the change ``[Q]`` of each profile's total.
    """
    layer, row, prev_X, next_X, totals, deadline, seed, kicks = task
    problem = _PROBLEM
    assert problem is not None
    search = LayerSearch(problem, layer, row, prev_X, next_X, totals)
    search.descend(deadline)
    best_row, best_delta, base = search.row(), search.delta.copy(), np.zeros_like(totals)
    rng = np.random.default_rng(seed)
    for _ in range(kicks):
        if time.perf_counter() >= deadline:
            break
        search.kick(rng, max(2, search.P // 16))
        search.descend(deadline)
        candidate = base + search.delta
        if problem.combine(totals + candidate) < problem.combine(totals + best_delta):
            best_row, best_delta = search.row(), candidate
        else:
            search = LayerSearch(problem, layer, best_row, prev_X, next_X, totals + best_delta)
            base = best_delta.copy()
    return best_row, best_delta


class LayerSearch:
    """Swap search over one layer's slots with the neighbouring layers fixed.

    Items are the layer's P slots' contents (expert ``e[s]``, token share ``f[s]`` = 1 /
    copies) placed on GPUs ``gpu[s]``. For Q profiles the layer's cost is

        max_g W[q, g] - sum over item pairs on one GPU of Qg[q] - on one node of Qn[q]
        + sum_s lin[q, s, gpu[s]]   (+ constants)

    with ``W`` the GPUs' work, ``Qg``/``Qn`` the co-activation savings and ``lin`` the stay
    savings towards the fixed neighbours (``_joint_objective``). ``delta [Q]`` accumulates
    the change of each profile's cost.
    """

    def __init__(self, problem: JointProblem, layer: int, row: np.ndarray,
                 prev_X: np.ndarray | None, next_X: np.ndarray | None,
                 totals: np.ndarray) -> None:
        self.problem, self.totals = problem, totals
        G, S = problem.num_gpus, problem.slots_per_gpu
        self.P = len(row)
        self.node = problem.node_of_gpu
        self.e = np.asarray(row, dtype=np.int64)
        self.gpu = np.arange(self.P) // S
        copies = np.bincount(self.e, minlength=problem.num_experts)
        self.f = 1.0 / copies[self.e]                                          # [P]
        ff = self.f[:, None] * self.f[None, :]
        C = problem.coact[:, layer][:, self.e][:, :, self.e] * ff              # [Q, P, P]
        C[:, self.e[:, None] == self.e[None, :]] = 0.0
        self.Qg = C * (problem.u_gpu * problem.cg[layer])[:, None, None]
        self.Qn = C * (problem.u_node * problem.cn[layer])[:, None, None]
        self.work = problem.work[:, layer][:, self.e] * self.f                 # [Q, P]
        self.lin = self._linear(layer, prev_X, next_X)                         # [Q, P, G]
        onehot = np.eye(G)[self.gpu]                                           # [P, G]
        self.Kg = self.Qg @ onehot                                             # [Q, P, G]
        self.Kn = self.Qn @ np.eye(problem.num_nodes)[self.node[self.gpu]]     # [Q, P, N]
        self.W = np.einsum("qp,pg->qg", self.work, onehot)                     # [Q, G]
        self.has = np.zeros((problem.num_experts, G), dtype=bool)
        self.has[self.e, self.gpu] = True
        self.delta = np.zeros(problem.num_profiles)
        # Smallest decrease of the sum of squared GPU work that counts as flatter.
        self.flat_tolerance = 1e-9 * float((self.W ** 2).mean())

    def _linear(self, layer: int, prev_X: np.ndarray | None, next_X: np.ndarray | None
                ) -> np.ndarray:
        """``[Q, P, G]`` stay savings (negative costs) of each item on each GPU."""
        p = self.problem
        lin = np.zeros((p.num_profiles, self.P, p.num_gpus))
        last = layer + 1 == p.num_layers
        if prev_X is not None and p.s[layer]:
            # Stay_l: tokens from layer l-1's experts (fixed) to this layer's.
            towards = np.einsum("qij,ig->qjg", p.follow_pairs[:, layer - 1], prev_X)
            lin -= p.s[layer] * self._stay_saving(towards)
        if next_X is not None and not last and p.s[layer + 1]:
            # Stay_{l+1}: tokens from this layer's experts to layer l+1's (fixed).
            towards = np.einsum("qij,jg->qig", p.follow_pairs[:, layer], next_X)
            lin -= p.s[layer + 1] * self._stay_saving(towards)
        return lin

    def _stay_saving(self, towards: np.ndarray) -> np.ndarray:
        """``[Q, P, G]`` stay savings per item and GPU from ``towards [Q, E, G]`` (follow
        counts of each expert towards the fixed layer's experts on each GPU)."""
        p = self.problem
        by_node = p.per_node(towards)[..., self.node]
        return self.f[None, :, None] * (p.u_gpu[:, None, None] * towards[:, self.e]
                                        + p.u_node[:, None, None] * by_node[:, self.e])

    def row(self) -> np.ndarray:
        """``[P]`` the layer's phy2log row: each GPU's experts in ascending order."""
        order = np.lexsort((self.e, self.gpu))
        return self.e[order]

    def _deltas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cost change ``[Q, P, P]`` of every swap, its flatness change and the legal mask."""
        g, n = self.gpu, self.node[self.gpu]
        Kg = self.Kg[:, :, g]                                                  # [Q, s, t]
        dg = np.diagonal(Kg, axis1=1, axis2=2)[:, :, None]                     # [Q, s, 1]
        gain = Kg + Kg.transpose(0, 2, 1) - dg - dg.transpose(0, 2, 1) - 2 * self.Qg
        other_node = n[:, None] != n[None, :]
        if other_node.any():
            Kn = self.Kn[:, :, n]
            dn = np.diagonal(Kn, axis1=1, axis2=2)[:, :, None]
            gain += other_node * (Kn + Kn.transpose(0, 2, 1) - dn - dn.transpose(0, 2, 1)
                                  - 2 * self.Qn)
        lin = self.lin[:, :, g]
        dl = np.diagonal(lin, axis1=1, axis2=2)[:, :, None]
        change = lin + lin.transpose(0, 2, 1) - dl - dl.transpose(0, 2, 1) - gain
        # Balance: the two GPUs' work after the swap against the rest's maximum.
        moved = self.work[:, None, :] - self.work[:, :, None]                  # w_t - w_s
        w1 = self.W[:, g][:, :, None] + moved
        w2 = self.W[:, g][:, None, :] - moved
        rest = self._max_excluding()[:, g][:, :, g]
        peak = self.W.max(axis=1)[:, None, None]
        change += np.maximum(rest, np.maximum(w1, w2)) - peak
        flat = (w1 ** 2 + w2 ** 2 - self.W[:, g][:, :, None] ** 2
                - self.W[:, g][:, None, :] ** 2)
        legal = ((g[:, None] != g[None, :]) & ~self.has[self.e][:, g].T
                 & ~self.has[self.e][:, g] & (self.e[:, None] != self.e[None, :]))
        return change, flat, legal

    def _max_excluding(self) -> np.ndarray:
        """``[Q, G, G]`` largest GPU work outside GPUs a and b."""
        G = self.problem.num_gpus
        if G <= 2:
            return np.zeros((self.problem.num_profiles, G, G))
        order = np.argsort(-self.W, axis=1)[:, :3, None, None]                 # [Q, 3, 1, 1]
        top = np.take_along_axis(self.W, order[:, :, 0, 0], axis=1)[:, :, None, None]
        a, b = np.arange(G)[:, None], np.arange(G)[None, :]
        outside = (a != order) & (b != order)                                  # [Q, 3, G, G]
        return np.where(outside[:, 0], top[:, 0],
                        np.where(outside[:, 1], top[:, 1], top[:, 2]))

    def _combined(self, change: np.ndarray) -> np.ndarray:
        """The objective's change for per-profile changes ``[Q, ...]``."""
        p = self.problem
        if p.robust == "max":
            now = self.totals + self.delta
            return (now[:, None, None] + change).max(axis=0) - now.max()
        return np.einsum("q,q...->...", p.weights, change)

    def descend(self, deadline: float) -> None:
        """Apply improving swaps until none lowers the cost (or flattens loads at no cost),
        the move cap or the deadline.

        All swaps are scored at once; then the best ones on distinct GPU pairs are applied
        in order, each re-scored exactly first (swaps interact through nodes and the
        busiest GPU), so one scoring pays for up to G / 2 moves.
        """
        scale = max(abs(float(self.problem.combine(self.totals))), 1e-300)
        moves = 0
        while moves < MOVES_PER_SLOT * self.P and time.perf_counter() < deadline:
            change, flat, legal = self._deltas()
            total = np.where(legal, self._combined(change), np.inf)
            improving = np.flatnonzero(total < -1e-12 * scale)
            if improving.size:
                order = improving[np.argsort(total.ravel()[improving], kind="stable")]
                moves += self._apply_batch(order, -1e-12 * scale)
                continue
            flat_total = np.where(legal & (total <= 0),
                                  np.einsum("q,q...->...", self.problem.weights, flat), np.inf)
            s, t = np.unravel_index(int(np.argmin(flat_total)), flat_total.shape)
            if flat_total[s, t] >= -self.flat_tolerance:
                return
            self._swap(s, t, change[:, s, t])
            moves += 1

    def _apply_batch(self, order: np.ndarray, threshold: float) -> int:
        """Apply swaps from ``order`` (flat indices into [P, P], best first) that touch GPUs
        no earlier swap of the batch touched and still improve when re-scored."""
        used = np.zeros(self.problem.num_gpus, dtype=bool)
        applied = 0
        for index in order[: 4 * self.problem.num_gpus]:
            s, t = divmod(int(index), self.P)
            g1, g2 = self.gpu[s], self.gpu[t]
            if used[g1] or used[g2]:
                continue
            change = self._swap_change(s, t)
            if self._combined(change[:, None, None])[0, 0] < threshold:
                self._swap(s, t, change)
                used[g1] = used[g2] = True
                applied += 1
        return applied

    def _swap_change(self, s: int, t: int) -> np.ndarray:
        """``[Q]`` exact cost change of swapping items s and t now (a legal swap)."""
        g1, g2 = self.gpu[s], self.gpu[t]
        n1, n2 = self.node[g1], self.node[g2]
        gain = (self.Kg[:, s, g2] - self.Kg[:, s, g1] + self.Kg[:, t, g1] - self.Kg[:, t, g2]
                - 2 * self.Qg[:, s, t])
        if n1 != n2:
            gain += (self.Kn[:, s, n2] - self.Kn[:, s, n1] + self.Kn[:, t, n1]
                     - self.Kn[:, t, n2] - 2 * self.Qn[:, s, t])
        lin = self.lin[:, s, g2] - self.lin[:, s, g1] + self.lin[:, t, g1] - self.lin[:, t, g2]
        moved = self.work[:, t] - self.work[:, s]
        after = self.W.copy()
        after[:, g1] += moved
        after[:, g2] -= moved
        return lin - gain + after.max(axis=1) - self.W.max(axis=1)

    def kick(self, rng: np.random.Generator, swaps: int) -> None:
        """Apply ``swaps`` random legal swaps (whatever they cost)."""
        for _ in range(swaps):
            change, _, legal = self._deltas()
            candidates = np.argwhere(legal)
            if not len(candidates):
                return
            s, t = candidates[rng.integers(len(candidates))]
            self._swap(int(s), int(t), change[:, s, t])

    def _swap(self, s: int, t: int, change: np.ndarray) -> None:
        """Exchange the GPUs of items s and t, updating every running sum."""
        g1, g2 = self.gpu[s], self.gpu[t]
        n1, n2 = self.node[g1], self.node[g2]
        moved_g = self.Qg[:, :, t] - self.Qg[:, :, s]
        self.Kg[:, :, g1] += moved_g
        self.Kg[:, :, g2] -= moved_g
        if n1 != n2:
            moved_n = self.Qn[:, :, t] - self.Qn[:, :, s]
            self.Kn[:, :, n1] += moved_n
            self.Kn[:, :, n2] -= moved_n
        moved_w = self.work[:, t] - self.work[:, s]
        self.W[:, g1] += moved_w
        self.W[:, g2] -= moved_w
        self.has[self.e[s], g1] = self.has[self.e[t], g2] = False
        self.has[self.e[s], g2] = self.has[self.e[t], g1] = True
        self.gpu[s], self.gpu[t] = g2, g1
        self.delta += change
