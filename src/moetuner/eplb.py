"""A drop-in for DeepSeek EPLB's ``rebalance_experts``, backed by any moetuner method.

Code that calls ``eplb.rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_gpus)`` can call ``moetuner.eplb.rebalance_experts`` with the same arguments and get the
same tuple: numpy in -> numpy out, a torch tensor in -> int64 tensors on its device out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moetuner.cluster import make_cluster
from moetuner.methods import PlaceOptions, place
from moetuner.methods.eplb import check_arguments
from moetuner.methods.eplb import rebalance_experts as eplb_rebalance
from moetuner.profile import Profile

# The methods that take EPLB's expert groups (the others ignore the engines' num_groups).
GROUPED_METHODS = ("eplb", "eplb_fixed")


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
    method: str = "eplb", **params: Any,
) -> tuple[Any, Any, Any]:
    """Place experts EPLB-style with ``method``.

    With ``method="eplb"``, ``phy2log`` and ``logcnt`` equal DeepSeek's
    ``eplb.rebalance_experts`` whenever the loads have no ties, and ``log2phy`` lists the same
    slots per expert (the tie rule and the order among an expert's replicas:
    ``moetuner.methods.eplb``).

    Args:
        weight: ``[L, E]`` load of each logical expert (numpy array or torch tensor).
        num_replicas: physical experts per layer (P), a multiple of ``num_gpus``.
        num_groups: expert groups (EPLB's hierarchical policy when ``num_nodes`` divides it;
            used by ``eplb`` and ``eplb_fixed``, ignored by the other methods).
        num_nodes: server nodes.
        num_gpus: GPUs, a multiple of ``num_nodes``.
        method: ``eplb`` (DeepSeek's algorithm as published) or any registered method.
        params: method-specific settings (``PlaceOptions.params``), e.g. ``time_limit``.

    Returns:
        phy2log: int ``[L, P]`` logical expert in each physical slot.
        log2phy: int ``[L, E, X]`` physical slots of each expert, padded with -1, X =
            ``logcnt.max()`` (DeepSeek's width); EPLB lists an expert's original slot first,
            the other methods list slots in ascending order.
        logcnt: int ``[L, E]`` replicas of each logical expert.

    Raises:
        EplbArgumentError (an ``InputError`` and an ``AssertionError``): arguments EPLB
            cannot serve, e.g. ``num_replicas`` not a multiple of ``num_gpus``.
    """
    load = as_numpy(weight)
    check_arguments(load.shape, num_replicas, num_groups, num_nodes, num_gpus,
                    "rebalance_experts")
    if method in GROUPED_METHODS:
        result = eplb_rebalance(load, num_replicas, num_groups, num_nodes, num_gpus,
                                fixed=method == "eplb_fixed")
    else:
        time_limit = float(params.pop("time_limit", 60.0))
        options = PlaceOptions(redundant=num_replicas - load.shape[1], time_limit=time_limit,
                               params=params)
        placement, _ = place(Profile.from_load(load), make_cluster(num_gpus, num_nodes),
                             method, options)
        result = (placement.phy2log, placement.log2phy, placement.logcnt)
    return tuple(like_input(weight, np.asarray(array, dtype=np.int64)) for array in result)


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch)."""
    return type(value).__module__.split(".")[0] == "torch"


def as_numpy(weight: Any) -> np.ndarray:
    """``weight`` (numpy, list or a torch tensor on any device) as a float64 numpy array."""
    if is_tensor(weight):
        weight = weight.detach().cpu().double().numpy()
    return np.asarray(weight, dtype=np.float64)


def like_input(weight: Any, array: np.ndarray) -> Any:
    """``array`` as the type ``weight`` came in (a tensor on its device, or numpy)."""
    if not is_tensor(weight):
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(weight.device)
