"""Placement methods behind one small interface.

A method is a function ``solve(profile, cluster, options) -> (phy2log, SolveRecord)``
registered with ``@register("name", params=SettingsClass)`` in its own module of this
package; every module here is imported on first use, so adding a method is adding one file.
Its settings are one frozen dataclass (subclass of ``MethodParams``) registered with it:
``parse_params`` turns ``--param KEY=VALUE`` strings into it once, rejecting unknown names
and bad values with an ``InputError`` naming the param. ``place()`` takes a workload (one
profile, or several weighted profiles with a robust mode), checks the request, runs the
method, validates the result and fills the placement's metadata.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

import numpy as np

from moetuner.cluster import Cluster
from moetuner.errors import InputError
from moetuner.placement import Placement
from moetuner.profile import Profile

STATUSES = ("optimal", "feasible", "time_limit", "heuristic")
ROBUST = ("mean", "max")


@dataclass(frozen=True)
class MethodParams:
    """Base of every method's settings dataclass (no settings of its own).

    Fields are typed ``int``, ``float``, ``bool``, ``str`` or such ``| None``; a field's
    ``metadata`` may hold ``min`` (smallest value) and ``choices`` (allowed strings).
    """

    def get(self, key: str, default: object = None) -> object:
        """The setting ``key`` (dict-style access for methods written against a dict)."""
        value = getattr(self, key, default)
        return default if value is None else value

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_param(type(self), f, getattr(self, f.name))


def _check_param(cls: type, f, value: object) -> None:
    """Raise ``InputError`` naming the param unless ``value`` fits field ``f`` of ``cls``."""
    kinds = _field_kinds(cls, f)
    if value is None and type(None) in kinds:
        return
    ok = any(isinstance(value, kind) and not (kind is int and isinstance(value, bool))
             for kind in kinds if kind is not type(None))
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    low, choices = f.metadata.get("min"), f.metadata.get("choices")
    if ok and low is not None and value < low:
        ok = False
    if ok and choices is not None and value not in choices:
        ok = False
    if not ok:
        expected = " or ".join(k.__name__ for k in kinds)
        if low is not None:
            expected += f" >= {low}"
        if choices is not None:
            expected = f"one of {', '.join(choices)}"
        raise InputError("--param", f.name, expected, repr(value))


def _field_kinds(cls: type, f) -> tuple[type, ...]:
    """The types field ``f`` of settings class ``cls`` accepts (``int | None`` -> (int,
    NoneType))."""
    kind = typing.get_type_hints(cls)[f.name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return tuple(typing.get_args(kind))
    return (kind,)


def params_class(method: str) -> type[MethodParams]:
    """The settings dataclass registered with ``method``."""
    methods()
    return _PARAMS.get(method, MethodParams)


def uses_steps(method: str) -> bool:
    """Whether ``method`` optimises per engine step (its settings have a ``step_plan()``):
    its profiles must carry sampled steps (``profile_trace(step_gpus=...)``)."""
    return hasattr(params_class(method), "step_plan")


def parse_params(method: str, pairs: list[str] | dict | MethodParams | None) -> MethodParams:
    """The settings of ``method`` from ``KEY=VALUE`` strings (or a dict of values).

    Values are converted to the field's type once here; an unknown key, an unparsable
    value or one out of range raises ``InputError`` naming the param.
    """
    cls = params_class(method)
    if isinstance(pairs, MethodParams):
        return pairs
    known = {f.name: f for f in fields(cls)}
    values: dict[str, object] = {}
    items = pairs.items() if isinstance(pairs, dict) else [_split_pair(p) for p in pairs or ()]
    for key, raw in items:
        if key not in known:
            raise InputError("--param", key, f"a setting of {method}: "
                             f"{', '.join(known) or 'none'}", repr(key))
        values[key] = _convert(cls, known[key], raw) if isinstance(raw, str) else raw
    return cls(**values)


def _split_pair(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise InputError("--param", "param", "KEY=VALUE", repr(pair))
    return key, value


def _convert(cls: type, f, raw: str) -> object:
    """``raw`` as the type of field ``f`` of ``cls`` (the first of its types that parses)."""
    kinds = _field_kinds(cls, f)
    for kind in kinds:
        if kind is type(None):
            if raw.lower() == "none":
                return None
            continue
        if kind is bool:
            if raw.lower() in ("true", "1", "yes", "false", "0", "no"):
                return raw.lower() in ("true", "1", "yes")
            continue
        try:
            return kind(raw)
        except ValueError:
            continue
    raise InputError("--param", f.name, " or ".join(k.__name__ for k in kinds), repr(raw))


@dataclass(frozen=True)
class Workload:
    """What a placement is for: one or several routing profiles.

    Attributes:
        profiles: the workloads' profiles (same layers, experts and k).
        weights: one non-negative weight per profile, or None (equal).
        robust: ``mean`` (weighted) or ``max`` over the profiles, for methods that weigh
            several workloads (``joint``); the others place the profiles' sum.
    """

    profiles: tuple[Profile, ...]
    weights: tuple[float, ...] | None = None
    robust: str = "mean"

    def __post_init__(self) -> None:
        if not self.profiles:
            raise InputError("workload", "profiles", "at least one profile")
        if self.robust not in ROBUST:
            raise InputError("--robust", "robust", f"one of {', '.join(ROBUST)}",
                             repr(self.robust))
        if self.weights is not None and (
                not all(isinstance(w, int | float) and 0 <= w < np.inf for w in self.weights)
                or not any(self.weights)):
            raise InputError("--weight", "weight", "finite non-negative weights, not all 0",
                             list(self.weights))
        if self.weights is not None and len(self.weights) != len(self.profiles):
            raise InputError("--weight", "weight",
                             f"one weight per workload ({len(self.profiles)})",
                             len(self.weights))

    @property
    def total(self) -> Profile:
        """The profiles' sum (what single-workload methods place)."""
        return sum(self.profiles[1:], self.profiles[0])

    def weight_array(self) -> np.ndarray:
        """``[Q]`` the weights (equal when not given)."""
        return np.asarray(self.weights or [1.0] * len(self.profiles), dtype=np.float64)


