"""Calibrate the cost model's compute and memory efficiencies from a measurement.

``calibrate`` times, with torch on the local device, the expert FFN as engines run it (a
grouped GEMM: every expert multiplies its tokens by its gate and up projections, applies
SiLU(gate) x up, and multiplies by its down projection) for a range of tokens per expert,
and the time to read the experts' weights once. ``fit_coefficients`` then fits the two
``CostCoefficients`` fields a single device can tell (the network ones need a cluster):

- ``compute_efficiency``: the FFN follows the cost model's ``max(tokens x a, floor)``
  (assumption 2 of ``moetuner.costmodel``); the fitted slope ``a`` (seconds per token and
  expert) gives the achieved FLOP/s, over the GPU preset's peak.
- ``memory_efficiency``: the measured weight-read time gives the achieved bytes/s, over the
  preset's memory bandwidth.

Efficiencies above 1 (a device faster than the preset it is compared with) are clipped to 1
and said so in the provenance. The result keeps its provenance (date, device, torch version,
sizes, the raw timings) in ``CostCoefficients.provenance``; a CPU measurement says there that
its efficiencies describe the CPU, not the GPU preset.
"""

from __future__ import annotations

import datetime
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moetuner.cluster import GPUS, GPUSpec
from moetuner.costmodel import CostCoefficients
from moetuner.errors import InputError
from moetuner.models import ModelSpec

DEFAULT_TOKENS = tuple(2 ** i for i in range(12))  # 1 .. 2048 tokens per expert
# On a GPU, time enough experts that their weights overflow its L2 cache (50 MB on an H100)
# several times, so weight reads come from HBM as in serving.
GPU_WEIGHT_BYTES = 256e6
CALIBRATE_HINT = ("torch to time the expert FFN (pip install 'moetuner[torch]'; "
                  "torch==2.13.0 first for the CPU build)")


@dataclass(frozen=True)
class FfnFit:
    """The cost model's shape ``seconds(n) = max(n x seconds_per_token, floor_seconds)`` fitted
    to FFN timings of one expert.

    Attributes:
        seconds_per_token: slope: seconds per token once the FLOPs dominate.
        floor_seconds: seconds below which no token count goes (weight reads, launches); 0
            when every timing is FLOP-bound.
        log_rms: root mean square of log(measured / fitted) over the timings.
    """

    seconds_per_token: float
    floor_seconds: float
    log_rms: float


@dataclass(frozen=True)
class CalibrationFit:
    """Fitted efficiencies and what they come from.

    Attributes:
        compute_efficiency: achieved / peak FLOP/s, clipped to 1.
        memory_efficiency: achieved / peak bytes/s reading weights, clipped to 1.
        achieved_flops: FLOP/s of the FFN slope.
        achieved_bandwidth: bytes/s of the weight read.
        ffn: the FFN fit.
        clipped: names of the efficiencies that came out above 1.
    """

    compute_efficiency: float
    memory_efficiency: float
    achieved_flops: float
    achieved_bandwidth: float
    ffn: FfnFit
    clipped: tuple[str, ...]


