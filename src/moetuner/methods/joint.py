"""``joint``: one placement minimising the mean step time of sampled engine steps.

Minimises the per-step objective of ``_joint_objective`` (every sampled step's slowest GPU
compute plus its dispatch and combine under the phase's kernel, the engine's replica policy)
for ``options.exec_model``. The steps are the phase's at serving scale (``JointParams``:
``phase``, ``tokens_per_gpu``), each drawn from its own mix of the profiled request groups
(``hedge``), so the placement holds up when the served mix differs from the profiled one.

How:

1. **Warm start.** The baselines ``linear``, ``round_robin``, ``eplb_fixed`` (and ``moetuner``
   when registered) are scored with the objective; the search starts from the best and never
   returns anything worse.
2. **Exact path.** Tiny instances without replicas (``exact_is_optimal``): under ``return``
   every layer's best placement by enumeration; under ``follow`` (ordered trace, ``even``
   replicas) a dynamic program over layers; status ``optimal``.
3. **Balance search** (``return``): layers are independent; each layer's row is improved
   for the per-step balance surrogate of ``_joint_balance`` (every sampled step's busiest
   GPU in compute and, on pair kernels, in the pairs it receives; swaps and replica moves,
   first improvement, a fixed order) until a full pass finds no improving move. On pair
   kernels (DeepEP low-latency, NCCL EP) the surrogate holds the objective's placement-
   dependent terms, so its converged result is returned (deterministic). The result is
   kept when the exact objective improves and no layer's per-step busiest-GPU load grows
   above the warm start's by more than ``imbalance_slack``.
   **Exact local search** (``follow``, and ``return`` on DeepEP normal, where node
   de-duplication rewards co-activated experts on one node): layer by layer (under
   ``follow`` in layer order, tokens sitting where the layer before left them), candidate
   moves are ranked by an estimate computed for all of them at once on all sampled steps
   (numpy): each step's GPU compute after the move plus the node-level co-activation saving
   (one DeepEP message for experts on one node). The best ``VERIFY`` are re-costed exactly
   on every sampled step (only the tokens a move touches are re-counted: ``LayerCounts``
   add and subtract) and the best improving one is applied, within the same imbalance cap.
   Moves: swapping two slots' experts between GPUs, and (with redundant slots) giving a
   replica slot to another expert, so replica counts are the method's own. Then random
   kicks (seeded) followed by descent, kept when they help, until a pass improves nothing
   or the time limit.
4. **Bound.** ``lower_bound``: gap = (objective - bound) / objective.

Hierarchy: the estimate rewards co-activated experts on one node and, through each step's
slowest GPU, penalises them on one GPU, so affine experts end up on one node but on
different GPUs of it.

Workloads: ``options.workload`` (several profiles: the weighted mean or the worst of their
objectives). Settings: ``JointParams`` (``--param KEY=VALUE``).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import get_args

import numpy as np

from moetuner.cluster import Cluster
from moetuner.costmodel import load_coefficients
from moetuner.engine import EngineSettings, KernelName, Phase, ReplicaPolicy, kernel_for
from moetuner.errors import InputError
from moetuner.methods import MethodParams, PlaceOptions, SolveRecord, Workload, methods, register
from moetuner.methods._joint_objective import (
    StepProblem,
    build_problem,
    counts_cost,
    layer_counts,
    layer_step_costs,
    lower_bound,
    model_for,
    objective,
    step_costs,
)
from moetuner.placement import Placement
from moetuner.profile import Profile
from moetuner.steps import StepPlan

WARM_STARTS = ("eplb_fixed", "linear", "round_robin", "moetuner")
INSTANT = ("eplb_fixed", "linear", "round_robin")
# Largest number of placements of one layer for which the exact enumeration runs.
EXACT_STATES = 1500
EXACT_FOLLOW_STATES = 36
# Share of the time limit the warm-start baselines may use, and the margin kept at the end.
WARM_SHARE = 0.25
END_MARGIN = 0.05
# Candidate moves re-costed exactly per descent move, and the move cap per slot and visit.
VERIFY = 6
MOVES_PER_SLOT = 2
# Passes over all moves of one layer at most in the balance search.
BALANCE_PASSES = 50


@dataclass(frozen=True)
class JointParams(MethodParams):
    """Settings of ``joint``.

    Attributes:
        model: preset whose sizes give the costs (default: the preset with the profile's
            shape).
        calibration: cost-model coefficients JSON (default: the cost model's).
        replica_policy: the engine's replica choice the load model uses (``even``: vLLM,
            ``nearest``: SGLang).
        kicks: random kicks per layer visit.
        imbalance_slack: a move may raise a layer's per-step busiest-GPU load (summed over
            the sampled steps) to at most 1 + this times the warm start's, so the per-step
            imbalance stays within that of the warm start's (EPLB's, usually).
        warm_start: comma-separated baselines to start from.
        phase: the phase whose steps are optimised (``decode`` or ``prefill``); with
            ``kernel`` (default: the phase's, DeepEP low-latency for decode, normal for
            prefill) and ``tokens_per_gpu`` (default 128 / 4,096) it fixes how ``place``
            samples steps from a trace (``moetuner.steps.StepPlan``) and the kernel costed.
        replay: ``serving`` (steps synthesised at serving scale from the profiled requests)
            or ``recorded`` (steps of the recorded order, ``concurrency`` running sequences
            in decode, default 128 x G, or prefill chunks of ``concurrency`` tokens).
        hedge: serving steps are each drawn from their own mix of the profiled request
            groups, with Dirichlet(``hedge``) weights (``moetuner.steps.mixture_steps``): the
            placement is chosen for the mixes of request kinds a cluster may serve, not for
            the profile's one mix (which a served workload rarely repeats); None: steps of
            the profiled mix.
    """

    model: str | None = None
    calibration: str | None = None
    replica_policy: str = field(default="even", metadata={"choices": get_args(ReplicaPolicy)})
    kicks: int = field(default=2, metadata={"min": 0})
    imbalance_slack: float = field(default=0.02, metadata={"min": 0.0})
    warm_start: str = ",".join(WARM_STARTS)
    phase: str = field(default="decode", metadata={"choices": get_args(Phase)})
    kernel: str | None = field(default=None, metadata={"choices": get_args(KernelName)})
    tokens_per_gpu: int | None = field(default=None, metadata={"min": 1})
    replay: str = field(default="serving", metadata={"choices": ("serving", "recorded")})
    concurrency: int | None = field(default=None, metadata={"min": 1})
    hedge: float | None = field(default=0.5, metadata={"min": 1e-3})

    def step_plan(self) -> StepPlan:
        """How ``place`` samples this method's steps from a trace."""
        recorded = self.replay == "recorded"
        return StepPlan(phase=self.phase, source=self.replay,
                        tokens_per_gpu=self.tokens_per_gpu,
                        hedge=None if recorded else self.hedge,
                        concurrency=self.concurrency if recorded and self.phase == "decode"
                        else None,
                        step_tokens=self.concurrency if recorded and self.phase == "prefill"
                        else None)


