"""Writing placements in the files serving engines load, and reading those files back.

Formats (section 5 of the brief):

- ``sglang``: ``{"physical_to_logical_map": [[P ids] x num_hidden_layers]}`` for
  ``--init-expert-location``; dense layers get SGLang's trivial row ``p % E``. No other key
  (SGLang passes the dict as keyword arguments): metadata goes to the sidecar
  ``OUT.meta.json``.
- ``sglang-count``: ``{"logical_count": [[E loads] x num_hidden_layers]}`` from a profile
  (zeros for dense layers); SGLang then balances the experts itself.
- ``vllm``: a JSON list of phy2log lists, one per MoE layer: what the open vLLM proposal
  ``eplb_config.initial_expert_map_path`` (#49572, not merged) reads; vLLM 0.33 has no flag
  that loads a placement.
- ``vllm-ascend``: the ``expert_map_path`` JSON (``moe_layer_count``, ``layer_list`` of
  ``device_list`` of ``device_expert``), given under ``eplb_config`` in
  ``--additional-config``.
- ``megatron``: ``expert_gpu [L, E]`` int ``.npy`` (the MoETuner paper's expert-to-GPU map);
  the only format for placements with empty slots, and it refuses replicas.

Before writing, ``check_engine`` refuses a placement the engine would load wrongly: two
replicas of one expert on one GPU for SGLang with an all-to-all backend (it keeps one replica
per expert per rank; the other slot never gets weights while other ranks dispatch to it) and
for vLLM-Ascend (one slot per expert per device: the layer's routing table shifts).
"""

from __future__ import annotations

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
    json_writer,
    load_npy,
    read_json,
    write_npy,
    write_together,
)
from moetuner.models import ModelSpec, models_with_moe_shape
from moetuner.placement import Placement, pack_slots
from moetuner.profile import Profile

FORMATS = ("sglang", "sglang-count", "vllm", "vllm-ascend", "megatron")
SIDECAR_FORMAT = "moetuner.sglang-meta"
# SGLang 0.5.23's --moe-a2a-backend choices; every one but "none" keeps one replica of an
# expert per rank (its nearest-replica map), so replicas must sit on distinct GPUs.
SGLANG_A2A_BACKENDS = ("none", "deepep", "deepep_v2", "mooncake", "nixl", "mori",
                       "ascend_fuseep", "ascend_tp", "flashinfer", "flashinfer_megamoe",
                       "megamoe", "pplx")
DEFAULT_SGLANG_BACKEND = "deepep"


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

    @classmethod
    def guess(cls, num_moe_layers: int, num_experts: int
              ) -> tuple[LayerAxis, ModelSpec | None, str]:
        """The layer axis of the model preset with this MoE shape, for a placement exported
        without ``--model``: its dense layers count in SGLang's layer axis.

        Returns the axis, the preset (None when no preset has the shape: then no dense
        layers are assumed) and a line saying which was used. Several presets of this shape
        with different axes raise ``InputError`` asking for ``--model``.
        """
        presets = models_with_moe_shape(num_moe_layers, num_experts)
        axes = {(m.num_hidden_layers, m.dense_layers) for m in presets}
        if len(axes) > 1:
            raise InputError("--model", "model", "a preset naming the hidden and dense layers "
                             f"(presets {', '.join(m.name for m in presets)} all have "
                             f"{num_moe_layers} MoE layers x {num_experts} experts)")
        if not presets:
            return (cls.resolve(num_moe_layers), None,
                    f"no model preset has {num_moe_layers} MoE layers x {num_experts} "
                    f"experts: wrote {num_moe_layers} rows, assuming no dense layers (give "
                    "--num-hidden-layers and --dense-layers if the model has some)")
        model = presets[0]
        dense = ", ".join(map(str, model.dense_layers)) or "none"
        return (cls.resolve(num_moe_layers, model), model,
                f"the placement has the shape of {model.name}: wrote its "
                f"{model.num_hidden_layers} hidden layers (dense: {dense}) as SGLang's layer "
                "axis (give --model, or --num-hidden-layers and --dense-layers, otherwise)")

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


