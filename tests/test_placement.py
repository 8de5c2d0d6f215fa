import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetuner.errors import InputError
from moetuner.placement import Placement, load_placement


def test_views_by_hand():
    # 2 GPUs x 3 slots, E = 4, experts 0 and 1 replicated on the other GPU.
    p = Placement(np.array([[0, 1, 2, 3, 0, 1]]), num_gpus=2, num_experts=4)
    assert p.slots_per_gpu == 3 and p.num_redundant == 2
    np.testing.assert_array_equal(p.gpu_of_slot, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(p.logcnt, [[2, 2, 1, 1]])
    np.testing.assert_array_equal(p.log2phy, [[[0, 4], [1, 5], [2, -1], [3, -1]]])
    np.testing.assert_array_equal(p.replicas_on_gpu[0], [[1, 1], [1, 1], [1, 0], [0, 1]])


def test_empty_slots_are_views_of_nothing():
    p = Placement(np.array([[0, 1, 2, 3, -1, -1]]), 2, 4, allow_empty_slots=True)
    np.testing.assert_array_equal(p.logcnt, [[1, 1, 1, 1]])
    np.testing.assert_array_equal(p.log2phy, [[[0], [1], [2], [3]]])
    with pytest.raises(InputError, match=r"ids in \[0, 4\)"):
        Placement(np.array([[0, 1, 2, 3, -1, -1]]), 2, 4)


@pytest.mark.parametrize("phy2log, gpus, experts, message", [
    ([[0, 1, 2]], 2, 3, "divisible"),
    ([[0, 1, 0, 1]], 2, 3, "missing"),
    ([[0, 1, 2, 5]], 2, 4, "ids in"),
    ([[0, 0, 1, 2]], 2, 3, "twice on GPU 0"),
    ([0, 1], 1, 2, "layers, slots"),
])
def test_invalid_placements(phy2log, gpus, experts, message):
    with pytest.raises(InputError, match=message):
        Placement(np.array(phy2log), gpus, experts)


def test_shared_gpu_allowed_when_asked():
    p = Placement(np.array([[0, 0, 1, 2]]), 2, 3, allow_shared_gpu=True)
    assert p.replicas_on_gpu[0, 0, 0] == 2


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 4), st.data())
def test_from_expert_gpu_and_file_round_trip(layers, per_gpu, gpus, data):
    experts = per_gpu * gpus
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    expert_gpu = np.stack([rng.permutation(np.repeat(np.arange(gpus), per_gpu))
                           for _ in range(layers)])
    p = Placement.from_expert_gpu(expert_gpu, gpus, {"method": "test"})
    # Every expert sits on the GPU it was given, once.
    np.testing.assert_array_equal(p.replicas_on_gpu.argmax(axis=2), expert_gpu)
    np.testing.assert_array_equal(p.logcnt, 1)
    # log2phy inverts phy2log.
    slots = p.log2phy[:, :, 0]
    np.testing.assert_array_equal(np.take_along_axis(p.phy2log, slots, axis=1),
                                  np.tile(np.arange(experts), (layers, 1)))
    with tempfile.TemporaryDirectory() as tmp:
        p.save(Path(tmp) / "placement.json")
        back = load_placement(Path(tmp) / "placement.json")
    np.testing.assert_array_equal(back.phy2log, p.phy2log)
    assert back.metadata == {"method": "test"} and back.num_gpus == gpus


def test_unequal_expert_gpu_is_refused():
    with pytest.raises(InputError, match="experts on each"):
        Placement.from_expert_gpu(np.array([[0, 0, 0, 1]]), 2)


@pytest.mark.parametrize("content, field", [
    ("not json", "file"),
    (json.dumps({"format": "other"}), "format"),
    (json.dumps({"format": "moetuner.placement", "num_gpus": 2}), "num_experts"),
    (json.dumps({"format": "moetuner.placement", "num_gpus": 2, "num_experts": 2,
                 "phy2log": [[0, 1], [0]]}), "phy2log"),
    (json.dumps({"format": "moetuner.placement", "num_gpus": 2, "num_experts": 2,
                 "slots_per_gpu": 2, "phy2log": [[0, 1]]}), "slots_per_gpu"),
])
def test_bad_placement_files(tmp_path, content, field):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        load_placement(path)
    assert str(path) in str(err.value) and field in str(err.value)