@register("joint", params=JointParams)
def solve(profile: Profile, cluster: Cluster, options: PlaceOptions
          ) -> tuple[np.ndarray, SolveRecord]:
    """Place with the per-step objective (module docstring)."""
    start = time.perf_counter()
    params = options.params
    if not isinstance(params, JointParams):
        raise InputError("params", "params", "JointParams (place() parses them)",
                         type(params).__name__)
    workload = options.workload or Workload((profile,))
    slots_per_gpu = options.slots_per_gpu(profile.num_experts, cluster.num_gpus)
    coefficients = None if params.calibration is None else load_coefficients(params.calibration)
    settings = EngineSettings(options.exec_model, params.replica_policy,
                              kernel_for(params.phase, params.kernel))
    problem = build_problem(list(workload.profiles), workload.weight_array(), cluster,
                            slots_per_gpu, settings, workload.robust,
                            model_for(profile, params.model), coefficients)
    names = tuple(name.strip() for name in params.warm_start.split(",") if name.strip())
    scores, eval_seconds = _warm_starts(profile, cluster, options, problem, names, start)
    deadline = start + options.time_limit - max(options.time_limit * END_MARGIN,
                                                3 * eval_seconds)
    best_name = min(scores, key=lambda name: scores[name][1])
    phy2log, best = scores[best_name]
    starts = ", ".join(f"{name} {1e6 * value[1]:.6g} us" for name, value in scores.items())
    log = [disagreement(list(workload.profiles)), f"warm start {starts} -> {best_name}"]
    bound = lower_bound(problem, options.redundant)
    name = _objective_name(problem)
    if options.redundant == 0 and exact_is_optimal(
            problem, _count_choices(problem.num_experts, cluster.num_gpus, slots_per_gpu)):
        rows = enumerate_rows(problem.num_experts, cluster.num_gpus, slots_per_gpu)
        exact = exact_placement(problem, rows)
        value = objective(problem, exact)
        if value <= best:
            phy2log, best = exact, value
        log.append(f"exact enumeration of {len(rows)} placements per layer")
        return phy2log, SolveRecord(method="joint", status="optimal", objective=best,
                                    bound=best, objective_name=name, log="; ".join(log))
    if problem.exec_model == "return":
        started = time.perf_counter()
        balanced, moves, evaluated, converged = balance_search(
            problem, phy2log, options.redundant > 0, deadline)
        rate = evaluated / max(time.perf_counter() - started, 1e-9)
        value = objective(problem, balanced)
        log.append(f"balance search: {moves} moves of {evaluated} evaluated ({rate:.3g}/s), "
                   f"{'converged' if converged else 'stopped'}, {1e6 * best:.6g} -> "
                   f"{1e6 * value:.6g} us")
        # Kept when better and within the per-step imbalance cap of the warm start.
        cap = (1 + params.imbalance_slack) * peak_loads(problem, phy2log) * (1 + 1e-12)
        if value < best and (peak_loads(problem, balanced) <= cap).all():
            phy2log, best = balanced, value
        if problem.settings.pair_messages:
            # Pair kernels: the surrogate is the objective's own terms (module docstring),
            # so its converged result is the answer; no time-bound polish, so the same
            # inputs give the same placement.
            return phy2log, SolveRecord(method="joint", status="heuristic" if converged
                                        else "time_limit", objective=best,
                                        bound=min(bound, best), objective_name=name,
                                        log="; ".join(log))
    searched, moves, timed_out = local_search(problem, phy2log, deadline, options.seed,
                                              params.kicks, params.imbalance_slack)
    value = objective(problem, searched)
    log.append(f"local search: {moves} moves, from {1e6 * best:.6g} to {1e6 * value:.6g} us")
    if value < best:  # never worse than where it started
        phy2log, best = searched, value
    return phy2log, SolveRecord(method="joint", status="time_limit" if timed_out else
                                "heuristic", objective=best, bound=min(bound, best),
                                objective_name=name, log="; ".join(log))


