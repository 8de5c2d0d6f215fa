"""What-if sweeps: place and evaluate every point of a grid of clusters, methods and settings.

A grid (``SweepGrid``, from a TOML file or flags) multiplies GPU counts, node counts,
redundant slots, methods, execution models, batching settings and GPU kinds. Every point
is placed with ``moetuner.methods.place`` on the profile and evaluated with
``moetuner.evaluate.evaluate`` on the held-out trace, exactly as ``place`` and ``evaluate``
would, in a process pool or on Ray (``moetuner.parallel.map_tasks``).

Resumable: each point's result is written atomically to ``DIR/points/KEY.json`` as soon as
it arrives, with its placement beside it in ``DIR/points/KEY.placement.json`` (both or
neither), where KEY names the point's parameters plus a hash of everything else it depends
on (inputs, options); a re-run skips points whose two files exist.

Outputs: ``DIR/sweep.csv`` (and ``sweep.parquet`` when pyarrow is installed), one row per
point, and ``DIR/index.html``: the Pareto plot of predicted MoE time per batch against the
memory each GPU gives to expert weights (slots per GPU x MoE layers x one expert's bytes)
and the recommended configuration per GPU count.

Recommendation, per (GPUs, GPU kind, execution model, batching): the points within
``TIE_TOLERANCE`` of the fastest predicted time, then the least expert memory per GPU, then
the fewest nodes, then the method name. The recommended points of the ``return`` execution
model (the engines'; of every model when the grid has no ``return``) are exported for SGLang
to ``DIR/recommended/KEY.sglang.json`` (+ sidecar) with the launch command in
``KEY.launch.txt``, except where the recommendation is the engine's default (``linear``
without redundant experts: nothing to load) or SGLang would load it wrongly (said in the
result).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import functools
import hashlib
import html
import io
import itertools
import json
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moetuner.cluster import make_cluster
from moetuner.costmodel import MODEL_NOTE, CostCoefficients, load_coefficients
from moetuner.engine import EXEC_MODELS, REPLICA_POLICIES, EngineSettings, kernel_for
from moetuner.errors import InputError
from moetuner.evaluate import check_model, evaluate, model_for_trace
from moetuner.export import LayerAxis, write_engine_files
from moetuner.inputs import is_trace, read_profile, read_trace
from moetuner.io import json_writer, read_json, write_together
from moetuner.methods import PlaceOptions, methods, parse_params, place, uses_steps
from moetuner.models import ModelSpec, expert_memory_per_gpu, get_model
from moetuner.parallel import map_tasks
from moetuner.placement import load_placement
from moetuner.profile import Profile, sample_steps
from moetuner.steps import StepPlan
from moetuner.trace import Trace
from moetuner.verdict import ENGINE_EXEC_MODEL

# Batching settings of the evaluator (``moetuner.steps``).
BATCHING = ("none", "decode", "prefill")
# The predicted time the Pareto plot and the recommendation use, and its name in tables.
TIME_COLUMN = "mean_step_time_s"
TIME_LABEL = "mean step ms"
TIE_TOLERANCE = 0.01


@dataclass(frozen=True)
class SweepInputs:
    """Where a sweep's data comes from (paths are read by every worker).

    Attributes:
        profile: trace or profile the methods place from.
        trace: held-out trace the placements are evaluated on.
        profile_select, profile_drop: ``--select`` / ``--drop`` for ``profile``.
        select, drop: the same for ``trace``.
        model: model preset for the cost model, or None for the one matching the trace.
        calibration: cost-model coefficients JSON, or None for the defaults.
    """

    profile: str
    trace: str
    profile_select: tuple[str, ...] = ()
    profile_drop: tuple[str, ...] = ()
    select: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    model: str | None = None
    calibration: str | None = None


@dataclass(frozen=True)
class EvalOptions:
    """The evaluator's options shared by every point.

    Attributes:
        replica_policy: ``even`` (vLLM) or ``nearest`` (SGLang).
    """

    replica_policy: str = "even"

    def evaluate_kwargs(self, point: SweepPoint, coefficients: CostCoefficients) -> dict:
        """Keyword arguments of ``moetuner.evaluate.evaluate`` for ``point``: the phase's
        kernel, and its steps (``SweepPoint.plan``)."""
        plan = point.plan()
        settings = EngineSettings(point.exec_model, self.replica_policy,
                                  kernel_for(plan.phase))
        return {"settings": settings, "coefficients": coefficients, "plan": plan}


@dataclass(frozen=True)
class SweepPoint:
    """One configuration: a cluster, a method and an evaluation setting.

    Attributes:
        gpus, nodes: the cluster (G GPUs on N nodes).
        redundant: redundant slots per layer (R).
        gpu: GPU preset.
        method: placement method.
        exec_model: execution model the method optimises and the replay uses.
        batching: ``none`` (whole-trace average) or the phase (``decode``, ``prefill``)
            whose steps are replayed: at serving scale, or in the recorded order with
            ``concurrency``.
        concurrency: running sequences of recorded decode steps (tokens per recorded
            prefill step), or None for serving-scale steps.
    """

    gpus: int
    nodes: int
    redundant: int
    gpu: str
    method: str
    exec_model: str
    batching: str = "decode"
    concurrency: int | None = None

    def plan(self) -> StepPlan:
        """How this point's evaluation forms its steps."""
        if self.batching == "none":
            return StepPlan(source="average")
        if self.concurrency is None:
            return StepPlan(phase=self.batching)
        return StepPlan(phase=self.batching, source="recorded",
                        concurrency=self.concurrency if self.batching == "decode" else None,
                        step_tokens=self.concurrency if self.batching == "prefill" else None)

    def key(self, context: str) -> str:
        """File name stem: the parameters, then a hash of them and of ``context``."""
        digest = hashlib.sha1(json.dumps([asdict(self), context]).encode()).hexdigest()[:10]
        batching = self.batching + ("" if self.concurrency is None else f"{self.concurrency}")
        return (f"g{self.gpus}-n{self.nodes}-r{self.redundant}-{self.gpu}-{self.method}-"
                f"{self.exec_model}-{batching}-{digest}")


