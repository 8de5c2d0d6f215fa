import numpy as np
import pytest

from conftest import SLICE
from moetuner.cli import run
from moetuner.profile import load_profile
from moetuner.trace import load_trace


def test_profile_and_info_on_shipped_slice(tmp_path, capsys):
    out = tmp_path / "mmlu.npz"
    assert run(["profile", str(SLICE), "--select", "seq_dataset=mmlu*", "--drop",
                "seq_repetition", "-o", str(out)]) == 0
    profile = load_profile(out)
    trace = load_trace(SLICE, select=["seq_dataset=mmlu*"], drop=["seq_repetition"])
    assert profile.tokens == trace.num_tokens
    np.testing.assert_array_equal(profile.load.sum(axis=1), trace.num_tokens * 4)
    assert profile.provenance[0]["selection"] == "seq_dataset=mmlu*; drop seq_repetition"
    capsys.readouterr()
    assert run(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "24 layers x 32 experts" in text and "MI to next" in text
    assert run(["info", str(SLICE)]) == 0
    assert "seq_dataset" in capsys.readouterr().out


def test_bad_input_exits_2_without_output(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, topk_ids=np.array([[[0, 40]]]), num_experts=np.array(32))
    out = tmp_path / "p.npz"
    assert run(["profile", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "topk_ids" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    assert run(["profile", str(SLICE), "--select", "seq_nope=1", "-o", str(out)]) == 2
    assert run(["info", str(tmp_path / "missing.npz")]) == 2
    assert not out.exists()


def test_profiles_of_several_traces_add_up(tmp_path):
    both = tmp_path / "both.npz"
    assert run(["profile", str(SLICE), str(SLICE), "--drop", "seq_repetition",
                "-o", str(both)]) == 0
    once = load_profile(both)
    single = tmp_path / "one.npz"
    assert run(["profile", str(SLICE), "--drop", "seq_repetition", "-o", str(single)]) == 0
    np.testing.assert_array_equal(once.transitions, 2 * load_profile(single).transitions)
    assert len(once.provenance) == 2


def test_info_reads_a_loads_json_as_a_profile(tmp_path, capsys):
    loads = tmp_path / "loads.json"
    loads.write_text("[[3, 1, 2, 2], [1, 1, 1, 5]]")
    assert run(["info", str(loads)]) == 0
    assert "2 layers x 4 experts" in capsys.readouterr().out


def _evaluate_setup(tmp_path):
    from moetuner.cluster import make_cluster
    from moetuner.methods import place
    from moetuner.profile import profile_trace

    trace = load_trace(SLICE)
    path = tmp_path / "eplb.json"
    place(profile_trace(trace), make_cluster(2), "eplb_fixed")[0].save(path)
    return ["evaluate", str(path), "--trace", str(SLICE), "--exec", "return"]


def test_evaluate_phases_kernels_and_replays_say_their_regime(tmp_path, capsys):
    import json
    import re

    base = _evaluate_setup(tmp_path)
    requests = len(load_trace(SLICE).seq_lens)

    def evaluated(*flags):
        assert run([*base, *flags, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    prefill = evaluated("--phase", "prefill", "--steps", "2")
    assert (prefill["phase"], prefill["kernel"]) == ("prefill", "deepep-normal")
    assert re.fullmatch(rf"prefill: 8,192 tokens per step \([\d,]+ requests drawn\), "
                        rf"resampled from {requests:,} recorded requests, 2 steps",
                        prefill["batching"]), prefill["batching"]
    assert {(r["phase"], r["kernel"], r["steps"]) for r in prefill["rows"]} == {
        ("prefill", "deepep-normal", 2)}
    nccl = evaluated("--kernel", "nccl", "--tokens-per-gpu", "16", "--steps", "3")
    assert (nccl["phase"], nccl["kernel"]) == ("decode", "nccl")
    assert nccl["batching"] == (f"decode: 32 running sequences per step, resampled from "
                                f"{requests:,} recorded requests, 3 steps")
    assert {r["kernel"] for r in nccl["rows"]} == {"nccl"}
    recorded = evaluated("--replay", "recorded")
    assert recorded["batching"].startswith("recorded order: decode, 256 running sequences")
    assert any("--replay serving" in note for note in recorded["warnings"])
    average = evaluated("--replay", "average")
    assert average["batching"].startswith("whole-trace average")
    assert {r["steps"] for r in average["rows"]} == {1}
    # The text output names the phase, kernel and steps too.
    assert run([*base, "--phase", "prefill", "--kernel", "nccl", "--steps", "1"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "prefill on nccl kernels" in text
    assert "steps: prefill: 8,192 tokens per step" in text


def test_evaluate_bad_phase_kernel_and_sizes_exit_2_naming_the_flag(tmp_path, capsys):
    base = _evaluate_setup(tmp_path)
    for flags, flag in ((["--phase", "x"], "--phase"), (["--kernel", "y"], "--kernel"),
                        (["--tokens-per-gpu", "0"], "--tokens-per-gpu"),
                        (["--replay", "z"], "--replay"), (["--steps", "0"], "--steps")):
        assert run([*base, *flags]) == 2, flags
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0], (flags, captured.err)
        assert not captured.out


@pytest.mark.parametrize("flag", ["--tokens-per-gpu", "--steps"])
def test_evaluate_huge_step_sizes_exit_2(tmp_path, capsys, flag):
    base = _evaluate_setup(tmp_path)
    assert run([*base, flag, "99999999999999999999"]) == 2
    assert flag in capsys.readouterr().err
