"""Engine step records (issue 15, item 2): SGLang ``stat`` dumps kept per step
(``Profile.step_loads``), costed per recorded step (``replay_step_loads``), evaluated from the
CLI, and optimised on by ``joint`` (``steps_from_step_loads``)."""

import json

import numpy as np
import pytest

from conftest import random_trace
from moetuner.cli import run
from moetuner.cluster import make_cluster
from moetuner.costmodel import StepCost
from moetuner.engine import EngineSettings
from moetuner.errors import InputError
from moetuner.evaluate import STEP_LOADS_NOTE, replay_step_loads, replay_steps
from moetuner.inputs import read_profile
from moetuner.methods import PlaceOptions, place
from moetuner.methods._joint_objective import build_problem, model_for, steps_from_step_loads
from moetuner.methods.linear import linear_phy2log
from moetuner.models import MODELS, ModelSpec
from moetuner.placement import Placement
from moetuner.profile import Profile, load_profile
from moetuner.shards import sum_profiles
from moetuner.steps import prefill_steps

# [buffer_steps = 3, num_hidden_layers = 3, E = 4]: layer 0 dense (never counted), step 1
# empty (dropped).
COUNT = np.array([
    [[0, 0, 0, 0], [1, 2, 3, 4], [4, 3, 2, 1]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]],
])
STEPS = [[[1, 2, 3, 4], [4, 3, 2, 1]], [[1, 0, 0, 0], [0, 0, 1, 0]]]


def _dump(torch, path, count):
    torch.save({"rank": 0, "logical_count": torch.as_tensor(count)}, path)
    return path


def _sample_counts(sample, num_experts):
    """int64 ``[S, L, E]`` token-expert pairs of every sampled step, layer and expert."""
    S, L = sample.num_steps, sample.ids.shape[1]
    index = ((sample.step_of[:, None, None] * L + np.arange(L)[None, :, None]) * num_experts
             + sample.ids.astype(np.int64))
    return np.bincount(index.ravel(), minlength=S * L * num_experts).reshape(S, L, num_experts)


def test_stat_dump_is_kept_per_step_saved_loaded_and_added(tmp_path):
    torch = pytest.importorskip("torch")
    profile = read_profile(_dump(torch, tmp_path / "stat.pt", COUNT.astype(np.int32)))
    assert profile.load.tolist() == [[2, 2, 3, 4], [4, 3, 3, 1]]
    assert profile.step_loads.dtype == np.int64
    assert profile.step_loads.tolist() == STEPS
    profile.save(tmp_path / "p.npz")
    again = load_profile(tmp_path / "p.npz")
    assert np.array_equal(again.step_loads, profile.step_loads)
    assert np.array_equal(again.load, profile.load)
    twice = profile + again
    assert twice.step_loads.tolist() == STEPS + STEPS
    assert twice.load.tolist() == (2 * profile.load).tolist()
    assert sum_profiles([profile, again, profile]).step_loads.tolist() == STEPS * 3
    # A profile without step records added to one with them has none.
    assert (profile + Profile.from_load(profile.load)).step_loads is None


@pytest.mark.parametrize(("step_loads", "got"), [
    (np.zeros((2, 3, 4), dtype=np.int64), "[2, 3, 4]"),
    (np.zeros((2, 2), dtype=np.int64), "[2, 2]"),
    (-np.ones((1, 2, 4), dtype=np.int64), "minimum -1"),
    (np.ones((1, 2, 4)), "float64"),
])
def test_bad_step_loads_in_a_profile_file_are_refused_in_one_line(tmp_path, step_loads, got):
    path = tmp_path / "p.npz"
    np.savez(path, load=np.ones((2, 4)), step_loads=step_loads)
    with pytest.raises(InputError) as error:
        load_profile(path)
    message = str(error.value)
    assert "step_loads" in message and "[steps, 2, 4]" in message and got in message
    assert "\n" not in message