# ---------------------------------------------------------------- engine constraints


def check_engine(placement: Placement, fmt: str, backend: str | None = None,
                 axis: LayerAxis | None = None) -> None:
    """Raise ``InputError`` when the engine reading ``fmt`` would load ``placement`` wrongly.

    Every engine format needs equal slots per GPU (no empty slot; ``megatron`` excepted).
    Replicas of one expert must sit on distinct GPUs for SGLang with an all-to-all
    ``backend`` (any ``--moe-a2a-backend`` but ``none``; default ``deepep``) and always for
    vLLM-Ascend; vLLM loads them as they are; ``megatron`` refuses replicas altogether.

    Args:
        placement: what is to be exported.
        fmt: one of ``FORMATS`` (not ``sglang-count``, which carries no placement).
        backend: SGLang's ``--moe-a2a-backend`` (``fmt == "sglang"`` only), None = default.
        axis: MoE layers among the hidden layers, to name the hidden layer in messages.
    """
    if backend is not None and fmt != "sglang":
        raise InputError("--backend", "backend", "only with --format sglang (SGLang's "
                         "--moe-a2a-backend)", repr(backend))
    backend = DEFAULT_SGLANG_BACKEND if backend is None else backend
    if backend not in SGLANG_A2A_BACKENDS:
        raise InputError("--backend", "backend", f"one of {', '.join(SGLANG_A2A_BACKENDS)}",
                         repr(backend))
    if placement.allow_empty_slots and fmt != "megatron":
        raise InputError(placement.source, "phy2log", "no empty slots (-1) for " + fmt +
                         ": engines need equal slots per GPU; export it as megatron")
    if fmt == "sglang" and backend != "none":
        why = (f"SGLang with --moe-a2a-backend {backend} keeps one replica of an expert per "
               "GPU; pass --backend none if it runs with --moe-a2a-backend none")
    elif fmt == "vllm-ascend":
        why = "vLLM-Ascend keeps one slot of an expert per device"
    else:
        return
    shared = np.argwhere(placement.replicas_on_gpu > 1)
    if len(shared):
        layer, expert, gpu = (int(i) for i in shared[0])
        hidden = f" (hidden layer {axis.moe_layers[layer]})" if axis else ""
        raise InputError(placement.source, "phy2log",
                         f"the replicas of each expert on distinct GPUs ({why}; place with "
                         "eplb_fixed or a moetuner method)",
                         f"layer {layer}{hidden}: GPU {gpu} holds "
                         f"{placement.replicas_on_gpu[layer, expert, gpu]} replicas of expert "
                         f"{expert}")


# ---------------------------------------------------------------- writing


def sidecar_path(path: str | os.PathLike) -> Path:
    """``OUT.meta.json`` beside ``OUT`` (``x.json`` -> ``x.meta.json``)."""
    path = Path(path)
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    return path.with_name(f"{stem}.meta.json")


def engine_outputs(fmt: str, out: str | os.PathLike) -> list[Path]:
    """The files ``write_engine_files`` writes for ``fmt`` to ``out``."""
    return [Path(out), sidecar_path(out)] if fmt == "sglang" else [Path(out)]


# How the printed commands start each engine, and the placeholders a user fills in.
SGLANG_LAUNCH = "python -m sglang.launch_server"
VLLM_LAUNCH = "vllm serve"
NODE0_ADDR = "NODE0_ADDR"  # the first node's address, in multi-node commands
SGLANG_DIST_PORT = 20000
VLLM_RPC_PORT = 13345
DEFAULT_MODEL_PATH = "MODEL_PATH"


