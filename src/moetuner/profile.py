"""Routing profiles: the statistics of a trace that placement and evaluation need.

Counting conventions (L MoE layers, E experts, k experts per token):

- ``load[l, i]``: tokens that chose expert i in layer l. ``load[l].sum() == tokens * k``.
- ``transitions[l, i, j]``: tokens that chose i in layer l *and* j in layer l+1. Each token
  contributes all k x k pairs of its two top-k sets, each with count 1, so
  ``transitions[l].sum(axis=1) == k * load[l]`` and ``transitions[l].sum(axis=0) ==
  k * load[l + 1]``.
- ``transitions_top1[l, i, j]``: tokens whose primary expert is i in layer l and j in layer l+1
  (one pair per token; the ``follow`` execution model moves a token with its primary expert).
- ``coactivation[l, i, j]``: tokens that chose both i and j in layer l; symmetric, with
  ``coactivation[l, i, i] == load[l, i]``.
- ``steps`` (optional, ``StepSample``): a few engine steps drawn from the trace the way the
  evaluator forms them (``moetuner.steps``), kept token by token, for per-step objectives.
- ``step_loads[s, l, i]`` (optional): tokens that chose expert i in layer l in engine step s,
  as an engine recorded its production steps (SGLang's ``stat`` dumps); steps without tokens
  dropped. Loads only: which experts a token chose together is not kept.

All counts are computed in bounded-memory chunks by one compiled (numba) pass over each
chunk that increments the four count arrays in place: about ten times the speed of the
``np.bincount`` over materialised pair indices it replaced (BENCHMARKS.md, "Profiling speed").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moetuner.errors import InputError
from moetuner.io import (
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_PAIR_CELLS,
    as_bool,
    as_int,
    parse_json,
    read_npz,
    write_npz,
)
from moetuner.steps import (
    DEFAULT_SEQUENCES_PER_GPU,
    DEFAULT_STEP_TOKENS,
    SERVING_STEPS,
    TOKENS_PER_GPU,
    StepPlan,
    block_homes,
    decode_steps,
    prefill_steps,
    request_spans,
)
from moetuner.trace import Trace, first_sequences

# Routing records (token x layer x k) per chunk: a few MB of ids whatever the trace length.
CHUNK_ELEMENTS = 1 << 22

_COUNT_FIELDS = ("load", "transitions", "transitions_top1", "coactivation")
# Budget of sampled token-layer-choice entries kept per profile (uint16: 64 MiB at most) and
# the default number of sampled steps.
STEP_ENTRIES = 1 << 25
STEP_COUNT = 128
# Request groups of the hedged steps (``request_groups``), the layers of a request's
# routing signature and the requests the groups' centres are fitted on at most.
REQUEST_GROUPS = 16
SIGNATURE_LAYERS = 8
GROUP_FIT_REQUESTS = 4096
_STEP_FIELDS = ("step_ids", "step_bounds", "step_slot", "step_token")


@dataclass(frozen=True)
class StepSample:
    """Engine steps sampled from a trace, token by token (what per-step objectives need).

    Size: ``n * L * k`` uint16 ids plus three ``[n]`` int arrays, n = sampled tokens (the
    sample is cut to ``STEP_ENTRIES`` ids: 64 MiB at most).

    Attributes:
        ids: uint16 ``[n, L, k]`` chosen experts of the sampled tokens, in step order
            (columns primary first when ``ordered``).
        bounds: int64 ``[S + 1]`` step s holds tokens ``bounds[s]:bounds[s + 1]``.
        slot: int64 ``[n]`` running-sequence slot (``decode``) or position in the step
            (``prefill``) of each token; its home GPU follows from it (``home``).
        token: int64 ``[n]`` index of each token in its trace (the hash of replica choice).
        batching: ``decode`` or ``prefill``.
        concurrency: running sequences C (``decode``) or tokens per step (``prefill``).
        ordered: whether column 0 of ``ids`` is the primary (highest-weight) expert.
    """

    ids: np.ndarray
    bounds: np.ndarray
    slot: np.ndarray
    token: np.ndarray
    batching: str
    concurrency: int
    ordered: bool = True

    @property
    def num_steps(self) -> int:
        return int(self.bounds.shape[0] - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def step_of(self) -> np.ndarray:
        """int64 ``[n]`` step of each sampled token."""
        return np.repeat(np.arange(self.num_steps, dtype=np.int64), np.diff(self.bounds))

    def home(self, num_gpus: int) -> np.ndarray:
        """int64 ``[n]`` home GPU of each token on G GPUs (as ``moetuner.steps`` homes it)."""
        if self.batching == "decode":
            return self.slot % num_gpus
        return block_homes(self.bounds, num_gpus)

    def __add__(self, other: StepSample) -> StepSample:
        """Both samples' steps (the second's after the first's); both must be formed alike."""
        if (self.batching, self.concurrency, self.ids.shape[1:]) != (
                other.batching, other.concurrency, other.ids.shape[1:]):
            raise InputError("profiles", "steps", f"steps formed like the first profile's "
                             f"({self.batching}, {self.concurrency})",
                             f"{other.batching}, {other.concurrency}")
        return StepSample(ids=np.concatenate([self.ids, other.ids]),
                          bounds=np.concatenate([self.bounds, self.bounds[-1]
                                                 + other.bounds[1:]]),
                          slot=np.concatenate([self.slot, other.slot]),
                          token=np.concatenate([self.token, other.token]),
                          batching=self.batching, concurrency=self.concurrency,
                          ordered=self.ordered and other.ordered)

    def arrays(self) -> dict[str, np.ndarray]:
        """The sample as ``.npz`` arrays (``Profile.save``)."""
        return {"step_ids": self.ids, "step_bounds": self.bounds, "step_slot": self.slot,
                "step_token": self.token,
                "step_meta_json": np.asarray(json.dumps({
                    "batching": self.batching, "concurrency": self.concurrency,
                    "ordered": self.ordered}))}


