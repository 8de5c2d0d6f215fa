"""Placement methods behind one small interface.

A method is a function ``solve(profile, cluster, options) -> (phy2log, SolveRecord)``
registered with ``@register("name")`` in its own module of this package; every module here
is imported on first use, so adding a method is adding one file. ``place()`` checks the
request, runs the method, validates the result and fills the placement's metadata.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass

import numpy as np

from moetuner.cluster import Cluster
from moetuner.errors import InputError
from moetuner.placement import Placement
from moetuner.profile import Profile

STATUSES = ("optimal", "feasible", "time_limit", "heuristic")


@dataclass(frozen=True)
class PlaceOptions:
    """What the user asks of a method.

    Attributes:
        redundant: extra physical slots per layer (R); P = E + R slots, P / G per GPU.
        time_limit: seconds the method may run (wall clock).
        seed: random seed; the same inputs and seed give the same placement.
        gap: relative optimality gap at which an exact method may stop (the paper's 2.5%).
        exec_model: the execution model a traffic-aware method optimises (``follow`` or
            ``return``, section 4 of the brief).
        params: method-specific settings (documented by each method).
    """

    redundant: int = 0
    time_limit: float = 60.0
    seed: int = 0
    gap: float = 0.025
    exec_model: str = "follow"
    params: dict = field(default_factory=dict)

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


def register(name: str, may_share_gpus: bool = False, may_leave_empty: bool = False
             ) -> Callable[[Solver], Solver]:
    """Register ``solve(profile, cluster, options) -> (phy2log [L, P], SolveRecord)``.

    ``may_share_gpus`` marks a method (a published baseline) that can put two replicas of
    one expert on one GPU; its placements are accepted as they are. ``may_leave_empty``
    marks a method whose ``phy2log`` may hold -1 (empty slots, unequal experts per GPU); such
    a placement is flagged ``allow_empty_slots`` only when it has an empty slot.
    """

    def wrap(solve: Solver) -> Solver:
        _METHODS[name] = solve
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

    plain = {f.name: getattr(options, f.name) for f in fields(options) if f.name != "params"}
    return {**plain, "params": {key: describe(value) for key, value in options.params.items()}}


def place(
    profile: Profile,
    cluster: Cluster,
    method: str = "linear",
    options: PlaceOptions | None = None,
) -> tuple[Placement, SolveRecord]:
    """Place ``profile``'s experts on ``cluster`` with ``method``.

    Returns the validated placement (metadata: method, options, cluster, profile
    provenance and the solve record) and the record itself.
    """
    options = options or PlaceOptions()
    available = methods()
    if method not in available:
        raise InputError("--method", "method", f"one of {', '.join(available)}", repr(method))
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
