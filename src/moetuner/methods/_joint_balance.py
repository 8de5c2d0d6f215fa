"""``joint``'s fast search under ``return``: per layer, the slots' per-step loads.

Under ``return`` the layers are independent and, at serving scale, a layer of a step waits
for its busiest GPU three times: its expert compute (FLOPs or weight reads of its active
slots) and, on pair kernels (DeepEP low-latency, NCCL EP), the pairs it receives in
dispatch and sends back in combine (homes are spread over all GPUs, so each received pair
crosses nodes with probability 1 - 1/N), but never faster than its busiest sender (a GPU
sends the pairs of the tokens homed on it, which the placement barely changes). Per sampled
step s and GPU g, with ``L[s, g]`` the token-expert pairs of g (an expert's pairs split
evenly over its copies) and ``A[s, g]`` its slots that receive a token:

    cost(s) = max_g max(a L[s, g], r A[s, g]) + max(F[s], X max_g L[s, g])

(a: seconds per pair of compute, r: per active slot read, X: exchange seconds per received
pair, dispatch plus combine; F[s]: the senders' floor, seconds; the kernels' latencies are
the same for every placement).
``search_layer`` minimises the weighted mean of cost(s) over the steps with two moves, each
priced exactly for this surrogate in O(S) from every step's three largest values: swapping
the experts of two slots on different GPUs, and giving a slot of an expert with copies to
spare to another expert (replica counts are the search's own). Moves are tried in a fixed
order and the first improving one applied, so the result depends on the inputs alone; it
stops when a whole pass finds no improving move (converged) or after ``max_passes``.
The exact objective (``_joint_objective``) judges the result.
"""

from __future__ import annotations

import numpy as np


def search_layer(counts: np.ndarray, weight: np.ndarray, floor: np.ndarray, row: np.ndarray,
                 num_gpus: int, num_experts: int, seconds: tuple[float, float, float],
                 max_passes: int, replicas: bool) -> tuple[np.ndarray, int, int, bool]:
    """Improve one layer's ``row`` for the surrogate (module docstring).

    Args:
        counts: float64 ``[S, E]`` token-expert pairs of each expert in each sampled step.
        weight: float64 ``[S]`` each step's weight in the mean.
        floor: float64 ``[S]`` the senders' floor F of each step (seconds).
        row: int ``[P]`` expert of each slot (every expert at least once); slot p on GPU
            p // (P / G).
        seconds: (a, r, X) of the module docstring.
        max_passes: passes over all moves at most.
        replicas: whether slots may change expert (replica counts move).

    Returns:
        The new row, the moves applied, the moves evaluated and whether the last pass found
        no improving move (converged).
    """
    row = np.array(row, dtype=np.int64)
    copies = np.bincount(row, minlength=num_experts).astype(np.int64)
    from moetuner.kernels import balance_search  # numba: imported when used

    a, r, x = seconds
    moves, evaluated, converged = balance_search(np.ascontiguousarray(counts, dtype=np.float64),
                               np.ascontiguousarray(weight, dtype=np.float64),
                               np.ascontiguousarray(floor, dtype=np.float64), row, copies,
                               num_gpus, float(a), float(r), float(x), int(max_passes),
                               bool(replicas))
    return row, int(moves), int(evaluated), bool(converged)
