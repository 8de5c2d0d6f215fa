"""``eplb``: DeepSeek's Expert Parallelism Load Balancer, re-implemented over numpy.

The published algorithm (github.com/deepseek-ai/EPLB, ``eplb.py``):

1. hierarchical policy (when the expert groups divide evenly over nodes): pack expert groups
   onto nodes with balanced packing, replicate the hottest experts inside each node (each new
   replica goes to the expert with the largest load per replica), then pack each node's
   physical experts onto its GPUs;
2. global policy otherwise: one group, one node; replicate globally, pack onto GPUs.

Balanced packing is greedy longest-first: items in descending weight, each to the lightest
pack that still has room. EPLB may put two replicas of one expert on one GPU; ``fixed=True``
forbids that (a replica only goes to a pack without a copy of its expert, repaired by a swap
in the rare case greedy runs out of such packs).

Arithmetic is DeepSeek's: loads are cast to float32 and every sum and load-per-replica is a
float32 value, so the comparisons are the same ones DeepSeek makes. **Tie rule**: where
DeepSeek compares equal values (two items of equal weight, two packs of equal load, two
experts of equal load per replica) the lower index wins: items of equal weight are taken in
ascending index order, the lowest-numbered pack and expert are chosen. DeepSeek leaves these
to ``torch.sort`` / ``torch.max``, which do not promise an order. On loads without ties
``phy2log`` and ``logcnt`` equal DeepSeek's exactly, and ``log2phy`` lists the same slots
for each expert; the replicas of one expert always tie (equal load each) when packed onto
GPUs, so for a replicated expert the order of its slots can differ from DeepSeek's, whose
``torch.sort`` does not keep index order beyond 16 items.

Method params: ``num_groups`` (expert groups; default: the model preset's group count, as
the engines pass it, e.g. 8 for DeepSeek-V3, found by the profile's shape; 1 when no preset
matches), ``fixed`` (bool, default False for ``eplb``; the ``eplb_fixed`` method sets it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moetuner.cluster import Cluster
from moetuner.errors import InputError
from moetuner.methods import MethodParams, PlaceOptions, SolveRecord, register
from moetuner.models import model_with_shape
from moetuner.profile import Profile


def balanced_packing(
    weight: np.ndarray, num_packs: int, keys: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items into ``num_packs`` packs of n / num_packs items, greedily by weight.

    Args:
        weight: float32 ``[X, n]`` item weights for X independent rows (layers).
        num_packs: packs per row; must divide n.
        keys: int ``[X, n]`` or None; items with the same key never share a pack.

    Returns:
        pack_index: int ``[X, n]`` pack of each item.
        rank_in_pack: int ``[X, n]`` position of each item inside its pack.
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    if per_pack == 1 and keys is None:
        pack_index[:] = np.arange(n)
        rank_in_pack[:] = 0
        return pack_index, rank_in_pack
    order = np.argsort(-weight, axis=1, kind="stable")
    pack_weight = np.zeros((rows, num_packs), dtype=weight.dtype)
    pack_items = np.zeros((rows, num_packs), dtype=np.int64)
    row = np.arange(rows)
    if keys is not None:
        num_keys = int(keys.max()) + 1
        holds = np.zeros((rows, num_packs, num_keys), dtype=bool)
    for step in range(n):
        item = order[:, step]
        blocked = pack_items >= per_pack
        if keys is not None:
            key = keys[row, item]
            conflicted = blocked | holds[row, :, key]
            # Rows where every open pack already holds the key take any open pack; repaired below.
            stuck = conflicted.all(axis=1)
            blocked = np.where(stuck[:, None], blocked, conflicted)
        pack = np.argmin(np.where(blocked, np.inf, pack_weight), axis=1)
        pack_index[row, item] = pack
        rank_in_pack[row, item] = pack_items[row, pack]
        pack_weight[row, pack] += weight[row, item]
        pack_items[row, pack] += 1
        if keys is not None:
            holds[row, pack, key] = True
    if keys is not None:
        for r in range(rows):
            _repair_conflicts(weight[r], keys[r], pack_index[r], rank_in_pack[r])
    return pack_index, rank_in_pack


def _repair_conflicts(weight: np.ndarray, keys: np.ndarray, pack: np.ndarray, rank: np.ndarray
                      ) -> None:
    """Swap items between packs (in place) until no pack holds two items with one key.

    Among the swaps that fix a conflict, take the one that changes pack weights least.
    """
    while True:
        pairs = keys[:, None] * (pack.max() + 1) + pack[:, None]
        flat, counts = np.unique(pairs, return_counts=True)
        if (counts <= 1).all():
            return
        bad = flat[np.argmax(counts > 1)]
        item = np.flatnonzero(pairs[:, 0] == bad)[-1]
        best, best_cost = None, np.inf
        for other in range(len(keys)):
            if pack[other] == pack[item]:
                continue
            keys_there = keys[(pack == pack[other]) & (np.arange(len(keys)) != other)]
            keys_here = keys[(pack == pack[item]) & (np.arange(len(keys)) != item)]
            if keys[item] in keys_there or keys[other] in keys_here:
                continue
            cost = abs(weight[item] - weight[other])
            if cost < best_cost:
                best, best_cost = other, cost
        if best is None:
            raise ValueError("cannot separate replicas: more copies of an expert than packs")
        pack[item], pack[best] = pack[best], pack[item]
        rank[item], rank[best] = rank[best], rank[item]


def replicate_experts(weight: np.ndarray, num_physical: int, max_copies: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add ``num_physical - n`` replicas, each to the expert with the most load per replica.

    Args:
        weight: float32 ``[X, n]`` load of each logical expert.
        num_physical: physical experts per row after replication.
        max_copies: cap on the copies of one expert (the GPUs they must spread over), or None.

    Returns:
        phy2log: int ``[X, num_physical]`` logical expert of each physical expert.
        replica_rank: int ``[X, num_physical]`` which copy of its expert each one is.
        logcnt: int ``[X, n]`` copies of each logical expert.
    """
    rows, n = weight.shape
    phy2log = np.tile(np.arange(num_physical, dtype=np.int64), (rows, 1))
    replica_rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, n), dtype=np.int64)
    row = np.arange(rows)
    for slot in range(n, num_physical):
        per_copy = (weight / logcnt).astype(np.float32)   # DeepSeek's float32 quotient
        if max_copies is not None:
            per_copy = np.where(logcnt >= max_copies, -np.inf, per_copy)
        hottest = np.argmax(per_copy, axis=1)
        phy2log[:, slot] = hottest
        replica_rank[:, slot] = logcnt[row, hottest]
        logcnt[row, hottest] += 1
    return phy2log, replica_rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a permutation ``[X, n]``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int,
    fixed: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's hierarchical policy; returns ``phy2log [L, P]``, ``replica_rank [L, P]``,
    ``logcnt [L, E]`` (see ``rebalance_experts``)."""
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    # 1. expert groups to nodes; "mlog" numbers logical experts node by node.
    group_load = weight.reshape(L, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicas inside each node.
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * num_nodes, -1)
    gpus_per_node = num_gpus // num_nodes
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes,
                                                    gpus_per_node if fixed else None)
    # 3. each node's physical experts to its GPUs.
    phy_load = np.take_along_axis((mlog_load / mlogcnt).astype(np.float32), phy2mlog, axis=1)
    pack, rank = balanced_packing(phy_load, gpus_per_node, phy2mlog if fixed else None)
    phy2pphy = pack * slots_per_gpu + rank
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, -1)
                 + np.arange(0, E, E // num_nodes)[None, :, None]).reshape(L, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphy_rank = np.take_along_axis(phy_rank, pphy2phy, axis=1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, axis=1)
    return pphy2log, pphy_rank, logcnt


class EplbArgumentError(InputError, AssertionError):
    """A request EPLB cannot serve. Also an ``AssertionError``: DeepSeek's and vLLM's EPLB
    assert their arguments, and vLLM's tests expect that type."""


