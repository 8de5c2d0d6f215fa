"""Reading what users give moetuner: traces and profiles, whatever file they come in.

``read_trace`` and ``read_profile`` dispatch on the file's content; a reader for a new format
(an engine's dump, say) is one more entry in ``TRACE_READERS`` or ``PROFILE_READERS``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from moetuner import readers
from moetuner.errors import InputError
from moetuner.io import npz_names
from moetuner.profile import Profile, load_profile, profile_trace
from moetuner.trace import Trace, load_trace

# (matches(path), read(path, select, drop)) pairs, tried in order.
TraceReader = tuple[Callable[[Path], bool], Callable[[Path, Sequence[str], Sequence[str]], Trace]]
ProfileReader = tuple[Callable[[Path], bool], Callable[[Path], Profile]]


def npz_keys(path: Path) -> list[str]:
    """Names of the arrays in an ``.npz`` (empty when it is not one; an ``InputError`` when
    a file named ``.npz`` is damaged)."""
    if path.suffix != ".npz" or not path.is_file():
        return []
    return npz_names(path)


TRACE_READERS: list[TraceReader] = [
    (lambda p: "topk_ids" in npz_keys(p), lambda p, s, d: load_trace(p, s, d)),
    (readers.is_sglang_per_token, readers.read_sglang_per_token),
    (readers.is_vllm_dir, readers.read_vllm_dir),
    (readers.is_vllm_npz, readers.read_vllm_npz),
    (readers.is_vllm_jsonl, readers.read_vllm_jsonl),
    (readers.is_exflow, readers.read_exflow),
]
PROFILE_READERS: list[ProfileReader] = [
    (lambda p: "load" in npz_keys(p), load_profile),
    (readers.is_sglang_stat, readers.read_sglang_stat),
    (readers.is_loads, readers.read_loads),
]


def read_trace(path: str | os.PathLike, select: Sequence[str] = (), drop: Sequence[str] = ()
               ) -> Trace:
    """Read a per-token routing trace from any supported file."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file", "an existing trace file")
    for matches, read in TRACE_READERS:
        if matches(path):
            return read(path, select, drop)
    raise InputError(path, "file", "a per-token routing trace (an .npz with topk_ids "
                     "[tokens, layers, k], or an engine dump moetuner reads)")


def is_trace(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a per-token trace (rather than a profile)."""
    return any(matches(Path(path)) for matches, _ in TRACE_READERS)


def read_profile(
    path: str | os.PathLike,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
) -> Profile:
    """Read a profile, or profile a trace on the fly (selection applies to traces only)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file", "an existing trace or profile file")
    if is_trace(path):
        return profile_trace(read_trace(path, select, drop))
    if select or drop:
        raise InputError(path, "--select/--drop", "a per-token trace (a profile has no sequences)")
    for matches, read in PROFILE_READERS:
        if matches(path):
            return read(path)
    raise InputError(path, "file", "a routing profile (.npz with load [layers, experts]) or a "
                     "trace")
