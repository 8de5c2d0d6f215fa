"""moetuner: place the experts of a Mixture-of-Experts model on GPUs for expert parallelism.

The pipeline, one module per stage: ``trace`` (routing records) -> ``profile`` (loads,
transitions, co-activation) -> ``methods`` (placement solvers) -> evaluation -> export.
"""

from moetuner.cluster import Cluster, GPUSpec, make_cluster
from moetuner.costmodel import CostBreakdown, CostCoefficients, load_coefficients, predict
from moetuner.errors import InputError
from moetuner.evaluate import Replay, compare, replay
from moetuner.inputs import read_profile, read_trace
from moetuner.methods import PlaceOptions, SolveRecord, methods, place
from moetuner.models import ModelSpec, get_model
from moetuner.placement import Placement, load_placement
from moetuner.profile import Profile, load_profile, profile_trace
from moetuner.synth import SynthFit, is_synthetic, synthesis_fit, synthesize_trace
from moetuner.trace import Trace, load_trace

__all__ = [
    "Cluster", "CostBreakdown", "CostCoefficients", "GPUSpec", "InputError", "ModelSpec",
    "PlaceOptions", "Placement", "Profile", "Replay", "SolveRecord", "SynthFit", "Trace",
    "compare", "get_model", "is_synthetic", "load_coefficients", "load_placement",
    "load_profile", "load_trace", "make_cluster", "methods", "place", "predict",
    "profile_trace", "read_profile", "read_trace", "replay", "synthesis_fit",
    "synthesize_trace",
]
