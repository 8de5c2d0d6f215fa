"""What a serving engine does with a token in one MoE layer: the replay kernel.

Written once and used by the evaluator (``moetuner.evaluate``) and by the per-step
objective of ``joint`` (``moetuner.methods._joint_objective``): replica choice, the
token-expert pairs and active slots of every GPU, the messages of dispatch and combine under
the chosen all-to-all kernel, and where the token sits afterwards.

Every set of allowed values is one ``Literal`` type below, checked in one place
(``checked``).

Replica choice, per (token, chosen expert e) with e's slots in ascending order: ``even``
(vLLM) takes replica ``key mod replicas(e)`` (``key``: a per-token hash, the token's index);
``nearest`` (SGLang's default) takes, among the replicas on the token's current GPU if any,
else on its node, else all, number ``key mod size(tier)``.

Execution models (brief, section 4): ``return``: every layer the token leaves its home GPU
and the results come back to it (combine = dispatch run backwards). ``follow``: the token
leaves the GPU it sits on and its results are combined on its primary expert's GPU (ordered
traces) or on the GPU holding most of its experts (ties: the current GPU, then the lowest
id), where it then sits.

Kernels (brief, section 10), counted from the token's GPU c:

- ``deepep-ll`` (DeepEP low-latency, decode) and ``nccl`` (NCCL EP low-latency): one message
  per (token, chosen expert) pair whose GPU is not c, no de-duplication; inside c's node over
  NVLink, across nodes over RDMA straight to the expert's GPU.
- ``deepep-normal`` (DeepEP normal, prefill): one NVLink message per token and distinct
  other GPU of c's node; one RDMA message per token and distinct remote node, received by
  the GPU of c's local index there, which forwards over NVLink (forwarding overlaps the
  RDMA transfer and is not counted).

Combine sends the same messages the other way (a GPU that received a dispatch message
sends a result back); under ``follow`` its messages are counted from the combine GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from moetuner.errors import InputError

ExecModel = Literal["return", "follow"]
ReplicaPolicy = Literal["even", "nearest"]
KernelName = Literal["deepep-ll", "deepep-normal", "nccl"]
Phase = Literal["decode", "prefill"]

EXEC_MODELS: tuple[str, ...] = get_args(ExecModel)
REPLICA_POLICIES: tuple[str, ...] = get_args(ReplicaPolicy)
KERNELS: tuple[str, ...] = get_args(KernelName)
PHASES: tuple[str, ...] = get_args(Phase)
# The kernel engines run for each phase (DeepEP low-latency for decode, normal for prefill).
PHASE_KERNEL: dict[str, str] = {"decode": "deepep-ll", "prefill": "deepep-normal"}
# Kernels that send one message per (token, expert) pair rather than per GPU / node.
PAIR_KERNELS = ("deepep-ll", "nccl")


def checked(value: object, allowed: object, flag: str, field: str | None = None) -> str:
    """``value`` when it is one of the ``Literal`` type ``allowed``'s values, else an
    ``InputError`` naming ``flag`` and the choices."""
    choices = get_args(allowed)
    if value not in choices:
        raise InputError(flag, field or flag.lstrip("-").replace("-", "_"),
                         f"one of {', '.join(choices)}", repr(value))
    return str(value)


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs an MoE layer.

    Attributes:
        exec_model: ``return`` or ``follow``.
        replica_policy: ``even`` or ``nearest``.
        kernel: the all-to-all kernel (``deepep-ll``, ``deepep-normal`` or ``nccl``).
    """

    exec_model: ExecModel = "return"
    replica_policy: ReplicaPolicy = "even"
    kernel: KernelName = "deepep-ll"

    def __post_init__(self) -> None:
        checked(self.exec_model, ExecModel, "--exec", "exec_model")
        checked(self.replica_policy, ReplicaPolicy, "--replica-policy", "replica_policy")
        checked(self.kernel, KernelName, "--kernel", "kernel")

    @property
    def pair_messages(self) -> bool:
        """Whether the kernel sends one message per (token, expert) pair."""
        return self.kernel in PAIR_KERNELS


