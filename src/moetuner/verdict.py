"""What to deploy: the recommended placement per phase and execution model.

Pure functions over the rows of ``moetuner.evaluate.compare`` (dicts with at least
``placement``, ``exec_model``, ``mean_step_time_s``, ``speedup_vs_linear`` and
``slots_per_gpu``; ``phase`` when present). Per (phase, execution model), the candidate with
the lowest predicted mean step time is recommended when it beats the engine's default
(``linear``) by at least ``MIN_GAIN``; otherwise the verdict is to keep the default. Online
rows (``experts_moved``: a placement rebalanced by the engine, nothing to export) and the
placements a caller excludes (not loadable by the engine, weights over the GPU's memory) are
never recommended. Engines run the ``return`` execution model (section 4 of the brief), so
the placement to export for a phase is its ``return`` recommendation.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT = "linear"
ENGINE_EXEC_MODEL = "return"
# The smallest predicted gain over the default worth deploying a placement for.
MIN_GAIN = 0.01


@dataclass(frozen=True)
class Recommendation:
    """The verdict for one phase and execution model.

    Attributes:
        phase: the rows' ``phase`` (None when they have none).
        exec_model: the execution model the rows were replayed under.
        placement: the recommended placement's name; ``DEFAULT`` means keep the engine's.
        best: the fastest candidate (the recommendation unless its gain is under
            ``MIN_GAIN``).
        gain_vs_default: the default's mean step time over the recommendation's.
        best_gain: the default's mean step time over the best candidate's.
        eplb: the EPLB placement's name, or None when none was evaluated.
        gain_vs_eplb: EPLB's mean step time over the recommendation's, or None.
        slower: (name, speedup) of the placements predicted slower than the default.
        excluded: (name, reason) of the placements left out of the choice.
    """

    phase: str | None
    exec_model: str
    placement: str
    best: str
    gain_vs_default: float
    best_gain: float
    eplb: str | None
    gain_vs_eplb: float | None
    slower: tuple[tuple[str, float], ...]
    excluded: tuple[tuple[str, str], ...]

    @property
    def keeps_default(self) -> bool:
        return self.placement == DEFAULT

    def to_dict(self) -> dict:
        return {"phase": self.phase, "exec_model": self.exec_model,
                "placement": self.placement, "best": self.best,
                "gain_vs_default": self.gain_vs_default, "best_gain": self.best_gain,
                "eplb": self.eplb, "gain_vs_eplb": self.gain_vs_eplb,
                "slower": [list(item) for item in self.slower],
                "excluded": [list(item) for item in self.excluded]}


def recommend(rows: list[dict], eplb: str | None = None,
              excluded: dict[str, str] | None = None, min_gain: float = MIN_GAIN
              ) -> list[Recommendation]:
    """The recommendation per (phase, execution model), in the rows' order.

    Args:
        rows: ``compare``'s rows; each group needs its ``DEFAULT`` row or
            ``speedup_vs_linear`` on every row (the default's time over the row's).
        eplb: the name of the EPLB placement among the rows, or None.
        excluded: placement name -> why it may not be recommended.
        min_gain: the smallest gain over the default that is recommended.
    """
    excluded = excluded or {}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("phase"), row["exec_model"]), []).append(row)
    verdicts = []
    for (phase, exec_model), group in groups.items():
        static = [row for row in group if "experts_moved" not in row]
        candidates = [row for row in static if row["placement"] not in excluded]
        default = next((row for row in static if row["placement"] == DEFAULT), None)
        best = min(candidates, key=lambda row: (row["mean_step_time_s"], row["slots_per_gpu"],
                                                row["placement"] != DEFAULT,
                                                row["placement"]), default=default)
        best_name = DEFAULT if best is None else best["placement"]
        best_gain = 1.0 if best is None else float(best["speedup_vs_linear"])
        chosen = best if best_gain >= 1 + min_gain else default
        gain = 1.0 if chosen is None else float(chosen["speedup_vs_linear"])
        eplb_row = next((row for row in static if row["placement"] == eplb), None)
        gain_vs_eplb = None
        if eplb_row is not None and chosen is not None and chosen["mean_step_time_s"]:
            gain_vs_eplb = eplb_row["mean_step_time_s"] / chosen["mean_step_time_s"]
        verdicts.append(Recommendation(
            phase=phase, exec_model=exec_model,
            placement=DEFAULT if chosen is None else chosen["placement"], best=best_name,
            gain_vs_default=gain, best_gain=best_gain,
            eplb=None if eplb_row is None else eplb, gain_vs_eplb=gain_vs_eplb,
            slower=tuple((row["placement"], float(row["speedup_vs_linear"])) for row in static
                         if row["speedup_vs_linear"] < 1),
            excluded=tuple((name, why) for name, why in excluded.items()
                           if any(row["placement"] == name for row in static))))
    return verdicts


def to_export(verdicts: list[Recommendation]) -> dict[str | None, Recommendation]:
    """Per phase, the recommendation to deploy: the one under the engines' execution model
    (``return``) when it was evaluated, else the phase's first."""
    chosen: dict[str | None, Recommendation] = {}
    for verdict in verdicts:
        if verdict.phase not in chosen or (verdict.exec_model == ENGINE_EXEC_MODEL
                                           and chosen[verdict.phase].exec_model
                                           != ENGINE_EXEC_MODEL):
            chosen[verdict.phase] = verdict
    return chosen


def describe(verdict: Recommendation, phase: str | None = None) -> str:
    """What to deploy for the verdict's phase and execution model, and why: a line, then
    indented notes (placements predicted slower than the default, placements left out).
    ``phase`` names the phase when the rows had none."""
    where = ", ".join(filter(None, [verdict.phase or phase, verdict.exec_model]))
    eplb = ("" if verdict.gain_vs_eplb is None else
            f", {verdict.gain_vs_eplb:.3f}x {verdict.eplb} (EPLB)")
    if verdict.keeps_default:
        if verdict.best == DEFAULT:
            why = "no placement is predicted faster"
        else:
            why = (f"the fastest, {verdict.best}, is predicted {verdict.best_gain:.3f}x, "
                   f"under the {MIN_GAIN:.0%} worth deploying")
        lines = [f"{where}: keep {DEFAULT} (the engine's default): {why}{eplb}"]
    else:
        lines = [f"{where}: deploy {verdict.placement}: predicted {verdict.gain_vs_default:.3f}x"
                 f" {DEFAULT} (the engine's default){eplb}"]
    if verdict.slower:
        lines.append("  predicted slower than linear: " + ", ".join(
            f"{name} {speedup:.3f}x" for name, speedup in verdict.slower))
    lines += [f"  left out: {name}: {why}" for name, why in verdict.excluded]
    return "\n".join(lines)
