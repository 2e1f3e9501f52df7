"""``normalize_total`` and ``log1p`` for AnnData whose matrix is a dask array.

``normalize_total`` needs the counts of every cell before it can scale any:
one pass of row sums (blockwise, partial sums only), then the scaling is a
lazy blockwise task that dask fuses with the reads of whatever pass comes
next.  ``log1p`` is lazy too.  In-memory matrices go to scanpy unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from dask_loom.pp import _kernels as K
from dask_loom.pp._graph import chained, compute, is_dask, row_sums_of, transform

__all__ = ["log1p", "normalize_total"]


def scanpy_pp() -> Any:
    """``scanpy.pp`` (for in-memory matrices), or a typed error naming the extra to install."""
    try:
        import scanpy as sc
    except ImportError:  # pragma: no cover - scanpy is in the test extra
        from dask_loom.errors import MissingDependencyError

        raise MissingDependencyError(
            "in-memory matrices are handed to scanpy: pip install 'dask_loom[analysis]'"
        ) from None
    return sc.pp


def get_rep(adata: Any, layer: str | None) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise ValueError(f"Layer {layer!r} not found in adata.")
    return adata.layers[layer]


def set_rep(adata: Any, x: Any, layer: str | None) -> None:
    if layer is None:
        adata.X = x
    else:
        adata.layers[layer] = x


def _exceeding_task(block: Any, limits: np.ndarray) -> np.ndarray:
    """Per column: how many rows hold a value above their row's limit."""
    block = K.as_csr(block)
    if getattr(block, "format", None) == "csr":
        over = block.data > np.repeat(limits, np.diff(block.indptr))
        return np.bincount(block.indices[over], minlength=block.shape[1])[None, :]
    return (np.asarray(block) > limits[:, None]).sum(axis=0)[None, :]


def _masked_row_sums_task(block: Any, keep: np.ndarray) -> np.ndarray:
    block = K.as_csr(block)
    if getattr(block, "format", None) == "csr":
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        w = np.where(keep[block.indices], block.data.astype(np.float64), 0.0)
        return np.bincount(rows, weights=w, minlength=block.shape[0])[:, None]
    return np.asarray(block, dtype=np.float64)[:, keep].sum(axis=1)[:, None]


def _highly_expressed(x: Any, counts: np.ndarray, max_fraction: float) -> np.ndarray:
    """Genes above *max_fraction* of a cell's counts in at least one cell (a second pass)."""
    import dask.array as da

    limits = da.from_array((max_fraction * counts.astype(np.float64)), chunks=(x.chunks[0],), name=False)
    parts = da.blockwise(
        _exceeding_task,
        "ij",
        x,
        "ij",
        limits,
        "i",
        adjust_chunks={"i": 1},
        dtype=np.int64,
        meta=np.empty((0, 0), dtype=np.int64),
    )
    (n_over,) = compute(parts.sum(axis=0))
    return np.asarray(n_over) > 0


