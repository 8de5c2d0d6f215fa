"""Every file moetuner writes or reads is identified by its content (``moetuner.formats``):
``info`` describes each, written by the real writers, and a command refuses, in one line, a
file of the wrong kind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import random_trace
from moetuner.cli import run
from moetuner.costmodel import CostCoefficients
from moetuner.errors import InputError
from moetuner.formats import KINDS, covers_ids, identify, is_megatron_map, read_placement
from moetuner.placement import Placement, load_placement

DESCRIPTION = {name: kind.description for name, kind in KINDS.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A trace, its profile, a joint-free placement with replicas, every export format, a
    calibration and a sweep's point files, all written by moetuner itself."""
    root = tmp_path_factory.mktemp("formats")
    trace = random_trace(np.random.default_rng(0), 400, 3, 8, 2, sequences=8)
    paths = {"trace": root / "trace.npz", "profile": root / "profile.npz",
             "placement": root / "placement.json", "flat": root / "flat.json"}
    trace.save(paths["trace"])
    assert run(["profile", str(paths["trace"]), "-o", str(paths["profile"])]) == 0
    assert run(["place", str(paths["profile"]), "--gpus", "4", "--redundant", "4",
                "--method", "eplb_fixed", "-o", str(paths["placement"])]) == 0
    assert run(["place", str(paths["profile"]), "--gpus", "4", "--method", "moetuner",
                "--time-limit", "2", "-o", str(paths["flat"])]) == 0
    for fmt, name, source in (("sglang", "sglang.json", "placement"),
                              ("vllm", "vllm.json", "placement"),
                              ("vllm-ascend", "vllm-ascend.json", "placement"),
                              ("megatron", "megatron.npy", "flat"),
                              ("sglang-count", "count.json", "profile")):
        paths[fmt] = root / name
        assert run(["export", str(paths[source]), "--format", fmt, "--num-hidden-layers", "4",
                    "--dense-layers", "0", "-o", str(paths[fmt])]) == 0
    paths["sidecar"] = root / "sglang.meta.json"
    paths["calibration"] = root / "calibration.json"
    CostCoefficients(compute_efficiency=0.4, provenance={"device": "cpu"}).save(
        paths["calibration"])
    sweep, shaped = root / "sweep", root / "gpt-oss-shaped.npz"   # the cost model's preset
    random_trace(np.random.default_rng(1), 200, 24, 32, 4, sequences=4).save(shaped)
    assert run(["sweep", "--profile", str(shaped), "--trace", str(shaped),
                "--gpus", "4", "--nodes", "1", "--redundant", "0", "--methods", "linear",
                "--exec", "return", "--workers", "1", "--model", "gpt-oss-20b", "-o",
                str(sweep)]) == 0
    paths["sweep-point"] = next(p for p in (sweep / "points").glob("*.json")
                                if not p.name.endswith(".placement.json"))
    paths["sweep-table"] = sweep / "sweep.csv"
    return paths


EXPECTED_KIND = {
    "trace": "trace", "profile": "profile", "placement": "placement", "flat": "placement",
    "sglang": "sglang-placement", "vllm": "vllm-placement",
    "vllm-ascend": "vllm-ascend-placement", "megatron": "megatron-placement",
    "sglang-count": "sglang-count", "sidecar": "sglang-sidecar",
    "calibration": "calibration", "sweep-point": "sweep-point", "sweep-table": "sweep-table",
}


