"""Encoding HDF5 chunks outside h5py, so compression runs in parallel tasks.

HDF5 has one writer at a time, and through h5py its filters run under the
global lock.  Tasks therefore compress whole chunks themselves (zlib, the
library HDF5's own deflate filter uses, at the dataset's level; shuffle;
Fletcher-32) and the single writer only stores the bytes
(:mod:`dask_loom.hdf5._direct`).  A block is cut into its chunks by one
vectorised copy (:func:`cut_chunks`), not chunk by chunk in Python.

Deflate runs through ISA-L (``isal``) where it is installed: on the Loom
benchmark file's 64 x 64 float32 chunks (93 % zeros) it takes 19 us a chunk
at its level 1 against zlib's 54 us at level 2 (loompy's), with output 7 %
smaller; the streams are ordinary zlib streams that HDF5's deflate filter
(and every reader) decodes.  ISA-L has four levels (0-3); the dataset's zlib
level is mapped onto them (1-2 -> 1, 3-5 -> 2, 6-9 -> 3) and level 0 (stored)
stays with zlib.
"""

from __future__ import annotations

import itertools
import math
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from dask_loom.hdf5._layout import DEFLATE, FLETCHER32, SHUFFLE

__all__ = ["ChunkEncoder", "EncodedChunks", "cut_chunks", "deflate", "encode_chunk"]


def _fletcher32() -> Any:
    # numcodecs is imported on the first checksummed chunk, not with the package.
    from numcodecs.fletcher32 import Fletcher32

    return Fletcher32()


def _isal() -> Any:
    try:
        from isal import isal_zlib
    except ImportError:  # an optional speed-up: zlib writes the same format
        return None
    return isal_zlib


_ISAL: Any = None


def deflate(data: Any, level: int) -> bytes:
    """A zlib stream of *data* (bytes or a contiguous buffer), at zlib *level* (ISA-L at the matching level when installed)."""
    compress, lvl = _deflater(level)
    return compress(data, lvl)


def _deflater(level: int) -> tuple[Any, int]:
    # The compress function and its level, looked up once per block rather than once per chunk.
    global _ISAL
    if level > 0:
        if _ISAL is None:
            _ISAL = _isal() or False
        if _ISAL:
            return _ISAL.compress, 1 if level <= 2 else 2 if level <= 5 else 3
    return zlib.compress, level


def encode_chunk(data: np.ndarray, filters: tuple[tuple[int, int, tuple[int, ...]], ...]) -> bytes:
    """Apply an HDF5 filter pipeline (in order) to one full chunk."""
    return _apply(np.ascontiguousarray(data).tobytes(), filters, data.dtype.itemsize)


def _apply(out: Any, filters: tuple[tuple[int, int, tuple[int, ...]], ...], itemsize: int) -> Any:
    # *out*: the chunk's bytes (or a contiguous buffer over them); the result is bytes unless no filter applies.
    for fid, _flags, values in filters:
        if fid == SHUFFLE:
            if itemsize > 1:
                b = np.frombuffer(out, dtype=np.uint8)
                out = b.reshape(-1, itemsize).T.tobytes()
        elif fid == DEFLATE:
            out = deflate(out, int(values[0]) if values else 6)
        elif fid == FLETCHER32:
            out = bytes(_fletcher32().encode(out))
        else:
            raise ValueError(f"HDF5 filter {fid} cannot be encoded outside h5py")
    return out if isinstance(out, bytes) else bytes(out)