def balance_search(problem: StepProblem, phy2log: np.ndarray, replicas: bool,
                   deadline: float) -> tuple[np.ndarray, int, int, bool]:
    """Each layer's row improved for the per-step balance surrogate of ``_joint_balance``
    on the sampled steps' expert counts (``return`` only: layers are independent there).

    Returns the placement, the moves applied, the moves evaluated and whether every layer
    converged (a full pass found no improving move).
    """
    from moetuner.methods._joint_balance import search_layer  # numba: imported when used

    c = problem.cost
    G, N = problem.num_gpus, problem.num_nodes
    # Exchange seconds per pair a GPU receives (dispatch + combine), pair kernels only:
    # a pair's home is on another node with probability 1 - 1/N, on another GPU of the
    # expert's node with 1/N - 1/G.
    x = 0.0 if not problem.settings.pair_messages else sum(
        (1 - 1 / N) * inter + (1 / N - 1 / G) * intra
        for _, intra, inter in c.message_seconds)
    seconds = (c.pair_seconds, c.read_seconds, x)
    E = problem.num_experts
    out, moves, evaluated, converged = phy2log.copy(), 0, 0, True
    for layer in range(problem.num_layers):
        if time.perf_counter() >= deadline:
            return out, moves, evaluated, False
        counts, weight, floor = [], [], []
        for q, (sample, share) in enumerate(zip(problem.samples, problem.weights,
                                                strict=True)):
            index = sample.step_of[:, None] * E + sample.ids[:, layer, :].astype(np.int64)
            counts.append(np.bincount(index.ravel(), minlength=sample.num_steps * E)
                          .reshape(sample.num_steps, E))
            weight.append(np.full(sample.num_steps, share / sample.num_steps))
            # The senders' floor: each step's busiest sender under the starting placement.
            messages = layer_counts(problem, q, layer, out[layer], problem.homes[q])[0].dispatch
            floor.append(np.zeros(sample.num_steps) if x == 0 else sum(
                (messages[0] * intra + messages[2] * inter).max(axis=1)
                for _, intra, inter in c.message_seconds))
        row, applied, tried, done = search_layer(
            np.concatenate(counts), np.concatenate(weight), np.concatenate(floor), out[layer],
            G, E, seconds, BALANCE_PASSES, replicas)
        out[layer] = _canonical(row, problem.slots_per_gpu)
        moves += applied
        evaluated += tried
        converged &= done
    return out, moves, evaluated, converged