@pytest.mark.parametrize("key", sorted(EXPECTED_KIND))
def test_every_written_file_is_identified_and_described_by_info(files, key, capsys):
    path = files[key]
    assert identify(path).name == EXPECTED_KIND[key]
    assert run(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: {DESCRIPTION[EXPECTED_KIND[key]]}\n")
    if key == "trace":
        assert f"\ntrace {path}: 400 tokens, 3 MoE layers, 8 experts, top-2, 8 sequences" in out


@pytest.mark.parametrize("key", ["placement", "sglang", "vllm-ascend"])
def test_info_reads_engine_placements_back_as_the_placement(files, key, capsys):
    """An engine file shows the placement it was exported from: same shape line."""
    assert run(["info", str(files[key])]) == 0
    assert "3 MoE layers, E = 8, G = 4, 3 slots per GPU (4 redundant)" in \
        capsys.readouterr().out
    original = load_placement(files["placement"])
    assert np.array_equal(read_placement(files[key]).phy2log, original.phy2log)


def test_info_on_the_vllm_list_and_megatron_map(files, capsys):
    assert run(["info", str(files["vllm"])]) == 0
    assert ("3 MoE layers, E = 8, 12 slots per layer; the GPU count is not in the file "
            "(evaluate takes it from --gpus)") in capsys.readouterr().out
    assert run(["info", str(files["megatron"])]) == 0
    assert "3 MoE layers, E = 8, G = 4, 2 slots per GPU (0 redundant)" in \
        capsys.readouterr().out


def test_info_prints_the_gap_as_place_does(files, capsys):
    gap = load_placement(files["flat"]).metadata["record"]["gap"]
    assert run(["info", str(files["flat"])]) == 0
    assert f"gap {100 * gap:.2f}%" in capsys.readouterr().out


def test_the_sglang_count_file_is_a_profile_of_the_moe_layers(files, capsys):
    """Dense layer 0 (all zero) is dropped: the loads of the 3 MoE layers come back."""
    assert run(["info", str(files["sglang-count"])]) == 0
    assert "3 layers x 8 experts, top-1, 800 tokens" in capsys.readouterr().out
    out = files["sglang-count"].parent / "from-count.json"
    assert run(["place", str(files["sglang-count"]), "--gpus", "4", "--method", "linear",
                "-o", str(out)]) == 0


def _refused(argv: list[str], capsys, path: Path, expected: str, got: str) -> None:
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: file: expected {expected}, got {got}\n"


PROFILE_EXPECTED = "a routing trace or profile (.npz with load [layers, experts])"
TRACE_EXPECTED = ("a per-token routing trace (an .npz with topk_ids [tokens, layers, k], or an "
                  "engine dump moetuner reads)")


@pytest.mark.parametrize("key", ["vllm", "megatron", "placement", "sglang", "vllm-ascend",
                                 "calibration", "sweep-point", "sidecar"])
def test_place_and_profile_refuse_what_is_not_a_trace_or_profile(files, key, capsys, tmp_path):
    path, got = files[key], DESCRIPTION[EXPECTED_KIND[key]]
    _refused(["place", str(path), "--gpus", "4", "--method", "linear", "-o",
              str(tmp_path / "p.json")], capsys, path, PROFILE_EXPECTED, got)
    _refused(["profile", str(path), "-o", str(tmp_path / "p.npz")], capsys, path,
             PROFILE_EXPECTED, got)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["profile", "megatron", "vllm", "sglang-count"])
def test_evaluate_refuses_a_trace_that_is_not_one(files, key, capsys):
    path = files[key]
    _refused(["evaluate", str(files["placement"]), "--trace", str(path)], capsys, path,
             TRACE_EXPECTED, DESCRIPTION[EXPECTED_KIND[key]])


@pytest.mark.parametrize("key", ["trace", "profile", "sglang-count", "calibration"])
def test_evaluate_refuses_a_placement_that_is_not_one(files, key, capsys):
    path = files[key]
    _refused(["evaluate", str(path), "--trace", str(files["trace"])], capsys, path,
             "a placement: moetuner JSON, or a file moetuner export writes (SGLang JSON with "
             "its sidecar, vLLM JSON list, vLLM-Ascend JSON, Megatron .npy)",
             DESCRIPTION[EXPECTED_KIND[key]])


