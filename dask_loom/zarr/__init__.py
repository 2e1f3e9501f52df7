"""simplezarr's node API over zarr-python, with chunk-aligned dask reads and writes."""

from dask_loom.zarr._nodes import NodeNotFoundError, ZarrArray, ZarrGroup, ZarrNode, open_zarr
from dask_loom.zarr._source import ZarrSource
from dask_loom.zarr._target import ZarrTarget, chunk_samples, default_shards, stored_ratio
from dask_loom.zarr._write import to_zarr

__all__ = ["NodeNotFoundError", "ZarrArray", "ZarrGroup", "ZarrNode", "ZarrSource", "ZarrTarget", "chunk_samples", "default_shards", "open_zarr", "stored_ratio", "to_zarr"]
