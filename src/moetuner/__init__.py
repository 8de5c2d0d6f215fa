"""moetuner: place the experts of a Mixture-of-Experts model on GPUs for expert parallelism.

The pipeline, one module per stage: ``trace`` (routing records) -> ``profile`` (loads,
transitions, co-activation) -> ``methods`` (placement solvers) -> evaluation -> export.

The names below are imported on first use (PEP 562), so ``import moetuner`` (and the command
line's start) does not pay for the solvers, numba or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

# ``methods`` is both a subpackage and the function listing the methods: imported eagerly so
# the function, not the subpackage, is ``moetuner.methods`` (the subpackage is light).
from moetuner.methods import PlaceOptions, SolveRecord, methods, place

# Public name -> the module that defines it.
_LAZY = {
    "Cluster": "cluster", "GPUSpec": "cluster", "make_cluster": "cluster",
    "collect_trace": "collect",
    "CostBreakdown": "costmodel", "CostCoefficients": "costmodel",
    "load_coefficients": "costmodel", "predict": "costmodel",
    "Replay": "counts", "StepTimes": "counts",
    "rebalance_experts": "eplb",
    "InputError": "errors",
    "compare": "evaluate", "evaluate_online": "evaluate", "replay": "evaluate",
    "replay_steps": "evaluate",
    "FORMATS": "export", "LayerAxis": "export", "write_engine_files": "export",
    "read_profile": "inputs", "read_trace": "inputs",
    "ModelSpec": "models", "get_model": "models",
    "OnlinePolicy": "online", "online_policy": "online",
    "Placement": "placement", "load_placement": "placement",
    "Profile": "profile", "load_profile": "profile", "profile_trace": "profile",
    "profiles_by_label": "profile",
    "SynthFit": "synth", "is_synthetic": "synth", "synthesis_fit": "synth",
    "synthesize_trace": "synth",
    "Trace": "trace", "load_trace": "trace",
}

__all__ = ["PlaceOptions", "SolveRecord", "methods", "place", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'moetuner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"moetuner.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
