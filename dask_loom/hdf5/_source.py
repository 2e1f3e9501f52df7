"""HDF5 datasets as chunk sources: byte-range reads decoded outside h5py.

All h5py calls in a process serialise on one global lock, so threads get no
parallel decompression through h5py (decision 3).  Here h5py is used only to
describe a dataset and look up chunk offsets (once per process, cached); the
bytes are read with ``pread`` (or parallel range requests on object stores)
and inflated with libdeflate in whichever thread or process runs the task.
Datasets whose filters or dtype we cannot decode fall back to h5py reads.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from dask_loom._config import get_config
from dask_loom._threads import piece_spans, scratch
from dask_loom.blocks import from_source
from dask_loom.blocks._plan import grid_coords
from dask_loom.errors import CorruptChunkError, FileBeingWrittenError
from dask_loom.hdf5._btree import PendingChunkIndex, chunk_btree, read_chunk_index
from dask_loom.hdf5._decode import decode_chunk
from dask_loom.hdf5._files import HELD_SPANS, cached_entry, open_h5_read, prefetch_ranges, read_ranges
from dask_loom.hdf5._inflate import BATCHED, inflate_into, inflate_place
from dask_loom.hdf5._layout import (
    DEFLATE,
    ChunkIndex,
    DatasetLayout,
    describe,
    full_index,
    region_index,
    wants_full_index,
)
from dask_loom.hdf5._remote import plan_remote, stream_plan
from dask_loom.hdf5._spans import HeldSpans
from dask_loom.storage import FileSpec

__all__ = ["HDF5Source", "build_index", "dataset_layout", "full_chunk_index", "hdf5_to_dask", "remote_index"]

# Counters the tests use to prove which path served a read (per process).
STATS = {"fast_blocks": 0, "h5py_blocks": 0}
_stats_lock = threading.Lock()


def _place_2d(out: np.ndarray, staged: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Copy chunks ``(g0, g1, c0, c1)`` into row-major *out* in one pass.

    Whole chunks go through a 4-D view of *out* (splitting axes is free), so
    there is no intermediate copy; partial chunks at the array edge are
    copied apart.
    """
    c0, c1 = chunks
    rows, cols = out.shape
    a, ra = divmod(rows, c0)
    b, rb = divmod(cols, c1)
    if a and b:
        np.copyto(out[: a * c0, : b * c1].reshape(a, c0, b, c1), staged[:a, :b].transpose(0, 2, 1, 3))
    if a and rb:
        np.copyto(out[: a * c0, b * c1 :].reshape(a, c0, rb), staged[:a, b, :, :rb])
    if ra and b:
        np.copyto(out[a * c0 :, : b * c1].reshape(ra, b, c1), staged[a, :b, :ra, :].transpose(1, 0, 2))
    if ra and rb:
        out[a * c0 :, b * c1 :] = staged[a, b, :ra, :rb]


def dataset_layout(spec: FileSpec, path: str) -> DatasetLayout:
    """Describe dataset *path* of a file (cached per process until the file changes)."""
    entry = cached_entry(spec)
    key = ("layout", path)
    layout = entry.cache.get(key)
    if layout is None:
        with open_h5_read(spec) as f:
            try:
                ds = f[path]
            except KeyError:
                raise KeyError(f"{spec.name}: no dataset '{path}'") from None
            layout = describe(ds)
        entry.cache[key] = layout
    return layout


