"""moetuner: place the experts of a Mixture-of-Experts model on GPUs for expert parallelism.

The pipeline, one module per stage: ``trace`` (routing records) -> ``profile`` (loads,
transitions, co-activation) -> ``methods`` (placement solvers) -> evaluation -> export.
"""

from moetuner.cluster import Cluster, GPUSpec, make_cluster
from moetuner.collect import collect_trace
from moetuner.costmodel import CostBreakdown, CostCoefficients, load_coefficients, predict
from moetuner.counts import Replay, StepTimes
from moetuner.eplb import rebalance_experts
from moetuner.errors import InputError
from moetuner.evaluate import compare, evaluate_online, replay, replay_steps
from moetuner.export import FORMATS, LayerAxis, write_engine_files
from moetuner.inputs import read_profile, read_trace
from moetuner.methods import PlaceOptions, SolveRecord, methods, place
from moetuner.models import ModelSpec, get_model
from moetuner.online import OnlinePolicy, online_policy
from moetuner.placement import Placement, load_placement
from moetuner.profile import Profile, load_profile, profile_trace, profiles_by_label
from moetuner.synth import SynthFit, is_synthetic, synthesis_fit, synthesize_trace
from moetuner.trace import Trace, load_trace

__all__ = [
    "FORMATS", "Cluster", "CostBreakdown", "CostCoefficients", "GPUSpec", "InputError",
    "LayerAxis", "ModelSpec", "PlaceOptions", "Placement", "Profile", "Replay", "SolveRecord",
    "StepTimes", "SynthFit", "Trace", "OnlinePolicy", "evaluate_online",
    "online_policy", "replay_steps", "collect_trace", "compare", "get_model", "is_synthetic",
    "load_coefficients", "load_placement", "load_profile", "load_trace", "make_cluster",
    "methods", "place", "predict", "profile_trace", "profiles_by_label", "read_profile",
    "read_trace", "rebalance_experts", "replay", "synthesis_fit", "synthesize_trace",
    "write_engine_files",
]
