"""Realistic synthetic single-cell counts, for the demo and the benchmarks."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["h5ad_to_anndata_zarr", "synthetic_counts", "synthetic_csr_blocks", "write_synthetic_h5ad", "write_synthetic_loom"]


def synthetic_counts(n_genes: int, n_cells: int, *, seed: int = 0, n_clusters: int = 20, density: float = 0.1) -> dict[str, Any]:
    """Negative-binomial counts with about ``1 - density`` zeros, cluster-specific means.

    Returns a dict with ``matrix`` (float32 genes x cells), ``row_attrs`` and
    ``col_attrs`` (Gene, Accession; CellID, Clusters, ClusterName).
    """
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, n_clusters, size=n_cells)
    gene_scale = rng.gamma(0.6, 2.0, size=n_genes).astype(np.float32)
    cluster_scale = rng.gamma(4.0, 0.25, size=(n_genes, n_clusters)).astype(np.float32)
    m = np.empty((n_genes, n_cells), dtype=np.float32)
    step = max(1, 2**24 // max(1, n_cells))
    for r0 in range(0, n_genes, step):
        r1 = min(n_genes, r0 + step)
        mean = gene_scale[r0:r1, None] * cluster_scale[r0:r1][:, clusters]
        counts = rng.poisson(rng.gamma(2.0, mean / 2.0)).astype(np.float32)
        counts *= rng.random(counts.shape, dtype=np.float32) < density * 2.0
        m[r0:r1] = counts
    return {
        "matrix": m,
        "row_attrs": {
            "Gene": np.array([f"Gene{i}" for i in range(n_genes)]),
            "Accession": np.array([f"ENSG{i:011d}" for i in range(n_genes)]),
        },
        "col_attrs": {
            "CellID": np.array([f"cell{i:07d}" for i in range(n_cells)]),
            "Clusters": clusters.astype(np.int64),
            "ClusterName": np.array([f"type{c}" for c in clusters]),
        },
    }


def write_synthetic_loom(path: str | os.PathLike[str], n_genes: int, n_cells: int, *, seed: int = 0, writer: str = "dask_loom") -> str:
    """Write a synthetic Loom file with ``dask_loom.create`` (or ``loompy.create``)."""
    data = synthetic_counts(n_genes, n_cells, seed=seed)
    if writer == "loompy":
        import loompy

        loompy.create(os.fspath(path), data["matrix"], data["row_attrs"], data["col_attrs"])
    else:
        from dask_loom.loom import create

        create(path, data["matrix"], data["row_attrs"], data["col_attrs"])
    return os.fspath(path)


def synthetic_csr_blocks(
    n_cells: int,
    n_genes: int,
    *,
    density: float = 0.072,
    seed: int = 0,
    block_rows: int = 8192,
    n_clusters: int = 12,
) -> Any:
    """Yield ``(csr_block, cluster_labels)`` of negative-binomial counts, cells x genes, block by block.

    Shaped like 10x data: gene detection rates spread over orders of magnitude
    (log-normal, about *density* non-zeros overall), cluster-specific gene
    modules (detected 3x more often and 3x higher there, so variable genes and
    PCA have structure), per-cell depth factors, and non-zero counts
    ``1 + NB(2, mean)``.  Memory is one block; the same seed gives the same data.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    logp = rng.normal(0.0, 1.4, size=n_genes)
    p = np.exp(logp)
    # Repeated draws of one cell merge and the clip below trims: aim a little above *density*.
    p *= 1.16 * density / p.mean()
    modules = rng.random((n_clusters, n_genes)) < 0.04
    lift = np.where(modules, 3.0, 1.0)
    p_k = np.clip(p[None, :] * lift, 0.0, 0.95)
    p_k *= 1.16 * density / p_k.mean()  # keep the overall density after lifting
    p_k = np.clip(p_k, 0.0, 0.95)
    mu_k = (0.5 + 8.0 * p[None, :] / p.max()) * lift
    for start in range(0, n_cells, block_rows):
        b = min(block_rows, n_cells - start)
        brng = np.random.default_rng([seed, start])
        labels = brng.integers(0, n_clusters, size=b)
        depth = np.exp(brng.normal(0.0, 0.3, size=b))
        rows_l, cols_l, vals_l = [], [], []
        for k in range(n_clusters):
            idx = np.flatnonzero(labels == k)
            if not len(idx):
                continue
            per_gene = brng.binomial(len(idx), p_k[k])
            genes = np.repeat(np.arange(n_genes, dtype=np.int32), per_gene)
            cells = idx[brng.integers(0, len(idx), size=len(genes))]
            mean = (mu_k[k, genes] * depth[cells]).astype(np.float32)
            # NB(2, q) as the sum of two geometric draws by inversion (numpy's samplers are 10x slower).
            log_fail = np.log1p(-(np.float32(2.0) / (np.float32(2.0) + mean)))
            u = brng.random((2, len(genes)), dtype=np.float32)
            np.maximum(u, np.float32(1e-30), out=u)
            vals = 1 + np.floor(np.log(u[0]) / log_fail) + np.floor(np.log(u[1]) / log_fail)
            rows_l.append(cells)
            cols_l.append(genes)
            vals_l.append(vals.astype(np.float32))
        rows = np.concatenate(rows_l)
        cols = np.concatenate(cols_l)
        vals = np.concatenate(vals_l)
        m = sp.coo_matrix((vals, (rows, cols)), shape=(b, n_genes)).tocsr()
        m.sum_duplicates()
        yield m, labels


