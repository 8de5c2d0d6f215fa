"""The bad inputs of issue 11 ("Bad input"), one test each: a clean error, exit 2, nothing
lost or left behind."""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from moetuner.cli import run
from moetuner.errors import InputError
from moetuner.inputs import read_profile, read_trace
from moetuner.io import (
    as_bool,
    as_int,
    int_array,
    read_json,
    write_json,
)
from moetuner.placement import Placement, load_placement
from moetuner.profile import load_profile, profile_trace
from moetuner.report import write_report
from moetuner.synth import synthesize_trace
from moetuner.trace import Trace, load_trace

IDS = np.array([[[0, 1], [2, 3]], [[1, 0], [2, 0]], [[3, 2], [3, 1]], [[2, 0], [1, 0]]])
PHY2LOG = [[0, 1, 2, 3], [3, 2, 1, 0]]


def _trace_file(tmp_path, **arrays):
    path = tmp_path / "trace.npz"
    np.savez(path, **{"topk_ids": IDS, "seq_lens": np.array([3, 1]),
                      "seq_dataset": np.array(["a", "b"]), **arrays})
    return path


def _placement_file(tmp_path, **fields):
    data = {**Placement(phy2log=np.array(PHY2LOG), num_gpus=2, num_experts=4).to_dict(),
            **fields}
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(data))
    return path


def _fails(argv, capsys, *words):
    """Run the CLI; assert exit 2 with one error line naming ``words``, no traceback."""
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1 or all(w in err for w in words), err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: b"", "EOFError"),
    (lambda raw: raw[: len(raw) // 2], "Bad"),
    (lambda raw: pickle.dumps({"topk_ids": IDS}), "pickled"),
    (lambda raw: bytes(range(256)) * 4, "file"),
])
def test_damaged_npz_names_the_file(tmp_path, damage, reason):
    path = _trace_file(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(InputError) as err:
        load_trace(path)
    assert str(path) in str(err.value) and reason.lower() in str(err.value).lower()


def test_bit_flipped_member_names_the_array(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, topk_ids=np.zeros((200, 2, 1), dtype=np.int64))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10                          # inside the topk_ids data: bad CRC
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="topk_ids: .*CRC"):
        read_trace(path)


def test_pickled_object_npy_is_refused(tmp_path):
    path = tmp_path / "exflow.npy"
    np.save(path, np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="exflow.npy: file"):
        read_trace(path)


def test_non_utf8_jsonl_and_deep_json(tmp_path):
    jsonl = tmp_path / "v.jsonl"
    jsonl.write_bytes(b'{"routed_experts": [[[0]]]}\n\xff\xfe{"routed_experts": 1}\n')
    with pytest.raises(InputError, match="line 2"):
        read_trace(jsonl)
    deep = tmp_path / "loads.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="RecursionError"):
        read_profile(deep)


@pytest.mark.parametrize("arrays, field", [
    ({"topk_ids": IDS.astype(str)}, "topk_ids"),
    ({"topk_ids": IDS.astype(float)}, "topk_ids"),
    ({"num_experts": np.array("4")}, "num_experts"),
    ({"num_experts": np.array([4, 4])}, "num_experts"),
    ({"topk_weights": np.full(IDS.shape, "w")}, "topk_weights"),
    ({"topk_ids": np.full(IDS.shape, np.iinfo(np.uint64).max, dtype=np.uint64)},
     "num_experts"),
])
def test_wrong_types_in_a_trace(tmp_path, arrays, field):
    with pytest.raises(InputError, match=field):
        load_trace(_trace_file(tmp_path, **arrays))


def test_one_huge_id_is_refused_before_allocating(tmp_path, capsys):
    ids = IDS.copy()
    ids[0, 0, 0] = 2**40
    trace = _trace_file(tmp_path, topk_ids=ids)
    _fails(["profile", str(trace), "-o", str(tmp_path / "p.npz")], capsys, "num_experts",
           "16384")
    # Within the expert bound, the [L, E, E] counts are bounded too.
    ids[0, 0, 0] = 16000
    big = Trace(topk_ids=np.repeat(ids, 1, axis=1), num_experts=16001)
    with pytest.raises(InputError, match="count cells"):
        profile_trace(big)