def launch_commands(placement: Placement, fmt: str, out: str | os.PathLike,
                    backend: str | None = None, model_path: str = DEFAULT_MODEL_PATH,
                    num_nodes: int = 1) -> list[str]:
    """The whole engine command that serves ``model_path`` with the placement file ``out``
    on the placement's G GPUs in ``num_nodes`` nodes: one command per node (node i first).

    SGLang (0.5.23): TP over all G GPUs with data-parallel attention on every GPU
    (``--attn-dp-size G``, which replaces ``--dp-size G --enable-dp-attention``) and EP over
    all G (``--ep-size G``: SGLang needs ep_size x moe_dp_size = tp_size), the map fixed
    (``--ep-dispatch-algorithm static``), and ``--nnodes``, ``--node-rank``,
    ``--dist-init-addr`` across nodes. vLLM (and vLLM-Ascend): EP size = DP x TP, so
    ``--data-parallel-size G --tensor-parallel-size 1 --enable-expert-parallel``; across
    nodes ``--data-parallel-size-local G/N`` per node, the head's ``--data-parallel-address``
    and ``--data-parallel-rpc-port``, and ``--headless --data-parallel-start-rank`` on the
    others. ``megatron`` has no launch command (an empty list).
    """
    R, G = placement.num_redundant, placement.num_gpus
    if num_nodes < 1 or G % num_nodes:
        raise InputError("--nodes", "num_nodes", f"a positive divisor of the {G} GPUs",
                         num_nodes)
    local = G // num_nodes
    if fmt == "sglang":
        backend = DEFAULT_SGLANG_BACKEND if backend is None else backend
        base = (f"{SGLANG_LAUNCH} --model-path {model_path} --tp-size {G} --attn-dp-size {G} "
                f"--ep-size {G} --moe-a2a-backend {backend} --init-expert-location {out} "
                f"--ep-num-redundant-experts {R} --ep-dispatch-algorithm static")
        if num_nodes == 1:
            return [base]
        return [f"{base} --nnodes {num_nodes} --node-rank {node} --dist-init-addr "
                f"{NODE0_ADDR}:{SGLANG_DIST_PORT}" for node in range(num_nodes)]
    if fmt == "vllm":
        config = f"--enable-eplb --eplb-config '{{\"num_redundant_experts\": {R}}}'"
    elif fmt == "vllm-ascend":
        config = (f"--additional-config '{{\"eplb_config\": {{\"expert_map_path\": \"{out}\", "
                  f"\"num_redundant_experts\": {R}}}}}'")
    else:
        return []
    base = (f"{VLLM_LAUNCH} {model_path} --enable-expert-parallel --tensor-parallel-size 1 "
            f"--data-parallel-size {G} {config}")
    if num_nodes == 1:
        return [base]
    head = (f"--data-parallel-size-local {local} --data-parallel-address {NODE0_ADDR} "
            f"--data-parallel-rpc-port {VLLM_RPC_PORT}")
    return [f"{base} {head}" + ("" if node == 0 else
                                f" --headless --data-parallel-start-rank {node * local}")
            for node in range(num_nodes)]


