"""What a process needs to know about one HDF5 dataset to read it by byte range."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from dask_loom._config import get_config

__all__ = ["ChunkIndex", "DatasetLayout", "describe", "full_index", "region_index"]

# HDF5 filter ids the byte-range path decodes itself.
DEFLATE, SHUFFLE, FLETCHER32 = 1, 2, 3
FAST_FILTERS = frozenset({DEFLATE, SHUFFLE, FLETCHER32})
_INDEX_MAGIC = b"DLCI\x01"


@dataclass(frozen=True)
class DatasetLayout:
    """Storage facts of one dataset (small, picklable, hashable)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    layout: str  # "chunked", "contiguous", "compact", "virtual" or "external"
    chunks: tuple[int, ...] | None
    filters: tuple[tuple[int, int, tuple[int, ...]], ...]
    fillvalue: Any
    offset: int | None  # contiguous datasets: where the data starts (None if unallocated)
    fast: bool  # readable by byte ranges + our own decoders
    why_slow: str = ""

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """Storage unit for block planning (the whole array when unchunked)."""
        if self.chunks is not None:
            return self.chunks
        # Unchunked data reads at any leading-axis row: one row is the unit.
        return (1, *(max(1, s) for s in self.shape[1:])) if self.shape else ()

    @property
    def grid(self) -> tuple[int, ...]:
        c = self.chunks or tuple(max(1, s) for s in self.shape)
        return tuple(max(1, math.ceil(s / k)) if s else 0 for s, k in zip(self.shape, c))

    @property
    def filter_names(self) -> list[str]:
        names = {
            1: "gzip",
            2: "shuffle",
            3: "fletcher32",
            4: "szip",
            5: "nbit",
            6: "scaleoffset",
            32000: "lzf",
            32001: "blosc",
            32015: "zstd",
        }
        return [names.get(f[0], f"filter {f[0]}") for f in self.filters]

    @property
    def compression_level(self) -> int | None:
        for fid, _flags, values in self.filters:
            if fid == DEFLATE:
                return int(values[0]) if values else None
        return None


def _plain_dtype(dt: np.dtype) -> bool:
    if dt.kind not in "biufS" or dt.metadata:
        return False
    return h5py.check_dtype(vlen=dt) is None and h5py.check_dtype(enum=dt) is None


def describe(ds: h5py.Dataset) -> DatasetLayout:
    """Read the storage layout of an open dataset."""
    plist = ds.id.get_create_plist()
    kind = plist.get_layout()
    layout = {
        h5py.h5d.CHUNKED: "chunked",
        h5py.h5d.CONTIGUOUS: "contiguous",
        h5py.h5d.COMPACT: "compact",
    }.get(kind, "virtual")
    if layout == "contiguous" and plist.get_external_count() > 0:
        layout = "external"
    filters = []
    for i in range(plist.get_nfilters()):
        fid, flags, values, _name = plist.get_filter(i)
        filters.append((int(fid), int(flags), tuple(int(v) for v in values)))
    dt = ds.dtype
    why = ""
    if not _plain_dtype(dt):
        why = f"dtype {dt} needs h5py's conversion"
    elif layout not in ("chunked", "contiguous"):
        why = f"{layout} layout"
    elif any(f[0] not in FAST_FILTERS for f in filters):
        bad = [f[0] for f in filters if f[0] not in FAST_FILTERS]
        why = f"HDF5 filter(s) {bad} are decoded by h5py"
    offset = None
    if layout == "contiguous":
        offset = ds.id.get_offset()
    fill = ds.fillvalue
    fill = fill.item() if isinstance(fill, np.generic) else fill
    return DatasetLayout(
        path=ds.name,
        shape=tuple(int(s) for s in ds.shape),
        dtype=dt.str if _plain_dtype(dt) else str(dt),
        layout=layout,
        chunks=tuple(int(c) for c in ds.chunks) if ds.chunks else None,
        filters=tuple(filters),
        fillvalue=fill if _plain_dtype(dt) else None,
        offset=None if offset is None else int(offset),
        fast=not why,
        why_slow=why,
    )


