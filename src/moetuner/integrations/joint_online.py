"""``joint`` as an online EPLB policy: live loads, affinity learned offline, few moves.

Engines rebalance while serving from a window of recent expert loads. This policy keeps
what a profile learned offline (which experts a token chooses together, ``coactivation``)
and rebalances with the live loads, starting from the current map and moving at most
``max_moves`` slots per layer per rebalance (a slot moves when its expert changes).

Per layer it minimises, by greedy moves from the current map,

    max_g load[g] / mean_g load[g]  +  affinity * cross-node co-activation share

where ``load[g]`` is GPU g's live load (an expert's load split evenly over its replicas, as
vLLM's hashing does) and the cross-node share is the fraction of the offline co-activation
(token pairs of chosen experts) whose two experts sit on different nodes (each costs a
DeepEP message). These are the terms of ``joint``'s objective that a window of loads can
tell: a step waits for its busiest GPU, and only kernels that send one message per token and
node (DeepEP normal) reward co-activated experts on one node, so on the pair kernels
(DeepEP low-latency, NCCL EP: ``kernel``) the affinity term is off. Moves: swapping two
slots' experts between GPUs (2 slots moved) and giving a replica slot of the expert with the
least load per copy to the one with the most (1 slot moved); a move is kept only when it
lowers the layer's score.

Entry points (all return only the physical-to-logical map):

- ``JointOnline(config).rebalance(window_load [L, E], old_phy2log [L, P]) -> [L, P]``: numpy;
  the callable the evaluator's ``--online`` replay takes.
- ``vllm_policy(config)``: a class for vLLM 0.33's EPLB policy interface (``rebalance_experts(
  weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices=None)``,
  torch tensors in, the ``[L, P]`` map out on the input's device). ``JointEplbPolicy`` is
  that class configured from the ``MOETUNER_JOINT_CONFIG`` environment variable (a JSON file
  with ``JointOnlineConfig``'s fields).
- ``sglang_rebalance_experts(tokens_per_expert, num_physical_experts,
  num_local_physical_experts, num_groups, num_nodes, ...)``: SGLang has no algorithm hook
  (``sglang.srt.eplb.eplb_algorithms.rebalance_experts`` dispatches on a fixed
  ``EplbAlgorithm`` enum chosen by ``--eplb-algorithm``); this has the same signature and
  returns the same ``(phy2log, log2phy, logcnt)`` tuple, for a caller that patches that
  function. It has no previous map, so it starts from ``eplb_fixed`` on the live loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from moetuner.engine import PAIR_KERNELS, KernelName, checked
from moetuner.eplb import as_numpy, like_input
from moetuner.errors import InputError
from moetuner.io import read_json
from moetuner.methods.eplb import rebalance_experts as eplb_rebalance
from moetuner.profile import load_profile

CONFIG_ENV = "MOETUNER_JOINT_CONFIG"


@dataclass(frozen=True)
class JointOnlineConfig:
    """Settings of the online policy.

    Attributes:
        profile: profile ``.npz`` learned offline (its ``coactivation`` is the affinity), or
            None (no affinity: live balance only).
        max_moves: slots whose expert may change per layer per rebalance.
        affinity: weight of the cross-node co-activation share against the load ratio.
        num_gpus: GPUs of the cluster when the caller does not say (``rebalance`` called
            with two arguments, as the evaluator's online replay does); None: the caller must.
        num_nodes: nodes of the cluster when the caller does not say.
        kernel: the all-to-all kernel the cluster runs (``deepep-ll`` for decode,
            ``deepep-normal`` for prefill, ``nccl``); the affinity counts on
            ``deepep-normal`` only.
    """

    profile: str | None = None
    max_moves: int = 8
    affinity: float = 0.25
    num_gpus: int | None = None
    num_nodes: int = 1
    kernel: str = "deepep-ll"

    def __post_init__(self) -> None:
        if isinstance(self.max_moves, bool) or not isinstance(self.max_moves, int) \
                or self.max_moves < 0:
            raise InputError("joint online config", "max_moves", "an integer >= 0",
                             self.max_moves)
        if not isinstance(self.affinity, int | float) or not self.affinity >= 0:
            raise InputError("joint online config", "affinity", "a number >= 0", self.affinity)
        checked(self.kernel, KernelName, "joint online config", "kernel")
        for name in ("num_gpus", "num_nodes"):
            value = getattr(self, name)
            if value is None and name == "num_gpus":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError("joint online config", name, "an integer >= 1", value)

    @property
    def node_affinity(self) -> float:
        """The affinity weight in force: 0 on kernels that send one message per pair."""
        return 0.0 if self.kernel in PAIR_KERNELS else float(self.affinity)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> JointOnlineConfig:
        data = read_json(path, "a joint online config JSON object")
        known = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or set(data) - known:
            raise InputError(path, "keys", f"a JSON object with keys among {sorted(known)}",
                             sorted(set(data) - known) if isinstance(data, dict) else data)
        return cls(**data)


class JointOnline:
    """The online policy with its offline affinity loaded once (module docstring)."""

    def __init__(self, config: JointOnlineConfig) -> None:
        self.config = config
        self.coactivation = None
        if config.profile is not None:
            profile = load_profile(config.profile)
            if profile.coactivation is None:
                raise InputError(config.profile, "coactivation",
                                 "a profile with co-activation counts (profile a trace)")
            coact = profile.coactivation.astype(np.float64)
            index = np.arange(coact.shape[1])
            coact[:, index, index] = 0.0
            self.coactivation = coact                                   # [L, E, E]

    def rebalance(self, window_load: np.ndarray, old_phy2log: np.ndarray,
                  num_gpus: int | None = None, num_nodes: int | None = None,
                  max_moves: int | None = None) -> np.ndarray:
        """The new map ``[L, P]`` from live loads ``window_load [L, E]`` and the current map
        ``old_phy2log [L, P]`` (G and N default to the config's; ``max_moves`` overrides
        the config's)."""
        load = np.asarray(window_load, dtype=np.float64)
        old = np.asarray(old_phy2log, dtype=np.int64)
        L, E = load.shape
        if old.ndim != 2 or old.shape[0] != L or old.min() < 0 or old.max() >= E:
            raise InputError("old_phy2log", "phy2log", f"[{L}, P] expert ids below {E}",
                             list(old.shape))
        G = num_gpus or self.config.num_gpus
        N = num_nodes or self.config.num_nodes
        if G is None:
            raise InputError("joint online config", "num_gpus",
                             "the cluster's GPUs (config or argument)")
        if old.shape[1] % G or G % N:
            raise InputError("old_phy2log", "num_gpus", f"G dividing P = {old.shape[1]} and "
                             f"a multiple of N = {N}", G)
        if self.coactivation is not None and self.coactivation.shape[:2] != (L, E):
            raise InputError(self.config.profile, "coactivation",
                             f"[{L}, {E}, {E}] (the live loads' shape)",
                             list(self.coactivation.shape))
        out = old.copy()
        for layer in range(L):
            coact = None if self.coactivation is None else self.coactivation[layer]
            out[layer] = improve_layer(load[layer], old[layer], G, N, coact,
                                       self.config.node_affinity,
                                       self.config.max_moves if max_moves is None
                                       else max_moves)
        return out

    __call__ = rebalance


def layer_score(load: np.ndarray, row: np.ndarray, num_gpus: int, num_nodes: int,
                coact: np.ndarray | None, affinity: float) -> float:
    """The score of one layer's ``row [P]`` (module docstring) under ``load [E]``."""
    E = load.size
    copies = np.bincount(row, minlength=E)
    gpu = np.arange(row.size) // (row.size // num_gpus)
    per_gpu = np.bincount(gpu, weights=load[row] / copies[row], minlength=num_gpus)
    mean = per_gpu.mean()
    score = per_gpu.max() / mean if mean > 0 else 1.0
    if coact is not None and num_nodes > 1 and coact.sum() > 0:
        node = gpu // (num_gpus // num_nodes)
        share = np.zeros((E, num_nodes))
        np.add.at(share, (row, node), 1.0 / copies[row])                   # [E, N]
        together = float(np.einsum("ef,en,fn->", coact, share, share))
        score += affinity * (1.0 - together / coact.sum())
    return float(score)


def improve_layer(load: np.ndarray, row: np.ndarray, num_gpus: int, num_nodes: int,
                  coact: np.ndarray | None, affinity: float, max_moves: int) -> np.ndarray:
    """Greedy best-improving moves on one layer from ``row [P]``, moving at most
    ``max_moves`` slots (module docstring); copies of an expert stay on distinct GPUs."""
    row = row.copy()
    P = row.size
    gpu = np.arange(P) // (P // num_gpus)
    moved = np.zeros(P, dtype=bool)
    best = layer_score(load, row, num_gpus, num_nodes, coact, affinity)
    while int(moved.sum()) < max_moves:
        candidates = _candidate_moves(load, row, gpu, num_gpus, max_moves - int(moved.sum()))
        chosen = None
        for slots, experts in candidates:
            trial = row.copy()
            trial[slots] = experts
            score = layer_score(load, trial, num_gpus, num_nodes, coact, affinity)
            if score < best - 1e-12:
                chosen, best = (slots, trial), score
        if chosen is None:
            break
        slots, row = chosen
        moved[slots] = True
    return row


def _candidate_moves(load: np.ndarray, row: np.ndarray, gpu: np.ndarray, num_gpus: int,
                     budget: int) -> list[tuple[list[int], list[int]]]:
    """Moves touching the busiest GPU: swaps of its slots with every slot elsewhere (when
    ``budget`` >= 2) and replica moves from the least to the most loaded-per-copy expert."""
    E = load.size
    copies = np.bincount(row, minlength=E)
    per_gpu = np.bincount(gpu, weights=load[row] / copies[row], minlength=num_gpus)
    busiest = int(per_gpu.argmax())
    holds = np.zeros((E, num_gpus), dtype=bool)
    holds[row, gpu] = True
    moves = []
    if budget >= 2:
        for s in np.flatnonzero(gpu == busiest):
            for t in np.flatnonzero(gpu != busiest):
                if row[s] != row[t] and not holds[row[s], gpu[t]] and not holds[row[t], busiest]:
                    moves.append(([int(s), int(t)], [int(row[t]), int(row[s])]))
    per_copy = load / np.maximum(copies, 1)
    for s in np.flatnonzero(copies[row] > 1):
        hottest = [e for e in np.argsort(-per_copy) if not holds[e, gpu[s]]][:1]
        if hottest and per_copy[hottest[0]] > per_copy[row[s]]:
            moves.append(([int(s)], [int(hottest[0])]))
    return moves


def vllm_policy(config: JointOnlineConfig) -> type:
    """A class with vLLM 0.33's EPLB policy method, bound to ``config``."""
    policy = JointOnline(config)

    class JointPolicy:
        @classmethod
        def rebalance_experts(cls, weight: Any, num_replicas: int, num_groups: int,
                              num_nodes: int, num_ranks: int,
                              old_global_expert_indices: Any = None) -> Any:
            """``phy2log [L, num_replicas]`` (a tensor like ``weight``); ``num_groups`` is
            not used (the affinity comes from the profile)."""
            load = as_numpy(weight)
            if old_global_expert_indices is None:
                # No current map: start from EPLB (no replicas on one GPU); nothing to keep.
                old = eplb_rebalance(load, num_replicas, 1, 1, num_ranks, fixed=True)[0]
                moves = num_replicas
            else:
                old, moves = as_numpy(old_global_expert_indices).astype(np.int64), None
            return like_input(weight, np.asarray(
                policy.rebalance(load, old, num_ranks, num_nodes, moves), dtype=np.int64))

    return JointPolicy


def sglang_rebalance_experts(tokens_per_expert: Any, num_physical_experts: int,
                             num_local_physical_experts: int, num_groups: int | None,
                             num_nodes: int, algorithm: Any = None,
                             config: JointOnlineConfig | None = None) -> tuple[Any, Any, Any]:
    """SGLang's ``rebalance_experts`` signature (``tokens_per_expert [window, L, E]``):
    ``(phy2log [L, P], log2phy [L, E, P - E + 1], logcnt [L, E])``, tensors like the input."""
    counts = as_numpy(tokens_per_expert)
    load = counts.sum(axis=0) if counts.ndim == 3 else counts
    G = num_physical_experts // num_local_physical_experts
    cls = _env_policy(config or _env_config())
    phy2log = as_numpy(cls.rebalance_experts(load, num_physical_experts, num_groups or 1,
                                              num_nodes, G)).astype(np.int64)
    L, E = load.shape
    logcnt = np.stack([np.bincount(r, minlength=E) for r in phy2log])
    log2phy = np.full((L, E, num_physical_experts - E + 1), -1, dtype=np.int64)
    for layer in range(L):
        order = np.argsort(phy2log[layer], kind="stable")
        rank = np.arange(order.size) - (np.cumsum(logcnt[layer]) - logcnt[layer])[
            phy2log[layer][order]]
        log2phy[layer, phy2log[layer][order], rank] = order
    return tuple(like_input(tokens_per_expert, np.asarray(a, dtype=np.int64))
                 for a in (phy2log, log2phy, logcnt))


def _env_config() -> JointOnlineConfig:
    path = os.environ.get(CONFIG_ENV)
    return JointOnlineConfig() if not path else JointOnlineConfig.from_file(path)


@lru_cache(maxsize=4)
def _env_policy(config: JointOnlineConfig) -> type:
    """The policy class of a config, built (profile read) once."""
    return vllm_policy(config)


class JointEplbPolicy:
    """vLLM 0.33 EPLB policy configured from ``MOETUNER_JOINT_CONFIG`` (read per call)."""

    @classmethod
    def rebalance_experts(cls, weight: Any, num_replicas: int, num_groups: int,
                          num_nodes: int, num_ranks: int,
                          old_global_expert_indices: Any = None) -> Any:
        return _env_policy(_env_config()).rebalance_experts(
            weight, num_replicas, num_groups, num_nodes, num_ranks,
            old_global_expert_indices)


