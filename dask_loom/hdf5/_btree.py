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
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dask_loom.errors import LoomFormatError
from dask_loom.hdf5._layout import ChunkIndex

__all__ = ["BTreeInfo", "chunk_btree", "read_chunk_index"]

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
) -> ChunkIndex:
    """Read every chunk's byte offset, stored size and filter mask from the B-tree, level by level.

    *span* ``(first, last)`` (positions in the C order of the chunk grid,
    inclusive) restricts the walk to the subtrees that may hold those chunks
    (a B-tree search: a small read fetches a node per level, not the whole
    tree); entries outside the span are then left unknown (``-1``), so such
    an index answers only for chunks inside the span.

    *fetch* reads many byte ranges at once (one round trip); it is called once
    per tree level (twice for a level whose nodes hold more than ``2 *
    istore_k`` entries).  Every address and size is checked against the
    dataset's shape and *file_size*: a damaged or hostile index raises
    :class:`~dask_loom.errors.LoomFormatError` naming the file and the range.
    """
    rank = len(shape)
    chunks = np.asarray(info.chunk_dims, dtype=np.int64)
    if len(chunks) != rank or (chunks <= 0).any():
        raise LoomFormatError(
            f"{name}: chunk shape {info.chunk_dims} does not fit a dataset of shape {shape}"
        )
    grid = tuple(max(1, math.ceil(s / c)) if s else 0 for s, c in zip(shape, info.chunk_dims))
    n = math.prod(grid)
    offsets = np.full(n, -1, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    masks = np.zeros(n, dtype=np.uint32)
    if info.root is None or n == 0:
        return ChunkIndex(grid, offsets, sizes, masks)
    so = info.sizeof_offsets
    addr_t = {4: "<u4", 8: "<u8"}.get(so)
    if addr_t is None:
        raise LoomFormatError(f"{name}: unsupported size of file offsets ({so} bytes)")
    entry_dt = np.dtype([("size", "<u4"), ("mask", "<u4"), ("coords", "<u8", (rank + 1,)), ("child", addr_t)])
    key_dt = np.dtype([("size", "<u4"), ("mask", "<u4"), ("coords", "<u8", (rank + 1,))])
    header = 8 + 2 * so
    full = _node_bytes(rank, so, 2 * istore_k)
    limit = file_size if file_size is not None else None

    def check_range(start: int, length: int, what: str) -> None:
        if start < 0 or length < 0 or (limit is not None and start + length > limit):
            raise LoomFormatError(
                f"{name}: the chunk index points outside the file: {what} at bytes {start}..{start + length} "
                f"(the object holds {limit} bytes)"
            )

    level_nodes = [info.root]
    expected_level: int | None = None
    strides = np.cumprod((1, *grid[::-1]))[:-1][::-1].astype(np.int64)
    found = 0
    depth = 0
    while level_nodes:
        depth += 1
        if depth > 64:
            raise LoomFormatError(f"{name}: the chunk B-tree is deeper than 64 levels (damaged)")
        want = [full if limit is None else max(0, min(full, limit - a)) for a in level_nodes]
        for a, w in zip(level_nodes, want):
            check_range(a, min(header, max(w, 1)), "a B-tree node")
        bufs = list(fetch(list(level_nodes), want))
        # Nodes holding more entries than the first read covered: fetch their tails together.
        counts = []
        for a, buf in zip(level_nodes, bufs):
            if len(buf) < header or bytes(buf[:4]) != b"TREE" or buf[4] != 1:
                raise LoomFormatError(f"{name}: no chunk B-tree node at byte {a} (damaged chunk index)")
            counts.append(_uint(buf, 6, 2))
        short = [i for i, (buf, c) in enumerate(zip(bufs, counts)) if len(buf) < _node_bytes(rank, so, c)]
        if short:
            for i in short:
                check_range(level_nodes[i], _node_bytes(rank, so, counts[i]), "a B-tree node")
            more = fetch(
                [level_nodes[i] + len(bufs[i]) for i in short],
                [_node_bytes(rank, so, counts[i]) - len(bufs[i]) for i in short],
            )
            for i, tail in zip(short, more):
                bufs[i] = bytes(bufs[i]) + bytes(tail)
        children: list[int] = []
        for a, buf, count in zip(level_nodes, bufs, counts):
            level = buf[5]
            if expected_level is not None and level != expected_level:
                raise LoomFormatError(
                    f"{name}: B-tree node at byte {a} is at level {level}, expected {expected_level}"
                )
            expected_level = level
            ent = np.frombuffer(buf, dtype=entry_dt, count=count, offset=header)
            child = ent["child"].astype(np.int64) + info.base
            if level > 0:
                if span is not None and count:
                    # Child i holds the chunks from key i up to (not including) key i + 1.
                    last = np.frombuffer(buf, dtype=key_dt, count=1, offset=header + count * entry_dt.itemsize)
                    keys = np.concatenate([ent["coords"][:, :rank], last["coords"][:, :rank]]).astype(np.int64)
                    flat = (keys // chunks) @ strides
                    keep = (flat[:-1] <= span[1]) & (flat[1:] > span[0])
                    child = child[keep]
                children.extend(child.tolist())
                continue
            coords = ent["coords"][:, :rank].astype(np.int64)
            if (coords % chunks).any() or (coords < 0).any() or (coords >= np.asarray(grid) * chunks).any():
                raise LoomFormatError(
                    f"{name}: the chunk index names a chunk outside the dataset (node at byte {a})"
                )
            size = ent["size"].astype(np.int64)
            if limit is not None and count:
                bad = np.flatnonzero(child + size > limit)
                if len(bad):
                    i = int(bad[0])
                    check_range(int(child[i]), int(size[i]), f"chunk {tuple(int(c) for c in coords[i])}")
            p = (coords // chunks) @ strides
            offsets[p] = child
            sizes[p] = size
            masks[p] = ent["mask"]
            found += count
        expected_level = None if expected_level is None else expected_level - 1
        if expected_level is not None and expected_level < 0:
            break
        level_nodes = children
    if found > n:
        raise LoomFormatError(f"{name}: the chunk index lists {found} chunks, the dataset has {n}")
    return ChunkIndex(grid, offsets, sizes, masks)