def _chunk_offsets(
    spec: FileSpec,
    layout: DatasetLayout,
    coords: np.ndarray,
    entry: Any = None,
    shipped: ChunkIndex | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    entry = entry if entry is not None else cached_entry(spec)
    key = ("index", layout.path)
    index = _usable(entry.cache.get(key))
    if index is None and shipped is not None and _usable(shipped) is not None:
        # The index that came with the graph is used as is: a remote object is immutable.
        index = entry.cache[key] = shipped
    if index is not None:
        return index.lookup(coords)
    if not spec.is_local and wants_full_index(layout) and len(coords):
        flat = np.ravel_multi_index(tuple(coords.T), layout.grid)
        lo, hi = int(flat.min()), int(flat.max())
        if (hi - lo + 1) * 8 >= math.prod(layout.grid):
            # A large part of the array (a block of a whole-array graph): the full
            # index, once per process, costs no more than this part's pages.
            return full_chunk_index(spec, layout, entry).lookup(coords)
        part = _remote_btree_index(spec, layout, entry, span=(lo, hi))
        if part is not None:
            return part.lookup(coords)
    if wants_full_index(layout):
        return full_chunk_index(spec, layout, entry).lookup(coords)
    with open_h5_read(spec) as f:
        return region_index(f[layout.path], coords)


def _usable(index: ChunkIndex | None) -> ChunkIndex | None:
    """*index*, unless it is a streamed index that will not be completed here: then it is read again.

    That is one whose read failed (the fault may be over), or one still
    coming in a forked child (its pages were coming to the parent's threads).
    """
    if isinstance(index, PendingChunkIndex) and (
        index.error is not None or (index.pid != os.getpid() and not index.complete)
    ):
        return None
    return index


def full_chunk_index(spec: FileSpec, layout: DatasetLayout, entry: Any = None) -> ChunkIndex:
    """The dataset's whole chunk index, built once per process (cached with the open file)."""
    entry = entry if entry is not None else cached_entry(spec)
    key = ("index", layout.path)
    index = _usable(entry.cache.get(key))
    if index is None:
        with entry.lock:  # threads of one process build it once
            index = _usable(entry.cache.get(key))
            if index is None:
                index = entry.cache[key] = build_index(spec, layout, entry)
    return index


def build_index(spec: FileSpec, layout: DatasetLayout, entry: Any = None) -> ChunkIndex:
    """Every chunk's offset, size and filter mask.

    Remote files read the dataset's version 1 B-tree level by level (one round
    trip of coalesced ranged requests per level, see :mod:`dask_loom.hdf5._btree`);
    local files, and datasets indexed otherwise, ask h5py (``chunk_iter``).
    """
    entry = entry if entry is not None else cached_entry(spec)
    if not spec.is_local:
        index = _remote_btree_index(spec, layout, entry)
        if index is not None:
            return index
    with open_h5_read(spec) as f:
        return full_index(f[layout.path], layout)


def _remote_btree_index(
    spec: FileSpec, layout: DatasetLayout, entry: Any, *, span: tuple[int, int] | None = None
) -> ChunkIndex | None:
    from dask_loom.hdf5._coalesce import parse_nbytes
    from dask_loom.hdf5._remote import object_size

    info = entry.cache.get(("btree", layout.path), False)
    if info is False:
        with open_h5_read(spec) as f:
            addr = _header_address(f, layout.path)
            if addr is None:
                info = None
            else:
                so, sl = f.id.get_create_plist().get_sizes()
                base = int(f.userblock_size)
                fobj = entry.fobj

                def read(offset: int, n: int) -> bytes:
                    # The object header was just read by h5py: these bytes come from its block cache.
                    fobj.seek(offset)
                    return fobj.read(n)

                info = chunk_btree(read, addr, sizeof_offsets=int(so), sizeof_lengths=int(sl), base=base, name=spec.name)
            object_size(spec, entry)
        if info is not None and (info.chunk_dims != layout.chunks or info.element_size != np.dtype(layout.dtype).itemsize):
            info = None  # a layout we do not model: h5py builds the index
        entry.cache[("btree", layout.path)] = info
    if info is None:
        return None  # another index type: h5py builds it
    waste = parse_nbytes(get_config("index-read-waste"))
    held = entry.cache.setdefault(HELD_SPANS, HeldSpans())
    taken: set[int] = set()  # the spans this index read announced (it settles those alone)

    def fetch(starts: list[int], sizes: list[int]) -> list[Any]:
        # B-tree pages lie between chunks: read through holes, but never most of a large file.
        return read_ranges(spec, starts, sizes, entry=entry, max_waste=waste)

    index = read_chunk_index(
        fetch,
        info,
        shape=layout.shape,
        file_size=entry.size,
        name=f"{spec.name}:{layout.path}",
        span=span,
        stream=_leaf_stream(spec, layout, entry, held, waste, taken) if span is None else None,
    )
    if isinstance(index, PendingChunkIndex):
        index.when_done(lambda done: _index_done(done, held, taken))
    return index


def _leaf_stream(
    spec: FileSpec, layout: DatasetLayout, entry: Any, held: HeldSpans, waste: int, taken: set[int]
) -> Any:
    """The leaf pages' stream of a remote dataset's chunk index (``read_chunk_index``'s *stream*).

    The pages are read with the chunks between them: the whole index is built
    for whole-array work, which reads those chunks next.  Their spans are
    announced before any request goes out, so a chunk read waits for them and
    never asks twice.
    """

    def stream(starts: list[int], sizes: list[int], deliver: Any) -> None:
        pinned = held.take(starts, sizes)
        rest = [i for i, got in enumerate(pinned) if got is None]
        lo = hi = None
        if rest:
            lo, hi = held.pinned_around(min(starts[i] for i in rest), max(starts[i] + sizes[i] for i in rest))
            # Reach a chunk's worth into the blocks held since opening: a chunk across
            # their edge then lies whole in the first or last piece.
            reach = math.prod(layout.chunks) * np.dtype(layout.dtype).itemsize + 1024
            lo = None if lo is None else max(0, lo - reach)
            hi = None if hi is None else min(entry.size or hi, hi + reach)
        plan = plan_remote(
            spec,
            entry,
            [starts[i] for i in rest],
            [sizes[i] for i in rest],
            max_waste=waste,
            whole=True,
            cover=(lo, hi),
        )
        taken.update(held.expect([(r0, r1) for r0, r1, _m in plan]))

        def on_piece(j: int, got: Any) -> None:
            r0, _r1, members = plan[j]
            if isinstance(got, BaseException):
                held.fail(r0)
                for m in members:
                    deliver(rest[m], got)
                return
            if r0 in taken:
                held.fill(r0, got)
            mv = memoryview(got)
            for m in members:
                i = rest[m]
                deliver(i, mv[starts[i] - r0 : starts[i] - r0 + sizes[i]])

        for i, got in enumerate(pinned):
            if got is not None:
                deliver(i, got)
        stream_plan(spec, entry, plan, on_piece)

    return stream


def _index_done(index: PendingChunkIndex, held: HeldSpans, taken: set[int]) -> None:
    if index.error is None:
        # Each span now knows the chunks it owes, and is let go once it has served them.
        held.settle(taken, index.offsets, index.sizes)


def _header_address(f: Any, path: str) -> int | None:
    """The object header address of dataset *path* (from its hard link: no other metadata read).

    ``h5py.h5o.get_info`` would give it too, but HDF5 then sums the object's
    metadata size, which walks the whole chunk B-tree (a request per node).
    """
    import h5py

    parent, _, leaf = path.rstrip("/").rpartition("/")
    try:
        group = f[parent or "/"]  # held: its id closes when the Group object goes
        info = group.id.links.get_info(leaf.encode())
    except (KeyError, ValueError):
        return None
    if info.type != h5py.h5l.TYPE_HARD:
        return None  # a soft or external link: let h5py resolve it
    return int(info.u)


def remote_index(spec: FileSpec, layout: DatasetLayout) -> ChunkIndex | None:
    """The chunk index of a remote dataset if this process has built it already (``None`` otherwise).

    Sources carry it into graphs; one without it builds it when first pickled
    (see :meth:`HDF5Source.chunk_index`).  Local files: always ``None``.
    """
    if spec.is_local or not (layout.fast and layout.layout == "chunked"):
        return None
    return _usable(cached_entry(spec).cache.get(("index", layout.path)))


class HDF5Source:
    """A dataset of an HDF5 file as a :class:`~dask_loom.blocks.ChunkSource`.

    Parameters
    ----------
    spec
        Where the file lives.
    layout
        The dataset's storage facts (from :func:`dataset_layout`).
    prefix
        Task-name prefix of the blocks it yields (``"loom-read"`` …).
    """

    def __init__(
        self, spec: FileSpec, layout: DatasetLayout, *, prefix: str = "hdf-read", index: ChunkIndex | None = None
    ) -> None:
        self.spec = spec
        self.layout = layout
        self.prefix = prefix
        # Remote files: the chunk index, built once where the source is made and shipped to workers.
        self.index = index
        self.shape = layout.shape
        self.dtype = np.dtype(layout.dtype) if layout.fast else None
        self.chunk_shape = layout.chunk_shape
        self.label = f"{spec.name}:{layout.path}"

    def __dask_tokenize__(self) -> Any:
        from dask_loom.hdf5._files import file_identity

        return ("HDF5Source", self.spec.url, self.layout, file_identity(self.spec))

    def chunk_index(self) -> ChunkIndex | None:
        """The whole chunk index of a remote chunked dataset, built once per process (``None`` locally).

        Reading it costs one round of coalesced ranged requests per B-tree
        level.  Graph builders call it (through :attr:`contiguous_axis`, or
        when the source is pickled into a graph), so the index travels with
        the tasks and workers never rebuild it; small reads (``ds[10:20, :5]``)
        never need it: they search the tree for their chunks only.
        """
        lay = self.layout
        self.index = _usable(self.index)
        if self.index is None and not self.spec.is_local and lay.fast and lay.layout == "chunked" and wants_full_index(lay):
            self.index = full_chunk_index(self.spec, lay)
        return self.index

    @property
    def waits(self) -> bool:
        """Whether reading its blocks waits on an object store.

        A remote file's chunks wait for their requests unless the chunk-index
        read already holds most of them in memory (a whole-array pass over a
        file that fits ``dask_loom.index-read-waste``): then more threads than
        cores would only hold more blocks at once.
        """
        if self.spec.is_local or self.spec.url.startswith("memory://"):
            return False
        index = self.index
        if index is None:
            return True
        entry = cached_entry(self.spec)
        held = entry.cache.get(HELD_SPANS)
        if isinstance(index, PendingChunkIndex) and not index.complete:
            # Its pages are still coming, with the chunks between them: judge by what is on its way.
            return held is None or entry.size is None or held.nbytes < entry.size // 2
        stored = int(index.sizes[index.offsets >= 0].sum())
        return held is None or held.in_memory(index.offsets, index.sizes) < stored // 2

    def __reduce__(self) -> Any:
        state: dict[str, Any] = {"prefix": self.prefix, "dtype": self.dtype}
        # Pickled into a graph for other processes: they get the index with the tasks.
        if self.chunk_index() is not None:
            encoded = self._encoded_index()
            if encoded is not None:
                state["index"] = encoded
        return (HDF5Source, (self.spec, self.layout), state)

    def _encoded_index(self) -> bytes | None:
        from dask_loom.hdf5._coalesce import parse_nbytes

        cached = getattr(self, "_index_bytes", None)
        if cached is None:
            cached = self.index.encode() if self.index is not None else b""
            self._index_bytes = cached
        limit = parse_nbytes(get_config("index-ship-bytes"))
        return cached if cached and len(cached) <= limit else None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = state["prefix"]
        if state["dtype"] is not None:
            self.dtype = state["dtype"]
        if state.get("index") is not None:
            self.index = ChunkIndex.decode(state["index"], name=self.label)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def contiguous_axis(self) -> int | None:
        """``0`` when this remote dataset's chunks lie in the file in C order of the chunk grid.

        Then a full-width row band of chunks is one run of bytes (a few large
        ranged requests) while a block of a few chunk columns is a run per
        chunk row: block planners that may choose their bands ask this.
        Local files (read with ``pread``) and unindexed sources answer ``None``.
        """
        if self.ndim < 2 or self.chunk_index() is None:
            return None
        return 0 if self.index.in_c_order() else None

    def read_block(self, region: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
        """Read a region (any region; chunk-aligned ones read each chunk once)."""
        region = tuple(slice(*r.indices(n)[:2]) for r, n in zip(region, self.shape))
        shape = tuple(r.stop - r.start for r in region)
        lay = self.layout
        if lay.fast and lay.layout == "chunked" and math.prod(shape):
            return self._read_chunked(region, shape, out)
        if lay.fast and lay.layout == "contiguous" and math.prod(shape):
            return self._read_contiguous(region, shape, out)
        return self._read_h5py(region, shape, out)

    # -- paths -----------------------------------------------------------------

    def _read_h5py(self, region: tuple[slice, ...], shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        with _stats_lock:
            STATS["h5py_blocks"] += 1
        with open_h5_read(self.spec) as f:
            ds = f[self.layout.path]
            if out is not None and math.prod(shape):
                ds.read_direct(out, source_sel=region)
                return out
            return ds[region] if region else ds[()]

    def _read_contiguous(self, region: tuple[slice, ...], shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        lay = self.layout
        dt = np.dtype(lay.dtype)
        if out is None:
            out = np.empty(shape, dtype=dt)
        if lay.offset is None:  # never written
            out[...] = lay.fillvalue
            return out
        full = lay.shape
        # Read the run of whole leading-axis rows that covers the region, then slice.
        row = math.prod(full[1:]) * dt.itemsize
        r0, r1 = region[0].start, region[0].stop
        (buf,) = read_ranges(self.spec, [lay.offset + r0 * row], [(r1 - r0) * row])
        arr = np.frombuffer(buf, dtype=dt).reshape((r1 - r0, *full[1:]))
        out[...] = arr[(slice(None), *region[1:])]
        with _stats_lock:
            STATS["fast_blocks"] += 1
        return out

    def _stage(self, region: tuple[slice, ...]) -> tuple[np.ndarray, list[int]]:
        """Decode every chunk touching *region* into this thread's staging buffer.

        Returns the chunks in grid order, shaped ``(*grid, *chunks)`` (a view
        valid until the thread's next read), and the first chunk coordinate.
        """
        lay = self.layout
        dt = np.dtype(lay.dtype)
        chunks = lay.chunks
        assert chunks is not None
        c_lo = [r.start // c for r, c in zip(region, chunks)]
        c_hi = [-(-r.stop // c) for r, c in zip(region, chunks)]
        grid = [b - a for a, b in zip(c_lo, c_hi)]
        coords = grid_coords(list(zip(c_lo, c_hi)))
        n_el = math.prod(chunks)
        # Chunks decode straight into their slots of a reused per-thread
        # buffer: fresh memory costs page faults on every block on this kind
        # of machine, and no per-chunk bytes object or concatenation is made.
        flat = scratch(len(coords) * n_el, dt)
        idx = self._read_consistent(coords, flat, n_el * dt.itemsize, dt.itemsize)
        if len(idx) < len(coords):
            missing = np.ones(len(coords), dtype=bool)
            missing[idx] = False
            flat.reshape(len(coords), n_el)[missing] = lay.fillvalue
        with _stats_lock:
            STATS["fast_blocks"] += 1
        return flat.reshape(*grid, *chunks), c_lo

    def _read_consistent(self, coords: np.ndarray, flat: np.ndarray, nbytes: int, itemsize: int) -> np.ndarray:
        """Decode the chunks at *coords* into their slots of *flat*; return the indices of those stored."""
        return self._read_chunks(coords, lambda raws, masks, idx: self._decode_into(raws, masks, idx, flat, nbytes, itemsize))

    def _read_chunks(self, coords: np.ndarray, decode: Any) -> np.ndarray:
        """Read the chunks at *coords* and hand them to ``decode(raws, masks, idx)``; return *idx*.

        *idx* are the positions in *coords* of the chunks stored in the file.

        Chunk offsets and chunk bytes are taken from one and the same version of the file.

        A writer replaces the file by a rename (a new inode): offsets looked up
        in the old file and read from the new one would decode to garbage or,
        worse, to another chunk.  The file's identity is checked after the
        read; if it changed, the read is repeated against the new file.
        """
        from dask_loom.hdf5._files import file_identity

        lay = self.layout
        attempts = 20
        for attempt in range(attempts):
            entry = cached_entry(self.spec)
            try:
                offsets, sizes, masks = _chunk_offsets(self.spec, lay, coords, entry, self.index)
                idx = np.flatnonzero(offsets >= 0)
                raws = read_ranges(self.spec, offsets[idx].tolist(), sizes[idx].tolist(), entry=entry)
                decode(raws, masks[idx], idx)
            except Exception:
                if file_identity(self.spec) == entry.identity:
                    raise
            else:
                if file_identity(self.spec) == entry.identity:
                    return idx
            time.sleep(min(0.001 * 2**attempt, 0.1))
        raise FileBeingWrittenError(
            f"{self.label}: the file was replaced {attempts} times while a block was read (it is being written); read again later"
        )

    def read_staged(self, region: tuple[slice, ...]) -> np.ndarray | None:
        """The region's chunks in grid layout ``(*grid, *chunks)``, without assembling them.

        Only for regions made of whole chunks that lie entirely inside the
        array (``None`` otherwise): reductions can then run on the decoded
        chunks directly and skip the copy into row-major order.  The array is
        a view of a per-thread buffer, valid until the thread's next read.
        """
        return self._stage(region)[0] if self._whole_chunks(region) else None

    def _whole_chunks(self, region: tuple[slice, ...]) -> bool:
        """Whether *region* is made of whole chunks inside the array, on the fast chunked path."""
        lay = self.layout
        if not (lay.fast and lay.layout == "chunked" and lay.chunks):
            return False
        return all(
            not (r.start % c or r.stop % c or r.stop > n or r.stop <= r.start)
            for r, c, n in zip(region, lay.chunks, self.shape)
        )

    def staged_pieces(self, region: tuple[slice, ...]) -> Iterator[np.ndarray] | None:
        """:meth:`read_staged` a few rows of chunks at a time: the region's bytes read at once, decoded piece by piece.

        Yields ``(k, *grid[1:], *chunks)`` arrays of consecutive rows of
        chunks, together covering the region, each a view of a per-thread
        buffer of about :data:`~dask_loom._threads.PIECE_BYTES` valid until
        the next piece is asked for.  The bytes are fetched (and checked to
        come from one version of the file) before the first piece, in the
        same requests as :meth:`read_staged`; only decoding is cut up, so a
        reduction touches a few MiB of buffer instead of the block.  ``None``
        where :meth:`read_staged` is.
        """
        if not self._whole_chunks(region):
            return None
        chunks = self.layout.chunks
        grid = [(r.stop - r.start) // c for r, c in zip(region, chunks)]
        coords = grid_coords([(r.start // c, r.stop // c) for r, c in zip(region, chunks)])
        got: dict[str, Any] = {}
        idx = self._read_chunks(coords, lambda raws, masks, idx: got.update(raws=raws, masks=masks))
        with _stats_lock:
            STATS["fast_blocks"] += 1
        return self._decode_pieces(got["raws"], got["masks"], idx, grid)

    def prefetch(self, region: tuple[slice, ...]) -> None:
        """Start fetching the stored bytes of *region*'s chunks in the background (a remote file whose index is in hand).

        For a read of *region* soon in this process: it then finds its bytes
        on their way or in hand (:func:`~dask_loom.hdf5._files.prefetch_ranges`)
        instead of waiting a round trip while the cores idle.  Never reads the
        chunk index for it, never waits and never fails: a read that finds
        nothing fetched reads as it always does.
        """
        lay = self.layout
        if self.spec.is_local or not (lay.fast and lay.layout == "chunked" and lay.chunks):
            return
        entry = cached_entry(self.spec)
        index = _usable(entry.cache.get(("index", lay.path))) or _usable(self.index)
        if index is None or (isinstance(index, PendingChunkIndex) and not index.complete):
            return
        bounds = [(r.start // c, -(-min(r.stop, n) // c)) for r, c, n in zip(region, lay.chunks, self.shape)]
        if any(a >= b for a, b in bounds):
            return
        offsets, sizes, _masks = index.lookup(grid_coords(bounds))
        stored = offsets >= 0
        prefetch_ranges(self.spec, offsets[stored], sizes[stored], entry=entry)

    def _decode_pieces(self, raws: list[Any], masks: np.ndarray, idx: np.ndarray, grid: list[int]) -> Iterator[np.ndarray]:
        lay = self.layout
        dt = np.dtype(lay.dtype)
        n_el = math.prod(lay.chunks)
        per_row = math.prod(grid[1:])
        for a, b in piece_spans(grid[0], per_row * n_el * dt.itemsize):
            lo, hi = a * per_row, b * per_row
            i0, i1 = (int(i) for i in np.searchsorted(idx, [lo, hi]))
            flat = scratch((hi - lo) * n_el, dt)
            if i1 - i0 < hi - lo:  # chunks never written read as the fill value
                missing = np.ones(hi - lo, dtype=bool)
                missing[idx[i0:i1] - lo] = False
                flat.reshape(hi - lo, n_el)[missing] = lay.fillvalue
            self._decode_into(raws[i0:i1], masks[i0:i1], idx[i0:i1] - lo, flat, n_el * dt.itemsize, dt.itemsize)
            yield flat.reshape(b - a, *grid[1:], *lay.chunks)

    def read_sparse(self, region: tuple[slice, ...], *, transpose: bool = False) -> Any:
        """The region (or its transpose) as ``scipy.sparse.csr_matrix``.

        Chunked 2-D datasets on the fast path are converted from the decoded
        chunks in grid layout (no row-major dense copy of the region); other
        layouts are read dense and converted.
        """
        from dask_loom._csr import dense_to_csr, staged_to_csr

        region = tuple(slice(*r.indices(n)[:2]) for r, n in zip(region, self.shape))
        shape = tuple(r.stop - r.start for r in region)
        lay = self.layout
        if lay.fast and lay.layout == "chunked" and lay.chunks and len(shape) == 2 and math.prod(shape):
            staged, c_lo = self._stage(region)
            offsets = (region[0].start - c_lo[0] * lay.chunks[0], region[1].start - c_lo[1] * lay.chunks[1])
            return staged_to_csr(staged, offsets, shape, transpose=transpose)
        return dense_to_csr(self.read_block(region), transpose=transpose)

    def _place_2d_directly(self, region: tuple[slice, ...], out: np.ndarray) -> bool:
        """Inflate a 2-D region's chunks straight into row-major *out* (compiled loop, deflate only)."""
        lay = self.layout
        chunks = lay.chunks
        if not (BATCHED and chunks and len(chunks) == 2 and out.flags.c_contiguous):
            return False
        if len(lay.filters) != 1 or lay.filters[0][0] != DEFLATE:
            return False
        c_lo = [r.start // c for r, c in zip(region, chunks)]
        c_hi = [-(-r.stop // c) for r, c in zip(region, chunks)]
        coords = grid_coords(list(zip(c_lo, c_hi)))
        origins = coords * np.asarray(chunks, dtype=np.int64)
        done = False

        def decode(raws: list[Any], masks: np.ndarray, idx: np.ndarray) -> None:
            nonlocal done
            if masks.any():  # a chunk stored without its filter: the general path decides
                return
            if len(idx) < len(coords):
                out[...] = lay.fillvalue
            done = inflate_place(raws, out, chunks, origins[idx], region, where=self.label)

        self._read_chunks(coords, decode)
        if done:
            with _stats_lock:
                STATS["fast_blocks"] += 1
        return done

    def _read_chunked(self, region: tuple[slice, ...], shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        dt = np.dtype(self.layout.dtype)
        chunks = self.layout.chunks
        assert chunks is not None
        if out is None:
            out = np.empty(shape, dtype=dt)
        if self._place_2d_directly(region, out):
            return out
        staged, c_lo = self._stage(region)
        if len(chunks) == 2 and all(r.start % c == 0 for r, c in zip(region, chunks)):
            _place_2d(out, staged, chunks)
            return out
        ndim = len(chunks)
        grid = staged.shape[:ndim]
        order = [a for k in range(ndim) for a in (k, ndim + k)]
        staged = staged.transpose(order).reshape([g * c for g, c in zip(grid, chunks)])
        src = tuple(slice(r.start - a * c, r.stop - a * c) for r, a, c in zip(region, c_lo, chunks))
        out[...] = staged[src]
        return out

    def _decode_into(
        self, raws: list[Any], masks: np.ndarray, slots: np.ndarray, flat: np.ndarray, nbytes: int, itemsize: int
    ) -> None:
        filters = self.layout.filters
        where = self.label
        if len(filters) == 1 and filters[0][0] == DEFLATE and not masks.any():
            inflate_into(raws, flat, nbytes, slots=slots.tolist(), where=where)
            return
        out = flat.view(np.uint8).reshape(-1, nbytes)
        for raw, m, s in zip(raws, masks.tolist(), slots.tolist()):
            data = decode_chunk(raw, filters, int(m), nbytes, itemsize, where=where) if filters else raw
            if len(data) != nbytes:
                raise CorruptChunkError(f"{where}: a chunk holds {len(data)} bytes, expected {nbytes}")
            out[s] = np.frombuffer(data, np.uint8)


def hdf5_to_dask(
    spec: FileSpec | str,
    path: str,
    *,
    chunks: Any = None,
    band_axis: int | None = None,
    prefix: str = "hdf-read",
) -> Any:
    """A dataset of an HDF5 file as a chunk-aligned dask array.

    Examples
    --------
    >>> import h5py, numpy as np, tempfile, os
    >>> fn = os.path.join(tempfile.mkdtemp(), "x.h5")
    >>> with h5py.File(fn, "w") as f:
    ...     _ = f.create_dataset("x", data=np.arange(20.0).reshape(4, 5), chunks=(2, 2), compression="gzip")
    >>> x = hdf5_to_dask(fn, "x")
    >>> float(x.sum().compute(scheduler="sync"))
    190.0
    """
    if not isinstance(spec, FileSpec):
        spec = FileSpec.from_path(spec)
    layout = dataset_layout(spec, path)
    src = HDF5Source(spec, layout, prefix=prefix, index=remote_index(spec, layout))
    if src.dtype is None:
        src.dtype = np.dtype(_h5py_dtype(spec, path))
    return from_source(src, chunks=chunks, band_axis=band_axis)


def _h5py_dtype(spec: FileSpec, path: str) -> np.dtype:
    with open_h5_read(spec) as f:
        return f[path].dtype
