"""``highly_variable_genes`` (flavours seurat, cell_ranger, seurat_v3, seurat_v3_paper), streaming.

Per-gene (and per-batch) mean and variance come from one fused blockwise
pass over the lazily normalised and log-transformed matrix: each task reads
whole stored chunks, applies the pending transforms and adds the block's
sums, sums of squares and non-zero counts into small partials.  Seurat v3
needs a second pass for the clipped sums once the loess fit is known (scanpy
1.11 cannot run it on dask at all).  The selection rules are scanpy's,
re-implemented on the per-gene statistics.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from dask_loom.pp import _kernels as K
from dask_loom.pp._graph import chained, column_stats, compute, is_dask, transform
from dask_loom.pp._normalize import get_rep, scanpy_pp

__all__ = ["batch_codes", "highly_variable_genes", "mean_var"]

_CUTOFF_DEFAULTS = {"min_disp": 0.5, "max_disp": np.inf, "min_mean": 0.0125, "max_mean": 3}


def batch_codes(adata: Any, key: str | None) -> tuple[np.ndarray, list[Any]]:
    """Row codes ``0..k-1`` of obs column *key* (categories in order), or one batch."""
    import pandas as pd

    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64), [0]
    if key not in adata.obs.columns:
        from dask_loom.errors import ElementNotFoundError

        raise ElementNotFoundError(f"obs has no column {key!r} (columns: {list(adata.obs.columns)})")
    col = adata.obs[key]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype("category")
    return np.asarray(col.cat.codes, dtype=np.int64), list(col.cat.categories)


def mean_var(stats: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance per group and gene from ``column_stats`` partials (scanpy's formula)."""
    n = np.asarray(n, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = stats[0] / n
        var = stats[1] / n - mean**2
        var = np.where(n != 1, var * n / (n - 1), var)
    return mean, var


def _dispersion_frame(mean: np.ndarray, var: np.ndarray, flavor: str, n_bins: int) -> Any:
    """Means, dispersions, bins and normalised dispersions as scanpy computes them per batch."""
    import pandas as pd

    mean = mean.copy()
    mean[mean == 0] = 1e-12
    with np.errstate(invalid="ignore", divide="ignore"):
        dispersion = var / mean
        if flavor == "seurat":
            dispersion[dispersion == 0] = np.nan
            dispersion = np.log(dispersion)
            mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    if flavor == "seurat":
        bins: Any = n_bins
    else:
        bins = np.r_[-np.inf, np.percentile(df["means"], np.arange(10, 105, 5)), np.inf]
    df["mean_bin"] = pd.cut(df["means"], bins=bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    if flavor == "seurat":
        per_bin = grouped.agg(avg="mean", dev="std")
        # A bin with one gene has no spread: scanpy gives its genes a normalised dispersion of 1.
        single = per_bin["dev"].isnull()
        per_bin.loc[single, "dev"] = per_bin.loc[single, "avg"]
        per_bin.loc[single, "avg"] = 0
    else:
        from statsmodels.robust import mad

        def _mad(a: Any) -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=RuntimeWarning)
                return mad(a)

        per_bin = grouped.agg(avg="median", dev=_mad)
    per_gene = per_bin.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - per_gene["avg"]) / per_gene["dev"]
    return df, mean


def _select(
    mean: np.ndarray, dispersion_norm: np.ndarray, n_top: int | None, cutoffs: dict[str, float]
) -> np.ndarray:
    if n_top is None:
        dn = np.nan_to_num(dispersion_norm)
        return (
            (mean > cutoffs["min_mean"])
            & (mean < cutoffs["max_mean"])
            & (dn > cutoffs["min_disp"])
            & (dn < cutoffs["max_disp"])
        )
    n_top = min(n_top, len(dispersion_norm))
    finite = dispersion_norm[~np.isnan(dispersion_norm)]
    if n_top > finite.size:
        warnings.warn(
            "`n_top_genes` > number of normalized dispersions, returning all genes with normalized dispersions.",
            UserWarning,
            stacklevel=4,
        )
        n_top = finite.size
    threshold = np.sort(finite)[::-1][n_top - 1]
    return np.nan_to_num(dispersion_norm, nan=-np.inf) >= threshold


def _one_batch(
    mean: np.ndarray,
    var: np.ndarray,
    flavor: str,
    n_bins: int,
    n_top: int | None,
    cutoffs: dict[str, float],
    names: Any,
) -> Any:
    df, mean_used = _dispersion_frame(mean, var, flavor, n_bins)
    df["highly_variable"] = _select(mean_used, df["dispersions_norm"].to_numpy(), n_top, cutoffs)
    df.index = names
    return df


