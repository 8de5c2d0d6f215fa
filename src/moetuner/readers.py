"""Readers for what serving engines and other tools record (registered in ``inputs.py``).

Traces (per-token routing):

- SGLang expert distribution recorder, ``per_token`` mode (``.pt``, a ``torch.save``d dict):
  ``records`` (one per forward pass), each with ``topk_ids_of_layer`` int ``[num_layers,
  num_tokens, topk]`` in *physical* ids, mapped to logical experts with
  ``last_physical_to_logical_map`` int ``[num_layers, P]``. Layers whose ids are all negative
  (dense layers, never routed) are dropped; each record becomes one sequence.
- vLLM ``routed_experts`` int ``[seq_len, layers, topk]`` per request: a directory of
  ``.npy`` files, one ``.npz`` (one array per request), or a JSONL file with one request per
  line (``routed_experts`` at the top level or in its first ``outputs`` / ``choices``
  entry). Each request is one sequence (label ``seq_request``).
- ExFlow: an integer ``.npy`` ``[tokens, layers]`` of top-1 experts.

Profiles (loads only):

- SGLang recorder, ``stat`` mode (``.pt``): ``logical_count`` ``[buffer_steps,
  num_hidden_layers, E]`` non-negative integer counts, summed over steps into ``load`` and
  kept per step (``Profile.step_loads``, steps without tokens dropped); all-zero layers
  (dense ones) are dropped. The dump does not say k, so the profile counts k = 1 (tokens =
  load per layer).
- Plain loads ``[L, E]``: a ``.json`` list of lists, a ``.csv`` (one row per layer), or a
  floating ``.npy`` (an integer ``.npy`` is read as an ExFlow trace unless its name says
  ``load``).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moetuner.errors import InputError
from moetuner.io import failure_reason, int_array, load_npy, npz_names, parse_json, read_npz
from moetuner.profile import Profile
from moetuner.trace import Trace, largest_id

TORCH_HINT = "torch to read .pt dumps (pip install 'moetuner[torch]')"


# ---------------------------------------------------------------- SGLang recorder dumps


@functools.lru_cache(maxsize=2)
def _load_pt(path: str, mtime_ns: int) -> object:
    try:
        import torch
    except ImportError:
        raise InputError(path, "file", TORCH_HINT) from None
    try:
        with warnings.catch_warnings():  # e.g. on a foreign pickle: the error says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or foreign file
        raise InputError(path, "file", "a torch.save'd SGLang recorder dump",
                         failure_reason(exc)) from None


def load_pt(path: Path) -> dict:
    """The dict inside an SGLang recorder dump (cached: matching and reading share it)."""
    data = _load_pt(str(path), path.stat().st_mtime_ns)
    if not isinstance(data, dict):
        raise InputError(path, "file", "a dict (SGLang recorder dump)", type(data).__name__)
    return data


def is_sglang_per_token(path: Path) -> bool:
    return path.suffix == ".pt" and path.is_file() and "logical_count" not in load_pt(path)


def is_sglang_stat(path: Path) -> bool:
    return path.suffix == ".pt" and path.is_file() and "logical_count" in load_pt(path)


def _numpy(value: object) -> object:
    """A torch tensor as a numpy array; anything else as it is."""
    try:
        return value.numpy() if hasattr(value, "numpy") else value
    except Exception:  # not a tensor after all, or one numpy cannot hold
        return value


def read_sglang_per_token(path: Path, select: Sequence[str] = (), drop: Sequence[str] = ()
                          ) -> Trace:
    """A trace from a ``per_token`` recorder dump (physical ids mapped back to logical)."""
    data = load_pt(path)
    if "records" not in data:
        raise InputError(path, "records", "a per_token dump (records) or a stat dump "
                         "(logical_count)", sorted(data))
    if "last_physical_to_logical_map" not in data:
        raise InputError(path, "last_physical_to_logical_map",
                         "the physical-to-logical map [layers, P] that the physical ids in "
                         "records refer to")
    phys_map = int_array(_numpy(data["last_physical_to_logical_map"]), path,
                         "last_physical_to_logical_map", 2, "[layers, P]")
    if phys_map.shape[1] == 0:
        raise InputError(path, "last_physical_to_logical_map", "at least one physical slot",
                         list(phys_map.shape))
    records = data["records"]
    if not isinstance(records, list) or not records:
        raise InputError(path, "records", "a non-empty list of forward-pass records")
    ids = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "topk_ids_of_layer" not in record:
            raise InputError(path, f"records[{index}]", "a dict with topk_ids_of_layer")
        ids.append(int_array(_numpy(record["topk_ids_of_layer"]), path,
                             f"records[{index}].topk_ids_of_layer", 3, "[layers, tokens, topk]"))
    shapes = {(a.shape[0], a.shape[2]) for a in ids}
    if len(shapes) != 1 or ids[0].shape[0] != phys_map.shape[0]:
        raise InputError(path, "records[*].topk_ids_of_layer",
                         f"[{phys_map.shape[0]} layers (as the map), tokens, one topk]",
                         sorted(shapes))
    physical = np.concatenate(ids, axis=1)                         # [layers, tokens, k]
    routed = (physical >= 0).any(axis=(1, 2)) if physical.shape[1] else np.ones(
        physical.shape[0], bool)
    if not routed.any():
        raise InputError(path, "records[*].topk_ids_of_layer",
                         "at least one routed layer (ids >= 0)", "all ids negative")
    physical = physical[routed]
    if (physical < 0).any() or (physical.size and physical.max() >= phys_map.shape[1]):
        raise InputError(path, "records[*].topk_ids_of_layer",
                         f"physical ids in [0, {phys_map.shape[1]}) in routed layers",
                         f"[{physical.min()}, {physical.max()}]")
    layer_map = phys_map[routed]                                   # [L, P]
    logical = np.take_along_axis(layer_map, physical.reshape(len(layer_map), -1), axis=1)
    topk_ids = logical.reshape(physical.shape).transpose(1, 0, 2)  # [tokens, L, k]
    trace = Trace(topk_ids=np.ascontiguousarray(topk_ids), num_experts=int(phys_map.max()) + 1,
                  seq_lens=np.array([a.shape[1] for a in ids], dtype=np.int64),
                  source=str(path))
    return trace.select(select, drop)


def read_sglang_stat(path: Path) -> Profile:
    """A loads-only profile from a ``stat`` recorder dump, its steps kept (``step_loads``:
    dense layers and steps without tokens dropped)."""
    data = load_pt(path)
    try:
        count = np.asarray(_numpy(data["logical_count"]))
    except (ValueError, TypeError, RecursionError, OverflowError):
        count = np.asarray(None)
    expected = "non-negative integer counts [buffer_steps, num_hidden_layers, E]"
    if count.ndim != 3 or not _is_real(count):
        raise InputError(path, "logical_count", expected, f"{count.dtype} {list(count.shape)}")
    if count.size and not (np.isfinite(count).all() and count.min() >= 0
                           and (count == np.round(count)).all()):
        raise InputError(path, "logical_count", expected,
                         f"minimum {count.min()}, {count.dtype}")
    count = count.astype(np.int64)
    profile, routed = _routed_layers(count.sum(axis=0), path)
    steps = count[:, routed]
    return dataclasses.replace(profile, step_loads=steps[steps.sum(axis=(1, 2)) > 0])


def _routed_layers(load: np.ndarray, path: Path) -> tuple[Profile, np.ndarray]:
    """A loads-only profile of the layers of ``load [num_hidden_layers, E]`` that routed
    tokens (dense layers, all zero, dropped), and bool ``[num_hidden_layers]`` which those
    are."""
    if (load < 0).any() or not np.isfinite(load).all():
        raise InputError(path, "logical_count", "finite counts >= 0",
                         "negative or non-finite values")
    routed = load.sum(axis=1) > 0
    if not routed.any():
        raise InputError(path, "logical_count", "at least one layer with routed tokens",
                         "all zero")
    return Profile.from_load(load[routed], source=str(path)), routed


def read_sglang_count(path: Path) -> Profile:
    """A loads-only profile from an SGLang ``logical_count`` JSON (``moetuner export --format
    sglang-count``, ``{"logical_count": [[E] x num_hidden_layers]}``; dense layers dropped)."""
    data = parse_json(path.read_bytes(), path, "logical_count",
                      '{"logical_count": [num_hidden_layers, E] counts}')
    try:
        count = np.asarray(data["logical_count"] if isinstance(data, dict) else None)
    except (KeyError, ValueError, TypeError, RecursionError, OverflowError):
        count = np.asarray(None)
    if count.ndim != 2 or not count.size or not _is_real(count):
        raise InputError(path, "logical_count", "counts [num_hidden_layers, E]",
                         f"{count.dtype} {list(count.shape)}")
    return _routed_layers(count, path)[0]


# ---------------------------------------------------------------- vLLM routed_experts


def _requests_trace(arrays: list[np.ndarray], names: list[str], source: Path) -> Trace:
    """One trace from per-request ``[seq_len, layers, topk]`` arrays."""
    if not arrays:
        raise InputError(source, "routed_experts", "at least one request")
    for name, array in zip(names, arrays, strict=True):
        if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
            raise InputError(source, f"routed_experts[{name}]",
                             "an integer array [seq_len, layers, topk]",
                             f"{array.dtype} {list(array.shape)}")
        if array.shape[1:] != arrays[0].shape[1:]:
            raise InputError(source, f"routed_experts[{name}]",
                             f"[seq_len, {arrays[0].shape[1]}, {arrays[0].shape[2]}] as the "
                             "first request", list(array.shape))
    ids = np.concatenate(arrays)
    return Trace(topk_ids=ids, num_experts=largest_id(ids) + 1,
                 seq_lens=np.array([len(a) for a in arrays], dtype=np.int64),
                 seq_labels={"seq_request": np.array(names)}, source=str(source))


def is_vllm_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.npy"))


def read_vllm_dir(path: Path, select: Sequence[str] = (), drop: Sequence[str] = ()) -> Trace:
    files = sorted(path.glob("*.npy"))
    arrays = [_load_npy(f) for f in files]
    return _requests_trace(arrays, [f.stem for f in files], path).select(select, drop)


def is_vllm_npz(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file() or {"topk_ids", "load"} & set(
            npz_names(path)):
        return False
    arrays = read_npz(path, "a numpy .npz archive")
    return bool(arrays) and all(array.ndim == 3 for array in arrays.values())


def read_vllm_npz(path: Path, select: Sequence[str] = (), drop: Sequence[str] = ()) -> Trace:
    arrays = read_npz(path, "an .npz of vLLM routed_experts [seq_len, layers, topk] arrays")
    return _requests_trace(list(arrays.values()), list(arrays), path).select(select, drop)


def read_vllm_requests(path: Path, select: Sequence[str] = (), drop: Sequence[str] = ()
                       ) -> Trace:
    """vLLM requests from a directory of ``.npy`` or one ``.npz``."""
    return (read_vllm_dir if path.is_dir() else read_vllm_npz)(path, select, drop)


def is_vllm_jsonl(path: Path) -> bool:
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    # Bytes that are not UTF-8 still match; read_vllm_jsonl names the line that is wrong.
    with path.open(errors="replace") as handle:
        return '"routed_experts"' in handle.readline()


def read_vllm_jsonl(path: Path, select: Sequence[str] = (), drop: Sequence[str] = ()) -> Trace:
    arrays, names = [], []
    expected = ('a JSON object with "routed_experts" [seq_len, layers, topk] (top level, or in '
                "its first outputs / choices entry)")
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        request = parse_json(line, path, f"line {number}", expected)
        try:
            arrays.append(np.asarray(_routed_experts(request)))
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            raise InputError(path, f"line {number}", expected) from None
        names.append(str(request.get("request_id", number - 1)))
    return _requests_trace(arrays, names, path).select(select, drop)


def _routed_experts(request: dict) -> object:
    """The ``routed_experts`` of a saved request: top level, or in the first completion of a
    saved engine output (``outputs``) or API response (``choices``)."""
    for key in ("outputs", "choices"):
        if "routed_experts" not in request and key in request:
            request = request[key][0]
    return request["routed_experts"]


# ---------------------------------------------------------------- ExFlow and plain loads


def _load_npy(path: Path) -> np.ndarray:
    return load_npy(path, "a numpy .npy array")


def _npy_header(path: Path) -> tuple[int, np.dtype] | None:
    """(ndim, dtype) of an ``.npy`` without reading its data; None when it is not one (an
    ``InputError`` when it is named ``.npy`` but damaged)."""
    if path.suffix != ".npy" or not path.is_file():
        return None
    array = load_npy(path, "a numpy .npy array", header_only=True)
    return array.ndim, array.dtype


def _is_real(array: np.ndarray) -> bool:
    """Whether an array holds real numbers (integers or floats; not bool, complex, str)."""
    return np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)


def _named_load(path: Path) -> bool:
    return "load" in path.name.lower()


def is_exflow(path: Path) -> bool:
    header = _npy_header(path)
    return header is not None and header[0] == 2 and np.issubdtype(header[1], np.integer) \
        and not _named_load(path)


def read_exflow(path: Path, select: Sequence[str] = (), drop: Sequence[str] = ()) -> Trace:
    """An ExFlow ``[tokens, layers]`` top-1 trace as ``topk_ids [tokens, layers, 1]``."""
    ids = _load_npy(path)[:, :, None]
    trace = Trace(topk_ids=ids, num_experts=largest_id(ids) + 1,
                  source=str(path))
    return trace.select(select, drop)


def is_loads(path: Path) -> bool:
    if path.suffix in (".json", ".csv"):
        return path.is_file()
    header = _npy_header(path)
    return header is not None and header[0] == 2 and (
        np.issubdtype(header[1], np.floating) or _named_load(path))


def read_loads(path: Path) -> Profile:
    """A loads-only profile from a plain ``[L, E]`` JSON, CSV or ``.npy``."""
    expected = "numbers [layers, experts]"
    if path.suffix == ".json":
        load = parse_json(path.read_bytes(), path, "load", expected)
    elif path.suffix == ".csv":
        try:
            with warnings.catch_warnings():  # an empty file: refused below in one line
                warnings.simplefilter("ignore", UserWarning)
                load = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
        except ValueError as exc:
            raise InputError(path, "load", expected, " ".join(str(exc).split())[:120]) from None
    else:
        load = _load_npy(path)
    try:
        load = np.asarray(load)
    except (ValueError, TypeError, RecursionError, OverflowError):
        raise InputError(path, "load", expected, "ragged or nested lists") from None
    if load.ndim != 2 or load.size == 0 or not _is_real(load):
        raise InputError(path, "load", "a non-empty [layers, experts] table of numbers",
                         f"{load.dtype} {list(load.shape)}")
    return Profile.from_load(load.astype(np.float64), source=str(path))
