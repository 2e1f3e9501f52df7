"""Inflate many zlib streams into one buffer without holding the GIL.

The ``deflate`` package's own ``zlib_decompress`` holds the GIL while it
inflates, so two threads decoding loompy's 16 KiB chunks run no faster than
one.  The same libdeflate is exported by that package's extension module; a
``ctypes`` call into it drops the GIL for the length of the call, and writes
each chunk straight into its slot of the caller's buffer (no intermediate
``bytes`` object, no concatenation afterwards).  Measured on the benchmark
file's chunks (``docs/performance.md``): 2 threads decode close to twice as
fast as one, where every other binding we tried either holds the GIL
(``deflate``, ``isal``) or inflates more slowly (``zlib``, ``zlib-ng``,
``imagecodecs``).

When the symbols are missing (another build of ``deflate``) the module falls
back to ``deflate.zlib_decompress`` under the GIL: slower on threads, same
results.
"""

from __future__ import annotations

import ctypes
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from dask_loom.errors import CorruptChunkError

__all__ = ["BATCHED", "GIL_FREE", "inflate_into", "inflate_place"]

_SUCCESS = 0


def _load() -> Any:
    try:
        from deflate import _deflate

        lib = ctypes.CDLL(_deflate.__file__)
        alloc = lib.libdeflate_alloc_decompressor
        inflate = lib.libdeflate_zlib_decompress
        free = lib.libdeflate_free_decompressor
    except (ImportError, OSError, AttributeError):
        return None
    alloc.restype = ctypes.c_void_p
    alloc.argtypes = []
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    inflate.restype = ctypes.c_int
    # (decompressor, in, in_nbytes, out, out_nbytes_avail, actual_out_nbytes_ret):
    # a NULL last argument asks for exactly out_nbytes_avail bytes.
    inflate.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return alloc, inflate, free


_LIB = _load()
#: True when chunks are inflated with the GIL released (libdeflate through ctypes).
GIL_FREE = _LIB is not None
_local = threading.local()


def _load_batch() -> tuple[Any, tuple[int, int, int]] | None:
    # The optional compiled loop (dask_loom/hdf5/_cinflate.c): one GIL release per block.
    if _LIB is None:
        return None
    try:
        from dask_loom.hdf5 import _cinflate
    except ImportError:
        return None
    addr = tuple(ctypes.cast(f, ctypes.c_void_p).value for f in _LIB)
    return _cinflate, addr  # type: ignore[return-value]


_BATCH = _load_batch()
#: True when whole blocks of chunks are inflated by the compiled loop.
BATCHED = _BATCH is not None


class _Decompressor:
    """One libdeflate decompressor per thread (they are not thread-safe), freed with the thread."""

    def __init__(self) -> None:
        self.ptr = _LIB[0]()
        if not self.ptr:  # pragma: no cover - allocation failure
            raise MemoryError("libdeflate could not allocate a decompressor")

    def __del__(self) -> None:
        if _LIB is not None and self.ptr:
            _LIB[2](self.ptr)
            self.ptr = None


def _decompressor() -> Any:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = _Decompressor()
    return d.ptr


def inflate_into(
    raws: Sequence[Any], out: np.ndarray, nbytes: int, *, slots: Sequence[int] | None = None, where: str = ""
) -> None:
    """Inflate zlib streams ``raws[k]`` into slot ``slots[k]`` (default ``k``) of *out*.

    Slot ``s`` is ``out``'s bytes ``s * nbytes`` to ``(s + 1) * nbytes``.

    Parameters
    ----------
    raws
        Compressed chunks (``bytes`` or contiguous buffers).
    out
        A C-contiguous array, as many bytes as the slots need.
    nbytes
        The decoded size of every chunk; a stream decoding to another size is
        a :class:`~dask_loom.errors.CorruptChunkError`.
    slots
        Where each chunk goes, in units of *nbytes* (chunks missing from a
        file leave holes the caller fills).
    where
        Named in errors (the file and dataset).

    Examples
    --------
    >>> import zlib, numpy as np
    >>> out = np.empty(8, np.uint8)
    >>> inflate_into([zlib.compress(b"abcd"), zlib.compress(b"efgh")], out, 4)
    >>> out.tobytes()
    b'abcdefgh'
    """
    flat = out.reshape(-1).view(np.uint8)
    slots = range(len(raws)) if slots is None else slots
    need = (max(slots, default=-1) + 1) * nbytes
    if flat.nbytes < need:
        raise ValueError(f"{where}: output buffer holds {flat.nbytes} bytes, {need} needed")
    if _LIB is None:
        _inflate_with_gil(raws, flat, nbytes, slots, where)
        return
    if _BATCH is not None:
        mod, (alloc, inflate, free) = _BATCH
        slot_arr = np.asarray(slots, dtype=np.int64)
        for k in mod.inflate_many(raws, flat, nbytes, slot_arr, alloc, inflate, free):
            s = int(slot_arr[k])
            flat[s * nbytes : (s + 1) * nbytes] = np.frombuffer(_zlib_exact(raws[k], nbytes, where), np.uint8)
        return
    d = _decompressor()
    call = _LIB[1]
    base = flat.ctypes.data
    for raw, s in zip(raws, slots):
        if not isinstance(raw, bytes):
            raw = bytes(raw)  # a 1 KiB copy costs less than finding a memoryview's address
        if call(d, raw, len(raw), base + s * nbytes, nbytes, None) != _SUCCESS:
            # libdeflate refuses a few valid streams (e.g. preset dictionaries); zlib decides.
            flat[s * nbytes : (s + 1) * nbytes] = np.frombuffer(_zlib_exact(raw, nbytes, where), np.uint8)