@dataclass(frozen=True)
class SweepGrid:
    """The values to multiply, and the options every point shares.

    Attributes:
        gpus, nodes: GPU and node counts (points where N does not divide G are skipped).
        redundant: R values: integers, or ``"G"``, ``"G/2"``, ``"2G"`` (multiples of G).
        methods: placement methods.
        exec_models: ``return`` and/or ``follow``.
        batching: evaluator batching settings.
        concurrency: running sequences, for the batching settings that take one.
        gpu: GPU presets.
        time_limit: seconds per solve.
        seed: methods' random seed.
        evaluation: the evaluator's options.
    """

    gpus: tuple[int, ...] = (8,)
    nodes: tuple[int, ...] = (1,)
    redundant: tuple[int | str, ...] = (0,)
    methods: tuple[str, ...] = ("linear", "eplb", "moetuner")
    exec_models: tuple[str, ...] = EXEC_MODELS
    batching: tuple[str, ...] = ("decode",)
    concurrency: tuple[int, ...] = ()
    gpu: tuple[str, ...] = ("h100",)
    time_limit: float = 10.0
    seed: int = 0
    evaluation: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self) -> None:
        known = set(methods())
        checks = [("--gpus", "gpus", self.gpus, lambda v: isinstance(v, int) and v > 0,
                   "positive integers"),
                  ("--nodes", "nodes", self.nodes, lambda v: isinstance(v, int) and v > 0,
                   "positive integers"),
                  ("--methods", "methods", self.methods, known.__contains__,
                   f"methods among {', '.join(sorted(known))}"),
                  ("--exec", "exec_models", self.exec_models, EXEC_MODELS.__contains__,
                   f"among {', '.join(EXEC_MODELS)}"),
                  ("--batching", "batching", self.batching, BATCHING.__contains__,
                   f"among {', '.join(BATCHING)}"),
                  ("--concurrency", "concurrency", self.concurrency,
                   lambda v: isinstance(v, int) and v > 0, "positive integers"),
                  ("--gpu", "gpu", self.gpu, lambda v: isinstance(v, str), "GPU preset names")]
        for flag, name, values, valid, expected in checks:
            if not isinstance(values, tuple) or (not values and name != "concurrency") or not all(
                    valid(v) for v in values):
                raise InputError(flag, name, f"a non-empty list of {expected}", values)
        for value in self.redundant:
            resolve_redundant(value, 0)  # the syntax; whole numbers are checked per G
        if not self.time_limit > 0:
            raise InputError("--time-limit", "time_limit", "a positive number of seconds",
                             self.time_limit)
        if self.evaluation.replica_policy not in REPLICA_POLICIES:
            raise InputError("--replica-policy", "replica_policy",
                             f"one of {', '.join(REPLICA_POLICIES)}",
                             self.evaluation.replica_policy)


