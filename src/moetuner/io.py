"""Files in and out: atomic output (a file is written whole or not at all), guarded input.

Reading never lets a library's exception reach the user: whatever the bytes (empty,
truncated, bit-flipped, pickled, random, deeply nested, not UTF-8), a reader here raises
``InputError`` naming the file and field. Sizes are bounded before anything is allocated from
them (``MAX_*`` below).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from moetuner.errors import InputError

# Size limits checked before allocating from a file's numbers or a flag: well above every
# public MoE model (at most 512 experts per layer, under 100 MoE layers, thousands of GPUs),
# low enough that one bad id cannot ask for terabytes.
MAX_EXPERTS = 1 << 14
MAX_LAYERS = 1 << 10
MAX_GPUS = 1 << 14
# Cells of one dense [L, E, E] count array (profile transitions, co-activation): 1 GiB of int64.
MAX_PAIR_CELLS = 1 << 27


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    A failure inside the ``with`` block removes the temporary file, so no partial output is
    ever left at ``path``.
    """
    path = Path(path)
    try:
        # Missing folders of an output path are created (the README's out/x.json works).
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(path, "path", "a writable file path", exc.strerror or exc) from None
    # mkstemp creates the file 0600; give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise InputError(path, "path", "a writable file path", exc.strerror or exc) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool = False) -> None:
    """Call ``write(handle)`` on a temporary file and move it to ``path`` when it returns."""
    with atomic_open(path, "wb" if binary else "w") as handle:
        write(handle)


def write_together(writes: dict[str | os.PathLike, Callable[[IO], Any]],
                   binary: bool = False) -> None:
    """Write several files all or none: each ``write(handle)`` goes to a temporary file beside
    its path, and the files are moved into place only when every write has succeeded."""
    with contextlib.ExitStack() as stack:
        for path, write in writes.items():
            handle = stack.enter_context(atomic_open(path, "wb" if binary else "w"))
            write(handle)
        # Leaving the stack renames the files (last opened first); a failure above removed
        # every temporary file already written.


def check_outputs(outputs: list[str | os.PathLike], inputs: list[str | os.PathLike],
                  flag: str = "-o") -> None:
    """Raise ``InputError`` when an output path is empty, a directory, under a file, or the
    same file as an input or as another output (writing it would destroy data). Missing
    folders are fine: writing creates them."""
    seen: dict[Path, str] = {}
    for name in inputs:
        seen[Path(name).resolve()] = f"the input {name}"
    for name in outputs:
        if str(name) in ("", "."):  # typer turns an empty path into "."
            raise InputError(flag, "path", "a file path", f"{str(name)!r} (empty, or the "
                             "current folder)")
        path = Path(name)
        if path.is_dir():
            raise InputError(flag, "path", "a file path, not a directory", str(name))
        existing = next(parent for parent in path.absolute().parents if parent.exists())
        if not existing.is_dir():
            raise InputError(flag, "path", f"a path whose folder {existing} is a folder, not "
                             "a file", str(name))
        resolved = path.resolve()
        if resolved in seen:
            raise InputError(flag, "path", f"a file other than {seen[resolved]}", str(name))
        seen[resolved] = f"the output {name}"


