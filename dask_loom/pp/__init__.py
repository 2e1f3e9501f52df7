"""The single-cell recipe out of core: scanpy's ``pp`` functions, streaming over dask matrices.

Same signatures and results as scanpy on an in-memory matrix; on an AnnData
whose matrix is a dask array (``dask_loom.read_loom``, ``to_anndata``, or
anndata's own lazy readers) each runs as few blockwise passes as it can, on
sparse blocks, holding nothing but small partial sums:

* :func:`normalize_total` — one pass for the counts per cell, the scaling lazy;
* :func:`log1p` — lazy;
* :func:`highly_variable_genes` — one fused pass (two for Seurat v3);
* :func:`pca` — one pass for the Gram matrix, ``X_pca`` lazy;
* :func:`rank_genes_groups` — one grouped pass (t-tests).

In-memory matrices are handed to scanpy.  ``docs/analysis.md`` says which
scanpy call each replaces and why.
"""

from dask_loom.pp._hvg import highly_variable_genes
from dask_loom.pp._normalize import log1p, normalize_total
from dask_loom.pp._pca import pca
from dask_loom.pp._rank import group_stats, rank_genes_groups

__all__ = ["group_stats", "highly_variable_genes", "log1p", "normalize_total", "pca", "rank_genes_groups"]
