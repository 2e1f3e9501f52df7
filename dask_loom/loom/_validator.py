"""``LoomValidator``: loompy's spec and convention checks, over HDF5 or Zarr containers."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dask_loom.loom._connection import LoomConnection
from dask_loom.loom._open import open_tree
from dask_loom.loom._speccheck import SpecValidator

__all__ = ["LoomValidator"]


class LoomValidator(SpecValidator):
    """Validate a Loom file against the spec (``"speconly"``) or also the conventions.

    Same checks and messages as loompy's validator; works on ``.loom`` files and
    ``.loom.zarr`` stores, locally or on object stores.  After
    :meth:`validate`, ``errors``, ``warnings`` and ``summary`` hold text lines.

    Parameters
    ----------
    version
        Spec version to validate against, or ``None`` to read it from the file.
    """

    def validate(self, path: str | os.PathLike[str], strictness: str = "speconly", *, storage_options: dict[str, Any] | None = None) -> bool:
        """Validate the file at *path*; ``True`` when it conforms."""
        from dask_loom.storage import FileSpec

        if strictness not in ("speconly", "conventions"):
            raise ValueError(f"strictness must be 'speconly' or 'conventions', not {strictness!r}")
        spec = FileSpec.from_path(path, storage_options)
        if not spec.exists():
            raise FileNotFoundError(f"File '{path}' not found")
        valid1 = self.validate_tree(open_tree(spec), os.fspath(path))
        valid2 = True
        if strictness == "conventions":
            with LoomConnection(path, "r", validate=False, storage_options=storage_options) as ds:
                valid2 = self.validate_conventions(ds)
                if not valid2:
                    self.errors.append("For help, see http://linnarssonlab.org/loompy/conventions/")
        return valid1 and valid2

    def validate_conventions(self, ds: Any) -> bool:
        """Attribute name and dtype conventions (loompy's ``validate_conventions``)."""
        n_genes, n_cells = ds.shape
        for k in ("Description", "Journal", "Authors", "Title", "Year", "CreationDate"):
            self._warn(k in ds.attrs, f"Optional global attribute '{k}' is missing")

        def is_strings(x: np.ndarray) -> bool:
            return x.dtype == object and all(isinstance(v, str) for v in x[:100])

        if self._check("ClusterID" in ds.ca, "Column attribute 'ClusterID' is missing"):
            cid = ds.ca.ClusterID
            self._check(np.issubdtype(cid.dtype, np.integer), "Column attribute 'ClusterID' must be integer dtype")
            self._check(len(cid) == 0 or (np.min(cid) == 0 and len(np.unique(cid)) == np.max(cid) + 1), "Column attribute 'ClusterID' must be integers 0, 1, 2, ... with no missing values")
            self._check(cid.shape == (n_cells,), f"Column attribute 'ClusterID' must be 1-dimensional array of {n_cells} elements")
        if "ClusterName" in ds.ca:
            self._check(is_strings(ds.ca.ClusterName), "Column attribute 'ClusterName' must be an array of strings")
        else:
            self.warnings.append("Optional column attribute 'ClusterName' is missing")
        for axis_name, mgr, key, n in (("Column", ds.ca, "CellID", n_cells), ("Row", ds.ra, "Accession", n_genes)):
            if self._check(key in mgr, f"{axis_name} attribute '{key}' is missing"):
                v = mgr[key]
                self._check(is_strings(v), f"{axis_name} attribute '{key}' must be an array of strings, not '{v.dtype}'")
                self._check(v.shape == (n,), f"{axis_name} attribute '{key}' must be 1-dimensional array of {n} elements")
                self._check(len(np.unique(v.astype(str))) == n, f"{axis_name} attribute '{key}' cannot contain duplicate values")
        if self._check("Gene" in ds.ra, "Row attribute 'Gene' is missing"):
            self._check(is_strings(ds.ra.Gene), f"Row attribute 'Gene' must be an array of strings, not '{ds.ra.Gene.dtype}'")
        for axis_name, mgr, key in (("Column", ds.ca, "Valid"), ("Column", ds.ca, "Outliers"), ("Row", ds.ra, "Valid"), ("Row", ds.ra, "Selected")):
            if key in mgr:
                v = mgr[key]
                self._check(np.issubdtype(v.dtype, np.integer), f"{axis_name} attribute '{key}' must be integer dtype, not '{v.dtype}'")
                self._check(bool(np.all(np.isin(v, [0, 1]))), f"{axis_name} attribute '{key}' must be integers 0 or 1 only")
            else:
                self.warnings.append(f"Optional {axis_name.lower()} attribute '{key}' is missing")
        return not self.errors
