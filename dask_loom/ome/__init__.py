"""OME-Arrow images as tensor views and chunk-aligned dask arrays.

:func:`open_ome_arrow` opens a record (dict, ``StructScalar``, 1-row
``StructArray``/``ChunkedArray``), a Parquet file (any OME-Arrow struct
column, any row, the 0.0.2-era schema included) or a typed chunk dataset
directory, and returns ome-arrow's :class:`TensorView` (or
:class:`LazyTensorView`).  Reads decode only the chunks a selection touches;
``to_dask()`` gives blocks that are the stored chunks.  Writers stream block
by block and keep every dtype exact (the chunk dataset through
:func:`dask_loom.store` into an :class:`OMEDatasetTarget`); converters bring OME-TIFF and OME-Zarr in.
"""

from __future__ import annotations

from dask_loom.ome._convert import (
    convert_to_ome_arrow,
    image_kind,
    ome_tiff_to_ome_arrow,
    ome_zarr_to_ome_arrow,
    read_ome_tiff,
    read_ome_zarr,
)
from dask_loom.ome._dataset import choose_chunking, write_ome_arrow_dataset
from dask_loom.ome._lazy import LazyTensorView
from dask_loom.ome._open import open_ome_arrow
from dask_loom.ome._schema import (
    OME_ARROW_BYTE_STRUCT,
    OME_ARROW_STRUCT,
    choose_chunk_shape,
)
from dask_loom.ome._target import OMEDatasetTarget
from dask_loom.ome._views import TensorView
from dask_loom.ome._write import to_ome_arrow, to_ome_parquet

__all__ = [
    "LazyTensorView",
    "OME_ARROW_BYTE_STRUCT",
    "OME_ARROW_STRUCT",
    "OMEDatasetTarget",
    "TensorView",
    "choose_chunk_shape",
    "choose_chunking",
    "convert_to_ome_arrow",
    "image_kind",
    "ome_tiff_to_ome_arrow",
    "ome_zarr_to_ome_arrow",
    "open_ome_arrow",
    "read_ome_tiff",
    "read_ome_zarr",
    "to_ome_arrow",
    "to_ome_parquet",
    "write_ome_arrow_dataset",
]
