"""Format-agnostic graph builders: map, aggregate, scan, permute, select, sparse.

The public operations (``dask_loom.map``, ``aggregate``, ``scan``,
``permute``) take any chunked object (ops._sources); per-block numpy and
scipy.sparse kernels live in ``_kernels``, the graph builders beside them.
"""

from dask_loom.ops._api import aggregate, map, permute, scan
from dask_loom.ops._map import map_source
from dask_loom.ops._select import read_selection, read_selections
from dask_loom.ops._sources import SourceInfo, as_source
from dask_loom.ops._sparse import sparse

__all__ = [
    "SourceInfo",
    "aggregate",
    "as_source",
    "map",
    "map_source",
    "permute",
    "read_selection",
    "read_selections",
    "scan",
    "sparse",
]
