"""The ``"loom"`` xarray engine: ``xr.open_dataset("x.loom", engine="loom", chunks={})``.

Registered under the ``xarray.backends`` entry point, so xarray finds it
once dask_loom is installed; ``.loom`` and ``.loom.zarr`` paths (and URLs)
are recognised without ``engine=``.

Examples
--------
>>> import os, tempfile, numpy as np, xarray as xr, dask_loom
>>> fn = os.path.join(tempfile.mkdtemp(), "tiny.loom")
>>> dask_loom.create(fn, np.arange(12.0).reshape(3, 4), {"Gene": np.array(["a", "b", "c"])}, {"CellID": np.arange(4)})
>>> with xr.open_dataset(fn, engine="loom", chunks={}) as ds:
...     print(dict(ds.sizes), ds.matrix.chunks, ds.Gene.values.tolist())
...     print(ds.matrix.sel(cell=[3, 1]).sum("cell").values.tolist())
{'gene': 3, 'cell': 4} ((3,), (4,)) ['a', 'b', 'c']
[4.0, 12.0, 20.0]
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from xarray.backends.common import BackendEntrypoint

from dask_loom._xarray import MAIN_LAYER, LoomBackendArray, can_open, open_loom_dataset

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["MAIN_LAYER", "LoomBackendArray", "LoomBackendEntrypoint"]


class LoomBackendEntrypoint(BackendEntrypoint):
    """Open a Loom file (``.loom`` HDF5 or ``.loom.zarr``) as an ``xarray.Dataset``.

    Layers become data variables over ``(row_dim, col_dim)`` (the main
    matrix is named ``"matrix"``), 1-D row/column attributes coordinates,
    multi-dimensional attributes variables (extra dims ``"<name>_dim1"`` …)
    and global attributes ``Dataset.attrs``.  Nothing is read from the
    layers until values are needed: each layer is a lazily indexed backend
    array whose ``encoding["preferred_chunks"]`` is the stored chunk shape,
    so ``chunks={}`` gives dask blocks equal to the stored chunks.

    Parameters of ``xr.open_dataset(..., engine="loom")``
    -----------------------------------------------------
    drop_variables
        Layers or attributes to leave out.
    row_dim, col_dim
        Dimension names (default ``"gene"`` and ``"cell"``).
    layers
        Only these layers (``"matrix"`` or ``""`` for the main matrix).
    storage_options
        fsspec options for URLs (``s3://…``, ``https://…``).
    validate
        Check the file against the Loom spec first (default ``False``).
    """

    open_dataset_parameters: ClassVar[tuple[str, ...]] = (
        "filename_or_obj",
        "drop_variables",
        "row_dim",
        "col_dim",
        "layers",
        "storage_options",
        "validate",
    )
    description: ClassVar[str] = "Open Loom files (.loom HDF5 and .loom.zarr) with dask_loom: lazy, chunk-aligned layers"

    def open_dataset(
        self,
        filename_or_obj: str | os.PathLike[str] | Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        row_dim: str = "gene",
        col_dim: str = "cell",
        layers: str | Iterable[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        validate: bool = False,
    ) -> xr.Dataset:
        """Open *filename_or_obj* (a path, URL or open ``LoomConnection``) lazily."""
        return open_loom_dataset(
            filename_or_obj,
            drop_variables=drop_variables,
            row_dim=row_dim,
            col_dim=col_dim,
            layers=layers,
            storage_options=storage_options,
            validate=validate,
        )

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """True for paths and URLs ending in ``.loom`` or ``.loom.zarr``."""
        return can_open(filename_or_obj)