def engine_flags(placement: Placement, fmt: str, out: str | os.PathLike,
                 backend: str | None = None, model_path: str = DEFAULT_MODEL_PATH,
                 num_nodes: int = 1) -> str:
    """How to start the engine with ``out`` (text to print): the whole launch command per
    node (``launch_commands``) and what to know about it."""
    R, G = placement.num_redundant, placement.num_gpus
    commands = launch_commands(placement, fmt, out, backend, model_path, num_nodes)
    if len(commands) > 1:
        where = (f"on each of the {num_nodes} nodes its command; {NODE0_ADDR} = node 0's address; "
                 f"{out} must be readable at this path on every node")
        commands = [f"# node {node}\n{command}" for node, command in enumerate(commands)]
    else:
        where = ""
    if model_path == DEFAULT_MODEL_PATH:
        where = "; ".join(filter(None, [where, f"{DEFAULT_MODEL_PATH}: the model's weights"]))
    launch = "\n".join(commands) + (f"\n({where})" if where else "")
    if fmt == "sglang":
        backend = DEFAULT_SGLANG_BACKEND if backend is None else backend
        caveat = ("replicas of each expert are on distinct GPUs, as every a2a backend needs"
                  if backend != "none" else
                  "without an a2a backend; with one, export again with --backend deepep")
        return (f"sglang:\n{launch}\n({caveat}; the EP size must be the placement's GPU "
                f"count, {G}; no --enable-eplb, which would rebalance it away)")
    if fmt == "vllm":
        return (f"vllm:\n{launch}\nstarts vLLM with {R} redundant experts on {G} EP ranks "
                "(EP size = data-parallel x tensor-parallel size), which vLLM places itself: "
                f"no vLLM release loads a placement yet. {out} is the JSON list of phy2log "
                "per MoE layer that the open proposal eplb_config.initial_expert_map_path "
                f"(vLLM #49572, NOT MERGED) reads: add \"initial_expert_map_path\": \"{out}\" "
                "to --eplb-config once it lands")
    if fmt == "vllm-ascend":
        return (f"vllm-ascend:\n{launch}\n(on {G} EP devices: static EPLB of Model Runner "
                "V1)")
    return (f"megatron: expert_gpu [{placement.num_layers}, {placement.num_experts}] map in "
            f"{out}")


def write_engine_files(source: Placement | Profile, fmt: str, out: str | os.PathLike,
                       axis: LayerAxis | None = None, backend: str | None = None,
                       model_path: str = DEFAULT_MODEL_PATH, num_nodes: int = 1
                       ) -> tuple[list[Path], str]:
    """Check ``source`` against the engine's constraints, then write it in engine format
    ``fmt`` to ``out`` (and the sidecar of ``sglang``), all files or none.

    Args:
        source: a placement, or a profile for ``sglang-count``.
        fmt: one of ``FORMATS``.
        out: the file to write.
        axis: MoE layers among the hidden layers (SGLang formats); default: all MoE.
        backend: SGLang's ``--moe-a2a-backend`` for ``sglang`` (see ``check_engine``).
        model_path: the model the printed launch commands serve (a path or Hub id).
        num_nodes: nodes the printed launch commands span.

    Returns:
        the files written, and the engine flags / settings to use them (text to print).
    """
    if fmt not in FORMATS:
        raise InputError("--format", "format", f"one of {', '.join(FORMATS)}", repr(fmt))
    out = Path(out)
    if fmt.startswith("sglang") and out.suffix != ".json":
        raise InputError("-o", "output", "a path ending in .json (SGLang parses any other "
                         "--init-expert-location value as inline JSON)", str(out))
    if fmt == "vllm-ascend" and out.suffix != ".json":
        raise InputError("-o", "output", "a path ending in .json (vLLM-Ascend refuses any "
                         "other expert_map_path)", str(out))
    want_profile = fmt == "sglang-count"
    if want_profile != isinstance(source, Profile):
        raise InputError(getattr(source, "source", "<input>"), "input",
                         "a profile or trace for sglang-count" if want_profile else
                         f"a placement JSON for {fmt}")
    axis = axis or LayerAxis(source.num_layers, tuple(range(source.num_layers)))
    if want_profile:
        write_together({out: json_writer(to_sglang_count(source, axis))})
        return [out], (f"sglang: --init-expert-location {out} (SGLang balances these "
                       "logical counts itself; add --ep-num-redundant-experts R for replicas)")
    check_engine(source, fmt, backend, axis)
    flags = engine_flags(source, fmt, out, backend, model_path, num_nodes)
    if fmt == "sglang":
        meta = sidecar_path(out)
        write_together({out: json_writer(to_sglang(source, axis)),
                        meta: json_writer(sglang_sidecar(source, axis), indent=1)})
        return [out, meta], flags
    if fmt == "vllm":
        write_together({out: json_writer(to_vllm(source))})
    elif fmt == "vllm-ascend":
        write_together({out: json_writer(to_vllm_ascend(source))})
    else:
        write_npy(out, to_megatron(source))
    return [out], flags
