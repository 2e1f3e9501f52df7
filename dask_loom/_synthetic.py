"""Realistic synthetic single-cell counts, for the demo and the benchmarks."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["synthetic_counts", "write_synthetic_loom"]


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
