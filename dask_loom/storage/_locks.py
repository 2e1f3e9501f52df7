"""The writer lock: one writer at a time per file or local store (design decision 4).

HDF5 files and local Zarr stores alike are written by one writer at a time.
Writers are serialised by a lock file beside the data
(``.<name>.dask-loom.lock``, held with ``flock``: it works across processes
and, through NFS locks, machines) and, inside a ``dask.distributed`` worker,
by a ``distributed.Lock`` keyed by the file.  A held lock is waited for with
backoff until the timeout, then :class:`~dask_loom.errors.WriteConflictError`
names the file.  A lock file beside a target that does not exist when its
writer leaves (a failed create or convert) is removed.
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
    path = lock_path(spec)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise WriteConflictError(
                        f"{spec.name}: another writer held the file for {timeout:.0f} s (lock file {path})"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
                continue
            if _same_file(fd, path):
                break
            # The holder removed the lock file as it left (its target was never
            # created): this lock is on a dead inode; take the new file's.
            os.close(fd)
        try:
            if on_acquire is not None:
                on_acquire()
            yield
        finally:
            # A lock file beside a target that does not exist (a failed create or
            # convert) is removed, while still held; others re-check (_same_file).
            if not os.path.lexists(spec.url):
                with contextlib.suppress(OSError):
                    os.remove(path)
            os.close(fd)  # releases the flock
    finally:
        if dist_lock is not None:
            dist_lock.release()


def _same_file(fd: int, path: str) -> bool:
    """Whether the open lock file *fd* is still the file at *path* (not removed or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


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
