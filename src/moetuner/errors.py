"""Errors that reach the user: they name the file, the field and what was expected."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from a file or a flag; the CLI turns it into a message and exit code 2.

    Args:
        source: the file path, or the flag (e.g. ``--gpus``) the bad value came from.
        field: the array, key or parameter inside ``source`` that is wrong.
        expected: what a valid value looks like (shape, range, type).
        got: what was found instead (optional).
    """

    def __init__(self, source: str, field: str, expected: str, got: object = None) -> None:
        self.source = str(source)
        self.field = field
        self.expected = expected
        self.got = got
        message = f"{self.source}: {field}: expected {expected}"
        if got is not None:
            message += f", got {got}"
        super().__init__(message)

    def __reduce__(self) -> tuple:
        # Picklable, so an error raised in a worker process (sweep, map_tasks) reaches the CLI.
        return type(self), (self.source, self.field, self.expected, self.got)