def test_profile_metadata_of_the_wrong_type(tmp_path):
    good = profile_trace(Trace(topk_ids=IDS, num_experts=4))
    for name, value, field in [("provenance_json", np.asarray("{not json"), "provenance_json"),
                               ("provenance_json", np.asarray('{"a": 1}'), "provenance_json"),
                               ("top_k", np.asarray(2.5), "top_k"),
                               ("tokens", np.asarray([1, 2]), "tokens"),
                               ("load", np.full((2, 4), np.nan), "load"),
                               ("load", -np.ones((2, 4)), "load")]:
        path = tmp_path / "p.npz"
        good.save(path)
        with np.load(path) as data:
            arrays = dict(data)
        arrays[name] = value
        np.savez(path, **arrays)
        with pytest.raises(InputError, match=field):
            load_profile(path)


@pytest.mark.parametrize("fields, field", [
    ({"phy2log": [[0, 1, 2, 3], [3, 2, 1, 2.25]]}, "phy2log"),
    ({"phy2log": [[0, 1, 2, "3"], [3, 2, 1, 0]]}, "phy2log"),
    ({"phy2log": [[0, 1, 2, True], [3, 2, 1, 0]]}, "phy2log"),
    ({"phy2log": [[0, 1, 2], [3, 2, 1, 0]]}, "phy2log"),
    ({"phy2log": [[0, 1, 2, 2**70], [3, 2, 1, 0]]}, "phy2log"),
    ({"num_gpus": None}, "num_gpus"),
    ({"num_gpus": "2"}, "num_gpus"),
    ({"num_experts": 2**40}, "num_experts"),
    ({"allow_shared_gpu": "no"}, "allow_shared_gpu"),
    ({"allow_empty_slots": 0}, "allow_empty_slots"),
    ({"metadata": [1, 2]}, "metadata"),
    ({"slots_per_gpu": 2.0}, "slots_per_gpu"),
])
def test_placement_fields_are_not_coerced(tmp_path, fields, field):
    with pytest.raises(InputError, match=field):
        load_placement(_placement_file(tmp_path, **fields))


def test_field_helpers():
    assert as_int(np.asarray(3), "f", "x") == 3 and as_bool(np.asarray(True), "f", "x") is True
    for bad in (True, 2.0, "2", None, [2]):
        with pytest.raises(InputError):
            as_int(bad, "f", "x")
    with pytest.raises(InputError, match=r"in \[1, 4\], got 5"):
        as_int(5, "f", "x", 1, 4)
    with pytest.raises(InputError, match="fit int64"):
        int_array([[2**63]], "f", "x", 2, "[a, b]")
    np.testing.assert_array_equal(int_array([[1, 2]], "f", "x", 2, "[a, b]"), [[1, 2]])


def test_json_out_is_strict_and_json_in_refuses_nan(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"gap": float("inf"), "values": np.array([1.5, np.nan])})
    assert json.loads(path.read_text()) == {"gap": None, "values": [1.5, None]}
    path.write_text('{"gap": NaN}')
    with pytest.raises(InputError, match="NaN"):
        read_json(path, "a JSON object")


def test_outputs_that_would_destroy_an_input_are_refused(tmp_path, capsys):
    trace = _trace_file(tmp_path)
    placement = _placement_file(tmp_path, phy2log=[[0, 1, 2, 3]] * 2)
    saved = {p: p.read_bytes() for p in (trace, placement)}
    _fails(["profile", str(trace), "-o", str(trace)], capsys, "-o", "input")
    _fails(["place", str(trace), "--gpus", "2", "--method", "linear", "-o", str(trace)],
           capsys, "-o")
    _fails(["synth", "--like", str(trace), "--layers", "2", "--experts", "4", "--topk", "2",
            "--tokens", "10", "-o", str(trace)], capsys, "-o")
    _fails(["export", str(placement), "--format", "vllm-ascend", "-o", str(placement)],
           capsys, "-o")
    _fails(["profile", str(trace), "-o", str(tmp_path)], capsys, "directory")
    _fails(["profile", str(trace), "-o", ""], capsys, "-o")
    _fails(["report", str(placement), "--trace", str(trace), "-o", ""], capsys, "-o")
    _fails(["profile", str(trace), "-o", str(trace / "x.npz")], capsys, "not a file")
    assert {p: p.read_bytes() for p in saved} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json", "trace.npz"]


def test_missing_output_folders_are_created(tmp_path):
    out = tmp_path / "new" / "dir" / "p.npz"
    assert run(["profile", str(_trace_file(tmp_path)), "-o", str(out)]) == 0
    assert load_profile(out).tokens == 4


