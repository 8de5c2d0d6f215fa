"""``linear``: contiguous placement, the default of vLLM, SGLang and Megatron.

Physical slot p holds logical expert p mod E: without replicas expert e sits on GPU
e // (E / G); the R redundant slots repeat experts 0, 1, ... as vLLM's initial map does.
"""

from __future__ import annotations

import numpy as np

from moetuner.cluster import Cluster
from moetuner.methods import PlaceOptions, SolveRecord, register
from moetuner.profile import Profile


def linear_phy2log(num_layers: int, num_experts: int, num_slots: int) -> np.ndarray:
    """``[L, P]`` contiguous map: slot p holds expert p mod E in every layer."""
    return np.tile(np.arange(num_slots) % num_experts, (num_layers, 1))


@register("linear")
def solve(profile: Profile, cluster: Cluster, options: PlaceOptions
          ) -> tuple[np.ndarray, SolveRecord]:
    slots = options.slots_per_gpu(profile.num_experts, cluster.num_gpus) * cluster.num_gpus
    return (linear_phy2log(profile.num_layers, profile.num_experts, slots),
            SolveRecord(method="linear"))