@dataclass(frozen=True)
class PlaceOptions:
    """What the user asks of a method.

    Attributes:
        redundant: extra physical slots per layer (R); P = E + R slots, P / G per GPU.
        time_limit: seconds the method may run (wall clock).
        seed: random seed; the same inputs and seed give the same placement.
        gap: relative optimality gap at which an exact method may stop (the paper's 2.5%).
        exec_model: the execution model a traffic-aware method optimises (``return``, how
            engines run expert parallelism, or ``follow``; section 4 of the brief).
        params: the method's settings (its ``MethodParams`` dataclass; a dict is parsed by
            ``place``).
        workload: the workload being placed (set by ``place``).
    """

    redundant: int = 0
    time_limit: float = 60.0
    seed: int = 0
    gap: float = 0.025
    exec_model: str = "return"
    params: MethodParams | dict = field(default_factory=dict)
    workload: Workload | None = None

    def slots_per_gpu(self, num_experts: int, num_gpus: int) -> int:
        """Slots per GPU (P / G), after checking the request is possible."""
        if self.redundant < 0:
            raise InputError("--redundant", "redundant", "R >= 0 redundant slots", self.redundant)
        slots = num_experts + self.redundant
        if slots % num_gpus:
            raise InputError("--gpus", "num_gpus",
                             f"a divisor of the {slots} slots (E = {num_experts} + R = "
                             f"{self.redundant}); pick --redundant so that G divides E + R",
                             num_gpus)
        if num_gpus > slots:
            raise InputError("--gpus", "num_gpus", f"at most {slots} GPUs (one slot each)",
                             num_gpus)
        if slots // num_gpus > num_experts:
            raise InputError("--redundant", "redundant",
                             f"at most E = {num_experts} slots per GPU (more would put two "
                             "copies of one expert on one GPU)", slots // num_gpus)
        return slots // num_gpus


@dataclass
class SolveRecord:
    """How a placement was found.

    Attributes:
        method: the method's registered name.
        status: ``optimal`` (proved within ``gap``), ``feasible`` (a solver stopped early with
            an incumbent), ``time_limit`` (stopped by the time limit; best incumbent
            returned) or ``heuristic`` (no optimality claim).
        objective: the method's own objective value (see ``objective_name``), or None.
        bound: best known lower bound on that objective, or None.
        gap: (objective - bound) / objective when both are known, else None.
        solve_time: wall seconds inside the method.
        objective_name: what ``objective`` measures.
        log: a short summary of the solver's log.
    """

    method: str
    status: str = "heuristic"
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    solve_time: float = 0.0
    objective_name: str = ""
    log: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.gap is None and self.objective is not None and self.bound is not None:
            self.gap = relative_gap(self.objective, self.bound)

    def to_dict(self) -> dict:
        return asdict(self)


def relative_gap(objective: float, bound: float) -> float:
    """(objective - bound) / objective, 0 when both are 0."""
    if objective <= 0:
        return 0.0 if bound >= objective else float("inf")
    return max(0.0, (objective - bound) / objective)


Solver = Callable[[Profile, Cluster, PlaceOptions], tuple[np.ndarray, SolveRecord]]
_METHODS: dict[str, Solver] = {}
# Methods whose placements may hold two replicas of one expert on one GPU (published EPLB).
_SHARES_GPUS: set[str] = set()
# Methods whose placements may leave slots empty (-1; the paper's free cluster sizes).
_LEAVES_EMPTY: set[str] = set()
# Each method's settings dataclass.
_PARAMS: dict[str, type[MethodParams]] = {}


def register(name: str, may_share_gpus: bool = False, may_leave_empty: bool = False,
             params: type[MethodParams] = MethodParams) -> Callable[[Solver], Solver]:
    """Register ``solve(profile, cluster, options) -> (phy2log [L, P], SolveRecord)``.

    ``may_share_gpus`` marks a method (a published baseline) that can put two replicas of
    one expert on one GPU; its placements are accepted as they are. ``may_leave_empty``
    marks a method whose ``phy2log`` may hold -1 (empty slots, unequal experts per GPU); such
    a placement is flagged ``allow_empty_slots`` only when it has an empty slot. ``params``
    is the method's settings dataclass.
    """

    def wrap(solve: Solver) -> Solver:
        _METHODS[name] = solve
        _PARAMS[name] = params
        if may_share_gpus:
            _SHARES_GPUS.add(name)
        if may_leave_empty:
            _LEAVES_EMPTY.add(name)
        return solve

    return wrap


def methods() -> dict[str, Solver]:
    """All registered methods by name (imports every module of this package once)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(_METHODS.items()))


def options_metadata(options: PlaceOptions) -> dict:
    """The options as plain data for a placement's metadata: a profile passed in ``params``
    (a workload of ``joint``) appears as its provenance and token count, not its arrays."""

    def describe(value: object) -> object:
        if isinstance(value, Profile):
            return {"provenance": value.provenance, "tokens": value.tokens}
        if isinstance(value, list | tuple):
            return [describe(item) for item in value]
        if is_dataclass(value) and not isinstance(value, type):
            return asdict(value)
        return value

    plain = {f.name: getattr(options, f.name) for f in fields(options)
             if f.name not in ("params", "workload")}
    params = options.params if isinstance(options.params, dict) else asdict(options.params)
    out = {**plain, "params": {key: describe(value) for key, value in params.items()
                               if value is not None}}
    if options.workload is not None and len(options.workload.profiles) > 1:
        out["workload"] = {"profiles": describe(list(options.workload.profiles)),
                           "weights": options.workload.weights,
                           "robust": options.workload.robust}
    return out


def place(
    workload: Workload | Profile,
    cluster: Cluster,
    method: str = "linear",
    options: PlaceOptions | None = None,
) -> tuple[Placement, SolveRecord]:
    """Place the experts of ``workload`` (or one profile) on ``cluster`` with ``method``.

    Methods get the workload's summed profile and ``options.workload``; ``options.params``
    (a dict or ``KEY=VALUE`` values) is parsed into the method's settings dataclass.
    Returns the validated placement (metadata: method, options, cluster, profile
    provenance and the solve record) and the record itself.
    """
    options = options or PlaceOptions()
    available = methods()
    if method not in available:
        raise InputError("--method", "method", f"one of {', '.join(available)}", repr(method))
    if isinstance(workload, Profile):
        workload = options.workload or Workload((workload,))
    if isinstance(options.seed, bool) or not isinstance(options.seed, int) or options.seed < 0:
        raise InputError("--seed", "seed", "a non-negative integer", options.seed)
    options = replace(options, params=parse_params(method, options.params), workload=workload)
    profile = workload.total
    options.slots_per_gpu(profile.num_experts, cluster.num_gpus)
    start = time.perf_counter()
    phy2log, record = available[method](profile, cluster, options)
    record.solve_time = record.solve_time or time.perf_counter() - start
    metadata = {
        "method": method,
        "options": options_metadata(options),
        "cluster": cluster.to_dict(),
        "profile": profile.provenance,
        "record": record.to_dict(),
    }
    phy2log = np.asarray(phy2log, dtype=np.int64)
    placement = Placement(phy2log=phy2log, num_gpus=cluster.num_gpus,
                          num_experts=profile.num_experts, metadata=metadata,
                          allow_shared_gpu=method in _SHARES_GPUS,
                          allow_empty_slots=method in _LEAVES_EMPTY and bool((phy2log < 0).any()))
    return placement, record