def check_arguments(shape: tuple[int, ...], num_replicas: int, num_groups: int, num_nodes: int,
                    num_gpus: int, source: str = "eplb") -> None:
    """Raise ``EplbArgumentError`` unless EPLB can place ``weight`` of ``shape`` ``[L, E]``."""
    if len(shape) != 2 or 0 in shape:
        raise EplbArgumentError(source, "weight", "a non-empty load array [layers, experts]",
                                list(shape))
    E = shape[1]
    for name, value in (("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise EplbArgumentError(source, name, "a positive integer", value)
    if num_replicas < E or num_replicas % num_gpus:
        raise EplbArgumentError(source, "num_replicas",
                                f"a multiple of the {num_gpus} GPUs and at least E = {E}",
                                num_replicas)
    if num_gpus % num_nodes:
        raise EplbArgumentError(source, "num_gpus", f"a multiple of the {num_nodes} nodes",
                                num_gpus)
    # Groups only matter to the hierarchical policy, which splits E into equal groups.
    if num_groups % num_nodes == 0 and E % num_groups:
        raise EplbArgumentError(source, "num_groups", f"a divisor of the {E} experts",
                                num_groups)


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
    fixed: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB over numpy (float32 arithmetic and tie rule: see the module docstring).

    Args:
        weight: ``[L, E]`` load of each logical expert.
        num_replicas: physical experts per layer (P), a multiple of ``num_gpus``.
        num_groups: expert groups (E divisible); hierarchical policy when ``num_nodes``
            divides it (and, with ``fixed``, when a node's GPUs can hold its experts' copies
            apart), global policy otherwise.
        num_nodes: server nodes.
        num_gpus: GPUs, a multiple of ``num_nodes``.
        fixed: never put two replicas of one expert on one GPU.

    Returns:
        phy2log: int ``[L, P]`` logical expert in each physical slot.
        log2phy: int ``[L, E, X]`` physical slots of each expert in replica order (the
            original first), padded with -1; X = ``logcnt.max()`` as DeepSeek's.
        logcnt: int ``[L, E]`` replicas of each logical expert.

    Raises:
        EplbArgumentError: on arguments EPLB cannot serve (``check_arguments``).
    """
    weight = np.asarray(weight, dtype=np.float32)
    check_arguments(weight.shape, num_replicas, num_groups, num_nodes, num_gpus)
    L, E = weight.shape
    # The fixed variant keeps a node's copies of an expert on distinct GPUs of that node, so
    # the hierarchical policy only fits when each GPU's slots fit the node's experts.
    fits = not fixed or num_replicas // num_gpus <= E // num_nodes
    if num_groups % num_nodes == 0 and fits:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups,
                                                       num_nodes, num_gpus, fixed)
    else:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus,
                                                       fixed)
    width = int(logcnt.max())
    log2phy = np.full((L, E * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + rank,
                      np.broadcast_to(np.arange(num_replicas), (L, num_replicas)), axis=1)
    return phy2log, log2phy.reshape(L, E, width), logcnt


def engine_num_groups(profile: Profile) -> int:
    """The expert groups an engine passes to EPLB for this profile's model: the group count
    of the preset with the profile's (layers, experts, k), else 1."""
    model = model_with_shape(profile.num_layers, profile.num_experts, profile.top_k)
    return 1 if model is None else model.num_expert_groups


@dataclass(frozen=True)
class EplbParams(MethodParams):
    """Settings of ``eplb`` and ``eplb_fixed``.

    Attributes:
        num_groups: expert groups (None: the model preset's group count, else 1).
        fixed: never put two replicas of one expert on one GPU.
    """

    num_groups: int | None = field(default=None, metadata={"min": 1})
    fixed: bool = False


def _solve(profile: Profile, cluster: Cluster, options: PlaceOptions, fixed: bool
           ) -> tuple[np.ndarray, SolveRecord]:
    slots = options.slots_per_gpu(profile.num_experts, cluster.num_gpus) * cluster.num_gpus
    num_groups = options.params.get("num_groups")
    num_groups = engine_num_groups(profile) if num_groups is None else num_groups
    check_arguments(profile.load.shape, slots, num_groups, cluster.num_nodes, cluster.num_gpus,
                    source="--param")
    phy2log, _, _ = rebalance_experts(profile.load, slots, num_groups, cluster.num_nodes,
                                      cluster.num_gpus, fixed=fixed)
    return phy2log, SolveRecord(method="eplb_fixed" if fixed else "eplb",
                                log=f"num_groups={num_groups}")


@register("eplb", may_share_gpus=True, params=EplbParams)
def solve(profile: Profile, cluster: Cluster, options: PlaceOptions
          ) -> tuple[np.ndarray, SolveRecord]:
    """Published EPLB; may co-locate replicas (the placement then allows shared GPUs)."""
    return _solve(profile, cluster, options, fixed=bool(options.params.get("fixed", False)))


@register("eplb_fixed", params=EplbParams)
def solve_fixed(profile: Profile, cluster: Cluster, options: PlaceOptions
                ) -> tuple[np.ndarray, SolveRecord]:
    """EPLB that never puts two replicas of one expert on one GPU."""
    return _solve(profile, cluster, options, fixed=True)
