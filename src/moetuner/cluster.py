"""Cluster specs: GPUs, nodes and the links between them.

GPU presets use the vendors' public datasheet figures (dense BF16 tensor FLOP/s without
sparsity, HBM bandwidth, memory) for the SXM parts. ``intra_bandwidth`` is the NVLink
bandwidth per GPU in one direction (half the bidirectional figure NVIDIA quotes);
``inter_bandwidth`` is one 400 Gb/s NIC per GPU (ConnectX-7 NDR InfiniBand, as in DGX/HGX
H100, H200 and B200 nodes; 200 Gb/s HDR for A100), i.e. about 9x below NVLink on H100.
The all-to-all kernels' latencies and achieved bandwidths are the cost model's
(``moetuner.costmodel``, fitted to published measurements).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from moetuner.errors import InputError
from moetuner.io import MAX_GPUS


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model.

    Attributes:
        name: preset name.
        peak_flops: dense BF16 tensor-core FLOP/s.
        memory_bandwidth: HBM bytes/s.
        memory_bytes: HBM capacity in bytes.
        nvlink_bandwidth: NVLink bytes/s per GPU per direction.
        network_bandwidth: inter-node bytes/s per GPU per direction.
    """

    name: str
    peak_flops: float
    memory_bandwidth: float
    memory_bytes: float
    nvlink_bandwidth: float
    network_bandwidth: float


GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in [
        GPUSpec("h100", 989e12, 3.35e12, 80e9, 450e9, 50e9),
        # H800: the H100 with NVLink cut to 400 GB/s both ways (DeepEP's published runs).
        GPUSpec("h800", 989e12, 3.35e12, 80e9, 200e9, 50e9),
        GPUSpec("h200", 989e12, 4.8e12, 141e9, 450e9, 50e9),
        GPUSpec("a100", 312e12, 2.039e12, 80e9, 300e9, 25e9),
        GPUSpec("b200", 2.25e15, 8.0e12, 180e9, 900e9, 50e9),
    ]
}


@dataclass(frozen=True)
class Cluster:
    """GPUs grouped into equal nodes; GPU g sits on node g // gpus_per_node.

    Attributes:
        num_gpus: expert-parallel GPUs (G).
        num_nodes: nodes (N), dividing G.
        gpu: the GPU model.
        intra_bandwidth: bytes/s per GPU per direction between GPUs of one node.
        inter_bandwidth: bytes/s per GPU per direction between nodes.
    """

    num_gpus: int
    num_nodes: int
    gpu: GPUSpec
    intra_bandwidth: float
    inter_bandwidth: float

    def __post_init__(self) -> None:
        if not 1 <= self.num_gpus <= MAX_GPUS:
            raise InputError("--gpus", "num_gpus", f"a GPU count in [1, {MAX_GPUS}]",
                             self.num_gpus)
        if self.num_nodes < 1 or self.num_gpus % self.num_nodes:
            raise InputError("--nodes", "num_nodes",
                             f"a positive divisor of the {self.num_gpus} GPUs", self.num_nodes)
        for name, flag in (("intra_bandwidth", "--intra-bw"), ("inter_bandwidth", "--inter-bw")):
            if not 0 < getattr(self, name) < np.inf:
                raise InputError(flag, name, "a positive finite bandwidth",
                                 getattr(self, name))

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    @property
    def node_of_gpu(self) -> np.ndarray:
        """``[G]`` node index of each GPU."""
        return np.arange(self.num_gpus) // self.gpus_per_node

    @property
    def bandwidth_ratio(self) -> float:
        """How many times slower a byte crosses nodes than it moves inside one."""
        return self.intra_bandwidth / self.inter_bandwidth

    def link_cost(self) -> np.ndarray:
        """``[G, G]`` relative cost of moving one token between GPUs: 0 on the same GPU, 1 inside
        a node, ``bandwidth_ratio`` across nodes."""
        node = self.node_of_gpu
        same_node = node[:, None] == node[None, :]
        cost = np.where(same_node, 1.0, self.bandwidth_ratio)
        np.fill_diagonal(cost, 0.0)
        return cost

    def to_dict(self) -> dict:
        return asdict(self)


def make_cluster(
    gpus: int,
    nodes: int = 1,
    gpu: str = "h100",
    intra_bandwidth: float | None = None,
    inter_bandwidth: float | None = None,
) -> Cluster:
    """Build a cluster from the command line's flags (bandwidths default to the GPU preset)."""
    try:
        spec = GPUS[gpu.lower()]
    except KeyError:
        raise InputError("--gpu", "name", f"one of {', '.join(GPUS)}", repr(gpu)) from None
    cluster = Cluster(gpus, nodes, spec, spec.nvlink_bandwidth, spec.network_bandwidth)
    overrides = {k: v for k, v in (("intra_bandwidth", intra_bandwidth),
                                   ("inter_bandwidth", inter_bandwidth)) if v is not None}
    return replace(cluster, **overrides) if overrides else cluster
