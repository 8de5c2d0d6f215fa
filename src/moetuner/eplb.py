"""A drop-in for DeepSeek EPLB's ``rebalance_experts``, backed by any moetuner method.

Code that calls ``eplb.rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_gpus)`` can call ``moetuner.eplb.rebalance_experts`` with the same arguments and get the
same tuple: numpy in -> numpy out, a torch tensor in -> int64 tensors on its device out.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np

from moetuner.cluster import make_cluster
from moetuner.methods import PlaceOptions, params_class, place
from moetuner.methods.eplb import rebalance_experts as eplb_rebalance
from moetuner.profile import Profile


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
    method: str = "eplb", **params: Any,
) -> tuple[Any, Any, Any]:
    """Place experts EPLB-style with ``method``.

    Args:
        weight: ``[L, E]`` load of each logical expert (numpy array or torch tensor).
        num_replicas: physical experts per layer (P), a multiple of ``num_gpus``.
        num_groups: expert groups (EPLB's hierarchical policy; passed to other methods as the
            ``num_groups`` param).
        num_nodes: server nodes.
        num_gpus: GPUs, a multiple of ``num_nodes``.
        method: ``eplb`` (DeepSeek's algorithm as published) or any registered method.
        params: method-specific settings (``PlaceOptions.params``), e.g. ``time_limit``.

    Returns:
        phy2log: int ``[L, P]`` logical expert in each physical slot.
        log2phy: int ``[L, E, P - E + 1]`` physical slots of each expert, padded with -1.
        logcnt: int ``[L, E]`` replicas of each logical expert.
    """
    load = _to_numpy(weight)
    if method == "eplb":
        result = eplb_rebalance(load, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        E = load.shape[1]
        time_limit = float(params.pop("time_limit", 60.0))
        # The group count goes to methods that take it (their settings name it).
        names = {f.name for f in fields(params_class(method))}
        groups = {"num_groups": num_groups} if "num_groups" in names else {}
        options = PlaceOptions(redundant=num_replicas - E, time_limit=time_limit,
                               params={**groups, **params})
        placement, _ = place(Profile.from_load(load), make_cluster(num_gpus, num_nodes),
                             method, options)
        log2phy = np.full((placement.num_layers, E, num_replicas - E + 1), -1, dtype=np.int64)
        used = placement.log2phy
        log2phy[:, :, : used.shape[2]] = used
        result = (placement.phy2log, log2phy, placement.logcnt)
    return tuple(_like(weight, np.asarray(array, dtype=np.int64)) for array in result)


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


def _to_numpy(weight: Any) -> np.ndarray:
    if _is_tensor(weight):
        weight = weight.detach().cpu().double().numpy()
    return np.asarray(weight, dtype=np.float64)


def _like(weight: Any, array: np.ndarray) -> Any:
    """``array`` as the type ``weight`` came in (a tensor on its device, or numpy)."""
    if not _is_tensor(weight):
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(weight.device)
