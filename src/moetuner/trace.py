"""Routing traces: which experts the router picked for every token in every MoE layer.

The canonical trace is an ``.npz`` holding

- ``topk_ids``     int   ``[tokens, moe_layers, k]``: expert ids (``load_trace`` sorts each
  token's columns by weight, highest first, when weights exist);
- ``topk_weights`` float ``[tokens, moe_layers, k]`` (optional): router probabilities;
- ``seq_lens``     int   ``[sequences]`` (optional): tokens are stored sequence after sequence;
- any ``seq_*`` array ``[sequences]`` (optional): per-sequence labels (``seq_dataset``,
  ``seq_repetition``...), used to select the part of a workload to profile or evaluate on;
- ``num_experts``  int scalar (optional): otherwise the largest id + 1.

This is the layout of ``shared/traces/gpt-oss-20b/decode.npz``.

Top-k order: engines record ``topk_ids`` as the top-k kernel returns them, which need not be
by score (DeepSeek's gates call ``topk(..., sorted=False)``). A trace with weights is
*ordered* (column 0 is the primary expert once sorted by weight); one without is a set of
experts per token (``Trace.ordered`` is False), and order-dependent rules must not read
column 0 as primary (``moetuner.steps.combine_gpu``).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from moetuner.errors import InputError
from moetuner.io import MAX_EXPERTS, MAX_LAYERS, as_int, npz_array, open_npz, write_npz


@dataclass(frozen=True)
class Trace:
    """A routing trace held in memory.

    Attributes:
        topk_ids: int ``[tokens, layers, k]`` expert ids per token and MoE layer (primary
            first when ``ordered``).
        num_experts: experts per layer (E); every id is in ``[0, E)``.
        topk_weights: float ``[tokens, layers, k]`` router probabilities, or None.
        seq_lens: int ``[sequences]`` tokens per sequence (summing to ``tokens``), or None.
        seq_labels: name -> ``[sequences]`` array of per-sequence labels (str, bool, int).
        source: where the trace came from (a path), for provenance.
        selection: a readable description of the sequence selection applied.
    """

    topk_ids: np.ndarray
    num_experts: int
    topk_weights: np.ndarray | None = None
    seq_lens: np.ndarray | None = None
    seq_labels: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "<memory>"
    selection: str = "all"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    @property
    def ordered(self) -> bool:
        """Whether column 0 of ``topk_ids`` is each token's primary expert: there are weights
        (readers sort the columns by them) or k = 1. Without, a token's experts are a set."""
        return self.topk_weights is not None or self.top_k == 1

    @property
    def num_sequences(self) -> int | None:
        return None if self.seq_lens is None else int(self.seq_lens.shape[0])

    def chunks(self, chunk_tokens: int) -> Iterator[np.ndarray]:
        """Yield ``topk_ids`` in consecutive ``[<=chunk_tokens, layers, k]`` slices (views)."""
        for start in range(0, self.num_tokens, chunk_tokens):
            yield self.topk_ids[start : start + chunk_tokens]

    def take_sequences(self, keep: np.ndarray, description: str) -> Trace:
        """The trace restricted to the sequences where the bool ``keep [sequences]`` holds."""
        if self.seq_lens is None:
            raise InputError(self.source, "seq_lens", "per-sequence lengths to select sequences")
        keep = np.asarray(keep, dtype=bool)
        token_mask = np.repeat(keep, self.seq_lens)
        selection = description if self.selection == "all" else f"{self.selection}; {description}"
        return replace(
            self,
            topk_ids=self.topk_ids[token_mask],
            topk_weights=None if self.topk_weights is None else self.topk_weights[token_mask],
            seq_lens=self.seq_lens[keep],
            seq_labels={name: labels[keep] for name, labels in self.seq_labels.items()},
            selection=selection,
        )

    def select(self, selectors: Sequence[str] = (), drop: Sequence[str] = ()) -> Trace:
        """Apply ``NAME=PATTERN`` selectors (shell globs, ``|`` for alternatives) and drop flags.

        ``select(["seq_dataset=mmlu*"], drop=["seq_repetition"])`` keeps MMLU sequences that
        did not fall into a repetition loop. Several selectors must all match.
        """
        if not selectors and not drop:
            return self
        keep, description = select_sequences(self.seq_labels, selectors, drop, self.source)
        return self.take_sequences(keep, description)

    def split(self, fraction: float = 0.5) -> tuple[Trace, Trace]:
        """Split into a first and a second part at a sequence boundary (token boundary if none).

        The first part holds about ``fraction`` of the tokens; used to profile on one half
        of a workload and evaluate on the other.
        """
        if self.seq_lens is None:
            cut = int(round(self.num_tokens * fraction))
            return self.slice_tokens(0, cut), self.slice_tokens(cut, self.num_tokens)
        n_first = first_sequences(self.seq_lens, fraction)
        keep = np.arange(len(self.seq_lens)) < n_first
        return (self.take_sequences(keep, f"sequences [0, {n_first})"),
                self.take_sequences(~keep, f"sequences [{n_first}, end)"))

    def slice_tokens(self, start: int, stop: int) -> Trace:
        """Return tokens ``[start, stop)`` of a trace without sequence structure."""
        if self.seq_lens is not None:
            raise InputError(self.source, "seq_lens", "no sequences when slicing by token")
        return replace(
            self,
            topk_ids=self.topk_ids[start:stop],
            topk_weights=None if self.topk_weights is None else self.topk_weights[start:stop],
            selection=f"{self.selection}; tokens [{start}, {stop})",
        )

    def labels(self, name: str) -> np.ndarray:
        """``[sequences]`` the per-sequence label array ``name``; an InputError naming the
        labels present otherwise."""
        return _label(self.seq_labels, name, self.source)

    def save(self, path: str | os.PathLike) -> None:
        """Write the trace as a canonical ``.npz`` (atomically)."""
        arrays: dict[str, np.ndarray] = {
            "topk_ids": self.topk_ids,
            "num_experts": np.asarray(self.num_experts, dtype=np.int64),
        }
        if self.topk_weights is not None:
            arrays["topk_weights"] = self.topk_weights
        if self.seq_lens is not None:
            arrays["seq_lens"] = self.seq_lens
        arrays.update(self.seq_labels)
        write_npz(path, **arrays)


