"""Compiled (numba) counting kernels of ``profile`` and ``shards``.

They live apart so that importing moetuner does not import numba (about 0.1 s): the modules
that count import this one inside the functions that call it.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def count_chunk(ids: np.ndarray, load: np.ndarray, transitions: np.ndarray,
                 transitions_top1: np.ndarray, coactivation_upper: np.ndarray) -> None:
    """Add one chunk ``ids [t, L, k]`` to the int64 counts ``load [L, E]``, ``transitions``
    and ``transitions_top1 [L-1, E, E]`` and ``coactivation_upper [L, E, E]`` (column a < b
    pairs only; ``RoutingCounter.profile`` makes it symmetric).

    Layers are the outer loop and the k x k pairs of one layer go to an int32 ``[E, E]``
    scratch table first (a chunk's counts fit int32): one hot table of 256 KB for E = 256
    instead of 58 int64 tables of 512 KB, which roughly doubles the speed at that size.
    """
    tokens, layers, k = ids.shape
    experts = load.shape[1]
    scratch = np.zeros((experts, experts), np.int32)
    for layer in range(layers):
        for token in range(tokens):
            for a in range(k):
                i = ids[token, layer, a]
                load[layer, i] += 1
                for b in range(a + 1, k):
                    scratch[i, ids[token, layer, b]] += 1
        flush(scratch, coactivation_upper[layer])
        if layer + 1 < layers:
            for token in range(tokens):
                for a in range(k):
                    i = ids[token, layer, a]
                    for b in range(k):
                        scratch[i, ids[token, layer + 1, b]] += 1
                transitions_top1[layer, ids[token, layer, 0], ids[token, layer + 1, 0]] += 1
            flush(scratch, transitions[layer])


@numba.njit(cache=True, nogil=True)
def flush(scratch: np.ndarray, counts: np.ndarray) -> None:
    """``counts += scratch``, then zero ``scratch`` (both ``[E, E]``)."""
    experts = scratch.shape[0]
    for i in range(experts):
        for j in range(experts):
            counts[i, j] += scratch[i, j]
            scratch[i, j] = 0


@numba.njit(cache=True, nogil=True)
def ids_valid(ids: np.ndarray, num_experts: int) -> bool:
    """Whether every ``ids [t, L, k]`` row holds k distinct ids in ``[0, num_experts)``: the
    check ``Trace`` makes, compiled (sorting each row costs twice the counting)."""
    tokens, layers, k = ids.shape
    for token in range(tokens):
        for layer in range(layers):
            for a in range(k):
                i = ids[token, layer, a]
                if i < 0 or i >= num_experts:
                    return False
                for b in range(a):
                    if ids[token, layer, b] == i:
                        return False
    return True
