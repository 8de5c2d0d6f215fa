"""``round_robin``: expert e on GPU e mod G (vLLM's ``round_robin`` layout).

Physical expert q (q < P) goes to GPU q mod G, local slot q // G. It holds logical expert
q mod E, shifted by one per replica round when G divides E, so that a replica never lands
on the GPU of its original.
"""

from __future__ import annotations

import numpy as np

from moetuner.cluster import Cluster
from moetuner.methods import PlaceOptions, SolveRecord, register
from moetuner.profile import Profile


def round_robin_phy2log(num_layers: int, num_experts: int, num_gpus: int, num_slots: int
                        ) -> np.ndarray:
    """``[L, P]`` map with physical expert q in slot (q mod G) * P/G + q // G."""
    physical = np.arange(num_slots)
    slot = (physical % num_gpus) * (num_slots // num_gpus) + physical // num_gpus
    row = np.empty(num_slots, dtype=np.int64)
    shift = (physical // num_experts) * (num_experts % num_gpus == 0 and num_gpus > 1)
    row[slot] = (physical + shift) % num_experts
    return np.tile(row, (num_layers, 1))


@register("round_robin")
def solve(profile: Profile, cluster: Cluster, options: PlaceOptions
          ) -> tuple[np.ndarray, SolveRecord]:
    slots = options.slots_per_gpu(profile.num_experts, cluster.num_gpus) * cluster.num_gpus
    return (round_robin_phy2log(profile.num_layers, profile.num_experts, cluster.num_gpus, slots),
            SolveRecord(method="round_robin"))
