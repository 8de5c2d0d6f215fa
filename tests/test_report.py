"""The HTML report and the evaluate/report command lines (exit codes, outputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moetuner.cli import run
from moetuner.cluster import make_cluster
from moetuner.evaluate import compare
from moetuner.methods.linear import linear_phy2log
from moetuner.models import ModelSpec
from moetuner.placement import Placement
from moetuner.report import write_report
from moetuner.trace import Trace

# The gpt-oss-20b preset's shape (24 layers, 32 experts, top-4), so --model can be inferred.
LAYERS, EXPERTS, K = 24, 32, 4
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((64, LAYERS, EXPERTS)), axis=2)[:, :, :K]
    trace = Trace(topk_ids=ids, num_experts=EXPERTS, seq_lens=np.array([40, 24]),
                  seq_labels={"seq_dataset": np.array(["mmlu", "gpqa"])})
    trace.save(tmp_path / "trace.npz")
    shuffled = np.stack([rng.permutation(EXPERTS) for _ in range(LAYERS)])
    Placement(shuffled, 8, EXPERTS).save(tmp_path / "shuffled.json")
    Placement(linear_phy2log(LAYERS, EXPERTS, 40), 8, EXPERTS).save(tmp_path / "replicas.json")
    return tmp_path


def test_write_report_writes_page_and_pngs(tmp_path):
    ids = np.array([[[0, 2], [3, 1]], [[2, 3], [0, 2]]])
    trace = Trace(topk_ids=ids, num_experts=4)
    model = ModelSpec("toy", "none", 2, (), 4, 2, 8, 4)
    swapped = Placement(np.array([[0, 2, 1, 3]] * 2), 2, 4)
    rows, replays = compare({"swapped": swapped}, trace, make_cluster(2, 2), model,
                            ("return", "follow"))
    header = {"trace": "toy.npz", "selection": "all", "tokens": 2, "model": "toy",
              "cluster": make_cluster(2, 2).to_dict()}
    page = write_report(tmp_path / "out", rows, replays, np.eye(4), 0, header)
    assert page == tmp_path / "out" / "index.html"
    for name in ("load.png", "traffic.png", "transitions.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3
    assert text.count("<tr>") == 1 + 4 and "swapped" in text and "not a measurement" in text


def test_evaluate_cli_json(files, capsys):
    code = run(["evaluate", str(files / "shuffled.json"), str(files / "replicas.json"),
                "--trace", str(files / "trace.npz"), "--select", "seq_dataset=gpqa",
                "--nodes", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 24 and out["model"] == "gpt-oss-20b" and "model" in out["note"]
    assert [(r["placement"], r["exec_model"]) for r in out["rows"]] == [
        (name, exec_model) for exec_model in ("return", "follow")
        for name in ("linear", "shuffled", "replicas")]
    assert [r["slots_per_gpu"] for r in out["rows"][:3]] == [4, 4, 5]
    assert out["rows"][0]["speedup_vs_linear"] == 1.0


def test_evaluate_cli_table(files, capsys):
    code = run(["evaluate", str(files / "shuffled.json"), "--trace", str(files / "trace.npz"),
                "--exec", "follow", "--replica-policy", "nearest"])
    assert code == 0
    out = capsys.readouterr().out
    assert "shuffled" in out and "linear" in out and "cost model" in out


@pytest.mark.parametrize("args, message", [
    (["--trace", "missing.npz"], "trace"),
    (["--exec", "sideways"], "--exec"),
    (["--replica-policy", "random"], "replica"),
    (["--gpus", "4"], "num_gpus"),
    (["--model", "mixtral-8x7b"], "--model"),
    (["--calibration", "bad.json"], "compute_efficiency"),
    (["--select", "seq_dataset"], "--select"),
])
def test_evaluate_cli_bad_input_exits_2(files, capsys, args, message):
    (files / "bad.json").write_text(json.dumps({"compute_efficiency": -1}))
    argv = ["evaluate", str(files / "shuffled.json"), "--trace", str(files / "trace.npz"),
            *[str(files / a) if a.endswith((".npz", ".json")) else a for a in args]]
    assert run(argv) == 2
    assert message in capsys.readouterr().err


def test_report_cli_writes_files_or_nothing(files, capsys):
    out_dir = files / "report"
    argv = ["report", str(files / "shuffled.json"), "--trace", str(files / "trace.npz"),
            "-o", str(out_dir), "--nodes", "2", "--layer", "3"]
    assert run(argv) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "index.html", "load.png", "traffic.png", "transitions.png"]
    assert run(["report", str(files / "shuffled.json"), "--trace", str(files / "trace.npz"),
                "-o", str(files / "none"), "--layer", str(LAYERS - 1)]) == 2
    assert "--layer" in capsys.readouterr().err
    assert not (files / "none").exists()


def _two_node_placement(files):
    """``shuffled.json`` made for 8 GPUs in 2 nodes (as ``place --nodes 2`` records it)."""
    placement = Placement.from_dict(json.loads((files / "shuffled.json").read_text()))
    metadata = {"method": "test", "cluster": make_cluster(8, 2).to_dict()}
    path = files / "two_nodes.json"
    Placement(placement.phy2log, 8, EXPERTS, metadata=metadata).save(path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "report"])
def test_nodes_default_to_the_placements_cluster(files, capsys, command):
    path = _two_node_placement(files)
    args = [command, str(path), "--trace", str(files / "trace.npz")]
    if command == "report":
        assert run([*args, "-o", str(files / "page")]) == 0
        assert "in 2\nnode(s)" in (files / "page" / "index.html").read_text()
        return
    assert run([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cluster"]["num_nodes"] == 2
    assert all(row["share_cross_node"] > 0 for row in out["rows"])
    # --nodes still overrides the placement's cluster.
    assert run([*args, "--json", "--nodes", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cluster"]["num_nodes"] == 1
    assert all(row["share_cross_node"] == 0 for row in out["rows"])


def test_nodes_default_to_one_without_a_recorded_cluster(files, capsys):
    assert run(["evaluate", str(files / "shuffled.json"), "--trace", str(files / "trace.npz"),
                "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cluster"]["num_nodes"] == 1


def test_placements_of_different_node_counts_need_nodes(files, capsys):
    two = _two_node_placement(files)
    placement = Placement.from_dict(json.loads(two.read_text()))
    four = files / "four_nodes.json"
    Placement(placement.phy2log, 8, EXPERTS,
              metadata={"cluster": make_cluster(8, 4).to_dict()}).save(four)
    code = run(["evaluate", str(two), str(four), "--trace", str(files / "trace.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "--nodes" in err and "two_nodes: 2" in err and "four_nodes: 4" in err
