import csv
import dataclasses
import math
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import random_trace
from moetuner import sweep
from moetuner.cli import run
from moetuner.cluster import make_cluster
from moetuner.costmodel import CostCoefficients
from moetuner.engine import EngineSettings
from moetuner.errors import InputError
from moetuner.evaluate import evaluate
from moetuner.export import read_sglang
from moetuner.inputs import read_profile, read_trace
from moetuner.methods import PlaceOptions, place
from moetuner.models import get_model
from moetuner.parallel import map_tasks
from moetuner.placement import Placement, load_placement
from moetuner.steps import StepPlan
from moetuner.sweep import (
    EvalOptions,
    SweepGrid,
    SweepInputs,
    SweepPoint,
    grid_points,
    pareto_front,
    recommend,
    resolve_redundant,
    run_sweep,
)

# Rows of a run are equal across runs except the solvers' wall time.
VOLATILE = {"solve_time_s"}


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SweepInputs:
    """A GPT-OSS-shaped random trace (24 layers, 32 experts, top-4), 12 sequences in 3 sets:
    place from set0, evaluate on set1."""
    path = tmp_path_factory.mktemp("sweep") / "trace.npz"
    random_trace(np.random.default_rng(3), 900, 24, 32, 4, sequences=12).save(path)
    return SweepInputs(profile=str(path), trace=str(path), profile_select=("seq_dataset=set0",),
                       select=("seq_dataset=set1",))


def test_resolve_redundant():
    assert [resolve_redundant(v, 8) for v in (0, 3, "G", "G/2", "2G", "3*G", " G / 4 ")] == [
        0, 3, 8, 4, 16, 24, 2]
    with pytest.raises(InputError, match="whole number"):
        resolve_redundant("G/3", 8)
    for bad in ("H", "G/0", "G+1", "1.5"):
        with pytest.raises(InputError):
            resolve_redundant(bad, 8)


def test_pareto_front_by_hand():
    memory = np.array([1, 1, 2, 2, 3, 0.5])
    time = np.array([5, 4, 4, 3, 3, 9])
    # (1, 4) beats (1, 5) and (2, 4); (2, 3) beats (3, 3); (0.5, 9) is the lightest.
    assert pareto_front(memory, time).tolist() == [False, True, False, True, False, True]
    assert pareto_front(np.array([1, 1]), np.array([2, 2])).tolist() == [True, True]


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=12))
def test_pareto_front_matches_brute_force(points):
    memory, time = np.array(points).T
    expected = [not any(m2 <= m and t2 <= t and (m2, t2) != (m, t) for m2, t2 in points)
                for m, t in points]
    assert pareto_front(memory, time).tolist() == expected


def test_recommend_takes_the_lightest_within_the_tolerance():
    def row(gpus, nodes, method, time, memory):
        return {"gpus": gpus, "gpu": "h100", "exec_model": "return", "batching": "none",
                "concurrency": None, "nodes": nodes, "method": method,
                "mean_step_time_s": time, "expert_memory_per_gpu_bytes": memory}

    rows = [row(4, 1, "linear", 1.0, 10), row(4, 1, "eplb", 0.9, 20),
            row(4, 2, "eplb", 0.905, 10), row(8, 1, "eplb", 0.5, 10),
            row(8, 2, "moetuner", 0.4, 30)]
    assert recommend(rows) == [rows[2], rows[4]]


def test_grid_points_skip_impossible_configurations():
    grid = SweepGrid(gpus=(3, 4), nodes=(1, 2), redundant=(0, "G/2", 4), methods=("linear",),
                     exec_models=("return",))
    points, skipped = grid_points(grid, 32)
    assert [(p.gpus, p.nodes, p.redundant) for p in points] == [
        (3, 1, 4), (4, 1, 0), (4, 1, 4), (4, 2, 0), (4, 2, 4)]
    reasons = {(s["gpus"], s["nodes"], str(s["redundant"])): s["reason"] for s in skipped}
    assert len(reasons) == 2 * 2 * 3 - len(points)
    assert "divisor of the 32 slots" in reasons[3, 1, "0"] and "--nodes" in reasons[3, 2, "4"]
    assert "whole number" in reasons[3, 1, "G/2"]
    assert "divisor of the 34 slots" in reasons[4, 1, "G/2"]
    with pytest.raises(InputError, match="methods"):
        SweepGrid(methods=("nope",))
    with pytest.raises(InputError, match="batching"):
        SweepGrid(batching=("steps",))


