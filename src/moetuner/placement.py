"""Placements: which expert sits in which slot of which GPU, in every MoE layer.

A placement is DeepSeek EPLB's ``phy2log [L, P]``: P = G x slots_per_gpu physical slots per
layer, slot p on GPU ``p // slots_per_gpu``, each holding one logical expert. P - E slots are
redundant replicas. Every GPU has the same number of slots in every layer, as SGLang and vLLM
require. The paper's free-size clusters (unequal experts per GPU in a layer) are held with
``allow_empty_slots``: an id of -1 marks an empty slot; no engine loads such a placement.

File format (JSON, ``"format": "moetuner.placement"``)::

    {"format": "moetuner.placement", "version": 1,
     "num_gpus": G, "num_experts": E, "slots_per_gpu": S,
     "phy2log": [[...P ids...] x L],
     "metadata": {"method": ..., "cluster": {...}, "profile": [...provenance...],
                  "objective": ..., "bound": ..., "gap": ..., "solve_time": ..., ...}}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from moetuner.errors import InputError
from moetuner.io import MAX_EXPERTS, MAX_GPUS, as_bool, as_int, int_array, read_json, write_json

FORMAT = "moetuner.placement"
VERSION = 1


@dataclass(frozen=True)
class Placement:
    """Experts in GPU slots for every MoE layer.

    Attributes:
        phy2log: int ``[L, P]`` logical expert in each physical slot; P = G * slots_per_gpu.
        num_gpus: G.
        num_experts: E (logical experts per layer).
        metadata: how the placement was made (method, cluster, provenance, objective, ...).
        allow_shared_gpu: accept two replicas of one expert on the same GPU (EPLB can make
            such placements; moetuner's own methods never do).
        allow_empty_slots: accept -1 (an empty slot) in ``phy2log``, for unequal experts per
            GPU (the paper's free cluster sizes); engines cannot load such placements.
        source: file the placement came from, for error messages.
    """

    phy2log: np.ndarray
    num_gpus: int
    num_experts: int
    metadata: dict = field(default_factory=dict)
    allow_shared_gpu: bool = False
    allow_empty_slots: bool = False
    source: str = "<memory>"

    def __post_init__(self) -> None:
        object.__setattr__(self, "phy2log", np.asarray(self.phy2log))
        self.validate()

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    @property
    def gpu_of_slot(self) -> np.ndarray:
        """``[P]`` GPU of each physical slot."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    @property
    def logcnt(self) -> np.ndarray:
        """``[L, E]`` replicas of each logical expert."""
        return self.replicas_on_gpu.sum(axis=2)

    @property
    def log2phy(self) -> np.ndarray:
        """``[L, E, X]`` physical slots of each logical expert, ascending, padded with -1;
        X = the largest replica count (EPLB's layout)."""
        L, E, P = self.num_layers, self.num_experts, self.num_slots
        counts = self.logcnt
        width = int(counts.max())
        out = np.full((L, E, width), -1, dtype=np.int64)
        empty = (self.phy2log < 0).sum(axis=1, keepdims=True)          # [L, 1] empty slots
        order = np.argsort(self.phy2log, axis=1, kind="stable")       # empties, then by expert
        experts = np.take_along_axis(self.phy2log, order, axis=1)     # [L, P] sorted expert ids
        starts = np.cumsum(counts, axis=1) - counts + empty           # [L, E] first position
        filled = experts >= 0
        rank = np.arange(P)[None, :] - np.take_along_axis(starts, np.maximum(experts, 0), axis=1)
        layer = np.repeat(np.arange(L), P).reshape(L, P)
        out[layer[filled], experts[filled], rank[filled]] = order[filled]
        return out

    @property
    def replicas_on_gpu(self) -> np.ndarray:
        """``[L, E, G]`` copies of each expert on each GPU."""
        L, E, G = self.num_layers, self.num_experts, self.num_gpus
        index = (np.arange(L)[:, None] * E + self.phy2log) * G + self.gpu_of_slot[None, :]
        index = index[self.phy2log >= 0]
        return np.bincount(index, minlength=L * E * G).reshape(L, E, G)

    def validate(self) -> None:
        """Raise ``InputError`` unless the placement is loadable by an engine."""
        src, p = self.source, self.phy2log
        if p.ndim != 2 or not np.issubdtype(p.dtype, np.integer) or not p.shape[0]:
            raise InputError(src, "phy2log", "an integer array [layers, slots], at least one layer",
                             f"{p.dtype} {list(p.shape)}")
        if self.num_gpus < 1 or self.num_experts < 1:
            raise InputError(src, "num_gpus/num_experts", "positive counts",
                             (self.num_gpus, self.num_experts))
        if p.shape[1] % self.num_gpus:
            raise InputError(src, "phy2log", f"a slot count divisible by the {self.num_gpus} GPUs",
                             p.shape[1])
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            raise InputError(src, "num_experts", f"at most {MAX_EXPERTS} experts",
                             self.num_experts)
        if p.shape[1] < self.num_experts:
            raise InputError(src, "phy2log", f"at least one slot per expert ({self.num_experts})",
                             p.shape[1])
        lowest = -1 if self.allow_empty_slots else 0
        if p.size and (p.min() < lowest or p.max() >= self.num_experts):
            raise InputError(src, "phy2log", f"expert ids in [{lowest}, {self.num_experts})",
                             f"ids in [{p.min()}, {p.max()}]")
        missing = np.argwhere(self.logcnt == 0)
        if len(missing):
            layer, expert = missing[0]
            raise InputError(src, "phy2log", "every expert in at least one slot of every layer",
                             f"expert {expert} missing in layer {layer}")
        if not self.allow_shared_gpu:
            shared = np.argwhere(self.replicas_on_gpu > 1)
            if len(shared):
                layer, expert, gpu = shared[0]
                raise InputError(src, "phy2log", "no two replicas of one expert on one GPU",
                                 f"expert {expert} twice on GPU {gpu} in layer {layer}")

    @classmethod
    def from_expert_gpu(cls, expert_gpu: np.ndarray, num_gpus: int, metadata: dict | None = None
                        ) -> Placement:
        """Build a placement without replicas from ``expert_gpu [L, E]`` (GPU of each expert).

        Every GPU must hold E / G experts in every layer; within a GPU, slots are in
        ascending expert order.
        """
        expert_gpu = np.asarray(expert_gpu, dtype=np.int64)
        L, E = expert_gpu.shape
        if expert_gpu.min() < 0 or expert_gpu.max() >= num_gpus:
            raise InputError("<expert_gpu>", "expert_gpu", f"GPU ids in [0, {num_gpus})",
                             f"[{expert_gpu.min()}, {expert_gpu.max()}]")
        counts = items_per_gpu(expert_gpu, num_gpus)
        if E % num_gpus or (counts != E // num_gpus).any():
            raise InputError("<expert_gpu>", "expert_gpu",
                             f"{E // max(num_gpus, 1)} experts on each of {num_gpus} GPUs per "
                             "layer", counts.tolist())
        experts = np.broadcast_to(np.arange(E), (L, E))
        return cls(phy2log=pack_slots(experts, expert_gpu, num_gpus), num_gpus=num_gpus,
                   num_experts=E, metadata=metadata or {})

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_gpus": self.num_gpus,
            "num_experts": self.num_experts,
            "slots_per_gpu": self.slots_per_gpu,
            "phy2log": self.phy2log.tolist(),
            "allow_shared_gpu": self.allow_shared_gpu,
            "allow_empty_slots": self.allow_empty_slots,
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the placement JSON atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, source: str = "<memory>") -> Placement:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(source, "format", f'"{FORMAT}"',
                             data.get("format") if isinstance(data, dict) else type(data).__name__)
        for key in ("num_gpus", "num_experts", "phy2log"):
            if key not in data:
                raise InputError(source, key, "a key of the placement file")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise InputError(source, "metadata", "a JSON object", type(metadata).__name__)
        placement = cls(phy2log=int_array(data["phy2log"], source, "phy2log", 2,
                                          "[layers, slots] (a rectangular list of lists)"),
                        num_gpus=as_int(data["num_gpus"], source, "num_gpus", 1, MAX_GPUS),
                        num_experts=as_int(data["num_experts"], source, "num_experts", 1,
                                           MAX_EXPERTS),
                        metadata=metadata,
                        allow_shared_gpu=as_bool(data.get("allow_shared_gpu", False), source,
                                                 "allow_shared_gpu"),
                        allow_empty_slots=as_bool(data.get("allow_empty_slots", False), source,
                                                  "allow_empty_slots"),
                        source=source)
        if "slots_per_gpu" in data and as_int(data["slots_per_gpu"], source,
                                              "slots_per_gpu") != placement.slots_per_gpu:
            raise InputError(source, "slots_per_gpu", f"{placement.slots_per_gpu} (= P / G)",
                             data["slots_per_gpu"])
        return placement


def items_per_gpu(item_gpu: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L, G]`` how many items of each layer ``item_gpu [L, n]`` puts on each GPU."""
    L = item_gpu.shape[0]
    index = np.arange(L)[:, None] * num_gpus + item_gpu
    return np.bincount(index.ravel(), minlength=L * num_gpus).reshape(L, num_gpus)


def pack_slots(item_expert: np.ndarray, item_gpu: np.ndarray, num_gpus: int) -> np.ndarray:
    """``phy2log [L, G * S]`` from physical experts and their GPUs.

    Args:
        item_expert: int ``[L, n]`` logical expert of each physical expert (replicas repeat).
        item_gpu: int ``[L, n]`` GPU of each physical expert.
        num_gpus: G.

    Each GPU's experts fill its slots in ascending expert order; S is the most items any GPU
    holds in any layer, and a GPU holding fewer has its last slots empty (-1).
    """
    item_expert = np.asarray(item_expert, dtype=np.int64)
    item_gpu = np.asarray(item_gpu, dtype=np.int64)
    num_layers, n = item_expert.shape
    held = items_per_gpu(item_gpu, num_gpus)                       # [L, G]
    slots = int(held.max())
    order = np.lexsort((item_expert, item_gpu), axis=1)            # by (gpu, expert)
    gpu_sorted = np.take_along_axis(item_gpu, order, axis=1)
    first = np.cumsum(held, axis=1) - held                         # [L, G]
    rank = np.arange(n)[None, :] - np.take_along_axis(first, gpu_sorted, axis=1)
    phy2log = np.full((num_layers, num_gpus * slots), -1, dtype=np.int64)
    np.put_along_axis(phy2log, gpu_sorted * slots + rank,
                      np.take_along_axis(item_expert, order, axis=1), axis=1)
    return phy2log


def recorded_nodes(placement: Placement) -> int | None:
    """The node count of the cluster the placement was made for (``metadata["cluster"]``),
    or None when it records none (or one of another GPU count, or not a positive integer)."""
    metadata = placement.metadata if isinstance(placement.metadata, dict) else {}
    cluster = metadata.get("cluster")
    if not isinstance(cluster, dict) or cluster.get("num_gpus") != placement.num_gpus:
        return None
    nodes = cluster.get("num_nodes")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 \
            or placement.num_gpus % nodes:
        return None
    return nodes


def load_placement(path: str | os.PathLike) -> Placement:
    """Read a placement JSON written by ``Placement.save``."""
    return Placement.from_dict(read_json(path, "a moetuner placement JSON"), source=str(path))
