"""A cost model of the MoE layers: predicted time per token batch from a replay's counts.

This is a model, not a measurement. Every assumption is here, and every number it uses is a
field of ``CostCoefficients`` (JSON, ``--calibration FILE.json``), so a measured calibration
can replace the defaults.

Assumptions:

1. Steps. Per engine step (``moetuner.evaluate.replay_steps``) every count is the step's
   own (no scaling): compute and exchanges below use that step's pairs, active slots and
   messages. ``predict`` is the whole-trace average (``--batching none``): the trace is
   served in batches of ``tokens_per_gpu_batch x G`` tokens, each seeing the trace's
   average routing (every count divided by the number of batches), which hides the
   imbalance of single steps.
2. Expert compute on a GPU takes the larger of (a) FLOPs: token-expert pairs x 2 x 3 x hidden
   x intermediate (gate, up and down projections) over ``peak_flops x compute_efficiency``
   and (b) weight reads: each active expert's weights once per batch, over
   ``memory_bandwidth x memory_efficiency``. Per step, a slot is active when it received a
   token in the step; in the average, when it received one anywhere in the trace, capped
   by the GPU's token-expert pairs per batch.
3. A layer's compute time is its slowest GPU's; GPUs wait for each other.
4. An all-to-all exchange takes, on its slowest GPU, max(bytes sent, bytes received) inside
   the node over ``intra_bandwidth`` plus max(sent, received) across nodes over
   ``inter_bandwidth`` (both x ``network_efficiency``; links are full duplex, NVLink and
   network do not overlap), plus ``inter_latency`` when anything crosses nodes, else
   ``intra_latency`` when anything moves, else nothing. Cross-node bytes are DeepEP's: one
   message per token and remote node (NVLink forwarding inside the destination node is not
   charged). A message is one token activation (hidden x activation bytes).
5. Layer time = dispatch + slowest GPU's compute + combine; no overlap of communication with
   compute; attention, shared experts and the gate are not modelled (they do not depend on
   the placement).
6. ``None`` for a hardware figure means the cluster's (its GPU preset or flags).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

import numpy as np

from moetuner.cluster import Cluster
from moetuner.counts import Exchange, Replay
from moetuner.errors import InputError
from moetuner.io import read_json, write_json
from moetuner.models import ModelSpec

MODEL_NOTE = ("predicted by moetuner's cost model (a model, not a measurement; assumptions in "
              "moetuner/costmodel.py)")


@dataclass(frozen=True)
class CostCoefficients:
    """Every number of the cost model (see the module docstring for how each is used).

    Attributes:
        tokens_per_gpu_batch: tokens per GPU in one batch (a batch is this x G tokens).
        compute_efficiency: achieved / peak FLOP/s of the expert GEMMs.
        memory_efficiency: achieved / peak memory bandwidth reading expert weights.
        network_efficiency: achieved / nominal bandwidth of all-to-all transfers.
        peak_flops: FLOP/s per GPU, or None for the cluster's GPU preset.
        memory_bandwidth: bytes/s per GPU, or None for the preset.
        intra_bandwidth: bytes/s per GPU per direction inside a node, or None for the cluster's.
        inter_bandwidth: bytes/s per GPU per direction across nodes, or None.
        intra_latency: seconds per exchange inside a node, or None.
        inter_latency: seconds per exchange across nodes, or None.
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
    intra_latency: float | None = None
    inter_latency: float | None = None
    provenance: dict | None = None

    def __post_init__(self) -> None:
        if self.provenance is not None and not isinstance(self.provenance, dict):
            raise InputError("calibration", "provenance", "a JSON object or null",
                             type(self.provenance).__name__)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "provenance":
                continue
            if value is None and f.default is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not np.isfinite(value) or value < 0 or (
                    value == 0 and not f.name.endswith("latency")):
                raise InputError("calibration", f.name, "a positive finite number", value)
        for name in ("compute_efficiency", "memory_efficiency", "network_efficiency"):
            if getattr(self, name) > 1:
                raise InputError("calibration", name, "a fraction in (0, 1]", getattr(self, name))

    def resolved(self, cluster: Cluster) -> dict[str, float]:
        """The hardware figures in use: overrides where set, the cluster's otherwise."""
        defaults = {"peak_flops": cluster.gpu.peak_flops,
                    "memory_bandwidth": cluster.gpu.memory_bandwidth,
                    "intra_bandwidth": cluster.intra_bandwidth,
                    "inter_bandwidth": cluster.inter_bandwidth,
                    "intra_latency": cluster.intra_latency,
                    "inter_latency": cluster.inter_latency}
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


