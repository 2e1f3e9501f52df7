"""The writer lock: one writer at a time per file or local store (design decision 4).

HDF5 files and local Zarr stores alike are written by one writer at a time.
Writers are serialised by a lock file beside the data
(``.<name>.dask-loom.lock``, held with ``flock``: it works across processes
and, through NFS locks, machines) and, inside a ``dask.distributed`` worker,
by a ``distributed.Lock`` keyed by the file.  A held lock is waited for with
backoff until the timeout, then :class:`~dask_loom.errors.WriteConflictError`
names the file.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from dask_loom.errors import WriteConflictError
from dask_loom.storage._urls import FileSpec

__all__ = ["distributed_lock", "exclusive", "lock_path"]


def lock_path(spec: FileSpec) -> str:
    """The lock file of *spec*: ``.<name>.dask-loom.lock`` beside it."""
    head, tail = os.path.split(os.path.normpath(spec.url))
    return os.path.join(head, f".{tail}.dask-loom.lock")


@contextlib.contextmanager
def exclusive(spec: FileSpec, timeout: float, *, on_acquire: Callable[[], Any] | None = None) -> Iterator[None]:
    """Hold the writer lock of the local file or store *spec* for the ``with`` block.

    Parameters
    ----------
    spec
        A local path.
    timeout
        Seconds to wait for a writer holding the lock, then
        :class:`~dask_loom.errors.WriteConflictError`.
    on_acquire
        Called once the lock is held (a writer removes what writers that
        died left behind: only the lock holder may).
    """
    import fcntl

    dist_lock = distributed_lock(spec)
    if dist_lock is not None and not dist_lock.acquire(timeout=timeout):
        raise WriteConflictError(f"{spec.name}: another dask_loom task held the write lock for {timeout:.0f} s")
    try:
        path = lock_path(spec)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            deadline = time.monotonic() + timeout
            delay = 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WriteConflictError(
                            f"{spec.name}: another writer held the file for {timeout:.0f} s (lock file {path})"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.25)
            if on_acquire is not None:
                on_acquire()
            yield
        finally:
            os.close(fd)  # releases the flock
    finally:
        if dist_lock is not None:
            dist_lock.release()


def distributed_lock(spec: FileSpec) -> Any:
    """A ``distributed.Lock`` keyed by the file when running inside a distributed worker, else ``None``."""
    import sys

    if "distributed" not in sys.modules:  # never import distributed just to ask
        return None
    try:
        from distributed import Lock
        from distributed.worker import get_worker

        get_worker()
    except (ImportError, ValueError):
        return None
    return Lock(f"dask-loom-write-{spec.url}")