def resolve_redundant(value: int | str, gpus: int) -> int:
    """R for ``gpus`` GPUs from an integer or a multiple of G (``"G"``, ``"G/2"``, ``"2G"``).

    Raises ``InputError`` for other text or a fraction of G that is not an integer.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*(\d*)\s*\*?\s*G\s*(?:/\s*(\d+))?\s*", str(value))
    if not match or match[2] == "0":
        raise InputError("--redundant", "redundant",
                         "integers or multiples of G such as G, G/2, 2G", repr(value))
    numerator = int(match[1] or 1) * gpus
    divisor = int(match[2] or 1)
    if numerator % divisor:
        raise InputError("--redundant", "redundant", f"a whole number ({value} for G = {gpus})",
                         numerator / divisor)
    return numerator // divisor


def grid_points(grid: SweepGrid, num_experts: int) -> tuple[list[SweepPoint], list[dict]]:
    """Every valid point of the grid, in grid order, and the skipped ones with the reason.

    A point is skipped when its nodes do not divide its GPUs, its R is not a whole number,
    or its slots cannot be placed (G must divide E + R, at most E slots per GPU).
    """
    settings = [(batching, None) for batching in grid.batching if batching == "none"]
    settings += [(batching, c) for batching in grid.batching if batching != "none"
                 for c in grid.concurrency or (None,)]
    points, skipped = [], []
    for gpus, nodes, redundant, gpu, method, exec_model, (batching, concurrency) in (
            itertools.product(grid.gpus, grid.nodes, grid.redundant, grid.gpu, grid.methods,
                              grid.exec_models, settings)):
        raw = {"gpus": gpus, "nodes": nodes, "redundant": redundant, "gpu": gpu,
               "method": method, "exec_model": exec_model, "batching": batching,
               "concurrency": concurrency}
        try:
            make_cluster(gpus, nodes, gpu)
            resolved = resolve_redundant(redundant, gpus)
            PlaceOptions(redundant=resolved).slots_per_gpu(num_experts, gpus)
        except InputError as exc:
            skipped.append({**raw, "reason": str(exc)})
            continue
        points.append(SweepPoint(gpus, nodes, resolved, gpu, method, exec_model, batching,
                                 concurrency))
    # Two R values can name the same R (4 and G/2 for G = 8): each point runs once.
    return list(dict.fromkeys(points)), skipped


@dataclass(frozen=True)
class PointTask:
    """Everything one worker needs for one point (picklable)."""

    inputs: SweepInputs
    grid: SweepGrid
    point: SweepPoint
    context: str = ""


@functools.lru_cache(maxsize=4)
def _profile(source: str, select: tuple[str, ...], drop: tuple[str, ...]) -> Profile:
    return read_profile(source, select, drop)


@functools.lru_cache(maxsize=4)
def _trace(source: str, select: tuple[str, ...], drop: tuple[str, ...]) -> Trace:
    return read_trace(source, select, drop)


def load_inputs(inputs: SweepInputs) -> tuple[Profile, Trace, ModelSpec, CostCoefficients]:
    """The profile, held-out trace, model and coefficients (cached per process), checked."""
    profile = _profile(inputs.profile, inputs.profile_select, inputs.profile_drop)
    trace = _trace(inputs.trace, inputs.select, inputs.drop)
    model = model_for_trace(trace) if inputs.model is None else get_model(inputs.model)
    check_model(model, trace)
    if (profile.num_layers, profile.num_experts) != (trace.num_layers, trace.num_experts):
        raise InputError(inputs.profile, "load",
                         f"{trace.num_layers} layers x {trace.num_experts} experts (those of "
                         f"{inputs.trace})", f"{profile.num_layers} x {profile.num_experts}")
    coefficients = (CostCoefficients() if inputs.calibration is None
                    else load_coefficients(inputs.calibration))
    return profile, trace, model, coefficients


def run_point(task: PointTask) -> tuple[dict, dict]:
    """Place and evaluate one point; its table row (plain JSON values) and its placement
    (``Placement.to_dict``)."""
    profile, trace, model, coefficients = load_inputs(task.inputs)
    point, grid = task.point, task.grid
    cluster = make_cluster(point.gpus, point.nodes, point.gpu)
    per_step = point.batching != "none" and uses_steps(point.method)
    # Per-step objectives (joint) optimise the phase this point evaluates.
    params = parse_params(point.method, {"phase": point.batching} if per_step else None)
    options = PlaceOptions(redundant=point.redundant, time_limit=grid.time_limit,
                           seed=grid.seed, exec_model=point.exec_model, params=params)
    if per_step and is_trace(task.inputs.profile):
        # Per-step objectives (joint) place on steps formed as this point's evaluation forms
        # them.
        source = _trace(task.inputs.profile, task.inputs.profile_select,
                        task.inputs.profile_drop)
        profile = dataclasses.replace(profile, steps=sample_steps(
            source, point.gpus, point.plan()))
    placement, record = place(profile, cluster, point.method, options)
    result, cost = evaluate(placement, trace, cluster, model,
                            **grid.evaluation.evaluate_kwargs(point, coefficients))
    metrics = {**result.summary(),
               "traffic_bytes": float(result.traffic.sum() * model.token_bytes),
               **cost.summary()}
    parameters = asdict(point)
    return {
        **parameters,
        "placement_file": f"points/{point.key(task.context)}.placement.json",
        "status": record.status,
        "solve_time_s": record.solve_time,
        "slots_per_gpu": placement.slots_per_gpu,
        "expert_memory_per_gpu_bytes": expert_memory_per_gpu(model, placement.slots_per_gpu,
                                                              placement.num_layers),
        # The point's own parameters name it (the evaluator may describe them in words).
        **{key: value for key, value in metrics.items() if key not in parameters},
    }, placement.to_dict()


@dataclass(frozen=True)
class SweepResult:
    """What ``run_sweep`` did.

    Attributes:
        rows: one row per valid point, in grid order, with ``speedup_vs_linear``.
        skipped: the grid's invalid points with the reason.
        computed: points computed in this run.
        reused: points read back from an earlier run.
        page: the HTML page written.
        exported: per recommended point of the engines' model: ``key``, ``method``,
            ``files`` written (empty when nothing was) and ``note`` (why not, or how to
            launch).
    """

    rows: list[dict]
    skipped: list[dict]
    computed: int
    reused: int
    page: Path
    exported: list[dict] = field(default_factory=list)


def run_sweep(inputs: SweepInputs, grid: SweepGrid, out_dir: str | os.PathLike,
              workers: int | None = None, ray_address: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> SweepResult:
    """Place and evaluate every point of ``grid``; write the points, the table and the page.

    Args:
        inputs: the profile and held-out trace (and model, calibration).
        grid: the points and shared options.
        out_dir: output directory (``points/``, ``sweep.csv``, ``index.html``).
        workers: local processes (1: in this process), or CPUs of a local Ray instance.
        ray_address: run the points as Ray tasks (``moetuner.parallel.map_tasks``).
        progress: called with (points done, points) as points finish.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("-o", "path", "a directory", str(out_dir))
    _, trace, model, _ = load_inputs(inputs)
    points, skipped = grid_points(grid, trace.num_experts)
    if not points:
        raise InputError("grid", "points", "at least one valid point (every point was "
                         "skipped; see the reasons with fewer values)", len(skipped))
    # What a point's result depends on besides its own parameters.
    context = json.dumps([asdict(inputs), grid.time_limit, grid.seed, asdict(grid.evaluation)])
    paths = {point: out_dir / "points" / f"{point.key(context)}.json" for point in points}
    rows = {point: _read_point(paths[point]) for point in points}
    todo = [point for point in points if rows[point] is None]
    tasks = (PointTask(inputs, grid, point, context) for point in todo)
    if progress:
        progress(len(points) - len(todo), len(points))
    for done, (point, (row, placement)) in enumerate(zip(
            todo, map_tasks(run_point, tasks, workers, ray_address), strict=True), 1):
        write_together({paths[point]: json_writer({"point": asdict(point), "row": row}, 1),
                        placement_path(paths[point]): json_writer(placement, 1)})
        rows[point] = row
        if progress:
            progress(len(points) - len(todo) + done, len(points))
    table = add_speedups([rows[point] for point in points])
    page = write_outputs(out_dir, table, skipped, inputs, model)
    exported = export_recommended(out_dir, table, model)
    return SweepResult(table, skipped, len(todo), len(points) - len(todo), page, exported)


