import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetuner import readers
from moetuner.cli import run
from moetuner.errors import InputError
from moetuner.inputs import is_trace, read_profile, read_trace
from moetuner.profile import load_profile

# Two requests through 2 MoE layers, top-2 of E = 4 experts.
REQUESTS = [np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[3, 0], [1, 2]]]),
            np.array([[[2, 3], [0, 1]]])]


def test_vllm_directory_of_npy(tmp_path):
    folder = tmp_path / "routed"
    folder.mkdir()
    for name, array in zip(("req-a", "req-b"), REQUESTS, strict=True):
        np.save(folder / f"{name}.npy", array)
    trace = read_trace(folder)
    assert np.array_equal(trace.topk_ids, np.concatenate(REQUESTS))
    assert trace.seq_lens.tolist() == [3, 1]
    assert trace.seq_labels["seq_request"].tolist() == ["req-a", "req-b"]
    assert read_trace(folder, select=["seq_request=req-b"]).num_tokens == 1
    assert read_profile(folder).load.tolist() == [[2, 2, 2, 2], [2, 2, 2, 2]]


def test_vllm_npz_and_jsonl_agree(tmp_path):
    npz = tmp_path / "routed.npz"
    np.savez(npz, r0=REQUESTS[0], r1=REQUESTS[1])
    jsonl = tmp_path / "routed.jsonl"
    jsonl.write_text("".join(json.dumps({"request_id": f"r{i}", "routed_experts": a.tolist()})
                             + "\n" for i, a in enumerate(REQUESTS)))
    nested = tmp_path / "outputs.jsonl"
    nested.write_text("".join(json.dumps({"request_id": f"r{i}", "outputs": [
        {"text": "...", "routed_experts": a.tolist()}]}) + "\n" for i, a in enumerate(REQUESTS)))
    a, b, c = read_trace(npz), read_trace(jsonl), read_trace(nested)
    assert np.array_equal(a.topk_ids, b.topk_ids) and np.array_equal(a.topk_ids, c.topk_ids)
    assert a.seq_labels["seq_request"].tolist() == b.seq_labels["seq_request"].tolist()


def test_vllm_bad_requests(tmp_path):
    npz = tmp_path / "bad.npz"
    np.savez(npz, r0=REQUESTS[0], r1=np.zeros((2, 3, 2), dtype=np.int64))
    with pytest.raises(InputError, match="r1"):
        read_trace(npz)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"routed_experts": [[[0, 1]]]}\n{"oops": 1}\n')
    with pytest.raises(InputError, match="line 2"):
        read_trace(jsonl)


def test_exflow_top1(tmp_path):
    path = tmp_path / "exflow.npy"
    ids = np.array([[0, 3], [2, 2], [1, 0]], dtype=np.int32)
    np.save(path, ids)
    trace = read_trace(path)
    assert trace.top_k == 1 and np.array_equal(trace.topk_ids[:, :, 0], ids)
    assert trace.num_experts == 4


@pytest.mark.parametrize("suffix", [".json", ".csv", ".npy", "-loads.npy"])
def test_plain_loads(tmp_path, suffix):
    load = np.array([[4, 0, 2], [1, 1, 4]])
    path = tmp_path / f"table{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(load.tolist()))
    elif suffix == ".csv":
        np.savetxt(path, load, delimiter=",", fmt="%d")
    else:
        # A float .npy, or an integer one whose name says it holds loads.
        np.save(path, load.astype(float) if suffix == ".npy" else load)
    assert not is_trace(path)
    profile = read_profile(path)
    assert np.array_equal(profile.load, load) and profile.transitions is None


def test_plain_loads_bad(tmp_path):
    path = tmp_path / "load.json"
    path.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(InputError, match="layers, experts"):
        read_profile(path)
    path.write_text(json.dumps([[1, -2]]))
    with pytest.raises(InputError, match="non-negative"):
        read_profile(path)


# ---------------------------------------------------------------- SGLang recorder dumps


def test_sglang_stat_dump(tmp_path):
    torch = pytest.importorskip("torch")
    # [buffer_steps = 2, num_hidden_layers = 3, E = 4]; layer 0 is dense (never counted).
    count = torch.zeros(2, 3, 4, dtype=torch.int32)
    count[0, 1] = torch.tensor([1, 2, 3, 4])
    count[1, 1] = torch.tensor([1, 0, 0, 0])
    count[1, 2] = torch.tensor([0, 5, 5, 1])
    path = tmp_path / "stat.pt"
    torch.save({"rank": 0, "logical_count": count}, path)
    assert not is_trace(path)
    profile = read_profile(path)
    assert profile.load.tolist() == [[2, 2, 3, 4], [0, 5, 5, 1]]


