"""What a file is, from its content: every format moetuner writes or reads.

``identify(path)`` names a file's format and its role (a trace, a profile, a placement, or
another of moetuner's outputs), so that ``info`` describes any of them and every command
refuses, in one line, a file of the wrong role instead of misreading it (a vLLM placement,
a JSON list of lists, read as loads; a Megatron ``expert_gpu`` map read as an ExFlow trace).

Formats whose bytes carry no name are told apart by their numbers:

- a vLLM placement (``[layers, slots]``) holds every expert id ``0 .. E-1`` in every row,
  where plain loads ``[layers, experts]`` hold counts;
- a Megatron ``expert_gpu [layers, experts]`` ``.npy`` holds every GPU id ``0 .. G-1`` in
  every row with G below the row's length (more experts than GPUs), where an ExFlow trace
  ``[tokens, layers]`` holds each token's expert per layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from moetuner.costmodel import CostCoefficients
from moetuner.errors import InputError
from moetuner.export import (
    SIDECAR_FORMAT,
    read_megatron,
    read_sglang,
    read_vllm,
    read_vllm_ascend,
    sidecar_path,
)
from moetuner.io import MAX_LAYERS, load_npy, npz_names, read_json
from moetuner.placement import FORMAT as PLACEMENT_FORMAT
from moetuner.placement import Placement, load_placement

TRACE, PROFILE, PLACEMENT, OTHER = "trace", "profile", "placement", "other"


@dataclass(frozen=True)
class FileKind:
    """A file's format.

    Attributes:
        name: short name, e.g. ``vllm-placement``.
        role: ``trace``, ``profile``, ``placement`` or ``other`` (calibration, sweep point,
            SGLang sidecar): what commands may take it as.
        description: what it is, for messages, e.g. ``a vLLM placement (JSON list of
            phy2log lists)``.
    """

    name: str
    role: str
    description: str


KINDS = {kind.name: kind for kind in (
    FileKind("trace", TRACE, "a moetuner trace (.npz with topk_ids)"),
    FileKind("vllm-requests", TRACE, "vLLM routed_experts requests"),
    FileKind("vllm-jsonl", TRACE, "vLLM routed_experts requests (JSONL)"),
    FileKind("exflow", TRACE, "an ExFlow top-1 trace (.npy [tokens, layers])"),
    FileKind("sglang-per-token", TRACE, "an SGLang recorder dump (per_token mode)"),
    FileKind("profile", PROFILE, "a moetuner profile (.npz with load)"),
    FileKind("loads", PROFILE, "plain loads [layers, experts]"),
    FileKind("sglang-stat", PROFILE, "an SGLang recorder dump (stat mode, logical_count)"),
    FileKind("sglang-count", PROFILE,
             "an SGLang logical_count JSON (moetuner export --format sglang-count)"),
    FileKind("placement", PLACEMENT, "a moetuner placement JSON"),
    FileKind("sglang-placement", PLACEMENT,
             "an SGLang placement JSON (physical_to_logical_map, --init-expert-location)"),
    FileKind("vllm-placement", PLACEMENT, "a vLLM placement (JSON list of phy2log lists)"),
    FileKind("vllm-ascend-placement", PLACEMENT,
             "a vLLM-Ascend expert map JSON (moe_layer_count, layer_list)"),
    FileKind("megatron-placement", PLACEMENT, "a Megatron expert_gpu map (.npy [layers, "
             "experts] of GPU ids)"),
    FileKind("sglang-sidecar", OTHER, "the sidecar of an SGLang placement (.meta.json)"),
    FileKind("calibration", OTHER, "a cost-model calibration JSON (moetuner calibrate)"),
    FileKind("sweep-point", OTHER, "a sweep point (moetuner sweep's points/*.json)"),
    FileKind("sweep-table", OTHER, "a sweep table (moetuner sweep's sweep.csv)"),
)}
EXPECTED = ("a file moetuner reads or writes: a trace, a profile, a placement (moetuner, "
            "SGLang, vLLM, vLLM-Ascend, Megatron), a calibration, a sweep point or table")


def covers_ids(table: np.ndarray) -> bool:
    """Whether every row of an integer ``table [rows, width]`` holds every id ``0 .. N-1``
    (N = the table's largest id + 1) and nothing else: a placement's rows (every expert, or
    every GPU, in every layer), not counts."""
    if table.ndim != 2 or not table.size or not np.issubdtype(table.dtype, np.integer):
        return False
    if table.min() < 0 or table.max() >= table.shape[1]:
        return False
    present = np.zeros((table.shape[0], int(table.max()) + 1), dtype=bool)
    present[np.arange(table.shape[0])[:, None], table] = True
    return bool(present.all())


def is_megatron_map(table: np.ndarray) -> bool:
    """Whether an integer ``.npy`` array is an ``expert_gpu [layers, experts]`` map: at most
    ``MAX_LAYERS`` rows, each holding every GPU id ``0 .. G-1`` with G < experts."""
    return table.ndim == 2 and table.shape[0] <= MAX_LAYERS and covers_ids(table) \
        and int(table.max()) + 1 < table.shape[1]


def _json_kind(data: object) -> str | None:
    """The format name of a parsed JSON file, or None when it is none of moetuner's."""
    if isinstance(data, dict):
        if data.get("format") == PLACEMENT_FORMAT:
            return "placement"
        if data.get("format") == SIDECAR_FORMAT:
            return "sglang-sidecar"
        if "physical_to_logical_map" in data:
            return "sglang-placement"
        if "logical_count" in data:
            return "sglang-count"
        if "layer_list" in data or "moe_layer_count" in data:
            return "vllm-ascend-placement"
        if {"point", "row"} <= set(data):
            return "sweep-point"
        if data and set(data) <= {field.name for field in fields(CostCoefficients)}:
            return "calibration"
        return None
    if isinstance(data, list):
        try:
            table = np.asarray(data)
        except (ValueError, TypeError, RecursionError, OverflowError):
            return "loads"  # ragged: read_loads says so
        return "vllm-placement" if covers_ids(table) else "loads"
    return None


def identify(path: str | os.PathLike, expected: str = EXPECTED) -> FileKind:
    """The format of the file (or vLLM request directory) at ``path``, from its content.

    Raises ``InputError`` naming the file and ``expected`` when it is missing, damaged, or
    none of moetuner's formats.
    """
    from moetuner import readers  # torch only for .pt files, when one is read

    path = Path(path)
    if not path.exists():
        raise InputError(path, "file", f"an existing file: {expected}")
    name = None
    if readers.is_vllm_dir(path):
        name = "vllm-requests"
    elif path.suffix == ".npz" and path.is_file():
        names = npz_names(path)
        name = ("trace" if "topk_ids" in names else "profile" if "load" in names
                else "vllm-requests" if readers.is_vllm_npz(path) else None)
    elif path.suffix == ".npy" and path.is_file():
        header = load_npy(path, "a numpy .npy array", header_only=True)
        if readers.is_exflow(path):
            # A map has at most MAX_LAYERS rows: a longer trace is not read here.
            small = header.shape[0] <= MAX_LAYERS
            name = "megatron-placement" if small and is_megatron_map(np.array(header)) \
                else "exflow"
        elif readers.is_loads(path):
            name = "loads"
    elif path.suffix == ".pt" and path.is_file():
        name = "sglang-stat" if readers.is_sglang_stat(path) else "sglang-per-token"
    elif readers.is_vllm_jsonl(path):
        name = "vllm-jsonl"
    elif path.suffix == ".csv" and path.is_file():
        with path.open(errors="replace") as handle:
            header = handle.readline().strip().split(",")
        name = "sweep-table" if {"method", "speedup_vs_linear"} <= set(header) else "loads"
    elif path.suffix == ".json" and path.is_file():
        name = _json_kind(read_json(path, "a JSON file moetuner reads"))
    if name is None:
        raise InputError(path, "file", expected)
    return KINDS[name]


def refuse_unless(path: str | os.PathLike, roles: tuple[str, ...], expected: str) -> FileKind:
    """``identify(path)``, or an ``InputError`` saying what the file is when its role is not
    one of ``roles`` (e.g. a placement given where a profile belongs)."""
    kind = identify(path, expected)
    if kind.role not in roles:
        raise InputError(path, "file", expected, kind.description)
    return kind


PLACEMENT_EXPECTED = ("a placement: moetuner JSON, or a file moetuner export writes (SGLang "
                      "JSON with its sidecar, vLLM JSON list, vLLM-Ascend JSON, Megatron .npy)")


def read_placement(path: str | os.PathLike, num_gpus: int | None = None,
                   gpus_flag: str | None = "--gpus") -> Placement:
    """A placement from a moetuner JSON or any engine file ``moetuner export`` writes.

    Args:
        path: the file; anything else (a trace, a profile, a calibration) is refused.
        num_gpus: G for the formats that do not record it (vLLM list; a Megatron map's
            default is its largest GPU id + 1).
        gpus_flag: the flag that gives ``num_gpus``, named when a vLLM list needs it (None:
            the command has none, so a vLLM list is refused).
    """
    path = Path(path)
    kind = refuse_unless(path, (PLACEMENT,), PLACEMENT_EXPECTED)
    if kind.name == "placement":
        return load_placement(path)
    if kind.name == "megatron-placement":
        return read_megatron(path, num_gpus)
    if kind.name == "vllm-ascend-placement":
        return read_vllm_ascend(path)
    if kind.name == "sglang-placement":
        if not sidecar_path(path).exists():
            raise InputError(path, "sidecar", f"the sidecar {sidecar_path(path).name} that "
                             "moetuner export writes beside an SGLang file (it names the "
                             "layers and GPUs)")
        return read_sglang(path)
    if num_gpus is None:
        if gpus_flag is None:
            raise InputError(path, "file", "a placement that records its GPU count (a vLLM "
                             "list does not: give the moetuner placement it was exported "
                             "from)", kind.description)
        raise InputError(gpus_flag, "num_gpus", f"the GPU count for the vLLM map {path}")
    return read_vllm(path, num_gpus)
