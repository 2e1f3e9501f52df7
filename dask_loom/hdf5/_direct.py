"""HDF5 chunk calls for a whole block or dataset at once, without holding the GIL.

``h5py``'s ``write_direct_chunk`` holds the GIL for the whole HDF5 call
(about 11 us a chunk), so while the single writer stores a batch, the tasks
encoding the next one cannot run Python.  The compiled loop
(``dask_loom/hdf5/_chunkcalls.c``) calls ``H5Dwrite_chunk`` of the HDF5 library
h5py loaded for a whole block of chunks with the GIL released, under h5py's
own lock so that no other thread enters HDF5 meanwhile.  :func:`chunk_table`
lists a dataset's chunks through ``H5Dchunk_iter`` the same way, where h5py's
``chunk_iter`` calls back into Python once per chunk (0.8 s with the GIL held
for the 244,766 chunks of the Loom benchmark file).

Without the compiled loop, or where a symbol cannot be found, h5py serves,
one chunk at a time: same results, slower on threads.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["DIRECT", "chunk_table", "write_chunks"]

_H5P_DEFAULT = 0


def _load() -> tuple[Any, int | None, int | None] | None:
    try:
        from h5py import h5d
        from h5py._objects import phil  # noqa: F401 - the lock this module relies on

        from dask_loom.hdf5 import _chunkcalls

        # dlsym on h5py's extension module finds the HDF5 it was linked with (a wheel's or the system's).
        lib = ctypes.CDLL(h5d.__file__)
    except (ImportError, OSError):
        return None

    def address(name: str) -> int | None:
        # H5Dchunk_iter is HDF5 1.14's (h5py may be built against an older one): each call stands alone.
        fn = getattr(lib, name, None)
        return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value

    return _chunkcalls, address("H5Dwrite_chunk"), address("H5Dchunk_iter")


_MOD = _load()
#: True when chunks are stored by the compiled loop with the GIL released.
DIRECT = _MOD is not None and _MOD[1] is not None


def write_chunks(dsid: Any, offsets: np.ndarray, raws: Sequence[Any], *, direct: bool | None = None) -> None:
    """Store ``raws[k]`` (an encoded chunk, every filter applied) at chunk origin ``offsets[k]`` of *dsid*.

    Parameters
    ----------
    dsid
        An h5py ``DatasetID`` open for writing.
    offsets
        Integer array of shape ``(len(raws), rank)``: each chunk's first element.
    raws
        The chunks' bytes (``bytes`` or contiguous buffers).
    direct
        Use the compiled loop (default: when it is available); ``False``
        stores through h5py.
    """
    offs = np.ascontiguousarray(offsets, dtype=np.uint64).reshape(len(raws), -1)
    start = 0
    if (DIRECT if direct is None else direct) and _MOD is not None and _MOD[1] is not None and len(raws):
        from h5py._objects import phil

        mod, fn, _ = _MOD
        with phil:
            start = mod.write_chunks(dsid.id, _H5P_DEFAULT, offs, offs.shape[1], raws, fn)
    # The rest (all of them without the compiled loop; from a chunk HDF5 refused,
    # whose error h5py then raises) goes through h5py.
    for k in range(start, len(raws)):
        dsid.write_direct_chunk(tuple(int(o) for o in offs[k]), raws[k], 0)


def chunk_table(
    dsid: Any, grid: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Every stored chunk of *dsid*: first elements ``(n, rank)``, file addresses, sizes, filter masks.

    *grid* is the dataset's chunk grid (at most that many chunks).  ``None``
    when the compiled loop is not available or HDF5 could not list them (the
    caller asks h5py).
    """
    if _MOD is None or _MOD[2] is None:
        return None
    from h5py._objects import phil

    mod, _, fn = _MOD
    cap = max(1, math.prod(grid))
    coords = np.empty((cap, len(grid)), dtype=np.uint64)
    addr = np.empty(cap, dtype=np.uint64)
    size = np.empty(cap, dtype=np.uint64)
    mask = np.empty(cap, dtype=np.uint32)
    with phil:
        n = mod.chunk_table(dsid.id, _H5P_DEFAULT, len(grid), coords, addr, size, mask, fn)
    if n < 0:
        return None
    return coords[:n], addr[:n], size[:n], mask[:n]
