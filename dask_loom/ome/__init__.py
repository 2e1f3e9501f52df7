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

import functools
import os
from typing import Any

from dask_loom.ome._convert import (
    convert_to_ome_arrow,
    image_kind,
    ome_tiff_to_ome_arrow,
    ome_zarr_to_ome_arrow,
    read_ome_tiff,
    read_ome_zarr,
)
from dask_loom.ome._read import open_image
from dask_loom.ome._schema import (
    OME_ARROW_BYTE_STRUCT,
    OME_ARROW_STRUCT,
    choose_chunk_shape,
)
from dask_loom.ome._target import OMEDatasetTarget
from dask_loom.ome._views import LazyTensorView, TensorView
from dask_loom.ome._write import choose_chunking, to_ome_arrow, to_ome_parquet, write_ome_arrow_dataset

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

_SELECTION = ("t", "z", "c", "roi", "roi3d", "roi_nd", "roi_type", "tile", "layout", "dtype", "chunk_policy", "channel_policy")


def _load_record(source: Any, column: str | None, row_index: int, image_id: str | None, storage_options: Any) -> Any:
    """The whole record behind a lazy view (what ``LazyTensorView(loader=...)`` expects)."""
    from dask_loom.ome._read import DatasetImage, ParquetImage, RecordImage

    img = open_image(source, column=column, row_index=row_index, image_id=image_id, storage_options=storage_options)
    if isinstance(img, RecordImage):
        return img.row
    if isinstance(img, ParquetImage):
        import pyarrow.parquet as pq  # noqa: F401  (the record is one Parquet row)

        from dask_loom.ome._read import parquet_file

        pf = parquet_file(img.spec, label=img.label)
        tbl = pf.read_row_group(img.row_group, columns=[img.column])
        return tbl.column(img.column).combine_chunks().slice(img.local_row, 1)
    assert isinstance(img, DatasetImage)
    return to_ome_arrow(TensorView(img, layout="TZCYX"))


def _resolve(
    source: Any, column: str | None, row_index: int, image_id: str | None, storage_options: Any, kwargs: dict[str, Any]
) -> TensorView:
    img = open_image(source, column=column, row_index=row_index, image_id=image_id, storage_options=storage_options)
    return TensorView(img, **kwargs)


def open_ome_arrow(
    source: Any,
    *,
    column: str | None = None,
    row_index: int = 0,
    image_id: str | None = None,
    lazy: bool = False,
    storage_options: dict[str, Any] | None = None,
    **selection: Any,
) -> TensorView | LazyTensorView:
    """Open an OME-Arrow image as a ``TensorView`` (or ``LazyTensorView`` with ``lazy=True``).

    Parameters
    ----------
    source
        A record (dict, ``pyarrow.StructScalar``, 1-row ``StructArray`` or
        ``ChunkedArray``, a ``Table``), a Parquet path or URL, or a typed
        chunk dataset directory.
    column
        The OME-Arrow struct column of a table or Parquet file; default: the
        ``image`` column, else the first column shaped like an OME-Arrow record.
    row_index
        The row of a multi-image table (or the image of a dataset).
    image_id
        A dataset image by id (instead of *row_index*).
    lazy
        Defer everything, metadata included, to ``collect()`` (or first use).
    storage_options
        fsspec options for URLs (``s3://``, ``memory://`` ...).
    **selection
        ``TensorView`` arguments: ``t``, ``z``, ``c``, ``roi``, ``roi3d``,
        ``roi_nd``, ``roi_type``, ``tile``, ``layout``, ``dtype``,
        ``chunk_policy``, ``channel_policy``.

    Examples
    --------
    >>> import numpy as np, tempfile, os, dask_loom
    >>> d = tempfile.mkdtemp()
    >>> a = np.arange(2 * 64 * 64, dtype="uint16").reshape(2, 64, 64)
    >>> p = dask_loom.to_ome_parquet(a, os.path.join(d, "a.ome.parquet"), dim_order="ZYX", chunk_shape=(1, 32, 32))
    >>> v = dask_loom.open_ome_arrow(p, z=1, roi=(30, 0, 4, 2))
    >>> v.layout, v.to_numpy()[0].tolist()
    ('CHW', [[4126, 4127, 4128, 4129], [4190, 4191, 4192, 4193]])
    >>> lazy = dask_loom.open_ome_arrow(p, lazy=True, layout="ZYX")
    >>> lazy.layout, lazy.shape
    ('ZHW', (2, 64, 64))
    >>> import shutil; shutil.rmtree(d)
    """
    unknown = sorted(set(selection) - set(_SELECTION))
    if unknown:
        raise TypeError(f"open_ome_arrow() got unexpected keyword argument(s) {unknown}; selections are {_SELECTION}")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if lazy:
        return LazyTensorView(
            loader=functools.partial(_load_record, source, column, row_index, image_id, storage_options),
            resolver=functools.partial(_resolve, source, column, row_index, image_id, storage_options),
            **selection,
        )
    img = open_image(
        source,
        column=column,
        row_index=row_index,
        image_id=image_id,
        chunk_policy=selection.get("chunk_policy", "auto"),
        storage_options=storage_options,
    )
    from dask_loom.ome._read import ParquetImage

    if isinstance(img, ParquetImage) and img.what == "planes":
        # A planes-only record has no per-unit access in Parquet: its pixels are
        # read now (as ome-arrow does), so a pixel count that disagrees with
        # pixels_meta fails at open, naming the column and row.
        img.payload()
    return TensorView(img, **selection)
