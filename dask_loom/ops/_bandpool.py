"""Reusable output buffers for a scan's bands, reused only once nothing refers to them.

A scan of a Loom file yields one fresh band of tens of MB per batch.  Fresh
memory of that size comes from the kernel, faulted in and zeroed on first
write, and a band waiting for the garbage collector is not returned at all:
scanning the 4 GB benchmark layer cost about 2 s of kernel CPU and 0.8-1 GB
of peak RSS.  A :class:`BandPool` keeps a few band buffers and decodes into
one again once the caller has let go of it (0.3 s, 0.25 GB).

Whether the caller let go is read from the buffer's reference count: every
array made from a band (a slice, a reshape, ``np.asarray``, a memoryview, a
layer of a ``LoomView``) refers to the pooled buffer through its ``.base``
chain, so a buffer the caller still holds in any form is never handed out.
Blocks kept by the caller stay valid for as long as they are kept; the pool
then allocates fresh memory instead.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["BandPool"]


class BandPool:
    """At most *size* reusable buffers; :meth:`take` returns one nothing else refers to, or fresh memory.

    A pool pickles to an empty pool (in another process nothing is shared)
    and tokenizes to a constant, so task names stay deterministic.

    Examples
    --------
    >>> pool = BandPool(2)
    >>> a = pool.take((2, 3), np.float32)
    >>> b = pool.take((2, 3), np.float32)  # *a* is still held: another buffer
    >>> np.shares_memory(a, b)
    False
    >>> a_addr = a.__array_interface__["data"][0]
    >>> del a
    >>> pool.take((2, 3), np.float32).__array_interface__["data"][0] == a_addr
    True
    """

    def __init__(self, size: int) -> None:
        self.size = max(0, int(size))
        self._lock = threading.Lock()
        self._bufs: list[np.ndarray] = []
        # The count of a buffer referred to by the pool alone, measured by the
        # very code that checks it (interpreters differ in what they count).
        self._bufs.append(np.empty(1, np.uint8))
        self._alone = self._refs(0)
        self._bufs.clear()

    def __reduce__(self) -> tuple[Any, ...]:
        return (BandPool, (self.size,))

    def __dask_tokenize__(self) -> tuple[str, int]:
        return ("dask-loom-band-pool", self.size)

    def _refs(self, i: int) -> int:
        return sys.getrefcount(self._bufs[i])

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array of *shape* and *dtype* (the caller fills all of it)."""
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        if dtype.hasobject or not n or not self.size:
            return np.empty(shape, dtype)
        with self._lock:
            # Under the lock no other thread can take a buffer; the references
            # outside the pool only ever drop meanwhile, so "alone" stays true.
            small = None
            for i in range(len(self._bufs)):
                if self._refs(i) == self._alone:
                    if self._bufs[i].nbytes >= n:
                        return self._bufs[i][:n].view(dtype).reshape(shape)
                    small = i
            if len(self._bufs) < self.size:
                self._bufs.append(np.empty(n, np.uint8))
                return self._bufs[-1].view(dtype).reshape(shape)
            if small is not None:  # a free buffer too small for this band: replace it
                self._bufs[small] = np.empty(n, np.uint8)
                return self._bufs[small].view(dtype).reshape(shape)
        return np.empty(shape, dtype)
