"""Format-agnostic graph builders: map, select, sparse (and, in later modules, scan,
aggregate, permute, export).  Per-block numpy kernels live in ``_kernels``."""

from dask_loom.ops._map import map_source
from dask_loom.ops._select import read_selection, read_selections
from dask_loom.ops._sparse import sparse

__all__ = ["map_source", "read_selection", "read_selections", "sparse"]