def _per_token_dump(torch, path, with_map=True, **overrides):
    # 3 hidden layers (layer 0 dense: -1 ids), P = 6 physical slots for E = 4 experts.
    phys_map = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 2], [0, 1, 2, 3, 2, 1]])
    dense = -torch.ones(1, 2, 2, dtype=torch.int32)
    records = [
        {"forward_pass_id": 0, "topk_ids_of_layer": torch.cat([dense, torch.tensor(
            [[[4, 1], [2, 3]], [[5, 0], [1, 2]]], dtype=torch.int32)])},
        {"forward_pass_id": 1, "topk_ids_of_layer": torch.cat([dense[:, :1], torch.tensor(
            [[[0, 5]], [[4, 3]]], dtype=torch.int32)])},
    ]
    dump = {"records": records, **overrides}
    if with_map:
        dump["last_physical_to_logical_map"] = phys_map
    torch.save(dump, path)


def test_sglang_per_token_dump_maps_physical_to_logical(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "tokens.pt"
    _per_token_dump(torch, path)
    assert is_trace(path)
    trace = read_trace(path)
    # token 0: layer 1 slots (4, 1) -> experts (3, 2); layer 2 slots (5, 0) -> (1, 0).
    assert trace.topk_ids.tolist() == [[[3, 2], [1, 0]],
                                       [[1, 0], [1, 2]],
                                       [[3, 2], [2, 3]]]
    assert trace.seq_lens.tolist() == [2, 1] and trace.num_experts == 4


def test_sglang_per_token_without_map(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "nomap.pt"
    _per_token_dump(torch, path, with_map=False)
    with pytest.raises(InputError, match="last_physical_to_logical_map"):
        read_trace(path)


@pytest.mark.parametrize("build", ["wrong_keys", "bad_shape", "physical_out_of_range"])
def test_sglang_bad_dumps(tmp_path, build):
    torch = pytest.importorskip("torch")
    path = tmp_path / f"{build}.pt"
    if build == "wrong_keys":
        torch.save({"something": torch.zeros(3)}, path)
        with pytest.raises(InputError, match="records"):
            read_trace(path)
    elif build == "bad_shape":
        torch.save({"logical_count": torch.zeros(3, 4, dtype=torch.int32)}, path)
        with pytest.raises(InputError, match="buffer_steps"):
            read_profile(path)
    else:
        torch.save({"records": [{"topk_ids_of_layer": torch.tensor([[[0, 9]]])}],
                    "last_physical_to_logical_map": torch.tensor([[0, 1, 2, 3]])}, path)
        with pytest.raises(InputError, match="physical ids"):
            read_trace(path)


def test_pt_without_torch_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "dump.pt"
    path.write_bytes(b"not really a dump")
    monkeypatch.setitem(sys.modules, "torch", None)
    readers._load_pt.cache_clear()
    with pytest.raises(InputError, match=r"moetuner\[torch\]"):
        read_trace(path)
    readers._load_pt.cache_clear()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(2, 6), st.integers(0, 4), st.integers(0, 2**16))
def test_sglang_per_token_inverts_any_physical_choice(tmp_path_factory, layers, experts,
                                                      redundant, seed):
    """Logical ids sent through random replicas of a random map come back unchanged."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    phys_map = np.stack([rng.permutation(np.concatenate(
        [np.arange(experts), rng.integers(0, experts, redundant)])) for _ in range(layers)])
    logical = np.argsort(rng.random((5, layers, experts)), axis=2)[:, :, :2]   # [t, L, k]
    # A random physical slot holding each logical expert (a random key picks among replicas).
    holds = phys_map[None, :, None, :] == logical[..., None]                  # [t, L, k, P]
    physical = np.argmax(holds * rng.random(holds.shape), axis=3)
    path = tmp_path_factory.mktemp("pt") / "d.pt"
    torch.save({"records": [{"topk_ids_of_layer": torch.from_numpy(
                    physical.transpose(1, 0, 2).astype(np.int32))}],
                "last_physical_to_logical_map": torch.from_numpy(phys_map)}, path)
    trace = read_trace(path)
    assert np.array_equal(trace.topk_ids, logical)


def test_cli_profile_reads_engine_dumps(tmp_path):
    folder = tmp_path / "routed"
    folder.mkdir()
    np.save(folder / "r0.npy", REQUESTS[0])
    out = tmp_path / "prof.npz"
    assert run(["profile", str(folder), "-o", str(out)]) == 0
    assert load_profile(out).load.tolist() == [[2, 2, 1, 1], [1, 1, 2, 2]]