def test_every_engine_placement_reads_back_as_evaluate_reads_it(files):
    original = load_placement(files["placement"])
    for key in ("sglang", "vllm-ascend"):
        assert np.array_equal(read_placement(files[key]).phy2log, original.phy2log)
    vllm = read_placement(files["vllm"], num_gpus=4)
    assert np.array_equal(vllm.phy2log, original.phy2log) and vllm.num_gpus == 4
    with pytest.raises(InputError, match="--gpus: num_gpus: expected the GPU count"):
        read_placement(files["vllm"])
    flat = load_placement(files["flat"])
    assert np.array_equal(read_placement(files["megatron"]).phy2log, flat.phy2log)


def test_export_converts_engine_files_but_not_the_vllm_list(files, capsys, tmp_path):
    out = tmp_path / "again.json"
    assert run(["export", str(files["vllm-ascend"]), "--format", "sglang",
                "--num-hidden-layers", "3", "-o", str(out)]) == 0
    capsys.readouterr()
    _refused(["export", str(files["vllm"]), "--format", "sglang", "-o",
              str(tmp_path / "x.json")], capsys, files["vllm"],
             "a placement that records its GPU count (a vLLM list does not: give the "
             "moetuner placement it was exported from)", DESCRIPTION["vllm-placement"])


