"""The read half of the block layer: chunk sources and the dask arrays built from them.

A *chunk source* is any small, picklable object with ``shape``, ``dtype``,
``chunk_shape`` (the storage unit: chunk, or shard where an array is sharded),
``prefix`` (the task-name prefix, such as ``"loom-read"``) and a method
``read_block(region) -> numpy.ndarray`` that reads a region whose edges lie on
chunk boundaries.  Sources open their files lazily in whichever process runs
the task; no open handle ever enters a graph (decision 2).  Everything that
turns storage into a dask array goes through :func:`from_source`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from dask.base import tokenize

from dask_loom.blocks._plan import align_chunks, plan_blocks

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["ChunkSource", "from_source"]


@runtime_checkable
class ChunkSource(Protocol):
    """What :func:`from_source` needs from a storage-backed array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    prefix: str

    def read_block(self, region: tuple[slice, ...]) -> np.ndarray:  # pragma: no cover - protocol
        ...

    def __dask_tokenize__(self) -> Hashable:  # pragma: no cover - protocol
        ...


def _read(source: ChunkSource, region: tuple[slice, ...], *args: Any, **kwargs: Any) -> np.ndarray:
    from dask_loom.blocks._readahead import read_ahead

    return read_ahead(source, region)


def from_source(
    source: ChunkSource,
    *,
    chunks: Any = None,
    band_axis: int | None = None,
    name: str | None = None,
    target_bytes: int | str | None = None,
) -> da.Array:
    """Build a dask array from a chunk source: one task per block.

    Parameters
    ----------
    source
        A :class:`ChunkSource`.
    chunks
        User chunks (any dask form); rounded out to storage boundaries with a
        warning when they split stored chunks.  Default: :func:`plan_blocks`.
    band_axis
        See :func:`plan_blocks`; ignored when ``chunks`` is given.
    name
        Full layer name; default ``f"{source.prefix}-{token}"``, deterministic
        for the same source and chunks.
    target_bytes
        Block size target (default ``dask_loom.block-size``).

    Returns
    -------
    dask.array.Array
    """
    dtype = np.dtype(source.dtype)
    itemsize = 8 if dtype.kind == "O" else dtype.itemsize
    if chunks is None:
        from dask_loom.errors import TooLargeError

        try:
            plan = plan_blocks(source.shape, source.chunk_shape, itemsize, target_bytes=target_bytes, band_axis=band_axis)
        except TooLargeError as exc:
            raise TooLargeError(f"{getattr(source, 'label', source.prefix)}: {exc}") from None
    else:
        plan = align_chunks(chunks, source.shape, source.chunk_shape, dtype, what=getattr(source, "label", "the array"))
    if name is None:
        name = f"{source.prefix}-{tokenize(source, plan)}"
    import dask.array as da
    from dask.array.core import graph_from_arraylike

    graph = graph_from_arraylike(
        source,
        plan,
        tuple(source.shape),
        name,
        getitem=_read,
        lock=False,
        asarray=False,
        dtype=dtype,
        inline_array=True,
    )
    # Sources with non-numpy blocks (CSR views) say so through ``meta``.
    meta = getattr(source, "meta", None)
    if meta is None:
        meta = np.empty((0,) * len(source.shape), dtype=dtype)
    arr = da.Array(graph, name, plan, meta=meta)
    register_source(arr, source)
    return arr


# Arrays built from a source, by name: the operations (dask_loom.map ...) read
# such an array's stored chunks directly instead of going through its graph.
# Weak values: an entry lives as long as its source (the array's graph holds it).
_BUILT: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register_source(array: da.Array, source: ChunkSource) -> None:
    """Remember that *array* reads *source* block by block (see :func:`source_of`)."""
    # A source without weak references is not remembered: the array takes the generic path.
    with contextlib.suppress(TypeError):
        _BUILT[array.name] = source


def source_of(array: Any) -> ChunkSource | None:
    """The chunk source an array built by :func:`from_source` reads, else ``None``.

    Only the array itself qualifies (same name and shape): anything derived
    from it (sliced, persisted with other chunks, computed on) has another
    name and is treated as an ordinary dask array.
    """
    src = _BUILT.get(getattr(array, "name", None))
    if src is None or tuple(src.shape) != tuple(getattr(array, "shape", ())):
        return None
    return src
