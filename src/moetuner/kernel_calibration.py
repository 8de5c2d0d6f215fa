"""The all-to-all kernels' published measurements, and the kernel constants fitted to them.

``moetuner/data/kernels.json`` holds, per kernel and direction, the cost model's latency
and its intra- and inter-node efficiencies (``moetuner.costmodel``). They are fitted here to
these public figures (read 2026-12-04):

- DeepEP low-latency kernels (github.com/deepseek-ai/DeepEP README, with NVLink inside a node
  since its PR #173): H800 (NVLink 400 GB/s both ways), ConnectX-7 400 Gb/s InfiniBand per
  GPU, 128 tokens per GPU, hidden 7168, top-8 of 256 experts, FP8 dispatch, BF16 combine.
  Times in microseconds per EP size.
- DeepEP normal kernels (same README): 4,096 tokens per GPU, same sizes; achieved bandwidth
  per GPU, NVLink inside one node (EP8), RDMA across nodes (EP16-64).
- NCCL EP low-latency (NCCL's EP benchmarks as quoted in the brief): H100, BF16 both ways,
  128 tokens per GPU, hidden 7168, top-8; achieved GB/s per GPU over all token-expert pairs.

The replay of a published setting (``published_setting``) is moetuner's own: uniform top-8
of 256 experts, the experts of each layer split over the GPUs in order (``linear``), 8 GPUs a
node, 128 tokens per GPU homed round-robin; the replay kernel counts its messages and
``StepCost`` times them. ``fit`` chooses the constants that minimise the squared log error
of those times against the published ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from moetuner.cluster import make_cluster
from moetuner.costmodel import KERNEL_FIELDS, CostCoefficients, StepCost
from moetuner.engine import EngineSettings, count_layer, replica_table
from moetuner.methods.linear import linear_phy2log
from moetuner.models import ModelSpec

# The published settings' model shape: DeepSeek-V3's experts, one MoE layer.
PUBLISHED_MODEL = ModelSpec("deepseek-v3-layer", "-", 1, (), 256, 8, 7168, 2048,
                            expert_bytes_per_param=1.0)
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Measurement:
    """One kernel's published figures.

    Attributes:
        kernel: the kernel's name (``moetuner.engine.KernelName``).
        gpu: the GPU preset of the measurement (its NVLink and NIC bandwidths).
        tokens_per_gpu: tokens each GPU dispatches.
        ep_sizes: the EP sizes measured (GPUs, 8 a node).
        dispatch, combine: seconds per EP size.
        source: where the figures come from.
    """

    kernel: str
    gpu: str
    tokens_per_gpu: int
    ep_sizes: tuple[int, ...]
    dispatch: tuple[float, ...]
    combine: tuple[float, ...]
    source: str


def _from_bandwidth(gb_per_s: tuple[float, ...], bytes_per_gpu: float) -> tuple[float, ...]:
    return tuple(bytes_per_gpu / (bw * 1e9) for bw in gb_per_s)


_LL_PAIRS = 128 * 8
MEASUREMENTS: dict[str, Measurement] = {
    "deepep-ll": Measurement(
        "deepep-ll", "h800", 128, (8, 16, 32, 64, 128, 256),
        tuple(t * 1e-6 for t in (77, 118, 155, 173, 192, 194)),
        tuple(t * 1e-6 for t in (114, 195, 273, 314, 369, 360)),
        "DeepEP README, low-latency kernels (H800, CX7 400 Gb/s, 128 tokens, hidden 7168, "
        "top-8, FP8 dispatch, BF16 combine), intra-node NVLink since PR #173"),
    "nccl": Measurement(
        "nccl", "h100", 128, (8, 16, 32, 64),
        _from_bandwidth((224, 77, 54, 49), _LL_PAIRS * 7168 * 2),
        _from_bandwidth((185, 73, 50, 44), _LL_PAIRS * 7168 * 2),
        "NCCL EP low-latency benchmarks (H100, BF16 both ways, 128 tokens per rank, hidden "
        "7168, top-8), GB/s over all token-expert pairs, as quoted in moetuner's brief"),
}
# DeepEP normal kernels: achieved GB/s per GPU (dispatch, combine), NVLink in one node and
# RDMA across nodes; the published figures are throughputs, so no latency is fitted.
NORMAL_NVLINK = (153.0, 158.0)
NORMAL_RDMA = {16: (43.0, 43.0), 32: (58.0, 57.0), 64: (51.0, 50.0)}
NORMAL_SOURCE = ("DeepEP README, normal kernels (H800, CX7 400 Gb/s, 4,096 tokens, hidden "
                 "7168, top-8, FP8 dispatch, BF16 combine): NVLink 153 / 158 GB/s at EP8, "
                 "RDMA 43 / 43, 58 / 57, 51 / 50 GB/s at EP16, 32, 64")


def published_setting(num_gpus: int, tokens_per_gpu: int = 128, seed: int = 0,
                      kernel: str = "deepep-ll"):
    """The replay counts of a published setting (module docstring) on ``num_gpus`` GPUs:
    one step of one layer.

    Returns:
        The ``LayerCounts`` of the step and the cluster (H800 presets, 8 GPUs a node).
    """
    rng = np.random.default_rng(seed)
    E, k = PUBLISHED_MODEL.num_experts, PUBLISHED_MODEL.top_k
    n = tokens_per_gpu * num_gpus
    ids = np.argsort(rng.random((n, E)), axis=1)[:, :k]                   # uniform top-k
    cluster = make_cluster(num_gpus, max(1, num_gpus // GPUS_PER_NODE), "h800")
    row = linear_phy2log(1, E, E)[0]
    slots_per_gpu = E // num_gpus
    table = replica_table(row, E, num_gpus, cluster.node_of_gpu, "even")
    counts = count_layer(ids, np.arange(n), np.arange(n) % num_gpus, np.zeros(n, np.int64),
                         1, table, slots_per_gpu, cluster.node_of_gpu,
                         EngineSettings(kernel=kernel), ordered=False)[0]
    return counts, cluster


@functools.cache
def _published_counts(measurement: Measurement) -> tuple:
    """``published_setting`` at each EP size of the measurement, on its GPU preset."""
    out = []
    for ep in measurement.ep_sizes:
        counts, cluster = published_setting(ep, measurement.tokens_per_gpu,
                                            kernel=measurement.kernel)
        out.append((counts, make_cluster(ep, cluster.num_nodes, measurement.gpu)))
    return tuple(out)


def predicted(measurement: Measurement, coefficients: CostCoefficients | None = None
              ) -> np.ndarray:
    """float ``[2, n]`` predicted dispatch and combine seconds at each EP size."""
    out = np.zeros((2, len(measurement.ep_sizes)))
    for index, (counts, cluster) in enumerate(_published_counts(measurement)):
        cost = StepCost(PUBLISHED_MODEL, cluster, coefficients, measurement.kernel)
        out[:, index] = [float(cost.exchange(counts.dispatch, d)[0]) for d in (0, 1)]
    return out


def fit(measurement: Measurement) -> dict[str, dict[str, float]]:
    """Per direction, the latency and efficiencies minimising the squared log error of
    ``predicted`` against the measurement."""
    from scipy.optimize import least_squares

    result = {}
    for d, direction in enumerate(("dispatch", "combine")):
        target = np.log(np.array([measurement.dispatch, measurement.combine][d]))

        def residual(x, d=d, direction=direction, target=target):
            constants = dict(zip(KERNEL_FIELDS, np.exp(x).tolist(), strict=True))
            coefficients = CostCoefficients(kernels={measurement.kernel: {
                direction: constants}})
            return np.log(predicted(measurement, coefficients)[d]) - target

        solved = np.exp(least_squares(residual, np.log([1e-5, 0.5, 0.8])).x)
        result[direction] = dict(zip(KERNEL_FIELDS, solved.tolist(), strict=True))
    return result