def test_unknown_and_missing_files(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    assert run(["info", str(other)]) == 2
    assert capsys.readouterr().err == (
        f"error: {other}: file: expected a file moetuner reads or writes: a trace, a profile, "
        "a placement (moetuner, SGLang, vLLM, vLLM-Ascend, Megatron), a calibration, a "
        "sweep point or table\n")
    with pytest.raises(InputError, match="an existing file"):
        identify(tmp_path / "missing.json")


def test_content_rules():
    """A placement's rows hold every id; loads and traces do not."""
    assert covers_ids(np.array([[0, 1, 2, 3], [3, 2, 1, 0, ][::-1]]))
    assert covers_ids(np.array([[0, 1, 2, 0]]))                 # a replica of expert 0
    assert not covers_ids(np.array([[3, 1, 2, 2]]))             # loads: no expert 0
    assert not covers_ids(np.array([[0.0, 1.0]]))               # floats are loads
    assert not covers_ids(np.array([[0, 5]]))                   # id 5 outside a row of 2
    assert is_megatron_map(np.array([[0, 0, 1, 1], [1, 0, 1, 0]]))
    assert not is_megatron_map(np.array([[0, 2, 1], [1, 2, 0]]))   # G = 3 = row length
    assert not is_megatron_map(np.zeros((2000, 4), dtype=np.int64))  # too many rows


def test_evaluate_says_held_out_only_when_the_placement_was_profiled_elsewhere(
        tmp_path, capsys):
    """Profiled on set0, evaluated on set1: held-out; on set0 or profiled on the whole file:
    in-sample; an engine file without provenance: neither."""
    trace = tmp_path / "trace.npz"
    random_trace(np.random.default_rng(2), 300, 24, 32, 4, sequences=6).save(trace)
    placements = {}
    for name, selection in (("part", ["--select", "seq_dataset=set0"]), ("whole", [])):
        placements[name] = tmp_path / f"{name}.json"
        assert run(["place", str(trace), *selection, "--gpus", "4", "--method", "linear",
                    "-o", str(placements[name])]) == 0
    engine = tmp_path / "engine.json"
    assert run(["export", str(placements["part"]), "--format", "vllm-ascend",
                "-o", str(engine)]) == 0
    capsys.readouterr()

    def header(*names, select="seq_dataset=set1"):
        assert run(["evaluate", *map(str, names), "--trace", str(trace), "--select", select,
                    "--model", "gpt-oss-20b", "--exec", "return", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        return data["title"], data["sample"]

    assert header(placements["part"]) == ("MoE layers on the held-out trace",
                                          {"part": "held-out"})
    assert header(placements["part"], select="seq_dataset=set0") == (
        "MoE layers on the profiled trace (in-sample for part: figures flatter them)",
        {"part": "in-sample"})
    assert header(placements["part"], placements["whole"])[1] == {
        "part": "held-out", "whole": "in-sample"}
    assert header(placements["part"], engine) == (
        "MoE layers on the evaluation trace", {"part": "held-out", "engine": "unknown"})
    out = tmp_path / "report"
    assert run(["report", str(placements["whole"]), "--trace", str(trace), "--model",
                "gpt-oss-20b", "--exec", "return", "-o", str(out)]) == 0
    assert ("<h2>MoE layers on the profiled trace (in-sample for whole: figures flatter "
            "them)</h2>") in (out / "index.html").read_text()


def test_info_prints_a_gap_of_0_8275_as_82_75_percent(tmp_path, capsys):
    """The solve record as place prints it (objective and bound to 6 digits, the gap in %)."""
    placement = Placement(phy2log=np.array([[0, 1, 2, 3]]), num_gpus=2, num_experts=4,
                          metadata={"method": "moetuner", "record": {
                              "status": "time_limit", "objective": 12.5, "bound": 2.156,
                              "gap": 0.8275, "solve_time": 20.04}})
    path = tmp_path / "p.json"
    placement.save(path)
    assert run(["info", str(path)]) == 0
    assert ("method moetuner, status time_limit, objective 12.5, bound 2.156, gap 82.75%, "
            "solve time 20.04 s") in capsys.readouterr().out


IDS = np.array([[[0, 1], [2, 3]], [[1, 0], [2, 0]], [[3, 2], [3, 1]], [[2, 0], [1, 0]]])


@pytest.mark.parametrize("name, write, kind", [
    ("ex.npy", lambda p: np.save(p, IDS[:, :, 0]), "exflow"),
    ("loads.npy", lambda p: np.save(p, np.array([[1.5, 2.0], [3.0, 4.0]])), "loads"),
    ("loads.json", lambda p: p.write_text("[[3, 1, 2, 2], [1, 1, 1, 5]]"), "loads"),
    ("loads.csv", lambda p: p.write_text("3,1,2,2\n1,1,1,5\n"), "loads"),
    ("req.jsonl", lambda p: p.write_text(json.dumps({"routed_experts": IDS.tolist()})),
     "vllm-jsonl"),
    ("req.npz", lambda p: np.savez(p, r0=IDS, r1=IDS[:2]), "vllm-requests"),
    ("dir", lambda p: (p.mkdir(), np.save(p / "r0.npy", IDS)), "vllm-requests"),
])
def test_other_tools_files_are_identified(tmp_path, capsys, name, write, kind):
    path = tmp_path / name
    write(path)
    assert identify(path).name == kind
    assert run(["info", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: {DESCRIPTION[kind]}\n")


def test_sglang_recorder_dumps_are_identified(tmp_path):
    torch = pytest.importorskip("torch", reason="SGLang dumps are torch.save'd (moetuner[torch])")
    stat, per_token = tmp_path / "stat.pt", tmp_path / "tokens.pt"
    torch.save({"logical_count": torch.ones(2, 3, 4, dtype=torch.int64)}, stat)
    torch.save({"records": [{"topk_ids_of_layer": torch.tensor(IDS.transpose(1, 0, 2))}],
                "last_physical_to_logical_map": torch.tensor([[0, 1, 2, 3]] * 2)}, per_token)
    assert identify(stat).name == "sglang-stat"
    assert identify(per_token).name == "sglang-per-token"


def test_info_on_a_calibration_a_sweep_point_and_a_sidecar(files, capsys):
    assert run(["info", str(files["calibration"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("  tokens_per_gpu_batch ") and "compute_efficiency 0.4," in out[1]
    assert "None" not in out[1] and out[2].startswith("  measured on cpu ")
    assert run(["info", str(files["sweep-point"])]) == 0
    out = capsys.readouterr().out
    assert "  point: gpus 4, nodes 1, redundant 0, gpu h100, method linear" in out
    assert run(["info", str(files["sidecar"])]) == 0
    assert "  4 hidden layers, 3 MoE layers, E = 8, G = 4, 4 redundant" in \
        capsys.readouterr().out