def _label(seq_labels: dict[str, np.ndarray], name: str, source: str) -> np.ndarray:
    if name not in seq_labels:
        known = ", ".join(sorted(seq_labels)) or "none"
        raise InputError(source, name, f"a per-sequence label array (present: {known})")
    return seq_labels[name]


def select_sequences(
    seq_labels: dict[str, np.ndarray],
    selectors: Sequence[str],
    drop: Sequence[str],
    source: str,
) -> tuple[np.ndarray, str]:
    """The sequences ``Trace.select`` keeps, from the label arrays alone.

    Args:
        seq_labels: name -> ``[sequences]`` label array.
        selectors: ``NAME=PATTERN`` selectors, all of which must match.
        drop: names of bool ``[sequences]`` flags whose sequences are removed.
        source: the file, for error messages.

    Returns:
        bool ``[sequences]`` keep mask and the readable description of the selection. A
        streaming reader selects with it before reading any token.
    """
    descriptions = list(selectors) + [f"drop {name}" for name in drop]
    keep = None
    for selector in selectors:
        name, sep, pattern = selector.partition("=")
        if not sep:
            raise InputError(source, "--select", "NAME=PATTERN", repr(selector))
        labels = _label(seq_labels, name, source)
        patterns = pattern.split("|")
        match = np.array(
            [any(fnmatch.fnmatchcase(str(v), p) for p in patterns) for v in labels.tolist()],
            dtype=bool,
        )
        keep = match if keep is None else keep & match
    for name in drop:
        labels = _label(seq_labels, name, source)
        if labels.dtype != bool:
            raise InputError(source, name, "a bool [sequences] flag to --drop", labels.dtype)
        keep = ~labels if keep is None else keep & ~labels
    return keep, "; ".join(descriptions)


def first_sequences(seq_lens: np.ndarray, fraction: float) -> int:
    """How many leading sequences hold about ``fraction`` of the tokens (``Trace.split``):
    at least one, and one fewer than all when there are several."""
    ends = np.cumsum(seq_lens)
    n_first = int(np.searchsorted(ends, int(ends[-1]) * fraction)) + 1 if len(ends) else 1
    return min(max(n_first, 1), len(seq_lens) - 1) if len(seq_lens) > 1 else 1


def _validate(trace: Trace) -> None:
    src, ids = trace.source, trace.topk_ids
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(src, "topk_ids", "an integer array [tokens, layers, k]",
                         f"{ids.dtype} {list(ids.shape)}")
    tokens, layers, k = ids.shape
    if layers < 1 or k < 1:
        raise InputError(src, "topk_ids", "at least one layer and k >= 1", list(ids.shape))
    # Bounded before anything is sized by E or L (a profile allocates [L, E, E]).
    if not 1 <= trace.num_experts <= MAX_EXPERTS:
        raise InputError(src, "num_experts", f"an expert count in [1, {MAX_EXPERTS}] (ids "
                         "below it)", trace.num_experts)
    if layers > MAX_LAYERS:
        raise InputError(src, "topk_ids", f"at most {MAX_LAYERS} MoE layers", layers)
    if tokens:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= trace.num_experts:
            raise InputError(src, "topk_ids", f"expert ids in [0, {trace.num_experts})",
                             f"ids in [{lo}, {hi}]")
        if k > 1:
            ordered = np.sort(ids, axis=2)
            repeats = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)
            if repeats.any():
                token, layer = np.argwhere(repeats)[0]
                raise InputError(src, "topk_ids", "k distinct experts per token and layer",
                                 f"a repeated expert at token {token}, layer {layer}")
    if trace.num_experts < k:
        raise InputError(src, "num_experts", f"at least k = {k}", trace.num_experts)
    if trace.topk_weights is not None:
        w = trace.topk_weights
        check_weights_header(src, ids.shape, w.shape, w.dtype)
        if not np.isfinite(w).all():
            raise InputError(src, "topk_weights", "finite router probabilities", "NaN or inf")
    validate_sequences(src, tokens, trace.seq_lens, trace.seq_labels)


