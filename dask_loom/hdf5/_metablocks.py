"""The file object h5py reads a remote HDF5 file's metadata through, its first blocks fetched at once.

h5py reads a file's metadata (superblock, object headers, attributes, names)
through a file object in cached blocks, one request per block, each waiting
on the one before: a Loom file keeps its metadata at the start and after the
matrix, so opening one cost a round trip per block (three at 1 MiB blocks).
The first block and the last two are fetched together, in one round
trip (with the object's size, when it is not known yet: a ranged GET and a
suffix GET sent at once, no HEAD first), and handed to the block cache (:class:`~dask_loom.storage._rangefile.RangeFile`,
32 blocks, least recently used dropped); later blocks are fetched on demand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dask_loom.storage._rangefile import RangeFile

__all__ = ["open_metadata_file", "seed_ranges"]


def seed_ranges(size: int, block_size: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte ranges fetched up front: block 0 and the last two blocks."""
    nblocks = -(-size // block_size)
    first = {0, nblocks - 2, nblocks - 1} - {-1, -2}
    out: list[tuple[int, int]] = []
    for b in sorted(first):
        s, e = b * block_size, min(size, (b + 1) * block_size)
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def open_metadata_file(
    size: int,
    fetch: Callable[[list[int], list[int]], list[Any]],
    *,
    block_size: int,
    pin: Callable[[int, bytes], None] | None = None,
    pieces: list[tuple[int, Any]] | None = None,
) -> RangeFile:
    """A file object of *size* bytes for h5py, its first block and last two fetched together by *fetch* ``(starts, sizes)``.

    *pieces* ``(start, bytes)`` already fetched (the object's ends, read
    with its size in one round trip) are used instead of fetching; every
    whole block inside them is seeded.  Later blocks are fetched by *fetch*.
    *pin* ``(start, bytes)`` is given every piece whole (the bytes around its
    whole blocks are the file's too: chunks there need no request).
    """
    if pieces is None:
        ranges = seed_ranges(size, block_size)
        blobs = fetch([s for s, _e in ranges], [e - s for s, e in ranges]) if size else []
        pieces = [(s, blob) for (s, _e), blob in zip(ranges, blobs)]
    seed: dict[int, bytes] = {}
    for start, blob in pieces:
        if pin is not None:
            pin(start, blob)
        end = start + len(blob)
        b = -(-start // block_size)
        while b * block_size < end and min(size, (b + 1) * block_size) <= end:
            if b not in seed:
                lo = b * block_size - start
                seed[b] = bytes(blob[lo : lo + min(block_size, size - b * block_size)])
            b += 1
    return RangeFile(size, fetch, block_size=block_size, seed=seed)
