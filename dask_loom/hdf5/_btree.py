"""The chunk index of an HDF5 dataset read straight from its version 1 B-tree.

h5py builds a chunk index by walking HDF5's chunk B-tree node by node; over an
object store every node is a request of its own (a 4,096 x 16,384 Loom file:
about 300 requests before the first byte of data).  Here the tree is read
level by level instead: all nodes of one level are fetched together, in a few
coalesced ranged requests issued at once, and parsed with numpy, so building
the index of any dataset costs one round trip per tree level.

Only what HDF5's default ("earliest") file format writes is read this way:
a layout message of version 3 with chunked storage indexed by a version 1
B-tree (what loompy, h5py and anndata write).  Other indexes (version 2
B-trees, fixed or extensible arrays of the 1.10 format) are left to h5py.

Format references (HDF5 File Format Specification, version 3): "Version 1
B-trees" (III.A.1), "Data Object Headers" (IV.A.1), "Data Layout Message"
(IV.A.2.i).
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_loom.errors import LoomFormatError
from dask_loom.hdf5._layout import ChunkIndex

__all__ = ["BTreeInfo", "PendingChunkIndex", "chunk_btree", "read_chunk_index"]

# Reads ``(starts, sizes) -> bytes`` of a file, all ranges of one call at once.
Fetch = Callable[[list[int], list[int]], list[bytes | memoryview]]

_LAYOUT_MSG = 0x0008
_CONTINUATION_MSG = 0x0010
_CHUNKED = 2
# HDF5's default "indexed storage internal node K": a node holds up to 2K children.
# Files made with another K cost one more request per level for nodes that hold more.
DEFAULT_ISTORE_K = 32
# The most object-header continuation blocks followed (a loop guard for damaged files).
_MAX_HEADER_BLOCKS = 64


@dataclass(frozen=True)
class BTreeInfo:
    """Where a chunked dataset's version 1 B-tree starts, and the sizes its nodes are written with."""

    root: int | None  # absolute address of the root node (None: no chunk written yet)
    chunk_dims: tuple[int, ...]  # chunk shape (without the element-size dimension)
    element_size: int
    sizeof_offsets: int
    base: int  # the superblock's base address (addresses in the file are relative to it)


def _uint(buf: bytes | memoryview, pos: int, n: int) -> int:
    return int.from_bytes(bytes(buf[pos : pos + n]), "little")


def _undefined(value: int, n: int) -> bool:
    return value == (1 << (8 * n)) - 1


def _messages_v1(
    read: Callable[[int, int], bytes], addr: int, so: int, sl: int, name: str
) -> list[tuple[int, bytes]]:
    head = read(addr, 16)
    if len(head) < 16 or head[0] != 1:
        raise LoomFormatError(f"{name}: object header at byte {addr} is not a version 1 header")
    size = _uint(head, 8, 4)
    blocks = [(addr + 16, size)]
    out: list[tuple[int, bytes]] = []
    seen = 0
    while blocks:
        seen += 1
        if seen > _MAX_HEADER_BLOCKS:
            raise LoomFormatError(f"{name}: object header at byte {addr} has too many continuation blocks")
        start, n = blocks.pop(0)
        buf = read(start, n)
        pos = 0
        while pos + 8 <= len(buf):
            mtype, msize = _uint(buf, pos, 2), _uint(buf, pos + 2, 2)
            data = bytes(buf[pos + 8 : pos + 8 + msize])
            pos += 8 + msize
            if mtype == _CONTINUATION_MSG:
                blocks.append((_uint(data, 0, so), _uint(data, so, sl)))
            else:
                out.append((mtype, data))
    return out


def _messages_v2(
    read: Callable[[int, int], bytes], addr: int, so: int, sl: int, name: str
) -> list[tuple[int, bytes]]:
    head = read(addr, 6)
    flags = head[5]
    pos = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
    width = 1 << (flags & 0x03)
    head = read(addr, pos + width)
    size = _uint(head, pos, width)
    blocks = [(addr + pos + width, size, False)]
    out: list[tuple[int, bytes]] = []
    seen = 0
    tracked = bool(flags & 0x04)
    while blocks:
        seen += 1
        if seen > _MAX_HEADER_BLOCKS:
            raise LoomFormatError(f"{name}: object header at byte {addr} has too many continuation blocks")
        start, n, is_cont = blocks.pop(0)
        buf = read(start, n)
        p = 0
        end = min(n, len(buf))
        if is_cont:
            if bytes(buf[:4]) != b"OCHK":
                raise LoomFormatError(
                    f"{name}: object header continuation at byte {start} lacks its signature"
                )
            p = 4
            end -= 4  # the block ends with its checksum
        step = 4 + (2 if tracked else 0)
        while p + step <= end:
            mtype, msize = buf[p], _uint(buf, p + 1, 2)
            data = bytes(buf[p + step : p + step + msize])
            p += step + msize
            if mtype == _CONTINUATION_MSG:
                blocks.append((_uint(data, 0, so), _uint(data, so, sl), True))
            else:
                out.append((mtype, data))
    return out