TINY = ModelSpec("tiny", "none", 1, (), 4, 2, hidden_size=64, expert_intermediate_size=32)


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("kernel", ["deepep-ll", "deepep-normal"])
def test_replay_step_loads_hand_solved(nodes, kernel):
    # GPU 0: experts 0, 1 and an empty slot; GPU 1: experts 2, 3 and a replica of 0.
    placement = Placement(np.array([[0, 1, -1, 2, 3, 0]]), 2, 4, allow_empty_slots=True)
    step_loads = np.array([[[4, 2, 0, 6]], [[0, 0, 3, 1]]])
    cluster = make_cluster(2, nodes)
    times = replay_step_loads(placement, step_loads, cluster, TINY, EngineSettings(kernel=kernel))
    # Expert 0's 4 pairs split 2 / 2: slot pairs [2, 2, 0 | 0, 6, 2] and [0, 0, 0 | 3, 1, 0].
    pairs = np.array([[4.0, 8.0], [0.0, 4.0]])
    active = np.array([[2, 2], [0, 2]])
    cost = StepCost(TINY, cluster, None, kernel)
    assert times.tokens.tolist() == [6, 2]
    assert times.peak_load[:, 0].tolist() == [8, 4]
    assert times.mean_load[:, 0].tolist() == [6, 2]
    assert np.allclose(times.compute[:, 0], cost.compute(pairs, active).max(axis=1))
    # Homes spread evenly: GPU c sends half of the other GPU's pairs and receives half of
    # its own: step 0 sends [4, 2], receives [2, 4]; step 1 sends [2, 0], receives [0, 2];
    # the busiest GPU moves 4 and 2 messages, inside the node (1 node) or across (2).
    for direction, seconds in ((0, times.dispatch), (1, times.combine)):
        latency, intra, inter = cost.message_seconds[direction]
        per_message = intra if nodes == 1 else inter
        assert np.allclose(seconds[:, 0], latency + np.array([4, 2]) * per_message)


def test_replay_step_loads_refuses_other_shapes():
    placement = Placement(linear_phy2log(1, 4, 4), 2, 4)
    with pytest.raises(InputError, match=r"step_loads.*\[steps, 1, 4\]"):
        replay_step_loads(placement, np.ones((2, 1, 3), dtype=np.int64), make_cluster(2),
                          TINY)


def _mixtral_setup(torch, tmp_path, rng):
    """A stat dump of 3 decode steps for mixtral-8x7b (32 MoE layers, 8 experts, top-2;
    one dense layer ahead) and a linear placement on 2 GPUs."""
    count = np.zeros((3, 33, 8), dtype=np.int64)
    for step, tokens in enumerate((64, 32, 48)):
        for layer in range(1, 33):
            # Each token's 2 distinct experts: pair counts of 2 draws without repetition.
            chosen = np.argsort(rng.random((tokens, 8)), axis=1)[:, :2]
            count[step, layer] = np.bincount(chosen.ravel(), minlength=8)
    dump = _dump(torch, tmp_path / "stat.pt", count)
    placement = Placement(linear_phy2log(32, 8, 8), 2, 8)
    placement.save(tmp_path / "linear2.json")
    return dump, count[:, 1:], tmp_path / "linear2.json"