def test_report_writes_all_files_or_none(tmp_path):
    trace = Trace(topk_ids=IDS, num_experts=4)
    from moetuner.cluster import make_cluster
    from moetuner.evaluate import compare
    from moetuner.models import get_model

    placement = Placement(phy2log=np.array(PHY2LOG), num_gpus=2, num_experts=4)
    model = replace(get_model("gpt-oss-20b"), num_hidden_layers=2, num_experts=4, top_k=2)
    rows, replays = compare({"p": placement}, trace, make_cluster(2), model, ("return",))
    out = tmp_path / "report"
    (out / "index.html").mkdir(parents=True)        # the page cannot be written
    with pytest.raises(InputError):
        write_report(out, rows, replays, np.eye(4), 0, {
            "tokens": 4, "trace": "t", "selection": "all", "model": "m",
            "cluster": make_cluster(2).to_dict()})
    assert [p.name for p in out.iterdir()] == ["index.html"]


def test_empty_selection_and_zero_gpus_are_refused(tmp_path, capsys):
    trace = _trace_file(tmp_path)
    placement = _placement_file(tmp_path)
    _fails(["place", str(trace), "--select", "seq_dataset=zz", "--gpus", "2", "--method",
            "linear", "-o", str(tmp_path / "p.json")], capsys, "--select", "tokens")
    _fails(["evaluate", str(placement), "--trace", str(trace), "--select", "seq_dataset=zz",
            "--model", "gpt-oss-20b"], capsys, "--select", "tokens")
    _fails(["evaluate", str(placement), "--trace", str(trace), "--gpus", "0", "--model",
            "gpt-oss-20b"], capsys, "--gpus")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("flags, word", [
    (["--time-limit", "nan"], "--time-limit"),
    (["--time-limit", "inf"], "--time-limit"),
    (["--intra-bw", "nan"], "--intra-bw"),
    (["--inter-bw", "inf"], "--inter-bw"),
    (["--nodes", "3"], "--nodes"),
    (["--gpu", "h999"], "--gpu"),
    (["--redundant", "-1"], "--redundant"),
])
def test_bad_place_flags(tmp_path, capsys, flags, word):
    _fails(["place", str(_trace_file(tmp_path)), "--gpus", "2", "--method", "linear",
            "-o", str(tmp_path / "p.json"), *flags], capsys, word)
    assert not (tmp_path / "p.json").exists()


def test_synth_bounds_and_one_layer_traces(tmp_path, capsys):
    _fails(["synth", "--layers", "1000000", "--experts", "8", "--topk", "2", "--tokens", "10",
            "-o", str(tmp_path / "s.npz")], capsys, "--layers", "1024")
    _fails(["synth", "--layers", "2", "--experts", "8", "--topk", "2", "--tokens",
            str(2**40), "-o", str(tmp_path / "s.npz")], capsys, "--tokens")
    _fails(["synth", "--layers", "2", "--experts", "8", "--topk", "2", "--tokens", "10",
            "--seed", "-1", "-o", str(tmp_path / "s.npz")], capsys, "--seed")
    one_layer = profile_trace(Trace(topk_ids=IDS[:, :1], num_experts=4))
    synthetic = synthesize_trace(3, 8, 2, 50, like=one_layer)
    assert synthetic.topk_ids.shape == (50, 3, 2)
    layer_file = tmp_path / "one.npz"
    np.savez(layer_file, topk_ids=IDS[:, :1])
    assert run(["synth", "--like", str(layer_file), "--layers", "1", "--experts", "4",
                "--topk", "2", "--tokens", "20", "-o", str(tmp_path / "s.npz")]) == 0


