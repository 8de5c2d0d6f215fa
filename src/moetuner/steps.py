"""Engine steps: how a serving engine groups a trace's tokens into forward passes.

A layer of a step waits for that step's busiest GPU, so the evaluator and the per-step
objectives count load and traffic step by step. ``Steps`` holds the grouping; the functions
below form it the way engines batch:

- ``decode_steps``: continuous batching. C slots (running sequences) in the whole cluster;
  every slot starts a sequence at step 0 (in trace order, slot 0 first) and takes the next
  sequence of the trace the step after its own sequence ends (when several slots free up at
  once, the lowest slot first). A step holds one token of every running sequence; a token's
  home GPU is its slot's rank, ``slot mod G``. Without ``seq_lens`` every token is its own
  sequence.
- ``prefill_steps``: the tokens in trace order cut into steps of N (``max_num_batched_tokens``);
  the step's tokens are split into G contiguous blocks, block r homed on GPU r (data-parallel
  attention gives each rank a contiguous piece of the chunk).
- ``whole_trace``: one step of every token, home ``t mod G`` (the whole-trace average).

Those replay the recorded order, whose steps hold only the sequences a trace recorded (a
few hundred requests: tens of tokens in a whole cluster). Clusters serve thousands at once,
so by default steps are synthesised at serving scale from the recorded requests
(``serving_steps``), drawn once with a seed so every placement is scored on the same steps:

- decode: N x G slots (N tokens per GPU, default 128); each slot starts in a recorded
  request drawn with replacement in proportion to its length (the request a slot holds at a
  random moment of steady-state continuous batching) at a uniformly random offset, then
  runs fresh requests drawn uniformly from their start. Home: slot mod G.
- prefill: whole recorded requests drawn uniformly with replacement, concatenated and cut
  into steps of N x G tokens (N default 4,096), each split into G contiguous blocks.

A request drawn twice is replayed twice; each replayed token has its own replica-choice key
(a seeded permutation of the positions: a decode position mod G is the token's home, so
position keys would make ``even`` pick one replica for all tokens of a GPU).

For optimisation, ``mixture_steps`` hedges against a served workload that differs from the
profiled one: each step is drawn independently from its own mixture of the profiled
request groups (``moetuner.profile.request_groups``), with weights drawn from a symmetric
Dirichlet distribution, so the steps span the mixes of the kinds of requests the profile
holds rather than its one average mix.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moetuner.engine import Phase, checked
from moetuner.errors import InputError

# How steps are formed: synthesised at serving scale, the recorded order, or one averaged step.
StepSource = Literal["serving", "recorded", "average"]
# Tokens per GPU of a serving-scale step by default (production decode and prefill, brief
# section 10), and steps drawn by default.
TOKENS_PER_GPU = {"decode": 128, "prefill": 4096}
SERVING_STEPS = {"decode": 64, "prefill": 16}
# Replayed tokens of synthesised steps at most (three int64 arrays of them: 1.5 GiB).
MAX_SYNTHESISED_TOKENS = 1 << 26
# Running sequences per GPU in the default decode batching.
DEFAULT_SEQUENCES_PER_GPU = 128
# Tokens per prefill step by default (vLLM's default max_num_batched_tokens, chunked prefill).
DEFAULT_STEP_TOKENS = 8192


@dataclass(frozen=True)
class Steps:
    """Tokens grouped into steps.

    Attributes:
        order: int64 ``[n]`` token indices (into the trace) in step order; each token once.
        bounds: int64 ``[S + 1]`` step s holds ``order[bounds[s]:bounds[s + 1]]``.
        home: int64 ``[n]`` home GPU of the token ``order[i]``.
        num_gpus: G.
        description: how the steps were formed, for reports.
        key: int64 ``[n]`` replica-choice hash of each replayed token, or None for
            ``order`` (the trace index; synthesised steps replay a token more than once).
    """

    order: np.ndarray
    bounds: np.ndarray
    home: np.ndarray
    num_gpus: int
    description: str = ""
    key: np.ndarray | None = None

    @property
    def keys(self) -> np.ndarray:
        """int64 ``[n]`` replica-choice hash of each replayed token."""
        return self.order if self.key is None else self.key

    @property
    def num_steps(self) -> int:
        return int(self.bounds.shape[0] - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.order.shape[0])

    @property
    def sizes(self) -> np.ndarray:
        """int64 ``[S]`` tokens per step."""
        return np.diff(self.bounds)

    @property
    def step_of(self) -> np.ndarray:
        """int64 ``[n]`` step of the token ``order[i]``."""
        return np.repeat(np.arange(self.num_steps, dtype=np.int64), self.sizes)

    def chunks(self, max_tokens: int, max_steps: int | None = None
               ) -> Iterator[tuple[int, int]]:
        """Ranges ``[lo, hi)`` of whole steps holding at most ``max_tokens`` tokens and
        ``max_steps`` steps each (a single step larger than that is a range of its own),
        covering every step in order."""
        lo = 0
        while lo < self.num_steps:
            limit = self.bounds[lo] + max(int(max_tokens), 1)
            hi = int(np.searchsorted(self.bounds, limit, side="right")) - 1
            if max_steps is not None:
                hi = min(hi, lo + max(int(max_steps), 1))
            hi = min(max(hi, lo + 1), self.num_steps)
            yield lo, hi
            lo = hi

    def take(self, steps: np.ndarray) -> Steps:
        """The steps with the given indices (in that order)."""
        steps = np.asarray(steps, dtype=np.int64)
        sizes = self.sizes[steps]
        index = (np.repeat(self.bounds[steps] - np.cumsum(sizes) + sizes, sizes)
                 + np.arange(int(sizes.sum())))
        return Steps(order=self.order[index], home=self.home[index],
                     bounds=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                     num_gpus=self.num_gpus, description=self.description,
                     key=None if self.key is None else self.key[index])

    def sample(self, count: int, seed: int = 0) -> Steps:
        """``count`` steps drawn without replacement (all when there are fewer), in step
        order; empty steps are never drawn."""
        nonempty = np.flatnonzero(self.sizes > 0)
        if count >= nonempty.size:
            return self.take(nonempty)
        rng = np.random.default_rng(seed)
        return self.take(np.sort(rng.choice(nonempty, size=count, replace=False)))


def decode_steps(seq_lens: np.ndarray | None, num_tokens: int, concurrency: int,
                 num_gpus: int) -> Steps:
    """Continuous batching of ``concurrency`` running sequences (module docstring).

    Args:
        seq_lens: int ``[sequences]`` tokens per sequence, stored one after another, or None
            (every token its own sequence).
        num_tokens: T, the trace's tokens (the sum of ``seq_lens``).
        concurrency: C, running sequences in the whole cluster.
        num_gpus: G; the home of slot c is GPU ``c mod G``.
    """
    _check_positive("--concurrency", "concurrency", concurrency)
    _check_positive("--gpus", "num_gpus", num_gpus)
    seq_lens, offsets = request_spans(seq_lens, num_tokens)
    start, slot = _schedule(seq_lens, concurrency)
    token_seq = np.repeat(np.arange(seq_lens.size), seq_lens)
    position = np.arange(num_tokens, dtype=np.int64) - offsets[token_seq]
    step = start[token_seq] + position
    token_slot = slot[token_seq]
    order = np.lexsort((token_slot, step))
    counts = np.bincount(step, minlength=int(step.max()) + 1 if num_tokens else 0)
    return Steps(order=order.astype(np.int64),
                 bounds=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                 home=(token_slot[order] % num_gpus).astype(np.int64), num_gpus=num_gpus,
                 description=f"decode, {concurrency} running sequences")


def _schedule(seq_lens: np.ndarray, concurrency: int) -> tuple[np.ndarray, np.ndarray]:
    """Start step and slot of every sequence under continuous batching (zero-length
    sequences take no slot)."""
    count = seq_lens.size
    start = np.zeros(count, dtype=np.int64)
    slot = np.zeros(count, dtype=np.int64)
    if count and (seq_lens == 1).all():
        # One-token sequences: step s runs sequences [s C, (s + 1) C); no heap needed.
        index = np.arange(count, dtype=np.int64)
        return index // concurrency, index % concurrency
    free = [(0, c) for c in range(min(concurrency, count))]
    for q in np.flatnonzero(seq_lens > 0):
        when, c = heapq.heappop(free)
        start[q], slot[q] = when, c
        heapq.heappush(free, (when + int(seq_lens[q]), c))
    return start, slot


def prefill_steps(num_tokens: int, step_tokens: int, num_gpus: int) -> Steps:
    """Tokens in trace order, ``step_tokens`` per step, each step's tokens in G contiguous
    blocks homed on GPUs 0..G-1."""
    _check_positive("--step-tokens", "step_tokens", step_tokens)
    _check_positive("--gpus", "num_gpus", num_gpus)
    order = np.arange(num_tokens, dtype=np.int64)
    bounds = np.append(np.arange(0, num_tokens, step_tokens), num_tokens).astype(np.int64)
    if num_tokens == 0:
        bounds = np.zeros(1, dtype=np.int64)
    return Steps(order=order, bounds=bounds, home=block_homes(bounds, num_gpus),
                 num_gpus=num_gpus, description=f"prefill, {step_tokens} tokens per step")


def block_homes(bounds: np.ndarray, num_gpus: int) -> np.ndarray:
    """int64 ``[n]`` home GPU of each token when every step ``bounds [S + 1]`` is split into
    G contiguous blocks, block r homed on GPU r (prefill's homes)."""
    sizes = np.diff(bounds)
    within = np.arange(int(bounds[-1]), dtype=np.int64) - np.repeat(bounds[:-1], sizes)
    return (within * num_gpus // np.repeat(sizes, sizes)).astype(np.int64)


def whole_trace(num_tokens: int, num_gpus: int) -> Steps:
    """One step of all tokens, home ``t mod G``: the whole-trace average."""
    _check_positive("--gpus", "num_gpus", num_gpus)
    order = np.arange(num_tokens, dtype=np.int64)
    return Steps(order=order, bounds=np.array([0, num_tokens], dtype=np.int64),
                 home=order % num_gpus, num_gpus=num_gpus, description="whole trace")


def make_steps(seq_lens: np.ndarray | None, num_tokens: int, num_gpus: int,
               phase: str = "decode", concurrency: int | None = None,
               step_tokens: int | None = None) -> Steps:
    """Steps of a trace in its recorded order for ``phase`` (``decode``: continuous
    batching; ``prefill``: chunks).

    Defaults: ``concurrency`` = 128 x G running sequences; ``step_tokens`` =
    ``DEFAULT_STEP_TOKENS``.
    """
    if checked(phase, Phase, "--phase", "phase") == "decode":
        return decode_steps(seq_lens, num_tokens,
                            concurrency or DEFAULT_SEQUENCES_PER_GPU * num_gpus, num_gpus)
    return prefill_steps(num_tokens, step_tokens or DEFAULT_STEP_TOKENS, num_gpus)


@dataclass(frozen=True)
class StepPlan:
    """How the evaluator and the objectives form engine steps.

    Attributes:
        phase: ``decode`` or ``prefill``.
        source: ``serving`` (synthesised at serving scale, ``serving_steps``), ``recorded``
            (the trace's own order, ``make_steps``) or ``average`` (the whole-trace average).
        tokens_per_gpu: serving: tokens per GPU per step (default ``TOKENS_PER_GPU``).
        num_steps: serving: steps drawn (default ``SERVING_STEPS``).
        seed: serving: the draw's seed.
        concurrency: recorded decode: running sequences (default 128 x G).
        step_tokens: recorded prefill: tokens per step (default ``DEFAULT_STEP_TOKENS``).
        hedge: serving: the Dirichlet concentration of ``mixture_steps`` (each step from
            its own mix of request groups), or None for the profiled mix
            (``serving_steps``). Needs the requests' groups (``steps(groups=...)``).
    """

    phase: Phase = "decode"
    source: StepSource = "serving"
    tokens_per_gpu: int | None = None
    num_steps: int | None = None
    seed: int = 0
    concurrency: int | None = None
    step_tokens: int | None = None
    hedge: float | None = None

    def __post_init__(self) -> None:
        checked(self.phase, Phase, "--phase", "phase")
        if self.hedge is not None and not 0 < self.hedge < np.inf:
            raise InputError("params", "hedge", "a positive Dirichlet concentration or None",
                             self.hedge)
        checked(self.source, StepSource, "--replay", "replay")
        for flag, value in (("--tokens-per-gpu", self.tokens_per_gpu),
                            ("--steps", self.num_steps), ("--concurrency", self.concurrency),
                            ("--step-tokens", self.step_tokens)):
            if value is not None:
                _check_positive(flag, flag.lstrip("-").replace("-", "_"), value)

    def steps(self, seq_lens: np.ndarray | None, num_tokens: int, num_gpus: int,
              groups: np.ndarray | None = None) -> Steps | None:
        """The steps of a trace with ``seq_lens`` and ``num_tokens`` on G GPUs (None for the
        whole-trace average); ``groups``: each request's group, for ``hedge``."""
        if self.source == "average":
            return None
        if self.source == "recorded":
            return make_steps(seq_lens, num_tokens, num_gpus, self.phase, self.concurrency,
                              self.step_tokens)
        per_gpu = self.tokens_per_gpu or TOKENS_PER_GPU[self.phase]
        count = self.num_steps or SERVING_STEPS[self.phase]
        if self.hedge is not None:
            if groups is None:
                raise InputError("params", "hedge", "the requests' groups (hedged steps)")
            return mixture_steps(seq_lens, num_tokens, num_gpus, self.phase, per_gpu, count,
                                 groups, self.hedge, self.seed)
        return serving_steps(seq_lens, num_tokens, num_gpus, self.phase, per_gpu, count,
                             self.seed)


def serving_steps(seq_lens: np.ndarray | None, num_tokens: int, num_gpus: int, phase: str,
                  tokens_per_gpu: int, num_steps: int, seed: int = 0) -> Steps:
    """``num_steps`` steps of ``tokens_per_gpu x G`` tokens synthesised from the recorded
    requests (module docstring), the same for the same arguments.

    Args:
        seq_lens: int ``[R]`` tokens of each recorded request, stored one after another, or
            None (every token its own request).
        num_tokens: T, the trace's tokens.
        num_gpus: G.
        phase: ``decode`` or ``prefill``.
        tokens_per_gpu: N.
        num_steps: S.
    """
    checked(phase, Phase, "--phase", "phase")
    _check_positive("--gpus", "num_gpus", num_gpus)
    _check_size(tokens_per_gpu, num_gpus, num_steps)
    lens, starts = request_spans(seq_lens, num_tokens)
    requests = _with_tokens(lens)
    lens, starts = lens[requests], starts[requests]
    rng = np.random.default_rng(seed)
    width = tokens_per_gpu * num_gpus
    if phase == "decode":
        order = _decode_stream(lens, starts, width, num_steps, rng)
        home = np.tile(np.arange(width, dtype=np.int64) % num_gpus, num_steps)
        what = f"{width:,} running sequences per step"
    else:
        order, drawn = _prefill_stream(lens, starts, width * num_steps, rng)
        home = block_homes(np.arange(0, width * num_steps + 1, width, dtype=np.int64),
                           num_gpus)
        what = f"{width:,} tokens per step ({drawn:,} requests drawn)"
    # Keys: a permutation of the positions (module docstring).
    return Steps(order=order, bounds=np.arange(0, width * num_steps + 1, width,
                                               dtype=np.int64),
                 home=home, num_gpus=num_gpus,
                 key=rng.permutation(order.size).astype(np.int64),
                 description=f"{phase}: {what}, resampled from {lens.size:,} recorded "
                 f"requests, {num_steps} steps")


def mixture_steps(seq_lens: np.ndarray | None, num_tokens: int, num_gpus: int, phase: str,
                  tokens_per_gpu: int, num_steps: int, groups: np.ndarray, alpha: float,
                  seed: int = 0) -> Steps:
    """``num_steps`` independent steps of ``tokens_per_gpu x G`` tokens, step s served from
    its own mixture of the request groups (module docstring).

    Args:
        seq_lens: int ``[R]`` tokens of each recorded request, or None (one token each).
        num_tokens: T.
        groups: int ``[R]`` group of each request, in ``[0, K)``.
        alpha: the Dirichlet concentration (small: steps dominated by few groups).

    Within a step, a group's requests are drawn uniformly (decode: in proportion to their
    length, each slot at a random offset, as ``serving_steps`` starts a slot; prefill: whole
    requests one after another, the last cut short).
    """
    checked(phase, Phase, "--phase", "phase")
    _check_size(tokens_per_gpu, num_gpus, num_steps)
    lens, starts = request_spans(seq_lens, num_tokens)
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != lens.shape:
        raise InputError("groups", "groups", f"one group per request ({lens.size})",
                         list(groups.shape))
    keep = _with_tokens(lens)
    lens, starts, groups = lens[keep], starts[keep], groups[keep]
    size = np.bincount(groups, minlength=int(groups.max()) + 1).astype(np.float64)
    rng = np.random.default_rng(seed)
    width = tokens_per_gpu * num_gpus
    order = np.empty(width * num_steps, dtype=np.int64)
    # Centred on the profiled mix: group g's concentration is alpha x K x its share.
    concentration = float(alpha) * size.size * size / size.sum()
    for step in range(num_steps):
        mix = rng.dirichlet(np.maximum(concentration, 1e-3))
        chance = np.where(size[groups] > 0, mix[groups] / size[groups], 0.0)
        if phase == "decode":
            chance = chance * lens
            request = rng.choice(lens.size, size=width, p=chance / chance.sum())
            offset = (rng.random(width) * lens[request]).astype(np.int64)
            tokens = starts[request] + offset
        else:
            tokens = _prefill_stream(lens, starts, width, rng, chance / chance.sum())[0]
        order[step * width:(step + 1) * width] = tokens
    bounds = np.arange(0, width * num_steps + 1, width, dtype=np.int64)
    home = (np.tile(np.arange(width, dtype=np.int64) % num_gpus, num_steps)
            if phase == "decode" else block_homes(bounds, num_gpus))
    return Steps(order=order, bounds=bounds, home=home, num_gpus=num_gpus,
                 key=rng.permutation(order.size).astype(np.int64),
                 description=f"{phase}: {width:,} tokens per step, each step from its own "
                 f"mixture (Dirichlet {alpha:g}) of {size.size} request groups, {num_steps} "
                 "steps")


def request_spans(seq_lens: np.ndarray | None, num_tokens: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``[R]`` tokens of each recorded request and the trace index of its first token
    (requests are stored one after another; without ``seq_lens`` every one of the
    ``num_tokens`` tokens is its own request)."""
    lens = (np.ones(num_tokens, dtype=np.int64) if seq_lens is None
            else np.asarray(seq_lens, dtype=np.int64))
    return lens, np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)


def _with_tokens(lens: np.ndarray) -> np.ndarray:
    """Indices of the requests that hold tokens; an ``InputError`` when none does."""
    requests = np.flatnonzero(lens > 0)
    if not requests.size:
        raise InputError("--trace", "seq_lens", "at least one request with tokens", 0)
    return requests


def _decode_stream(lens: np.ndarray, starts: np.ndarray, slots: int, num_steps: int,
                   rng: np.random.Generator) -> np.ndarray:
    """int64 ``[num_steps x slots]`` trace index of each slot's token in each step (step
    major): each slot starts inside a length-biased request at a random offset, then runs
    requests drawn uniformly from their start."""
    table = np.empty((slots, num_steps), dtype=np.int64)
    request = rng.choice(lens.size, size=slots, p=lens / lens.sum())
    offset = (rng.random(slots) * lens[request]).astype(np.int64)
    filled = np.zeros(slots, dtype=np.int64)
    slot = np.arange(slots)
    while slot.size:
        take = np.minimum(lens[request] - offset, num_steps - filled[slot])
        within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
        rows = np.repeat(slot, take)
        table[rows, np.repeat(filled[slot], take) + within] = (
            np.repeat(starts[request] + offset, take) + within)
        filled[slot] += take
        slot = slot[filled[slot] < num_steps]
        request = rng.integers(lens.size, size=slot.size)
        offset = np.zeros(slot.size, dtype=np.int64)
    return table.T.ravel()


def _prefill_stream(lens: np.ndarray, starts: np.ndarray, total: int,
                    rng: np.random.Generator, chance: np.ndarray | None = None
                    ) -> tuple[np.ndarray, int]:
    """int64 ``[total]`` trace indices of whole requests drawn with replacement (uniformly,
    or with probabilities ``chance [R]``), one after another (the last cut short), and how
    many were drawn."""
    def draw(count: int) -> np.ndarray:
        if chance is None:
            return rng.integers(lens.size, size=count)
        return rng.choice(lens.size, size=count, p=chance)

    expected = max(1, int(np.ceil(total / lens.mean())))
    drawn = draw(expected)
    while lens[drawn].sum() < total:
        drawn = np.concatenate([drawn, draw(expected)])
    used = int(np.searchsorted(np.cumsum(lens[drawn]), total)) + 1
    drawn = drawn[:used]
    take = lens[drawn]
    within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
    return (np.repeat(starts[drawn], take) + within)[:total], used


def combine_gpu(gpu: np.ndarray, current: np.ndarray, num_gpus: int,
                ordered: bool) -> np.ndarray:
    """The GPU where ``follow`` combines each token's results (and where it then sits).

    Args:
        gpu: int ``[T, k]`` GPU serving each chosen expert (columns primary first when
            ``ordered``).
        current: int ``[T]`` GPU each token sits on.
        num_gpus: G.
        ordered: whether column 0 is the primary (highest-weight) expert.

    Returns:
        int ``[T]``: the primary expert's GPU when ``ordered``; otherwise the GPU holding
        most of the token's experts (ties: the token's current GPU, then the lowest id), so
        the answer does not depend on the column order.
    """
    if ordered:
        return gpu[:, 0]
    T = gpu.shape[0]
    counts = np.bincount((np.arange(T)[:, None] * num_gpus + gpu).ravel(),
                         minlength=T * num_gpus).reshape(T, num_gpus)
    tied = counts == counts.max(axis=1, keepdims=True)
    stay = tied[np.arange(T), current]
    return np.where(stay, current, tied.argmax(axis=1))


def _check_size(tokens_per_gpu: int, num_gpus: int, num_steps: int) -> None:
    """Refuse synthesised steps of more than ``MAX_SYNTHESISED_TOKENS`` tokens in all."""
    _check_positive("--tokens-per-gpu", "tokens_per_gpu", tokens_per_gpu)
    _check_positive("--steps", "num_steps", num_steps)
    if tokens_per_gpu * num_gpus * num_steps > MAX_SYNTHESISED_TOKENS:
        raise InputError("--tokens-per-gpu, --steps", "tokens_per_gpu",
                         f"tokens per GPU x {num_gpus} GPUs x steps at most "
                         f"{MAX_SYNTHESISED_TOKENS:,}", f"{tokens_per_gpu} x {num_steps} steps")


def _check_positive(flag: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(flag, name, "a positive integer", value)
