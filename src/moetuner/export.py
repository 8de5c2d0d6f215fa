"""Writing placements in the files serving engines load, and reading those files back.

Formats (section 5 of the brief):

- ``sglang``: ``{"physical_to_logical_map": [[P ids] x num_hidden_layers]}`` for
  ``--init-expert-location``; dense layers get SGLang's trivial row ``p % E``. No other key
  (SGLang passes the dict as keyword arguments): metadata goes to the sidecar
  ``OUT.meta.json``.
- ``sglang-count``: ``{"logical_count": [[E loads] x num_hidden_layers]}`` from a profile
  (zeros for dense layers); SGLang then balances the experts itself.
- ``vllm``: a JSON list of phy2log lists, one per MoE layer, plus ``OUT.jsonl`` with one
  proposed ``eplb_initial_mapping`` record per MoE layer.
- ``vllm-ascend``: the ``expert_map_path`` JSON (``moe_layer_count``, ``layer_list`` of
  ``device_list`` of ``device_expert``).
- ``megatron``: ``expert_gpu [L, E]`` int ``.npy`` (the MoETuner paper's expert-to-GPU map);
  the only format for placements with empty slots, and it refuses replicas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetuner.errors import InputError
from moetuner.io import (
    MAX_GPUS,
    MAX_LAYERS,
    as_int,
    int_array,
    load_npy,
    read_json,
    write_atomic,
    write_json,
    write_npy,
)
from moetuner.models import ModelSpec
from moetuner.placement import Placement, pack_slots
from moetuner.profile import Profile

FORMATS = ("sglang", "sglang-count", "vllm", "vllm-ascend", "megatron")
SIDECAR_FORMAT = "moetuner.sglang-meta"


@dataclass(frozen=True)
class LayerAxis:
    """Where the MoE layers sit among a model's hidden layers.

    Attributes:
        num_hidden_layers: all transformer layers (SGLang's layer axis).
        moe_layers: hidden-layer index of each MoE layer, ascending.
    """

    num_hidden_layers: int
    moe_layers: tuple[int, ...]

    @classmethod
    def resolve(cls, num_moe_layers: int, model: ModelSpec | None = None,
                num_hidden_layers: int | None = None, dense_layers: Sequence[int] = ()
                ) -> LayerAxis:
        """The layer axis from a model preset, or explicit counts (default: no dense layers)."""
        if model is not None:
            num_hidden_layers, dense_layers = model.num_hidden_layers, model.dense_layers
        hidden = num_moe_layers + len(dense_layers) if num_hidden_layers is None else \
            num_hidden_layers
        if not 1 <= hidden <= MAX_LAYERS:
            raise InputError("--num-hidden-layers", "num_hidden_layers",
                             f"a layer count in [1, {MAX_LAYERS}]", hidden)
        dense = set(dense_layers)
        if any(d < 0 or d >= hidden for d in dense):
            raise InputError("--dense-layers", "dense_layers", f"indices in [0, {hidden})",
                             sorted(dense))
        moe = tuple(i for i in range(hidden) if i not in dense)
        if len(moe) != num_moe_layers:
            raise InputError("--num-hidden-layers/--dense-layers", "moe layers",
                             f"{num_moe_layers} MoE layers (as in the placement)",
                             f"{hidden} hidden - {len(dense)} dense = {len(moe)}")
        return cls(hidden, moe)

    def expand(self, rows: np.ndarray, fill: np.ndarray) -> np.ndarray:
        """``[num_hidden_layers, ...]``: ``rows [moe_layers, ...]`` at MoE layers, ``fill``
        (broadcast) at dense ones."""
        out = np.broadcast_to(fill, (self.num_hidden_layers, *rows.shape[1:])).copy()
        out[list(self.moe_layers)] = rows
        return out


# ---------------------------------------------------------------- SGLang


def to_sglang(placement: Placement, axis: LayerAxis) -> dict:
    """The ``--init-expert-location`` dict: phy2log over all hidden layers."""
    trivial = np.arange(placement.num_slots) % placement.num_experts
    return {"physical_to_logical_map": axis.expand(placement.phy2log, trivial).tolist()}


def sglang_sidecar(placement: Placement, axis: LayerAxis) -> dict:
    """What SGLang's file cannot hold: the shapes moetuner needs to read it back."""
    return {"format": SIDECAR_FORMAT, "num_gpus": placement.num_gpus,
            "num_experts": placement.num_experts, "num_hidden_layers": axis.num_hidden_layers,
            "moe_layers": list(axis.moe_layers),
            "ep_num_redundant_experts": placement.num_redundant,
            "allow_shared_gpu": placement.allow_shared_gpu, "metadata": placement.metadata}


def check_sglang(data: object, num_hidden_layers: int, num_experts: int, num_gpus: int,
                 num_redundant: int | None = None, source: str = "<sglang>") -> np.ndarray:
    """Mirror SGLang's ``--init-expert-location`` loader on a parsed JSON file.

    SGLang passes the dict as keyword arguments, so exactly one known key is allowed. For
    ``physical_to_logical_map``: one row per hidden layer, P = E + R slots per row (R =
    ``--ep-num-redundant-experts`` when given), P a multiple of the GPUs, ids in ``[0, E)``
    and every expert in every row (SGLang's dispatch map needs a replica of each). For
    ``logical_count``: ``[num_hidden_layers, E]`` or ``[steps, num_hidden_layers, E]``
    non-negative counts.

    Returns ``physical_to_logical_map [num_hidden_layers, P]`` or ``logical_count
    [num_hidden_layers, E]`` (summed over steps).
    """
    keys = ("physical_to_logical_map", "logical_count")
    if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in keys:
        raise InputError(source, "keys", f"exactly one of {keys}",
                         sorted(data) if isinstance(data, dict) else type(data).__name__)
    key, rows = next(iter(data.items()))
    try:
        array = np.asarray(rows, dtype=np.float64) if key == "logical_count" else int_array(
            rows, source, key, 2, "[hidden layers, slots]")
    except (TypeError, ValueError, RecursionError, OverflowError):
        raise InputError(source, key, "a rectangular list of number lists") from None
    if key == "logical_count":
        if array.ndim == 3:
            array = array.sum(axis=0)
        if array.shape != (num_hidden_layers, num_experts) or (array < 0).any():
            raise InputError(source, key, f"non-negative counts [{num_hidden_layers} hidden "
                             f"layers, {num_experts} experts]", list(array.shape))
        return array
    if array.ndim != 2 or array.shape[0] != num_hidden_layers:
        raise InputError(source, key, f"[{num_hidden_layers} hidden layers, slots]",
                         list(array.shape))
    width = array.shape[1]
    slots = num_experts + (num_redundant or 0)
    if (num_redundant is not None and width != slots) or width < num_experts \
            or width % num_gpus:
        raise InputError(source, key, f"rows of {slots if num_redundant is not None else 'E + R'}"
                         f" slots (E = {num_experts}), divisible by {num_gpus} GPUs", width)
    if array.min() < 0 or array.max() >= num_experts:
        raise InputError(source, key, f"ids in [0, {num_experts})",
                         f"[{array.min()}, {array.max()}]")
    present = np.zeros((num_hidden_layers, num_experts), dtype=bool)
    present[np.arange(num_hidden_layers)[:, None], array] = True
    if not present.all():
        layer, expert = np.argwhere(~present)[0]
        raise InputError(source, key, "every expert in every layer's row",
                         f"expert {expert} missing in layer {layer}")
    return array


def read_sglang(path: str | os.PathLike, meta_path: str | os.PathLike | None = None
                ) -> Placement:
    """Read an ``--init-expert-location`` file and its sidecar back into a placement."""
    path = Path(path)
    meta_path = Path(meta_path) if meta_path else sidecar_path(path)
    meta = read_json(meta_path, "the sidecar moetuner wrote beside the SGLang file")
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise InputError(meta_path, "format", f'"{SIDECAR_FORMAT}"')
    phy2log = check_sglang(read_json(path, "an SGLang placement JSON"),
                           meta["num_hidden_layers"], meta["num_experts"], meta["num_gpus"],
                           meta.get("ep_num_redundant_experts"), str(path))
    return Placement(phy2log=phy2log[meta["moe_layers"]], num_gpus=meta["num_gpus"],
                     num_experts=meta["num_experts"], metadata=meta.get("metadata", {}),
                     allow_shared_gpu=bool(meta.get("allow_shared_gpu", False)),
                     source=str(path))


def to_sglang_count(profile: Profile, axis: LayerAxis) -> dict:
    """The ``logical_count`` form: the profile's loads over all hidden layers."""
    load = profile.load
    if np.issubdtype(load.dtype, np.floating) and np.all(load == np.round(load)):
        load = load.astype(np.int64)
    return {"logical_count": axis.expand(load, np.zeros(1, load.dtype)).tolist()}


def read_sglang_count(path: str | os.PathLike, axis: LayerAxis, num_experts: int) -> Profile:
    """Read a ``logical_count`` file back into a loads-only profile of the MoE layers."""
    load = check_sglang(read_json(path, "an SGLang logical_count JSON"), axis.num_hidden_layers,
                        num_experts, 1, source=str(path))
    return Profile.from_load(load[list(axis.moe_layers)], source=str(path))


# ---------------------------------------------------------------- vLLM


def to_vllm(placement: Placement) -> list[list[int]]:
    """A JSON list of phy2log lists, one per MoE layer."""
    return placement.phy2log.tolist()


def vllm_mapping_records(placement: Placement, axis: LayerAxis) -> list[dict]:
    """The proposed JSONL ``eplb_initial_mapping``: one record per MoE layer."""
    return [{"eplb_initial_mapping": {"layer": layer, "moe_layer": index,
                                      "num_gpus": placement.num_gpus,
                                      "num_redundant_experts": placement.num_redundant,
                                      "phy2log": row}}
            for index, (layer, row) in enumerate(zip(axis.moe_layers, placement.phy2log.tolist(),
                                                     strict=True))]


def read_vllm(path: str | os.PathLike, num_gpus: int, num_experts: int | None = None
              ) -> Placement:
    """Read a JSON list of phy2log lists (E: the largest id + 1 unless given)."""
    data = read_json(path, "a JSON list of phy2log lists")
    phy2log = int_array(data, path, "phy2log", 2, "[moe layers, slots]")
    if phy2log.size == 0:
        raise InputError(path, "phy2log", "[moe layers, slots]", list(phy2log.shape))
    experts = int(phy2log.max()) + 1 if num_experts is None else num_experts
    return Placement(phy2log=phy2log, num_gpus=num_gpus, num_experts=experts,
                     allow_shared_gpu=True, source=str(path))


# ---------------------------------------------------------------- vLLM-Ascend


def to_vllm_ascend(placement: Placement) -> dict:
    """The ``expert_map_path`` JSON: each MoE layer's experts per device, in slot order."""
    G, S = placement.num_gpus, placement.slots_per_gpu
    per_device = placement.phy2log.reshape(placement.num_layers, G, S).tolist()
    return {"moe_layer_count": placement.num_layers,
            "layer_list": [{"layer_id": layer, "device_count": G,
                            "device_list": [{"device_id": g, "device_expert": experts}
                                            for g, experts in enumerate(devices)]}
                           for layer, devices in enumerate(per_device)]}


def check_vllm_ascend(data: object, source: str = "<vllm-ascend>") -> np.ndarray:
    """Mirror vLLM-Ascend's ``expert_file_to_tensor`` shape rules on a parsed JSON file.

    Every layer ``0 .. moe_layer_count - 1`` is read from ``layer_list[layer]``; its devices'
    ``device_expert`` lists must form one int tensor ``[G, S]`` (equal lengths), with the same
    G and S in every layer. Returns ``[L, G, S]``.
    """
    if not isinstance(data, dict) or "moe_layer_count" not in data or "layer_list" not in data:
        raise InputError(source, "keys", "moe_layer_count and layer_list")
    count, layers = data["moe_layer_count"], data["layer_list"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1 \
            or not isinstance(layers, list) or len(layers) != count:
        raise InputError(source, "layer_list", f"moe_layer_count = {count} layers",
                         len(layers) if isinstance(layers, list) else type(layers).__name__)
    tables = []
    for index, layer in enumerate(layers):
        try:
            devices = layer["device_list"]
            table = int_array([device["device_expert"] for device in devices], source,
                              f"layer_list[{index}].device_list", 2, "[devices, experts]")
        except (KeyError, TypeError):
            raise InputError(source, f"layer_list[{index}].device_list",
                             "devices with equally long integer device_expert lists") from None
        if table.ndim != 2 or layer.get("device_count", len(devices)) != len(devices):
            raise InputError(source, f"layer_list[{index}]",
                             "device_count devices, each with a device_expert list",
                             list(table.shape))
        if tables and table.shape != tables[0].shape:
            raise InputError(source, f"layer_list[{index}]",
                             f"the [devices, experts] shape of layer 0 {list(tables[0].shape)}",
                             list(table.shape))
        tables.append(table)
    return np.stack(tables)


def read_vllm_ascend(path: str | os.PathLike, num_experts: int | None = None) -> Placement:
    """Read an ``expert_map_path`` JSON back into a placement."""
    tables = check_vllm_ascend(read_json(path, "a vLLM-Ascend expert map JSON"), str(path))
    L, G, S = tables.shape
    experts = int(tables.max()) + 1 if num_experts is None else num_experts
    return Placement(phy2log=tables.reshape(L, G * S), num_gpus=G, num_experts=experts,
                     allow_shared_gpu=True, source=str(path))


# ---------------------------------------------------------------- Megatron (the paper's map)


def to_megatron(placement: Placement) -> np.ndarray:
    """``expert_gpu [L, E]``: the GPU of each expert; refuses replicas."""
    if (placement.logcnt > 1).any():
        raise InputError(placement.source, "phy2log",
                         "one slot per expert for the megatron map (no replicas)",
                         f"{int(placement.logcnt.max())} replicas of one expert")
    return placement.replicas_on_gpu.argmax(axis=2)


def placement_from_expert_gpu(expert_gpu: np.ndarray, num_gpus: int, source: str = "<memory>"
                              ) -> Placement:
    """A placement from ``expert_gpu [L, E]`` with unequal experts per GPU allowed.

    Slots per GPU = the most experts any GPU holds in any layer; a GPU's experts fill its
    first slots in ascending order, the rest stay empty (-1).
    """
    expert_gpu = np.asarray(expert_gpu)
    if expert_gpu.ndim != 2 or not np.issubdtype(expert_gpu.dtype, np.integer):
        raise InputError(source, "expert_gpu", "an integer array [layers, experts]",
                         f"{expert_gpu.dtype} {list(expert_gpu.shape)}")
    L, E = expert_gpu.shape
    if expert_gpu.min() < 0 or expert_gpu.max() >= num_gpus:
        raise InputError(source, "expert_gpu", f"GPU ids in [0, {num_gpus})",
                         f"[{expert_gpu.min()}, {expert_gpu.max()}]")
    phy2log = pack_slots(np.broadcast_to(np.arange(E), (L, E)), expert_gpu, num_gpus)
    return Placement(phy2log=phy2log, num_gpus=num_gpus, num_experts=E,
                     allow_empty_slots=bool((phy2log < 0).any()), source=source)


def read_megatron(path: str | os.PathLike, num_gpus: int | None = None) -> Placement:
    """Read an ``expert_gpu [L, E]`` ``.npy`` (G: the largest GPU id + 1 unless given)."""
    expert_gpu = load_npy(path, "an .npy expert_gpu [layers, experts]")
    if not expert_gpu.size or not np.issubdtype(expert_gpu.dtype, np.integer):
        raise InputError(path, "expert_gpu", "integers [layers, experts]",
                         f"{expert_gpu.dtype} {list(expert_gpu.shape)}")
    gpus = int(expert_gpu.max()) + 1 if num_gpus is None else num_gpus
    return placement_from_expert_gpu(expert_gpu, as_int(gpus, path, "expert_gpu (GPU ids)", 1,
                                                        MAX_GPUS), str(path))


# ---------------------------------------------------------------- writing


def sidecar_path(path: str | os.PathLike) -> Path:
    """``OUT.meta.json`` beside ``OUT`` (``x.json`` -> ``x.meta.json``)."""
    path = Path(path)
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    return path.with_name(f"{stem}.meta.json")


def write_engine_files(source: Placement | Profile, fmt: str, out: str | os.PathLike,
           axis: LayerAxis | None = None) -> tuple[list[Path], str]:
    """Write ``source`` in engine format ``fmt`` to ``out`` (and sidecars), atomically.

    Args:
        source: a placement, or a profile for ``sglang-count``.
        fmt: one of ``FORMATS``.
        out: the file to write.
        axis: MoE layers among the hidden layers (SGLang formats); default: all MoE.

    Returns:
        the files written, and the engine flags / settings to use them (text to print).
    """
    if fmt not in FORMATS:
        raise InputError("--format", "format", f"one of {', '.join(FORMATS)}", repr(fmt))
    out = Path(out)
    if fmt.startswith("sglang") and out.suffix != ".json":
        raise InputError("-o", "output", "a path ending in .json (SGLang parses any other "
                         "--init-expert-location value as inline JSON)", str(out))
    want_profile = fmt == "sglang-count"
    if want_profile != isinstance(source, Profile):
        raise InputError(getattr(source, "source", "<input>"), "input",
                         "a profile or trace for sglang-count" if want_profile else
                         f"a placement JSON for {fmt}")
    axis = axis or LayerAxis(source.num_layers, tuple(range(source.num_layers)))
    if want_profile:
        write_json(out, to_sglang_count(source, axis))
        return [out], (f"sglang: --init-expert-location {out} (SGLang balances these "
                       "logical counts itself; add --ep-num-redundant-experts R for replicas)")
    if source.allow_empty_slots and fmt != "megatron":
        raise InputError(source.source, "phy2log", "no empty slots (-1) for " + fmt +
                         ": engines need equal slots per GPU; export it as megatron")
    if fmt == "sglang":
        meta = sidecar_path(out)
        write_json(meta, sglang_sidecar(source, axis), indent=1)
        write_json(out, to_sglang(source, axis))
        return [out, meta], (f"sglang: --init-expert-location {out} --ep-num-redundant-experts "
                             f"{source.num_redundant} --ep-size {source.num_gpus} "
                             "(the expert-parallel size must be the placement's GPU count)")
    if fmt == "vllm":
        records = out.with_suffix(".jsonl")
        write_json(out, to_vllm(source))
        _write_jsonl(records, vllm_mapping_records(source, axis))
        return [out, records], (
            f"vllm: --enable-expert-parallel --enable-eplb --eplb-config "
            f"'{{\"num_redundant_experts\": {source.num_redundant}}}' with {source.num_gpus} "
            f"expert-parallel ranks; vLLM has no flag to load an initial mapping yet: "
            f"{out} is the phy2log per MoE layer and {records} the proposed "
            "eplb_initial_mapping records")
    if fmt == "vllm-ascend":
        write_json(out, to_vllm_ascend(source))
        return [out], (f"vllm-ascend: --additional-config '{{\"expert_map_path\": \"{out}\"}}' "
                       f"with {source.num_gpus} expert-parallel devices")
    write_npy(out, to_megatron(source))
    return [out], f"megatron: expert_gpu [{source.num_layers}, {source.num_experts}] map in {out}"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, lambda handle: handle.writelines(json.dumps(r) + "\n" for r in records))
