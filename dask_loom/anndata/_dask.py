"""The collection as dask objects: the joined matrix, obs, and an xarray Dataset.

Each block of :func:`layer_to_dask` is a row range of one file whose edges lie
on that file's storage boundaries (whole chunks or shards of a dense array;
CSR row ranges of about the target block size), read by one task
(``mapped-read-…``) in whichever process runs it: tasks carry small
picklable plans, never open handles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from dask_loom._config import block_size_bytes
from dask_loom.anndata._elems import read_column, read_index
from dask_loom.anndata._source import row_bands
from dask_loom.errors import CollectionError, ElementNotFoundError

if TYPE_CHECKING:
    from dask_loom.anndata._plan import CollectionLike, _LayerPlan

__all__ = ["ROW_VALUES", "layer_to_dask", "obs_to_dask", "to_xarray"]

#: Attribute of a :func:`layer_to_dask` array: per block, the ``(plan, rows)`` it reads.
#: Passes that need less than the whole block read through the plan themselves:
#: ``plan.read_row_values(rows)`` gives its values and row pointers alone (the counts
#: per cell), ``plan.iter_parts(rows, ...)`` its rows in pieces (per-gene statistics).
ROW_VALUES = "_dask_loom_row_values"


def _read_band(plan: _LayerPlan, rows: np.ndarray, sparse: bool) -> Any:
    return plan.read(rows, sparse=sparse)


def layer_to_dask(mc: CollectionLike, layer: str = "X", *, sparse: bool = False, target_bytes: Any = None) -> da.Array:
    """See :meth:`MappedCollection.to_dask`."""
    if layer not in mc.layers_keys and f"obsm_{layer}" not in mc._plans:
        raise ElementNotFoundError(
            f"layer '{layer}' was not requested: the collection holds layers {mc.layers_keys} "
            "(pass it in layers_keys)"
        )
    plans = mc._plans[layer] if layer in mc._plans else mc._plans[f"obsm_{layer}"]
    widths = {p.n_out for p in plans}
    if len(widths) > 1:
        raise CollectionError(
            f"layer '{layer}': files have different widths {sorted(widths)} (join=None with different var, or raw.X); "
            "a 2-D dask array needs one width: use join='inner' or 'outer'"
        )
    target = block_size_bytes(target_bytes)
    dtype = plans[0].dtype
    token = tokenize(plans, [tokenize(ix) for ix in mc.indices_list], sparse, target)
    name = f"mapped-read-{token}"
    dsk: dict[Any, Any] = {}
    sizes: list[int] = []
    for i, plan in enumerate(plans):
        rows = mc.indices_list[i]
        full = len(rows) == mc._n_obs_full[i]
        for lo, hi in row_bands(plan, mc._n_obs_full[i], target):
            if full:
                sel = np.arange(lo, hi, dtype=np.int64)
            else:
                a, b = np.searchsorted(rows, [lo, hi])
                sel = rows[a:b]
            if not len(sel):
                continue
            dsk[(name, len(sizes), 0)] = (_read_band, plan, sel, sparse)
            sizes.append(len(sel))
    n_out = widths.pop()
    if not sizes:
        sizes = [0]
        dsk[(name, 0, 0)] = (np.empty, (0, n_out), dtype)
    meta = sp.csr_matrix((0, n_out), dtype=dtype) if sparse else np.empty((0, 0), dtype=dtype)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    out = da.Array(graph, name, (tuple(sizes), (n_out,)), meta=meta)
    # What a pass needing only each row's values reads instead of whole blocks
    # (dask_loom.pp's counts per cell): the attribute goes with this array only,
    # not with anything computed from it.
    setattr(out, ROW_VALUES, [(task[1], task[2]) for task in dsk.values() if task[0] is _read_band])
    return out


# -- obs ------------------------------------------------------------------------


def _obs_frame(mc: CollectionLike, i: int, columns: list[str], dtypes: dict[str, Any]) -> pd.DataFrame:
    store = mc.storages[i]
    rows = mc.indices_list[i]
    index = read_index(store, "obs")[rows]
    data: dict[str, Any] = {}
    for key in columns:
        dtype = dtypes[key]
        # pandas' masked Int*/UInt*/boolean: missing values become pd.NA
        masked = isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind in "iub"
        if key not in mc._cache_obs_keys[i]:
            values: Any = pd.array([pd.NA] * len(rows), dtype=dtype) if masked else np.full(len(rows), np.nan, dtype=object)
        else:
            col = read_column(store, key)
            if col.kind == "nullable" and col.values.dtype.kind in "iub":  # type: ignore[union-attr]
                # values and mask straight into the result: integers never pass through float
                values = col.values[rows]  # type: ignore[index]
                if masked:
                    values = pd.array(values, dtype=dtype)
                    values[np.asarray(col.mask)[rows]] = pd.NA
            else:
                values = col.labels()[rows]
        data[key] = pd.Series(values, index=index, name=key).astype(dtype)
    df = pd.DataFrame(data, index=index)
    df.insert(0, "_store_idx", np.full(len(rows), i, dtype=np.int64))
    return df


def _column_dtype(mc: CollectionLike, key: str) -> Any:
    """One dtype for obs column *key* over every file, as close to the stored one as it can hold.

    Categoricals get the merged categories; integer and boolean columns stay
    integer/boolean (numpy when no value is missing anywhere, pandas' nullable
    ``Int64``/``boolean`` family when some file masks values or lacks the
    column); floats stay float; anything else is ``object``.
    """
    cols = [read_column(s, key) if key in mc._cache_obs_keys[i] else None for i, s in enumerate(mc.storages)]
    present = [c for i, c in enumerate(cols) if c is not None and mc.n_obs_list[i]]
    absent = any(c is None and mc.n_obs_list[i] for i, c in enumerate(cols))
    if any(c.kind == "categorical" for c in present):
        return pd.CategoricalDtype(mc.get_merged_categories(key))
    kinds = {c.values.dtype.kind for c in present}  # type: ignore[union-attr]
    masked = absent or any(
        c.kind == "nullable" and bool(np.asarray(c.mask)[mc.indices_list[i]].any())
        for i, c in enumerate(cols)
        if c is not None and mc.n_obs_list[i]
    )
    if not present:
        return np.dtype(object)
    if kinds == {"b"}:
        return pd.BooleanDtype() if masked else np.dtype(bool)
    if kinds <= {"i", "u"}:
        common = np.result_type(*[c.values.dtype for c in present])  # type: ignore[union-attr]
        if common.kind not in "iu":  # uint64 with signed: no integer type holds both
            return np.dtype(object)
        return pd.api.types.pandas_dtype(common.name.replace("u", "U").replace("i", "I", 1)) if masked else common
    if kinds <= {"i", "u", "f", "b"} and "f" in kinds:
        return np.result_type(*[c.values.dtype for c in present], np.float32)  # type: ignore[union-attr]
    return np.dtype(object)


def obs_to_dask(mc: CollectionLike, columns: str | list[str] | None = None) -> Any:
    """See :meth:`MappedCollection.obs_to_dask`."""
    import dask.dataframe as dd

    if columns is None:
        columns = list(mc.obs_keys or [])
    elif isinstance(columns, str):
        columns = [columns]
    for key in columns:
        if not any(key in keys for keys in mc._cache_obs_keys):
            raise ElementNotFoundError(f"obs column '{key}' is absent from every file: {[s.name for s in mc.storages]}")
    dtypes = {key: _column_dtype(mc, key) for key in columns}
    first = next((i for i, n in enumerate(mc.n_obs_list) if n), 0)
    meta = _obs_frame(mc, first, columns, dtypes).iloc[:0]
    parts = [i for i, n in enumerate(mc.n_obs_list) if n] or [first]
    return dd.from_map(
        _ObsPart(mc, columns, dtypes),
        parts,
        meta=meta,
        label="mapped-obs",
        enforce_metadata=False,
    )


class _ObsPart:
    """Reads one file's obs rows (a picklable callable for ``dd.from_map``)."""

    def __init__(self, mc: CollectionLike, columns: list[str], dtypes: dict[str, Any]) -> None:
        self.mc = mc
        self.columns = columns
        self.dtypes = dtypes

    def __call__(self, i: int) -> pd.DataFrame:
        return _obs_frame(self.mc, i, self.columns, self.dtypes)


