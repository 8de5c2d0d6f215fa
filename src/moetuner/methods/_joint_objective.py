"""The objective of the ``joint`` method: the mean step time over sampled engine steps.

Each workload (a profile) carries engine steps sampled token by token from its trace
(``moetuner.profile.StepSample``: formed as the evaluator forms them, by default at serving
scale for the phase). For a placement, every sampled step and layer is counted by the replay
kernel the evaluator uses (``moetuner.engine.count_layer``: replica choice, pairs and active
slots per GPU, the messages of the phase's kernel, the execution model) and costed by the
same ``costmodel.StepCost``; step time = sum over layers of dispatch + slowest GPU's compute
+ combine.

A profile without sampled steps takes its steps from the per-step loads an engine recorded
(``steps_from_step_loads``: tokens dealt to match each recorded step's loads), else from its
whole-profile loads (``steps_from_load``).

The objective of one workload is the mean step time over its sampled steps; several
workloads give their weighted mean (``robust="mean"``) or the worst (``"max"``). The same
function scores the warm starts, the search's candidate moves (layer by layer), the exact
solver's candidates and the result, and ``lower_bound`` bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetuner.cluster import Cluster
from moetuner.costmodel import CostCoefficients, StepCost
from moetuner.engine import EngineSettings, LayerCounts, count_layer, replica_table
from moetuner.errors import InputError
from moetuner.models import MODELS, ModelSpec, model_with_shape
from moetuner.profile import STEP_ENTRIES, Profile, StepSample
from moetuner.steps import DEFAULT_SEQUENCES_PER_GPU, SERVING_STEPS

# A stand-in model for shapes no preset matches (a mid-size BF16 MoE).
GENERIC_MODEL = ModelSpec("generic", "-", 1, (), 1, 1, 4096, 2048)
ROBUST = ("mean", "max")


@dataclass(frozen=True)
class StepProblem:
    """Everything the objective needs, for Q workloads of L layers x E experts on G GPUs.

    Attributes:
        samples: Q sampled steps (``StepSample``), one per workload.
        homes: Q int64 ``[n_q]`` home GPU of each sampled token.
        weights: ``[Q]`` workload weights, summing to 1.
        robust: ``mean`` or ``max`` over workloads.
        settings: execution model, replica policy and kernel.
        num_gpus, num_nodes, slots_per_gpu, num_experts: G, N, P / G and E.
        cost: the cost model (model, cluster, coefficients, kernel).
    """

    samples: list[StepSample]
    homes: list[np.ndarray]
    weights: np.ndarray
    robust: str
    settings: EngineSettings
    num_gpus: int
    num_nodes: int
    slots_per_gpu: int
    num_experts: int
    cost: StepCost

    @property
    def exec_model(self) -> str:
        return self.settings.exec_model

    @property
    def replica_policy(self) -> str:
        return self.settings.replica_policy

    @property
    def model(self) -> ModelSpec:
        return self.cost.model

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
    settings: EngineSettings,
    robust: str,
    model: ModelSpec,
    coefficients: CostCoefficients | None = None,
) -> StepProblem:
    """The objective's data from profiles with sampled steps (module docstring)."""
    if robust not in ROBUST:
        raise InputError("--robust", "robust", f"one of {', '.join(ROBUST)}", repr(robust))
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
    G = cluster.num_gpus
    samples = [p.steps if p.steps is not None and p.steps.num_steps
               else steps_from_step_loads(p.step_loads, p.top_k, source=p.source)
               if p.step_loads is not None and p.step_loads.any() else steps_from_load(p, G)
               for p in profiles]
    return StepProblem(
        samples=samples, homes=[sample.home(G) for sample in samples],
        weights=weights / weights.sum(), robust=robust, settings=settings, num_gpus=G,
        num_nodes=cluster.num_nodes, slots_per_gpu=slots_per_gpu,
        num_experts=first.num_experts,
        cost=StepCost(model, cluster, coefficients, settings.kernel))


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


