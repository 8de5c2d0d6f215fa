"""Synthetic routing traces for model shapes no public per-token trace covers.

The generator is a per-slot Markov chain over layers, fitted to a real profile:

- **Per-layer skew.** Layer l of the synthetic model copies the sorted load-share curve of
  the real layer it maps to (layers mapped proportionally), resampled to E experts and
  given to a random permutation of the experts: the busiest expert gets the same multiple of
  the mean load as in the real layer.
- **Cross-layer structure.** Each of a token's k slots moves from layer l to l+1 through the
  channel ``alpha_l * C_l + (1 - alpha_l) * independent``, where ``C_l`` is a sparse coupling
  with the right marginals (the average of ``FANOUT`` random monotone couplings, so every
  expert has a handful of favoured successors) and ``alpha_l`` is set by bisection so that the
  channel's mutual information equals the real pair's primary-to-primary MI in bits. Experts
  that share predecessors are chosen together, which gives co-activation structure too.
- **Distinct top-k.** Repeated experts within a token are redrawn from the layer's load
  distribution; the primary slot (slot 0) is never redrawn, so primaries follow the fitted
  chain exactly.

Everything runs over all tokens at once (loops over layers and redraw rounds only). A
synthetic trace says what it is: its ``source`` starts with ``synthetic``, and its file carries
the per-sequence labels ``seq_synthetic`` (True) and ``seq_dataset`` (``synthetic:<like>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetuner.errors import InputError
from moetuner.io import MAX_EXPERTS, MAX_LAYERS
from moetuner.profile import Profile, load_profile, mutual_information
from moetuner.trace import Trace

# Random monotone couplings averaged into one layer-to-layer coupling (successors per expert).
FANOUT = 4
# Tokens per synthetic sequence (the file is cut into sequences so it splits and selects).
SEQUENCE_TOKENS = 512
# Rounds of redrawing repeated experts before the remaining rows are drawn without repeats.
REDRAW_ROUNDS = 8
# Guide-table buckets per table entry in ``_search`` (more: fewer keys step forward).
GUIDE_BUCKETS = 4
# Most ids (tokens x layers x k) one synthetic trace may hold: 512 Mi ids (DeepSeek-V3's
# 58 x top-8 with a million tokens), so a bad flag is refused before it asks for the memory.
MAX_SYNTH_IDS = 1 << 29
# Profile of the shipped GPT-OSS-20B slice (data/gpt-oss-20b, repetitions dropped), packaged
# so that installed copies fit synthetic traces without the repository.
DEFAULT_LIKE = Path(__file__).resolve().parent / "data" / "gpt-oss-20b-slice-profile.npz"


@dataclass(frozen=True)
class SynthFit:
    """How a synthetic trace compares with the real profile it was fitted to.

    Attributes:
        real_skew: ``[L]`` max/mean expert load of the real layer each synthetic layer maps to.
        synth_skew: ``[L]`` max/mean expert load of the synthetic layers.
        real_mi: ``[L-1]`` primary-to-primary MI (bits, bias-corrected) of the mapped real
            layer pairs (empty if the real profile has no transitions).
        synth_mi: ``[L-1]`` the same for the synthetic trace.
    """

    real_skew: np.ndarray
    synth_skew: np.ndarray
    real_mi: np.ndarray
    synth_mi: np.ndarray

    def summary(self) -> str:
        """One readable paragraph: means and the worst per-layer relative error."""
        skew_err = np.abs(self.synth_skew / self.real_skew - 1).max()
        text = (f"skew (max/mean expert load): real mean {self.real_skew.mean():.2f}, "
                f"synthetic mean {self.synth_skew.mean():.2f} (worst layer off by "
                f"{100 * skew_err:.0f}%)")
        if self.real_mi.size and self.synth_mi.size:
            text += (f"\nconsecutive-layer MI (bits, bias-corrected): real mean "
                     f"{self.real_mi.mean():.3f}, synthetic mean {self.synth_mi.mean():.3f}")
        return text


def default_like() -> Profile:
    """The profile synthetic traces are fitted to by default: the shipped GPT-OSS-20B slice."""
    return load_profile(DEFAULT_LIKE)


def synthesize_trace(
    num_layers: int,
    num_experts: int,
    top_k: int,
    num_tokens: int,
    *,
    like: Profile | None = None,
    seed: int = 0,
) -> Trace:
    """A synthetic per-token trace whose skew and cross-layer structure follow ``like``.

    Args:
        num_layers: MoE layers (L) of the synthetic model.
        num_experts: experts per layer (E).
        top_k: experts per token (k), at most E.
        num_tokens: tokens (T) to generate.
        like: the real profile to fit (its loads and ``transitions_top1``); default: the
            shipped GPT-OSS-20B slice (24 x 32, top-4) via ``default_like``. A loads-only
            profile gives independent layers.
        seed: the random seed; the same arguments and seed give the same trace.

    Returns:
        A ``Trace`` with ``topk_ids [T, L, k]`` (uint8 for E <= 256), sequences of
        ``SEQUENCE_TOKENS`` tokens labelled ``seq_synthetic`` and ``seq_dataset``.
    """
    _check_shape(num_layers, num_experts, top_k, num_tokens, seed)
    like = default_like() if like is None else like
    rng = np.random.default_rng(seed)
    shares = layer_shares(like, num_layers, num_experts, rng)                 # [L, E]
    target_mi = _mapped_mi(like, num_layers)                                    # [L-1]
    dtype = np.uint8 if num_experts <= 256 else np.int32
    ids = np.empty((num_tokens, num_layers, top_k), dtype=dtype)
    current = _draw(shares[0], (num_tokens, top_k), rng)                        # [T, k]
    current = _make_distinct(current, shares[0], rng)
    ids[:, 0] = current
    for layer in range(1, num_layers):
        rows, cols, joint = _coupling(shares[layer - 1], shares[layer], rng)
        alpha = _fit_alpha(shares[layer - 1], shares[layer], rows, cols, joint,
                           target_mi[layer - 1])
        table = _sampling_table(rows, joint, num_experts)
        follow = rng.random(current.shape) < alpha
        nxt = np.empty_like(current)
        nxt[follow] = _follow(current[follow], cols, table, rng)
        nxt[~follow] = _draw(shares[layer], (int((~follow).sum()),), rng)
        current = _make_distinct(nxt, shares[layer], rng)
        ids[:, layer] = current
    num_seqs = max(1, -(-num_tokens // SEQUENCE_TOKENS))
    seq_lens = np.full(num_seqs, SEQUENCE_TOKENS, dtype=np.int64)
    seq_lens[-1] = num_tokens - SEQUENCE_TOKENS * (num_seqs - 1)
    like_name = Path(like.source).name
    fitted_to = "; ".join(f"{p['source']} ({p['selection']})" for p in like.provenance)
    return Trace(
        topk_ids=ids, num_experts=num_experts, seq_lens=seq_lens,
        seq_labels={"seq_synthetic": np.ones(num_seqs, dtype=bool),
                    "seq_dataset": np.full(num_seqs, f"synthetic:{like_name}")},
        source=f"synthetic(like={fitted_to or like.source}, seed={seed})",
        selection=f"synthetic {num_layers}x{num_experts} top-{top_k}, {num_tokens} tokens",
    )


def is_synthetic(trace: Trace) -> bool:
    """Whether a trace (in memory or read back from a file) was made by ``synthesize_trace``."""
    flags = trace.seq_labels.get("seq_synthetic")
    return trace.source.startswith("synthetic") or (flags is not None and bool(flags.any()))


def synthesis_fit(real: Profile, synthetic: Trace) -> SynthFit:
    """Compare a synthetic trace's per-layer skew and consecutive-layer MI with ``real``'s.

    Synthetic layer l is compared with the real layer it was fitted to (the proportional
    mapping ``synthesize_trace`` uses). MI is the plug-in estimate minus the Miller-Madow bias
    ``(cells - rows - cols + 1) / (2 N ln 2)``, which otherwise dominates at E = 256.
    """
    L, E = synthetic.num_layers, synthetic.num_experts
    ids = synthetic.topk_ids.astype(np.int64)
    flat = ids + (np.arange(L) * E)[None, :, None]
    load = np.bincount(flat.ravel(), minlength=L * E).reshape(L, E)
    top1 = flat[:, :-1, 0] * E + ids[:, 1:, 0]
    transitions_top1 = np.bincount(top1.ravel(), minlength=(L - 1) * E * E).reshape(L - 1, E, E)
    synth = Profile(load=load, top_k=synthetic.top_k, tokens=synthetic.num_tokens,
                    transitions_top1=transitions_top1, source=synthetic.source)
    real_mi = _mapped_mi(real, L) if real.transitions_top1 is not None else np.zeros(0)
    return SynthFit(real_skew=real.skew()[_layer_map(real.num_layers, L)],
                    synth_skew=synth.skew(), real_mi=real_mi,
                    synth_mi=_corrected_mi(transitions_top1) if L > 1 else np.zeros(0))


def layer_shares(like: Profile, num_layers: int, num_experts: int,
                 rng: np.random.Generator) -> np.ndarray:
    """``[L, E]`` per-layer expert load shares (rows sum to 1) following ``like``'s skew.

    The real layer's sorted share curve is read as a quantile function on [0, 1] and sampled
    at the E midpoints, so max/mean is kept when E changes; experts are then permuted at
    random so that which expert is hot differs between layers.
    """
    load = np.asarray(like.load, dtype=np.float64)[_layer_map(like.num_layers, num_layers)]
    real_e = load.shape[1]
    curve = -np.sort(-load, axis=1) / np.maximum(load.mean(axis=1, keepdims=True), 1e-12)
    real_x = (np.arange(real_e) + 0.5) / real_e
    x = (np.arange(num_experts) + 0.5) / num_experts
    relative = np.stack([np.interp(x, real_x, row) for row in curve])         # [L, E]
    relative = np.maximum(relative, 1e-6)
    shares = relative / relative.sum(axis=1, keepdims=True)
    order = rng.permuted(np.tile(np.arange(num_experts), (num_layers, 1)), axis=1)
    return np.take_along_axis(shares, np.argsort(order, axis=1), axis=1)


def _check_shape(num_layers: int, num_experts: int, top_k: int, num_tokens: int,
                 seed: int) -> None:
    """Refuse a shape or seed that cannot be made, before allocating anything."""
    checks = [("--layers", "num_layers", num_layers, 1, MAX_LAYERS),
              ("--experts", "num_experts", num_experts, 1, MAX_EXPERTS),
              ("--topk", "top_k", top_k, 1, num_experts),
              ("--tokens", "num_tokens", num_tokens, 0, MAX_SYNTH_IDS),
              ("--seed", "seed", seed, 0, np.inf)]
    for flag, name, value, lowest, highest in checks:
        if int(value) != value or not lowest <= value <= highest:
            raise InputError(flag, name, f"an integer in [{lowest}, {highest}]", value)
    if num_tokens * num_layers * top_k > MAX_SYNTH_IDS:
        raise InputError("--tokens", "num_tokens", f"tokens x layers x k at most "
                         f"{MAX_SYNTH_IDS}", num_tokens * num_layers * top_k)


def _layer_map(real_layers: int, num_layers: int) -> np.ndarray:
    """``[num_layers]`` the real layer each synthetic layer copies (proportional spacing)."""
    if num_layers == 1:
        return np.zeros(1, dtype=np.int64)
    return np.rint(np.arange(num_layers) * (real_layers - 1) / (num_layers - 1)).astype(np.int64)


def _mapped_mi(like: Profile, num_layers: int) -> np.ndarray:
    """``[L-1]`` target MI (bits) per synthetic layer pair; zeros for a loads-only profile."""
    if like.transitions_top1 is None or num_layers == 1 or like.num_layers == 1:
        return np.zeros(max(num_layers - 1, 0))
    real = _corrected_mi(like.transitions_top1)
    return real[np.minimum(_layer_map(like.num_layers, num_layers)[:-1], len(real) - 1)]


def _corrected_mi(counts: np.ndarray) -> np.ndarray:
    """``[...]`` Miller-Madow corrected MI (bits, floored at 0) of ``[..., E, E]`` counts."""
    counts = np.asarray(counts, dtype=np.float64)
    cells = (counts > 0).sum(axis=(-2, -1))
    rows = (counts.sum(axis=-1) > 0).sum(axis=-1)
    cols = (counts.sum(axis=-2) > 0).sum(axis=-1)
    total = np.maximum(counts.sum(axis=(-2, -1)), 1)
    bias = (cells - rows - cols + 1) / (2 * total * np.log(2))
    return np.maximum(mutual_information(counts) - bias, 0.0)


def _draw(shares: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Experts drawn independently from ``shares [E]``; int64 array of ``shape``."""
    cdf = np.cumsum(shares)
    return np.minimum(_search(cdf, rng.random(shape) * cdf[-1]), len(shares) - 1)


