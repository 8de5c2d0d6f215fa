import numpy as np
import pytest

from conftest import assert_rejects_npz
from moetuner.errors import InputError
from moetuner.trace import Trace, load_trace


def test_select_and_drop(tiny_trace):
    mmlu = tiny_trace.select(["seq_dataset=mmlu*"])
    assert mmlu.num_tokens == 2 and mmlu.seq_lens.tolist() == [2]
    assert tiny_trace.select(["seq_dataset=gpqa*|mmlu_dev"]).num_tokens == 3
    kept = tiny_trace.select(drop=["seq_repetition"])
    np.testing.assert_array_equal(kept.topk_ids, tiny_trace.topk_ids[:2])
    assert "seq_repetition" in kept.selection


def test_split_at_sequence_boundary(tiny_trace):
    first, second = tiny_trace.split(0.5)
    assert first.seq_lens.tolist() == [2] and second.seq_lens.tolist() == [1]


def test_save_load_round_trip(tmp_path, tiny_trace):
    tiny_trace.save(tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz", select=["seq_dataset=mmlu*"])
    np.testing.assert_array_equal(back.topk_ids, tiny_trace.topk_ids[:2])
    assert back.num_experts == 4


@pytest.mark.parametrize("arrays, field", [
    ({"topk_ids": np.zeros((3, 2))}, "topk_ids"),
    ({"topk_ids": np.full((3, 2, 2), 0.5)}, "topk_ids"),
    ({"topk_ids": np.array([[[0, 0]]])}, "topk_ids"),
    ({"topk_ids": np.array([[[0, -1]]])}, "topk_ids"),
    ({"topk_ids": np.array([[[0, 1]]]), "topk_weights": np.ones((1, 1, 3))}, "topk_weights"),
    ({"topk_ids": np.array([[[0, 1]]]), "topk_weights": np.full((1, 1, 2), np.nan)},
     "topk_weights"),
    ({"topk_ids": np.array([[[0, 1]]]), "seq_lens": np.array([2])}, "seq_lens"),
    ({"topk_ids": np.array([[[0, 1]]]), "seq_lens": np.array([1]),
      "seq_dataset": np.array(["a", "b"])}, "seq_dataset"),
    ({"something": np.ones(3)}, "topk_ids"),
])
def test_bad_trace_files(tmp_path, arrays, field):
    assert_rejects_npz(tmp_path, load_trace, arrays, field)


def test_ids_beyond_num_experts():
    with pytest.raises(InputError, match=r"expert ids in \[0, 2\)"):
        Trace(topk_ids=np.array([[[0, 2]]]), num_experts=2)


def test_unknown_label_and_non_bool_drop(tiny_trace):
    with pytest.raises(InputError, match="seq_nope"):
        tiny_trace.select(["seq_nope=x"])
    with pytest.raises(InputError, match="bool"):
        tiny_trace.select(drop=["seq_dataset"])
    with pytest.raises(InputError, match="NAME=PATTERN"):
        tiny_trace.select(["seq_dataset"])
