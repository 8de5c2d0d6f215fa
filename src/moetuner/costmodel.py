"""A cost model of the MoE layers: predicted time per engine step from a replay's counts.

This is a model, not a measurement. Every assumption is here, and every number it uses is a
field of ``CostCoefficients`` (JSON, ``--calibration FILE.json``), so a measured calibration
can replace the defaults.

Assumptions:

1. Steps. Per engine step (``moetuner.evaluate.replay_steps``) every count is the step's
   own (no scaling). ``predict`` is the whole-trace average (``--replay average``): the trace
   is served in batches of ``tokens_per_gpu_batch x G`` tokens, each seeing the trace's
   average routing (every count divided by the number of batches), which hides the
   imbalance of single steps.
2. Expert compute on a GPU takes the larger of (a) FLOPs: token-expert pairs x 2 x 3 x hidden
   x intermediate (gate, up and down projections) over ``peak_flops x compute_efficiency``
   and (b) weight reads: each active slot's weights once per step, over
   ``memory_bandwidth x memory_efficiency``. A slot is active when it received a token in
   the step (in the average: anywhere in the trace, capped by the GPU's pairs per batch).
3. A layer's compute time is its slowest GPU's; GPUs wait for each other.
4. An all-to-all exchange runs the kernel of the phase (``moetuner.engine``: DeepEP
   low-latency or NCCL EP, one message per token-expert pair; DeepEP normal, one message per
   token and GPU inside the node and per token and remote node across). It takes the
   kernel's ``latency`` plus, on its slowest GPU, max(messages sent, received) inside the
   node x message bytes over ``intra_bandwidth x intra_efficiency`` plus the same across
   nodes over ``inter_bandwidth x inter_efficiency``. Each kernel has its own latency and
   efficiencies for dispatch and for combine, fitted to the kernels' published
   measurements (``moetuner/data/kernels.json``, with its sources). Dispatch messages are
   FP8 (hidden bytes plus a 4-byte scale per 128) for DeepEP, BF16 for NCCL EP; combine
   messages are BF16.
5. Layer time = dispatch + slowest GPU's compute + combine; no overlap of communication with
   compute; attention, shared experts and the gate are not modelled (they do not depend on
   the placement).
6. ``None`` for a hardware figure means the cluster's (its GPU preset or flags).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from importlib import resources

import numpy as np

from moetuner.cluster import Cluster
from moetuner.counts import Replay
from moetuner.engine import KernelName, LayerCounts, checked
from moetuner.errors import InputError
from moetuner.io import read_json, write_json
from moetuner.models import ModelSpec

MODEL_NOTE = ("predicted by moetuner's cost model (a model, not a measurement; assumptions in "
              "moetuner/costmodel.py)")
# The constants of one direction of a kernel (dispatch or combine).
KERNEL_FIELDS = ("latency", "intra_efficiency", "inter_efficiency")
DIRECTIONS = ("dispatch", "combine")
# Kernels whose dispatch sends FP8 activations (with one float32 scale per 128 values).
FP8_DISPATCH = ("deepep-ll", "deepep-normal")


@functools.cache
def shipped_kernels() -> dict:
    """The kernel constants shipped with moetuner (``moetuner/data/kernels.json``): kernel
    -> direction -> latency (s) and intra / inter efficiency, fitted to published
    measurements (its ``provenance`` names them)."""
    text = resources.files("moetuner").joinpath("data/kernels.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class CostCoefficients:
    """Every number of the cost model (see the module docstring for how each is used).

    Attributes:
        tokens_per_gpu_batch: tokens per GPU in one batch of the whole-trace average.
        compute_efficiency: achieved / peak FLOP/s of the expert GEMMs.
        memory_efficiency: achieved / peak memory bandwidth reading expert weights.
        network_efficiency: achieved / nominal link bandwidth when expert weights move
            (online rebalancing).
        peak_flops: FLOP/s per GPU, or None for the cluster's GPU preset.
        memory_bandwidth: bytes/s per GPU, or None for the preset.
        intra_bandwidth: bytes/s per GPU per direction inside a node, or None for the cluster's.
        inter_bandwidth: bytes/s per GPU per direction across nodes, or None.
        kernels: kernel -> ``dispatch`` / ``combine`` -> ``latency`` (s), ``intra_efficiency``
            and ``inter_efficiency`` (achieved / link bandwidth); kernels or fields left out
            take the shipped values (``shipped_kernels``).
        provenance: where measured figures come from (``moetuner calibrate`` writes date,
            device, torch version and sizes here), or None; not used by the model.
    """

    tokens_per_gpu_batch: float = 256.0
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    network_efficiency: float = 0.8
    peak_flops: float | None = None
    memory_bandwidth: float | None = None
    intra_bandwidth: float | None = None
    inter_bandwidth: float | None = None
    kernels: dict | None = None
    provenance: dict | None = None

    def __post_init__(self) -> None:
        for name in ("provenance", "kernels"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise InputError("calibration", name, "a JSON object or null",
                                 type(getattr(self, name)).__name__)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("provenance", "kernels") or (value is None and f.default is None):
                continue
            _check_positive(f.name, value)
        for name in ("compute_efficiency", "memory_efficiency", "network_efficiency"):
            if getattr(self, name) > 1:
                raise InputError("calibration", name, "a fraction in (0, 1]", getattr(self, name))
        for kernel, directions in (self.kernels or {}).items():
            checked(kernel, KernelName, "calibration", "kernels")
            if not isinstance(directions, dict) or set(directions) - set(DIRECTIONS):
                raise InputError("calibration", f"kernels.{kernel}",
                                 f"an object with keys among {list(DIRECTIONS)}", directions)
            for direction, values in directions.items():
                where = f"kernels.{kernel}.{direction}"
                if not isinstance(values, dict) or set(values) - set(KERNEL_FIELDS):
                    raise InputError("calibration", where,
                                     f"an object with keys among {list(KERNEL_FIELDS)}", values)
                for name, value in values.items():
                    _check_positive(f"{where}.{name}", value, zero=name == "latency")

    def kernel(self, name: str) -> dict[str, dict[str, float]]:
        """``dispatch`` / ``combine`` -> ``KERNEL_FIELDS`` of kernel ``name``: this file's
        values over the shipped ones."""
        own = (self.kernels or {}).get(name, {})
        shipped = shipped_kernels()["kernels"][name]
        return {d: {f: float(own.get(d, {}).get(f, shipped[d][f])) for f in KERNEL_FIELDS}
                for d in DIRECTIONS}

    def resolved(self, cluster: Cluster) -> dict[str, float]:
        """The hardware figures in use: overrides where set, the cluster's otherwise."""
        defaults = {"peak_flops": cluster.gpu.peak_flops,
                    "memory_bandwidth": cluster.gpu.memory_bandwidth,
                    "intra_bandwidth": cluster.intra_bandwidth,
                    "inter_bandwidth": cluster.inter_bandwidth}
        return {name: default if getattr(self, name) is None else float(getattr(self, name))
                for name, default in defaults.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<memory>") -> CostCoefficients:
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, dict) else type(data).__name__
            raise InputError(source, "keys", f"a JSON object with keys among {sorted(known)}",
                             extra)
        try:
            return cls(**data)
        except InputError as exc:
            raise InputError(source, exc.field, exc.expected, exc.got) from None