def fit_ffn(tokens_per_expert: np.ndarray, seconds: np.ndarray) -> FfnFit:
    """Fit ``max(n x a, b)`` to timings, minimising squared log errors.

    Every split of the timings (sorted by n) into a floor-bound prefix and a FLOP-bound rest
    is tried: each side's least-squares value in log space is its geometric mean (of the
    times for b, of time / n for a); the split with the smallest error of the full
    ``max(n x a, b)`` model wins. Timings that follow the model exactly are fitted exactly.

    Args:
        tokens_per_expert: ``[M]`` positive token counts n.
        seconds: ``[M]`` positive seconds of one expert's FFN at each n.
    """
    n = np.asarray(tokens_per_expert, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if n.ndim != 1 or n.shape != t.shape or len(n) == 0 or not (
            np.all(n > 0) and np.all(t > 0) and np.all(np.isfinite(t))):
        raise InputError("timings", "tokens_per_expert, seconds",
                         "two equal-length 1-D arrays of positive finite numbers",
                         f"{n.shape} and {t.shape}")
    order = np.argsort(n, kind="stable")
    n, t = n[order], t[order]
    best = None
    # Split s: timings [0, s) on the floor, [s, M) FLOP-bound (at least one of those).
    for s in range(len(n)):
        floor = float(np.exp(np.log(t[:s]).mean())) if s else 0.0
        slope = float(np.exp(np.log(t[s:] / n[s:]).mean()))
        residual = np.log(t) - np.log(np.maximum(n * slope, floor))
        error = float(np.sqrt(np.mean(residual ** 2)))
        if best is None or error < best.log_rms:
            best = FfnFit(slope, floor, error)
    return best


def fit_coefficients(tokens_per_expert: np.ndarray, ffn_seconds: np.ndarray,
                     read_seconds: float, flops_per_token: float, weight_bytes: float,
                     gpu: GPUSpec) -> CalibrationFit:
    """Efficiencies of the cost model from one expert's timings.

    Args:
        tokens_per_expert: ``[M]`` token counts the FFN was timed at.
        ffn_seconds: ``[M]`` seconds of one expert's FFN at each count.
        read_seconds: seconds to read one expert's weights once.
        flops_per_token: FLOPs of one token through one expert (2 x 3 x hidden x
            intermediate at the timed sizes).
        weight_bytes: bytes of one expert's weights at the timed sizes and dtype.
        gpu: the preset whose peaks the efficiencies are relative to.
    """
    if not (np.isfinite(read_seconds) and read_seconds > 0):
        raise InputError("timings", "read_seconds", "a positive finite number", read_seconds)
    ffn = fit_ffn(tokens_per_expert, ffn_seconds)
    achieved_flops = flops_per_token / ffn.seconds_per_token
    achieved_bandwidth = weight_bytes / read_seconds
    raw = {"compute_efficiency": achieved_flops / gpu.peak_flops,
           "memory_efficiency": achieved_bandwidth / gpu.memory_bandwidth}
    return CalibrationFit(
        compute_efficiency=min(raw["compute_efficiency"], 1.0),
        memory_efficiency=min(raw["memory_efficiency"], 1.0),
        achieved_flops=achieved_flops, achieved_bandwidth=achieved_bandwidth, ffn=ffn,
        clipped=tuple(name for name, value in raw.items() if value > 1))


def _median_seconds(run: Callable[[], object], synchronize: Callable[[], None],
                    repeats: int) -> float:
    """Median wall seconds of ``run()`` after one warm-up call (device work included)."""
    run()
    synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def time_expert_ffn(hidden: int, intermediate: int, tokens_per_expert: Sequence[int],
                    experts: int = 4, device: str = "cpu", dtype: str = "float32",
                    repeats: int = 5, seed: int = 0) -> tuple[np.ndarray, float]:
    """Time the grouped expert FFN and the weight read with torch.

    ``experts`` experts run together as one batched GEMM per projection (each gets the same
    number of tokens), so one call is what a GPU does for that many active experts.

    Returns:
        ffn_seconds: ``[M]`` seconds per expert of the FFN at each entry of
            ``tokens_per_expert``.
        read_seconds: seconds per expert to read its three weight matrices once.
    """
    import torch

    torch_device = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator(device=torch_device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=torch_device,
                           dtype=torch_dtype) * 0.02

    gate_up = randn(experts, hidden, 2 * intermediate)   # gate and up side by side, as engines
    down = randn(experts, intermediate, hidden)
    weights = (gate_up, down)

    def synchronize() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)

    def ffn(x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.bmm(x, gate_up).chunk(2, dim=-1)
        return torch.bmm(torch.nn.functional.silu(gate) * up, down)

    ffn_seconds = []
    with torch.inference_mode():
        for n in tokens_per_expert:
            x = randn(experts, int(n), hidden)
            ffn_seconds.append(_median_seconds(lambda x=x: ffn(x), synchronize, repeats))
        read = _median_seconds(lambda: [w.sum(dtype=torch.float32) for w in weights],
                               synchronize, repeats)
    return np.array(ffn_seconds) / experts, read / experts


def device_name(device: str) -> str:
    """A readable name of the torch device (the GPU's, or the CPU's model)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def calibrate(model: ModelSpec, gpu: str = "h100", device: str | None = None,
              tokens_per_expert: Sequence[int] = DEFAULT_TOKENS, experts: int | None = None,
              scale: float = 1.0, repeats: int = 5, dtype: str | None = None
              ) -> CostCoefficients:
    """Measure the expert FFN of ``model`` on ``device`` and fit the cost model's efficiencies.

    Args:
        model: the preset whose hidden and intermediate sizes are timed.
        gpu: the GPU preset (``moetuner.cluster.GPUS``) whose peaks the efficiencies refer to.
        device: torch device; default ``cuda`` when available, else ``cpu``.
        tokens_per_expert: token counts the FFN is timed at.
        experts: experts per grouped GEMM; default 4 on CPU, and on GPU enough for
            ``GPU_WEIGHT_BYTES`` of weights (at least 4).
        scale: factor on the hidden and intermediate sizes (small sizes for quick tests).
        repeats: timed runs per measurement (the median is kept).
        dtype: torch dtype name; default bfloat16 on GPU, float32 on CPU.

    Returns:
        Default coefficients with the two fitted efficiencies and the provenance.
    """
    try:
        import torch
    except ImportError:
        raise InputError("calibrate", "dependencies", CALIBRATE_HINT) from None

    try:
        spec = GPUS[gpu.lower()]
    except KeyError:
        raise InputError("--gpu", "name", f"one of {', '.join(GPUS)}", repr(gpu)) from None
    if not 0 < scale <= 1:
        raise InputError("--scale", "scale", "a factor in (0, 1]", scale)
    if not tokens_per_expert or min(tokens_per_expert) < 1:
        raise InputError("--tokens", "tokens", "positive token counts", list(tokens_per_expert))
    if (experts is not None and experts < 1) or repeats < 1:
        raise InputError("--experts/--repeats", "count", "positive integers",
                         (experts, repeats))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise InputError("--device", "device", "cpu (no CUDA device is visible)", device)
    dtype = dtype or ("bfloat16" if on_gpu else "float32")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise InputError("--dtype", "dtype", "a torch dtype name such as bfloat16", dtype)
    hidden = max(8, round(model.hidden_size * scale))
    intermediate = max(8, round(model.expert_intermediate_size * scale))
    element_bytes = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    weight_bytes = 3 * hidden * intermediate * element_bytes
    if experts is None:
        experts = max(4, math.ceil(GPU_WEIGHT_BYTES / weight_bytes)) if on_gpu else 4
    ffn_seconds, read_seconds = time_expert_ffn(hidden, intermediate, tokens_per_expert,
                                                experts, device, dtype, repeats)
    fit = fit_coefficients(np.asarray(tokens_per_expert), ffn_seconds, read_seconds,
                           flops_per_token=2 * 3 * hidden * intermediate,
                           weight_bytes=weight_bytes, gpu=spec)
    provenance = {
        "tool": "moetuner calibrate",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "gpu_preset": spec.name,
        "peak_flops": spec.peak_flops,
        "memory_bandwidth": spec.memory_bandwidth,
        "model": model.name,
        "hidden": hidden,
        "intermediate": intermediate,
        "scale": scale,
        "experts_per_gemm": experts,
        "dtype": dtype,
        "tokens_per_expert": [int(n) for n in tokens_per_expert],
        "ffn_seconds_per_expert": ffn_seconds.tolist(),
        "read_seconds_per_expert": read_seconds,
        "fit": {**asdict(fit.ffn), "achieved_flops": fit.achieved_flops,
                "achieved_bandwidth": fit.achieved_bandwidth, "clipped": list(fit.clipped)},
        "note": (f"measured on the CPU ({device_name(device)}), not on a {spec.name}: the "
                 f"efficiencies are this CPU's achieved rates over the {spec.name} preset's "
                 "peaks, so predictions with them describe this CPU"
                 if not on_gpu else f"measured on {device_name(device)}"),
    }
    return CostCoefficients(compute_efficiency=fit.compute_efficiency,
                            memory_efficiency=fit.memory_efficiency, provenance=provenance)