def chunk_btree(
    read: Callable[[int, int], bytes],
    header_addr: int,
    *,
    sizeof_offsets: int,
    sizeof_lengths: int,
    base: int = 0,
    name: str = "",
) -> BTreeInfo | None:
    """Find a dataset's chunk B-tree from its object header, or ``None`` if it has no version 1 B-tree index.

    *read* ``(offset, size) -> bytes`` reads the file at absolute offsets;
    *header_addr* is the object header's address as the file stores it (the
    hard link's address, relative to the superblock's *base*).
    """
    so, sl = sizeof_offsets, sizeof_lengths
    user_read = read

    def read(offset: int, n: int) -> bytes:
        # Addresses inside the file are relative to the base address (after a user block).
        return user_read(base + offset, n)

    sig = read(header_addr, 4)
    if bytes(sig) == b"OHDR":
        msgs = _messages_v2(read, header_addr, so, sl, name)
    else:
        msgs = _messages_v1(read, header_addr, so, sl, name)
    for mtype, data in msgs:
        if mtype != _LAYOUT_MSG:
            continue
        # Layout message version 3 (HDF5 1.6.3+ default), class 2: chunked, version 1 B-tree.
        if len(data) < 3 or data[0] != 3 or data[1] != _CHUNKED:
            return None
        ndims = data[2]  # rank + 1: the last "dimension" is the element size
        need = 3 + so + 4 * ndims
        if ndims < 2 or len(data) < need:
            raise LoomFormatError(
                f"{name}: damaged data layout message in the object header at byte {header_addr}"
            )
        addr = _uint(data, 3, so)
        dims = struct.unpack_from(f"<{ndims}I", data, 3 + so)
        root = None if _undefined(addr, so) else base + addr
        return BTreeInfo(root, tuple(int(d) for d in dims[:-1]), int(dims[-1]), so, base)
    return None


def _node_bytes(rank: int, so: int, entries: int) -> int:
    key = 8 + 8 * (rank + 1)
    return 8 + 2 * so + entries * (key + so) + key


def read_chunk_index(
    fetch: Fetch,
    info: BTreeInfo,
    *,
    shape: tuple[int, ...],
    file_size: int | None,
    name: str,
    istore_k: int = DEFAULT_ISTORE_K,
    span: tuple[int, int] | None = None,
    stream: Stream | None = None,
) -> ChunkIndex:
    """Read every chunk's byte offset, stored size and filter mask from the B-tree, level by level.

    *span* ``(first, last)`` (positions in the C order of the chunk grid,
    inclusive) restricts the walk to the subtrees that may hold those chunks
    (a B-tree search: a small read fetches a node per level, not the whole
    tree); entries outside the span are then left unknown (``-1``), so such
    an index answers only for chunks inside the span.

    *fetch* reads many byte ranges at once (one round trip); it is called once
    per tree level (twice for a level whose nodes hold more than ``2 *
    istore_k`` entries).  With *stream*, the leaf level (of a tree of two or
    more levels) is not waited for: *stream* starts fetching its pages and a
    :class:`PendingChunkIndex` is returned at once, filled in as they arrive.
    Every address and size is checked against the dataset's shape and
    *file_size*: a damaged or hostile index raises
    :class:`~dask_loom.errors.LoomFormatError` naming the file and the range.
    """
    tree = _Tree(fetch, info, shape=shape, file_size=file_size, name=name, istore_k=istore_k)
    if info.root is None or tree.n == 0:
        return tree.index()
    level_nodes = [info.root]
    expected: int | None = None
    for _depth in range(64):
        nodes = tree.nodes(level_nodes)
        level = nodes[0][1][5]
        for a, buf, _count in nodes:
            if buf[5] != level or (expected is not None and level != expected):
                raise LoomFormatError(
                    f"{name}: B-tree node at byte {a} is at level {buf[5]}, expected {level if expected is None else expected}"
                )
        if level == 0:
            for a, buf, count in nodes:
                tree.fill(a, buf, count)
            return tree.index()
        streaming = level == 1 and stream is not None and span is None
        children: list[int] = []
        firsts: list[np.ndarray] = []  # each child's first key (streaming: which chunks its page holds)
        for _a, buf, count in nodes:
            child, keys = tree.children(buf, count)
            if span is not None and count:
                # Child i holds the chunks from key i up to (not including) key i + 1.
                child = child[(keys[:-1] <= span[1]) & (keys[1:] > span[0])]
            children.extend(child.tolist())
            if streaming:
                firsts.append(keys[:-1])
        if streaming and children:
            return tree.stream(children, np.concatenate(firsts), stream)
        level_nodes = children
        expected = level - 1
        if not level_nodes:
            return tree.index()
    raise LoomFormatError(f"{name}: the chunk B-tree is deeper than 64 levels (damaged)")