def normalize_total(
    adata: Any,
    *,
    target_sum: float | None = None,
    exclude_highly_expressed: bool = False,
    max_fraction: float = 0.05,
    key_added: str | None = None,
    layer: str | None = None,
    inplace: bool = True,
    copy: bool = False,
) -> Any:
    """``scanpy.pp.normalize_total`` with one streaming pass for the counts per cell.

    Same parameters and results as scanpy on an in-memory matrix.  On a dask
    matrix the counts per cell are computed in one blockwise pass (two more
    with ``exclude_highly_expressed``) and the scaling stays lazy, fused into
    the next pass; blocks stay sparse.

    Notes
    -----
    ``target_sum=None`` is the median of all cells' counts, as scanpy gives on
    an in-memory matrix (scanpy's own dask path takes the median of the
    non-zero counts only).
    """
    x = get_rep(adata, layer)
    if not is_dask(x):
        return scanpy_pp().normalize_total(
            adata,
            target_sum=target_sum,
            exclude_highly_expressed=exclude_highly_expressed,
            max_fraction=max_fraction,
            key_added=key_added,
            layer=layer,
            inplace=inplace,
            copy=copy,
        )
    if copy:
        if not inplace:
            raise ValueError("`copy=True` cannot be used with `inplace=False`.")
        adata = adata.copy()
        x = get_rep(adata, layer)
    if max_fraction < 0 or max_fraction > 1:
        raise ValueError("Choose max_fraction between 0 and 1.")
    if np.issubdtype(x.dtype, np.integer):
        (sums,) = compute(row_sums_of(x, dtype=np.float32))
        x = x.astype(np.float32)
    else:
        (sums,) = compute(row_sums_of(x))
    # scanpy keeps the counts in the data's dtype (summed in float64 first).
    counts = np.asarray(sums).astype(x.dtype if x.dtype.kind == "f" else np.float64)
    gene_subset = None
    if exclude_highly_expressed:
        import dask.array as da

        flagged = _highly_expressed(x, counts, max_fraction)
        gene_subset = ~flagged
        keep = (
            da.blockwise(
                _masked_row_sums_task,
                "ij",
                x,
                "ij",
                keep=gene_subset,
                adjust_chunks={"j": 1},
                dtype=np.float64,
                meta=np.empty((0, 0), dtype=np.float64),
            )
            if x.numblocks[1] == 1
            else None
        )
        if keep is None:
            # Several column blocks: sum the kept columns of each, then across blocks.
            starts = np.concatenate(([0], np.cumsum(x.chunks[1])))
            pieces = [
                da.blockwise(
                    _masked_row_sums_task,
                    "ij",
                    x.blocks[:, j],
                    "ij",
                    keep=gene_subset[starts[j] : starts[j + 1]],
                    adjust_chunks={"j": 1},
                    dtype=np.float64,
                    meta=np.empty((0, 0), dtype=np.float64),
                )
                for j in range(x.numblocks[1])
            ]
            keep = da.concatenate(pieces, axis=1)
        (sums,) = compute(keep.sum(axis=1))
        counts = np.asarray(sums).astype(counts.dtype)
    if target_sum is None:
        target_sum = np.median(counts)
    factors = counts / target_sum
    if not np.all(factors > 0):
        warnings.warn("Some cells have zero counts", UserWarning, stacklevel=2)
    import dask.array as da

    f = da.from_array(np.asarray(factors), chunks=(x.chunks[0],), name=False)
    out = da.blockwise(
        K.scale_rows,
        "ij",
        x,
        "ij",
        f,
        "i",
        dtype=x.dtype,
        meta=x._meta,
        name="pp-normalize-" + _tok(x, factors),
    )
    chained(out, x, "scale", factors=factors)
    if inplace:
        if key_added is not None:
            adata.obs[key_added] = factors
        set_rep(adata, out, layer)
        return adata if copy else None
    return {"X": out, "norm_factor": factors}


def _tok(*args: Any) -> str:
    from dask.base import tokenize

    return tokenize(*args)


def log1p(
    data: Any,
    *,
    base: float | None = None,
    copy: bool = False,
    chunked: bool | None = None,
    chunk_size: int | None = None,
    layer: str | None = None,
    obsm: str | None = None,
) -> Any:
    """``scanpy.pp.log1p``: lazy and blockwise on a dask matrix (sparse blocks stay sparse)."""
    import anndata as ad

    if not isinstance(data, ad.AnnData):
        if is_dask(data):
            x = data if np.issubdtype(data.dtype, np.floating) else data.astype(np.float32)
            return chained(transform(x, K.log1p_block, base, name="pp-log1p"), x, "log1p", base=base)
        return scanpy_pp().log1p(
            data, base=base, copy=copy, chunked=chunked, chunk_size=chunk_size, layer=layer, obsm=obsm
        )
    x = data.obsm[obsm] if obsm is not None else get_rep(data, layer)
    if not is_dask(x):
        return scanpy_pp().log1p(
            data, base=base, copy=copy, chunked=chunked, chunk_size=chunk_size, layer=layer, obsm=obsm
        )
    adata = data.copy() if copy else data
    if "log1p" in adata.uns:
        warnings.warn("adata.X seems to be already log-transformed.", UserWarning, stacklevel=2)
    x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
    out = chained(transform(x, K.log1p_block, base, name="pp-log1p"), x, "log1p", base=base)
    if obsm is not None:
        adata.obsm[obsm] = out
    else:
        set_rep(adata, out, layer)
    adata.uns["log1p"] = {"base": base}
    return adata if copy else None
