"""Counts per cell from a collection's values alone: ``normalize_total``'s pass reads no column indices.

References: numpy sums of the joined matrix as dask_loom reads it whole, and
scanpy's ``normalize_total`` in memory on the same files.
"""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest
import scipy.sparse as sp

import dask_loom

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

from dask_loom.anndata import _plan  # noqa: E402
from dask_loom.pp._graph import compute, row_sums_of  # noqa: E402


def _write(path, x, genes, *, fmt):
    a = anndata.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=genes))
    a.obs_names = [f"{path.stem}-{i}" for i in range(x.shape[0])]
    if fmt == "h5ad":
        a.write_h5ad(path)
    else:
        a.write_zarr(path)
    return path


def _files(tmp_path, fmt, dtype):
    rng = np.random.default_rng(7)
    genes = [f"g{i}" for i in range(90)]
    x0 = (rng.negative_binomial(1, 0.3, size=(157, 90)) * (rng.random((157, 90)) < 0.3)).astype(dtype)
    x1 = (rng.negative_binomial(1, 0.3, size=(211, 60)) * (rng.random((211, 60)) < 0.3)).astype(dtype)
    x0[5] = 0  # an empty row
    suffix = ".h5ad" if fmt == "h5ad" else ".zarr"
    a = _write(tmp_path / f"a{suffix}", x0, genes, fmt=fmt)
    b = _write(tmp_path / f"b{suffix}", x1, genes[30:], fmt=fmt)  # shares genes 30..89 with a
    return [str(a), str(b)]


def _no_indices(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the counts pass read column indices")

    monkeypatch.setattr(_plan, "read_csr_parts", refuse)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
@pytest.mark.parametrize("dtype", ["float32", "int32"])
@pytest.mark.parametrize("join", [None, "outer"])
def test_row_sums_read_values_only_and_equal_numpy(tmp_path, monkeypatch, fmt, dtype, join):
    paths = _files(tmp_path, fmt, dtype)
    if join is None:
        paths = paths[:1]
    with dask.config.set({"dask_loom.block-size": "4KiB"}):
        mc = dask_loom.MappedCollection(paths, join=join, obs_filter=None)
        x = mc.to_dask(sparse=True)
    assert x.numblocks[0] > 4
    want = x.compute(scheduler="sync").toarray().astype(np.float32).astype(np.float64).sum(axis=1)
    assert want.min() == 0 and want.max() > 0
    _no_indices(monkeypatch)
    (got,) = compute(row_sums_of(x, dtype=np.float32), scheduler="threads")
    np.testing.assert_array_equal(got, want)


def test_inner_join_dropping_columns_reads_whole_blocks(tmp_path):
    paths = _files(tmp_path, "h5ad", "float32")
    with dask.config.set({"dask_loom.block-size": "4KiB"}):
        x = dask_loom.MappedCollection(paths, join="inner").to_dask(sparse=True)
    assert x.shape[1] == 60
    want = x.compute(scheduler="sync").toarray().astype(np.float64).sum(axis=1)
    (got,) = compute(row_sums_of(x), scheduler="sync")
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # The first file keeps 60 of its 90 genes: its counts are of those only.
    whole = anndata.read_h5ad(paths[0]).X.toarray().astype(np.float64).sum(axis=1)
    assert (got[:157] < whole).any()


def test_a_derived_array_is_summed_from_its_blocks(tmp_path):
    """Anything computed from the collection's array (here a row subset) loses the values-only read."""
    paths = _files(tmp_path, "h5ad", "float32")
    x = dask_loom.MappedCollection(paths[:1]).to_dask(sparse=True)[10:100]
    (got,) = compute(row_sums_of(x), scheduler="sync")
    np.testing.assert_allclose(got, anndata.read_h5ad(paths[0]).X[10:100].toarray().sum(axis=1), rtol=1e-6)


@pytest.mark.cluster
def test_row_sums_on_process_workers(tmp_path, local_cluster):
    paths = _files(tmp_path, "zarr", "float32")
    with dask.config.set({"dask_loom.block-size": "4KiB"}):
        x = dask_loom.MappedCollection(paths, join="outer").to_dask(sparse=True)
    got = local_cluster.compute(row_sums_of(x)).result()
    want = x.compute(scheduler="sync").toarray().astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_data_shorter_than_indptr_is_a_clear_error_before_the_pass(tmp_path):
    import h5py

    from dask_loom.errors import AnnDataFormatError

    (path,) = _files(tmp_path, "h5ad", "float32")[:1]
    with h5py.File(path, "r+") as f:
        short = f["X/data"][:-5]
        del f["X/data"]
        f["X/data"] = short
    # Found where the matrix is planned, before any pass runs.
    with pytest.raises(AnnDataFormatError, match=r"a\.h5ad: X/indptr is not a valid CSR row pointer"):
        compute(row_sums_of(dask_loom.MappedCollection([path]).to_dask(sparse=True)), scheduler="sync")


@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_normalize_total_on_a_collection_equals_scanpy(tmp_path, dtype):
    sc = pytest.importorskip("scanpy")
    (path,) = _files(tmp_path, "h5ad", dtype)[:1]
    a = dask_loom.MappedCollection([path]).to_anndata()
    dask_loom.pp.normalize_total(a, key_added="f")
    want = anndata.read_h5ad(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(want, key_added="f")
    np.testing.assert_array_equal(np.asarray(a.obs["f"]), np.asarray(want.obs["f"]))
    np.testing.assert_array_equal(a.X.compute(scheduler="sync").toarray(), want.X.toarray())
