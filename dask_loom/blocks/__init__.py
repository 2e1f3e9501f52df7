"""The block layer: chunk-aligned dask arrays from chunk sources, and writes into chunk targets.

Decision 1 of the design: a dask block is always a union of whole on-disk
chunks (or shards), so no two tasks read or write the same stored chunk.
Everything that turns storage into a dask array goes through
:func:`plan_blocks` and :func:`from_source`; everything that writes goes
through :func:`store` into a :class:`ChunkTarget`, inside the target's
transaction (decisions 4 and 10).

* :mod:`._plan`: :func:`plan_blocks`, :func:`align_chunks`, :func:`block_regions`.
* :mod:`._source`: the :class:`ChunkSource` protocol and :func:`from_source`.
* :mod:`._target`: the :class:`ChunkTarget` protocol, the :class:`BlockTarget` base.
* :mod:`._store`: :func:`store`, the one write-graph builder.
"""

from dask_loom.blocks._plan import (
    Chunks,
    align_chunks,
    block_regions,
    plan_blocks,
    selection_bands,
    split_by_chunk,
    units_per_block,
)
from dask_loom.blocks._source import ChunkSource, from_source, register_source, source_of
from dask_loom.blocks._store import batch_size, store
from dask_loom.blocks._target import BlockTarget, ChunkTarget, Transaction, as_block, check_region

__all__ = [
    "BlockTarget",
    "ChunkSource",
    "ChunkTarget",
    "Chunks",
    "Transaction",
    "align_chunks",
    "as_block",
    "batch_size",
    "block_regions",
    "check_region",
    "from_source",
    "plan_blocks",
    "register_source",
    "selection_bands",
    "split_by_chunk",
    "source_of",
    "store",
    "units_per_block",
]
