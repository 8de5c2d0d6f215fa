"""SGLang's EPLB entry point, backed by a moetuner method.

SGLang has no EPLB plugin hook: ``--eplb-algorithm`` picks a member of a closed enum
(``deepseek``, ``deepseek_hierarchical``, ``deepseek_vec``, ..., ``auto``), and both the
initial ``logical_count`` placement and ``--enable-eplb`` rebalancing call
``sglang.srt.eplb.eplb_algorithms.rebalance_experts``. ``rebalancer(method)`` returns a
function with that signature, to be assigned to that module attribute in the SGLang server
process (e.g. from a ``sitecustomize`` on its path). moetuner's supported route into SGLang
is the placement file (``moetuner export --format sglang`` -> ``--init-expert-location``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moetuner.eplb import as_numpy, like_input, rebalance_experts
from moetuner.errors import InputError
from moetuner.methods import methods

SglangRebalance = Callable[..., tuple[Any, Any, Any]]


def rebalancer(method: str = "eplb", **params: Any) -> SglangRebalance:
    """A replacement for SGLang's ``eplb_algorithms.rebalance_experts`` placing with
    ``method`` (any registered method) and its ``params``."""
    if method not in methods():
        raise InputError("rebalancer", "method", f"one of {', '.join(methods())}",
                         repr(method))

    def rebalance(tokens_per_expert: Any, num_physical_experts: int,
                  num_local_physical_experts: int, num_groups: int | None, num_nodes: int,
                  algorithm: Any = None) -> tuple[Any, Any, Any]:
        """SGLang's signature: ``tokens_per_expert [steps, L, E]`` (or ``[L, E]``) ->
        ``(phy2log [L, P], log2phy [L, E, X], logcnt [L, E])``; ``algorithm`` is ignored
        (the method decides), a ``num_groups`` of None means one group."""
        load = as_numpy(tokens_per_expert)
        load = load.sum(axis=0) if load.ndim == 3 else load
        result = rebalance_experts(load, num_physical_experts, num_groups or 1, num_nodes,
                                   num_physical_experts // num_local_physical_experts,
                                   method=method, **params)
        return tuple(like_input(tokens_per_expert, array) for array in result)

    return rebalance