def _check_positive(name: str, value: object, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not np.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise InputError("calibration", name, "a positive finite number", value)


def load_coefficients(path: str | os.PathLike) -> CostCoefficients:
    """Read cost coefficients from JSON (keys: the fields of ``CostCoefficients``)."""
    return CostCoefficients.from_dict(read_json(path, "a calibration JSON object"),
                                      source=str(path))


def message_bytes(kernel: str, model: ModelSpec) -> tuple[float, float]:
    """Bytes of one dispatch and one combine message (a token activation) under
    ``kernel``: FP8 with a float32 scale per 128 values for DeepEP's dispatch, BF16
    otherwise."""
    bf16 = model.token_bytes
    if kernel in FP8_DISPATCH:
        return model.hidden_size + 4 * math.ceil(model.hidden_size / 128), bf16
    return bf16, bf16


class StepCost:
    """The cost model of one model, cluster, coefficients and kernel, applied to counts of
    any leading shape (assumptions 2-5)."""

    def __init__(self, model: ModelSpec, cluster: Cluster,
                 coefficients: CostCoefficients | None = None, kernel: str = "deepep-ll"):
        c = coefficients or CostCoefficients()
        hw = c.resolved(cluster)
        self.model, self.coefficients, self.kernel = model, c, kernel
        self.num_gpus = cluster.num_gpus
        self.pair_seconds = 2 * model.expert_params / (hw["peak_flops"] * c.compute_efficiency)
        self.read_seconds = model.expert_weight_bytes / (hw["memory_bandwidth"]
                                                         * c.memory_efficiency)
        constants = c.kernel(kernel)
        # Per direction: (latency, seconds per intra-node message, per cross-node message).
        self.message_seconds = tuple(
            (constants[d]["latency"],
             size / (hw["intra_bandwidth"] * constants[d]["intra_efficiency"]),
             size / (hw["inter_bandwidth"] * constants[d]["inter_efficiency"]))
            for d, size in zip(DIRECTIONS, message_bytes(kernel, model), strict=True))

    def compute(self, pairs: np.ndarray, active: np.ndarray) -> np.ndarray:
        """``[..., G]`` seconds of expert compute per GPU from ``[..., G]`` token-expert
        pairs and active slots: the larger of the FLOP time and the weight-read time."""
        return np.maximum(pairs * self.pair_seconds, active * self.read_seconds)

    def exchange(self, messages: np.ndarray, direction: int) -> np.ndarray:
        """``[...]`` seconds of one exchange (``direction`` 0: dispatch, 1: combine) from
        ``messages [4, ..., G]`` (intra-node sent, received, cross-node sent, received):
        the kernel's latency (whenever the cluster has several GPUs: the kernel runs every
        layer) plus the slowest GPU's transfers. The same messages run backwards cost the same."""
        latency, intra, inter = self.message_seconds[direction]
        busy = (np.maximum(messages[0], messages[1]) * intra
                + np.maximum(messages[2], messages[3]) * inter)
        return busy.max(axis=-1) + (latency if self.num_gpus > 1 else 0.0)

    def layer(self, counts: LayerCounts, slots_per_gpu: int) -> np.ndarray:
        """float ``[3, S]`` seconds of dispatch, slowest GPU's compute and combine per step
        of one layer's counts."""
        compute = self.compute(counts.gpu_pairs(slots_per_gpu),
                               counts.active_slots(slots_per_gpu)).max(axis=1)
        back = counts.dispatch if counts.combine is None else counts.combine
        return np.stack([self.exchange(counts.dispatch, 0), compute, self.exchange(back, 1)])


@dataclass(frozen=True)
class CostBreakdown:
    """Predicted time of the MoE layers for one batch.

    Attributes:
        dispatch: ``[L]`` seconds of the dispatch exchange per layer.
        compute: ``[L]`` seconds of the slowest GPU's expert compute per layer.
        combine: ``[L]`` seconds of the combine exchange per layer.
        compute_per_gpu: ``[L, G]`` seconds of expert compute per GPU.
        batch_tokens: tokens in the batch.
    """

    dispatch: np.ndarray
    compute: np.ndarray
    combine: np.ndarray
    compute_per_gpu: np.ndarray
    batch_tokens: float

    @property
    def layer(self) -> np.ndarray:
        """``[L]`` seconds per layer."""
        return self.dispatch + self.compute + self.combine

    @property
    def total(self) -> float:
        """Seconds of all MoE layers for one batch."""
        return float(self.layer.sum())

    def summary(self) -> dict:
        return {"moe_time_per_batch_s": self.total, "dispatch_s": float(self.dispatch.sum()),
                "compute_s": float(self.compute.sum()), "combine_s": float(self.combine.sum()),
                "batch_tokens": self.batch_tokens}


def predict(replay: Replay, model: ModelSpec, cluster: Cluster,
            coefficients: CostCoefficients | None = None) -> CostBreakdown:
    """Predict the MoE layers' time per batch from a replay's totals, averaged over the
    trace (assumption 1), under the replay's kernel."""
    cost = StepCost(model, cluster, coefficients, replay.kernel)
    batch_tokens = cost.coefficients.tokens_per_gpu_batch * cluster.num_gpus
    scale = batch_tokens / max(replay.num_tokens, 1)
    pairs = replay.load * scale                                           # [L, G] per batch
    per_gpu = cost.compute(pairs, np.minimum(replay.active_experts, np.ceil(pairs)))
    return CostBreakdown(dispatch=cost.exchange(replay.dispatch.messages * scale, 0),
                         compute=per_gpu.max(axis=1),
                         combine=cost.exchange(replay.combine.messages * scale, 1),
                         compute_per_gpu=per_gpu, batch_tokens=batch_tokens)
