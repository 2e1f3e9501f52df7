"""Chunk bytes that a remote chunk-index read fetched through holes, held for the chunk reads that follow.

The leaf pages of a dataset's chunk B-tree lie between its chunks, all through
the file.  Reading them in a few large requests (through the holes, see
``dask_loom.index-read-waste``) is far quicker over an object store than a
request per page, but it fetches most of the chunks too.  The whole index is
built for whole-array work (a ``map``, a scan), which then reads those very
chunks: the bytes are kept here and each chunk inside them is served from
memory, once.  A span is dropped when every chunk inside it has been served,
and all are dropped when the file's cached entry is closed (a connection
closed, the file invalidated), so a process holds at most what one index read
fetched (``index-read-waste`` per tree level).

The blocks of metadata fetched when the file was opened are pinned here too
(they are h5py's block cache already: no second copy), so index pages and
chunks inside them cost no request either.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["HeldSpans"]


class _Span:
    __slots__ = ("end", "owed", "ready", "served", "start", "view")

    def __init__(self, start: int, end: int, view: memoryview | None) -> None:
        self.start = start
        self.end = end
        self.view = view  # None while its request is in flight
        self.ready = threading.Event()
        if view is not None:
            self.ready.set()
        self.owed: int | None = None  # bytes of the chunks inside not yet served (None: index not known yet)
        self.served = 0


class HeldSpans:
    """Byte spans of one remote file, each serving the chunk ranges that lie wholly inside it.

    Spans never overlap (they come from one coalesced read).  A span may be
    *expected* before its bytes arrive (:meth:`expect`, then :meth:`fill` or
    :meth:`fail`): a read of a range inside it waits for it instead of asking
    the store a second time.  Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._spans: list[_Span] = []
        # Few (the blocks fetched on opening): searched in turn.
        self._pinned: list[tuple[int, memoryview]] = []
        self.served = 0  # bytes served from memory (for tests and measurements)

    def pin(self, start: int, blob: Any) -> None:
        """Hold *blob* (the file's bytes from *start*) for as long as this object lives."""
        with self._lock:
            self._pinned.append((start, memoryview(blob).cast("B")))

    def _from_pinned(self, s: int, n: int) -> memoryview | None:
        for start, view in self._pinned:
            if start <= s and s + n <= start + len(view):
                return view[s - start : s - start + n]
        return None

    def pinned_around(self, first: int, last: int) -> tuple[int | None, int | None]:
        """The end of the pinned bytes nearest before *first*, and the start of those nearest after *last*."""
        with self._lock:
            ends = [p0 + len(pv) for p0, pv in self._pinned if p0 + len(pv) <= first]
            starts = [p0 for p0, _pv in self._pinned if p0 >= last]
        return (max(ends) if ends else None, min(starts) if starts else None)

    def __len__(self) -> int:
        return len(self._spans)

    def in_memory(self, offsets: np.ndarray, sizes: np.ndarray) -> int:
        """Bytes of the chunks ``(offsets, sizes)`` that a pinned block or a held span holds whole."""
        stored = offsets >= 0
        inside = self.holds(offsets[stored], sizes[stored])
        return int(sizes[stored][inside].sum())

    def holds(self, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Which of the ranges ``(offsets, sizes)`` a pinned block or a held span (in hand or on its way) holds whole."""
        with self._lock:
            intervals = [(p0, p0 + len(pv)) for p0, pv in self._pinned] + [
                (s.start, s.end) for s in self._spans
            ]
        ends = offsets + sizes
        inside = np.zeros(len(offsets), dtype=bool)
        for a, b in intervals:
            inside |= (offsets >= a) & (ends <= b)
        return inside

    @property
    def nbytes(self) -> int:
        """Bytes held (or on their way) for the chunk reads to come (pinned blocks aside)."""
        with self._lock:
            return sum(s.end - s.start for s in self._spans)

    def _add(self, start: int, end: int, view: memoryview | None) -> _Span | None:
        i = bisect.bisect_left(self._starts, start)
        if (i < len(self._spans) and self._spans[i].start < end) or (i and self._spans[i - 1].end > start):
            return None  # overlaps a span already held (a second read of the index): keep the first
        span = _Span(start, end, view)
        self._starts.insert(i, start)
        self._spans.insert(i, span)
        return span

    def _drop(self, span: _Span) -> None:
        i = bisect.bisect_left(self._starts, span.start)
        if i < len(self._spans) and self._spans[i] is span:
            del self._starts[i]
            del self._spans[i]
        span.ready.set()  # a reader waiting on it looks again: gone, it asks the store

    def _at(self, start: int) -> _Span | None:
        i = bisect.bisect_left(self._starts, start)
        return self._spans[i] if i < len(self._spans) and self._spans[i].start == start else None

    def expect(self, ranges: list[tuple[int, int]]) -> list[int]:
        """Announce spans ``[start, end)`` whose bytes are on their way; returns the starts taken.

        A range overlapping a span held already is not taken (its reads are
        served by that span).
        """
        with self._lock:
            return [a for a, b in ranges if self._add(a, b, None) is not None]

    def fill(self, start: int, blob: Any) -> None:
        """The bytes of the expected span at *start* arrived: reads waiting on it go on."""
        with self._lock:
            span = self._at(start)
            if span is None:
                return
            span.view = memoryview(blob).cast("B")
        span.ready.set()

    def fail(self, start: int) -> None:
        """The expected span at *start* will not come: reads waiting on it ask the store themselves."""
        with self._lock:
            span = self._at(start)
            if span is not None:
                self._drop(span)

    @staticmethod
    def _chunks(offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stored = offsets >= 0
        offs = offsets[stored]
        order = np.argsort(offs, kind="stable")
        offs = offs[order]
        ends = offs + sizes[stored][order]
        return offs, ends, np.concatenate([[0], np.cumsum(ends - offs)])

    def _owed(self, start: int, end: int, chunks: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
        """Bytes of the chunks wholly inside ``[start, end)``, less those a pinned block holds (served from there)."""
        offs, ends, csum = chunks
        # Chunks wholly inside: those starting in it whose end is in it too.
        lo = int(np.searchsorted(offs, start, side="left"))
        hi = int(np.searchsorted(offs, end, side="left"))
        while hi > lo and ends[hi - 1] > end:
            hi -= 1
        owed = int(csum[hi] - csum[lo])
        for p0, pv in self._pinned:
            a = int(np.searchsorted(offs, max(start, p0), side="left"))
            b = int(np.searchsorted(ends, min(end, p0 + len(pv)), side="right"))
            if b > a:
                owed -= int(csum[b] - csum[a])
        return owed

    def settle(self, starts: Iterable[int], offsets: np.ndarray, sizes: np.ndarray) -> None:
        """The spans at *starts* hold chunks of the index ``(offsets, sizes)``: count what each owes; drop those owing nothing.

        A span owes the bytes of the chunks wholly inside it, less those a
        pinned block holds and those it served already.  Only the spans of
        the read that built the index are settled by it: another dataset's
        read, still on its way, owes chunks this index does not list.
        """
        chunks = self._chunks(offsets, sizes)
        with self._lock:
            for start in starts:
                span = self._at(start)
                if span is not None and span.owed is None and span.view is not None:
                    span.owed = self._owed(span.start, span.end, chunks) - span.served
                    if span.owed <= 0:
                        self._drop(span)

    def hold(self, pieces: list[tuple[int, Any]], offsets: np.ndarray, sizes: np.ndarray) -> None:
        """Keep the *pieces* ``(start, bytes)``, in hand already, that hold whole chunks of the index ``(offsets, sizes)``."""
        blobs = dict(pieces)
        taken = self.expect([(start, start + len(memoryview(blob).cast("B"))) for start, blob in pieces])
        for start in taken:
            self.fill(start, blobs[start])
        self.settle(taken, offsets, sizes)

    def take(self, starts: list[int], sizes: list[int]) -> list[memoryview | None]:
        """Each range's bytes if a held span covers it whole, else ``None`` (read it from the store).

        A range inside a span still on its way waits for it.
        """
        out: list[memoryview | None] = [None] * len(starts)
        todo = list(range(len(starts)))
        while todo:
            waits: list[_Span] = []
            later: list[int] = []
            with self._lock:
                if not self._spans and not self._pinned:
                    return out
                for k in todo:
                    s, n = starts[k], sizes[k]
                    pinned = self._from_pinned(s, n) if self._pinned else None
                    if pinned is not None:
                        out[k] = pinned
                        self.served += n
                        continue
                    i = bisect.bisect_right(self._starts, s) - 1
                    if i < 0:
                        continue
                    span = self._spans[i]
                    if s + n > span.end:
                        continue
                    if span.view is None:
                        waits.append(span)
                        later.append(k)
                        continue
                    out[k] = span.view[s - span.start : s - span.start + n]
                    self.served += n
                    span.served += n
                    if span.owed is not None:
                        span.owed -= n
                        if span.owed <= 0:
                            # Every chunk inside was served: a whole-array pass reads each once.
                            self._drop(span)
            for span in waits:
                span.ready.wait()
            todo = later
        return out
