"""The package's thread helpers: one I/O pool per process, and one ordered read-ahead.

* :func:`io_pool` -- the threads for blocking reads and for decoding that
  releases the GIL (ranged reads of h5ad and zarr files, ``get_chunk_future``):
  ``dask_loom.io-threads`` of them, one pool per process, remade in a forked
  child (a torch DataLoader worker) and when the setting changes.
* :func:`map_threads` -- ``[fn(x) for x in items]`` on that pool.
* :func:`read_ahead` -- results of a sequence of thunks in order, with a bounded
  number computed ahead (scan batches, loader fetches, tensor-view tiles,
  OME unit reads), on threads of its own.
* :func:`scratch` -- a per-thread buffer that decoded chunks are staged in
  (HDF5 and Zarr blocks), reused by every read of the thread.
* :class:`SchedulerThreads` -- the threads of the threaded scheduler behind
  ``compute`` (:func:`dask_loom.cluster.thread_pool` hands out its pools); they
  run tasks, the others run I/O.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from dask_loom._allocator import tune_allocator_once
from dask_loom._config import get_config

__all__ = ["PIECE_BYTES", "SchedulerThreads", "io_pool", "map_threads", "piece_spans", "read_ahead", "scratch"]

T = TypeVar("T")

_IO_PREFIX = "dask-loom-io"
_local = threading.local()
_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, size, pool)


def io_pool() -> ThreadPoolExecutor:
    """This process's I/O pool (``dask_loom.io-threads`` threads)."""
    global _pool
    n = max(1, int(get_config("io-threads")))
    pid = os.getpid()
    with _lock:
        if _pool is None or _pool[0] != pid or _pool[1] != n:
            old = _pool
            _pool = (pid, n, ThreadPoolExecutor(max_workers=n, thread_name_prefix=_IO_PREFIX))
            if old is not None and old[0] == pid:
                # Resized: running work finishes on the old threads, new work goes to the new pool.
                old[2].shutdown(wait=False)
        return _pool[2]


def _in_io_pool() -> bool:
    return threading.current_thread().name.startswith(_IO_PREFIX)