def test_cli_evaluates_a_stat_dump_on_its_recorded_steps(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    dump, steps, placement = _mixtral_setup(torch, tmp_path, np.random.default_rng(0))
    assert run(["evaluate", str(placement), "--trace", str(dump)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "3 recorded engine steps (per-step loads)" in text
    assert "de-duplication is not applied" in text and "token-level traces" in text
    assert run(["evaluate", str(placement), "--trace", str(dump), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["warnings"] == [STEP_LOADS_NOTE]
    assert report["model"] == "mixtral-8x7b"
    times = replay_step_loads(Placement(linear_phy2log(32, 8, 8), 2, 8), steps,
                              make_cluster(2), MODELS["mixtral-8x7b"])
    assert [row["placement"] for row in report["rows"]] == ["linear", "linear2"]
    assert report["rows"][1]["mean_step_time_s"] == pytest.approx(times.mean_step_time)
    assert [row["steps"] for row in report["rows"]] == [3, 3]
    for flags in (["--online", "eplb"], ["--select", "seq_dataset=x"]):
        assert run(["evaluate", str(placement), "--trace", str(dump), *flags]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and flags[0] in lines[0] and "per-token trace" in lines[0]
    assert run(["info", str(dump)]) == 0
    assert "3 recorded engine steps (per-step loads)" in capsys.readouterr().out
    # The same steps from a profile file.
    read_profile(dump).save(tmp_path / "p.npz")
    assert run(["evaluate", str(placement), "--trace", str(tmp_path / "p.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][1]["mean_step_time_s"] == \
        pytest.approx(times.mean_step_time)


@pytest.mark.parametrize(("count", "field"), [
    (np.ones((3, 4), dtype=np.int64), "logical_count"),
    (-np.ones((2, 3, 4), dtype=np.int64), "logical_count"),
    (np.full((2, 3, 4), 0.5), "logical_count"),
])
def test_cli_bad_stat_dumps_exit_2_in_one_line(tmp_path, capsys, count, field):
    torch = pytest.importorskip("torch")
    dump = _dump(torch, tmp_path / "bad.pt", count)
    placement = tmp_path / "p.json"
    Placement(linear_phy2log(3, 4, 4), 2, 4).save(placement)
    assert run(["evaluate", str(placement), "--trace", str(dump)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "bad.pt" in lines[0], captured.err
    assert not captured.out


def test_cli_profile_without_step_loads_exits_2(tmp_path, capsys):
    path = tmp_path / "loads.npz"
    Profile.from_load(np.ones((32, 8))).save(path)
    placement = tmp_path / "p.json"
    Placement(linear_phy2log(32, 8, 8), 2, 8).save(placement)
    assert run(["evaluate", str(placement), "--trace", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "per-token routing trace" in lines[0]


def test_steps_dealt_from_step_loads_match_them_exactly():
    # One step of 2 tokens, top-2, 2 layers: every token holds 2 distinct experts.
    step_loads = np.array([[[2, 1, 1, 0], [1, 1, 1, 1]], [[0, 0, 0, 0], [0, 0, 0, 0]],
                           [[1, 1, 0, 0], [0, 0, 1, 1]]])
    sample = steps_from_step_loads(step_loads, 2)
    assert sample.bounds.tolist() == [0, 2, 3]
    assert sample.slot.tolist() == [0, 1, 0]
    assert _sample_counts(sample, 4).tolist() == step_loads[[0, 2]].tolist()
    assert all(len(set(row)) == 2 for row in sample.ids.reshape(-1, 2).tolist())
    for bad in (np.array([[[1, 1, 0, 0], [1, 1, 1, 1]]]),     # layers disagree
                np.array([[[1, 0, 0, 0], [1, 0, 0, 0]]]),     # 1 pair, k = 2
                np.array([[[2, 0, 0, 0], [1, 1, 0, 0]]])):    # expert 0 twice in 1 token
        with pytest.raises(InputError, match="step_loads"):
            steps_from_step_loads(bad, 2)


def test_joint_optimises_on_recorded_step_loads(tmp_path):
    torch = pytest.importorskip("torch")
    dump, steps, _ = _mixtral_setup(torch, tmp_path, np.random.default_rng(1))
    profile = read_profile(dump)
    cluster = make_cluster(2)
    problem = build_problem([profile], np.ones(1), cluster, 4, EngineSettings(), "mean",
                            model_for(profile, "mixtral-8x7b"))
    assert np.array_equal(_sample_counts(problem.samples[0], 8), steps)
    assert problem.samples[0].bounds.tolist() == [0, 128, 192, 288]  # k = 1 in a stat dump
    placement, record = place(profile, cluster, "joint", PlaceOptions(
        time_limit=5, params={"model": "mixtral-8x7b"}))
    assert placement.phy2log.shape == (32, 8)
    assert sorted(placement.phy2log[0].tolist()) == list(range(8))
    assert "3 sampled steps" in record.objective_name


def test_step_loads_agree_with_the_token_replay_on_compute_without_replicas():
    """Without replicas a GPU's pairs and active slots follow from the loads alone: the
    per-step compute, peak and mean loads equal the token-level replay's on the same steps."""
    trace = random_trace(np.random.default_rng(3), 90, 2, 8, 2)
    model = ModelSpec("t", "none", 2, (), 8, 2, 64, 32)
    cluster = make_cluster(4, 2)
    placement = Placement(np.array([[3, 1, 0, 7, 6, 2, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]), 4, 8)
    steps = prefill_steps(trace.num_tokens, 20, 4)
    ids = trace.topk_ids[steps.order]                                         # [T, L, k]
    step = np.repeat(np.arange(steps.num_steps), steps.sizes)
    index = (step[:, None, None] * 2 + np.arange(2)[None, :, None]) * 8 + ids
    loads = np.bincount(index.ravel(), minlength=steps.num_steps * 16).reshape(-1, 2, 8)
    _, exact = replay_steps(placement, trace, cluster, model, steps)
    times = replay_step_loads(placement, loads, cluster, model)
    assert times.tokens.tolist() == steps.sizes.tolist() == [20, 20, 20, 20, 10]
    assert np.array_equal(times.peak_load, exact.peak_load)
    assert np.array_equal(times.mean_load, exact.mean_load)
    assert np.allclose(times.compute, exact.compute)
