"""Online rebalancing, as vLLM and SGLang run EPLB while serving: the policy and what its
moves cost.

Every ``interval`` engine steps the engine re-places the experts from the loads of the last
``window`` steps; the first interval runs on the initial placement. Engine defaults
(``PRESETS``): vLLM ``--eplb-config`` ``window_size`` 1000, ``step_interval`` 3000; SGLang
``--eplb-rebalance-num-iterations`` 1000 with a recorder buffer
(``--expert-distribution-recorder-buffer-size``) that defaults to the same 1000.

A policy is a plain callable ``rebalance(window_load [L, E], old_phy2log [L, P]) -> new
phy2log [L, P]`` (``Rebalance``): ``method_rebalancer`` builds one from any registered
placement method; a policy that limits moves using the old map plugs in unchanged. The
replay itself is ``moetuner.evaluate.evaluate_online``.

Moves: a slot whose logical expert changes receives that expert's weights
(``model.expert_weight_bytes``). A copy already on the receiving GPU moves nothing over a
link; one on the receiving GPU's node comes over NVLink (``intra_bandwidth``); otherwise it
crosses nodes (``inter_bandwidth``), since the engines move weights with point-to-point
sends between ranks. Each GPU receives its slots' weights one after another (both links x
``network_efficiency``); a rebalance lasts as long as its slowest GPU. Senders are not
charged (a popular expert has several copies to send from).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from moetuner.cluster import Cluster
from moetuner.costmodel import CostCoefficients
from moetuner.errors import InputError
from moetuner.methods import PlaceOptions, methods, place
from moetuner.models import ModelSpec
from moetuner.profile import Profile
from moetuner.steps import Steps
from moetuner.trace import Trace

# Engine defaults: (window, interval) in steps.
PRESETS = {"vllm": (1000, 3000), "sglang": (1000, 1000)}

# Tokens counted at once by window_load (memory bound).
CHUNK_TOKENS = 65536

Rebalance = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class OnlinePolicy:
    """When and how the engine re-places experts while serving.

    Attributes:
        rebalance: ``(window_load [L, E], old_phy2log [L, P]) -> new phy2log [L, P]``.
        window: steps whose loads a rebalance sees (the last ``window`` before it).
        interval: steps between rebalances (the first after ``interval`` steps).
        name: for reports (e.g. ``online eplb``).
    """

    rebalance: Rebalance
    window: int
    interval: int
    name: str = "online"

    def __post_init__(self) -> None:
        for flag, value in (("--window", self.window), ("--interval", self.interval)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise InputError(flag, flag.lstrip("-"), "a positive number of steps", value)


def method_rebalancer(method: str, cluster: Cluster, options: PlaceOptions | None = None
                      ) -> Rebalance:
    """A ``Rebalance`` that re-places with a registered method from the window's loads
    (keeping the old map's slot count; the old map itself is not used)."""
    options = options or PlaceOptions()
    if method not in methods():
        raise InputError("--online", "method", f"one of {', '.join(methods())}", repr(method))

    def rebalance(window_load: np.ndarray, old_phy2log: np.ndarray) -> np.ndarray:
        redundant = old_phy2log.shape[1] - window_load.shape[1]
        profile = Profile.from_load(window_load, source="online window")
        return place(profile, cluster, method, replace(options, redundant=redundant))[0].phy2log

    return rebalance


def online_policy(method: str, cluster: Cluster, preset: str = "vllm",
                  window: int | None = None, interval: int | None = None,
                  options: PlaceOptions | None = None) -> OnlinePolicy:
    """The online policy of ``method`` with an engine's defaults (``PRESETS``) where
    ``window`` or ``interval`` is not given."""
    if preset not in PRESETS:
        raise InputError("--online-preset", "preset", f"one of {', '.join(PRESETS)}",
                         repr(preset))
    default_window, default_interval = PRESETS[preset]
    return OnlinePolicy(method_rebalancer(method, cluster, options),
                        default_window if window is None else window,
                        default_interval if interval is None else interval,
                        name=f"online {method}")


def window_load(trace: Trace, steps: Steps, first: int, last: int) -> np.ndarray:
    """float ``[L, E]`` token-expert pairs of steps ``[first, last)`` per layer and expert."""
    tokens = steps.order[steps.bounds[first]:steps.bounds[last]]
    L, E = trace.num_layers, trace.num_experts
    load = np.zeros(L * E, dtype=np.int64)
    layer_offset = np.arange(L)[None, :, None] * E
    for start in range(0, tokens.size, CHUNK_TOKENS):                 # bounded memory
        ids = trace.topk_ids[tokens[start:start + CHUNK_TOKENS]]         # [n, L, k]
        load += np.bincount((layer_offset + ids).ravel(), minlength=L * E)
    return load.reshape(L, E).astype(np.float64)


def move_cost(old_phy2log: np.ndarray, new_phy2log: np.ndarray, cluster: Cluster,
              model: ModelSpec, coefficients: CostCoefficients | None = None
              ) -> tuple[int, float]:
    """Experts moved (slots whose logical expert changed) and the seconds to move their
    weights (module docstring).

    Args:
        old_phy2log, new_phy2log: int ``[L, P]`` before and after; -1 marks an empty slot.
    """
    c = coefficients or CostCoefficients()
    hw = c.resolved(cluster)
    L, P = new_phy2log.shape
    G = cluster.num_gpus
    gpu = np.arange(P) // (P // G)                                        # [P]
    node = cluster.node_of_gpu[gpu]
    changed = (new_phy2log != old_phy2log) & (new_phy2log >= 0)          # [L, P]
    # held[l, p, q]: the old map has slot p's new expert in slot q.
    held = old_phy2log[:, None, :] == new_phy2log[:, :, None]            # [L, P, P]
    on_gpu = (held & (gpu[None, None, :] == gpu[None, :, None])).any(axis=2)
    on_node = (held & (node[None, None, :] == node[None, :, None])).any(axis=2)
    over_nvlink = changed & ~on_gpu & on_node
    over_network = changed & ~on_node
    seconds_per_copy = model.expert_weight_bytes / c.network_efficiency
    per_gpu = (np.bincount(gpu, weights=over_nvlink.sum(axis=0), minlength=G)
               * seconds_per_copy / hw["intra_bandwidth"]
               + np.bincount(gpu, weights=over_network.sum(axis=0), minlength=G)
               * seconds_per_copy / hw["inter_bandwidth"])
    return int(changed.sum()), float(per_gpu.max()) if G else 0.0


@dataclass(frozen=True)
class Moves:
    """What online rebalancing moved.

    Attributes:
        at_step: int ``[R]`` step from which each rebalance's map serves.
        experts_moved: int ``[R]`` slots whose logical expert changed.
        seconds: float ``[R]`` time to move the weights (module docstring).
        expert_bytes: bytes of one expert's weights.
        num_steps: steps replayed (to amortise over).
    """

    at_step: np.ndarray
    experts_moved: np.ndarray
    seconds: np.ndarray
    expert_bytes: float
    num_steps: int

    @property
    def bytes_moved(self) -> float:
        return float(self.experts_moved.sum()) * self.expert_bytes

    def summary(self) -> dict:
        total = float(self.seconds.sum())
        return {"rebalances": int(self.at_step.size),
                "experts_moved": int(self.experts_moved.sum()),
                "bytes_moved": self.bytes_moved, "move_time_s": total,
                "move_time_per_step_s": total / self.num_steps if self.num_steps else 0.0}
