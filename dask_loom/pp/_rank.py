"""``rank_genes_groups`` (t-test flavours) from one grouped pass of sums, sums of squares and non-zero counts.

scanpy computes the mean and variance of every group and of its complement
with a pass over the matrix for each; here one blockwise pass aggregates, per
group and gene, the sum, the sum of squares and the non-zero count, and the
complement is the total minus the group.  The Welch t-test, the p-value
corrections, fold changes, the top-gene selection and the layout of
``uns['rank_genes_groups']`` are scanpy's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dask_loom.pp._graph import column_stats, compute, is_dask
from dask_loom.pp._hvg import mean_var

__all__ = ["group_stats", "rank_genes_groups"]


def group_stats(x: Any, codes: np.ndarray, n_groups: int) -> dict[str, np.ndarray]:
    """Per group and column: ``n``, ``mean``, unbiased ``var`` and ``nnz`` of a dask matrix, in one pass.

    Rows with code ``-1`` are left out.  The totals over all groups come as
    the extra last row of each array.
    """
    (stats,) = compute(column_stats(x, groups=codes, n_groups=n_groups))
    n = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)
    full = np.concatenate([stats, stats.sum(axis=1, keepdims=True)], axis=1)
    n_full = np.concatenate([n, [n.sum()]])
    mean, var = mean_var(full, n_full)
    return {"n": n_full, "mean": mean, "var": var, "nnz": full[2], "sum": full[0], "sumsq": full[1]}


def _select_top_n(scores: np.ndarray, n_top: int) -> np.ndarray:
    partition = np.argpartition(scores, -n_top)[-n_top:]
    return partition[np.argsort(scores[partition])[::-1]]


def rank_genes_groups(
    adata: Any,
    groupby: str,
    *,
    mask_var: Any = None,
    use_raw: bool | None = None,
    groups: Any = "all",
    reference: str = "rest",
    n_genes: int | None = None,
    rankby_abs: bool = False,
    pts: bool = False,
    key_added: str | None = None,
    copy: bool = False,
    method: str | None = None,
    corr_method: str = "benjamini-hochberg",
    tie_correct: bool = False,
    layer: str | None = None,
    **kwds: Any,
) -> Any:
    """``scanpy.tl.rank_genes_groups`` for ``method='t-test'`` / ``'t-test_overestim_var'``, in one pass.

    Same parameters and ``uns`` layout as scanpy.  On a dask matrix the group
    statistics come from one grouped blockwise pass (sums, sums of squares,
    non-zero counts per group and gene); ``'wilcoxon'`` and ``'logreg'`` need
    every value of a gene at once (ranks, a fitted model) and are refused on a
    dask matrix with a :class:`ValueError` (scanpy handles them in memory).
    """
    import pandas as pd

    from dask_loom.errors import ElementNotFoundError

    if method is None:
        method = "t-test"
    if "only_positive" in kwds:
        rankby_abs = not kwds.pop("only_positive")
    if use_raw is None:
        use_raw = adata.raw is not None
    elif use_raw and adata.raw is None:
        raise ValueError("Received `use_raw=True`, but `adata.raw` is empty.")
    if layer is not None:
        if use_raw:
            raise ValueError("Cannot specify `layer` and have `use_raw=True`.")
        x, var_names = adata.layers[layer], adata.var_names
    elif use_raw and adata.raw is not None:
        x, var_names = adata.raw.X, adata.raw.var_names
    else:
        x, var_names = adata.X, adata.var_names
    if not is_dask(x):
        import scanpy as sc

        return sc.tl.rank_genes_groups(
            adata, groupby, mask_var=mask_var, use_raw=use_raw, groups=groups, reference=reference, n_genes=n_genes,
            rankby_abs=rankby_abs, pts=pts, key_added=key_added, copy=copy, method=method, corr_method=corr_method,
            tie_correct=tie_correct, layer=layer, **kwds,
        )
    if method not in ("t-test", "t-test_overestim_var", "wilcoxon", "logreg"):
        raise ValueError("Method must be one of {'logreg', 't-test', 'wilcoxon', 't-test_overestim_var'}.")
    if method in ("wilcoxon", "logreg"):
        raise ValueError(
            f"method={method!r} needs every value of a gene at once (ranks or a fitted model) and is not streamed; "
            "use method='t-test' on the dask matrix, or scanpy on an in-memory subset"
        )
    if corr_method not in ("benjamini-hochberg", "bonferroni"):
        raise ValueError("Correction method must be one of {'benjamini-hochberg', 'bonferroni'}.")
    if groupby not in adata.obs.columns:
        raise ElementNotFoundError(f"obs has no column {groupby!r} (columns: {list(adata.obs.columns)})")
    adata = adata.copy() if copy else adata
    col = adata.obs[groupby]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        adata.obs[groupby] = col = col.astype("category")
    categories = list(col.cat.categories)
    if groups == "all":
        order = list(range(len(categories)))
    elif isinstance(groups, (str, int)):
        raise ValueError("Specify a sequence of groups")
    else:
        wanted = [str(g) if isinstance(g, int) else g for g in groups]
        if reference != "rest" and reference not in wanted:
            wanted.append(reference)
        order = [categories.index(g) for g in wanted if g in categories]
    if reference != "rest" and reference not in categories:
        raise ValueError(f"reference = {reference} needs to be one of groupby = {categories}.")
    counts = col.value_counts()
    singles = {str(categories[i]) for i in order if counts.get(categories[i], 0) < 2}
    if singles:
        raise ValueError(f"Could not calculate statistics for groups {', '.join(sorted(singles))} since they only contain one sample.")

    if isinstance(mask_var, str):
        mask = np.asarray(adata.var[mask_var], dtype=bool)
    elif mask_var is not None:
        mask = np.asarray(mask_var, dtype=bool)
    else:
        mask = None
    if mask is not None:
        x = x[:, np.flatnonzero(mask)]
        var_names = var_names[mask]
    key_added = key_added or "rank_genes_groups"
    adata.uns[key_added] = {
        "params": {"groupby": groupby, "reference": reference, "method": method, "use_raw": use_raw, "layer": layer, "corr_method": corr_method}
    }
    codes = np.asarray(col.cat.codes, dtype=np.int64)
    st = group_stats(x, codes, len(categories))
    n_g, mean, var, nnz = st["n"], st["mean"], st["var"], st["nnz"]
    total = len(categories)  # index of the totals row
    base = adata.uns.get("log1p", {}).get("base")

    def expm1(v: np.ndarray) -> np.ndarray:
        return np.expm1(v * np.log(base)) if base is not None else np.expm1(v)

    n_vars = x.shape[1]
    n_top = n_vars if n_genes is None or n_genes > n_vars else n_genes
    iref = categories.index(reference) if reference != "rest" else None
    from scipy import stats as sstats

    frames: dict[tuple[str, str], Any] = {}
    pts_table, pts_rest_table = [], []
    for gi in order:
        name = str(categories[gi])
        if pts:
            pts_table.append(nnz[gi] / n_g[gi])
        if iref is not None and gi == iref:
            continue
        if iref is not None:
            m_rest, v_rest, n_other = mean[iref], var[iref], n_g[iref]
        else:
            n_other = n_g[total] - n_g[gi]
            s = st["sum"][total] - st["sum"][gi]
            q = st["sumsq"][total] - st["sumsq"][gi]
            m_rest, v_rest = mean_var(np.stack([s[None], q[None], np.zeros_like(s)[None]]), np.array([n_other]))
            m_rest, v_rest = m_rest[0], v_rest[0]
            if pts:
                pts_rest_table.append((nnz[total] - nnz[gi]) / n_other)
        n_rest = n_other if method == "t-test" else n_g[gi]
        with np.errstate(invalid="ignore"):
            scores, pvals = sstats.ttest_ind_from_stats(
                mean1=mean[gi], std1=np.sqrt(var[gi]), nobs1=n_g[gi],
                mean2=m_rest, std2=np.sqrt(v_rest), nobs2=n_rest, equal_var=False,
            )
        scores[np.isnan(scores)] = 0
        pvals[np.isnan(pvals)] = 1
        idx = _select_top_n(np.abs(scores) if rankby_abs else scores, n_top)
        if corr_method == "benjamini-hochberg":
            from statsmodels.stats.multitest import multipletests

            _, pvals_adj, _, _ = multipletests(pvals, alpha=0.05, method="fdr_bh")
        else:
            pvals_adj = np.minimum(pvals * n_vars, 1.0)
        fold = (expm1(mean[gi]) + 1e-9) / (expm1(m_rest) + 1e-9)
        frames[(name, "names")] = np.asarray(var_names[idx])
        frames[(name, "scores")] = scores[idx]
        frames[(name, "pvals")] = pvals[idx]
        frames[(name, "pvals_adj")] = pvals_adj[idx]
        frames[(name, "logfoldchanges")] = np.log2(fold[idx])
    table = pd.DataFrame(frames)
    table.columns = table.columns.swaplevel()
    dtypes = {"names": "O", "scores": "float32", "logfoldchanges": "float32", "pvals": "float64", "pvals_adj": "float64"}
    names = [str(categories[i]) for i in order]
    if pts:
        adata.uns[key_added]["pts"] = pd.DataFrame(np.array(pts_table).T, index=var_names, columns=names)
        if iref is None:
            adata.uns[key_added]["pts_rest"] = pd.DataFrame(np.array(pts_rest_table).T, index=var_names, columns=names)
    for level in ("names", "scores", "pvals", "pvals_adj", "logfoldchanges"):
        adata.uns[key_added][level] = table[level].to_records(index=False, column_dtypes=dtypes[level])
    return adata if copy else None
