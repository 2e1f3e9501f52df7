"""Ranged reads of a remote HDF5 file: planned, coalesced, retried, checked for length, or streamed.

The readers of :mod:`dask_loom.hdf5._files` (a process's cached files) go
through here for files on an object store: every call is one round trip of
concurrent ranged requests (:func:`plan_remote` decides which), retried as
one store call while any of them fails, and never returns an answer shorter
than asked for.  :func:`stream_plan` fetches a plan in the background and
hands over each request's bytes as they arrive (the chunk index's leaf
pages, :class:`~dask_loom.hdf5._btree.PendingChunkIndex`).
"""

from __future__ import annotations

import errno
import time
from typing import Any

from dask_loom._config import get_config
from dask_loom.errors import LoomFormatError, StoreError
from dask_loom.hdf5._coalesce import coalesce_plan, gap_within, parse_nbytes
from dask_loom.storage import FileSpec

# ``entry`` below is a process's cached file (``dask_loom.hdf5._files._Entry``): its
# ``size``, and the ``remote`` client made on first use.
_Entry = Any

__all__ = [
    "Plan",
    "STREAM_REQUESTS",
    "object_size",
    "plan_remote",
    "read_remote",
    "remote_ends",
    "stream_plan",
]


def object_size(spec: FileSpec, entry: _Entry) -> int:
    """The remote object's size in bytes (known from opening it, else one HEAD request)."""
    if entry.size is None:
        if entry.fobj is not None and getattr(entry.fobj, "size", None) is not None:
            entry.size = int(entry.fobj.size)
        else:
            remote = _remote(spec, entry)
            entry.size = int(_remote_call(spec, remote.size, what="size"))
    return entry.size


def _remote(spec: FileSpec, entry: _Entry) -> Any:
    if entry.remote is None:
        entry.remote = spec.remote()
    return entry.remote


def _remote_call(spec: FileSpec, fn: Any, *, what: str) -> Any:
    """Run one object-store call with the stores' retry policy and typed errors."""
    from dask_loom.storage._obstore import message

    retries = int(get_config("retries"))
    backoff = float(get_config("retry-backoff"))
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            # Imported on failure only: the stores module brings zarr-python (0.6 s cold).
            from dask_loom.storage._objectstore import CredentialsError, _classify

            kind = _classify(exc)
            if kind == "missing":
                raise FileNotFoundError(errno.ENOENT, f"File '{spec.name}' not found", spec.name) from exc
            if kind == "denied":
                raise CredentialsError(
                    f"{spec.name}: access refused: {type(exc).__name__}: {message(exc)}"
                ) from exc
            if kind != "transient":
                raise StoreError(f"{spec.name}: {what} failed: {type(exc).__name__}: {message(exc)}") from exc
            if attempt == retries:
                raise StoreError(
                    f"{spec.name}: {what} failed after {retries + 1} attempts: {type(exc).__name__}: {message(exc)}"
                ) from exc
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


class _ShortAnswer(OSError):
    """A ranged answer with fewer bytes than asked for (transient: retried)."""


def remote_ends(spec: FileSpec, entry: _Entry, head: int, tail: int) -> tuple[int, list[tuple[int, Any]]]:
    """The object's size and its first *head* and last *tail* bytes as ``(start, bytes)``, in one round trip."""
    remote = _remote(spec, entry)

    def ends() -> tuple[int, list[tuple[int, Any]]]:
        size, first, last = remote.ends(head, tail)
        if len(first) != min(head, size) or len(last) != min(tail, size):
            raise _ShortAnswer(
                errno.EAGAIN,
                f"short answer (the object's ends: {len(first)} and {len(last)} bytes of a {size}-byte object)",
            )
        return size, [(0, first), (size - len(last), last)]

    return _remote_call(spec, ends, what="opening (its first and last bytes)")


def read_remote(
    spec: FileSpec, entry: _Entry, starts: list[int], sizes: list[int], *, max_waste: int | None = None
) -> list[Any]:
    """Ranged requests of about ``dask_loom.coalesce-bytes``, issued at once, each answer checked for length.

    Neighbouring ranges (holes up to ``dask_loom.coalesce-gap``) share a
    request; all requests of the call go out concurrently (obstore's
    asynchronous ranged GETs; fsspec's ``cat_ranges`` for ``memory://``).  An answer shorter than
    asked for (a cut connection, a broken middlebox) is retried like any
    transient fault and never returned short: after the retries a
    :class:`~dask_loom.errors.StoreError` names the object and the range.
    """
    plan = plan_remote(spec, entry, starts, sizes, max_waste=max_waste)
    out: list[Any] = [None] * len(starts)
    for (r0, _r1, members), blob in zip(plan, _fetch_plan(spec, entry, plan)):
        mv = memoryview(blob)
        for i in members:
            out[i] = mv[starts[i] - r0 : starts[i] - r0 + sizes[i]]
    return out


