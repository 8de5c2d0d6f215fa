"""Shared CP-SAT helpers for the placement methods (registers no method).

Determinism: CP-SAT runs with ``num_workers`` workers (default 1, the only deterministic
choice under a limit) and stops on ``max_deterministic_time``, CP-SAT's own work counter, set
to ``DETERMINISTIC_PER_SECOND`` units per second of budget (calibrated on the 2-core VM, where
one unit took 2 to 5 wall seconds). The same model, hint and seed then give the same
answer whatever the machine's load. The wall-clock budget stays as a hard limit so that
``time_limit`` holds; on a machine slow enough for it to fire first, answers at the limit may
differ between runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where solved: ortools (and the pandas it loads) costs 0.3 s
    from ortools.sat.python import cp_model

DETERMINISTIC_PER_SECOND = 0.3


@dataclass(frozen=True)
class CpResult:
    """What one CP-SAT run found.

    Attributes:
        solver: the solver after ``solve`` (read variable values from it), or None.
        status: ``optimal`` (proved within the gap), ``time_limit`` (stopped with an
            incumbent) or ``none`` (no solution found).
        objective: the model's (integer) objective, or None.
        bound: CP-SAT's best lower bound, or None.
        summary: one line for the solve record's log.
    """

    solver: cp_model.CpSolver | None
    status: str
    objective: float | None
    bound: float | None
    summary: str


def solve_cpsat(model: cp_model.CpModel, budget: float, seed: int, gap: float,
                workers: int = 1) -> CpResult:
    """Minimise ``model`` within ``budget`` seconds (deterministic work limit, see above)."""
    from ortools.sat.python import cp_model

    solver = cp_model.CpSolver()
    params = solver.parameters
    params.max_deterministic_time = max(budget * DETERMINISTIC_PER_SECOND, 1e-3)
    params.max_time_in_seconds = max(budget, 1e-3)
    params.random_seed = seed
    params.num_workers = workers
    params.relative_gap_limit = gap
    code = solver.solve(model)
    name = solver.status_name(code)
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpResult(None, "none", None, None, f"CP-SAT {name}")
    status = "optimal" if code == cp_model.OPTIMAL else "time_limit"
    return CpResult(solver, status, solver.objective_value, solver.best_objective_bound,
                    f"CP-SAT {name} obj {solver.objective_value:.0f} "
                    f"bound {solver.best_objective_bound:.0f} in {solver.wall_time:.2f} s")


def integer_scale(values: np.ndarray, target: float = 1e6) -> float:
    """Factor that makes ``values`` integers (1 when they already are), else brings their
    largest to about ``target`` so that rounding loses little."""
    values = np.asarray(values, dtype=np.float64)
    if np.all(values == np.rint(values)):
        return 1.0
    top = float(np.abs(values).max())
    return target / top if top > 0 else 1.0