@dataclass
class ChunkIndex:
    """Byte offset, stored size and filter mask of every chunk (C order of the grid).

    ``offsets`` is ``-1`` where a chunk was never written (read as fill value).
    """

    grid: tuple[int, ...]
    offsets: np.ndarray
    sizes: np.ndarray
    masks: np.ndarray

    def lookup(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flat = np.ravel_multi_index(tuple(coords.T), self.grid)
        return self.offsets[flat], self.sizes[flat], self.masks[flat]

    def in_c_order(self) -> bool:
        """Whether the stored chunks lie in the file in C order of the grid (judged once)."""
        got = self.__dict__.get("_in_c_order")
        if got is None:
            got = self._in_c_order = self._ascending(self.offsets)
        return got

    @staticmethod
    def _ascending(offsets: np.ndarray) -> bool:
        stored = offsets[offsets >= 0]
        return len(stored) > 1 and bool((np.diff(stored) > 0).all())

    def encode(self) -> bytes:
        """The index as compact bytes (travels inside task graphs; :meth:`decode` reverses it).

        Offsets are stored as differences (chunks written in order lie next
        to each other, so the differences are the chunk sizes and repeat),
        then everything is deflated: about 2 bytes per chunk for loompy files.
        """
        import zlib

        head = (
            _INDEX_MAGIC + struct.pack("<B", len(self.grid)) + struct.pack(f"<{len(self.grid)}q", *self.grid)
        )
        body = b"".join(
            (
                np.diff(self.offsets.astype("<i8"), prepend=np.int64(0)).astype("<i8").tobytes(),
                self.sizes.astype("<i8").tobytes(),
                self.masks.astype("<u4").tobytes(),
            )
        )
        return head + zlib.compress(body, 6)

    @classmethod
    def decode(cls, data: bytes, *, name: str = "chunk index") -> ChunkIndex:
        """Rebuild an index from :meth:`encode`'s bytes (damaged bytes raise :class:`~dask_loom.errors.FormatError`)."""
        import zlib

        from dask_loom.errors import FormatError

        try:
            if not data.startswith(_INDEX_MAGIC):
                raise ValueError("not an encoded chunk index")
            pos = len(_INDEX_MAGIC)
            (ndim,) = struct.unpack_from("<B", data, pos)
            grid = struct.unpack_from(f"<{ndim}q", data, pos + 1)
            n = math.prod(grid)
            body = zlib.decompress(data[pos + 1 + 8 * ndim :])
            if len(body) != n * 20:
                raise ValueError(f"{len(body)} bytes for {n} chunks")
            offsets = np.cumsum(np.frombuffer(body, "<i8", n, 0)).astype(np.int64)
            sizes = np.frombuffer(body, "<i8", n, 8 * n).astype(np.int64)
            masks = np.frombuffer(body, "<u4", n, 16 * n).astype(np.uint32)
        except (ValueError, struct.error, zlib.error) as exc:
            raise FormatError(f"{name}: cannot decode ({exc})") from None
        return cls(tuple(int(g) for g in grid), offsets, sizes, masks)


def full_index(ds: h5py.Dataset, layout: DatasetLayout) -> ChunkIndex:
    """Index every chunk of a dataset with one pass over HDF5's chunk B-tree."""
    grid = layout.grid
    n = math.prod(grid)
    offsets = np.full(n, -1, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    masks = np.zeros(n, dtype=np.uint32)
    chunks = np.asarray(layout.chunks, dtype=np.int64)
    strides = np.cumprod((1, *grid[::-1]))[:-1][::-1]
    entries: list[tuple[tuple[int, ...], int, int, int]] = []
    add = entries.append

    def visit(info: Any) -> None:
        # The callback runs once per chunk under h5py's lock: keep it to one append
        # (positions are computed for all chunks at once afterwards).
        add((info.chunk_offset, info.byte_offset, info.size, info.filter_mask))

    if n:
        from dask_loom.hdf5._direct import chunk_table

        table = chunk_table(ds.id, tuple(grid))
        if table is not None:  # listed without a Python call per chunk
            where, off, siz, msk = table
            p = (where.astype(np.int64) // chunks) @ strides
            offsets[p], sizes[p], masks[p] = off, siz, msk
            return ChunkIndex(grid, offsets, sizes, masks)
        ds.id.chunk_iter(visit)
    if entries:
        where, off, siz, msk = zip(*entries)
        p = (np.asarray(where, dtype=np.int64).reshape(len(entries), -1) // chunks) @ strides
        offsets[p] = off
        sizes[p] = siz
        masks[p] = msk
    return ChunkIndex(grid, offsets, sizes, masks)


def region_index(ds: h5py.Dataset, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Look up only the chunks at *coords* (grid coordinates, one row per chunk)."""
    chunks = np.asarray(ds.chunks, dtype=np.int64)
    offsets = np.full(len(coords), -1, dtype=np.int64)
    sizes = np.zeros(len(coords), dtype=np.int64)
    masks = np.zeros(len(coords), dtype=np.uint32)
    get = ds.id.get_chunk_info_by_coord
    for i, c in enumerate(coords * chunks):
        info = get(tuple(int(x) for x in c))
        if info.byte_offset is not None:
            offsets[i] = info.byte_offset
            sizes[i] = info.size
            masks[i] = info.filter_mask
    return offsets, sizes, masks


def wants_full_index(layout: DatasetLayout) -> bool:
    """Small enough to index whole, once per process?"""
    return math.prod(layout.grid) <= int(get_config("index-max-chunks"))
