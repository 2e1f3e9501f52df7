"""A Loom file as a lazy ``anndata.AnnData``: ``LoomConnection.to_anndata`` and ``read_loom``.

Cells become rows.  ``X`` and ``layers`` are dask arrays over the Loom layers
transposed lazily, whose blocks are full-width bands of whole stored chunks
(``scipy.sparse.csr_matrix`` built straight from the decoded chunks with
``sparse=True``); nothing of the matrix is read until something computes.
Column and row attributes become ``obs`` and ``var`` (``CellID``/``Gene`` as the
index where present, enum attributes as categoricals, compound ones as
``obsm``/``varm`` data frames), multi-column attributes ``obsm``/``varm``, and
graphs ``obsp``/``varp``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._doors import provides
from dask_loom.errors import ElementNotFoundError

if TYPE_CHECKING:
    import anndata
    import pandas as pd

    from dask_loom.loom._connection import LoomConnection

__all__ = ["layer_cells_by_genes", "loom_to_anndata", "read_loom"]


def layer_cells_by_genes(ds: LoomConnection, name: str, *, sparse: bool = True, dtype: Any = None) -> Any:
    """Layer *name* transposed (cells x genes) as a dask array of full-width row bands.

    Blocks are whole stored chunks: a band of cells spans every gene, so
    scanpy's PCA (which wants ``chunks[1] == n_vars``) takes it as it is.
    """
    from dask_loom.blocks import from_source

    source = ds.__dask_loom_layer_host__().source(name)
    if sparse:
        from dask_loom._csr import CSRView

        x = from_source(CSRView(source, transpose=True), band_axis=0)
    else:
        from dask_loom._csr import sparse_dtype

        sparse_dtype(source.dtype, where=f"{ds.filename}: layer '{name}'")  # numeric, or a typed error
        x = from_source(source, band_axis=1).T
    if dtype is not None and np.dtype(dtype) != x.dtype:
        x = x.astype(dtype)
    return x


def _clean_key(key: str) -> str:
    # Flattened nested attributes ("GRanges/start") cannot keep the slash: anndata
    # refuses "/" in keys when it writes.
    return key.replace("/", "_")


def _attr_values(ds: LoomConnection, axis: int, name: str) -> Any:
    """One attribute, as anndata should hold it (categoricals for enums, frames for compounds)."""
    import pandas as pd

    from dask_loom.loom._common import AXIS_ATTRS

    values = (ds.ra if axis == 0 else ds.ca)[name]
    info = ds.__dask_loom_layer_host__().tree.info(f"{AXIS_ATTRS[axis]}/{name}")
    if info.kind == "enum" and info.enum:
        cats = [info.enum[k] for k in sorted(info.enum)]
        return pd.Categorical(np.asarray(values, dtype=object), categories=list(dict.fromkeys(cats)))
    values = np.asarray(values)
    if values.dtype.names:
        fields = list(values.dtype.names)
        frame = pd.DataFrame({f: values[f] for f in fields})
        return frame if len(fields) > 1 else frame[fields[0]].to_numpy()
    return values


def _axis_frames(
    ds: LoomConnection, axis: int, index_name: str | None, mapping: Mapping[str, Iterable[str]]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """obs (axis 1) or var (axis 0) and the multi-column attributes, as anndata's read_loom lays them out."""
    import pandas as pd

    attrs = ds.ra if axis == 0 else ds.ca
    names = list(attrs.keys())
    multi: dict[str, Any] = {}
    used: set[str] = set()
    for key, members in mapping.items():
        members = list(members)
        for m in members:
            if m not in names:
                raise ElementNotFoundError(
                    f"{ds.filename}: {'row' if axis == 0 else 'column'} attribute '{m}' (for '{key}') does not exist"
                )
        multi[key] = np.array([np.asarray(attrs[m]) for m in members]).T
        used.update(members)
    columns: dict[str, Any] = {}
    for name in names:
        if name in used:
            continue
        v = _attr_values(ds, axis, name)
        key = _clean_key(name)
        if isinstance(v, pd.DataFrame) or (isinstance(v, np.ndarray) and v.ndim > 1 and v.shape[1] > 1):
            multi[key] = v
        elif isinstance(v, np.ndarray) and v.ndim > 1:
            columns[key] = v.reshape(len(v), -1)[:, 0] if v.ndim == 2 else v.reshape(len(v))
        else:
            columns[key] = v
    n = ds.shape[axis]
    frame = pd.DataFrame(columns, index=pd.RangeIndex(n)) if columns else pd.DataFrame(index=pd.RangeIndex(n))
    if index_name is not None and index_name in frame.columns:
        frame = frame.set_index(index_name, drop=True)
    for v in multi.values():
        if isinstance(v, pd.DataFrame):
            v.index = frame.index.astype(str)
    return frame, multi