def _objective_name(problem: StepProblem) -> str:
    steps = sum(s.num_steps for s in problem.samples)
    return (f"mean step seconds over {steps} sampled steps ({problem.exec_model}, replicas "
            f"{problem.replica_policy}, {problem.robust} over {problem.num_profiles} "
            "workload(s))")


def disagreement(profiles: list[Profile]) -> str:
    """How much the workloads disagree: per-layer Pearson correlation of expert loads
    between each pair of profiles."""
    if len(profiles) < 2:
        return "one workload"
    loads = np.stack([p.load for p in profiles]).astype(np.float64)           # [Q, L, E]
    centred = loads - loads.mean(axis=2, keepdims=True)
    norm = np.sqrt((centred ** 2).sum(axis=2))                                 # [Q, L]
    first, second = np.triu_indices(len(profiles), k=1)
    dot = (centred[first] * centred[second]).sum(axis=2)                      # [pairs, L]
    denom = norm[first] * norm[second]
    corr = np.divide(dot, denom, out=np.ones_like(dot), where=denom > 0)
    return (f"profile disagreement: per-layer load correlation mean {corr.mean():.2f}, "
            f"min {corr.min():.2f} over {len(profiles)} profiles")


def _warm_starts(profile: Profile, cluster: Cluster, options: PlaceOptions,
                 problem: StepProblem, names: tuple[str, ...], start: float
                 ) -> tuple[dict[str, tuple[np.ndarray, float]], float]:
    """Score each available, engine-loadable baseline placement with the objective.

    Returns name -> (phy2log, objective) and the longest time one scoring took. A baseline
    other than the instant ones is skipped once ``WARM_SHARE`` of the time limit is used.
    """
    available = methods()
    budget = replace(options, time_limit=max(options.time_limit * WARM_SHARE, 0.1),
                     params=MethodParams())
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
    """Placements of one layer without replicas: E! / (S!^G)."""
    return math.factorial(num_experts) // math.factorial(slots_per_gpu) ** num_gpus


