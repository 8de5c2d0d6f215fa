"""Streaming profiles of trace files too large for memory, and the sum of shard profiles.

A canonical ``.npz`` trace (``topk_ids [tokens, layers, k]``), an ExFlow ``.npy``
(``[tokens, layers]``) or vLLM requests (a directory of ``.npy`` or one ``.npz``) are read a
chunk of rows at a time: the small per-sequence arrays (``seq_lens``, ``seq_*`` labels, or
the requests' lengths from their headers) are read first, the selection is decided from
them, then the ids stream past the counter. Memory holds one chunk of ids and the count
arrays, whatever the file's length. The result equals ``profile_trace`` of the whole file
read into memory, stability figures included.
"""

from __future__ import annotations

import itertools
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from moetuner.errors import InputError
from moetuner.io import load_npy, open_npz
from moetuner.profile import (
    _COUNT_FIELDS,
    Profile,
    RoutingCounter,
    check_count_size,
    chunk_tokens_for,
    half_cut,
    native_ids,
)
from moetuner.trace import (
    Trace,
    check_weights_header,
    read_npz_sequences,
    select_sequences,
    sort_by_weight,
    validate_sequences,
)

# read_rows(n): the next n rows of the id array, ``[n, layers, k]``.
RowReader = Callable[[int], np.ndarray]


def _npy_member_header(archive: zipfile.ZipFile, member: str
                       ) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an ``.npy`` inside a zip, reading no data."""
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        return np.lib.format.read_array_header_2_0(handle)


def npz_ids_shape(path: Path) -> tuple[int, ...] | None:
    """Shape of ``topk_ids`` in a canonical ``.npz`` trace, or None when ``path`` is not one."""
    if path.suffix != ".npz" or not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            if "topk_ids.npy" not in archive.namelist():
                return None
            return _npy_member_header(archive, "topk_ids.npy")[0]
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def _npz_rows(path: Path, shape: tuple[int, ...], dtype: np.dtype, name: str = "topk_ids"
              ) -> tuple[RowReader, Callable]:
    """A sequential row reader over the array ``name`` in the zip, and the function closing
    it."""
    archive = zipfile.ZipFile(path)
    handle = archive.open(f"{name}.npy")
    version = np.lib.format.read_magic(handle)
    (np.lib.format.read_array_header_1_0 if version == (1, 0)
     else np.lib.format.read_array_header_2_0)(handle)
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize

    def read_rows(n: int) -> np.ndarray:
        try:
            data = handle.read(n * row_bytes)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise InputError(path, name, "a readable array", exc) from None
        if len(data) != n * row_bytes:
            raise InputError(path, name, f"{shape[0]} rows", "a truncated array")
        return np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])

    def close() -> None:
        handle.close()
        archive.close()

    return read_rows, close


def _weight_sorted_rows(path: Path, read_ids: RowReader, read_weights: RowReader) -> RowReader:
    """Rows of ``topk_ids`` with each token's columns sorted by its ``topk_weights`` (highest
    first), as ``load_trace`` sorts a whole trace, so that streamed and in-memory profiles
    agree on each token's primary expert."""

    def read_rows(n: int) -> np.ndarray:
        ids, weights = read_ids(n), read_weights(n)
        if not np.isfinite(weights).all():
            raise InputError(path, "topk_weights", "finite router probabilities", "NaN or inf")
        return sort_by_weight(ids, weights)[0]

    return read_rows