def json_ready(value: Any) -> Any:
    """``value`` with numpy arrays and scalars as lists and numbers, and NaN or infinite
    floats as None: JSON has no NaN, and a strict reader refuses ``NaN`` / ``Infinity``."""
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def json_writer(obj: Any, indent: int | None = None) -> Callable[[IO], None]:
    """``write(handle)`` writing ``obj`` as strict JSON (see ``json_ready``), for
    ``write_atomic`` and ``write_together``."""
    clean = json_ready(obj)
    return lambda handle: json.dump(clean, handle, indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` (numpy arrays and scalars included) as strict JSON to ``path``
    atomically; non-finite floats become null (see ``json_ready``)."""
    write_atomic(path, json_writer(obj, indent))


def write_npz(path: str | os.PathLike, compress: bool = True, **arrays: np.ndarray) -> None:
    """Write arrays to an ``.npz`` at ``path`` atomically (numpy adds no suffix to a handle)."""
    save = np.savez_compressed if compress else np.savez
    write_atomic(path, lambda handle: save(handle, **arrays), binary=True)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write one array to an ``.npy`` at ``path`` atomically."""
    write_atomic(path, lambda handle: np.save(handle, array), binary=True)


def failure_reason(exc: BaseException) -> str:
    """A short, one-line account of why a library could not read a file."""
    text = " ".join(str(exc).split())[:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parse_json(text: str | bytes, source: str | os.PathLike, field: str, expected: str) -> Any:
    """Parse JSON text strictly (no NaN / Infinity); an ``InputError`` on anything else, deep
    nesting (RecursionError) and bytes that are not UTF-8 included."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise InputError(source, field, expected, failure_reason(exc)) from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | os.PathLike, expected: str) -> Any:
    """Parse the JSON file ``path``; an ``InputError`` saying ``expected`` if it is missing or
    not strict JSON."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(path, "file", f"an existing file: {expected}") from None
    except OSError as exc:
        raise InputError(path, "file", expected, failure_reason(exc)) from None
    return parse_json(text, path, "file", expected)


def load_npy(path: str | os.PathLike, expected: str, header_only: bool = False) -> np.ndarray:
    """The array of the ``.npy`` at ``path`` (memory-mapped, data unread, with
    ``header_only``); an ``InputError`` saying ``expected`` whatever is wrong with the file."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if header_only else None)
    except FileNotFoundError:
        raise InputError(path, "file", f"an existing file: {expected}") from None
    except Exception as exc:  # numpy, zipfile and zlib raise many types on damaged bytes
        raise InputError(path, "file", expected, failure_reason(exc)) from None
    if not isinstance(array, np.ndarray):
        raise InputError(path, "file", expected, "an .npz archive")
    return array


def open_npz(path: str | os.PathLike, expected: str) -> np.lib.npyio.NpzFile:
    """Open the ``.npz`` at ``path`` (use as a context manager; read arrays with
    ``npz_array``); an ``InputError`` saying ``expected`` if it is missing or not an ``.npz``."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(path, "file", f"an existing file: {expected}") from None
    except Exception as exc:  # numpy, zipfile and zlib raise many types on damaged bytes
        raise InputError(path, "file", expected, failure_reason(exc)) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(path, "file", expected, "a single .npy array")
    # numpy hands a member not named .npy back as raw bytes, not an array.
    raw = [name for name in data.zip.namelist() if not name.endswith(".npy")]
    if raw:
        data.close()
        raise InputError(path, raw[0], "an .npy array member (as numpy's savez writes)",
                         "a member that is not an .npy file")
    return data


def npz_array(data: np.lib.npyio.NpzFile, name: str, source: str | os.PathLike) -> np.ndarray:
    """The array ``name`` of an open ``.npz``; an ``InputError`` naming it when its bytes are
    damaged, pickled (object arrays) or claim a size the file does not hold."""
    try:
        return data[name]
    except Exception as exc:  # numpy, zipfile and zlib raise many types on damaged bytes
        raise InputError(source, name, "a readable numpy array (not pickled)",
                         failure_reason(exc)) from None


def npz_names(path: str | os.PathLike, expected: str = "a numpy .npz archive") -> list[str]:
    """Names of the arrays in the ``.npz`` at ``path`` (its directory only; no data read)."""
    with open_npz(path, expected) as data:
        return list(data.files)


def read_npz(path: str | os.PathLike, expected: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, read and checked as ``npz_array`` does."""
    with open_npz(path, expected) as data:
        return {name: npz_array(data, name, path) for name in data.files}


def as_int(value: object, source: str | os.PathLike, field: str, lowest: int | None = None,
           highest: int | None = None) -> int:
    """An integer field read from a file (a JSON integer, or an integer 0-d array); an
    ``InputError`` for anything else (bool, float, string, null, a list) or out of range."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    bounds = (f" in [{lowest}, {highest}]" if lowest is not None and highest is not None else
              f" >= {lowest}" if lowest is not None else "")
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise InputError(source, field, "an integer" + bounds, _shown(value))
    if (lowest is not None and value < lowest) or (highest is not None and value > highest):
        raise InputError(source, field, "an integer" + bounds, int(value))
    return int(value)


def as_bool(value: object, source: str | os.PathLike, field: str) -> bool:
    """A boolean field read from a file: JSON ``true`` / ``false`` only (``"no"`` is not
    false)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if not isinstance(value, bool | np.bool_):
        raise InputError(source, field, "a JSON boolean (true or false)", _shown(value))
    return bool(value)


def int_array(value: object, source: str | os.PathLike, field: str, ndim: int,
              shape: str) -> np.ndarray:
    """An int64 array from a file's nested lists or array; an ``InputError`` unless every
    entry is an integer that fits int64 (``2.25``, ``"3"``, ``true`` and ragged rows are
    refused, never rounded or parsed)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError, OverflowError):
        array = None
    if array is None or array.ndim != ndim or not np.issubdtype(array.dtype, np.integer):
        got = "ragged or nested lists" if array is None else f"{array.dtype} {list(array.shape)}"
        raise InputError(source, field, f"integers {shape}", got)
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        raise InputError(source, field, f"integers {shape} that fit int64", int(array.max()))
    return array.astype(np.int64)


def _shown(value: object) -> str:
    """A short repr of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
