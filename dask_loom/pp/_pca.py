"""``pca``: one streaming pass for the Gram matrix, an eigendecomposition, a lazy projection.

The selected genes (2,000 variable genes by default: a 2,000 x 2,000 matrix)
of each block are scattered into a dense buffer and multiplied with one BLAS
call; the products and column sums add up across blocks in float64.  The
covariance ``G/n - mean mean^T`` (implicit centring: the sparse matrix is never
centred) is decomposed with ``scipy.linalg.eigh``; ``X_pca`` is a lazy
blockwise product, computed when it is used.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from dask_loom.pp._graph import compute, gram, gram_keeping, is_dask, project, project_kept
from dask_loom.pp._normalize import get_rep, scanpy_pp

__all__ = ["pca"]


class _Empty:
    def __repr__(self) -> str:
        return "_empty"


_empty = _Empty()


def _mask_var(adata: Any, mask_var: Any, use_highly_variable: bool | None) -> tuple[Any, np.ndarray | None]:
    hint = (
        'Use_highly_variable=True can be called through mask_var="highly_variable". '
        "Use_highly_variable=False can be called through mask_var=None"
    )
    if use_highly_variable is not None:
        warnings.warn(
            f"Argument `use_highly_variable` is deprecated, consider using the mask argument. {hint}",
            FutureWarning,
            stacklevel=3,
        )
        if mask_var is not _empty:
            raise ValueError(f"These arguments are incompatible. {hint}")
    if use_highly_variable or (
        use_highly_variable is None and mask_var is _empty and "highly_variable" in adata.var.columns
    ):
        mask_var = "highly_variable"
    if mask_var is _empty or mask_var is None:
        return None, None
    if isinstance(mask_var, str):
        if mask_var not in adata.var.columns:
            from dask_loom.errors import ElementNotFoundError

            raise ElementNotFoundError(f"var has no column {mask_var!r} to use as mask_var")
        mask = np.asarray(adata.var[mask_var], dtype=bool)
    else:
        mask = np.asarray(mask_var)
        if mask.dtype != bool or mask.shape != (adata.n_vars,):
            raise ValueError(f"mask_var must be a boolean array of length {adata.n_vars}")
    return mask_var, mask


def _flip(components: np.ndarray) -> np.ndarray:
    # scikit-learn's convention (svd_flip on the components): the largest loading of each is positive.
    rows = np.arange(components.shape[0])
    signs = np.sign(components[rows, np.argmax(np.abs(components), axis=1)])
    signs[signs == 0] = 1
    return components * signs[:, None]


#: The selected values of every block are kept from the Gram pass for ``X_pca``
#: (no second read of the matrix) when they take at most this part of the memory.
KEEP_MEMORY_FRACTION = 0.125


def _keep_fits(blocks: list[Any], n_rows: int) -> bool:
    """Whether the kept selection would fit :data:`KEEP_MEMORY_FRACTION`, from its first block; never on a cluster."""
    import psutil

    from dask_loom.cluster import get_client

    if not blocks or get_client() is not None:
        return False
    (first,) = compute(blocks[0])
    if not first.n_rows:
        return True
    need = first.nbytes * n_rows / first.n_rows
    return need <= KEEP_MEMORY_FRACTION * psutil.virtual_memory().total


def fit_pca(x: Any, mask: np.ndarray | None, n_comps: int, zero_center: bool) -> dict[str, Any]:
    """One Gram pass over the selected columns of *x*; the PCA (or uncentred SVD) of it."""
    import scipy.linalg

    from dask_loom.cluster import _one_blas_thread

    n_vars = x.shape[1]
    sel = np.arange(n_vars) if mask is None else np.flatnonzero(mask)
    lut = np.full(n_vars, -1, dtype=np.int64)
    lut[sel] = np.arange(len(sel))
    kept = None
    plan = gram_keeping(x, lut)
    if plan is not None and _keep_fits(plan[1], x.shape[0]):
        g, *kept = compute(plan[0], *plan[1], optimize_graph=False)
    else:
        (g,) = compute(gram(x, lut))
    n = x.shape[0]
    k = len(sel)
    gram_m, sums = g[:k] / n, g[k]
    mean = sums / n
    cov = gram_m - np.outer(mean, mean) if zero_center else gram_m
    # Only the leading eigenpairs are wanted; one BLAS thread, since idle OpenBLAS
    # threads spin and a loaded 2-core machine took 10x longer with two.
    with _one_blas_thread():
        evals, evecs = scipy.linalg.eigh(cov, subset_by_index=[k - n_comps, k - 1])
    evals, evecs = evals[::-1], evecs[:, ::-1]
    components = _flip(evecs[:, :n_comps].T)
    if zero_center:
        total = float(np.trace(cov))
        variance = evals[:n_comps] * (n / (n - 1) if n > 1 else 1.0)
        ratio = evals[:n_comps] / total if total else np.zeros(n_comps)
        offset = mean @ components.T
    else:
        # TruncatedSVD reports the (ddof=0) variance of each projection and of every feature.
        proj_var = np.einsum("ij,jk,ik->i", components, gram_m, components) - (components @ mean) ** 2
        feat_var = float(np.trace(gram_m) - mean @ mean)
        variance = proj_var
        ratio = proj_var / feat_var if feat_var else np.zeros(n_comps)
        offset = np.zeros(n_comps)
    return {
        "lut": lut,
        "components": components,
        "variance": variance,
        "variance_ratio": ratio,
        "offset": offset,
        "mean": mean,
        "kept": kept,
    }


def pca(
    data: Any,
    n_comps: int | None = None,
    *,
    layer: str | None = None,
    zero_center: bool = True,
    svd_solver: str | None = None,
    chunked: bool = False,
    chunk_size: int | None = None,
    random_state: Any = 0,
    return_info: bool = False,
    mask_var: Any = _empty,
    use_highly_variable: bool | None = None,
    dtype: Any = "float32",
    key_added: str | None = None,
    copy: bool = False,
) -> Any:
    """``scanpy.pp.pca`` with one streaming pass for the covariance (or Gram) matrix.

    Same parameters and results as scanpy on an in-memory matrix (components
    up to sign, with scikit-learn's sign convention; ``variance`` with
    ``n - 1``).  On a dask matrix: one blockwise pass accumulates the Gram
    matrix and column sums of the selected genes (the variable genes when
    ``var['highly_variable']`` exists), an eigendecomposition gives the
    components exactly (``svd_solver``, ``chunked`` and ``random_state`` have
    nothing to choose), and ``obsm['X_pca']`` is a lazy dask array (blockwise
    sparse-dense products).  ``zero_center=False`` gives scikit-learn's
    ``TruncatedSVD`` result, also on sparse blocks.
    """
    import anndata as ad

    is_adata = isinstance(data, ad.AnnData)
    x = get_rep(data, layer) if is_adata else data
    if not is_dask(x):
        return scanpy_pp().pca(
            data,
            n_comps,
            layer=layer,
            zero_center=zero_center,
            svd_solver=svd_solver,
            chunked=chunked,
            chunk_size=chunk_size,
            random_state=random_state,
            return_info=return_info,
            **({} if mask_var is _empty else {"mask_var": mask_var}),
            use_highly_variable=use_highly_variable,
            dtype=dtype,
            key_added=key_added,
            copy=copy,
        )
    if is_adata:
        adata = data.copy() if copy else data
        x = get_rep(adata, layer)
        mask_param, mask = _mask_var(adata, mask_var, use_highly_variable)
    else:
        adata, mask_param, mask = None, None, None
        if mask_var is not _empty and mask_var is not None:
            mask = np.asarray(mask_var, dtype=bool)
    n_sel = x.shape[1] if mask is None else int(mask.sum())
    if n_comps is None:
        min_dim = min(n_sel, x.shape[0])
        n_comps = min_dim - 1 if min_dim <= 50 else 50
    if not 0 < n_comps <= n_sel:
        raise ValueError(f"n_comps={n_comps} must be between 1 and the {n_sel} selected variables")
    fit = fit_pca(x, mask, n_comps, zero_center)
    if fit["kept"] is not None:
        x_pca = project_kept(fit["kept"], fit["components"], fit["offset"], dtype, token=x.name)
    else:
        x_pca = project(x, fit["lut"], fit["components"], fit["offset"], dtype)
    if not is_adata:
        if return_info:
            return x_pca, fit["components"], fit["variance_ratio"], fit["variance"]
        return x_pca
    key_obsm, key_varm, key_uns = ("X_pca", "PCs", "pca") if key_added is None else (key_added,) * 3
    adata.obsm[key_obsm] = x_pca
    if mask is not None:
        loadings = np.zeros((adata.n_vars, n_comps))
        loadings[mask] = fit["components"].T
    else:
        loadings = fit["components"].T
    adata.varm[key_varm] = loadings
    params: dict[str, Any] = {
        "zero_center": zero_center,
        "use_highly_variable": mask_param == "highly_variable",
        "mask_var": mask_param,
    }
    if layer is not None:
        params["layer"] = layer
    adata.uns[key_uns] = {
        "params": params,
        "variance": fit["variance"],
        "variance_ratio": fit["variance_ratio"],
    }
    return adata if copy else None