def enumerate_rows(num_experts: int, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """``[n, P]`` every placement of one layer without replicas: S distinct experts per GPU
    (ascending). Only for tiny shapes (``_count_choices`` of them)."""
    rows = []

    def extend(prefix: tuple, left: tuple) -> None:
        if not left:
            rows.append(prefix)
            return
        for combo in itertools.combinations(left, slots_per_gpu):
            extend(prefix + combo, tuple(e for e in left if e not in combo))

    extend((), tuple(range(num_experts)))
    return np.array(rows, dtype=np.int64).reshape(-1, num_gpus * slots_per_gpu)


def exact_placement(problem: StepProblem, rows: np.ndarray) -> np.ndarray:
    """``[L, P]`` the optimum of the weighted-mean objective over placements built from
    ``rows``.

    Under ``return`` the layers are independent: each layer's best row. Under ``follow``
    with an ordered trace and ``even`` replicas a token leaves layer l from its primary
    expert's GPU, which only layer l's row decides, so layer l's cost depends on the rows
    of layers l - 1 and l: a dynamic program over layers (``exact_is_optimal``).
    """
    L, n = problem.num_layers, len(rows)
    if problem.exec_model == "return":
        cost = np.zeros((n, L))
        for index, row in enumerate(rows):
            for q, weight in enumerate(problem.weights):
                homes = problem.homes[q]
                cost[index] += weight * np.array([
                    layer_step_costs(problem, q, layer, row, homes)[0].mean()
                    for layer in range(L)])
        return rows[cost.argmin(axis=0)]
    first = np.zeros(n)
    for index, row in enumerate(rows):
        for q, weight in enumerate(problem.weights):
            first[index] += weight * layer_step_costs(problem, q, 0, row, problem.homes[q]
                                                      )[0].mean()
    total, back = first, np.zeros((L, n), dtype=np.int64)
    for layer in range(1, L):
        pair = np.zeros((n, n))                                                # [prev, row]
        for prev, prev_row in enumerate(rows):
            for q, weight in enumerate(problem.weights):
                # Positions after layer - 1 depend on its row alone (docstring).
                after = layer_step_costs(problem, q, layer - 1, prev_row, problem.homes[q])[1]
                for index, row in enumerate(rows):
                    pair[prev, index] += weight * layer_step_costs(
                        problem, q, layer, row, after)[0].mean()
        candidate = total[:, None] + pair
        back[layer] = candidate.argmin(axis=0)
        total = candidate.min(axis=0)
    chosen = np.empty(L, dtype=np.int64)
    chosen[-1] = int(total.argmin())
    for layer in range(L - 1, 0, -1):
        chosen[layer - 1] = back[layer, chosen[layer]]
    return rows[chosen]


def exact_is_optimal(problem: StepProblem, num_rows: int) -> bool:
    """Whether ``exact_placement`` over ``num_rows`` rows per layer is exact and small
    enough: ``return`` (up to ``EXACT_STATES`` rows), or ``follow`` on ordered traces with
    ``even`` replicas (up to ``EXACT_FOLLOW_STATES`` rows: the program costs rows^2 per
    layer)."""
    if problem.robust == "max" and problem.num_profiles > 1:
        return False
    if problem.exec_model == "return":
        return num_rows <= EXACT_STATES
    return (num_rows <= EXACT_FOLLOW_STATES and problem.replica_policy == "even"
            and all(sample.ordered for sample in problem.samples))


def local_search(problem: StepProblem, phy2log: np.ndarray, deadline: float, seed: int,
                 kicks: int, imbalance_slack: float = float("inf")
                 ) -> tuple[np.ndarray, int, bool]:
    """Improve ``phy2log [L, P]`` layer by layer until no layer improves or the deadline;
    no layer's per-step busiest-GPU load (summed over steps) grows above 1 +
    ``imbalance_slack`` times the start's.

    Returns the placement, the moves applied and whether the deadline stopped the search.
    """
    phy2log = phy2log.copy()
    rng = np.random.default_rng(seed)
    moves = 0
    caps = (1 + imbalance_slack) * peak_loads(problem, phy2log)                # [Q, L]
    while time.perf_counter() < deadline:
        improved = False
        positions = [problem.homes[q] for q in range(problem.num_profiles)]
        # [Q, L] mean seconds of every layer: the other layers' part of each workload's
        # total is what a layer's moves are weighed against (it matters for robust max).
        means = np.stack([step_costs(problem, phy2log, q).mean(axis=1)
                          for q in range(problem.num_profiles)])
        for layer in range(problem.num_layers):
            if time.perf_counter() >= deadline:
                return phy2log, moves, True
            covered = slice(layer, layer + (2 if problem.exec_model == "follow" else 1))
            base = means.sum(axis=1) - means[:, covered].sum(axis=1)
            search = LayerSearch(problem, phy2log, layer, positions, base, caps[:, layer])
            applied = search.descend(deadline)
            applied += search.kick_and_descend(rng, kicks, deadline)
            if applied:
                phy2log[layer] = search.final_row()
                means[:, covered] = search.layer_means()
                moves += applied
                improved = True
            positions = search.positions_after()
        if not improved:
            return phy2log, moves, False
    return phy2log, moves, True


class LayerSearch:
    """Moves in one layer's row, costed on every sampled step of every workload.

    The layer's exact cost (and, under ``follow``, the next layer's, since tokens sit where
    this layer combines them) is ``layer_step_costs`` on the sampled steps; candidate moves
    are ranked by ``_estimates`` first.
    """

    def __init__(self, problem: StepProblem, phy2log: np.ndarray, layer: int,
                 positions: list[np.ndarray], base: np.ndarray | None = None,
                 peak_cap: np.ndarray | None = None) -> None:
        """``positions``: where each workload's tokens sit entering the layer; ``base [Q]``:
        each workload's mean seconds in the layers this search does not cost (default 0);
        ``peak_cap [Q]``: the most a move may raise the layer's busiest-GPU load summed over
        steps to (default: no cap)."""
        self.problem, self.layer = problem, layer
        self.base = np.zeros(problem.num_profiles) if base is None else base
        self.peak_cap = (np.full(problem.num_profiles, np.inf) if peak_cap is None
                         else peak_cap)
        self.row = phy2log[layer].copy()
        self.next_row = phy2log[layer + 1] if layer + 1 < problem.num_layers else None
        self.positions = positions
        G, S = problem.num_gpus, problem.slots_per_gpu
        self.gpu = np.arange(self.row.size) // S
        self.node = problem.node_of_gpu[self.gpu]
        E, k = problem.num_experts, problem.top_k
        # Per workload: [S, E] tokens per step choosing each expert, and [E, E] pairs of
        # experts chosen together by one token, per step and times 2 / k (anchored at one
        # expert per token: a pairwise count overstates savings for k > 2).
        self.counts, self.coact = [], []
        for sample in problem.samples:
            ids = sample.ids[:, layer, :].astype(np.int64)
            index = sample.step_of[:, None] * E + ids
            self.counts.append(np.bincount(index.ravel(), minlength=sample.num_steps * E)
                               .reshape(sample.num_steps, E).astype(np.float64))
            pair = (ids[:, :, None] * E + ids[:, None, :]).ravel()
            coact = np.bincount(pair, minlength=E * E).reshape(E, E).astype(np.float64)
            np.fill_diagonal(coact, 0.0)
            self.coact.append(coact * (2 / k) / sample.num_steps)
        # Seconds per node message saved (dispatch and combine, averaged over the GPUs);
        # only kernels that send one message per token and node save any.
        per_message = sum(d[2] for d in problem.cost.message_seconds)
        self.node_message = (0.0 if problem.settings.pair_messages
                             else per_message * (1 - 1 / problem.num_nodes) / G)
        # [E, n] which sampled tokens chose each expert: the tokens a move re-counts.
        self.chooses = []
        for sample in problem.samples:
            chooses = np.zeros((E, sample.num_tokens), dtype=bool)
            chooses[sample.ids[:, layer, :].astype(np.int64),
                    np.arange(sample.num_tokens)[:, None]] = True
            self.chooses.append(chooses)
        # Exact counts of this layer (and, under follow, of the next, whose tokens start
        # where this layer combines them) over all sampled tokens.
        self.state = [self._count(q, self.row, None) for q in range(problem.num_profiles)]
        self.cost = self._combined_cost(self.state)

    def _count(self, q: int, row: np.ndarray, tokens: np.ndarray | None) -> tuple:
        """(this layer's counts, positions after it, the next layer's counts or None) of
        workload q over ``tokens`` (all when None)."""
        p = self.problem
        position = self.positions[q] if tokens is None else self.positions[q][tokens]
        counts, after = layer_counts(p, q, self.layer, row, position, tokens)
        following = None
        if p.exec_model == "follow" and self.next_row is not None:
            following = layer_counts(p, q, self.layer + 1, self.next_row, after, tokens)[0]
        return counts, after, following

    def _layer_means(self, state: list[tuple]) -> np.ndarray:
        """``[Q, covered layers]`` mean seconds of this layer (and the next under follow)."""
        p = self.problem
        return np.array([[counts_cost(p, counts).mean()] + (
            [] if following is None else [counts_cost(p, following).mean()])
            for counts, _, following in state])

    def layer_means(self) -> np.ndarray:
        """The current ``_layer_means``."""
        return self._layer_means(self.state)

    def _combined_cost(self, state: list[tuple]) -> float:
        return self.problem.combine(self.base + self._layer_means(state).sum(axis=1))

    def _trial(self, row: np.ndarray, changed: np.ndarray) -> tuple[float, list[tuple]]:
        """Exact cost and state with ``row``, re-counting only the tokens that chose one of
        the ``changed`` experts (the others' slots, messages and positions are unchanged)."""
        state = []
        for q, (counts, after, following) in enumerate(self.state):
            tokens = np.flatnonzero(self.chooses[q][changed].any(axis=0))
            old_counts, _, old_following = self._count(q, self.row, tokens)
            new_counts, new_after, new_following = self._count(q, row, tokens)
            moved_after = after
            if following is not None:
                moved_after = after.copy()
                moved_after[tokens] = new_after
                following = following - old_following + new_following
            state.append((counts - old_counts + new_counts, moved_after, following))
        return self._combined_cost(state), state

    def positions_after(self) -> list[np.ndarray]:
        """Where every sampled token sits after this layer (its home under ``return``)."""
        return [after for _, after, _ in self.state]

    def _estimates(self) -> tuple[np.ndarray, np.ndarray]:
        """Estimated cost change of every swap ``[P, P]`` and every replica move ``[P, E]``
        (slot p given to expert e; inf where illegal)."""
        p = self.problem
        P, E, G = self.row.size, p.num_experts, p.num_gpus
        copies = np.bincount(self.row, minlength=E).astype(np.float64)
        share = 1.0 / copies[self.row]                                        # [P]
        on_gpu = np.zeros((E, G), dtype=bool)
        on_gpu[self.row, self.gpu] = True
        swap = np.zeros((P, P))
        move = np.zeros((P, E))
        compute = p.cost.compute
        onehot = np.eye(G)[self.gpu]                                          # [P, G]
        for q, weight in enumerate(p.weights):
            counts = self.counts[q]                                           # [S, E]
            work = counts[:, self.row] * share                                # [S, P]
            used = (work > 0).astype(np.float64)
            pairs, active = work @ onehot, used @ onehot                      # [S, G]
            now = compute(pairs, active)
            peak = now.max(axis=1)                                            # [S]
            rest = _max_excluding(now)                                        # [S, G, G]
            g = self.gpu
            dw = work[:, None, :] - work[:, :, None]                          # [S, s, t] w_t - w_s
            du = used[:, None, :] - used[:, :, None]
            first = compute(pairs[:, g][:, :, None] + dw, active[:, g][:, :, None] + du)
            second = compute(pairs[:, g][:, None, :] - dw, active[:, g][:, None, :] - du)
            after = np.maximum(rest[:, g][:, :, g], np.maximum(first, second))
            swap += weight * (after - peak[:, None, None]).mean(axis=0)
            swap -= weight * self._node_saving(q)
            if P > E:
                # Slot s given to expert e: its GPU's work changes by e's share minus s's.
                new_work = counts / (copies + 1)                               # [S, E]
                gained = compute(
                    pairs[:, g][:, :, None] - work[:, :, None] + new_work[:, None, :],
                    active[:, g][:, :, None] - used[:, :, None] + (new_work > 0)[:, None, :])
                rest_one = _max_excluding(now)[:, np.arange(G), np.arange(G)][:, g]
                move += weight * (np.maximum(rest_one[:, :, None], gained)
                                  - peak[:, None, None]).mean(axis=0)
        legal = ((self.gpu[:, None] != self.gpu[None, :])
                 & ~on_gpu[self.row][:, self.gpu].T & ~on_gpu[self.row][:, self.gpu]
                 & (self.row[:, None] != self.row[None, :]))
        swap = np.where(legal, swap, np.inf)
        movable = (copies[self.row] > 1)[:, None] & ~on_gpu[:, self.gpu].T
        move = np.where(movable, move, np.inf) if P > E else np.full((P, E), np.inf)
        return swap, move

    def _node_saving(self, q: int) -> np.ndarray:
        """``[P, P]`` estimated seconds per step saved in node messages by each swap: the
        co-activation of each item with the other node's items gained minus its own node's
        lost."""
        if self.problem.num_nodes == 1:
            return np.zeros((self.row.size, self.row.size))
        coact = self.coact[q][self.row][:, self.row]                          # [P, P]
        np.fill_diagonal(coact, 0.0)
        N = self.problem.num_nodes
        by_node = coact @ np.eye(N)[self.node]                                # [P, N]
        n = self.node
        own = by_node[np.arange(n.size), n]                                   # [P]
        gain = (by_node[:, n] - own[:, None] - coact) + (by_node[:, n].T - own[None, :]
                                                         - coact)
        return np.where(n[:, None] != n[None, :], gain * self.node_message, 0.0)

    def descend(self, deadline: float) -> int:
        """Apply improving moves (best estimated first, each re-costed exactly) until none
        of the ``VERIFY`` best estimates improves, the move cap or the deadline."""
        applied = 0
        while applied < MOVES_PER_SLOT * self.row.size and time.perf_counter() < deadline:
            swap, move = self._estimates()
            flat = np.concatenate([swap.ravel(), move.ravel()])
            order = np.argsort(flat, kind="stable")[:VERIFY]
            best = None
            for index in order:
                if not np.isfinite(flat[index]):
                    break
                row, changed = self._moved(int(index))
                cost, state = self._trial(row, changed)
                if (cost < (self.cost if best is None else best[0]) - 1e-12 * abs(self.cost)
                        and self._within_cap(state)):
                    best = (cost, row, state)
            if best is None:
                return applied
            self.cost, self.row, self.state = best
            applied += 1
        return applied

    def _within_cap(self, state: list[tuple]) -> bool:
        """Whether every workload's busiest-GPU load, summed over steps, is within its cap."""
        spg = self.problem.slots_per_gpu
        return all(_peak_sum(counts.slot_pairs, spg) <= cap * (1 + 1e-12)
                   for (counts, _, _), cap in zip(state, self.peak_cap, strict=True))

    def _moved(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The row after move ``index`` (a flat index into swaps, then replica moves) and
        the experts whose slots it changes."""
        P = self.row.size
        row = self.row.copy()
        if index < P * P:
            s, t = divmod(index, P)
            row[s], row[t] = row[t], row[s]
            return row, np.array([row[s], row[t]])
        s, expert = divmod(index - P * P, self.problem.num_experts)
        changed = np.array([row[s], expert])
        row[s] = expert
        return row, changed

    def final_row(self) -> np.ndarray:
        """The layer's row, each GPU's experts in ascending order."""
        return _canonical(self.row, self.problem.slots_per_gpu)

    def kick_and_descend(self, rng: np.random.Generator, kicks: int, deadline: float) -> int:
        """``kicks`` times: a few random legal swaps, then descent; kept when better."""
        applied = 0
        for _ in range(kicks):
            if time.perf_counter() >= deadline:
                break
            saved = (self.cost, self.row.copy(), self.state)
            for _ in range(max(2, self.row.size // 16)):
                swap = self._legal_swaps()
                if not len(swap):
                    break
                s, t = swap[rng.integers(len(swap))]
                row = self.row.copy()
                row[s], row[t] = row[t], row[s]
                self.cost, self.state = self._trial(row, np.array([row[s], row[t]]))
                self.row = row
            gained = self.descend(deadline)
            if self.cost < saved[0] - 1e-12 * abs(saved[0]) and self._within_cap(self.state):
                applied += gained + 1
            else:
                self.cost, self.row, self.state = saved
        return applied

    def _legal_swaps(self) -> np.ndarray:
        """``[m, 2]`` slot pairs whose swap keeps copies of an expert on distinct GPUs."""
        E, G = self.problem.num_experts, self.problem.num_gpus
        on_gpu = np.zeros((E, G), dtype=bool)
        on_gpu[self.row, self.gpu] = True
        legal = ((self.gpu[:, None] != self.gpu[None, :])
                 & ~on_gpu[self.row][:, self.gpu].T & ~on_gpu[self.row][:, self.gpu])
        return np.argwhere(np.triu(legal, 1))


def _peak_sum(slot_pairs: np.ndarray, slots_per_gpu: int) -> float:
    """Busiest GPU's token-expert pairs summed over steps, from ``slot_pairs [S, P]``."""
    S = slot_pairs.shape[0]
    return float(slot_pairs.reshape(S, -1, slots_per_gpu).sum(axis=2).max(axis=1).sum())


def peak_loads(problem: StepProblem, phy2log: np.ndarray) -> np.ndarray:
    """``[Q, L]`` each layer's busiest-GPU load summed over each workload's sampled steps
    (the numerator of the per-step imbalance; its denominator does not depend on the
    placement)."""
    out = np.zeros((problem.num_profiles, problem.num_layers))
    for q in range(problem.num_profiles):
        position = problem.homes[q]
        for layer in range(problem.num_layers):
            counts, position = layer_counts(problem, q, layer, phy2log[layer], position)
            out[q, layer] = _peak_sum(counts.slot_pairs, problem.slots_per_gpu)
    return out


def _canonical(row: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """Each GPU's experts in ascending order (the same placement, one spelling)."""
    return np.sort(row.reshape(-1, slots_per_gpu), axis=1).ravel()


def _max_excluding(values: np.ndarray) -> np.ndarray:
    """``[S, G, G]`` largest of ``values [S, G]`` outside columns a and b (0 if none)."""
    S, G = values.shape
    if G <= 2:
        return np.zeros((S, G, G))
    order = np.argsort(-values, axis=1)[:, :3]                                # [S, 3]
    top = np.take_along_axis(values, order, axis=1)                           # [S, 3]
    a, b = np.arange(G)[:, None], np.arange(G)[None, :]
    outside = [(a != order[:, i, None, None]) & (b != order[:, i, None, None])
               for i in range(3)]
    return np.where(outside[0], top[:, 0, None, None],
                    np.where(outside[1], top[:, 1, None, None], top[:, 2, None, None]))