def map_threads(fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``[fn(x) for x in items]``, on the I/O pool when there is more than one item.

    Calls made from a thread of the pool run inline: a pool thread waiting on
    work queued behind its own siblings would deadlock the pool (e.g. a batch
    touching more files than the pool has threads).
    """
    if len(items) <= 1 or _in_io_pool():
        return [fn(x) for x in items]
    return list(io_pool().map(fn, items))


def read_ahead(
    thunks: Iterable[Callable[[], T]],
    depth: int,
    *,
    workers: int | None = None,
    name: str = "dask-loom-prefetch",
) -> Iterator[T]:
    """Call *thunks* in order, keeping *depth* calls ahead of the one yielded.

    While the caller works on result *k*, results *k+1 ... k+depth* are being
    computed on up to *workers* threads (default *depth*) of a pool of this
    iteration's own: the thunks may themselves use :func:`map_threads` or run
    a dask graph, which must not wait on the pool they run in.  *thunks* is
    consumed lazily.  Memory holds at most ``depth + 1`` results.  Closing the
    generator early cancels what has not started and waits for what has (so
    no read is still running when the caller goes on, e.g., to write the file).
    ``depth=0`` calls each thunk when its result is asked for.
    """
    depth = int(depth)
    if depth < 0:
        raise ValueError(f"read-ahead depth must be >= 0, got {depth}")
    it = iter(thunks)
    if depth == 0:
        for th in it:
            yield th()
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(depth, workers or depth)), thread_name_prefix=name)
    pending: collections.deque[Future[T]] = collections.deque()
    try:
        for th in it:
            pending.append(pool.submit(th))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def scratch(n: int, dtype: Any) -> Any:
    """A per-thread array of *n* elements of *dtype*, valid until the thread's next call (grown, never shrunk).

    Decoded chunks are staged here: fresh memory for every block costs page
    faults (and, above glibc's mmap threshold, an ``mmap``/``munmap`` pair per
    buffer, which a dask nanny's ``MALLOC_TRIM_THRESHOLD_`` pins at 128 KiB).

    Examples
    --------
    >>> import numpy as np
    >>> a = scratch(4, np.float32)
    >>> a.shape, a.dtype
    ((4,), dtype('float32'))
    >>> scratch(2, np.float32).__array_interface__["data"][0] == a.__array_interface__["data"][0]
    True
    """
    import numpy as np

    dt = np.dtype(dtype)
    nbytes = n * dt.itemsize
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.nbytes < nbytes:
        tune_allocator_once()  # before the first decode of the process
        buf = np.empty(max(nbytes, 1), dtype=np.uint8)
        _local.scratch = buf
    return buf[:nbytes].view(dt)


class SchedulerThreads:
    """One set of task threads behind every pool size the threaded scheduler is given.

    A graph that computes on the cores runs *cores* tasks at once, one whose
    reads wait on an object store twice as many (``dask_loom.remote-threads``).
    Two thread pools would each keep their threads' block buffers
    (:func:`scratch`, a block of 64 MiB each): a process that ran both kinds
    held six buffers on two cores, and the first graph on the larger pool
    paid for four fresh ones, whose first touch costs 2.4 ms per MiB on a
    virtual machine whose memory the host hands out on demand (0.15 s for
    one 64 MiB buffer here, 7 ms once the memory was used before).  Here the
    pools are views of one set of threads, started only when a task finds
    none free, so the larger pool adds only the threads it lacks.

    Examples
    --------
    >>> threads = SchedulerThreads()
    >>> pool = threads.pool(2)
    >>> pool._max_workers, pool.submit(sum, [1, 2]).result()
    (2, 3)
    """

    def __init__(self, *, name: str = "dask-loom") -> None:
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._unfinished = 0  # tasks submitted and not yet run to their end
        self._pools: dict[int, _Pool] = {}

    def pool(self, n: int) -> _Pool:
        """A pool of at most *n* threads (the same object for the same *n*)."""
        n = max(1, int(n))
        with self._lock:
            return self._pools.setdefault(n, _Pool(self, n))

    @property
    def started(self) -> int:
        """Threads started so far."""
        return self._started

    def _submit(self, limit: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            self._unfinished += 1
            # A task whose end is still being counted can look busy for a moment, so a pool
            # may start one thread more than it keeps busy, never more than its own size.
            start = self._unfinished > self._started and self._started < limit
            if start:
                self._started += 1
                index = self._started - 1
        self._work.put((fut, fn, args))
        if start:
            threading.Thread(target=self._serve, name=f"{self._name}_{index}", daemon=True).start()
        return fut

    def _serve(self) -> None:
        while True:
            fut, fn, args = self._work.get()
            result: Any = None
            error: BaseException | None = None
            running = fut.set_running_or_notify_cancel()
            if running:
                try:
                    result = fn(*args)
                except BaseException as exc:  # handed to the caller, as an executor does
                    error = exc
            with self._lock:
                self._unfinished -= 1
            if error is not None:
                fut.set_exception(error)
            elif running:
                fut.set_result(result)
            del fut, fn, args, result, error  # nothing of a finished task stays alive while waiting


class _Pool:
    """What dask's threaded scheduler needs of an executor: ``submit`` and ``_max_workers``."""

    def __init__(self, threads: SchedulerThreads, n: int) -> None:
        self._threads = threads
        self._max_workers = n

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        return self._threads._submit(self._max_workers, fn, args)

    def shutdown(self, wait: bool = True, **_: Any) -> None:
        """Nothing to stop: the threads are the process's, shared by every pool."""


#: Decoded bytes a staged piece holds at most (at least one row of chunks): what a reduction's
#: per-thread buffer touches, in place of the whole block.
PIECE_BYTES = 4 << 20


def piece_spans(rows: int, row_bytes: int, max_bytes: int | None = None) -> list[tuple[int, int]]:
    """Cut *rows* rows of chunks, *row_bytes* decoded bytes each, into ``[a, b)`` runs of at most *max_bytes* (:data:`PIECE_BYTES`).

    A reduction decodes a block a run at a time into one small per-thread
    buffer.  Memory this VM's guest has not used before costs 2.4 ms per MiB
    to touch (7 ms per 64 MiB once used): a 64 MiB staging buffer per thread
    made every thread's first block 0.2 s slower, and every thread the pool
    added later paid it again.  A run is never less than one row of chunks.

    Examples
    --------
    >>> piece_spans(5, 3 << 20, 8 << 20)
    [(0, 2), (2, 4), (4, 5)]
    >>> piece_spans(2, 64 << 20)
    [(0, 1), (1, 2)]
    """
    step = max(1, (PIECE_BYTES if max_bytes is None else max_bytes) // max(1, row_bytes))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]