def _inflate_with_gil(raws: Sequence[Any], flat: np.ndarray, nbytes: int, slots: Sequence[int], where: str) -> None:
    import deflate

    for raw, s in zip(raws, slots):
        try:
            data = deflate.zlib_decompress(raw, nbytes)
        except deflate.DeflateError:
            data = _zlib_exact(raw, nbytes, where)
        if len(data) != nbytes:
            raise CorruptChunkError(f"{where}: a chunk decoded to {len(data)} bytes, expected {nbytes}")
        flat[s * nbytes : (s + 1) * nbytes] = np.frombuffer(data, np.uint8)


def _zlib_exact(raw: Any, nbytes: int, where: str) -> bytes:
    try:
        data = zlib.decompress(raw)
    except zlib.error as exc:
        raise CorruptChunkError(f"{where}: a chunk does not inflate ({exc})") from None
    if len(data) != nbytes:
        raise CorruptChunkError(f"{where}: a chunk decoded to {len(data)} bytes, expected {nbytes}")
    return data


def inflate_place(
    raws: Sequence[Any],
    out: np.ndarray,
    chunks: tuple[int, int],
    origins: np.ndarray,
    region: tuple[slice, slice],
    *,
    where: str = "",
) -> bool:
    """Inflate 2-D chunks straight into their place in a row-major *out* (the compiled loop only).

    ``origins[k]`` is chunk *k*'s first (row, column) in the array; *out*
    holds *region*.  Each chunk's part inside the region is copied from a
    cache-sized buffer right after it is decoded: one pass over *out* instead
    of a staging copy and a second, transposing pass.  Returns ``False``
    (nothing done) when the compiled loop is not available.
    """
    if _BATCH is None or out.ndim != 2 or not out.flags.c_contiguous:
        return False
    mod, (alloc, inflate, free) = _BATCH
    c0, c1 = chunks
    isz = out.dtype.itemsize
    r0, q0 = region[0].start, region[1].start
    o = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    lo_r = np.maximum(o[:, 0], region[0].start)
    hi_r = np.minimum(o[:, 0] + c0, region[0].stop)
    lo_c = np.maximum(o[:, 1], region[1].start)
    hi_c = np.minimum(o[:, 1] + c1, region[1].stop)
    nrows = np.maximum(hi_r - lo_r, 0)
    row_bytes = np.maximum(hi_c - lo_c, 0) * isz
    src = ((lo_r - o[:, 0]) * c1 + (lo_c - o[:, 1])) * isz
    dst = (lo_r - r0) * out.strides[0] + (lo_c - q0) * isz
    nbytes = c0 * c1 * isz
    failed = mod.inflate_place(raws, out, nbytes, src, dst, nrows, row_bytes, c1 * isz, out.strides[0], alloc, inflate, free)
    for k in failed:  # streams libdeflate refuses: zlib decides, numpy places
        chunk = np.frombuffer(_zlib_exact(raws[k], nbytes, where), out.dtype).reshape(c0, c1)
        rs, cs = slice(lo_r[k] - o[k, 0], hi_r[k] - o[k, 0]), slice(lo_c[k] - o[k, 1], hi_c[k] - o[k, 1])
        out[lo_r[k] - r0 : hi_r[k] - r0, lo_c[k] - q0 : hi_c[k] - q0] = chunk[rs, cs]
    return True