def _anndata_frames(n_cells: int, n_genes: int, labels: np.ndarray) -> tuple[Any, Any]:
    import pandas as pd

    obs = pd.DataFrame(
        {"cluster": pd.Categorical.from_codes(labels, categories=[f"c{k}" for k in range(int(labels.max()) + 1)])},
        index=[f"cell{i:07d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"Gene{i:05d}" for i in range(n_genes)])
    return obs, var


def write_synthetic_h5ad(
    path: str | os.PathLike[str], n_cells: int, n_genes: int, *, density: float = 0.072, seed: int = 0, chunk: int = 262_144
) -> str:
    """Stream :func:`synthetic_csr_blocks` into an h5ad file (CSR ``X``, uncompressed as anndata writes it)."""
    import anndata as ad
    import h5py

    path = os.fspath(path)
    labels_all = []
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([n_cells, n_genes])
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype="f4", chunks=(chunk,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="i4", chunks=(chunk,))
        indptr = [np.zeros(1, dtype=np.int64)]
        nnz = 0
        for m, labels in synthetic_csr_blocks(n_cells, n_genes, density=density, seed=seed):
            n = m.nnz
            data.resize((nnz + n,))
            indices.resize((nnz + n,))
            data[nnz:] = m.data
            indices[nnz:] = m.indices
            indptr.append(m.indptr[1:].astype(np.int64) + nnz)
            nnz += n
            labels_all.append(labels)
        g.create_dataset("indptr", data=np.concatenate(indptr))
        obs, var = _anndata_frames(n_cells, n_genes, np.concatenate(labels_all))
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(f, key, {})
    return path


def h5ad_to_anndata_zarr(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, chunk: int = 1_048_576) -> str:
    """Copy an h5ad written by :func:`write_synthetic_h5ad` to an AnnData Zarr store (v2, blosc-lz4 as anndata writes), streaming."""
    import anndata as ad
    import h5py
    import zarr
    from numcodecs import Blosc

    dst = os.fspath(dst)
    comp = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
    with h5py.File(src, "r") as f:
        root = zarr.open_group(dst, mode="w", zarr_format=2)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = root.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [int(s) for s in f["X"].attrs["shape"]]})
        for name in ("data", "indices", "indptr"):
            d = f["X"][name]
            z = x.create_array(name, shape=d.shape, dtype=d.dtype, chunks=(min(chunk, max(1, d.shape[0])),), compressors=comp)
            for a in range(0, d.shape[0], chunk * 8):
                z[a : a + chunk * 8] = d[a : a + chunk * 8]
        for key in ("obs", "var"):
            ad.io.write_elem(root, key, ad.io.read_elem(f[key]))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(root, key, {})
    return dst