def sample_steps(trace: Trace, num_gpus: int, plan: StepPlan = StepPlan(),
                 count: int = STEP_COUNT, seed: int = 0) -> StepSample:
    """Engine steps of ``trace`` formed as the evaluator forms them under ``plan``: at
    serving scale (``moetuner.steps.serving_steps``, the plan's steps), or ``count`` steps
    drawn from the recorded order (decode at C = ``plan.concurrency``, default 128 x G, or
    prefill chunks of ``plan.step_tokens``); fewer when the sample would exceed
    ``STEP_ENTRIES`` ids (never fewer than one step)."""
    if plan.source == "average":
        raise InputError("--replay", "replay", "serving or recorded (sampled steps)",
                         repr(plan.source))
    per_token = trace.num_layers * trace.top_k
    if plan.source == "serving":
        width = (plan.tokens_per_gpu or TOKENS_PER_GPU[plan.phase]) * num_gpus
        wanted = plan.num_steps or SERVING_STEPS[plan.phase]
        fits = max(1, STEP_ENTRIES // (width * per_token))
        picked = dataclasses.replace(plan, num_steps=min(wanted, fits)).steps(
            trace.seq_lens, trace.num_tokens, num_gpus,
            None if plan.hedge is None else request_groups(trace, seed=plan.seed))
        concurrency = width
    elif plan.phase == "decode":
        concurrency = plan.concurrency or DEFAULT_SEQUENCES_PER_GPU * num_gpus
        # Formed on C "GPUs", a token's home is its slot; its home on G GPUs is slot mod G.
        steps = decode_steps(trace.seq_lens, trace.num_tokens, concurrency, concurrency)
    else:
        concurrency = plan.step_tokens or DEFAULT_STEP_TOKENS
        steps = prefill_steps(trace.num_tokens, concurrency, num_gpus)
    if plan.source == "recorded":
        per_step = max(float(steps.sizes.mean()), 1.0) * per_token
        picked = steps.sample(max(1, min(int(count), int(STEP_ENTRIES // per_step))), seed)
    within = np.arange(picked.num_tokens) - np.repeat(picked.bounds[:-1], picked.sizes)
    slot = picked.home if plan.phase == "decode" and plan.source == "recorded" else within
    return StepSample(ids=trace.topk_ids[picked.order].astype(np.uint16),
                      bounds=picked.bounds, slot=slot.astype(np.int64),
                      token=picked.keys.astype(np.int64), batching=plan.phase,
                      concurrency=int(concurrency), ordered=trace.ordered)


def request_groups(trace: Trace, count: int = REQUEST_GROUPS, seed: int = 0,
                   iterations: int = 25) -> np.ndarray:
    """int64 ``[R]`` a group for each request of ``trace``: k-means (k-means++ start, seeded)
    of the requests' routing signatures, so requests that route alike share a group. A
    signature is a request's share of its token-expert pairs per expert in up to
    ``SIGNATURE_LAYERS`` evenly spaced layers; the centres are fitted on at most
    ``GROUP_FIT_REQUESTS`` requests drawn at random, then every request joins its nearest.
    A trace without ``seq_lens`` has one request per token."""
    lens, starts = request_spans(trace.seq_lens, trace.num_tokens)
    R, E = lens.size, trace.num_experts
    layers = np.unique(np.linspace(0, trace.num_layers - 1,
                                   min(trace.num_layers, SIGNATURE_LAYERS)).astype(np.int64))
    rng = np.random.default_rng(seed)

    def signatures(requests: np.ndarray) -> np.ndarray:
        """float32 ``[n, layers x E]`` of the given requests."""
        out = np.zeros((requests.size, layers.size * E), dtype=np.float32)
        size = lens[requests]
        tokens = np.repeat(starts[requests], size) + (
            np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size))
        row = np.repeat(np.arange(requests.size), size)
        ids = trace.topk_ids[tokens][:, layers, :].astype(np.int64)           # [n, l, k]
        index = row[:, None, None] * (layers.size * E) + np.arange(layers.size)[:, None] * E \
            + ids
        out.ravel()[:] = np.bincount(index.ravel(), minlength=out.size)
        return out / np.maximum(size, 1)[:, None]

    def nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """``[n, K]`` squared distances."""
        return np.maximum((points ** 2).sum(axis=1)[:, None] - 2 * points @ centres.T
                          + (centres ** 2).sum(axis=1)[None, :], 0.0)

    fit = np.sort(rng.choice(R, size=min(R, GROUP_FIT_REQUESTS), replace=False))
    points = signatures(fit)
    centres = points[[int(rng.integers(fit.size))]]
    while centres.shape[0] < min(int(count), fit.size):
        gap = nearest(points, centres).min(axis=1)
        if not gap.sum():
            break
        centres = np.vstack([centres, points[rng.choice(fit.size, p=gap / gap.sum())]])
    for _ in range(iterations):
        label = nearest(points, centres).argmin(axis=1)
        moved = np.stack([points[label == g].mean(axis=0) if (label == g).any()
                          else centres[g] for g in range(centres.shape[0])])
        if np.allclose(moved, centres):
            break
        centres = moved
    groups = np.empty(R, dtype=np.int64)
    step = max(1, GROUP_FIT_REQUESTS)
    for lo in range(0, R, step):
        requests = np.arange(lo, min(lo + step, R))
        groups[requests] = nearest(signatures(requests), centres).argmin(axis=1)
    return groups


@dataclass(frozen=True)
class Profile:
    """Routing statistics of a workload.

    Attributes:
        load: ``[L, E]`` token-expert assignments per layer and expert (counts, may be float
            when read from an aggregated source).
        top_k: experts per token (k).
        tokens: tokens profiled.
        transitions: ``[L-1, E, E]`` k x k consecutive-layer pair counts, or None (loads only).
        transitions_top1: ``[L-1, E, E]`` primary-to-primary counts, or None.
        coactivation: ``[L, E, E]`` same-layer pair counts (diagonal = load), or None.
        stability_load: ``[L]`` Pearson correlation of each layer's load between the two halves
            of the trace, or None (unknown, e.g. after summing profiles).
        stability_transitions: ``[L-1]`` the same for the transition matrices, or None.
        provenance: one dict per source (``source``, ``selection``, ``tokens``).
        steps: engine steps sampled token by token (``StepSample``), or None. Adding two
            profiles keeps both samples' steps (concatenated) when both have one.
        step_loads: int64 ``[S, L, E]`` per-step loads an engine recorded (module
            docstring), or None; adding two profiles concatenates them when both have some.
    """

    load: np.ndarray
    top_k: int
    tokens: int
    transitions: np.ndarray | None = None
    transitions_top1: np.ndarray | None = None
    coactivation: np.ndarray | None = None
    stability_load: np.ndarray | None = None
    stability_transitions: np.ndarray | None = None
    provenance: list[dict] = field(default_factory=list)
    source: str = "<memory>"
    steps: StepSample | None = None
    step_loads: np.ndarray | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    @property
    def has_transitions(self) -> bool:
        return self.transitions is not None

    @classmethod
    def from_load(cls, load: np.ndarray, top_k: int = 1, source: str = "<memory>") -> Profile:
        """A loads-only profile (e.g. from aggregated counts); ``tokens`` = load per layer / k."""
        load = np.asarray(load)
        per_layer = float(load[0].sum()) / top_k if load.size else 0.0
        # NaN or inf loads are refused by validation, which names them.
        tokens = int(round(per_layer)) if np.isfinite(per_layer) else 0
        return cls(load=load, top_k=top_k, tokens=tokens, source=source,
                   provenance=[{"source": source, "selection": "all", "tokens": tokens}])

    def __add__(self, other: Profile) -> Profile:
        """Combine two workloads: counts add, provenance concatenates, stability is unknown."""
        if self.load.shape != other.load.shape or self.top_k != other.top_k:
            raise InputError(other.source, "load",
                             f"shape {list(self.load.shape)} and k = {self.top_k} to add to "
                             f"{self.source}", f"{list(other.load.shape)}, k = {other.top_k}")
        counts = {}
        for name in _COUNT_FIELDS[1:]:
            a, b = getattr(self, name), getattr(other, name)
            counts[name] = a + b if a is not None and b is not None else None
        steps = (self.steps + other.steps if self.steps is not None
                 and other.steps is not None else None)
        step_loads = (np.concatenate([self.step_loads, other.step_loads])
                      if self.step_loads is not None and other.step_loads is not None else None)
        return Profile(load=self.load + other.load, top_k=self.top_k,
                       tokens=self.tokens + other.tokens, **counts,
                       provenance=self.provenance + other.provenance,
                       source=f"{self.source} + {other.source}", steps=steps,
                       step_loads=step_loads)

    def skew(self) -> np.ndarray:
        """``[L]`` busiest expert's load / mean expert load per layer (1.0 = uniform)."""
        mean = self.load.mean(axis=1)
        return np.divide(self.load.max(axis=1), mean, out=np.ones_like(mean, dtype=float),
                         where=mean > 0)

    def mutual_information(self) -> np.ndarray | None:
        """``[L-1]`` bits of mutual information between consecutive layers' primary experts.

        Computed from ``transitions_top1`` (0 when layer l+1's choice is independent of layer
        l's, log2(E) at most); None for a loads-only profile.
        """
        if self.transitions_top1 is None:
            return None
        return mutual_information(self.transitions_top1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as ``.npz`` (atomically); ``load_profile`` reads it back."""
        arrays = {name: getattr(self, name) for name in _COUNT_FIELDS
                  if getattr(self, name) is not None}
        for name in ("stability_load", "stability_transitions"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        if self.steps is not None:
            arrays.update(self.steps.arrays())
        if self.step_loads is not None:
            arrays["step_loads"] = self.step_loads
        arrays["top_k"] = np.asarray(self.top_k)
        arrays["tokens"] = np.asarray(self.tokens)
        arrays["provenance_json"] = np.asarray(json.dumps(self.provenance))
        write_npz(path, **arrays)


def mutual_information(joint_counts: np.ndarray) -> np.ndarray:
    """Mutual information in bits of each ``[..., E, E]`` joint count table; ``[...]``."""
    counts = np.asarray(joint_counts, dtype=np.float64)
    total = counts.sum(axis=(-2, -1), keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    px = p.sum(axis=-1, keepdims=True)
    py = p.sum(axis=-2, keepdims=True)
    ratio = np.divide(p, px * py, out=np.ones_like(p), where=p > 0)
    return (p * np.log2(ratio)).sum(axis=(-2, -1))


def _correlation_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``a[i].ravel()`` with ``b[i].ravel()`` for each leading index."""
    x = a.reshape(a.shape[0], -1).astype(np.float64)
    y = b.reshape(b.shape[0], -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denom = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    return np.divide((x * y).sum(axis=1), denom, out=np.full(len(x), np.nan), where=denom > 0)


def _validate(p: Profile) -> None:
    src, load = p.source, np.asarray(p.load)
    if load.ndim != 2 or load.shape[0] < 1 or load.shape[1] < 1:
        raise InputError(src, "load", "a 2-D array [layers, experts]", list(load.shape))
    if not (np.issubdtype(load.dtype, np.integer) or np.issubdtype(load.dtype, np.floating)):
        raise InputError(src, "load", "numeric counts", load.dtype)
    L, E = load.shape
    if E > MAX_EXPERTS or L > MAX_LAYERS:
        raise InputError(src, "load", f"at most {MAX_LAYERS} layers x {MAX_EXPERTS} experts",
                         list(load.shape))
    expected = {"transitions": (L - 1, E, E), "transitions_top1": (L - 1, E, E),
                "coactivation": (L, E, E)}
    for name in _COUNT_FIELDS:
        arr = getattr(p, name)
        if arr is None:
            continue
        if name != "load" and tuple(arr.shape) != expected[name]:
            raise InputError(src, name, f"shape {list(expected[name])}", list(arr.shape))
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise InputError(src, name, "numeric counts", arr.dtype)
        if not np.isfinite(arr).all():
            raise InputError(src, name, "finite counts", "NaN or inf")
        if (arr < 0).any():
            raise InputError(src, name, "non-negative counts", f"minimum {arr.min()}")
    if p.top_k < 1 or p.top_k > E:
        raise InputError(src, "top_k", f"an integer in [1, {E}]", p.top_k)
    if p.tokens < 0:
        raise InputError(src, "tokens", "a non-negative token count", p.tokens)
    for name, length in (("stability_load", L), ("stability_transitions", L - 1)):
        arr = getattr(p, name)
        if arr is not None and (arr.shape != (length,) or not np.issubdtype(arr.dtype,
                                                                            np.floating)):
            raise InputError(src, name, f"correlations [{length}]",
                             f"{arr.dtype} {list(arr.shape)}")
    if not isinstance(p.provenance, list) or not all(isinstance(e, dict) for e in p.provenance):
        raise InputError(src, "provenance_json", "a JSON list of objects",
                         type(p.provenance).__name__)
    if p.steps is not None:
        ids = p.steps.ids
        if ids.shape[1:] != (L, p.top_k) or (ids.size and int(ids.max()) >= E):
            raise InputError(src, "step_ids", f"[n, {L}, {p.top_k}] expert ids below {E}",
                             f"{list(ids.shape)}")
    if p.step_loads is not None:
        check_step_loads(p.step_loads, L, E, src)


def check_step_loads(step_loads: np.ndarray, num_layers: int, num_experts: int,
                     source: str | os.PathLike) -> None:
    """Raise ``InputError`` unless ``step_loads`` is non-negative integer counts
    ``[S, num_layers, num_experts]``."""
    array = np.asarray(step_loads)
    expected = f"non-negative integer counts [steps, {num_layers}, {num_experts}]"
    if array.ndim != 3 or array.shape[1:] != (num_layers, num_experts) \
            or not np.issubdtype(array.dtype, np.integer):
        raise InputError(source, "step_loads", expected, f"{array.dtype} {list(array.shape)}")
    if array.size and array.min() < 0:
        raise InputError(source, "step_loads", expected, f"minimum {array.min()}")


def check_count_size(num_layers: int, num_experts: int, source: str) -> None:
    """Refuse, before allocating, a profile whose ``[L, E, E]`` counts exceed
    ``MAX_PAIR_CELLS`` (one huge id in a trace implies a huge E)."""
    if num_experts > MAX_EXPERTS:
        raise InputError(source, "num_experts", f"an expert count in [1, {MAX_EXPERTS}] (ids "
                         f"below {MAX_EXPERTS})", num_experts)
    if num_layers * num_experts * num_experts > MAX_PAIR_CELLS:
        raise InputError(source, "num_experts", f"L x E x E at most {MAX_PAIR_CELLS} count "
                         f"cells (L = {num_layers})", num_experts)


def native_ids(ids: np.ndarray) -> np.ndarray:
    """``ids`` C-contiguous in native byte order, as the compiled counters take them (a
    big-endian ``.npz`` array would not compile); no copy when it already is."""
    return np.ascontiguousarray(ids, dtype=ids.dtype.newbyteorder("="))


class RoutingCounter:
    """Accumulates the four count arrays of a stream of ``[tokens, L, k]`` id chunks.

    With ``cut`` (a token index, e.g. ``half_cut``), it also keeps the load and transitions
    of the first ``cut`` tokens; the second half is the total minus the first, so the
    stability figures cost one copy of two arrays instead of a second counter.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int,
                 cut: int | None = None) -> None:
        L, E = num_layers, num_experts
        self.L, self.E, self.k = L, E, top_k
        self.load = np.zeros((L, E), np.int64)
        self.transitions = np.zeros((max(L - 1, 0), E, E), np.int64)
        self.transitions_top1 = np.zeros((max(L - 1, 0), E, E), np.int64)
        self.coactivation_upper = np.zeros((L, E, E), np.int64)
        self.cut = cut
        self.counted = 0
        self.first_half: dict[str, np.ndarray] | None = None

    def grow(self, num_experts: int) -> None:
        """Widen the counts to ``num_experts`` (a streamed shard that does not store E)."""
        extra = num_experts - self.E
        if extra <= 0:
            return
        self.load = np.pad(self.load, ((0, 0), (0, extra)))
        for name in ("transitions", "transitions_top1", "coactivation_upper"):
            setattr(self, name, np.pad(getattr(self, name), ((0, 0), (0, extra), (0, extra))))
        if self.first_half is not None:
            self.first_half = {
                "load": np.pad(self.first_half["load"], ((0, 0), (0, extra))),
                "transitions": np.pad(self.first_half["transitions"],
                                      ((0, 0), (0, extra), (0, extra)))}
        self.E = num_experts

    def add(self, ids: np.ndarray) -> None:
        """Count the next chunk ``ids [t, L, k]`` (ids in ``[0, E)``, as ``Trace`` checks)."""
        if self.cut is not None and self.first_half is None \
                and self.counted + len(ids) >= self.cut:
            split = self.cut - self.counted
            self._count(ids[:split])
            self.first_half = {"load": self.load.copy(), "transitions": self.transitions.copy()}
            ids = ids[split:]
        self._count(ids)

    def _count(self, ids: np.ndarray) -> None:
        from moetuner.kernels import count_chunk  # numba: imported when first counting

        count_chunk(native_ids(ids), self.load, self.transitions,
                     self.transitions_top1, self.coactivation_upper)
        self.counted += len(ids)

    def profile(self, provenance: list[dict], source: str) -> Profile:
        """The profile of everything counted (call once, when counting is done; it shares
        the counter's arrays), with stability figures when ``cut`` was given."""
        diagonal = np.arange(self.E)
        coactivation = self.coactivation_upper + self.coactivation_upper.transpose(0, 2, 1)
        coactivation[:, diagonal, diagonal] = self.load
        stability = {}
        if self.cut is not None:
            first = self.first_half or {"load": self.load, "transitions": self.transitions}
            stability["stability_load"] = _correlation_rows(first["load"],
                                                            self.load - first["load"])
            if self.L > 1:
                stability["stability_transitions"] = _correlation_rows(
                    first["transitions"], self.transitions - first["transitions"])
        return Profile(load=self.load, transitions=self.transitions,
                       transitions_top1=self.transitions_top1, coactivation=coactivation,
                       top_k=self.k, tokens=self.counted, **stability,
                       provenance=provenance, source=source)


def chunk_tokens_for(num_layers: int, num_experts: int, top_k: int) -> int:
    """Tokens per chunk so that one chunk holds about ``CHUNK_ELEMENTS`` routing records."""
    del num_experts  # the compiled counter needs no per-chunk E x E scratch
    return max(1, CHUNK_ELEMENTS // (num_layers * top_k))


def half_cut(num_tokens: int, seq_lens: np.ndarray | None) -> int | None:
    """Token index where ``Trace.split(0.5)`` cuts a trace, or None (one token or fewer:
    no halves, no stability figures)."""
    if num_tokens <= 1:
        return None
    if seq_lens is None:
        return int(round(num_tokens * 0.5))
    return int(np.sum(seq_lens[:first_sequences(seq_lens, 0.5)]))


def profile_trace(
    trace: Trace,
    chunk_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    step_gpus: int | None = None,
    plan: StepPlan = StepPlan(),
) -> Profile:
    """Count a trace's routing statistics in streaming chunks.

    The stability figures compare the two halves of the trace (``Trace.split(0.5)``: at a
    sequence boundary when the trace has sequences).

    Args:
        trace: the routing trace.
        chunk_tokens: tokens per chunk (bounds memory); default from ``chunk_tokens_for``.
        progress: called with the number of tokens counted after each chunk.
        step_gpus: when given, also keep engine steps sampled for G GPUs (``sample_steps``
            under ``plan``) for per-step objectives.
    """
    check_count_size(trace.num_layers, trace.num_experts, trace.source)
    chunk = chunk_tokens or chunk_tokens_for(trace.num_layers, trace.num_experts, trace.top_k)
    counter = RoutingCounter(trace.num_layers, trace.num_experts, trace.top_k,
                             cut=half_cut(trace.num_tokens, trace.seq_lens))
    for ids in trace.chunks(chunk):
        counter.add(ids)
        if progress is not None:
            progress(ids.shape[0])
    provenance = [{"source": trace.source, "selection": trace.selection,
                   "tokens": trace.num_tokens}]
    steps = (None if step_gpus is None or not trace.num_tokens
             else sample_steps(trace, step_gpus, plan))
    return dataclasses.replace(counter.profile(provenance, trace.source), steps=steps)


def profiles_by_label(trace: Trace, label: str, **steps) -> list[Profile]:
    """One profile per value of the per-sequence label ``label`` (e.g. ``seq_category``).

    Passed as a ``Workload`` (with their token counts as weights), they make
    ``joint`` minimise the expected objective over the sub-workloads, which hedges a static
    placement against a change of the mix (drift) instead of fitting one aggregate.
    ``steps`` (``step_gpus``, ``plan``) go to ``profile_trace``.
    """
    labels = trace.labels(label)
    return [profile_trace(trace.take_sequences(labels == value, f"{label}={value}"), **steps)
            for value in sorted(set(labels.tolist()))]


def load_profile(path: str | os.PathLike) -> Profile:
    """Read a profile ``.npz`` written by ``Profile.save``, validating every field."""
    path = Path(path)
    arrays = read_npz(path, "a numpy .npz profile")
    if "load" not in arrays:
        raise InputError(path, "load", "an array [layers, experts] in the .npz")
    steps = _read_steps(path, arrays)
    top_k = as_int(arrays.pop("top_k", 1), path, "top_k", 1, MAX_EXPERTS)
    tokens = as_int(arrays.pop("tokens", 0), path, "tokens", 0)
    provenance_json = arrays.pop("provenance_json", np.asarray("[]"))
    if provenance_json.ndim or provenance_json.dtype.kind != "U":
        raise InputError(path, "provenance_json", "a JSON string",
                         f"{provenance_json.dtype} {list(provenance_json.shape)}")
    provenance = parse_json(str(provenance_json), path, "provenance_json", "a JSON list")
    known = set(_COUNT_FIELDS) | {"stability_load", "stability_transitions", "step_loads"}
    unknown = set(arrays) - known
    if unknown:
        raise InputError(path, ", ".join(sorted(unknown)), f"only the fields {sorted(known)}")
    return Profile(**arrays, top_k=top_k, tokens=tokens, provenance=provenance,
                   source=str(path), steps=steps)


def _read_steps(path: Path, arrays: dict[str, np.ndarray]) -> StepSample | None:
    """Pop and check the ``step_*`` arrays of a profile file (None when there are none)."""
    if "step_ids" not in arrays:
        return None
    missing = [name for name in (*_STEP_FIELDS, "step_meta_json") if name not in arrays]
    if missing:
        raise InputError(path, missing[0], "every step_* array of a sampled-steps profile")
    ids, bounds, slot, token = (np.asarray(arrays.pop(name)) for name in _STEP_FIELDS)
    for name, array in zip(_STEP_FIELDS, (ids, bounds, slot, token), strict=True):
        if not np.issubdtype(array.dtype, np.integer) or (array.size and array.min() < 0):
            raise InputError(path, name, "non-negative integers", str(array.dtype))
    meta_json = arrays.pop("step_meta_json")
    meta = parse_json(str(meta_json), path, "step_meta_json", "a JSON object")
    if not isinstance(meta, dict) or meta.get("batching") not in ("decode", "prefill", "none"):
        raise InputError(path, "step_meta_json", "an object with batching, concurrency, ordered",
                         meta)
    concurrency = as_int(meta.get("concurrency"), path, "step_meta_json.concurrency", 1)
    ordered = as_bool(meta.get("ordered"), path, "step_meta_json.ordered")
    n = ids.shape[0] if ids.ndim == 3 else -1
    if (n < 0 or bounds.ndim != 1 or bounds.size < 2 or bounds[0] != 0 or bounds[-1] != n
            or (np.diff(bounds) < 0).any() or slot.shape != (n,) or token.shape != (n,)):
        raise InputError(path, "step_bounds", "steps [S + 1] covering the [n, L, k] step_ids",
                         f"{list(bounds.shape)} for {list(ids.shape)}")
    return StepSample(ids=ids, bounds=bounds.astype(np.int64), slot=slot.astype(np.int64),
                      token=token.astype(np.int64), batching=meta["batching"],
                      concurrency=concurrency, ordered=ordered)