def validate_sequences(source: str, tokens: int, seq_lens: np.ndarray | None,
                       seq_labels: dict[str, np.ndarray]) -> None:
    """Check ``seq_lens [sequences]`` and the ``[sequences]`` label arrays of a ``tokens``-token
    trace (a streaming reader checks them before reading any token)."""
    if seq_lens is not None:
        if seq_lens.ndim != 1 or not np.issubdtype(seq_lens.dtype, np.integer) \
                or (seq_lens < 0).any():
            raise InputError(source, "seq_lens", "non-negative integers [sequences]",
                             f"{seq_lens.dtype} {list(seq_lens.shape)}")
        if int(seq_lens.sum()) != tokens:
            raise InputError(source, "seq_lens", f"lengths summing to the {tokens} tokens",
                             int(seq_lens.sum()))
        for name, labels in seq_labels.items():
            if labels.shape != seq_lens.shape:
                raise InputError(source, name, f"one label per sequence [{seq_lens.shape[0]}]",
                                 list(labels.shape))
    elif seq_labels:
        raise InputError(source, "seq_lens",
                         "sequence lengths, since per-sequence labels are given")


def largest_id(ids: np.ndarray) -> int:
    """The largest id of an integer array (0 when empty or not integer: validation then
    says what is wrong)."""
    if not ids.size or not np.issubdtype(ids.dtype, np.integer):
        return 0
    return int(ids.max())


def read_npz_sequences(data: np.lib.npyio.NpzFile, path: str | os.PathLike
                       ) -> tuple[np.ndarray | None, dict[str, np.ndarray], int | None]:
    """The per-sequence fields of an open canonical trace ``.npz``: ``seq_lens [sequences]``
    (or None), the ``seq_*`` label arrays, and the stored ``num_experts`` (or None)."""
    seq_lens = npz_array(data, "seq_lens", path) if "seq_lens" in data.files else None
    labels = {name: npz_array(data, name, path) for name in data.files
              if name.startswith("seq_") and name != "seq_lens"}
    stored_e = (as_int(npz_array(data, "num_experts", path), path, "num_experts", 1,
                       MAX_EXPERTS) if "num_experts" in data.files else None)
    return seq_lens, labels, stored_e


def load_trace(
    path: str | os.PathLike,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    num_experts: int | None = None,
) -> Trace:
    """Read a canonical trace ``.npz`` and apply a sequence selection.

    Args:
        path: the ``.npz`` file.
        select: ``NAME=PATTERN`` selectors on ``seq_*`` label arrays (see ``Trace.select``).
        drop: names of bool ``seq_*`` arrays whose flagged sequences are removed.
        num_experts: E when the file does not say; default: the file's ``num_experts`` or the
            largest id + 1.
    """
    path = Path(path)
    with open_npz(path, "a numpy .npz trace") as data:
        if "topk_ids" not in data.files:
            raise InputError(path, "topk_ids", "an array [tokens, layers, k] in the .npz")
        ids = npz_array(data, "topk_ids", path)
        weights = npz_array(data, "topk_weights", path) if "topk_weights" in data.files else None
        seq_lens, labels, stored_e = read_npz_sequences(data, path)
    if num_experts is None:
        num_experts = stored_e if stored_e is not None else largest_id(ids) + 1
    if (weights is not None and weights.shape == ids.shape
            and np.issubdtype(weights.dtype, np.number)):  # Trace() names anything else
        ids, weights = sort_by_weight(ids, weights)
    trace = Trace(topk_ids=ids, num_experts=num_experts, topk_weights=weights,
                  seq_lens=seq_lens, seq_labels=labels, source=str(path))
    return trace.select(select, drop)


def check_weights_header(source: str | os.PathLike, ids_shape: tuple[int, ...],
                         shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse ``topk_weights`` whose shape differs from ``topk_ids``' or that are not numbers
    (strings, bools); headers only, so a streamed trace is checked before any row is read."""
    if tuple(shape) != tuple(ids_shape) or not np.issubdtype(dtype, np.number):
        raise InputError(source, "topk_weights", f"numbers in the shape of topk_ids "
                         f"{list(ids_shape)}", f"{dtype} {list(shape)}")


def sort_by_weight(topk_ids: np.ndarray, topk_weights: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Each token's columns in descending weight order (ties keep their order).

    Args:
        topk_ids, topk_weights: ``[tokens, layers, k]``.

    Returns:
        Both arrays, columns permuted alike (the inputs themselves when already sorted).
    """
    if topk_ids.shape[-1] < 2 or (np.diff(topk_weights, axis=-1) <= 0).all():
        return topk_ids, topk_weights
    order = np.argsort(-topk_weights, axis=-1, kind="stable")
    return (np.take_along_axis(topk_ids, order, axis=-1),
            np.take_along_axis(topk_weights, order, axis=-1))