def placement_path(point_path: Path) -> Path:
    """``points/KEY.placement.json`` beside the point file ``points/KEY.json``."""
    return point_path.with_name(f"{point_path.stem}.placement.json")


def _read_point(path: Path) -> dict | None:
    """A point's row from an earlier run, or None when it has none (or an unreadable one,
    or no placement beside it)."""
    if not path.is_file() or not placement_path(path).is_file():
        return None
    try:
        return read_json(path, "a sweep point")["row"]
    except (InputError, KeyError, TypeError):
        return None


def export_recommended(out_dir: Path, rows: list[dict], model: ModelSpec) -> list[dict]:
    """Write the recommended points of the engines' execution model for SGLang into
    ``out_dir / "recommended"`` (see the module docstring); what was done per point."""
    chosen = recommend(rows)
    engine = [row for row in chosen if row["exec_model"] == ENGINE_EXEC_MODEL] or chosen
    done = []
    for row in engine:
        key = Path(row["placement_file"]).name.removesuffix(".placement.json")
        entry = {"key": key, "method": row["method"], "files": [], "note": ""}
        done.append(entry)
        if row["method"] == "linear" and row["redundant"] == 0:
            entry["note"] = "the engine's default placement: start it without a placement file"
            continue
        placement = load_placement(out_dir / row["placement_file"])
        target = out_dir / "recommended" / f"{key}.sglang.json"
        try:
            written, flags = write_engine_files(
                placement, "sglang", target, LayerAxis.resolve(placement.num_layers, model),
                model_path=model.hf_id, num_nodes=row["nodes"])
        except InputError as exc:
            entry["note"] = f"not exported: {exc}"
            continue
        launch = target.with_name(f"{key}.launch.txt")
        write_together({launch: lambda handle, text=flags: handle.write(text + "\n")})
        entry["files"] = [str(path) for path in [*written, launch]]
        entry["note"] = flags
    return done