def steps_from_step_loads(step_loads: np.ndarray, top_k: int,
                          count: int = SERVING_STEPS["decode"], seed: int = 0,
                          source: str = "step_loads") -> StepSample:
    """Decode steps whose tokens match recorded per-step loads ``[S, L, E]`` exactly.

    Step s holds n = (its pairs per layer) / k tokens; in each layer the pairs, sorted by
    expert, are dealt column by column into an ``[n, k]`` table (so no token repeats an
    expert: no expert has more than n pairs), whose rows are then shuffled (seeded) so
    layers pair up at random (co-activation across layers is not known). Token i of a step
    sits in slot i (home GPU i mod G). Up to ``count`` steps, evenly spaced, fewer to stay
    within ``STEP_ENTRIES`` ids; steps without tokens are skipped.

    Raises:
        InputError: when a step's layers hold different pair counts, or a count that is not
            a multiple of k or gives one expert more pairs than the step has tokens.
    """
    loads = np.asarray(step_loads, dtype=np.int64)
    S, L, E = loads.shape
    pairs = loads.sum(axis=2)                                                    # [S, L]
    sizes = pairs[:, 0] // top_k
    if ((pairs != pairs[:, :1]) | (pairs % top_k != 0)).any() or (
            loads.max(axis=2, initial=0) > sizes[:, None]).any():
        raise InputError(source, "step_loads", f"steps of tokens x k = {top_k} pairs in every "
                         "layer, no expert above the step's tokens", "inconsistent counts")
    busy = np.flatnonzero(sizes > 0)
    per_step = max(float(sizes[busy].mean()), 1.0) * L * top_k if busy.size else 1.0
    keep = max(1, min(int(count), int(STEP_ENTRIES // per_step), busy.size))
    picked = busy[np.unique(np.linspace(0, busy.size - 1, keep).astype(np.int64))] \
        if busy.size else busy
    rng = np.random.default_rng(seed)
    blocks = []
    for s in picked:
        n = int(sizes[s])
        dealt = np.repeat(np.tile(np.arange(E), L), loads[s].ravel())            # [L n k]
        table = dealt.reshape(L, top_k, n).transpose(0, 2, 1)                    # [L, n, k]
        rows = np.argsort(rng.random((L, n)), axis=1)
        blocks.append(np.take_along_axis(table, rows[:, :, None], axis=1).transpose(1, 0, 2))
    ids = (np.concatenate(blocks) if blocks else np.zeros((0, L, top_k), np.int64))
    steps = sizes[picked]
    bounds = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
    slot = np.arange(bounds[-1], dtype=np.int64) - np.repeat(bounds[:-1], steps)
    return StepSample(ids=ids.astype(np.uint16), bounds=bounds, slot=slot,
                      token=np.arange(bounds[-1], dtype=np.int64), batching="decode",
                      concurrency=int(max(steps.max(initial=1), 1)), ordered=False)


def layer_counts(problem: StepProblem, q: int, layer: int, row: np.ndarray,
                 position: np.ndarray, tokens: np.ndarray | None = None
                 ) -> tuple[LayerCounts, np.ndarray]:
    """Count one layer of workload q over ``tokens`` (indices into the sample; all when
    None) with the replay kernel.

    Args:
        row: int ``[P]`` the layer's placement (expert per slot).
        position: int64 ``[m]`` GPU each of those tokens sits on entering the layer (its
            home under ``return``).

    Returns:
        The counts, and int64 ``[m]`` the GPU each token sits on after the layer (``follow``:
        its combine GPU; ``return``: ``position``).
    """
    sample = problem.samples[q]
    if tokens is None:
        ids, key, step = sample.ids[:, layer, :], sample.token, sample.step_of
    else:
        ids, key, step = (sample.ids[tokens, layer, :], sample.token[tokens],
                          sample.step_of[tokens])
    node = problem.node_of_gpu
    table = replica_table(row, problem.num_experts, problem.num_gpus, node,
                          problem.replica_policy)
    counts, _, after = count_layer(ids, key, position, step, sample.num_steps, table,
                                   problem.slots_per_gpu, node, problem.settings,
                                   sample.ordered)
    return counts, after


def counts_cost(problem: StepProblem, counts: LayerCounts) -> np.ndarray:
    """``[S]`` seconds of dispatch + slowest GPU compute + combine per step."""
    return problem.cost.layer(counts, problem.slots_per_gpu).sum(axis=0)


def layer_step_costs(problem: StepProblem, q: int, layer: int, row: np.ndarray,
                     position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[S]`` seconds of one layer in every sampled step of workload q (module docstring),
    and int64 ``[n]`` where each token sits after it (``layer_counts``)."""
    counts, after = layer_counts(problem, q, layer, row, position)
    return counts_cost(problem, counts), after


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
    the step's used experts over G (rounded up); each exchange costs at least its kernel's
    latency.
    """
    G = problem.num_gpus
    copies = min(G, num_redundant + 1)
    means = []
    for sample in problem.samples:
        S, L, E = sample.num_steps, problem.num_layers, problem.num_experts
        step = np.repeat(sample.step_of[:, None, None], L, axis=1)
        layer = np.arange(L)[None, :, None]
        index = (step * L + layer) * E + sample.ids.astype(np.int64)
        counts = np.bincount(index.ravel(), minlength=S * L * E).reshape(S, L, E)
        pairs = np.maximum(counts.sum(axis=2) / G, counts.max(axis=2) / copies)
        active = np.ceil((counts > 0).sum(axis=2) / G)
        latency = 0.0 if G == 1 else sum(d[0] for d in problem.cost.message_seconds)
        means.append(problem.cost.compute(pairs, active).sum(axis=1).mean() + L * latency)
    return problem.combine(np.array(means))