def test_sweep_rows_equal_individual_place_and_evaluate(inputs, tmp_path):
    grid = SweepGrid(gpus=(2, 4), nodes=(1, 2), redundant=(0, "G"),
                     methods=("linear", "eplb", "round_robin"), time_limit=5)
    result = run_sweep(inputs, grid, tmp_path, workers=1)
    assert len(result.rows) == 2 * 2 * 2 * 3 * 2 and result.computed == len(result.rows)
    profile = read_profile(inputs.profile, inputs.profile_select)
    trace = read_trace(inputs.trace, inputs.select)
    model = get_model("gpt-oss-20b")
    for row in result.rows:
        cluster = make_cluster(row["gpus"], row["nodes"], row["gpu"])
        placement, _ = place(profile, cluster, row["method"],
                             PlaceOptions(redundant=row["redundant"], time_limit=5,
                                          exec_model=row["exec_model"]))
        # The default grid: decode steps at serving scale on DeepEP's low-latency kernels.
        assert (row["batching"], row["concurrency"]) == ("decode", None)
        replayed, cost = evaluate(placement, trace, cluster, model,
                                  EngineSettings(row["exec_model"], "even", "deepep-ll"),
                                  plan=StepPlan(phase="decode", source="serving"))
        for key, value in {**replayed.summary(), **cost.summary()}.items():
            if key == "batching":  # the row keeps the point's setting, the summary says more
                assert value.startswith(row[key])
                continue
            assert row[key] == value, key
        assert row["slots_per_gpu"] == (32 + row["redundant"]) // row["gpus"]
        assert row["expert_memory_per_gpu_bytes"] == (
            row["slots_per_gpu"] * 24 * model.expert_weight_bytes)
    linear = {(r["gpus"], r["nodes"], r["exec_model"]): r["mean_step_time_s"]
              for r in result.rows if r["method"] == "linear" and r["redundant"] == 0}
    for row in result.rows:
        key = (row["gpus"], row["nodes"], row["exec_model"])
        assert row["speedup_vs_linear"] == linear[key] / row["mean_step_time_s"]
    with open(tmp_path / "sweep.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["mean_step_time_s"]) for r in table] == [
        r["mean_step_time_s"] for r in result.rows]
    page = (tmp_path / "index.html").read_text()
    assert "Recommended configuration" in page and "data:image/png;base64," in page