def add_speedups(rows: list[dict]) -> list[dict]:
    """Rows with ``speedup_vs_linear``: time of the ``linear`` point with R = 0 and the same
    cluster, execution model and batching over the row's time (None without that point)."""
    def setting(row: dict) -> tuple:
        return tuple(row[name] for name in ("gpus", "nodes", "gpu", "exec_model", "batching",
                                            "concurrency"))

    linear = {setting(row): row[TIME_COLUMN] for row in rows
              if row["method"] == "linear" and row["redundant"] == 0}
    return [{**row, "speedup_vs_linear": (
        linear[setting(row)] / row[TIME_COLUMN] if setting(row) in linear and row[TIME_COLUMN]
        else None)} for row in rows]


def pareto_front(memory: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Which points no other point beats: none has both less-or-equal memory and time with
    one of them strictly less.

    Args:
        memory: ``[M]`` memory per point.
        time: ``[M]`` time per point.

    Returns:
        bool ``[M]``, True on the front (equal points are all on it).
    """
    memory, time = np.asarray(memory, dtype=float), np.asarray(time, dtype=float)
    # [M, M]: point j (column) is no worse than point i (row) on both, better on one.
    no_worse = (memory[None, :] <= memory[:, None]) & (time[None, :] <= time[:, None])
    better = (memory[None, :] < memory[:, None]) | (time[None, :] < time[:, None])
    return ~(no_worse & better).any(axis=1)


def recommend(rows: list[dict]) -> list[dict]:
    """The recommended row per (GPUs, GPU kind, execution model, batching), see the module
    docstring; in the order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[name] for name in (
            "gpus", "gpu", "exec_model", "batching", "concurrency")), []).append(row)
    chosen = []
    for group in groups.values():
        best = min(row[TIME_COLUMN] for row in group)
        near = [row for row in group if row[TIME_COLUMN] <= best * (1 + TIE_TOLERANCE)]
        chosen.append(min(near, key=lambda row: (row["expert_memory_per_gpu_bytes"],
                                                 row["nodes"], row["method"])))
    return chosen


