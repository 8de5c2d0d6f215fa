"""Run independent tasks locally in a process pool or as Ray tasks, with one call.

``map_tasks(function, items)`` is ``map`` for work that takes seconds per item: the sweep
runs its points with it, and per-shard profiling can run its shards with it. Results come
back in the items' order as they are ready, so a caller can write each one before the next
arrives (what makes a sweep resumable).

- ``workers=1``: runs in this process, one item after the other (no pickling).
- otherwise (default): a local process pool of ``workers`` processes (default: the CPUs);
  processes are spawned, not forked, so threads of solver libraries never leak into them.
- ``ray_address``: Ray tasks, one per item (``pip install moetuner[ray]``). ``"local"``
  starts a local Ray instance with ``workers`` CPUs (or joins the one already started in
  this process); any other value is passed to ``ray.init(address=...)`` (``"auto"``, or
  ``ray://host:10001``). ``function`` must be importable on the workers (a module-level
  function of an installed package) and any file it reads must be readable there.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from moetuner.errors import InputError

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_tasks(function: Callable[[Item], Result], items: Iterable[Item],
              workers: int | None = None, ray_address: str | None = None
              ) -> Iterator[Result]:
    """``function(item)`` for every item, in order, locally or on Ray (see module docstring).

    Args:
        function: a picklable, module-level function of one argument.
        items: its arguments (picklable).
        workers: local processes (or CPUs of a local Ray instance); default: the CPUs.
        ray_address: run as Ray tasks on this cluster (``"local"`` for a local instance).
    """
    items = list(items)
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise InputError("--workers", "workers", "a positive number of processes", workers)
    if ray_address is not None:
        yield from _map_ray(function, items, workers, ray_address)
    elif workers == 1 or len(items) <= 1:
        yield from map(function, items)
    else:
        pool = ProcessPoolExecutor(min(workers, len(items)),
                                   mp_context=multiprocessing.get_context("spawn"))
        try:
            yield from pool.map(function, items)
        finally:
            # A caller that stops early (an error, Ctrl-C) does not wait for the rest.
            pool.shutdown(cancel_futures=True)


def _map_ray(function: Callable[[Item], Result], items: list[Item], workers: int,
             address: str) -> Iterator[Result]:
    try:
        import ray
    except ImportError:
        raise InputError("--ray", "ray", "Ray installed (pip install 'moetuner[ray]')",
                         "no module named ray") from None
    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    refs: list[Any] = []
    done = 0
    try:
        # Ray wraps plain functions only: a partial (bound options) goes through _apply.
        remote = ray.remote(num_cpus=1)(_apply)
        refs = [remote.remote(function, item) for item in items]
        for ref in refs:
            yield ray.get(ref)
            done += 1
    finally:
        # A caller that stops early leaves no tasks running on a cluster it joined.
        for ref in refs[done:]:
            ray.cancel(ref)
        if started:
            ray.shutdown()


def _apply(function: Callable[[Item], Result], item: Item) -> Result:
    """``function(item)``: the one function Ray remotes, whatever callable it is given."""
    return function(item)