def test_an_interrupted_sweep_resumes(inputs, tmp_path, monkeypatch):
    grid = SweepGrid(gpus=(2, 4), nodes=(1,), redundant=(0,), methods=("linear", "eplb"),
                     exec_models=("return",), evaluation=EvalOptions("nearest"))
    fresh = run_sweep(inputs, grid, tmp_path / "fresh", workers=1)
    calls = []
    real_run_point = sweep.run_point

    def killed_after_three(task):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, or a killed job
        calls.append(task.point)
        return real_run_point(task)

    monkeypatch.setattr(sweep, "run_point", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(inputs, grid, tmp_path / "resumed", workers=1)
    written = sorted((tmp_path / "resumed" / "points").iterdir())
    # Each point's row and its placement.
    assert len(written) == 2 * 3 and not (tmp_path / "resumed" / "sweep.csv").exists()
    assert sum(p.name.endswith(".placement.json") for p in written) == 3
    assert all(not p.name.startswith(".") for p in written)   # no temporary left behind
    mtimes = [p.stat().st_mtime_ns for p in written]
    monkeypatch.setattr(sweep, "run_point", real_run_point)
    resumed = run_sweep(inputs, grid, tmp_path / "resumed", workers=1)
    assert (resumed.computed, resumed.reused) == (1, 3)
    assert [p.stat().st_mtime_ns for p in written] == mtimes
    assert stable(resumed.rows) == stable(fresh.rows)
    # Another time limit is another point: nothing is reused.
    other = run_sweep(inputs, SweepGrid(**{**grid.__dict__, "time_limit": 3.0}),
                      tmp_path / "resumed", workers=1)
    assert other.reused == 0


def test_map_tasks_in_a_process_pool_keeps_order():
    assert list(map_tasks(math.factorial, [5, 0, 3, 4], workers=2)) == [120, 1, 6, 24]
    assert list(map_tasks(math.factorial, [3], workers=1)) == [6]
    with pytest.raises(InputError):
        list(map_tasks(math.factorial, [3], workers=-1))


def test_sweep_on_local_ray_equals_the_local_run(inputs, tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed "
                              "(pip install -e '.[ray]')")
    grid = SweepGrid(gpus=(4,), nodes=(1, 2), redundant=(0,), methods=("linear", "eplb"),
                     exec_models=("follow",))
    local = run_sweep(inputs, grid, tmp_path / "local", workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(inputs, grid, tmp_path / "ray", ray_address="local")
    finally:
        ray.shutdown()
    assert remote.computed == 4 and stable(remote.rows) == stable(local.rows)


def test_sweep_command_with_a_toml_file(inputs, tmp_path, capsys):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(f"""
[inputs]
profile = "{inputs.profile}"
profile_select = ["seq_dataset=set0"]
trace = "{inputs.trace}"
select = ["seq_dataset=set1"]

[grid]
gpus = [2, 4]
redundant = [0, "2G"]
methods = ["linear", "eplb"]

[options]
workers = 1
""")
    out = tmp_path / "out"
    assert run(["sweep", str(grid_file), "--exec", "follow", "-o", str(out)]) == 0
    assert "8 points (8 computed" in capsys.readouterr().out
    with open(out / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["gpus"], r["redundant"], r["exec_model"]) for r in rows} == {
        ("2", "0", "follow"), ("2", "4", "follow"), ("4", "0", "follow"), ("4", "8", "follow")}
    assert run(["sweep", str(grid_file), "--methods", "linear", "--gpus", "2", "--exec",
                "follow,return", "-o", str(out)]) == 0
    assert "4 points (2 computed, 2 from an earlier run" in capsys.readouterr().out
    grid_file.write_text("[grid]\nnope = 1\n")
    assert run(["sweep", str(grid_file), "-o", str(tmp_path / "bad")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert run(["sweep", "--trace", inputs.trace, "-o", str(tmp_path / "bad")]) == 2


def test_an_input_error_in_a_worker_reaches_the_caller():
    # InputError survives pickling, so a pool or Ray worker's error is the user's message.
    with pytest.raises(InputError, match="--gpus"):
        list(map_tasks(make_cluster, [0, 4], workers=2))


def test_a_killed_sweep_process_resumes(inputs, tmp_path):
    grid = SweepGrid(gpus=(2, 4, 8), redundant=(0, "G"),
                     methods=("linear", "eplb", "round_robin"), exec_models=("return",))
    out = tmp_path / "killed"
    command = [sys.executable, "-c", "from moetuner.cli import main; main()", "sweep",
               "--profile", inputs.profile, "--profile-select", inputs.profile_select[0],
               "--trace", inputs.trace, "--select", inputs.select[0], "--gpus", "2,4,8",
               "--redundant", "0,G", "--methods", "linear,eplb,round_robin",
               "--exec", "return", "--workers", "1", "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None and len(
                list(out.glob("points/*.placement.json"))) < 2:
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    written = {path: path.read_bytes() for path in out.glob("points/*.json")}
    done = len(list(out.glob("points/*.placement.json")))
    assert done >= 2 and len(written) == 2 * done   # a row and its placement, or neither
    if process.returncode < 0:  # killed mid-sweep (not finished before the poll saw it)
        assert not (out / "sweep.csv").exists() and done < 18
    resumed = run_sweep(inputs, grid, out, workers=1)
    assert (resumed.reused, resumed.computed) == (done, len(resumed.rows) - done)
    assert all(path.read_bytes() == data for path, data in written.items())


def test_sweep_points_plan_their_steps_and_kernel():
    def point(batching, concurrency=None):
        return SweepPoint(4, 2, 0, "h100", "linear", "follow", batching, concurrency)

    assert point("none").plan() == StepPlan(source="average")
    assert point("decode").plan() == StepPlan("decode", "serving")
    assert point("prefill").plan() == StepPlan("prefill", "serving")
    assert point("decode", 64).plan() == StepPlan("decode", "recorded", concurrency=64)
    assert point("prefill", 1024).plan() == StepPlan("prefill", "recorded", step_tokens=1024)
    coefficients = CostCoefficients()
    for batching, kernel in (("decode", "deepep-ll"), ("prefill", "deepep-normal")):
        kwargs = EvalOptions("nearest").evaluate_kwargs(point(batching), coefficients)
        assert kwargs == {"settings": EngineSettings("follow", "nearest", kernel),
                          "coefficients": coefficients, "plan": point(batching).plan()}
def test_sweep_keeps_each_points_placement_and_exports_the_recommended(inputs, tmp_path):
    grid = SweepGrid(gpus=(2, 4), redundant=(0, "G"), methods=("linear", "eplb_fixed"),
                     exec_models=("return", "follow"), time_limit=2)
    calls = []
    result = run_sweep(inputs, grid, tmp_path, workers=1,
                       progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 8 * 2) for done in range(0, 17)]
    profile = read_profile(inputs.profile, inputs.profile_select)
    for row in result.rows:
        stored = load_placement(tmp_path / row["placement_file"])
        placement, _ = place(profile, make_cluster(row["gpus"], row["nodes"], row["gpu"]),
                             row["method"], PlaceOptions(redundant=row["redundant"],
                                                         time_limit=2,
                                                         exec_model=row["exec_model"]))
        assert np.array_equal(stored.phy2log, placement.phy2log)
        assert stored.slots_per_gpu == row["slots_per_gpu"]
    # One export per GPU count, for the engines' model (return).
    chosen = [row for row in recommend(result.rows) if row["exec_model"] == "return"]
    assert [entry["method"] for entry in result.exported] == [row["method"] for row in chosen]
    model = get_model("gpt-oss-20b")
    for entry, row in zip(result.exported, chosen, strict=True):
        if row["method"] == "linear" and row["redundant"] == 0:
            assert entry["files"] == [] and "default" in entry["note"]
            continue
        sglang_file = tmp_path / "recommended" / f"{entry['key']}.sglang.json"
        assert str(sglang_file) in entry["files"]
        back = read_sglang(sglang_file)
        assert np.array_equal(back.phy2log,
                              load_placement(tmp_path / row["placement_file"]).phy2log)
        launch = (tmp_path / "recommended" / f"{entry['key']}.launch.txt").read_text()
        assert f"--model-path {model.hf_id}" in launch and f"--ep-size {row['gpus']}" in launch


def test_export_recommended_skips_the_default_and_says_why_it_cannot_export(tmp_path):
    from moetuner.sweep import export_recommended

    shared = Placement(np.array([[0, 1, 0, 2, 3, 1]] * 24), 2, 4, allow_shared_gpu=True)
    (tmp_path / "points").mkdir()
    shared.save(tmp_path / "points" / "a.placement.json")
    base = {"gpus": 2, "nodes": 1, "gpu": "h100", "exec_model": "return",
            "batching": "decode", "concurrency": None, "expert_memory_per_gpu_bytes": 1,
            "mean_step_time_s": 1.0}
    rows = [{**base, "method": "eplb", "redundant": 2,
             "placement_file": "points/a.placement.json", "mean_step_time_s": 0.5},
            {**base, "gpus": 4, "method": "linear", "redundant": 0,
             "placement_file": "points/b.placement.json"}]
    model = get_model("gpt-oss-20b")
    eplb, linear = export_recommended(tmp_path, rows, dataclasses.replace(model,
                                                                         num_experts=4))
    assert eplb["files"] == [] and "not exported" in eplb["note"] and "GPU 0" in eplb["note"]
    assert linear["files"] == [] and "default" in linear["note"]
    assert not (tmp_path / "recommended").exists()
