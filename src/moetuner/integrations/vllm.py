"""vLLM 0.33 EPLB policies backed by moetuner's methods.

vLLM's EPLB calls ``policy.rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_global_expert_indices=None)`` on a class registered in
``vllm.distributed.eplb.policy.EPLB_POLICIES`` (selected by ``--eplb-config
'{"policy": ...}'``; 0.33 accepts only ``"default"``) and expects the physical-to-logical
map alone. ``policy(method)`` makes such a class for any registered method;
``MoetunerEplbPolicy`` is the one for ``eplb`` (DeepSeek's algorithm, as vLLM's default).

vLLM rebalances in its worker processes, so a policy has to be installed in each: set
``MOETUNER_VLLM_EPLB=METHOD`` (optionally ``MOETUNER_VLLM_EPLB_PARAMS`` = a JSON object of
method params) and moetuner's ``vllm.general_plugins`` entry point (``register_plugin``),
which vLLM loads in every process, replaces the ``default`` policy.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np

from moetuner.eplb import as_numpy, like_input, rebalance_experts
from moetuner.errors import InputError
from moetuner.methods import methods

METHOD_VARIABLE = "MOETUNER_VLLM_EPLB"
PARAMS_VARIABLE = "MOETUNER_VLLM_EPLB_PARAMS"


def keep_slots(phy2log: np.ndarray, old_phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """Reorder each GPU's slots so that experts staying on a GPU keep their old slots.

    What vLLM's default policy does after a rebalance (no weight copy for an expert that
    only moved inside a GPU): per layer and GPU, every old slot whose expert is still among
    the GPU's new experts keeps it; the GPU's other new experts fill the remaining slots in
    their new order. Applied only when the shapes match (same GPUs and slots).

    Args:
        phy2log: int ``[L, P]`` the new map.
        old_phy2log: int ``[L, P]`` the map in use.
        num_ranks: GPUs; slot p is on GPU p // (P / num_ranks).

    Returns:
        int ``[L, P]``: the new map with each GPU's experts (as a multiset) unchanged.
    """
    if old_phy2log.shape != phy2log.shape or phy2log.shape[1] % num_ranks:
        return phy2log
    L, P = phy2log.shape
    new_rows = phy2log.reshape(L * num_ranks, P // num_ranks).tolist()
    old_rows = old_phy2log.reshape(L * num_ranks, P // num_ranks).tolist()
    kept_rows = []
    for new, old in zip(new_rows, old_rows, strict=True):
        left = Counter(new)
        row: list[int | None] = []
        for expert in old:
            stays = left[expert] > 0
            row.append(expert if stays else None)
            left[expert] -= stays
        incoming = []
        for expert in new:
            if left[expert] > 0:
                incoming.append(expert)
                left[expert] -= 1
        fill = iter(incoming)
        kept_rows.append([next(fill) if expert is None else expert for expert in row])
    return np.asarray(kept_rows, dtype=np.int64).reshape(L, P)


class MoetunerEplbPolicy:
    """A vLLM EPLB policy (``AbstractEplbPolicy``'s interface) running a moetuner method.

    Attributes:
        method: the registered method that places the experts (``eplb`` here).
        params: the method's params (``PlaceOptions.params``; ``time_limit`` in seconds).
    """

    method: str = "eplb"
    params: dict = {}

    @classmethod
    def rebalance_experts(
        cls, weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int,
        old_global_expert_indices: Any = None,
    ) -> Any:
        """The physical-to-logical map for ``weight``, as vLLM's policies return it.

        Args:
            weight: ``[L, E]`` load of each logical expert (torch tensor or numpy).
            num_replicas: physical experts per layer, a multiple of ``num_ranks``.
            num_groups: the model's expert groups (EPLB's hierarchical policy).
            num_nodes: server nodes.
            num_ranks: EP ranks (GPUs), a multiple of ``num_nodes``.
            old_global_expert_indices: ``[L, num_replicas]`` the map in use, or None; when
                given, experts that stay on a GPU keep their slots (``keep_slots``).

        Returns:
            int64 ``[L, num_replicas]`` logical expert of each physical slot (a tensor on
            ``weight``'s device for a tensor ``weight``).

        Raises:
            AssertionError (``EplbArgumentError``): arguments EPLB cannot serve, as vLLM's
                default policy asserts them.
        """
        phy2log, _, _ = rebalance_experts(as_numpy(weight), num_replicas, num_groups,
                                          num_nodes, num_ranks, method=cls.method,
                                          **dict(cls.params))
        if old_global_expert_indices is not None:
            phy2log = keep_slots(phy2log, as_numpy(old_global_expert_indices).astype(np.int64),
                                 num_ranks)
        return like_input(weight, phy2log)

    @classmethod
    def preserve_intragpu_slots(cls, phy2log: np.ndarray, num_ranks: int,
                                old_phy2log: np.ndarray) -> np.ndarray:
        """``keep_slots`` under the name and argument order of vLLM's default policy (its
        tests call it)."""
        return keep_slots(np.asarray(phy2log), np.asarray(old_phy2log), num_ranks)


def policy(method: str = "eplb", **params: Any) -> type[MoetunerEplbPolicy]:
    """A ``MoetunerEplbPolicy`` subclass that places with ``method`` and ``params``."""
    if method not in methods():
        raise InputError(METHOD_VARIABLE, "method", f"one of {', '.join(methods())}",
                         repr(method))
    name = "Moetuner" + "".join(part.title() for part in method.split("_")) + "EplbPolicy"
    return type(name, (MoetunerEplbPolicy,), {"method": method, "params": dict(params),
                                               "__doc__": f"vLLM EPLB policy: {method}."})


def install(method: str = "eplb", **params: Any) -> type[MoetunerEplbPolicy]:
    """Make ``policy(method, **params)`` vLLM's ``default`` EPLB policy in this process."""
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    EPLB_POLICIES["default"] = policy(method, **params)
    return EPLB_POLICIES["default"]


def register_plugin() -> None:
    """vLLM general plugin: install the method named by ``MOETUNER_VLLM_EPLB``, if set."""
    method = os.environ.get(METHOD_VARIABLE)
    if not method:
        return
    try:
        params = json.loads(os.environ.get(PARAMS_VARIABLE) or "{}")
    except json.JSONDecodeError as exc:
        raise InputError(PARAMS_VARIABLE, "params", "a JSON object", exc) from None
    if not isinstance(params, dict):
        raise InputError(PARAMS_VARIABLE, "params", "a JSON object", type(params).__name__)
    install(method, **params)