def test_collect_flags_and_outputs_are_checked_before_the_model_loads(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    base = ["collect", "--model", str(tmp_path / "no-model"), "--data", str(prompts)]
    _fails([*base, "-o", str(prompts)], capsys, "-o", "input")
    _fails([*base, "-o", str(tmp_path / "t.npz"), "--batch-size", "0"], capsys, "--batch-size")
    _fails([*base, "-o", str(tmp_path / "t.npz"), "--decode-tokens", "-1"], capsys,
           "--decode-tokens")
    assert prompts.read_text() == "hello\n" and not (tmp_path / "t.npz").exists()


@pytest.mark.parametrize("text, field", [
    ('{"compute_efficiency": true}', "compute_efficiency"),
    ('{"tokens_per_gpu_batch": "128"}', "tokens_per_gpu_batch"),
    ('{"memory_efficiency": NaN}', "NaN is not a JSON number"),
    # Latencies are per kernel and direction now: the old global ones are unknown keys.
    ('{"inter_latency": 1e-5}', "inter_latency"),
    ('{"kernels": {"nccl": {"dispatch": {"latency": -1}}}}', "kernels.nccl.dispatch.latency"),
    ('{"kernels": {"nccl": {"dispatch": {"intra_efficiency": 0}}}}', "intra_efficiency"),
    ('{"kernels": {"nccl": {"both": {}}}}', "kernels.nccl"),
    ('{"kernels": {"gloo": {}}}', "gloo"),
    ('[1, 2]', "keys"),
])
def test_bad_calibration_files(tmp_path, text, field):
    from moetuner.costmodel import load_coefficients

    path = tmp_path / "calib.json"
    path.write_text(text)
    with pytest.raises(InputError, match=field):
        load_coefficients(path)


def test_an_unwritable_path_is_an_input_error_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="writable"):
        write_json(blocker / "out.json", {"a": 1})
    (tmp_path / "out.json").mkdir()                     # os.replace onto a folder fails
    with pytest.raises(InputError, match="writable"):
        write_json(tmp_path / "out.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out.json"]
    assert blocker.read_text() == "x" and not any((tmp_path / "out.json").iterdir())


# ---------------------------------------------------------------- issue 17, item 13