def _graphs(ds: LoomConnection, manager: Any) -> dict[str, Any]:
    from dask_loom.errors import LoomFormatError

    out = {}
    for k in manager.keys():
        try:
            out[_clean_key(k)] = manager[k].tocsr()
        except LoomFormatError as exc:
            # A damaged graph (1-based indices, ...) should not hide the matrix: say which, go on.
            warnings.warn(f"skipped graph '{k}': {exc}", UserWarning, stacklevel=4)
    return out


@provides("loom", "anndata")
def loom_to_anndata(
    ds: LoomConnection,
    *,
    X_name: str = "",
    layers: Iterable[str] | None = None,
    sparse: bool = True,
    obs_names: str | None = "CellID",
    var_names: str | None = "Gene",
    obsm_mapping: Mapping[str, Iterable[str]] = MappingProxyType({}),
    varm_mapping: Mapping[str, Iterable[str]] = MappingProxyType({}),
    dtype: Any = None,
    graphs: bool = True,
    cleanup: bool = False,
    lazy: bool = True,
    layer_names: Mapping[str, str] | None = None,
) -> anndata.AnnData:
    """See :meth:`dask_loom.LoomConnection.to_anndata` and :func:`read_loom`."""
    import anndata as ad
    import pandas as pd

    host = ds.__dask_loom_layer_host__()
    host.check_open()
    available = ds.layers.keys()
    if X_name not in available:
        raise ElementNotFoundError(f"{ds.filename}: layer '{X_name}' does not exist (layers: {available})")
    if layers is None:
        wanted = [k for k in available if k != X_name]
    else:
        wanted = list(layers)
        for k in wanted:
            if k not in available:
                raise ElementNotFoundError(f"{ds.filename}: layer '{k}' does not exist (layers: {available})")
    x = layer_cells_by_genes(ds, X_name, sparse=sparse, dtype=dtype)
    arrays = {}
    for k in wanted:
        out_name = (layer_names or {}).get(k, "matrix" if k == "" else k)
        arrays[out_name] = layer_cells_by_genes(ds, k, sparse=sparse)
    obs, obsm = _axis_frames(ds, 1, obs_names, obsm_mapping)
    var, varm = _axis_frames(ds, 0, var_names, varm_mapping)
    uns: dict[str, Any] = {}
    if cleanup:
        for key, frame in (("loom-obs", obs), ("loom-var", var)):
            single = {c: frame[c].iloc[0] for c in list(frame.columns) if len(pd.unique(frame[c])) == 1}
            for c in single:
                del frame[c]
            if single:
                uns[key] = single
    obsp = varp = None
    if graphs:
        obsp = _graphs(ds, ds.col_graphs)
        varp = _graphs(ds, ds.row_graphs)
    if not lazy:
        from dask_loom.cluster import compute

        keys = list(arrays)
        done = compute(x, *[arrays[k] for k in keys], **host.compute_kwargs())
        x, arrays = done[0], dict(zip(keys, done[1:]))
    with warnings.catch_warnings():
        # Non-unique or non-string names: anndata warns and converts, as it does in read_loom.
        warnings.filterwarnings("ignore", message=".*names.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=ad.ImplicitModificationWarning)
        return ad.AnnData(
            x,
            obs=obs,
            var=var,
            layers=arrays or None,
            obsm=obsm or None,
            varm=varm or None,
            obsp=obsp or None,
            varp=varp or None,
            uns=uns,
        )


def read_loom(
    filename: str | os.PathLike[str],
    *,
    sparse: bool = True,
    cleanup: bool = False,
    X_name: str = "spliced",
    obs_names: str = "CellID",
    obsm_names: Mapping[str, Iterable[str]] | None = None,
    var_names: str = "Gene",
    varm_names: Mapping[str, Iterable[str]] | None = None,
    dtype: str = "float32",
    obsm_mapping: Mapping[str, Iterable[str]] = MappingProxyType({}),
    varm_mapping: Mapping[str, Iterable[str]] = MappingProxyType({}),
    lazy: bool = True,
    **kwargs: Any,
) -> anndata.AnnData:
    """Read a Loom file (``.loom`` or ``.loom.zarr``, local or a URL) as ``anndata.AnnData``.

    ``scanpy.read_loom`` / ``anndata.io.read_loom``'s parameters and result
    layout, so swapping the import is enough; with ``lazy=True`` (the default)
    ``X`` and ``layers`` are dask arrays (CSR blocks with ``sparse=True``)
    over whole stored chunks, read only when computed, instead of the whole
    file in memory.

    Parameters
    ----------
    filename
        Path or URL (``s3://…`` and the other schemes :func:`dask_loom.connect` takes).
    sparse
        Blocks (or, with ``lazy=False``, the matrices) are ``scipy.sparse.csr_matrix``.
    cleanup
        Move obs/var columns holding one unique value into ``uns['loom-obs']``
        / ``uns['loom-var']``.
    X_name
        Layer that becomes ``X``; the main matrix if the file has no such
        layer.  When another layer is ``X``, the main matrix is ``layers['matrix']``.
    obs_names, var_names
        Attributes used as the index of ``obs`` / ``var`` where present.
    obsm_names, varm_names
        Deprecated spellings of *obsm_mapping* / *varm_mapping* (as in anndata).
    dtype
        dtype of ``X`` (layers keep their stored dtype, as in anndata).
    obsm_mapping, varm_mapping
        ``{key: [attribute, ...]}`` stacked as columns into ``obsm``/``varm``.
    lazy
        ``False`` computes ``X`` and layers into memory (through task graphs).
    **kwargs
        Passed to :func:`dask_loom.connect` (``validate``, ``storage_options``,
        ``scheduler``, ``client``); ``validate`` defaults to ``False`` here.

    Returns
    -------
    anndata.AnnData
        Cells as rows; column graphs as ``obsp``, row graphs as ``varp``.

    Notes
    -----
    Deliberate differences from ``anndata.io.read_loom`` (see ``docs/analysis.md``):
    the file is not validated unless ``validate=True`` is passed (anndata's
    read_loom, through loompy, fails on files loompy's validator rejects);
    nested attribute groups are flattened (``group_name`` keys), compound
    attributes become data frames in ``obsm``/``varm``, enum attributes
    categoricals, and graphs are read into ``obsp``/``varp``.
    """
    from dask_loom.loom._connection import connect

    if obsm_names is not None:
        warnings.warn(
            "Argument obsm_names has been deprecated in favour of `obsm_mapping`.",
            FutureWarning,
            stacklevel=2,
        )
        if obsm_mapping:
            raise ValueError(
                "Received values for both `obsm_names` and `obsm_mapping`; pass only `obsm_mapping`."
            )
        obsm_mapping = obsm_names
    if varm_names is not None:
        warnings.warn(
            "Argument varm_names has been deprecated in favour of `varm_mapping`.",
            FutureWarning,
            stacklevel=2,
        )
        if varm_mapping:
            raise ValueError(
                "Received values for both `varm_names` and `varm_mapping`; pass only `varm_mapping`."
            )
        varm_mapping = varm_names
    kwargs.setdefault("validate", False)
    kwargs.pop("mode", None)
    with connect(filename, "r", **kwargs) as ds:
        names = ds.layers.keys()
        x_name = X_name if X_name in names else ""
        # As anndata: with another X, the main matrix is layers["matrix"]; every named layer
        # (X's own included) is a layer.
        layer_list = ([""] if x_name != "" and "" in names else []) + [k for k in names if k != ""]
        return loom_to_anndata(
            ds,
            X_name=x_name,
            layers=layer_list,
            sparse=sparse,
            obs_names=obs_names,
            var_names=var_names,
            obsm_mapping=obsm_mapping,
            varm_mapping=varm_mapping,
            dtype=dtype,
            cleanup=cleanup,
            lazy=lazy,
        )
