"""The verdict: what to deploy per phase and execution model, and evaluate's export of it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moetuner.cli import run
from moetuner.cluster import make_cluster
from moetuner.export import read_sglang
from moetuner.methods.linear import linear_phy2log
from moetuner.models import get_model, memory_warning
from moetuner.placement import Placement
from moetuner.trace import Trace
from moetuner.verdict import describe, recommend, to_export


def row(name: str, time: float, linear: float = 1.0, exec_model: str = "return",
        slots: int = 4, **extra) -> dict:
    return {"placement": name, "exec_model": exec_model, "mean_step_time_s": time,
            "p99_step_time_s": time * 1.1, "speedup_vs_linear": linear / time,
            "slots_per_gpu": slots, **extra}


def test_recommends_the_fastest_with_its_gains_over_linear_and_eplb():
    rows = [row("linear", 1.0), row("joint", 1.09), row("moetuner", 0.98), row("eplb", 1.092)]
    (verdict,) = recommend(rows, eplb="eplb")
    assert verdict.placement == "moetuner" and not verdict.keeps_default
    assert verdict.gain_vs_default == pytest.approx(1 / 0.98)
    assert verdict.gain_vs_eplb == pytest.approx(1.092 / 0.98)
    assert [name for name, _ in verdict.slower] == ["joint", "eplb"]
    text = describe(verdict)
    assert text.startswith("return: deploy moetuner: predicted 1.020x linear")
    assert "1.114x eplb (EPLB)" in text and "joint 0.917x" in text


def test_keeps_the_default_when_nothing_beats_it_by_the_minimum_gain():
    rows = [row("linear", 1.0), row("joint", 1.2), row("moetuner", 0.995)]
    (verdict,) = recommend(rows)
    assert verdict.keeps_default and verdict.best == "moetuner"
    assert verdict.gain_vs_default == 1.0 and verdict.gain_vs_eplb is None
    assert "keep linear" in describe(verdict) and "moetuner, is predicted 1.005x" in describe(
        verdict)
    (verdict,) = recommend([row("linear", 1.0), row("joint", 1.2)])
    assert verdict.keeps_default and "no placement is predicted faster" in describe(verdict)
    # A smaller threshold recommends the small gain.
    (verdict,) = recommend(rows, min_gain=0.001)
    assert verdict.placement == "moetuner"


def test_never_recommends_excluded_or_online_rows():
    rows = [row("linear", 1.0), row("eplb", 0.8), row("joint", 0.9),
            row("joint + eplb", 0.5, experts_moved=12)]
    (verdict,) = recommend(rows, eplb="eplb", excluded={"eplb": "not loadable"})
    assert verdict.placement == "joint"
    assert verdict.gain_vs_eplb == pytest.approx(0.8 / 0.9)
    assert verdict.excluded == (("eplb", "not loadable"),)
    assert "left out: eplb: not loadable" in describe(verdict)


def test_ties_go_to_fewer_slots_then_to_the_default():
    rows = [row("linear", 1.0), row("wide", 0.9, slots=5), row("narrow", 0.9, slots=4)]
    assert recommend(rows)[0].placement == "narrow"
    rows = [row("linear", 1.0), row("same", 1.0)]
    assert recommend(rows, min_gain=0)[0].placement == "linear"


def test_one_verdict_per_phase_and_execution_model_and_the_return_one_is_exported():
    rows = [row("linear", 1.0, exec_model=e, phase=p) for p in ("decode", "prefill")
            for e in ("follow", "return")]
    rows += [row("a", 0.9, exec_model="follow", phase="decode"),
             row("b", 0.8, exec_model="return", phase="decode"),
             row("a", 0.7, exec_model="follow", phase="prefill"),
             row("b", 1.3, exec_model="return", phase="prefill")]
    verdicts = recommend(rows)
    assert [(v.phase, v.exec_model, v.placement) for v in verdicts] == [
        ("decode", "follow", "a"), ("decode", "return", "b"),
        ("prefill", "follow", "a"), ("prefill", "return", "linear")]
    chosen = to_export(verdicts)
    assert {phase: (v.exec_model, v.placement) for phase, v in chosen.items()} == {
        "decode": ("return", "b"), "prefill": ("return", "linear")}
    # Without a return row, the phase's first verdict.
    only_follow = recommend([row("linear", 1.0, exec_model="follow"),
                             row("a", 0.5, exec_model="follow")])
    assert to_export(only_follow)[None].placement == "a"


def test_memory_warning_counts_the_models_other_weights():
    model = get_model("deepseek-v3")
    assert 15e9 < model.other_weight_bytes < 20e9
    assert memory_warning(model, 60e9, "h100", 80e9) is None
    warning = memory_warning(model, 70e9, "h100", 80e9)
    assert "70.0 GB of expert weights + 17.1 GB" in warning and "h100's 80 GB" in warning


# ---------------------------------------------------------------- evaluate --export-best

LAYERS, EXPERTS, K, GPUS = 24, 32, 4, 8  # gpt-oss-20b's shape: --model is inferred


@pytest.fixture
def skewed(tmp_path):
    """A trace whose tokens all pick experts 0-3 (linear puts them on GPU 0), a placement
    spreading them over four GPUs and one equal to linear."""
    rng = np.random.default_rng(0)
    hot = np.tile(np.arange(K), (256, LAYERS, 1))
    ids = np.where(rng.random(hot.shape[:2])[..., None] < 0.2,
                   np.argsort(rng.random((256, LAYERS, EXPERTS)), axis=2)[:, :, :K], hot)
    Trace(topk_ids=ids, num_experts=EXPERTS).save(tmp_path / "trace.npz")
    spread = np.broadcast_to(np.arange(EXPERTS) % GPUS, (LAYERS, EXPERTS))
    Placement.from_expert_gpu(spread, GPUS, {"method": "hand"}).save(tmp_path / "spread.json")
    Placement(linear_phy2log(LAYERS, EXPERTS, EXPERTS), GPUS, EXPERTS).save(
        tmp_path / "same.json")
    return tmp_path


def test_evaluate_exports_the_recommended_placement(skewed, capsys):
    out = skewed / "deploy" / "sglang.json"
    assert run(["evaluate", str(skewed / "same.json"), str(skewed / "spread.json"),
                "--trace", str(skewed / "trace.npz"), "--export-best", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "return: deploy spread: predicted" in printed
    assert f"exported spread (return model, as the engines run) to {out}" in printed
    assert f"--init-expert-location {out}" in printed and "--tp-size 8" in printed
    spread = Placement.from_dict(json.loads((skewed / "spread.json").read_text()))
    assert np.array_equal(read_sglang(out).phy2log, spread.phy2log)


def test_evaluate_exports_nothing_when_no_placement_beats_the_default(skewed, capsys):
    out = skewed / "sglang.json"
    assert run(["evaluate", str(skewed / "same.json"), "--trace", str(skewed / "trace.npz"),
                "--export-best", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [v["placement"] for v in result["verdict"]["recommendations"]] == ["linear"] * 2
    assert result["verdict"]["exported"] == {} and not out.exists()
    assert all(r["expert_memory_per_gpu_bytes"] == pytest.approx(
        4 * LAYERS * get_model("gpt-oss-20b").expert_weight_bytes) for r in result["rows"])
    assert run(["evaluate", str(skewed / "same.json"), "--trace", str(skewed / "trace.npz"),
                "--export-best", str(out)]) == 0
    assert f"keep the engine's default placement (start it without a placement file); {out} " \
           "not written" in capsys.readouterr().out


def test_evaluate_prints_expert_memory_and_warns_over_the_gpus_memory(skewed, capsys,
                                                                      monkeypatch):
    from moetuner import cluster

    assert run(["evaluate", str(skewed / "spread.json"), "--trace",
                str(skewed / "trace.npz")]) == 0
    printed = capsys.readouterr().out
    gb = 4 * LAYERS * get_model("gpt-oss-20b").expert_weight_bytes / 1e9
    assert "expert GB/GPU" in printed and f"{gb:.2f}" in printed and "warning" not in printed
    tiny = cluster.GPUSpec("h100", 989e12, 3.35e12, 4e9, 450e9, 50e9)
    monkeypatch.setitem(cluster.GPUS, "h100", tiny)
    assert run(["evaluate", str(skewed / "spread.json"), "--trace",
                str(skewed / "trace.npz")]) == 0
    printed = capsys.readouterr().out
    assert "warning: spread:" in printed and "exceed the h100's 4 GB" in printed
    # A placement whose weights do not fit is never recommended.
    assert "left out: spread: its weights exceed the GPU's memory" in printed


def test_evaluate_refuses_a_bad_export_before_any_work(skewed, capsys):
    code = run(["evaluate", str(skewed / "spread.json"), "--trace", str(skewed / "trace.npz"),
                "--export-best", str(skewed / "x.json"), "--export-format", "megatron"])
    assert code == 2 and "--export-format" in capsys.readouterr().err
    assert not (skewed / "x.json").exists()
    code = run(["evaluate", str(skewed / "spread.json"), "--trace", str(skewed / "trace.npz"),
                "--export-best", str(skewed / "spread.json")])
    assert code == 2 and "input" in capsys.readouterr().err


def test_cluster_in_two_nodes_gives_two_launch_commands(skewed, capsys):
    out = skewed / "sglang.json"
    assert run(["evaluate", str(skewed / "same.json"), str(skewed / "spread.json"),
                "--trace", str(skewed / "trace.npz"), "--nodes", "2",
                "--export-best", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("python -m sglang.launch_server") == 2
    assert "--nnodes 2 --node-rank 1" in printed
    assert make_cluster(8, 2).num_nodes == 2


def test_a_follow_only_evaluation_says_engines_run_return(skewed, capsys):
    out = skewed / "sglang.json"
    assert run(["evaluate", str(skewed / "same.json"), str(skewed / "spread.json"),
                "--trace", str(skewed / "trace.npz"), "--exec", "follow", "--replay", "average",
                "--export-best", str(out)]) == 0
    printed = capsys.readouterr().out
    # Rows name their phase (the whole-trace average is costed on decode's kernels).
    assert "decode, follow: deploy spread" in printed
    assert "(follow model, engines run return: evaluate with --exec both to check it)" in printed
    assert out.exists()