def cut_chunks(
    block: np.ndarray, chunks: tuple[int, ...], fillvalue: Any = 0, *, scratch: np.ndarray | None = None
) -> np.ndarray:
    """*block* cut into whole chunks: an array of shape ``(*grid, *chunks)``, C-contiguous.

    Chunk ``(i, j, ...)`` is ``block[i * c0 : (i + 1) * c0, j * c1 : ...]``, its
    part past the block's end filled with *fillvalue*.  One vectorised copy
    per run of whole (and of partial) chunks along each axis, instead of one
    Python step and one copy per chunk.

    Examples
    --------
    >>> import numpy as np
    >>> t = cut_chunks(np.arange(12).reshape(3, 4), (2, 2), fillvalue=-1)
    >>> t.shape, t[1, 1].tolist()
    ((2, 2, 2, 2), [[10, 11], [-1, -1]])
    """
    n = block.ndim
    shape, chunks = block.shape, tuple(int(c) for c in chunks)
    full = [s // c for s, c in zip(shape, chunks)]
    rem = [s % c for s, c in zip(shape, chunks)]
    grid = [f + (r > 0) for f, r in zip(full, rem)]
    dims = (*grid, *chunks)
    nbytes = math.prod(dims) * block.dtype.itemsize
    if scratch is not None and scratch.nbytes >= nbytes:
        tiles = scratch.reshape(-1)[:nbytes].view(block.dtype).reshape(dims)
    else:
        tiles = np.empty(dims, dtype=block.dtype)
    for ax in range(n):
        if rem[ax]:  # only the last chunk along a ragged axis has padding to fill
            tiles[(slice(None),) * ax + (full[ax],)] = fillvalue
    # (g0, c0, g1, c1, ...) -> (g0, g1, ..., c0, c1, ...)
    order = [*range(0, 2 * n, 2), *range(1, 2 * n, 2)]
    # Per axis: the run of whole chunks, or the partial last chunk.
    for parts in itertools.product((False, True), repeat=n):
        grid_sel, chunk_sel, block_sel, split = [], [], [], []
        for ax, partial in enumerate(parts):
            f, r, c = full[ax], rem[ax], chunks[ax]
            if (r if partial else f) == 0:
                break
            if partial:
                grid_sel.append(slice(f, f + 1))
                chunk_sel.append(slice(0, r))
                block_sel.append(slice(f * c, f * c + r))
                split += [1, r]
            else:
                grid_sel.append(slice(0, f))
                chunk_sel.append(slice(None))
                block_sel.append(slice(0, f * c))
                split += [f, c]
        else:
            tiles[(*grid_sel, *chunk_sel)] = block[tuple(block_sel)].reshape(split).transpose(order)
    return tiles


_local = threading.local()


def _load_cut() -> Any:
    try:  # the optional compiled module (dask_loom/hdf5/_chunkcalls.c)
        from dask_loom.hdf5 import _chunkcalls
    except ImportError:
        return None
    return _chunkcalls


_CUT = _load_cut()


def _scratch(nbytes: int) -> np.ndarray:
    # This thread's buffer for cut chunks: fresh 64 MiB per block cost more in
    # page faults than the copy itself.  Nothing returned refers to it.
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _local.buf = np.empty(nbytes, dtype=np.uint8)
    return buf


class EncodedChunks:
    """A block's encoded chunks: ``offsets[k]`` (the chunk's first element) and ``raws[k]`` (its bytes).

    Iterates as ``(offset_tuple, bytes)`` pairs.
    """

    __slots__ = ("offsets", "raws")

    def __init__(self, offsets: np.ndarray, raws: list[Any]) -> None:
        self.offsets = offsets
        self.raws = raws

    def __len__(self) -> int:
        return len(self.raws)

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], Any]]:
        for off, raw in zip(self.offsets.tolist(), self.raws):
            yield tuple(off), raw


