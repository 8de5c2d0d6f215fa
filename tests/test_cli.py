import numpy as np

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
