"""Planning blocks: dask chunks whose every boundary is a stored-chunk boundary.

Decision 1 of the design: a dask block is always a union of whole on-disk
chunks (or shards), so no two tasks read or write the same stored chunk.
:func:`plan_blocks` chooses such chunks; :func:`align_chunks` rounds a user's
chunks out to them (with a :class:`~dask_loom.errors.ChunkAlignmentWarning`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from dask_loom._config import block_size_bytes
from dask_loom.errors import ChunkAlignmentWarning

__all__ = [
    "Chunks",
    "align_chunks",
    "block_regions",
    "grid_coords",
    "plan_blocks",
    "selection_bands",
    "split_by_chunk",
    "units_per_block",
]

Chunks = tuple[tuple[int, ...], ...]


def _unit(chunk_shape: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    # A stored chunk may be larger than the array (h5py allows it); an empty
    # axis still needs a positive unit.
    return tuple(max(1, min(int(c), int(s)) if s else max(1, int(c))) for c, s in zip(chunk_shape, shape))


def grid_coords(bounds: Sequence[tuple[int, int]]) -> np.ndarray:
    """The ``(k, ndim)`` grid coordinates of the box of chunks ``[lo, hi)`` on each axis, in C order.

    >>> grid_coords([(0, 2), (3, 5)]).tolist()
    [[0, 3], [0, 4], [1, 3], [1, 4]]
    """
    axes = [np.arange(lo, hi) for lo, hi in bounds]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))


def _even_bands(n: int, unit: int, units_per_block: int) -> tuple[int, ...]:
    """Split ``n`` elements into bands of whole ``unit``s, as even as possible."""
    if n == 0:
        return (0,)
    n_units = math.ceil(n / unit)
    units_per_block = max(1, min(units_per_block, n_units))
    n_blocks = math.ceil(n_units / units_per_block)
    # Spread units evenly over the blocks (first ones one unit larger).
    base, extra = divmod(n_units, n_blocks)
    sizes = []
    start = 0
    for b in range(n_blocks):
        width = (base + (1 if b < extra else 0)) * unit
        stop = min(n, start + width)
        sizes.append(stop - start)
        start = stop
    return tuple(s for s in sizes if s > 0) or (0,)


def plan_blocks(
    shape: Sequence[int],
    chunk_shape: Sequence[int],
    itemsize: int,
    *,
    target_bytes: int | str | None = None,
    band_axis: int | None = None,
    c_order: bool = False,
) -> Chunks:
    """Plan dask chunks whose every boundary is a stored-chunk boundary.

    Parameters
    ----------
    shape
        Array shape.
    chunk_shape
        Shape of the storage unit (HDF5/Zarr chunk, or shard).
    itemsize
        Bytes per element (use 8 for object/string data).
    target_bytes
        Wanted bytes per block; default ``dask_loom.block-size`` (64 MiB).
        A single storage unit larger than this still forms one block.
    band_axis
        If given, blocks are bands along this axis spanning every other axis
        whole: ``band_axis=0`` gives full-width row bands (for per-row work),
        ``band_axis=1`` full-height column bands (for per-column work).
    c_order
        Blocks are runs of whole units in C order: the last axis is filled
        first, then the one before it.  A file that stores its units in C
        order (an HDF5 chunk B-tree written in order, a Zarr shard) then holds
        each block's bytes together; a block as square as the units allow
        would be a range per row of units, with other blocks' bytes between.

    Returns
    -------
    tuple of tuple of int
        dask-style chunks.

    Examples
    --------
    >>> plan_blocks((1000, 100), (64, 64), 4, target_bytes=64 * 64 * 4 * 4)
    ((128, 128, 128, 128, 128, 128, 128, 104), (100,))
    >>> plan_blocks((1000, 100), (64, 64), 4, target_bytes=64 * 64 * 4 * 4, band_axis=1)
    ((1000,), (64, 36))
    >>> plan_blocks((256, 1024), (64, 64), 4, target_bytes=64 * 64 * 4 * 4, c_order=True)
    ((64, 64, 64, 64), (256, 256, 256, 256))
    """
    shape = tuple(int(s) for s in shape)
    if len(chunk_shape) != len(shape):
        raise ValueError(f"chunk shape {tuple(chunk_shape)} does not match array shape {shape}")
    if any(s < 0 for s in shape):
        raise ValueError(f"negative array shape {shape}")
    if not shape:
        return ()
    unit = _unit(chunk_shape, shape)
    target = block_size_bytes(target_bytes)
    itemsize = max(1, int(itemsize))
    grid = [max(1, math.ceil(s / u)) if s else 1 for s, u in zip(shape, unit)]
    unit_bytes = math.prod(unit) * itemsize
    budget = max(1, target // unit_bytes)  # storage units per block

    if c_order:
        m = [1] * len(shape)
        left = budget
        for i in reversed(range(len(shape))):
            m[i] = max(1, min(grid[i], left))
            left //= m[i]
    elif band_axis is not None:
        band_axis = band_axis % len(shape)
        per_band = math.prod(g for i, g in enumerate(grid) if i != band_axis)
        m = list(grid)
        m[band_axis] = max(1, budget // max(1, per_band))
    else:
        # Grow the block one axis at a time, always along the axis whose
        # current extent (in elements) is smallest: blocks come out as close
        # to square as whole units allow.
        m = [1] * len(shape)
        while True:
            cands = [i for i in range(len(shape)) if m[i] < grid[i]]
            if not cands:
                break
            i = min(cands, key=lambda j: (m[j] * unit[j], j))
            others = math.prod(m) // m[i]
            room = budget // others
            if room <= m[i]:
                # This axis cannot grow; try the others before stopping.
                grown = False
                for j in sorted(cands, key=lambda j: (m[j] * unit[j], j)):
                    if j != i and budget // (math.prod(m) // m[j]) > m[j]:
                        m[j] = min(grid[j], m[j] * 2, budget // (math.prod(m) // m[j]))
                        grown = True
                        break
                if not grown:
                    break
                continue
            m[i] = min(grid[i], m[i] * 2, room)
    _check_block_count(shape, unit, grid, m)
    return tuple(_even_bands(s, u, k) for s, u, k in zip(shape, unit, m))


def _check_block_count(shape: tuple[int, ...], unit: tuple[int, ...], grid: list[int], m: Sequence[int]) -> None:
    # A declared shape from a damaged or hostile file (10^15 x 10^15) would make
    # a graph no machine can hold: refuse it before building anything.
    from dask_loom._config import get_config
    from dask_loom.errors import TooLargeError

    limit = int(get_config("max-blocks"))
    n = math.prod(math.ceil(g / max(1, k)) for g, k in zip(grid, m))
    if n > limit:
        raise TooLargeError(
            f"an array of shape {shape} stored in units of {unit} would need {n} dask blocks, "
            f"more than dask_loom.max-blocks ({limit}); its declared shape is implausible"
        )


def align_chunks(
    chunks: Any,
    shape: Sequence[int],
    chunk_shape: Sequence[int],
    dtype: Any,
    *,
    what: str = "the array",
    stacklevel: int = 3,
) -> Chunks:
    """Normalise user chunks and round every boundary out to a stored-chunk boundary.

    Any dask chunk specification is accepted (int, tuple, dict, ``"auto"``,
    ``-1``).  Boundaries that fall inside a stored chunk move to the end of that
    chunk, with a :class:`~dask_loom.errors.ChunkAlignmentWarning`.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     align_chunks((100, 50), (300, 100), (64, 64), "f4")
    ((128, 128, 44), (64, 36))
    """
    shape = tuple(int(s) for s in shape)
    unit = _unit(chunk_shape, shape)
    dtype = np.dtype(dtype)
    if isinstance(chunks, dict):
        chunks = tuple(chunks.get(i, unit[i]) for i in range(len(shape)))
    # dask.array costs over a second to import: only code that builds arrays pays it.
    from dask.array.core import normalize_chunks

    normal = normalize_chunks(
        chunks,
        shape,
        dtype=dtype,
        previous_chunks=unit,
        limit=block_size_bytes(),
    )
    out = []
    moved = []
    for axis, (sizes, n, u) in enumerate(zip(normal, shape, unit)):
        bounds = np.unique(np.cumsum((0, *sizes)))
        rounded = np.unique(np.minimum(-(-bounds // u) * u, n))
        if len(rounded) != len(bounds) or np.any(rounded != bounds):
            moved.append(axis)
        new = tuple(int(x) for x in np.diff(rounded)) or (0,)
        out.append(new)
    if moved:
        warnings.warn(
            f"The requested chunks {tuple(normal)} split the stored chunks {unit} of {what} "
            f"along axis {', '.join(map(str, moved))}; rounded out to {tuple(out)} so that no "
            "stored chunk is read (or written) by two tasks.",
            ChunkAlignmentWarning,
            stacklevel=stacklevel,
        )
    return tuple(out)


def block_regions(chunks: Chunks) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """List ``(block_index, region)`` pairs for dask-style ``chunks`` (C order)."""
    bounds = [np.cumsum((0, *c)) for c in chunks]
    out = []
    for idx in np.ndindex(*[len(c) for c in chunks]):
        region = tuple(slice(int(b[i]), int(b[i + 1])) for b, i in zip(bounds, idx))
        out.append((tuple(int(i) for i in idx), region))
    return out


def units_per_block(
    shape: Sequence[int], chunk_shape: Sequence[int], itemsize: int, *, target_bytes: int | str | None = None
) -> tuple[int, ...]:
    """How many storage units per axis :func:`plan_blocks` puts in a block."""
    unit = _unit(chunk_shape, shape)
    plan = plan_blocks(shape, chunk_shape, itemsize, target_bytes=target_bytes)
    return tuple(max(1, -(-max(c) // u)) for c, u in zip(plan, unit))


def selection_bands(n: int, unit: int, needed: np.ndarray, max_units: int) -> list[tuple[int, int]]:
    """Bands ``[start, stop)`` of whole units covering the *needed* unit ids.

    Consecutive needed units are merged into one band of at most *max_units*
    units; units nobody needs are never part of a band, so they are never read.

    Examples
    --------
    >>> selection_bands(1000, 64, np.array([0, 1, 2, 7, 15]), 2)
    [(0, 128), (128, 192), (448, 512), (960, 1000)]
    """
    bands: list[tuple[int, int]] = []
    needed = np.unique(np.asarray(needed, dtype=np.int64))
    if not len(needed):
        return bands
    breaks = np.flatnonzero(np.diff(needed) != 1) + 1
    for run in np.split(needed, breaks):
        first, last = int(run[0]), int(run[-1])
        k = first
        while k <= last:
            stop_unit = min(last + 1, k + max(1, max_units))
            bands.append((k * unit, min(n, stop_unit * unit)))
            k = stop_unit
    return bands


def split_by_chunk(
    starts: np.ndarray, stops: np.ndarray, c: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut element ranges ``[starts[i], stops[i])`` of a 1-D array at chunk boundaries (chunk size *c*).

    Returns, for every piece in order, its chunk id and its ``[lo, hi)`` in
    array coordinates (non-empty ranges assumed).

    Examples
    --------
    >>> split_by_chunk(np.array([1, 8]), np.array([6, 9]), 4)
    (array([0, 1, 2]), array([1, 4, 8]), array([4, 6, 9]))
    """
    first = starts // c
    counts = (stops - 1) // c - first + 1
    if (counts == 1).all():
        return first, starts, stops
    rep = np.repeat(np.arange(len(starts)), counts)
    step = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    cid = first[rep] + step
    return cid, np.maximum(starts[rep], cid * c), np.minimum(stops[rep], (cid + 1) * c)