class ChunkEncoder:
    """Turns a block (whole chunks of one dataset) into ``(chunk_offset, bytes)`` pairs.

    Small and picklable: tasks carry it, not a file handle.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: Any,
        filters: tuple[Any, ...],
        fillvalue: Any = 0,
    ) -> None:
        self.shape = tuple(shape)
        self.chunks = tuple(chunks)
        self.dtype = np.dtype(dtype)
        self.filters = tuple(filters)
        self.fillvalue = 0 if fillvalue is None else fillvalue

    def __dask_tokenize__(self) -> Any:
        return ("ChunkEncoder", self.shape, self.chunks, self.dtype.str, self.filters)

    def __call__(self, region: tuple[slice, ...], block: np.ndarray) -> EncodedChunks:
        """The block's chunks, encoded, in C order of their positions."""
        block = np.asarray(block, dtype=self.dtype)
        self._check(region, tuple(block.shape))
        padded = math.prod(-(-n // c) * c for n, c in zip(block.shape, self.chunks)) * self.dtype.itemsize
        return self._encode_tiles(
            region, cut_chunks(block, self.chunks, self.fillvalue, scratch=_scratch(padded))
        )

    def encode_gathered(
        self, region: tuple[slice, ...], band: np.ndarray, index: np.ndarray, axis: int
    ) -> EncodedChunks:
        """``self(region, np.take(band, index, axis=axis))``, for a 2-D column gather in one pass.

        *band* holds the rows of *region* and every column that *index* names
        (permute: the whole axis, in the old order).
        """
        band = np.asarray(band, dtype=self.dtype)
        index = np.asarray(index, dtype=np.int64)
        if axis != 1 or band.ndim != 2 or len(self.chunks) != 2 or _CUT is None or self.dtype.hasobject:
            return self(region, np.take(band, index, axis=axis))
        self._check(region, (band.shape[0], len(index)))
        c0, c1 = self.chunks
        grid = (-(-band.shape[0] // c0), -(-len(index) // c1))
        nb = grid[0] * grid[1] * c0 * c1 * self.dtype.itemsize
        tiles = _scratch(nb)[:nb].view(self.dtype).reshape(*grid, c0, c1)
        fill = np.array(self.fillvalue, dtype=self.dtype).tobytes()
        band = np.ascontiguousarray(band)
        _CUT.gather_cut(band, band.shape[0], band.shape[1], self.dtype.itemsize, index, c0, c1, fill, tiles)
        return self._encode_tiles(region, tiles)

    def _check(self, region: tuple[slice, ...], shape: tuple[int, ...]) -> None:
        expect = tuple(r.stop - r.start for r in region)
        if shape != expect:
            raise ValueError(f"block of shape {shape} does not fit region {region}")
        for r, c in zip(region, self.chunks):
            if r.start % c:
                raise ValueError(f"block region {region} does not start on a chunk boundary {self.chunks}")

    def _encode_tiles(self, region: tuple[slice, ...], tiles: np.ndarray) -> EncodedChunks:
        ndim = len(region)
        grid = tiles.shape[:ndim]
        origin = np.array([r.start for r in region], dtype=np.int64)
        step = np.array(self.chunks, dtype=np.int64)
        offsets = np.indices(grid, dtype=np.int64).reshape(ndim, -1).T * step + origin
        filters, itemsize, nbytes = self.filters, self.dtype.itemsize, self.chunk_nbytes
        if filters and filters[0][0] == SHUFFLE and itemsize > 1:
            # The leading shuffle, for all chunks at once (byte k of every element, then k + 1, ...).
            per = math.prod(self.chunks)
            b = tiles.reshape(-1, per).view(np.uint8).reshape(-1, per, itemsize)
            tiles, filters = np.ascontiguousarray(b.transpose(0, 2, 1)), filters[1:]
        flat = memoryview(tiles.reshape(-1).view(np.uint8))
        if not filters:
            raws = [flat[k : k + nbytes].tobytes() for k in range(0, len(flat), nbytes)]
        elif len(filters) == 1 and filters[0][0] == DEFLATE:
            compress, level = _deflater(int(filters[0][2][0]) if filters[0][2] else 6)
            raws = [compress(flat[k : k + nbytes], level) for k in range(0, len(flat), nbytes)]
        else:
            raws = [_apply(flat[k : k + nbytes], filters, itemsize) for k in range(0, len(flat), nbytes)]
        return EncodedChunks(offsets, raws)

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunks) * self.dtype.itemsize