def kernel_for(phase: str, kernel: str | None = None) -> str:
    """The kernel: ``kernel`` when given, else the one engines run for ``phase``."""
    checked(phase, Phase, "--phase", "phase")
    return PHASE_KERNEL[phase] if kernel is None else checked(kernel, KernelName, "--kernel")


def replica_table(row: np.ndarray, num_experts: int, num_gpus: int, node_of_gpu: np.ndarray,
                  policy: str) -> tuple[np.ndarray, np.ndarray]:
    """The engine's replica choice for one layer as a lookup: a token with hash ``key`` on
    GPU c choosing expert e takes slot ``members[e, c, key mod size[e, c]]``.

    Args:
        row: int ``[P]`` the layer's expert per slot (-1: an empty slot).
        num_experts: E; num_gpus: G; node_of_gpu: int ``[G]``.
        policy: ``even`` (the tier is all of e's slots) or ``nearest`` (those on GPU c if
            any, else those on c's node, else all); tiers list slots in ascending order.

    Returns:
        members: int64 ``[E, G, X]`` each tier's slots, padded with -1; size: int64
        ``[E, G]`` slots in each tier (0 for an expert without a slot).
    """
    row = np.asarray(row, dtype=np.int64)
    P = row.size
    slots = np.flatnonzero(row >= 0)
    order = slots[np.argsort(row[slots], kind="stable")]
    counts = np.bincount(row[slots], minlength=num_experts)
    rank = np.arange(order.size) - (np.cumsum(counts) - counts)[row[order]]
    log2phy = np.full((num_experts, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    log2phy[row[order], rank] = order                                         # [E, X]
    valid = (log2phy >= 0)[:, None, :]                                        # [E, 1, X]
    tier = np.broadcast_to(valid, (num_experts, num_gpus, log2phy.shape[1]))
    if policy == "nearest":
        slot_gpu = (np.maximum(log2phy, 0) // (P // num_gpus))[:, None, :]   # [E, 1, X]
        here = np.arange(num_gpus)[None, :, None]
        on_gpu = valid & (slot_gpu == here)
        on_node = valid & (node_of_gpu[slot_gpu] == node_of_gpu[here])
        tier = np.where(on_gpu.any(axis=2, keepdims=True), on_gpu,
                        np.where(on_node.any(axis=2, keepdims=True), on_node, valid))
    # Members first, in ascending slot order (a stable sort of "not a member").
    pick = np.argsort(~tier, axis=2, kind="stable")
    members = np.take_along_axis(np.broadcast_to(log2phy[:, None, :], tier.shape), pick,
                                 axis=2)
    return np.ascontiguousarray(members), tier.sum(axis=2).astype(np.int64)


@dataclass(frozen=True)
class LayerCounts:
    """What one layer does in each of S steps, counted over a set of tokens. Counts of
    disjoint token sets add (``+``, ``-``), so a move is re-counted on the tokens it
    touches only.

    Attributes:
        slot_pairs: int64 ``[S, P]`` token-expert pairs each slot computes per step.
        dispatch: int64 ``[4, S, G]`` dispatch messages each GPU sends inside its node,
            receives inside its node, sends across nodes, receives across nodes.
        combine: int64 ``[4, S, G]`` the messages counted from the combine GPU (``follow``;
            results flow the other way), or None (``return``: dispatch run backwards).
    """

    slot_pairs: np.ndarray
    dispatch: np.ndarray
    combine: np.ndarray | None

    def __add__(self, other: LayerCounts) -> LayerCounts:
        return self._merge(other, 1)

    def __sub__(self, other: LayerCounts) -> LayerCounts:
        return self._merge(other, -1)

    def _merge(self, other: LayerCounts, sign: int) -> LayerCounts:
        combine = None if self.combine is None else self.combine + sign * other.combine
        return LayerCounts(self.slot_pairs + sign * other.slot_pairs,
                           self.dispatch + sign * other.dispatch, combine)

    def gpu_pairs(self, slots_per_gpu: int) -> np.ndarray:
        """int64 ``[S, G]`` token-expert pairs each GPU computes per step."""
        S = self.slot_pairs.shape[0]
        return self.slot_pairs.reshape(S, -1, slots_per_gpu).sum(axis=2)

    def active_slots(self, slots_per_gpu: int) -> np.ndarray:
        """int64 ``[S, G]`` slots of each GPU that compute at least one token per step."""
        S = self.slot_pairs.shape[0]
        return (self.slot_pairs.reshape(S, -1, slots_per_gpu) > 0).sum(axis=2)


@dataclass(frozen=True)
class LayerTotals:
    """Kernel-independent traffic of one layer over a set of tokens, summed over steps.

    Attributes:
        matrix: int64 ``[2, G, G]`` token moves of dispatch (from the token's GPU, row, to
            each distinct other GPU of its experts, column) and of combine (results back:
            the transpose under ``return``; to the combine GPU under ``follow``).
        tokens_in: int64 ``[G]`` distinct tokens each GPU computes for.
        moves: int64 ``[4]`` (token, distinct destination GPU) pairs; of those off the
            token's GPU; of those off its node; (token, distinct remote node) pairs.
    """

    matrix: np.ndarray
    tokens_in: np.ndarray
    moves: np.ndarray


def count_layer(
    ids: np.ndarray,
    key: np.ndarray,
    position: np.ndarray,
    step: np.ndarray,
    num_steps: int,
    table: tuple[np.ndarray, np.ndarray],
    slots_per_gpu: int,
    node_of_gpu: np.ndarray,
    settings: EngineSettings,
    ordered: bool,
) -> tuple[LayerCounts, LayerTotals, np.ndarray]:
    """Count one layer for m tokens (semantics: module docstring).

    Args:
        ids: int ``[m, k]`` each token's chosen experts in this layer (column 0 the primary
            when ``ordered``).
        key: int64 ``[m]`` each token's replica-choice hash.
        position: int64 ``[m]`` GPU each token sits on entering the layer (its home under
            ``return``).
        step: int64 ``[m]`` step of each token, in ``[0, num_steps)``.
        table: ``replica_table`` of the layer.
        slots_per_gpu: P / G; node_of_gpu: int ``[G]``.
        settings: execution model, replica policy and kernel.
        ordered: whether column 0 of ``ids`` is each token's primary expert.

    Returns:
        The per-step counts, the totals, and int64 ``[m]`` the GPU each token sits on after
        the layer (``follow``: its combine GPU; ``return``: ``position``).
    """
    members, size = table
    G = node_of_gpu.shape[0]
    P = G * slots_per_gpu
    per_node = G // (int(node_of_gpu.max()) + 1)
    follow = settings.exec_model == "follow"
    slot_pairs = np.zeros((num_steps, P), dtype=np.int64)
    dispatch = np.zeros((4, num_steps, G), dtype=np.int64)
    combine = np.zeros((4, num_steps if follow else 0, G), dtype=np.int64)
    matrix = np.zeros((2, G, G), dtype=np.int64)
    tokens_in = np.zeros(G, dtype=np.int64)
    moves = np.zeros(4, dtype=np.int64)
    after = np.empty(ids.shape[0], dtype=np.int64)
    from moetuner.kernels import count_layer as compiled  # numba: imported when counting

    compiled(np.ascontiguousarray(ids, dtype=np.int32), np.asarray(key, dtype=np.int64),
                 np.asarray(position, dtype=np.int64), np.asarray(step, dtype=np.int64),
                 members, size, slots_per_gpu, np.asarray(node_of_gpu, dtype=np.int64),
                 per_node, settings.pair_messages, follow, ordered, slot_pairs, dispatch,
                 combine, matrix, tokens_in, moves, after)
    if not follow:
        matrix[1] = matrix[0].T
    counts = LayerCounts(slot_pairs, dispatch, combine if follow else None)
    return counts, LayerTotals(matrix, tokens_in, moves), after
