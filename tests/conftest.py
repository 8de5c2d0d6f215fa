"""Shared fixtures: small hand-made traces and the shipped GPT-OSS slice."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from moetuner.errors import InputError
from moetuner.trace import Trace

SLICE = Path(__file__).resolve().parents[1] / "data" / "gpt-oss-20b" / "slice.npz"


def random_trace(rng: np.random.Generator, tokens: int, layers: int, experts: int, k: int,
                 sequences: int | None = None) -> Trace:
    """A trace of uniformly random distinct top-k ids (optionally split into sequences)."""
    ids = np.argsort(rng.random((tokens, layers, experts)), axis=2)[:, :, :k]
    seq_lens = None
    labels = {}
    if sequences:
        cuts = np.sort(rng.integers(0, tokens + 1, sequences - 1))
        seq_lens = np.diff(np.concatenate([[0], cuts, [tokens]])).astype(np.int64)
        labels = {"seq_dataset": np.array([f"set{i % 3}" for i in range(sequences)]),
                  "seq_repetition": np.arange(sequences) % 4 == 3}
    return Trace(topk_ids=ids.astype(np.int64), num_experts=experts, seq_lens=seq_lens,
                 seq_labels=labels)


@pytest.fixture
def tiny_trace() -> Trace:
    """3 tokens, 2 layers, 4 experts, top-2, 2 sequences (lengths 2 and 1); counted by hand
    in test_profile.py."""
    ids = np.array([
        [[0, 1], [2, 3]],
        [[1, 0], [2, 0]],
        [[3, 2], [3, 1]],
    ])
    return Trace(topk_ids=ids, num_experts=4, seq_lens=np.array([2, 1]),
                 seq_labels={"seq_dataset": np.array(["mmlu_dev", "gpqa_main"]),
                             "seq_repetition": np.array([False, True])})

# CI runs a fixed set of hypothesis examples (a red CI must be reproducible); local runs
# explore new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def assert_rejects_npz(tmp_path: Path, read, arrays: dict[str, np.ndarray], field: str) -> None:
    """Write ``arrays`` to an ``.npz`` and check ``read(path)`` names the file and ``field``."""
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError) as err:
        read(path)
    assert str(path) in str(err.value) and field in str(err.value)