def _dispersion_flavours(
    adata: Any,
    x: Any,
    *,
    flavor: str,
    n_bins: int,
    n_top: int | None,
    cutoffs: dict[str, float],
    batch_key: str | None,
) -> Any:
    import pandas as pd

    if flavor == "seurat":
        base = adata.uns.get("log1p", {}).get("base")
        scale = None if base is None else float(np.log(base))
        lazy = transform(x, K.expm1_block, scale, name="pp-expm1", dtype=np.result_type(x.dtype, np.float32))
        x = chained(lazy, x, "expm1", base=scale)
    codes, batches = batch_codes(adata, batch_key)
    (stats,) = compute(column_stats(x, groups=codes, n_groups=len(batches)))
    n = np.bincount(codes[codes >= 0], minlength=len(batches))
    mean, var = mean_var(stats, n)
    names = adata.var_names
    if batch_key is None:
        return _one_batch(mean[0], var[0], flavor, n_bins, n_top, cutoffs, names)
    frames = []
    for b in range(len(batches)):
        expressed = stats[2, b] > 0  # scanpy filters genes no cell of the batch expresses
        df = _one_batch(
            mean[b, expressed], var[b, expressed], flavor, n_bins, n_top, cutoffs, names[expressed]
        )
        if (~expressed).any():
            missing = pd.DataFrame(
                np.zeros(((~expressed).sum(), len(df.columns))), columns=df.columns, index=names[~expressed]
            )
            missing["highly_variable"] = missing["highly_variable"].astype(bool)
            df = pd.concat([df, missing]).loc[names]
        frames.append(df)
    df = pd.concat(frames, axis=0)
    df["highly_variable"] = df["highly_variable"].astype(int)
    df = df.groupby(df.index, observed=True).agg(
        {"means": "mean", "dispersions": "mean", "dispersions_norm": "mean", "highly_variable": "sum"}
    )
    df["highly_variable_nbatches"] = df["highly_variable"]
    df["highly_variable_intersection"] = df["highly_variable_nbatches"] == len(batches)
    if n_top is not None:
        order = names.copy()
        df = df.sort_values(
            ["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last"
        )
        df["highly_variable"] = np.arange(df.shape[0]) < n_top
        df = df.loc[order]
    else:
        df["dispersions_norm"] = df["dispersions_norm"].fillna(0)
        m, d = df["means"].to_numpy(), df["dispersions_norm"].to_numpy()
        df["highly_variable"] = (
            (m > cutoffs["min_mean"])
            & (m < cutoffs["max_mean"])
            & (d > cutoffs["min_disp"])
            & (d < cutoffs["max_disp"])
        )
    return df


def _integer_check_task(block: Any) -> np.ndarray:
    block = K.as_csr(block)
    v = block.data if getattr(block, "format", None) == "csr" else np.asarray(block)
    ok = bool(np.all(v >= 0) and np.all(np.mod(v, 1) == 0)) if v.size else True
    return np.array([[ok]])


def _seurat_v3(
    adata: Any, x: Any, *, flavor: str, n_top: int, batch_key: str | None, check_values: bool, span: float
) -> Any:
    import dask.array as da
    import pandas as pd

    try:
        from skmisc.loess import loess
    except ImportError:
        from dask_loom.errors import MissingDependencyError

        raise MissingDependencyError(
            "flavor='seurat_v3' needs scikit-misc: pip install 'dask_loom[analysis]'"
        ) from None
    codes, batches = batch_codes(adata, batch_key)
    stats_g = column_stats(x, groups=codes, n_groups=len(batches))
    if check_values:
        ok = da.blockwise(
            _integer_check_task,
            "ij",
            x,
            "ij",
            adjust_chunks={"i": 1, "j": 1},
            dtype=bool,
            meta=np.empty((0, 0), dtype=bool),
        )
        stats, integral = compute(stats_g, ok.all())
        if not bool(integral):
            warnings.warn(
                f"`{flavor=!r}` expects raw count data, but non-integers were found.",
                UserWarning,
                stacklevel=4,
            )
    else:
        (stats,) = compute(stats_g)
    n = np.bincount(codes[codes >= 0], minlength=len(batches))
    total_mean, total_var = mean_var(stats.sum(axis=1, keepdims=True), np.array([n.sum()]))
    df = pd.DataFrame(index=adata.var_names)
    df["means"], df["variances"] = total_mean[0], total_var[0]
    mean, var = mean_var(stats, n)
    clip = np.zeros_like(mean)
    reg_std = np.zeros_like(mean)
    for b in range(len(batches)):
        not_const = var[b] > 0
        estimate = np.zeros(mean.shape[1], dtype=np.float64)
        model = loess(np.log10(mean[b, not_const]), np.log10(var[b, not_const]), span=span, degree=2)
        model.fit()
        estimate[not_const] = model.outputs.fitted_values
        reg_std[b] = np.sqrt(10**estimate)
        clip[b] = reg_std[b] * np.sqrt(n[b]) + mean[b]
    (clipped,) = compute(column_stats(x, groups=codes, n_groups=len(batches), clip=clip))
    nb = n[:, None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = (1 / ((nb - 1) * np.square(reg_std))) * (
            nb * np.square(mean) + clipped[1] - 2 * clipped[0] * mean
        )
    ranked = np.argsort(np.argsort(-norm, axis=1), axis=1).astype(np.float32)
    n_high = np.sum((ranked < n_top).astype(int), axis=0)
    ranked[ranked >= n_top] = np.nan
    median_ranked = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    df["gene_name"] = df.index
    df["highly_variable_nbatches"] = n_high
    df["highly_variable_rank"] = median_ranked
    df["variances_norm"] = np.mean(norm, axis=0)
    if flavor == "seurat_v3":
        cols, asc = ["highly_variable_rank", "highly_variable_nbatches"], [True, False]
    else:
        cols, asc = ["highly_variable_nbatches", "highly_variable_rank"], [False, True]
    order = df[cols].sort_values(cols, ascending=asc, na_position="last").index
    df["highly_variable"] = False
    df.loc[order[: int(n_top)], "highly_variable"] = True
    return df


def highly_variable_genes(
    adata: Any,
    *,
    layer: str | None = None,
    n_top_genes: int | None = None,
    min_disp: float = 0.5,
    max_disp: float = np.inf,
    min_mean: float = 0.0125,
    max_mean: float = 3,
    span: float = 0.3,
    n_bins: int = 20,
    flavor: str = "seurat",
    subset: bool = False,
    inplace: bool = True,
    batch_key: str | None = None,
    check_values: bool = True,
) -> Any:
    """``scanpy.pp.highly_variable_genes`` in one streaming pass (two for Seurat v3).

    Same parameters, flavours and results as scanpy on an in-memory matrix.
    On a dask matrix the per-gene (per-batch) statistics come from one fused
    blockwise pass; nothing is materialised but ``(batches x genes)`` partial
    sums.  ``flavor='seurat_v3'`` (which scanpy 1.11 cannot run on dask) takes
    a second pass for the clipped sums.
    """
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise ValueError(
            "`pp.highly_variable_genes` expects an `AnnData` argument, "
            "pass `inplace=False` if you want to return a `pd.DataFrame`."
        )
    x = get_rep(adata, layer)
    kwargs = {
        "layer": layer,
        "n_top_genes": n_top_genes,
        "min_disp": min_disp,
        "max_disp": max_disp,
        "min_mean": min_mean,
        "max_mean": max_mean,
        "span": span,
        "n_bins": n_bins,
        "flavor": flavor,
        "subset": subset,
        "inplace": inplace,
        "batch_key": batch_key,
        "check_values": check_values,
    }
    if not is_dask(x):
        return scanpy_pp().highly_variable_genes(adata, **kwargs)
    if flavor in ("seurat_v3", "seurat_v3_paper"):
        n_top = 2000 if n_top_genes is None else int(n_top_genes)
        df = _seurat_v3(
            adata, x, flavor=flavor, n_top=n_top, batch_key=batch_key, check_values=check_values, span=span
        )
        if inplace:
            adata.uns["hvg"] = {"flavor": flavor}
            adata.var["highly_variable"] = df["highly_variable"].to_numpy()
            adata.var["highly_variable_rank"] = df["highly_variable_rank"].to_numpy()
            adata.var["means"] = df["means"].to_numpy()
            adata.var["variances"] = df["variances"].to_numpy()
            adata.var["variances_norm"] = df["variances_norm"].to_numpy().astype("float64", copy=False)
            if batch_key is not None:
                adata.var["highly_variable_nbatches"] = df["highly_variable_nbatches"].to_numpy()
            if subset:
                adata._inplace_subset_var(df["highly_variable"].to_numpy())
            return None
        if batch_key is None:
            df = df.drop(["highly_variable_nbatches"], axis=1)
        return df.iloc[df["highly_variable"].to_numpy(), :] if subset else df
    if flavor not in ("seurat", "cell_ranger"):
        raise ValueError('`flavor` needs to be "seurat", "cell_ranger", "seurat_v3" or "seurat_v3_paper"')
    cutoffs = {"min_disp": min_disp, "max_disp": max_disp, "min_mean": min_mean, "max_mean": max_mean}
    if n_top_genes is not None and cutoffs != _CUTOFF_DEFAULTS:
        warnings.warn("If you pass `n_top_genes`, all cutoffs are ignored.", UserWarning, stacklevel=2)
    df = _dispersion_flavours(
        adata, x, flavor=flavor, n_bins=n_bins, n_top=n_top_genes, cutoffs=cutoffs, batch_key=batch_key
    )
    if not inplace:
        return df.loc[df["highly_variable"]] if subset else df
    adata.uns["hvg"] = {"flavor": flavor}
    adata.var["highly_variable"] = df["highly_variable"]
    adata.var["means"] = df["means"]
    adata.var["dispersions"] = df["dispersions"]
    adata.var["dispersions_norm"] = df["dispersions_norm"].astype(np.float32, copy=False)
    if batch_key is not None:
        adata.var["highly_variable_nbatches"] = df["highly_variable_nbatches"]
        adata.var["highly_variable_intersection"] = df["highly_variable_intersection"]
    if subset:
        adata._inplace_subset_var(df["highly_variable"])
    return None
