"""Store encoded chunks of an h5py dataset in one call, without holding the GIL.

``h5py``'s ``write_direct_chunk`` holds the GIL for the whole HDF5 call
(about 11 us a chunk), so while the single writer stores a batch, the tasks
encoding the next one cannot run Python.  The compiled loop
(``dask_loom/hdf5/_cwrite.c``) calls ``H5Dwrite_chunk`` of the HDF5 library
h5py loaded for a whole block of chunks with the GIL released, under h5py's
own lock so that no other thread enters HDF5 meanwhile.

Without the compiled loop, or where the symbol cannot be found, chunks are
stored through h5py one by one: same file, slower on threads.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["DIRECT", "write_chunks"]

_H5P_DEFAULT = 0


def _load() -> tuple[Any, int] | None:
    try:
        from h5py import h5d
        from h5py._objects import phil  # noqa: F401 - the lock this module relies on

        from dask_loom.hdf5 import _cwrite

        # dlsym on h5py's extension module finds the HDF5 it was linked with (a wheel's or the system's).
        fn = ctypes.CDLL(h5d.__file__).H5Dwrite_chunk
    except (ImportError, OSError, AttributeError):
        return None
    return _cwrite, ctypes.cast(fn, ctypes.c_void_p).value


_MOD = _load()
#: True when chunks are stored by the compiled loop with the GIL released.
DIRECT = _MOD is not None


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
    if (DIRECT if direct is None else direct) and _MOD is not None and len(raws):
        from h5py._objects import phil

        mod, fn = _MOD
        with phil:
            start = mod.write_chunks(dsid.id, _H5P_DEFAULT, offs, offs.shape[1], raws, fn)
    # The rest (all of them without the compiled loop; from a chunk HDF5 refused,
    # whose error h5py then raises) goes through h5py.
    for k in range(start, len(raws)):
        dsid.write_direct_chunk(tuple(int(o) for o in offs[k]), raws[k], 0)