def stream_canonical_profile(
    path: Path,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    chunk_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Profile:
    """Profile a canonical ``.npz`` trace chunk by chunk (``load_trace`` + ``profile_trace``
    without holding the trace). ``progress`` receives the tokens read (before selection)."""
    with open_npz(path, "a numpy .npz trace") as data:
        if "topk_ids" not in data.files:
            raise InputError(path, "topk_ids", "an array [tokens, layers, k] in the .npz")
        shape, fortran, dtype = _npy_member_header(data.zip, "topk_ids.npy")
        weights = (_npy_member_header(data.zip, "topk_weights.npy")
                   if "topk_weights" in data.files else None)
        seq_lens, labels, stored_e = read_npz_sequences(data, path)
    if len(shape) != 3 or not np.issubdtype(dtype, np.integer) or fortran:
        raise InputError(path, "topk_ids", "an integer C-order array [tokens, layers, k]",
                         f"{dtype} {list(shape)}")
    read_rows, close = _npz_rows(path, shape, dtype)
    closers = [close]
    if weights is not None:
        check_weights_header(path, shape, weights[0], weights[2])
        if weights[1]:
            raise InputError(path, "topk_weights", "a C-order array", "Fortran order")
        read_weights, close_weights = _npz_rows(path, shape, weights[2], "topk_weights")
        closers.append(close_weights)
        read_rows = _weight_sorted_rows(path, read_rows, read_weights)
    try:
        return _profile_rows(read_rows, shape, seq_lens, labels, stored_e, select, drop,
                             str(path), chunk_tokens, progress)
    finally:
        for close in closers:
            close()


def stream_exflow_profile(
    path: Path,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    chunk_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Profile:
    """Profile an ExFlow ``[tokens, layers]`` top-1 ``.npy`` chunk by chunk (memory-mapped)."""
    ids = np.load(path, mmap_mode="r", allow_pickle=False)
    offset = 0

    def read_rows(n: int) -> np.ndarray:
        nonlocal offset
        rows = np.asarray(ids[offset:offset + n])[:, :, None]
        offset += n
        return rows

    return _profile_rows(read_rows, (*ids.shape, 1), None, {}, None, select, drop, str(path),
                         chunk_tokens, progress)


def vllm_requests(path: Path) -> tuple[list[str], list[tuple[int, ...]], list[np.dtype],
                                       Callable[[int], np.ndarray], Callable[[], None]]:
    """The requests of a vLLM directory of ``.npy`` or ``.npz``, from their headers: names,
    shapes and dtypes, a function reading request i, and one closing the file."""
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        headers = [load_npy(f, "a numpy .npy array (vLLM routed_experts)", header_only=True)
                   for f in files]

        def request(index: int) -> np.ndarray:
            return np.load(files[index], allow_pickle=False)

        return ([f.stem for f in files], [h.shape for h in headers],
                [h.dtype for h in headers], request, lambda: None)
    archive = zipfile.ZipFile(path)
    names = [member.removesuffix(".npy") for member in archive.namelist()]
    headers = [_npy_member_header(archive, f"{name}.npy") for name in names]

    def read_member(index: int) -> np.ndarray:
        with archive.open(f"{names[index]}.npy") as handle:
            return np.lib.format.read_array(handle, allow_pickle=False)

    return (names, [h[0] for h in headers], [h[2] for h in headers], read_member,
            archive.close)


def stream_vllm_profile(
    path: Path,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    chunk_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Profile:
    """Profile vLLM ``routed_experts [seq_len, layers, topk]`` requests (a directory of
    ``.npy`` or one ``.npz``) a chunk of requests at a time, as ``read_trace`` +
    ``profile_trace`` would (one sequence per request, label ``seq_request``)."""
    names, shapes, dtypes, request, close = vllm_requests(path)
    try:
        return _profile_requests(path, names, shapes, dtypes, request, select, drop,
                                 chunk_tokens, progress)
    finally:
        close()


def _profile_requests(
    path: Path,
    names: list[str],
    shapes: list[tuple[int, ...]],
    dtypes: list[np.dtype],
    request: Callable[[int], np.ndarray],
    select: Sequence[str],
    drop: Sequence[str],
    chunk_tokens: int | None,
    progress: Callable[[int], None] | None,
) -> Profile:
    """Check the requests' headers as ``readers`` checks the arrays, then count them in
    order through ``_profile_rows`` (E = the largest id + 1, as ``read_trace`` infers it)."""
    if not names:
        raise InputError(path, "routed_experts", "at least one request")
    for name, shape, dtype in zip(names, shapes, dtypes, strict=True):
        if len(shape) != 3 or not np.issubdtype(dtype, np.integer):
            raise InputError(path, f"routed_experts[{name}]",
                             "an integer array [seq_len, layers, topk]", f"{dtype} {list(shape)}")
        if shape[1:] != shapes[0][1:]:
            raise InputError(path, f"routed_experts[{name}]",
                             f"[seq_len, {shapes[0][1]}, {shapes[0][2]}] as the first request",
                             list(shape))
    seq_lens = np.array([shape[0] for shape in shapes], dtype=np.int64)
    ends = np.cumsum(seq_lens)
    next_request = 0

    def read_rows(n: int) -> np.ndarray:  # n rows = the next whole requests
        nonlocal next_request
        done = int(ends[next_request - 1]) if next_request else 0
        stop = int(np.searchsorted(ends, done + n, side="right"))
        rows = [request(index) for index in range(next_request, stop)]
        next_request = stop
        # empty requests may already be read with the one before them
        return np.concatenate(rows) if rows else np.zeros((0, *shapes[0][1:]), np.int64)

    return _profile_rows(read_rows, (int(seq_lens.sum()), *shapes[0][1:]), seq_lens,
                         {"seq_request": np.array(names)}, None, select, drop, str(path),
                         chunk_tokens, progress)


def _profile_rows(
    read_rows: RowReader,
    shape: tuple[int, ...],
    seq_lens: np.ndarray | None,
    labels: dict[str, np.ndarray],
    num_experts: int | None,
    select: Sequence[str],
    drop: Sequence[str],
    source: str,
    chunk_tokens: int | None,
    progress: Callable[[int], None] | None,
) -> Profile:
    """Count ``shape = (tokens, layers, k)`` rows read in order, keeping the selected sequences.

    Chunks hold whole sequences (a sequence longer than a chunk is read alone), so the
    sequence selection applies to each chunk as a token mask; the cut between the two halves
    that give the stability figures is the one ``Trace.split`` makes on the selected trace.
    """
    tokens, layers, k = shape
    validate_sequences(source, tokens, seq_lens, labels)
    if layers < 1 or k < 1:
        raise InputError(source, "topk_ids", "at least one layer and k >= 1", list(shape))
    chunk = chunk_tokens or chunk_tokens_for(layers, num_experts or 1, k)
    if select or drop:
        keep, selection = select_sequences(labels, select, drop, source)
    else:
        keep, selection = None, "all"
    if seq_lens is None:  # no sequences to keep whole: fixed-size token chunks
        units = np.full(-(-tokens // chunk), chunk, np.int64)
        if len(units):
            units[-1] = tokens - chunk * (len(units) - 1)
        kept_lens = None
    else:
        units = seq_lens.astype(np.int64)
        kept_lens = units if keep is None else units[keep]
    kept_tokens = tokens if kept_lens is None else int(kept_lens.sum())
    check_count_size(layers, num_experts or 1, source)
    from moetuner.kernels import ids_valid  # numba: imported when first counting

    counter = RoutingCounter(layers, num_experts or 1, k, cut=half_cut(kept_tokens, kept_lens))
    ends = np.cumsum(units)
    first_unit, done = 0, 0
    while first_unit < len(units):
        stop_unit = max(first_unit + 1, int(np.searchsorted(ends, done + chunk, side="right")))
        rows = read_rows(int(ends[stop_unit - 1]) - done)
        if num_experts is None and rows.size:  # E = largest id + 1, as load_trace infers it
            check_count_size(layers, int(rows.max()) + 1, source)
            counter.grow(int(rows.max()) + 1)
        rows = native_ids(rows)
        if not ids_valid(rows, counter.E):
            Trace(topk_ids=rows, num_experts=counter.E, source=source)  # raises, saying why
        if keep is not None:
            rows = rows[np.repeat(keep[first_unit:stop_unit], units[first_unit:stop_unit])]
        counter.add(rows)
        if progress is not None:
            progress(int(ends[stop_unit - 1]) - done)
        done, first_unit = int(ends[stop_unit - 1]), stop_unit
    provenance = [{"source": source, "selection": selection, "tokens": kept_tokens}]
    return counter.profile(provenance, source)


def sum_profiles(profiles: Iterable[Profile]) -> Profile:
    """The reduce of shard profiling: counts add (over the largest E), provenance concatenates;
    one profile is returned as it is (its stability figures kept).

    Adds in place into one set of count arrays as the profiles come, so a generator of shard
    profiles holds the sum and one shard's profile at a time, whatever the shard count.
    """
    profiles = iter(profiles)
    first = next(profiles, None)
    if first is None:
        raise InputError("<shards>", "shards", "at least one trace or profile")
    second = next(profiles, None)
    if second is None:
        return first
    layers, top_k, first_source = first.num_layers, first.top_k, first.source
    counts = {name: None if getattr(first, name) is None else getattr(first, name).copy()
              for name in _COUNT_FIELDS}
    provenance, tokens, sources = list(first.provenance), first.tokens, [first.source]
    step_loads = None if first.step_loads is None else [first.step_loads]
    rest = itertools.chain([second], profiles)
    del first, second  # only the running sum is held while the next shards are profiled
    for profile in rest:
        if profile.num_layers != layers or profile.top_k != top_k:
            raise InputError(profile.source, "load",
                             f"{layers} layers and k = {top_k} to add to {first_source}",
                             f"{profile.num_layers} layers, k = {profile.top_k}")
        experts = max(counts["load"].shape[1], profile.num_experts)
        for name in _COUNT_FIELDS:
            if counts[name] is None or getattr(profile, name) is None:
                counts[name] = None
                continue
            added = getattr(profile, name)
            grown = _pad(counts[name], experts)
            if not np.can_cast(added.dtype, grown.dtype):  # float loads into int counts
                grown = grown.astype(np.result_type(grown, added))
            grown[(slice(None),) + (slice(0, profile.num_experts),) * (added.ndim - 1)] += added
            counts[name] = grown
        step_loads = (None if step_loads is None or profile.step_loads is None
                      else [*step_loads, profile.step_loads])
        provenance += profile.provenance
        tokens += profile.tokens
        sources.append(profile.source)
        del profile  # not held while the next shard is profiled
    experts = counts["load"].shape[1]
    if step_loads is not None:  # each shard's steps, widened to the largest E
        step_loads = np.concatenate([np.pad(part, ((0, 0), (0, 0),
                                                   (0, experts - part.shape[2])))
                                     for part in step_loads])
    return Profile(**counts, top_k=top_k, tokens=tokens, provenance=provenance,
                   source=" + ".join(sources), step_loads=step_loads)


def _pad(counts: np.ndarray, num_experts: int) -> np.ndarray:
    """``counts [L, E]`` or ``[L, E, E]`` with zero rows/columns up to ``num_experts``."""
    extra = num_experts - counts.shape[1]
    return counts if extra <= 0 else np.pad(counts, [(0, 0)] + [(0, extra)] *
                                            (counts.ndim - 1))
