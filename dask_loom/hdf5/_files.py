"""Per-process caches of open files, invalidated when a file changes.

Graphs carry :class:`~dask_loom.storage.FileSpec` objects, never handles
(decision 2).  Each process opens what it needs here, once, and reopens when
the file's identity (inode, size, mtime) changes, e.g. after a write.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from dask_loom._config import get_config
from dask_loom._handles import HandleCache
from dask_loom.errors import FileBeingWrittenError, LoomFormatError, StoreError, WriteConflictError
from dask_loom.hdf5._coalesce import coalesce
from dask_loom.hdf5._remote import plan_remote, read_remote, remote_ends, stream_plan
from dask_loom.hdf5._spans import HeldSpans
from dask_loom.storage import FileSpec
from dask_loom.storage._locks import exclusive, lock_path

__all__ = [
    "HELD_SPANS",
    "cached_entry",
    "file_identity",
    "reading_values",
    "invalidate",
    "lock_path",
    "open_h5_read",
    "open_h5_write",
    "prefetch_ranges",
    "read_ranges",
]

# The key of an entry's cache under which a chunk-index read leaves chunk bytes it fetched (_spans.py).
HELD_SPANS = "held-spans"

_lock = threading.RLock()
# h5py 3.16 on HDF5 2.0 is reported to crash when threads read variable-length
# strings (every Loom attribute) at once through separate handles (h5py issue
# #2920).  Our h5py reads of values hold this lock; it is taken last and held
# only for the read, so it never waits on anything else.
_value_lock = threading.Lock()
_write_locks: dict[str, threading.RLock] = {}
_open_writers: dict[str, h5py.File] = {}
_transactions: dict[str, h5py.File] = {}


class _Entry:
    """Everything a process keeps open for one file."""

    def __init__(self, spec: FileSpec, identity: Any) -> None:
        self.spec = spec
        self.identity = identity
        self.h5: h5py.File | None = None
        self.fd: int | None = None
        self.fobj: Any = None  # remote file object behind h5py
        self.remote: Any = None  # the RemoteFile a remote object is read through
        self.size: int | None = None  # remote objects: bytes in the object, once known
        self.cache: dict[Any, Any] = {}  # layouts and chunk indexes, keyed by dataset path
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            if self.h5 is not None:
                with contextlib.suppress(Exception):
                    self.h5.close()
                self.h5 = None
            if self.fobj is not None:
                with contextlib.suppress(Exception):
                    self.fobj.close()
                self.fobj = None
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                self.fd = None
            self.cache.clear()


# One entry per file URL, unbounded (a process reads few files), replaced when the
# file's identity changes.  HandleCache empties itself in a forked child: HDF5 is
# not fork-safe, so a child (a torch DataLoader worker, a multiprocessing pool)
# opens its own handles.
_entries: HandleCache[_Entry] = HandleCache("hdf5 files", close=_Entry.close)
_inherited: list[Any] = []

# Chunk indexes outlive a reader's handles: closing a connection keeps them, with the
# identity of the file they describe, so reopening the unchanged file in this process
# skips the walk of its chunk B-tree (about a second for 245,000 chunks); a write in
# this process drops them, a change by anyone else changes the identity.  A few files.
_kept_indexes: collections.OrderedDict[str, tuple[Any, dict[Any, Any]]] = collections.OrderedDict()
_kept_lock = threading.Lock()
_KEPT_FILES = 8


def _forget_after_fork() -> None:
    # The write state is no cache but is per process too.  The parent's writers
    # stay referenced, unclosed: closing them could block on locks that the
    # parent's other threads held at the moment of the fork.
    global _lock, _value_lock, _write_locks, _open_writers, _transactions, _kept_lock
    _inherited.append((_open_writers, _transactions))
    _lock = threading.RLock()
    _kept_lock = threading.Lock()
    _value_lock = threading.Lock()
    _write_locks = {}
    _open_writers = {}
    _transactions = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


@contextlib.contextmanager
def reading_values() -> Iterator[None]:
    """Hold the process-wide lock for reading values through h5py (see ``_value_lock``)."""
    with _value_lock:
        yield


def file_identity(spec: FileSpec) -> Any:
    """Something that changes whenever the file is rewritten."""
    if spec.is_local:
        try:
            st = os.stat(spec.url)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"File '{spec.url}' not found", spec.url) from None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    # Remote objects are immutable once written (read-only path): no per-task HEAD request.
    return ("remote", spec.url)


def cached_entry(spec: FileSpec) -> _Entry:
    """The process-wide entry for *spec*, reopened if the file changed."""
    ident = file_identity(spec)
    return _entries.get(spec.url, lambda: _new_entry(spec, ident), valid=lambda e: e.identity == ident)


def _new_entry(spec: FileSpec, ident: Any) -> _Entry:
    entry = _Entry(spec, ident)
    with _kept_lock:
        kept = _kept_indexes.get(spec.url)
        if kept is not None and kept[0] == ident:
            entry.cache.update(kept[1])
    return entry


def invalidate(spec: FileSpec | str, *, keep_indexes: bool = False) -> None:
    """Close and forget everything cached for a file in this process.

    With *keep_indexes* (a reader closing) the file's chunk indexes are kept
    for a later reopening of the same, unchanged file; without it (a write)
    they are dropped too.
    """
    url = spec.url if isinstance(spec, FileSpec) else FileSpec.from_path(spec).url
    entry = _entries.peek(url) if keep_indexes else None
    indexes = {k: v for k, v in list(entry.cache.items()) if k[:1] == ("index",)} if entry is not None else {}
    with _kept_lock:
        if indexes:
            _kept_indexes[url] = (entry.identity, indexes)  # type: ignore[union-attr]
            _kept_indexes.move_to_end(url)
            while len(_kept_indexes) > _KEPT_FILES:
                _kept_indexes.popitem(last=False)
        elif not keep_indexes:
            _kept_indexes.pop(url, None)
    _entries.discard(url)


def clear_all() -> None:
    """Close every cached file of this process (used by tests and shutdown)."""
    with _kept_lock:
        _kept_indexes.clear()
    _entries.forget(lambda _url: True)


@atexit.register
def _close_remote_files() -> None:
    # HDF5 closes the files still open from the C library's own exit handler, after the
    # interpreter is gone; for a remote file h5py's file-object driver then calls back into
    # Python and the process dies with SIGSEGV (any script that never closed a remote
    # connection). Closed here, while Python still runs; an entry a stuck thread holds is
    # left to HDF5 rather than let the exit hang.
    for url in _entries.keys():
        entry = _entries.peek(url) if "://" in str(url) else None
        if entry is None or not entry.lock.acquire(timeout=5):
            continue
        try:
            _entries.discard(url)
        finally:
            entry.lock.release()


def _not_hdf5(spec: FileSpec, exc: BaseException) -> LoomFormatError:
    return LoomFormatError(f"{spec.name}: not a readable HDF5 file ({exc})")


@contextlib.contextmanager
def open_h5_read(spec: FileSpec) -> Iterator[h5py.File]:
    """An h5py handle for reading *spec*, held only for the ``with`` block.

    Local files are opened per use (about 0.2 ms) and closed again, so no
    handle of ours lingers to clash with another h5py user of the same file in
    this process (HDF5 refuses to open a file twice with different intents);
    the expensive facts (layouts, chunk indexes) are cached separately.
    Remote files keep one cached handle, since opening them costs requests.
    Handles are held only briefly, so their shared HDF5 lock never keeps a
    writer out for long (writers retry with backoff).
    Calls serialise per file (h5py serialises them anyway) and nest freely.
    """
    writer = _open_writers.get(spec.url)
    if writer is not None:
        # This process is writing the file: the writer sees the newest content.
        yield writer
        return
    entry = cached_entry(spec)
    with entry.lock:
        if entry.h5 is not None:
            yield entry.h5
            return
        entry.h5 = _open_for_read(spec, entry)
        try:
            yield entry.h5
        finally:
            if spec.is_local:
                with contextlib.suppress(Exception):
                    entry.h5.close()
                entry.h5 = None


def _open_for_read(spec: FileSpec, entry: _Entry) -> h5py.File:
    try:
        if spec.is_local:
            return _open_local_for_read(spec)
        from dask_loom.hdf5._metablocks import open_metadata_file

        # h5py reads only metadata here (object headers, attributes, names): chunk
        # indexes are read by _btree.py and chunks by read_ranges.  A Loom file keeps
        # it at the start and after the matrix: 1 MiB cached blocks open a 4,096 x
        # 16,384 loompy file in 3 blocks (64 KiB blocks took 6), all fetched in one
        # round trip that also gives the size (a missing object is told by it too).
        block = 2**20
        pieces = None
        if entry.size is None:
            entry.size, pieces = remote_ends(spec, entry, block, 2 * block)
        # The blocks stay held for read_ranges too: index pages and chunks lie in them.
        held = entry.cache.setdefault(HELD_SPANS, HeldSpans())
        entry.fobj = open_metadata_file(
            entry.size, lambda st, sz: read_remote(spec, entry, st, sz), block_size=block, pin=held.pin, pieces=pieces
        )
        return h5py.File(entry.fobj, "r")
    except (FileNotFoundError, FileBeingWrittenError, StoreError):
        raise  # refused credentials, an unreachable store: no format error
    except OSError as exc:
        if spec.is_local and not os.path.exists(spec.url):
            raise FileNotFoundError(errno.ENOENT, f"File '{spec.url}' not found", spec.url) from None
        raise _not_hdf5(spec, exc) from None


def _open_local_for_read(spec: FileSpec) -> h5py.File:
    # A writer holding HDF5's exclusive lock (an in-place write, or a loompy
    # "r+" connection) keeps readers out: wait for it with backoff, as writers
    # wait for each other, then say so (it is no format error).
    timeout = float(get_config("write-timeout"))
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            return h5py.File(spec.url, "r")
        except OSError as exc:
            # HDF5 refuses a second handle whose locking flag differs from
            # one already open in this process (a user's h5py/loompy handle).
            if "locking flag" in str(exc):
                return h5py.File(spec.url, "r", locking=False)
            if not _is_lock_error(exc):
                raise
            if time.monotonic() > deadline:
                raise FileBeingWrittenError(
                    f"{spec.name}: the file is being written by another program (it held HDF5's write lock for "
                    f"{timeout:g} s, dask_loom.write-timeout); read again when the write is done"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def _fd(entry: _Entry) -> int:
    with entry.lock:
        if entry.fd is None:
            entry.fd = os.open(entry.spec.url, os.O_RDONLY)
        return entry.fd


# Ranges up to this size are handed out as bytes copies, larger ones as views of the read.
_COPY_BELOW = 1 << 16


def read_ranges(
    spec: FileSpec,
    starts: list[int],
    sizes: list[int],
    *,
    entry: _Entry | None = None,
    max_waste: int | None = None,
) -> list[bytes | memoryview]:
    """Read byte ranges of a file: ``pread`` locally, concurrent range requests remotely.

    Neighbouring ranges are coalesced into one read (chunks of one dataset
    usually lie next to each other on disk), then split again.  *entry* pins
    the cached file the ranges were looked up in.  Remotely, requests are
    sized by ``dask_loom.coalesce-bytes`` and ``dask_loom.coalesce-gap`` and
    sent at once (:func:`coalesce_plan`); *max_waste* caps the bytes of
    holes read through (the smallest holes are merged first).  Ranges inside
    the spans a chunk-index read left held (:mod:`dask_loom.hdf5._spans`)
    are served from them, with no request.
    """
    if not starts:
        return []
    entry = entry if entry is not None else cached_entry(spec)
    if spec.is_local:
        runs = coalesce(list(starts), list(sizes), 1 << 16)
        out: list[Any] = [None] * len(starts)
        # A private duplicate: another thread may close the entry (the file
        # was replaced, a connection closed) while this one reads, and the
        # shared descriptor's number could then name another open file.
        with entry.lock:
            fd = os.dup(_fd(entry))
        try:
            for r0, r1, members in runs:
                buf = os.pread(fd, r1 - r0, r0)
                if len(buf) < r1 - r0:
                    raise LoomFormatError(
                        f"{spec.name}: file is truncated (needed bytes {r0}..{r1}, got {len(buf)})"
                    )
                mv = memoryview(buf) if len(members) > 1 else None
                for i in members:
                    a = starts[i] - r0
                    if mv is None and a == 0 and sizes[i] == len(buf):
                        out[i] = buf
                    elif sizes[i] <= _COPY_BELOW:
                        # A small range as its own bytes: memoryviews are tracked by the cyclic
                        # garbage collector, and one per chunk (thousands per block) made it run
                        # full collections while holding the GIL; bytes are never tracked.
                        out[i] = buf[a : a + sizes[i]]
                    else:
                        out[i] = (mv if mv is not None else memoryview(buf))[a : a + sizes[i]]
        finally:
            os.close(fd)
        return out
    held = entry.cache.get(HELD_SPANS)
    if held is None:
        return read_remote(spec, entry, list(starts), list(sizes), max_waste=max_waste)
    got: list[Any] = held.take(starts, sizes)
    rest = [i for i, v in enumerate(got) if v is None]
    if rest:
        fetched = read_remote(
            spec, entry, [starts[i] for i in rest], [sizes[i] for i in rest], max_waste=max_waste
        )
        for i, v in zip(rest, fetched):
            got[i] = v
    return got


def prefetch_ranges(spec: FileSpec, starts: Any, sizes: Any, *, entry: _Entry) -> None:
    """Start reading byte ranges of a remote file in the background, for a :func:`read_ranges` of them soon.

    The requests are those :func:`read_ranges` would send, announced as held
    spans (:mod:`dask_loom.hdf5._spans`) before they go out: the read then
    waits for them, or finds them in hand, and serves each range from memory
    once (a span is let go when every chunk inside was served).  Ranges a
    pinned block or a held span holds already cost nothing.  Returns at once;
    a request that fails only leaves its ranges to the read, which retries
    and reports as usual.  Nothing for local files.
    """
    if spec.is_local or not len(starts):
        return
    starts, sizes = np.asarray(starts, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    held = entry.cache.setdefault(HELD_SPANS, HeldSpans())
    todo = ~held.holds(starts, sizes)
    if not todo.any():
        return
    plan = plan_remote(spec, entry, starts[todo].tolist(), sizes[todo].tolist())
    taken = set(held.expect([(r0, r1) for r0, r1, _m in plan]))
    plan = [p for p in plan if p[0] in taken]

    def on_piece(j: int, got: Any) -> None:
        r0 = plan[j][0]
        if isinstance(got, BaseException):
            held.fail(r0)
            return
        held.fill(r0, got)
        held.settle([r0], starts, sizes)

    if plan:
        stream_plan(spec, entry, plan, on_piece)


def advise_ranges(spec: FileSpec, starts: list[int], sizes: list[int]) -> None:
    """Ask the OS to start reading byte ranges of a local file now (``posix_fadvise`` ``WILLNEED``).

    For a task that then reads them in small pieces: the disk works ahead of
    the pieces instead of waiting for each in turn.  Nothing for remote files
    or where the call is missing; never fails.
    """
    if not spec.is_local or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(spec.url, os.O_RDONLY)
    except OSError:
        return
    try:
        for a, n in zip(starts, sizes):
            os.posix_fadvise(fd, int(a), int(n), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_ranges_into(
    spec: FileSpec, starts: list[int], sizes: list[int], out: Any, *, entry: _Entry | None = None
) -> None:
    """Read byte ranges one after the other into *out* (a writable buffer of ``sum(sizes)`` bytes).

    Locally, ranges that follow each other in the file are read with one
    ``preadv`` straight into *out*: no intermediate ``bytes`` and no join,
    and the GIL is released for the whole copy.  Remote files go through
    :func:`read_ranges`.
    """
    dst = memoryview(out).cast("B")
    if sum(sizes) != len(dst):
        raise ValueError(f"{sum(sizes)} bytes requested into a buffer of {len(dst)}")
    entry = entry if entry is not None else cached_entry(spec)
    if not spec.is_local:
        pos = 0
        for piece in read_ranges(spec, starts, sizes, entry=entry):
            n = len(piece)
            dst[pos : pos + n] = piece
            pos += n
        return
    with entry.lock:
        fd = os.dup(_fd(entry))
    try:
        pos = 0
        i = 0
        while i < len(starts):
            # One run of ranges contiguous in the file and in *out*.
            r0, n = starts[i], sizes[i]
            j = i + 1
            while j < len(starts) and starts[j] == r0 + n:
                n += sizes[j]
                j += 1
            done = 0
            while done < n:
                got = os.preadv(fd, [dst[pos + done : pos + n]], r0 + done)
                if got <= 0:
                    raise LoomFormatError(
                        f"{spec.name}: file is truncated (needed bytes {r0}..{r0 + n}, got {done})"
                    )
                done += got
            pos += n
            i = j
    finally:
        os.close(fd)


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (
        isinstance(exc, BlockingIOError)
        or "unable to lock" in text
        or "errno = 11" in text
        or "resource temporarily unavailable" in text
    )


@contextlib.contextmanager
def open_h5_write(
    spec: FileSpec,
    *,
    mode: str = "r+",
    timeout: float | None = None,
    atomic: bool = False,
    fresh: bool = False,
) -> Iterator[h5py.File]:
    """Hold *spec* open for writing for the duration of one write.

    HDF5 has one writer at a time.  Writers are serialised by the writer
    lock of :mod:`dask_loom.storage._locks` (a lock file beside the data held
    with ``flock``, and a ``distributed.Lock`` keyed by the file inside a
    cluster) and a lock per process; HDF5's own file lock keeps foreign
    writers (a loompy ``r+`` connection) out.  A held lock is
    waited for with backoff until *timeout*, then
    :class:`~dask_loom.errors.WriteConflictError` names the file.

    ``atomic=True`` makes the write a transaction: the changes go to a copy
    of the file (``fresh=True``: to a new empty file) that replaces the
    original by one atomic rename at the end.  A crash, an exception or a
    SIGKILL at any moment leaves the original untouched, and readers keep
    reading the old content until the rename.  ``mode="w"`` creates the file
    (always atomically).
    """
    if not spec.is_local:
        from dask_loom.errors import ReadOnlyError

        raise ReadOnlyError(
            f"{spec.name}: HDF5 files on object stores are read-only (write a .loom.zarr instead)"
        )
    timeout = float(get_config("write-timeout") if timeout is None else timeout)
    with _lock:
        local_lock = _write_locks.setdefault(spec.url, threading.RLock())
    if not local_lock.acquire(timeout=timeout):
        raise WriteConflictError(
            f"{spec.name}: another thread of this process held the write lock for {timeout:.0f} s"
        )
    try:
        held = _open_writers.get(spec.url) or _transactions.get(spec.url)
        if held is not None and mode == "r+":
            # Nested use in the same thread joins the write already open.
            yield held
            return
        with _exclusive(spec, timeout):
            if mode == "w" or atomic:
                with _transaction(spec, fresh=fresh or mode == "w", timeout=timeout) as f:
                    yield f
            else:
                with _in_place(spec, timeout) as f:
                    _open_writers[spec.url] = f
                    try:
                        yield f
                    finally:
                        _open_writers.pop(spec.url, None)
    finally:
        local_lock.release()


def write_open(spec: FileSpec) -> bool:
    """Whether this process holds *spec* open for writing (a target made inside joins that write)."""
    return spec.url in _open_writers or spec.url in _transactions


@contextlib.contextmanager
def _exclusive(spec: FileSpec, timeout: float) -> Iterator[None]:
    # The writer lock (storage/_locks.py); holding it, stale temporaries of dead writers go.
    with exclusive(spec, timeout, on_acquire=lambda: _remove_stale(spec)):
        yield


def _remove_stale(spec: FileSpec) -> None:
    # We hold the writer lock: temporary files beside the data belong to
    # writers that died in the middle of a transaction.
    import glob

    head, tail = os.path.split(spec.url)
    for stale in glob.glob(os.path.join(glob.escape(head), f".{glob.escape(tail)}.dask-loom-*.tmp")):
        with contextlib.suppress(OSError):
            os.remove(stale)


def _open_retrying(path: str, mode: str, timeout: float, name: str, **kw: Any) -> h5py.File:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            return h5py.File(path, mode, **kw)
        except OSError as exc:
            if "already open" in str(exc) or "locking flag" in str(exc):
                raise WriteConflictError(
                    f"{name}: the file is open in this process through another HDF5 handle "
                    "(for example a loompy or h5py connection); close it before writing"
                ) from None
            if not _is_lock_error(exc):
                if not os.path.exists(path):
                    raise FileNotFoundError(errno.ENOENT, f"File '{path}' not found", path) from None
                raise
            if time.monotonic() > deadline:
                raise WriteConflictError(
                    f"{name}: the file is open for writing by another program; gave up after {timeout:.0f} s"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


@contextlib.contextmanager
def _in_place(spec: FileSpec, timeout: float) -> Iterator[h5py.File]:
    invalidate(spec)
    f = _open_retrying(spec.url, "r+", timeout, spec.name)
    try:
        yield f
        f.flush()
    finally:
        f.close()
        invalidate(spec)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _transaction(spec: FileSpec, *, fresh: bool, timeout: float) -> Iterator[h5py.File]:
    from dask_loom.storage._atomic import disk_full, no_space

    try:
        with _copy_on_write(spec, fresh=fresh, timeout=timeout) as f:
            yield f
    except (OSError, RuntimeError) as exc:
        # h5py reports a full disk from deep inside HDF5 (about the temporary file).
        if no_space(exc):
            raise disk_full(spec.name, exc) from exc
        raise


@contextlib.contextmanager
def _copy_on_write(spec: FileSpec, *, fresh: bool, timeout: float) -> Iterator[h5py.File]:
    import shutil
    import uuid

    head, tail = os.path.split(spec.url)
    tmp = os.path.join(head, f".{tail}.dask-loom-{uuid.uuid4().hex[:12]}.tmp")
    guard = None
    if os.path.exists(spec.url):
        # A shared HDF5 lock on the original keeps foreign HDF5 writers out
        # while our readers (and theirs) go on reading the old content.
        guard = _open_retrying(spec.url, "r", timeout, spec.name)
    try:
        if not fresh and guard is not None:
            shutil.copyfile(spec.url, tmp)
            shutil.copymode(spec.url, tmp)
        f = h5py.File(tmp, "w" if fresh else "r+", locking=False)
        # Readers of this process keep seeing the committed file until the
        # rename; nested writers join the transaction.
        _transactions[spec.url] = f
        try:
            yield f
            f.flush()
        except BaseException:
            # Closing after a failed write can fail too (a full disk): the first error is the one to report.
            with contextlib.suppress(Exception):
                f.close()
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        finally:
            _transactions.pop(spec.url, None)
        f.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if guard is not None:
            guard.close()
            guard = None
        os.replace(tmp, spec.url)
        _fsync_dir(spec.url)
    finally:
        if guard is not None:
            guard.close()
        invalidate(spec)
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)
