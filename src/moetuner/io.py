"""Atomic file output: a file is either written whole or not at all."""

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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    A failure inside the ``with`` block removes the temporary file, so no partial output is
    ever left at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file 0600; give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
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
    """Raise ``InputError`` when an output path is empty, a directory, or the same file as an
    input or as another output (writing it would destroy data)."""
    seen: dict[Path, str] = {}
    for name in inputs:
        seen[Path(name).resolve()] = f"the input {name}"
    for name in outputs:
        if str(name) == "":
            raise InputError(flag, "path", "a file path", "''")
        path = Path(name)
        if path.is_dir():
            raise InputError(flag, "path", "a file path, not a directory", str(name))
        resolved = path.resolve()
        if resolved in seen:
            raise InputError(flag, "path", f"a file other than {seen[resolved]}", str(name))
        seen[resolved] = f"the output {name}"


def _numpy_to_json(value: Any) -> Any:
    """JSON form of the numpy values ``json`` cannot encode (arrays and scalars)."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` (numpy arrays and scalars included) as JSON to ``path`` atomically."""
    write_atomic(path, lambda handle: json.dump(obj, handle, indent=indent,
                                                default=_numpy_to_json))


def write_npz(path: str | os.PathLike, compress: bool = True, **arrays: np.ndarray) -> None:
    """Write arrays to an ``.npz`` at ``path`` atomically (numpy adds no suffix to a handle)."""
    save = np.savez_compressed if compress else np.savez
    write_atomic(path, lambda handle: save(handle, **arrays), binary=True)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write one array to an ``.npy`` at ``path`` atomically."""
    write_atomic(path, lambda handle: np.save(handle, array), binary=True)


def read_json(path: str | os.PathLike, expected: str) -> Any:
    """Parse the JSON file ``path``; an ``InputError`` saying ``expected`` if it is missing or
    not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(path, "file", f"an existing file: {expected}") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, "file", expected, exc) from None


def open_npz(path: str | os.PathLike, expected: str) -> np.lib.npyio.NpzFile:
    """Open the ``.npz`` at ``path`` (use as a context manager); an ``InputError`` saying
    ``expected`` if it is missing or not an ``.npz``."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(path, "file", f"an existing file: {expected}") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, "file", expected, exc) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(path, "file", expected, "a single .npy array")
    return data