def load_coefficients(path: str | os.PathLike) -> CostCoefficients:
    """Read cost coefficients from JSON (keys: the fields of ``CostCoefficients``)."""
    return CostCoefficients.from_dict(read_json(path, "a calibration JSON object"),
                                      source=str(path))


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


def predict(
    replay: Replay,
    model: ModelSpec,
    cluster: Cluster,
    coefficients: CostCoefficients | None = None,
) -> CostBreakdown:
    """Predict the MoE layers' time per batch from a replay (assumptions: module docstring)."""
    c = coefficients or CostCoefficients()
    hw = c.resolved(cluster)
    batch_tokens = c.tokens_per_gpu_batch * cluster.num_gpus
    scale = batch_tokens / max(replay.num_tokens, 1)
    pairs = replay.load * scale                                           # [L, G] per batch
    per_gpu = gpu_compute_time(pairs, np.minimum(replay.active_experts, np.ceil(pairs)),
                               model, hw, c)
    bytes_per_message = model.token_bytes * scale
    return CostBreakdown(
        dispatch=_exchange_time(replay.dispatch, cluster, hw, c, bytes_per_message),
        compute=per_gpu.max(axis=1),
        combine=_exchange_time(replay.combine, cluster, hw, c, bytes_per_message),
        compute_per_gpu=per_gpu,
        batch_tokens=batch_tokens,
    )


def gpu_compute_time(pairs: np.ndarray, active: np.ndarray, model: ModelSpec,
                     hw: dict[str, float], c: CostCoefficients) -> np.ndarray:
    """Seconds of expert compute per GPU (assumption 2), for any leading shape.

    Args:
        pairs: ``[..., G]`` token-expert pairs each GPU computes.
        active: ``[..., G]`` slots of each GPU that compute at least one token (their
            weights are read once).
        hw: ``CostCoefficients.resolved(cluster)``.

    Returns:
        ``[..., G]`` seconds: the larger of the FLOP time and the weight-read time.
    """
    flop_time = pairs * (2 * model.expert_params / (hw["peak_flops"] * c.compute_efficiency))
    read_time = active * (model.expert_weight_bytes / (hw["memory_bandwidth"]
                                                       * c.memory_efficiency))
    return np.maximum(flop_time, read_time)


def exchange_time(intra_sent: np.ndarray, intra_received: np.ndarray, node_sent: np.ndarray,
                  node_received: np.ndarray, hw: dict[str, float], c: CostCoefficients,
                  bytes_per_message: float) -> np.ndarray:
    """Seconds of one all-to-all exchange (assumption 4), for any leading shape.

    Args:
        intra_sent, intra_received: ``[..., G]`` messages each GPU sends / receives inside
            its node.
        node_sent, node_received: ``[..., G]`` cross-node messages (DeepEP's, one per token
            and remote node) each GPU sends / receives.
        hw: ``CostCoefficients.resolved(cluster)``.
        bytes_per_message: bytes of one message (a token activation).

    Returns:
        ``[...]`` seconds on the slowest GPU plus the exchange's latency.
    """
    intra_busy = np.maximum(intra_sent, intra_received) * bytes_per_message
    inter_busy = np.maximum(node_sent, node_received) * bytes_per_message
    per_gpu = (intra_busy / (hw["intra_bandwidth"] * c.network_efficiency)
               + inter_busy / (hw["inter_bandwidth"] * c.network_efficiency))
    latency = np.where(inter_busy.any(axis=-1), hw["inter_latency"],
                       np.where(intra_busy.any(axis=-1), hw["intra_latency"], 0.0))
    return per_gpu.max(axis=-1) + latency


def _exchange_time(exchange: Exchange, cluster: Cluster, hw: dict[str, float],
                   c: CostCoefficients, bytes_per_message: float) -> np.ndarray:
    """``[L]`` seconds of one exchange per layer (assumption 4)."""
    node = cluster.node_of_gpu
    same_node = node[:, None] == node[None, :]
    intra = np.where(same_node, exchange.tokens, 0)                          # [L, G, G]
    return exchange_time(intra.sum(axis=2), intra.sum(axis=1), exchange.node_sent,
                         exchange.node_received, hw, c, bytes_per_message)