Plan = list[tuple[int, int, list[int]]]


def plan_remote(
    spec: FileSpec,
    entry: _Entry,
    starts: list[int],
    sizes: list[int],
    *,
    max_waste: int | None = None,
    whole: bool = False,
    cover: tuple[int | None, int | None] = (None, None),
) -> Plan:
    """The ranged requests ``(start, end, members)`` that read ranges ``(starts, sizes)`` of a remote file.

    *whole*: the caller keeps the bytes (chunks between index pages), so a
    run cut into pieces is read whole, each piece up to the next, leaving no
    hole for another request; *cover* ``(lo, hi)`` then stretches the first
    piece back to *lo* and the last on to *hi* (the edges of bytes held
    already) when each is within ``coalesce-gap``: the chunks there would
    otherwise each cost a round trip in the middle of a task.
    """
    gap = edge = parse_nbytes(get_config("coalesce-gap"))
    target = parse_nbytes(get_config("coalesce-bytes"))
    if max_waste is not None:
        gap = gap_within(starts, sizes, gap=gap, max_waste=max_waste)
    plan = coalesce_plan(starts, sizes, gap=gap, target=target)
    if whole and plan:
        plan = [
            (r0, nxt[0] if nxt is not None and 0 < nxt[0] - r1 <= gap else r1, m)
            for (r0, r1, m), nxt in zip(plan, [*plan[1:], None])
        ]
        lo, hi = cover
        if lo is not None and 0 < plan[0][0] - lo <= edge:
            plan[0] = (lo, *plan[0][1:])
        if hi is not None and 0 < hi - plan[-1][1] <= edge:
            plan[-1] = (plan[-1][0], hi, plan[-1][2])
    if entry.size is not None:
        for r0, r1, _m in plan:
            if r1 > entry.size:
                raise LoomFormatError(
                    f"{spec.name}: bytes {r0}..{r1} requested, but the object holds only {entry.size} bytes "
                    "(the file's chunk index points past its end)"
                )
    return plan


def _fetch_plan(spec: FileSpec, entry: _Entry, plan: Plan) -> list[Any]:
    """Each planned request's bytes, all sent at once, retried as a whole store call while any fails."""
    remote = _remote(spec, entry)
    blobs: list[Any] = [None] * len(plan)
    todo = list(range(len(plan)))
    short_note = ""

    def attempt() -> None:
        nonlocal todo, short_note
        got = remote.cat_ranges([plan[j][0] for j in todo], [plan[j][1] for j in todo])
        failed: list[int] = []
        first: BaseException | None = None
        for j, blob in zip(todo, got):
            if isinstance(blob, BaseException):
                failed.append(j)
                first = first or blob
            elif len(blob) != plan[j][1] - plan[j][0]:
                failed.append(j)
                short_note = f"bytes {plan[j][0]}..{plan[j][1]}: {len(blob)} of {plan[j][1] - plan[j][0]} bytes answered"
                first = first or _ShortAnswer(errno.EAGAIN, f"short answer ({short_note})")
            else:
                blobs[j] = blob
        todo = failed
        if first is not None:
            raise first

    try:
        _remote_call(spec, attempt, what=f"range request ({len(plan)} ranges)")
    except StoreError as exc:
        if short_note and short_note not in str(exc):
            raise StoreError(f"{exc} [{short_note}]") from exc.__cause__
        raise
    return blobs


# Requests of a streamed read in flight at once.  Sent in file order a few at a time, the
# first pieces arrive early (a block's decoding starts while the rest is on its way); eight
# 4 MiB requests keep hundreds of MB/s flowing at tens of ms per request (4 and 8 measured
# alike through the 20 ms test bed, whose link the requests share).
STREAM_REQUESTS = 8


def stream_plan(
    spec: FileSpec,
    entry: _Entry,
    plan: Plan,
    on_piece: Any,
) -> None:
    """Fetch the planned requests in the background, in order, ``STREAM_REQUESTS`` at a time.

    ``on_piece(j, blob_or_exception)`` is called once for every request *j*
    from a background thread, as it is answered, with its bytes, or with the
    exception (typed and retried as :func:`read_ranges` does) that ended it.
    Returns at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(j: int) -> None:
        got: Any
        try:
            (got,) = _fetch_plan(spec, entry, [plan[j]])
        except BaseException as exc:  # every piece is answered, or waiting readers would hang
            got = exc
        on_piece(j, got)

    # Threads of its own, not the I/O pool: chunk reads on that pool wait for these pieces.
    pool = ThreadPoolExecutor(
        max_workers=max(1, min(STREAM_REQUESTS, len(plan))), thread_name_prefix="dask-loom-stream"
    )
    for j in range(len(plan)):
        pool.submit(one, j)
    pool.shutdown(wait=False)
