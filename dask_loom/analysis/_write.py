"""Streamed conversion into AnnData: a Loom file or a collection as ``.h5ad`` or AnnData Zarr.

The matrices never pass through memory whole: ``X`` and every layer are the
lazy CSR dask arrays of :func:`~dask_loom.analysis.loom_to_anndata` /
:func:`~dask_loom.analysis.mapped_to_anndata`, stored by
:func:`dask_loom.store` into AnnData sparse targets
(:class:`~dask_loom.anndata.SparseTarget`: tasks compress row bands, one
writer appends them in order), so memory holds a couple of batches of
blocks (plus, in Zarr, one shard per array) whatever the size of the file.
The small elements (``obs``, ``var``, ``obsm``, ``varm``, ``obsp``,
``varp``, ``uns``) are written with anndata's own ``write_elem``.

The whole output is one transaction: an ``.h5ad`` is written as a new file
renamed over the target at the end, a Zarr store as a new directory swapped
in at the end; on any error neither leaves anything behind.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom.errors import ElementNotFoundError, TargetExistsError, UnsupportedSourceError

if TYPE_CHECKING:
    import anndata

__all__ = ["write_anndata"]

_ROOT_ATTRS = {"encoding-type": "anndata", "encoding-version": "0.1.0"}


def _kind(dst: str) -> str:
    name = dst.rstrip("/")
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".zarr"):
        return "zarr"
    from dask_loom.errors import FormatError

    raise FormatError(f"{dst}: an AnnData target is named *.h5ad or *.zarr")


def _as_anndata(
    source: Any,
    *,
    layers: Iterable[str] | None,
    X_name: str,
    validate: bool,
    storage_options: dict[str, Any] | None,
) -> tuple[Any, Any]:
    """``(lazy AnnData, connection to close or None)`` for any accepted source."""
    import anndata as ad

    from dask_loom.anndata._mapped import MappedCollection
    from dask_loom.loom._connection import LoomConnection, connect

    if isinstance(source, ad.AnnData):
        return source, None
    if isinstance(source, MappedCollection):
        # The collection's first layer (X where requested) becomes X; *layers* are the others.
        first = ["X"] if "X" in source.layers_keys else []
        keys = None if layers is None else [*first, *[k for k in layers if k != "X"]]
        return source.to_anndata(layers=keys), None
    opened = None
    if isinstance(source, (str, os.PathLike)):
        opened = connect(
            source,
            "r",
            validate=validate,
            **({"storage_options": storage_options} if storage_options else {}),
        )
        source = opened
    if isinstance(source, LoomConnection):
        try:
            return source.to_anndata(
                X_name=X_name, layers=list(layers) if layers is not None else None
            ), opened
        except BaseException:
            if opened is not None:
                opened.close()
            raise
    raise UnsupportedSourceError(
        f"write_anndata: cannot convert a {type(source).__module__}.{type(source).__qualname__}; pass a Loom path or "
        "connection, a MappedCollection or an anndata.AnnData"
    )


def _store_matrix(x: Any, path: str, elem: str, *, kind: str, sharded: bool, kw: dict[str, Any]) -> None:
    """One matrix element: CSR (row bands, appended in order) from a dask array or an in-memory matrix."""
    from dask_loom._config import block_size_bytes
    from dask_loom._csr import sparse_dtype
    from dask_loom._lazy import issparse
    from dask_loom.anndata._target import SparseTarget
    from dask_loom.blocks import store

    dtype = sparse_dtype(x.dtype, where=f"{path}: element '{elem}'")
    if not hasattr(x, "dask") and not issparse(x):
        import scipy.sparse as sp

        x = sp.csr_matrix(np.asarray(x))
    # Band of one row: every block boundary of the input is a write-unit boundary, so the
    # input's blocks (whole stored chunks) are written as they are, never rechunked.
    target = SparseTarget(
        path,
        elem,
        shape=tuple(int(s) for s in x.shape),
        dtype=dtype,
        encoding="csr",
        band=1,
        compression="gzip" if kind == "h5ad" else "auto",
        zarr_format=3 if kind == "zarr" else None,
        shard_bytes=(block_size_bytes() if sharded else 0) if kind == "zarr" else None,
        joined=True,
    )
    store(x, target, **kw)


def _store_dense(x: Any, group: Any, elem: str, *, kind: str, kw: dict[str, Any]) -> None:
    """A dense dask array (a collection's ``obsm``), computed and written one row band at a time."""
    from dask_loom.blocks._store import computed_in_batches

    shape = tuple(int(s) for s in x.shape)
    rows = max(1, max(x.chunks[0]) if x.chunks[0] else 1)
    if kind == "h5ad":
        arr = group.create_dataset(
            elem,
            shape=shape,
            dtype=x.dtype,
            chunks=(min(rows, max(1, shape[0])), *shape[1:]) if shape[0] else None,
            compression="gzip",
        )
    else:
        arr = group.create_array(
            elem, shape=shape, dtype=x.dtype, chunks=(max(1, min(rows, shape[0])), *shape[1:])
        )
    bands = [x[a:b] for a, b in zip(np.cumsum((0, *x.chunks[0]))[:-1], np.cumsum(x.chunks[0]))]
    start = 0
    for band in computed_in_batches(bands, **kw):
        arr[start : start + len(band)] = band
        start += len(band)
    for k, v in {"encoding-type": "array", "encoding-version": "0.2.0"}.items():
        arr.attrs[k] = v


def _small_elements(a: anndata.AnnData) -> dict[str, Any]:
    """Everything but the big matrices (and dask ``obsm``/``varm``), as anndata writes it."""
    return {
        "obs": a.obs,
        "var": a.var,
        "obsp": dict(a.obsp),
        "varp": dict(a.varp),
        "uns": dict(a.uns),
    }


def _write_into(
    group: Any,
    a: anndata.AnnData,
    path: str,
    kind: str,
    kw: dict[str, Any],
    *,
    sharded: bool,
    layers: list[str] | None,
) -> None:
    import anndata as ad

    with warnings.catch_warnings():
        # anndata's notes about writing strings as it always does.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        for key, value in _small_elements(a).items():
            ad.io.write_elem(group, key, value)
        for axis_name, mapping in (("obsm", a.obsm), ("varm", a.varm)):
            lazy = {k: v for k, v in mapping.items() if hasattr(v, "dask")}
            ad.io.write_elem(group, axis_name, {k: v for k, v in mapping.items() if k not in lazy})
            for k, v in lazy.items():
                _store_dense(v, group, f"{axis_name}/{k}", kind=kind, kw=kw)
        ad.io.write_elem(group, "layers", {})
    if a.X is not None:
        _store_matrix(a.X, path, "X", kind=kind, sharded=sharded, kw=kw)
    for k, v in a.layers.items():
        if layers is not None and k not in layers:
            continue
        _store_matrix(v, path, f"layers/{k}", kind=kind, sharded=sharded, kw=kw)
    for k, v in _ROOT_ATTRS.items():
        group.attrs[k] = v


def write_anndata(
    source: Any,
    dst: str | os.PathLike[str],
    *,
    layers: Iterable[str] | None = None,
    X_name: str = "",
    overwrite: bool = False,
    sharded: bool = True,
    validate: bool = False,
    storage_options: dict[str, Any] | None = None,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
) -> None:
    """Write a Loom file or a collection as AnnData (``.h5ad`` or Zarr v3), streamed.

    Cells become rows: ``X`` (and each layer) is written as a CSR matrix, the
    Loom matrix transposed, one row band of whole stored chunks per task;
    column attributes become ``obs`` (``CellID`` as index), row attributes
    ``var`` (``Gene`` as index), multi-column attributes ``obsm``/``varm``,
    graphs ``obsp``/``varp`` (the layout of
    :meth:`dask_loom.LoomConnection.to_anndata`).  Peak memory does not grow
    with the file (a few blocks of ``dask_loom.block-size``, plus one shard
    per array in Zarr).

    Parameters
    ----------
    source
        A Loom path or URL (``.loom`` or ``.loom.zarr``), an open
        :class:`~dask_loom.LoomConnection`, a :class:`~dask_loom.MappedCollection`
        (its files joined, written as one AnnData) or an ``anndata.AnnData``
        (for instance from :func:`dask_loom.read_loom`).
    dst
        ``*.h5ad`` or ``*.zarr``, a local path (a URL is refused with
        :class:`~dask_loom.errors.UnsupportedSchemeError`).
    layers
        Layers to write besides ``X`` (default: all).
    X_name
        The Loom layer written as ``X`` (default: the main matrix).
    overwrite
        Replace *dst* if it exists (at the very end, in one rename);
        otherwise an existing *dst* is an error and is left as it is.
    sharded
        Zarr: ``data``/``indices``/``indptr`` in shards of about
        ``dask_loom.block-size`` bytes (whole chunks of 65,536 values), so a
        store has few, large objects.  ``False`` writes the chunks unsharded.
    validate
        Check a Loom *source* against the spec first.
    storage_options
        fsspec options for a Loom URL *source*.
    scheduler, client, progress
        Where the graph runs and whether to show a progress bar.

    Raises
    ------
    dask_loom.errors.TargetExistsError
        *dst* exists and *overwrite* is false (nothing is written).
    dask_loom.errors.UnsupportedDtypeError
        A layer that is not numeric (before anything is written).
    dask_loom.errors.FormatError
        *dst* is named neither ``*.h5ad`` nor ``*.zarr``; a source file
        that cannot be read (the partial output is removed).

    Examples
    --------
    >>> import dask_loom, anndata, numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> dask_loom.create(os.path.join(d, "a.loom"), np.eye(3, 4), {"Gene": np.array(["x", "y", "z"])}, {"c": np.arange(4)})
    >>> dask_loom.write_anndata(os.path.join(d, "a.loom"), os.path.join(d, "a.zarr"), scheduler="sync")
    >>> a = anndata.read_zarr(os.path.join(d, "a.zarr"))
    >>> a.shape, list(a.var_names), a.X.toarray()[:3, :3].tolist()
    ((4, 3), ['x', 'y', 'z'], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    """
    if "://" in os.fspath(dst):
        from dask_loom.errors import UnsupportedSchemeError

        raise UnsupportedSchemeError(
            f"{os.fspath(dst)}: write_anndata writes a local .h5ad or .zarr (copy it to the object store afterwards)"
        )
    out = os.path.abspath(os.fspath(dst))
    kind = _kind(out)
    if os.path.lexists(out) and not overwrite:
        raise TargetExistsError(f"{out}: exists; pass overwrite=True to replace it")
    a, opened = _as_anndata(
        source, layers=layers, X_name=X_name, validate=validate, storage_options=storage_options
    )
    # Loom sources and collections make only the layers asked for; an AnnData is filtered here.
    wanted = None
    if layers is not None and source is a:
        wanted = list(layers)
        missing = [k for k in wanted if k not in a.layers]
        if missing:
            raise ElementNotFoundError(
                f"{out}: layers {missing} are not in the AnnData (it has {list(a.layers)})"
            )
    kw = {"scheduler": scheduler, "client": client, "progress": progress}
    host = getattr(source, "__dask_loom_layer_host__", None)  # a LoomConnection: run where it runs
    if opened is None and scheduler is None and client is None and host is not None:
        kw.update(host().compute_kwargs())
    try:
        if kind == "h5ad":
            from dask_loom.hdf5._files import open_h5_write
            from dask_loom.storage import FileSpec

            if os.path.isdir(out):
                raise TargetExistsError(f"{out}: is a directory; remove it first")
            with open_h5_write(FileSpec.from_path(out), mode="w") as f:
                _write_into(f, a, out, kind, kw, sharded=False, layers=wanted)
        else:
            import zarr

            from dask_loom.storage._atomic import local_transaction

            if os.path.lexists(out) and not os.path.isdir(out):
                raise TargetExistsError(f"{out}: exists and is not a directory; remove it first")
            with local_transaction(out, label=out, base="empty") as tmp:
                group = zarr.open_group(tmp.path, mode="w", zarr_format=3)
                _write_into(group, a, tmp.path, kind, kw, sharded=sharded, layers=wanted)
                with warnings.catch_warnings():
                    # Consolidated metadata is what anndata writes (and reads fast) in v3 too.
                    warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
                    zarr.consolidate_metadata(tmp.path, zarr_format=3)
    finally:
        if opened is not None:
            opened.close()
