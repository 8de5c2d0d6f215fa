"""Shards: directories and globs of traces in mixed formats, streamed chunk by chunk."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_trace
from moetuner.cli import run
from moetuner.errors import InputError
from moetuner.inputs import (
    expand_shards,
    profile_shard,
    profile_shards,
    read_profile,
    read_trace,
    shard_tokens,
)
from moetuner.profile import Profile, load_profile, profile_trace
from moetuner.shards import stream_canonical_profile, sum_profiles
from moetuner.trace import Trace, load_trace

COUNTS = ("load", "transitions", "transitions_top1", "coactivation")


def assert_same_counts(got, expected):
    assert got.tokens == expected.tokens and got.top_k == expected.top_k
    for name in COUNTS:
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name),
                                      err_msg=name)


def requests_of(trace: Trace, first: int, stop: int) -> list[np.ndarray]:
    """``topk_ids`` of sequences ``[first, stop)`` as one array per request."""
    ends = np.cumsum(trace.seq_lens)
    starts = ends - trace.seq_lens
    return [trace.topk_ids[starts[i]:ends[i]] for i in range(first, stop)]


@pytest.fixture
def whole():
    """40 sequences, 4 layers, 10 experts, top-3; expert 9 appears in the last quarter."""
    trace = random_trace(np.random.default_rng(3), tokens=400, layers=4, experts=10, k=3,
                         sequences=40)
    assert (np.concatenate(requests_of(trace, 30, 40)) == 9).any()
    return trace


def write_mixed_shards(trace: Trace, folder):
    """Sequences 0-9: canonical .npz; 10-19: vLLM .npz; 20-29: vLLM .jsonl; 30-39: a vLLM
    directory of .npy (one per request)."""
    folder.mkdir()
    part = trace.take_sequences(np.arange(40) < 10, "first ten")
    part.save(folder / "a_canonical.npz")
    np.savez(folder / "b_vllm.npz", **{f"r{i}": a for i, a in
                                       enumerate(requests_of(trace, 10, 20))})
    (folder / "c_vllm.jsonl").write_text("".join(
        json.dumps({"request_id": f"q{i}", "routed_experts": a.tolist()}) + "\n"
        for i, a in enumerate(requests_of(trace, 20, 30))))
    (folder / "d_requests").mkdir()
    for i, a in enumerate(requests_of(trace, 30, 40)):
        np.save(folder / "d_requests" / f"req{i:02d}.npy", a)
    (folder / ".hidden").write_text("skipped")


def test_mixed_format_shards_add_up_to_one_file(tmp_path, whole):
    write_mixed_shards(whole, tmp_path / "shards")
    merged = read_profile(tmp_path / "shards")
    assert_same_counts(merged, profile_trace(whole))
    assert [p["tokens"] for p in merged.provenance] == [
        int(whole.seq_lens[i:i + 10].sum()) for i in (0, 10, 20, 30)]
    assert merged.stability_load is None  # halves of a sum of shards are unknown
    parallel = profile_shards(expand_shards(tmp_path / "shards"), workers=2)
    assert_same_counts(parallel, merged)
    assert parallel.provenance == merged.provenance


def test_shards_profiled_as_ray_tasks_equal_the_local_run(tmp_path, whole):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    write_mixed_shards(whole, tmp_path / "shards")
    shards = expand_shards(tmp_path / "shards")
    on_ray = profile_shards(shards, workers=2, ray_address="local")
    local = profile_shards(shards)
    assert_same_counts(on_ray, local)
    assert on_ray.provenance == local.provenance


def test_directory_of_shards_concatenates_as_a_trace(tmp_path, whole):
    write_mixed_shards(whole, tmp_path / "shards")
    trace = read_trace(tmp_path / "shards")
    np.testing.assert_array_equal(trace.topk_ids, whole.topk_ids)
    np.testing.assert_array_equal(trace.seq_lens, whole.seq_lens)
    assert trace.num_experts == 10 and trace.seq_labels == {}  # no label in every shard


def test_glob_and_directory_agree(tmp_path, whole):
    folder = tmp_path / "shards"
    folder.mkdir()
    cuts = [0, 7, 19, 40]
    for index, (lo, hi) in enumerate(zip(cuts, cuts[1:], strict=False)):
        keep = (np.arange(40) >= lo) & (np.arange(40) < hi)
        whole.take_sequences(keep, f"part {index}").save(folder / f"part{index}.npz")
    (folder / "notes.txt").write_text("not a trace")
    pattern = str(folder / "part*.npz")
    assert [p.name for p in expand_shards(pattern)] == ["part0.npz", "part1.npz", "part2.npz"]
    assert_same_counts(read_profile(pattern), profile_trace(whole))
    selected = read_profile(pattern, select=["seq_dataset=set1"], drop=["seq_repetition"])
    assert_same_counts(selected, profile_trace(whole.select(["seq_dataset=set1"],
                                                            ["seq_repetition"])))
    with pytest.raises(InputError, match="notes.txt"):
        read_profile(folder)  # a directory's entries must all be traces or profiles


def test_cli_profiles_a_directory(tmp_path, whole, capsys):
    write_mixed_shards(whole, tmp_path / "shards")
    out = tmp_path / "p.npz"
    assert run(["profile", str(tmp_path / "shards"), "--workers", "1", "-o", str(out)]) == 0
    assert_same_counts(load_profile(out), profile_trace(whole))
    assert run(["profile", str(tmp_path / "nothing*.npz"), "-o", str(out)]) == 2
    assert "no match" in capsys.readouterr().err


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 120), st.integers(0, 12), st.integers(1, 50), st.booleans(),
       st.booleans(), st.data())
def test_streamed_npz_equals_in_memory(tmp_path_factory, tokens, sequences, chunk, select,
                                       compress, data):
    """Chunked reading of one canonical .npz gives profile_trace(load_trace) exactly,
    stability included, and never reads more than a chunk or one sequence at once."""
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    trace = random_trace(rng, tokens, 3, 7, 2, sequences=sequences or None)
    path = tmp_path_factory.mktemp("npz") / "t.npz"
    arrays = {"topk_ids": trace.topk_ids.astype(np.uint8)}
    if data.draw(st.booleans()) or tokens == 0:  # else E = largest id + 1
        arrays["num_experts"] = np.array(7)
    if trace.seq_lens is not None:
        arrays.update(seq_lens=trace.seq_lens, **trace.seq_labels)
    (np.savez_compressed if compress else np.savez)(path, **arrays)
    selectors = (["seq_dataset=set0|set2"], ["seq_repetition"]) if select and sequences else (
        (), ())
    reads = []
    streamed = stream_canonical_profile(path, *selectors, chunk_tokens=chunk,
                                        progress=reads.append)
    expected = profile_trace(load_trace(path, *selectors))
    assert_same_counts(streamed, expected)
    assert streamed.num_experts == expected.num_experts
    for name in ("stability_load", "stability_transitions"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(expected, name))
    assert streamed.provenance == expected.provenance
    assert sum(reads) == tokens
    longest = 0 if trace.seq_lens is None else int(trace.seq_lens.max(initial=0))
    assert all(n <= max(chunk, longest) for n in reads)


def test_exflow_shard_streams(tmp_path):
    ids = np.random.default_rng(0).integers(0, 6, size=(50, 3))
    np.save(tmp_path / "exflow.npy", ids)
    reads = []
    streamed = profile_shard(tmp_path / "exflow.npy", chunk_tokens=8, progress=reads.append)
    assert reads == [8] * 6 + [2]
    expected = profile_trace(Trace(topk_ids=ids[:, :, None], num_experts=6))
    assert_same_counts(streamed, expected)
    np.testing.assert_array_equal(streamed.stability_load, expected.stability_load)


def test_bad_shards_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty directory"):
        expand_shards(tmp_path / "empty")
    bad = tmp_path / "bad.npz"
    np.savez(bad, topk_ids=np.array([[[0, 0]]], dtype=np.uint8), num_experts=np.array(4))
    with pytest.raises(InputError, match="repeated expert"):
        profile_shard(bad)
    np.savez(bad, topk_ids=np.zeros((4, 2), dtype=np.uint8))
    with pytest.raises(InputError, match="topk_ids"):
        profile_shard(bad)
    nolens = tmp_path / "nolens.npz"
    np.savez(nolens, topk_ids=np.zeros((4, 2, 1), dtype=np.uint8))
    with pytest.raises(InputError, match="seq_dataset"):
        profile_shard(nolens, select=["seq_dataset=x"])


def test_sum_pads_experts_a_shard_never_saw(tiny_trace):
    narrow = Trace(topk_ids=np.array([[[0, 1], [1, 0]]]), num_experts=2)
    total = sum_profiles([profile_trace(tiny_trace), profile_trace(narrow)])
    assert total.num_experts == 4 and total.tokens == 4
    np.testing.assert_array_equal(total.load, [[3, 3, 1, 1], [2, 2, 2, 2]])
    assert total.coactivation[0, 0, 1] == 3 and total.transitions[0, 1, 0] == 2


def test_sum_with_a_loads_only_profile_and_mismatches(tiny_trace):
    loads = Profile.from_load(np.full((2, 4), 0.5), top_k=2)
    total = sum_profiles([profile_trace(tiny_trace), loads])
    assert total.transitions is None and total.coactivation is None and total.tokens == 4
    np.testing.assert_array_equal(total.load, [[2.5, 2.5, 1.5, 1.5], [1.5, 1.5, 2.5, 2.5]])
    with pytest.raises(InputError, match="2 layers and k = 2"):
        sum_profiles([profile_trace(tiny_trace), Profile.from_load(np.ones((3, 4)), top_k=2)])


@pytest.mark.parametrize("layout", ["dir", "npz"])
def test_vllm_requests_stream(tmp_path, whole, layout):
    requests = requests_of(whole, 0, 40) + [np.zeros((0, 4, 3), np.int64)]
    if layout == "dir":
        path = tmp_path / "routed"
        path.mkdir()
        for i, a in enumerate(requests):
            np.save(path / f"r{i:02d}.npy", a)
    else:
        path = tmp_path / "routed.npz"
        np.savez(path, **{f"r{i:02d}": a for i, a in enumerate(requests)})
    for selection in ((), ["seq_request=r0*|r3?"]):
        expected = profile_trace(read_trace(path, selection))
        for chunk in (1, 25, 1000):
            reads = []
            streamed = profile_shard(path, selection, chunk_tokens=chunk, progress=reads.append)
            assert_same_counts(streamed, expected)
            np.testing.assert_array_equal(streamed.stability_transitions,
                                          expected.stability_transitions)
            assert streamed.provenance == expected.provenance
            assert sum(reads) == whole.num_tokens


def test_corrupt_stream_is_an_input_error(tmp_path, whole):
    path = tmp_path / "t.npz"
    whole.save(path)  # deflated
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="t.npz"):
        profile_shard(path, chunk_tokens=16)


def test_progress_total_from_headers(tmp_path, whole):
    write_mixed_shards(whole, tmp_path / "shards")
    sizes = {shard.name: shard_tokens(shard) for shard in expand_shards(tmp_path / "shards")}
    tens = [int(whole.seq_lens[i:i + 10].sum()) for i in (0, 10, 20, 30)]
    assert sizes == {"a_canonical.npz": tens[0], "b_vllm.npz": tens[1],
                     "c_vllm.jsonl": None, "d_requests": tens[3]}


def test_big_endian_ids_stream(tmp_path, whole):
    path = tmp_path / "be.npz"
    np.savez(path, topk_ids=whole.topk_ids.astype(">i4"), seq_lens=whole.seq_lens)
    assert_same_counts(profile_shard(path, chunk_tokens=50), profile_trace(whole))


def test_a_streamed_trace_is_sorted_by_weight_as_in_memory(tmp_path):
    """Columns stored out of weight order: the streamed profile takes each token's heaviest
    expert as its primary one, as load_trace does (transitions_top1 and the halves agree)."""
    rng = np.random.default_rng(3)
    trace = random_trace(rng, 300, 3, 8, 3, sequences=5)
    weights = rng.random(trace.topk_ids.shape)
    path = tmp_path / "unsorted.npz"
    np.savez(path, topk_ids=trace.topk_ids, topk_weights=weights, seq_lens=trace.seq_lens)
    streamed = stream_canonical_profile(path, chunk_tokens=64)
    whole = profile_trace(load_trace(path))
    for name in ("load", "transitions", "transitions_top1", "coactivation",
                 "stability_load", "stability_transitions"):
        assert np.array_equal(getattr(streamed, name), getattr(whole, name)), name
    # The primary expert really moved: unsorted columns give other top-1 transitions.
    unsorted = profile_trace(Trace(topk_ids=trace.topk_ids, num_experts=8))
    assert not np.array_equal(unsorted.transitions_top1, streamed.transitions_top1)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_streamed_trace_refuses_non_finite_weights(tmp_path, bad):
    trace = random_trace(np.random.default_rng(4), 50, 2, 4, 2)
    weights = np.full(trace.topk_ids.shape, 0.5)
    weights[40, 1, 0] = bad
    path = tmp_path / "nan.npz"
    np.savez(path, topk_ids=trace.topk_ids, topk_weights=weights)
    with pytest.raises(InputError, match="topk_weights: expected finite router probabilities"):
        stream_canonical_profile(path, chunk_tokens=16)