def _search(cumulative: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``np.searchsorted(cumulative, keys)`` for keys in ``[0, cumulative[-1])``, faster.

    A guide table over ``GUIDE_BUCKETS`` equal buckets gives each key the first candidate
    index; the few keys whose bucket holds a boundary step forward (exact result).
    """
    shape, keys = keys.shape, keys.ravel()
    buckets = GUIDE_BUCKETS * len(cumulative)
    scale = buckets / cumulative[-1]
    guide = np.searchsorted(cumulative, np.arange(buckets) / scale)
    found = guide[np.minimum((keys * scale).astype(np.int64), buckets - 1)]
    last = len(cumulative) - 1
    pending = np.flatnonzero((cumulative[np.minimum(found, last)] < keys) & (found < last))
    while pending.size:
        found[pending] += 1
        behind = (cumulative[found[pending]] < keys[pending]) & (found[pending] < last)
        pending = pending[behind]
    return found.reshape(shape)


def _coupling(source: np.ndarray, target: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse joint distribution of ``source [E]`` and ``target [E]`` shares.

    The average of ``FANOUT`` monotone (north-west corner) couplings between randomly ordered
    experts: its marginals are exactly ``source`` and ``target``, and every expert gets a
    handful of successors. Returns ``(rows [n], cols [n], mass [n])`` sorted by row.
    """
    E = len(source)
    rows, cols, mass = [], [], []
    for _ in range(FANOUT):
        src_order, dst_order = rng.permutation(E), rng.permutation(E)
        src_cum = np.cumsum(source[src_order]) / source.sum()
        dst_cum = np.cumsum(target[dst_order]) / target.sum()
        cuts = np.union1d(src_cum, dst_cum)
        width = np.diff(cuts, prepend=0.0)
        keep = width > 0
        middle = (cuts - width / 2)[keep]
        rows.append(src_order[np.minimum(np.searchsorted(src_cum, middle), E - 1)])
        cols.append(dst_order[np.minimum(np.searchsorted(dst_cum, middle), E - 1)])
        mass.append(width[keep] / FANOUT)
    row, col, joint = np.concatenate(rows), np.concatenate(cols), np.concatenate(mass)
    order = np.argsort(row, kind="stable")
    return row[order], col[order], joint[order]


def _sampling_table(rows: np.ndarray, joint: np.ndarray, num_experts: int) -> np.ndarray:
    """``[n]`` cumulative conditional probabilities shifted by the row: row i in ``(i, i+1]``.

    ``searchsorted(table, i + u)`` with u uniform in [0, 1) then samples a successor of i.
    """
    row_total = np.bincount(rows, weights=joint, minlength=num_experts)
    cumulative = np.cumsum(joint / row_total[rows])
    starts = np.searchsorted(rows, np.arange(num_experts))
    before = np.concatenate([[0.0], cumulative])[starts]                        # [E]
    within = np.minimum(cumulative - before[rows], 1.0)
    last = np.r_[rows[1:] != rows[:-1], True]
    within[last] = 1.0
    return rows + within


def _follow(experts: np.ndarray, successors: np.ndarray, table: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """One successor for each of ``experts [n]`` sampled from the coupling's rows."""
    key = experts + rng.random(experts.shape)
    return successors[np.minimum(_search(table, key), len(successors) - 1)]


def _fit_alpha(source: np.ndarray, target: np.ndarray, rows: np.ndarray, cols: np.ndarray,
               joint: np.ndarray, target_mi: float) -> float:
    """The weight of the coupling in the channel whose MI equals ``target_mi`` (bisection).

    MI is convex in the channel and zero for the independent one, so it rises with alpha.
    """
    E = len(source)
    coupled = np.zeros((E, E))
    np.add.at(coupled, (rows, cols), joint)
    independent = np.outer(source, target) / (source.sum() * target.sum())

    def mi(alpha: float) -> float:
        return float(mutual_information(alpha * coupled + (1 - alpha) * independent))

    if target_mi <= 0:
        return 0.0
    if mi(1.0) <= target_mi:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if mi(middle) < target_mi else (low, middle)
    return (low + high) / 2


def _make_distinct(ids: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Redraw repeated experts in each row of ``ids [T, k]`` (slot 0 kept) until distinct.

    Only rows that repeat are revisited. Rows still repeating after ``REDRAW_ROUNDS`` get
    their slots 1..k-1 drawn without replacement (Gumbel top-k over the shares, excluding
    the primary).
    """
    ids = ids.astype(np.int64)
    k = ids.shape[1]
    rows = np.arange(len(ids))
    for _ in range(REDRAW_ROUNDS):
        repeated = _repeated_slots(ids[rows])
        rows = rows[repeated.any(axis=1)]
        if rows.size == 0:
            return ids
        repeated = repeated[repeated.any(axis=1)]
        block = ids[rows]
        block[repeated] = _draw(shares, (int(repeated.sum()),), rng)
        ids[rows] = block
    rows = rows[_repeated_slots(ids[rows]).any(axis=1)]
    if rows.size:
        scores = np.log(np.maximum(shares, 1e-300)) - np.log(-np.log(
            rng.random((rows.size, len(shares)))))
        scores[np.arange(rows.size), ids[rows, 0]] = -np.inf
        ids[rows, 1:] = np.argsort(-scores, axis=1)[:, : k - 1]
    return ids


def _repeated_slots(ids: np.ndarray) -> np.ndarray:
    """``[T, k]`` bool: slot j repeats an expert of an earlier slot of the same row."""
    repeated = np.zeros(ids.shape, dtype=bool)
    for slot in range(1, ids.shape[1]):
        repeated[:, slot] = (ids[:, :slot] == ids[:, slot : slot + 1]).any(axis=1)
    return repeated