# Starts fetching leaf pages ``(starts, sizes)`` in the background and calls ``deliver(i, got)``
# once per page, from any thread, with its bytes or the exception that ended its request.
Stream = Callable[[list[int], list[int], Callable[[int, Any], None]], None]


class _Tree:
    """One dataset's B-tree as it is read: node checks, key positions and the index arrays being filled."""

    def __init__(
        self,
        fetch: Fetch,
        info: BTreeInfo,
        *,
        shape: tuple[int, ...],
        file_size: int | None,
        name: str,
        istore_k: int,
    ) -> None:
        rank = len(shape)
        self.chunks = np.asarray(info.chunk_dims, dtype=np.int64)
        if len(self.chunks) != rank or (self.chunks <= 0).any():
            raise LoomFormatError(
                f"{name}: chunk shape {info.chunk_dims} does not fit a dataset of shape {shape}"
            )
        self.grid = tuple(max(1, math.ceil(s / c)) if s else 0 for s, c in zip(shape, info.chunk_dims))
        self.n = math.prod(self.grid)
        self.offsets = np.full(self.n, -1, dtype=np.int64)
        self.sizes = np.zeros(self.n, dtype=np.int64)
        self.masks = np.zeros(self.n, dtype=np.uint32)
        self.fetch, self.info, self.name, self.rank = fetch, info, name, rank
        so = info.sizeof_offsets
        addr_t = {4: "<u4", 8: "<u8"}.get(so)
        if addr_t is None:
            raise LoomFormatError(f"{name}: unsupported size of file offsets ({so} bytes)")
        self.entry_dt = np.dtype(
            [("size", "<u4"), ("mask", "<u4"), ("coords", "<u8", (rank + 1,)), ("child", addr_t)]
        )
        self.key_dt = np.dtype([("size", "<u4"), ("mask", "<u4"), ("coords", "<u8", (rank + 1,))])
        self.header = 8 + 2 * so
        self.full = _node_bytes(rank, so, 2 * istore_k)
        self.limit = file_size
        self.strides = np.cumprod((1, *self.grid[::-1]))[:-1][::-1].astype(np.int64)
        self.found = 0

    def index(self) -> ChunkIndex:
        if self.found > self.n:
            raise LoomFormatError(
                f"{self.name}: the chunk index lists {self.found} chunks, the dataset has {self.n}"
            )
        return ChunkIndex(self.grid, self.offsets, self.sizes, self.masks)

    def check_range(self, start: int, length: int, what: str) -> None:
        if start < 0 or length < 0 or (self.limit is not None and start + length > self.limit):
            raise LoomFormatError(
                f"{self.name}: the chunk index points outside the file: {what} at bytes {start}..{start + length} "
                f"(the object holds {self.limit} bytes)"
            )

    def want(self, addrs: list[int]) -> list[int]:
        """Bytes to read at each node address: a full node, or up to the file's end."""
        out = [self.full if self.limit is None else max(0, min(self.full, self.limit - a)) for a in addrs]
        for a, w in zip(addrs, out):
            self.check_range(a, min(self.header, max(w, 1)), "a B-tree node")
        return out

    def nodes(self, addrs: list[int], bufs: list[Any] | None = None) -> list[tuple[int, Any, int]]:
        """Nodes ``(address, bytes, entries)``, checked; *bufs* are their first bytes if read already."""
        if bufs is None:
            bufs = list(self.fetch(list(addrs), self.want(addrs)))
        counts = []
        for a, buf in zip(addrs, bufs):
            if len(buf) < self.header or bytes(buf[:4]) != b"TREE" or buf[4] != 1:
                raise LoomFormatError(f"{self.name}: no chunk B-tree node at byte {a} (damaged chunk index)")
            counts.append(_uint(buf, 6, 2))
        so = self.info.sizeof_offsets
        # Nodes holding more entries than the first read covered: fetch their tails together.
        short = [
            i for i, (buf, c) in enumerate(zip(bufs, counts)) if len(buf) < _node_bytes(self.rank, so, c)
        ]
        if short:
            for i in short:
                self.check_range(addrs[i], _node_bytes(self.rank, so, counts[i]), "a B-tree node")
            more = self.fetch(
                [addrs[i] + len(bufs[i]) for i in short],
                [_node_bytes(self.rank, so, counts[i]) - len(bufs[i]) for i in short],
            )
            for i, tail in zip(short, more):
                bufs[i] = bytes(bufs[i]) + bytes(tail)
        return list(zip(addrs, bufs, counts))

    def children(self, buf: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
        """An inner node's child addresses and its ``count + 1`` keys as positions in the grid's C order."""
        ent = np.frombuffer(buf, dtype=self.entry_dt, count=count, offset=self.header)
        child = ent["child"].astype(np.int64) + self.info.base
        last = np.frombuffer(
            buf, dtype=self.key_dt, count=1, offset=self.header + count * self.entry_dt.itemsize
        )
        keys = np.concatenate([ent["coords"][:, : self.rank], last["coords"][:, : self.rank]]).astype(
            np.int64
        )
        return child, (keys // self.chunks) @ self.strides

    def fill(self, a: int, buf: Any, count: int, bounds: tuple[int, int] | None = None) -> int:
        """Enter a leaf node's chunks into the index; *bounds* ``[lo, hi)`` is where its parent says they lie."""
        ent = np.frombuffer(buf, dtype=self.entry_dt, count=count, offset=self.header)
        child = ent["child"].astype(np.int64) + self.info.base
        coords = ent["coords"][:, : self.rank].astype(np.int64)
        grid = np.asarray(self.grid)
        if (coords % self.chunks).any() or (coords < 0).any() or (coords >= grid * self.chunks).any():
            raise LoomFormatError(
                f"{self.name}: the chunk index names a chunk outside the dataset (node at byte {a})"
            )
        size = ent["size"].astype(np.int64)
        if self.limit is not None and count:
            bad = np.flatnonzero(child + size > self.limit)
            if len(bad):
                i = int(bad[0])
                self.check_range(int(child[i]), int(size[i]), f"chunk {tuple(int(c) for c in coords[i])}")
        p = (coords // self.chunks) @ self.strides
        if bounds is not None and count and (p.min() < bounds[0] or p.max() >= bounds[1]):
            # A lookup trusts the parent's keys to know which page to wait for: a page holding
            # chunks outside them would let it read a chunk as never written.
            raise LoomFormatError(
                f"{self.name}: the B-tree leaf at byte {a} holds chunks outside the keys its parent gives it"
            )
        self.offsets[p] = child
        self.sizes[p] = size
        self.masks[p] = ent["mask"]
        return count

    def stream(self, pages: list[int], firsts: np.ndarray, stream: Stream) -> PendingChunkIndex:
        if (np.diff(firsts) < 0).any():
            raise LoomFormatError(
                f"{self.name}: the chunk B-tree's keys are out of order (damaged chunk index)"
            )
        lo = firsts.astype(np.int64)
        lo[0] = 0
        hi = np.append(lo[1:], self.n)
        index = PendingChunkIndex(self, np.asarray(pages, dtype=np.int64), lo, hi)
        stream(pages, self.want(pages), index.deliver)
        return index


class PendingChunkIndex(ChunkIndex):
    """A chunk index whose leaf pages are still arriving: a lookup waits for the pages it needs, no more.

    The levels above the leaves are read first (a round trip each); they tell
    which leaf page holds which chunks (leaf *i* those at positions ``lo[i]
    <= p < hi[i]`` of the grid's C order).  The leaves are then fetched in
    the background, in file order, with the chunks between them; a block
    whose chunks' pages have come decodes while the rest is on its way.  A
    page that fails to come or to parse fails every lookup from then on
    (:attr:`error`); every page is answered one way or the other, so no
    lookup waits for ever.
    """

    def __init__(self, tree: _Tree, pages: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        # Not the dataclass's fields: reading offsets, sizes or masks whole waits for every page.
        self.grid = tree.grid
        self._arrays = (tree.offsets, tree.sizes, tree.masks)
        self.pages = pages  # leaf page addresses, in key order
        self.pid = os.getpid()  # the process whose threads deliver the pages
        self._tree = tree
        self._lo, self._hi = lo, hi
        self._done = np.zeros(len(pages), dtype=bool)
        self._left = len(pages)
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self._callbacks: list[Callable[[PendingChunkIndex], None]] = []

    @property
    def complete(self) -> bool:
        """Whether every leaf page has been entered."""
        with self._cond:
            return self._left == 0 and self.error is None

    def in_c_order(self) -> bool:
        """Whether the stored chunks lie in C order of the grid, judged once; pages still coming are not waited for.

        While pages are still coming, the first leaf page's chunks stand for
        all (a block planner's hint: the first block needs that page first
        anyway).  The answer is kept, so every graph over this index is cut
        alike.
        """
        got = self.__dict__.get("_in_c_order")
        if got is None:
            if self.complete:
                return super().in_c_order()
            self.wait(0, int(self._hi[0]) - 1)
            got = self._in_c_order = self._ascending(self._arrays[0][: self._hi[0]])
        return got

    def when_done(self, fn: Callable[[PendingChunkIndex], None]) -> None:
        """Call ``fn(self)`` once every page is in or one failed (now, if that is so already)."""
        with self._cond:
            if self._left and self.error is None:
                self._callbacks.append(fn)
                return
        fn(self)

    def deliver(self, i: int, got: Any) -> None:
        """Leaf page *i*'s bytes (or the exception that ended its request) have come."""
        error: BaseException | None = got if isinstance(got, BaseException) else None
        if error is None:
            tree = self._tree
            try:
                ((a, buf, count),) = tree.nodes([int(self.pages[i])], [got])
                if buf[5] != 0:
                    raise LoomFormatError(
                        f"{tree.name}: B-tree node at byte {a} is at level {buf[5]}, expected 0"
                    )
                count = tree.fill(a, buf, count, (int(self._lo[i]), int(self._hi[i])))
            except BaseException as exc:  # a damaged page fails the lookups; it must not hang them
                error = exc
        with self._cond:
            if self.error is not None or self._done[i]:
                return
            if error is None:
                self._done[i] = True
                self._left -= 1
                self._tree.found += count
                if self._left == 0 and self._tree.found > self._tree.n:
                    error = LoomFormatError(
                        f"{self._tree.name}: the chunk index lists {self._tree.found} chunks, the dataset has {self._tree.n}"
                    )
            self.error = error
            finished = self._left == 0 or error is not None
            callbacks = self._callbacks if finished else []
            if finished:
                self._callbacks = []
            self._cond.notify_all()
        for fn in callbacks:
            fn(self)

    @property
    def offsets(self) -> np.ndarray:  # type: ignore[override]
        self.wait()
        return self._arrays[0]

    @property
    def sizes(self) -> np.ndarray:  # type: ignore[override]
        self.wait()
        return self._arrays[1]

    @property
    def masks(self) -> np.ndarray:  # type: ignore[override]
        self.wait()
        return self._arrays[2]

    def wait(self, first: int = 0, last: int | None = None) -> None:
        """Wait until the pages holding grid positions *first* to *last* (inclusive; all by default) are in."""
        last = len(self._arrays[0]) - 1 if last is None else last
        i0 = int(np.searchsorted(self._hi, first, side="right"))
        i1 = int(np.searchsorted(self._lo, last, side="right"))
        with self._cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self._done[i0:i1].all():
                    return
                self._cond.wait()

    def lookup(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flat = np.ravel_multi_index(tuple(coords.T), self.grid)
        if len(flat):
            self.wait(int(flat.min()), int(flat.max()))
        offsets, sizes, masks = self._arrays
        return offsets[flat], sizes[flat], masks[flat]

    def encode(self) -> bytes:
        self.wait()
        return super().encode()