TABLE_COLUMNS = (
    ("gpus", "G", "{}"), ("nodes", "N", "{}"), ("redundant", "R", "{}"), ("gpu", "GPU", "{}"),
    ("method", "method", "{}"), ("exec_model", "exec", "{}"), ("batching", "batching", "{}"),
    ("slots_per_gpu", "slots/GPU", "{}"),
    ("expert_memory_per_gpu_bytes", "expert GB/GPU", "GB"),
    ("imbalance", "imbalance", "{:.3f}"), ("share_cross_node", "cross-node", "{:.1%}"),
    (TIME_COLUMN, TIME_LABEL, "ms"), ("speedup_vs_linear", "vs linear", "{:.3f}x"),
    ("status", "status", "{}"), ("solve_time_s", "solve s", "{:.2f}"),
)


def write_outputs(out_dir: Path, rows: list[dict], skipped: list[dict], inputs: SweepInputs,
                  model: ModelSpec) -> Path:
    """Write ``sweep.csv`` (+ ``sweep.parquet`` with pyarrow), ``pareto.png`` and
    ``index.html`` together; return the page's path."""
    columns = list(dict.fromkeys(name for row in rows for name in row))
    image = pareto_png(rows)

    def write_csv(handle: io.TextIOBase) -> None:
        writer = csv.DictWriter(handle, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    page = out_dir / "index.html"
    write_together({out_dir / "sweep.csv": write_csv,
                    page: lambda handle: handle.write(sweep_html(rows, skipped, image, inputs,
                                                                 model))})
    write_together({out_dir / "pareto.png": lambda handle: handle.write(image)}, binary=True)
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        return page
    table = pyarrow.Table.from_pylist(rows)
    write_together({out_dir / "sweep.parquet": lambda handle: pyarrow.parquet.write_table(
        table, handle)}, binary=True)
    return page


def pareto_png(rows: list[dict]) -> bytes:
    """PNG of predicted time against expert memory per GPU, one panel per execution model
    and batching, colour = GPU count, marker = method, line = each GPU count's Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((row["exec_model"], row["batching"], row["concurrency"])
                                for row in rows))
    gpu_counts = sorted({row["gpus"] for row in rows})
    method_names = list(dict.fromkeys(row["method"] for row in rows))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.85, len(gpu_counts)))
    markers = dict(zip(method_names, itertools.cycle("osD^vP*X"), strict=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for colour, gpus in zip(colours, gpu_counts, strict=True):
            group = [row for row in rows if row["gpus"] == gpus and (
                row["exec_model"], row["batching"], row["concurrency"]) == panel]
            if not group:
                continue
            memory = np.array([row["expert_memory_per_gpu_bytes"] for row in group]) / 1e9
            time = np.array([row[TIME_COLUMN] for row in group]) * 1e3
            for method in method_names:
                mine = [i for i, row in enumerate(group) if row["method"] == method]
                ax.scatter(memory[mine], time[mine], color=colour, marker=markers[method],
                           s=36, alpha=0.8)
            front = np.flatnonzero(pareto_front(memory, time))
            front = front[np.argsort(memory[front])]
            ax.step(memory[front], time[front], where="post", color=colour, lw=1.2,
                    label=f"G = {gpus}")
        batching = panel[1] + ("" if panel[2] is None else f" C={panel[2]}")
        ax.set_title(f"{panel[0]} model, batching {batching}", fontsize=10)
        ax.set_xlabel("expert weights per GPU (GB)")
        ax.set_ylabel(f"predicted {TIME_LABEL}")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        handles += [plt.Line2D([], [], color="grey", marker=markers[m], ls="", label=m)
                    for m in method_names]
        ax.legend(handles=handles, fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if fmt == "ms":
        return f"{value * 1e3:.3f}"
    if fmt == "GB":
        return f"{value / 1e9:.2f}"
    return fmt.format(value)


def _table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(
        f"<td{' class=text' if isinstance(row.get(key), str) else ''}>"
        f"{html.escape(_cell(row, key, fmt))}</td>" for key, _, fmt in TABLE_COLUMNS) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def sweep_html(rows: list[dict], skipped: list[dict], image: bytes, inputs: SweepInputs,
               model: ModelSpec) -> str:
    """The sweep's page: recommendations, the Pareto plot, every point, the skipped ones."""
    skipped_items = "".join(
        f"<li>G={s['gpus']} N={s['nodes']} R={html.escape(str(s['redundant']))} "
        f"{html.escape(s['method'])}: {html.escape(s['reason'])}</li>" for s in skipped)

    def selection(select: Sequence[str], drop: Sequence[str]) -> str:
        parts = list(select) + [f"drop {name}" for name in drop]
        return html.escape("; ".join(parts) or "all tokens")

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moetuner sweep</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; font-size: 13px; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #bbb; padding: 3px 7px; text-align: right; }}
th {{ background: #eee; }} td.text {{ text-align: left; }} img {{ max-width: 100%; }}
.note {{ color: #a33; }}
</style></head><body>
<h1>moetuner sweep</h1>
<p>Placed from <code>{html.escape(inputs.profile)}</code>
({selection(inputs.profile_select, inputs.profile_drop)}), evaluated on
<code>{html.escape(inputs.trace)}</code> ({selection(inputs.select, inputs.drop)});
model {html.escape(model.name)}; {len(rows)} points.</p>
<p class="note">MoE times are {html.escape(MODEL_NOTE)}.</p>
<h2>Recommended configuration per GPU count</h2>
<p>Per GPU count, GPU kind, execution model and batching: the fastest predicted point, or
among those within {TIE_TOLERANCE:.0%} of it the one with the least expert memory per GPU
(then the fewest nodes).</p>
{_table(recommend(rows))}
<h2>Predicted time against memory</h2>
<figure><img src="data:image/png;base64,{base64.b64encode(image).decode()}"
alt="Pareto plot"><figcaption>Each point is a configuration; the lines join each GPU
count's Pareto front (no other point of that count is both faster and lighter).
Memory: slots per GPU x MoE layers x one expert's weight bytes.</figcaption></figure>
<h2>All points</h2>
{_table(rows)}
<h2>Skipped points ({len(skipped)})</h2>
<ul>{skipped_items}</ul>
</body></html>
"""


def load_grid_file(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """The ``[inputs]``, ``[grid]`` and ``[options]`` tables of a sweep TOML file.

    Relative paths in ``[inputs]`` are relative to the file's directory.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file", "an existing sweep TOML file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(path, "file", "a sweep TOML file", exc) from None
    allowed = {"inputs": {f.name for f in dataclasses.fields(SweepInputs)},
               "grid": {"gpus", "nodes", "redundant", "gpu", "methods", "exec_models",
                        "batching", "concurrency"},
               "options": {"time_limit", "seed", "replica_policy", "workers", "ray"}}
    tables = []
    for name, keys in allowed.items():
        table = data.get(name, {})
        if not isinstance(table, dict) or set(table) - keys:
            extra = sorted(set(table) - keys) if isinstance(table, dict) else table
            raise InputError(path, name, f"a table with keys among {sorted(keys)}", extra)
        tables.append(table)
    if set(data) - set(allowed):
        raise InputError(path, "tables", f"tables among {sorted(allowed)}",
                         sorted(set(data) - set(allowed)))
    inputs = tables[0]
    for key in ("profile", "trace", "calibration"):
        if isinstance(inputs.get(key), str) and not Path(inputs[key]).is_absolute():
            inputs[key] = os.path.relpath(path.parent / inputs[key])
    return inputs, tables[1], tables[2]