def _npz_with_raw_member(path):
    """A zip like an .npz whose topk_ids member is not an .npy file (numpy hands it back as
    bytes); the other members are proper .npy arrays."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("topk_ids", b"not an npy file")
        for name, array in {"seq_lens": np.array([3, 1]), "seq_dataset": np.array(["a", "b"])
                            }.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{name}.npy", buffer.getvalue())
    return path


@pytest.mark.parametrize("command", ["info", "place", "profile", "evaluate", "report",
                                     "synth", "export"])
def test_an_npz_member_that_is_not_npy_is_refused(tmp_path, capsys, command):
    bad = str(_npz_with_raw_member(tmp_path / "raw.npz"))
    out = tmp_path / "out"
    argv = {"info": ["info", bad],
            "place": ["place", bad, "--gpus", "2", "--method", "linear", "-o", f"{out}.json"],
            "profile": ["profile", bad, "-o", f"{out}.npz"],
            "evaluate": ["evaluate", str(_placement_file(tmp_path)), "--trace", bad],
            "report": ["report", str(_placement_file(tmp_path)), "--trace", bad, "-o",
                       str(out)],
            "synth": ["synth", "--like", bad, "--layers", "2", "--experts", "4", "--topk", "2",
                      "--tokens", "10", "-o", f"{out}.npz"],
            "export": ["export", bad, "--format", "sglang-count", "-o", f"{out}.json"],
            }[command]
    err = _fails(argv, capsys, bad, "topk_ids")
    assert err == (f"error: {bad}: topk_ids: expected an .npy array member (as numpy's savez "
                   "writes), got a member that is not an .npy file\n")
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("fmt", ["sglang", "vllm", "vllm-ascend", "megatron"])
@pytest.mark.parametrize("output", ["", "."])
def test_export_to_an_empty_path_is_refused(tmp_path, capsys, fmt, output, monkeypatch):
    monkeypatch.chdir(tmp_path)
    placement = _placement_file(tmp_path)
    err = _fails(["export", str(placement), "--format", fmt, "-o", output], capsys, "-o")
    assert err == "error: -o: path: expected a file path, got '.' (empty, or the current " \
        "folder)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json"]


@pytest.mark.parametrize("metadata", [{"record": "oops"}, {"record": [1, 2]},
                                      {"record": {"gap": "x", "objective": [1]}}, {}])
def test_info_on_placement_metadata_of_any_shape(tmp_path, capsys, metadata):
    assert run(["info", str(_placement_file(tmp_path, metadata=metadata))]) == 0
    out = capsys.readouterr().out
    assert "method ?, status ?, objective -, bound -, gap -, solve time - s" in out


@pytest.mark.parametrize("weights, got", [
    (np.full((4, 2, 1), 0.5), "float64 [4, 2, 1]"),             # k = 1 beside k = 2
    (np.full((4, 2, 3), 0.5), "float64 [4, 2, 3]"),             # k = 3
    (np.full((4, 2, 2), "a"), "<U1 [4, 2, 2]"),                 # strings
    (np.full((4, 2, 2), True), "bool [4, 2, 2]"),               # bools
    (np.full((4, 1, 2), 0.5), "float64 [4, 1, 2]"),             # one layer short
])
@pytest.mark.parametrize("command", ["profile", "place", "synth", "export", "evaluate"])
def test_topk_weights_must_match_topk_ids(tmp_path, capsys, weights, got, command):
    trace = str(_trace_file(tmp_path, topk_weights=weights))
    out = tmp_path / "out"
    argv = {"profile": ["profile", trace, "-o", f"{out}.npz"],
            "place": ["place", trace, "--gpus", "2", "--method", "linear", "-o", f"{out}.json"],
            "synth": ["synth", "--like", trace, "--layers", "2", "--experts", "4", "--topk",
                      "2", "--tokens", "10", "-o", f"{out}.npz"],
            "export": ["export", trace, "--format", "sglang-count", "-o", f"{out}.json"],
            "evaluate": ["evaluate", str(_placement_file(tmp_path)), "--trace", trace,
                         "--model", "gpt-oss-20b"],
            }[command]
    err = _fails(argv, capsys, trace, "topk_weights")
    assert err == (f"error: {trace}: topk_weights: expected numbers in the shape of topk_ids "
                   f"[4, 2, 2], got {got}\n")
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("command", ["place", "profile", "evaluate", "synth", "report"])
@pytest.mark.parametrize("flags, named", [
    (["--select", "seq_dataset=zz"], "--select"),
    (["--select", "seq_dataset=a", "--select", "seq_dataset=b"], "--select"),  # and: none
    (["--drop", "seq_all"], "--drop"),
    (["--select", "seq_dataset=zz", "--drop", "seq_all"], "--select/--drop"),
])
def test_a_selection_that_keeps_nothing_names_the_flag(tmp_path, capsys, command, flags,
                                                       named):
    trace = str(_trace_file(tmp_path, seq_all=np.array([True, True])))
    out = tmp_path / "out"
    argv = {"place": ["place", trace, "--gpus", "2", "--method", "linear", "-o", f"{out}.json"],
            "profile": ["profile", trace, "-o", f"{out}.npz"],
            "evaluate": ["evaluate", str(_placement_file(tmp_path)), "--trace", trace],
            "synth": ["synth", "--like", trace, "--layers", "2", "--experts", "4", "--topk",
                      "2", "--tokens", "10", "-o", f"{out}.npz"],
            "report": ["report", str(_placement_file(tmp_path)), "--trace", trace, "-o",
                       str(out)],
            }[command]
    err = _fails([*argv, *flags], capsys, named)
    given = " ".join(f"{flags[i]} {flags[i + 1]}" for i in range(0, len(flags), 2))
    assert err == (f"error: {named}: selection: expected a selection that keeps tokens of "
                   f"{trace}, got none kept by {given}\n")
    assert not list(tmp_path.glob("out*"))


def test_a_one_layer_trace_warns_nothing(tmp_path, capsys):
    """One MoE layer has no consecutive pair: no mutual information, and no numpy warning
    about the mean of an empty array."""
    trace = str(_trace_file(tmp_path, topk_ids=IDS[:, :1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(["profile", trace, "-o", str(tmp_path / "p.npz")]) == 0
        assert run(["info", trace]) == 0
        assert run(["synth", "--like", trace, "--layers", "1", "--experts", "4", "--topk", "2",
                    "--tokens", "10", "-o", str(tmp_path / "s.npz")]) == 0
        assert run(["place", trace, "--gpus", "2", "--method", "moetuner", "-o",
                    str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "profiled 4 tokens, 1 layers x 4 experts, top-2" in out
    assert "nan" not in out.lower() and "MI mean" not in out


def test_a_foreign_pickle_as_pt_is_one_line(tmp_path, capsys):
    pytest.importorskip("torch", reason="reading .pt dumps needs torch (moetuner[torch])")
    path = tmp_path / "dump.pt"
    path.write_bytes(pickle.dumps({"topk_ids": [1, 2], "x": object.__class__}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's pickle-protocol warning is not shown
        err = _fails(["info", str(path)], capsys, str(path))
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: file: expected a torch.save'd SGLang recorder dump, "
                          "got UnpicklingError: ")
