"""``open_ome_arrow``: any OME-Arrow source as a ``TensorView`` or ``LazyTensorView``."""

from __future__ import annotations

import functools
import os
from typing import Any

from dask_loom.ome._lazy import LazyTensorView
from dask_loom.ome._read import open_image
from dask_loom.ome._views import TensorView
from dask_loom.ome._write import to_ome_arrow

__all__ = ["open_ome_arrow"]

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
