"""The fused passes of ``dask_loom.pp``: per-row transform tables and the selection PCA keeps for ``X_pca``.

References: numpy on the same values (the transforms applied step by step,
as the lazy graph would), scanpy in memory for the recipe, and the two-pass
projection that reads the matrix again.
"""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp

import dask_loom

pytest.importorskip("numba")
anndata = pytest.importorskip("anndata")
sc = pytest.importorskip("scanpy")

from dask_loom.pp import _kernels as K  # noqa: E402  (after the skips: numba compiles it)
from dask_loom.pp import _pca  # noqa: E402


def _block(seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts with small whole numbers (the per-row table), large ones, fractions and stored zeros."""
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(1, 0.2, size=(40, 300)).astype(np.float32)
    x[rng.random(x.shape) < 0.5] = 0
    x[::7, ::11] = rng.integers(64, 500, size=x[::7, ::11].shape)  # past the table
    x[::5, 3::13] = rng.random(x[::5, 3::13].shape).astype(np.float32) * 9  # not whole
    m = sp.csr_matrix(x)
    m.data[::97] = 0  # explicit zeros count as stored, not as non-zero
    factors = rng.uniform(0.2, 5.0, size=x.shape[0])
    factors[3] = 0  # a zero factor leaves its row as is
    return m, factors


@pytest.mark.parametrize(
    "pending",
    [
        K.Pending(scale=True, log1p=True),
        K.Pending(scale=True, log1p=True, log_base=2.0),
        K.Pending(log1p=True),
        K.Pending(scale=True, log1p=True, expm1=True, expm1_scale=0.5),
    ],
    ids=["scale-log1p", "scale-log2", "log1p", "scale-log1p-expm1"],
)
def test_fused_stats_and_selection_equal_the_step_by_step_values(pending):
    m, factors = _block()
    want_block = pending.apply(m, factors)  # numpy/scipy, step by step
    v = want_block.toarray().astype(np.float64)
    stored = m.toarray() != 0
    groups = np.arange(m.shape[0]) % 3
    got = K.block_stats(m, groups=groups, n_groups=3, pending=pending, factors=factors)
    for g in range(3):
        rows = v[groups == g]
        np.testing.assert_allclose(got[0, g], rows.sum(axis=0), rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(got[1, g], (rows * rows).sum(axis=0), rtol=2e-6, atol=1e-6)
        np.testing.assert_array_equal(got[2, g], (rows != 0).sum(axis=0))
    assert stored.any()
    lut = np.full(m.shape[1], -1, dtype=np.int64)
    cols = np.arange(5, m.shape[1], 4)
    lut[cols] = np.arange(len(cols))
    sel = K.select_block(m, lut, len(cols), pending=pending, factors=factors)
    rebuilt = sp.csr_matrix((sel.cv, sel.ck, sel.rp), shape=(m.shape[0], len(cols))).toarray()
    np.testing.assert_allclose(rebuilt, v[:, cols], rtol=2e-6, atol=1e-7)
    assert sel.cv.dtype == np.float32 and sel.ck.dtype == np.int16


def _long_and_short_rows(dtype) -> tuple[sp.csr_matrix, np.ndarray]:
    """Rows of ~600 stored values (the table filled up front) and of ~60 (filled as met), every kind of value."""
    rng = np.random.default_rng(11)
    x = rng.negative_binomial(1, 0.15, size=(30, 1200)).astype(dtype)
    keep = rng.random(x.shape) < np.where(np.arange(30) < 15, 0.5, 0.05)[:, None]
    x[~keep] = 0
    x[::4, ::9] = rng.integers(64, 900, size=x[::4, ::9].shape)  # past the table
    x[1::6, 5::17] = rng.random(x[1::6, 5::17].shape) * 7  # not whole
    m = sp.csr_matrix(x)
    m.data[::53] = 0  # stored zeros: stored, not non-zero
    assert np.diff(m.indptr)[:15].min() >= 256 > np.diff(m.indptr)[15:].max()
    factors = rng.uniform(0.3, 4.0, size=x.shape[0])
    factors[20] = 0
    return m, factors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clipped", [False, True], ids=["", "clip"])
@pytest.mark.parametrize(
    "pending",
    [
        None,
        K.Pending(scale=True),
        K.Pending(scale=True, log1p=True, expm1=True),  # Seurat's round trip: the scaling alone
        K.Pending(scale=True, log1p=True),
        K.Pending(log1p=True, log_base=2.0),
        K.Pending(scale=True, log1p=True, expm1=True, expm1_scale=0.5),
    ],
    ids=["none", "scale", "seurat", "scale-log1p", "log2", "scale-log1p-expm1"],
)
def test_block_stats_every_loop_equals_numpy(pending, clipped, dtype):
    m, factors = _long_and_short_rows(dtype)
    groups = np.arange(m.shape[0]) % 4 - 1  # group -1: left out
    clip = np.random.default_rng(2).uniform(0.5, 6.0, size=(3, m.shape[1])) if clipped else None
    got = K.block_stats(
        m, groups=groups, n_groups=3, clip=clip, pending=pending, factors=factors if pending else None
    )
    with dask.config.set({"dask_loom.kernels": "numpy"}):
        ref = K.block_stats(
            m, groups=groups, n_groups=3, clip=clip, pending=pending, factors=factors if pending else None
        )
    v = (m if pending is None else pending.apply(m, factors)).toarray().astype(np.float64)
    for g in range(3):
        rows = v[groups == g]
        nz = rows != 0
        if clipped:
            rows = np.minimum(rows, clip[g][None, :])
        np.testing.assert_allclose(got[0, g], rows.sum(axis=0), rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(got[1, g], (rows * rows).sum(axis=0), rtol=2e-6, atol=1e-6)
        np.testing.assert_array_equal(got[2, g], nz.sum(axis=0))
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6)  # the numpy kernels, step by step
    assert got[2].sum() < m.nnz  # stored zeros and the left-out group are not counted


def _counts(n_cells: int, n_genes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.4, 3.0, size=n_genes)[None, :]
    return rng.negative_binomial(2, 2 / (2 + mu), size=(n_cells, n_genes)).astype("float32")


@pytest.fixture(scope="module")
def counts_h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("pp") / "c.h5ad"
    x = sp.csr_matrix(_counts(600, 400, 3))
    anndata.AnnData(x).write_h5ad(path)
    return path


def _to_pca(path, monkeypatch, keep: bool):
    if not keep:
        monkeypatch.setattr(_pca, "KEEP_MEMORY_FRACTION", 0.0)
    with dask.config.set({"dask_loom.block-size": "32KiB"}):
        a = dask_loom.MappedCollection([str(path)]).to_anndata()
        assert a.X.numblocks[0] > 3
        dask_loom.pp.normalize_total(a, target_sum=1e4)
        dask_loom.pp.log1p(a)
        dask_loom.pp.highly_variable_genes(a, n_top_genes=60, flavor="seurat")
        dask_loom.pp.pca(a, n_comps=12)
    monkeypatch.undo()
    return a


def test_pca_projects_the_kept_selection_without_reading_again(counts_h5ad, monkeypatch):
    kept = _to_pca(counts_h5ad, monkeypatch, keep=True)
    again = _to_pca(counts_h5ad, monkeypatch, keep=False)
    xk, xa = kept.obsm["X_pca"], again.obsm["X_pca"]
    assert isinstance(xk, da.Array) and xk.chunks == xa.chunks
    # The kept path's graph is the projection alone; the other reads the file again.
    assert all(str(k[0]).startswith("pp-project-") for k in dict(xk.__dask_graph__()))
    assert any(str(k[0]).startswith("mapped-read") for k in dict(xa.__dask_graph__()))
    np.testing.assert_array_equal(xk.compute(), xa.compute())
    # And both are scanpy's result in memory (components up to sign).
    want = anndata.read_h5ad(counts_h5ad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(want, target_sum=1e4)
        sc.pp.log1p(want)
        sc.pp.highly_variable_genes(want, n_top_genes=60, flavor="seurat")
        sc.pp.pca(want, n_comps=12)
    np.testing.assert_array_equal(kept.var["highly_variable"], want.var["highly_variable"])
    np.testing.assert_allclose(
        kept.uns["pca"]["variance_ratio"], want.uns["pca"]["variance_ratio"], atol=1e-4
    )
    g, w = np.asarray(xk.compute(), dtype=float), np.asarray(want.obsm["X_pca"], dtype=float)
    signs = np.sign(np.sum(g * w, axis=0))
    np.testing.assert_allclose(g * signs, w, rtol=1e-3, atol=1e-3 * np.abs(w).max())


@pytest.mark.parametrize("bad", [-1, 400, 2**31 - 1])
def test_csr_indices_out_of_range_are_refused(counts_h5ad, tmp_path, bad):
    """Indices are checked in one pass (as unsigned, a negative one is huge): before any kernel trusts them."""
    import shutil

    import h5py

    from dask_loom.errors import CorruptChunkError

    path = tmp_path / "bad.h5ad"
    shutil.copy(counts_h5ad, path)
    with h5py.File(path, "r+") as f:
        idx = f["X/indices"]
        idx[idx.shape[0] // 2] = bad
    x = dask_loom.MappedCollection([str(path)]).to_dask(sparse=True)
    with pytest.raises(CorruptChunkError, match="outside 0..399"):
        x.compute(scheduler="sync")
    # The same file with the index put back is read.
    with h5py.File(path, "r+") as f:
        f["X/indices"][f["X/indices"].shape[0] // 2] = 0
    assert dask_loom.MappedCollection([str(path)]).to_dask(sparse=True).compute(scheduler="sync").shape == (
        600,
        400,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_of_the_selected_values_is_numpy_s(dtype):
    """The Gram kernel (dense columns by BLAS, the rest by stored values) against numpy in float64.

    Two blocks, each with columns on both sides of the dense threshold (float32
    data are summed in float32 within a block), added as the pass's tree does.
    """
    from dask_loom.pp import _graph

    pending = K.Pending(scale=True, log1p=True)
    rng = np.random.default_rng(7)
    blocks, want, sums = [], 0.0, 0.0
    for seed in (1, 2):
        m, factors = _block(seed)
        m = m.astype(dtype)
        x = m.toarray()
        x[:, 5:60:3] = 0
        x[:, 100:][rng.random((x.shape[0], x.shape[1] - 100)) < 0.85] = (
            0  # columns in few rows: the sparse side
        )
        x[:, 200:] *= rng.random((x.shape[0], 1)) < 0.08
        m = sp.csr_matrix(x)
        cols = np.arange(2, m.shape[1], 3)
        lut = np.full(m.shape[1], -1, dtype=np.int64)
        lut[cols] = np.arange(len(cols))
        detected = (x[:, cols] != 0).mean(axis=0)
        assert (detected >= K.DENSE_FRACTION).any() and ((detected > 0) & (detected < K.DENSE_FRACTION)).any()
        part = K.gram_block(m, lut, len(cols), pending=pending, factors=factors)
        assert part.dtype == np.float64
        blocks.append(part)
        v = pending.apply(m, factors).toarray().astype(np.float64)[:, cols]
        want, sums = want + v.T @ v, sums + v.sum(axis=0)
    got = K.symmetric(_graph._add_into_first(blocks))
    n = len(cols)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got[:n], want, rtol=rtol, atol=rtol * np.abs(want).max())
    np.testing.assert_allclose(got[n], sums, rtol=rtol)


@pytest.mark.parametrize("sparse", [True, False])
def test_pca_of_a_matrix_in_column_blocks_is_scanpy_s(sparse):
    """Blocks split along the columns too: each task joins its row of blocks (sparse or dense) itself."""
    x = _counts(300, 120, 5)
    x = np.log1p(x)
    mask = np.zeros(x.shape[1], dtype=bool)
    mask[::2] = True
    src = sp.csr_matrix(x) if sparse else x
    lazy = da.from_array(src, chunks=(70, 45), asarray=False)
    assert lazy.numblocks[1] > 1
    got = anndata.AnnData(lazy)
    got.var["highly_variable"] = mask
    want = anndata.AnnData(sp.csr_matrix(x))
    want.var["highly_variable"] = mask
    dask_loom.pp.pca(got, n_comps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.pca(want, n_comps=10)
    np.testing.assert_allclose(got.uns["pca"]["variance_ratio"], want.uns["pca"]["variance_ratio"], atol=1e-5)
    g, w = np.asarray(got.obsm["X_pca"].compute(), dtype=float), np.asarray(want.obsm["X_pca"], dtype=float)
    signs = np.sign(np.sum(g * w, axis=0))
    np.testing.assert_allclose(g * signs, w, rtol=1e-3, atol=1e-3 * np.abs(w).max())