def _column_values(mc: CollectionLike, i: int, key: str | None) -> np.ndarray:
    rows = mc.indices_list[i]
    if key is None:
        return np.asarray(read_index(mc.storages[i], "obs")[rows], dtype=object)
    if key not in mc._cache_obs_keys[i]:
        return np.full(len(rows), np.nan, dtype=object)
    return np.asarray(read_column(mc.storages[i], key).labels()[rows], dtype=object)


def _lazy_column(mc: CollectionLike, key: str | None) -> da.Array:
    import dask

    parts = []
    for i, n in enumerate(mc.n_obs_list):
        if n:
            d = dask.delayed(_column_values, pure=True)(mc, i, key, dask_key_name=f"mapped-obs-{tokenize(mc.storages[i], key, mc.indices_list[i])}")
            parts.append(da.from_delayed(d, shape=(n,), dtype=object))
    return da.concatenate(parts) if parts else da.empty((0,), dtype=object)


def to_xarray(
    mc: CollectionLike, layer: str = "X", *, obs_columns: str | list[str] | None = None, sparse: bool = False
) -> Any:
    """See :meth:`MappedCollection.to_xarray`."""
    import xarray as xr

    x = layer_to_dask(mc, layer, sparse=sparse)
    cols = list(mc.obs_keys or []) if obs_columns is None else ([obs_columns] if isinstance(obs_columns, str) else list(obs_columns))
    coords: dict[str, Any] = {"obs_names": ("obs", _lazy_column(mc, None))}
    if mc.var_joint is not None and layer != "raw.X" and len(mc.var_joint) == x.shape[1]:
        coords["var"] = np.asarray(mc.var_joint, dtype=object)
    coords["store_idx"] = ("obs", da.from_array(mc.storage_idx.astype(np.int64), chunks=-1))
    for key in cols:
        coords[key] = ("obs", _lazy_column(mc, key))
    name = layer.replace(".", "_")
    return xr.Dataset({name: (("obs", "var"), x)}, coords=coords, attrs={"files": [s.name for s in mc.storages]})

