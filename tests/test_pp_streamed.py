"""The per-gene statistics pass reading a collection's files piece by piece.

``column_stats`` on a collection's matrix reads every block's rows in pieces
of about ``PIECE_BYTES`` (uncompressed h5ad: into two reused buffers) and sums
each piece as it arrives.  References: numpy on the joined matrix as
``MappedCollection`` reads it whole, the block-at-a-time pass it replaces,
and scanpy's highly-variable genes in memory.
"""

from __future__ import annotations

import itertools

import dask
import numpy as np
import pytest
import scipy.sparse as sp

import dask_loom

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")
pytest.importorskip("numba")

from dask_loom.pp import _graph as G  # noqa: E402
from dask_loom.pp import _kernels as K  # noqa: E402


def _write(path, x, genes, *, fmt, compression=None):
    a = anndata.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=genes))
    a.obs_names = [f"{path.stem}-{i}" for i in range(x.shape[0])]
    if fmt == "h5ad":
        a.write_h5ad(path, compression=compression)
    else:
        a.write_zarr(path)
    return str(path)


def _files(tmp_path, fmt, dtype, *, compression=None):
    rng = np.random.default_rng(11)
    genes = [f"g{i}" for i in range(90)]
    x0 = (rng.negative_binomial(2, 0.3, size=(157, 90)) * (rng.random((157, 90)) < 0.3)).astype(dtype)
    x1 = (rng.negative_binomial(2, 0.3, size=(211, 60)) * (rng.random((211, 60)) < 0.3)).astype(dtype)
    x0[5] = 0  # an empty row
    x1[7:40] = 0  # empty rows spanning a piece
    suffix = ".h5ad" if fmt == "h5ad" else ".zarr"
    a = _write(tmp_path / f"a{suffix}", x0, genes, fmt=fmt, compression=compression)
    b = _write(tmp_path / f"b{suffix}", x1, genes[30:], fmt=fmt, compression=compression)
    return [a, b]


def _numpy_stats(dense, groups, n_groups, clip=None):
    out = np.zeros((3, n_groups, dense.shape[1]))
    for g in range(n_groups):
        v = dense[groups == g].astype(np.float64)
        out[2, g] = (v != 0).sum(axis=0)
        if clip is not None:
            v = np.minimum(v, clip[g][None, :])
        out[0, g] = v.sum(axis=0)
        out[1, g] = (v * v).sum(axis=0)
    return out


def _collection(tmp_path, fmt, dtype, join, *, compression=None):
    paths = _files(tmp_path, fmt, dtype, compression=compression)
    with dask.config.set({"dask_loom.block-size": "16KiB"}):
        mc = dask_loom.MappedCollection(paths if join else paths[:1], join=join, obs_filter=None)
        return mc.to_dask(sparse=True)


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [("h5ad", None), ("h5ad", "gzip"), ("zarr", None)],
    ids=["h5ad", "h5ad-gzip", "zarr"],
)
@pytest.mark.parametrize("dtype", ["float32", "int32"])
@pytest.mark.parametrize("join", [None, "outer", "inner"])
def test_streamed_stats_equal_numpy(tmp_path, monkeypatch, fmt, compression, dtype, join):
    x = _collection(tmp_path, fmt, dtype, join, compression=compression)
    assert x.numblocks[0] > 2
    dense = x.compute(scheduler="sync").toarray()
    rng = np.random.default_rng(3)
    groups = rng.integers(-1, 3, size=x.shape[0])  # -1: left out
    clip = rng.uniform(0.5, 6.0, size=(3, x.shape[1]))
    # Pieces of a few rows: many per block, and the two reused buffers overwritten between them.
    monkeypatch.setattr(G, "PIECE_BYTES", 200)
    lazy = G.column_stats(x, groups=groups, n_groups=3, clip=clip)
    assert any(k.startswith("pp-stats-") for k in lazy.dask.layers)
    assert G._streamed_stats(x, groups, 3, clip, None, None) is not None
    (got,) = G.compute(lazy, scheduler="threads")
    np.testing.assert_allclose(got, _numpy_stats(dense, groups, 3, clip), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("piece_bytes", [1, 64, 500, 1 << 20])
@pytest.mark.parametrize("join", [None, "outer", "inner"])
def test_pieces_join_up_to_the_block(tmp_path, piece_bytes, join):
    x = _collection(tmp_path, "h5ad", "float32", join)
    plans = getattr(x, dask_loom.anndata._dask.ROW_VALUES)
    for (plan, rows), n in zip(plans, x.chunks[0]):
        whole = plan.read(rows, sparse=True)
        got = [
            (lo, hi, d.copy(), i.copy(), p.copy())
            for lo, hi, d, i, p in plan.iter_parts(rows, piece_bytes=piece_bytes)
        ]
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(got))
        if piece_bytes == 1:
            # Whole rows, at least one: then a piece holds one row with entries (and empty ones).
            assert all(np.count_nonzero(np.diff(p)) <= 1 for *_, p in got)
            assert len(got) >= np.count_nonzero(np.diff(whole.indptr))
        pieces = sp.vstack(
            [sp.csr_matrix((d, i, p), shape=(hi - lo, x.shape[1])) for lo, hi, d, i, p in got]
        ).toarray()
        np.testing.assert_array_equal(pieces, whole.toarray())


def test_compressed_and_zarr_files_are_one_piece(tmp_path):
    for fmt, compression in [("h5ad", "gzip"), ("zarr", None)]:
        sub = tmp_path / f"{fmt}-{compression}"
        sub.mkdir()
        x = _collection(sub, fmt, "float32", None, compression=compression)
        plan, rows = getattr(x, dask_loom.anndata._dask.ROW_VALUES)[0]
        assert len(list(plan.iter_parts(rows, piece_bytes=8))) == 1


def test_not_streamed_where_the_record_does_not_hold(tmp_path):
    x = _collection(tmp_path, "h5ad", "float32", None)
    assert G._streamed_stats(x[3:], None, 1, None, None, None) is None  # a derived array
    assert G._streamed_stats(x.rechunk((x.chunks[0], 30)), None, 1, None, None, None) is None
    (got,) = G.compute(G.column_stats(x[3:]), scheduler="sync")
    np.testing.assert_allclose(
        got, _numpy_stats(x[3:].compute().toarray(), np.zeros(x.shape[0] - 3), 1), rtol=1e-12
    )


def test_fused_transforms_streamed_equal_the_block_pass(tmp_path, monkeypatch):
    """normalize_total then log1p, owed by the pass: the same sums as the block-at-a-time kernel."""
    x = _collection(tmp_path, "h5ad", "float32", "outer")
    counts = np.asarray(x.compute().sum(axis=1)).ravel()
    factors = counts / np.median(counts[counts > 0])
    pending = K.Pending(scale=True, log1p=True)
    monkeypatch.setattr(G, "PIECE_BYTES", 300)
    parts = G._streamed_stats(x, None, 1, None, pending, factors)
    assert parts is not None
    (got,) = G.compute(parts.sum(axis=0), scheduler="sync")
    block = x.compute()
    want = K.block_stats(block, pending=pending, factors=factors)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    ref = np.log1p(
        block.toarray().astype(np.float32) / np.where(factors == 0, 1, factors)[:, None].astype(np.float32)
    )
    np.testing.assert_allclose(got[0, 0], ref.astype(np.float64).sum(axis=0), rtol=1e-5)


def test_hvg_on_a_streamed_collection_equals_scanpy(tmp_path, monkeypatch):
    sc = pytest.importorskip("scanpy")
    paths = _files(tmp_path, "h5ad", "float32")
    monkeypatch.setattr(G, "PIECE_BYTES", 400)
    with dask.config.set({"dask_loom.block-size": "16KiB"}):
        a = dask_loom.MappedCollection(paths, join="outer").to_anndata()
    dask_loom.pp.normalize_total(a)
    dask_loom.pp.log1p(a)
    dask_loom.pp.highly_variable_genes(a, n_top_genes=20, flavor="seurat")
    ref = anndata.concat([anndata.read_h5ad(p) for p in paths], join="outer")
    ref.X = ref.X.astype(np.float32)
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=20, flavor="seurat")
    np.testing.assert_allclose(a.var["means"].to_numpy(), ref.var["means"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(a.var["dispersions"].to_numpy(), ref.var["dispersions"].to_numpy(), rtol=1e-4)
    assert list(a.var_names[a.var.highly_variable]) == list(ref.var_names[ref.var.highly_variable])


@pytest.mark.cluster
def test_streamed_stats_on_process_workers(tmp_path, local_cluster):
    x = _collection(tmp_path, "h5ad", "int32", "outer")
    got = local_cluster.compute(G.column_stats(x)).result()
    np.testing.assert_allclose(got, _numpy_stats(x.compute().toarray(), np.zeros(x.shape[0]), 1), rtol=1e-12)


@pytest.mark.s3
def test_remote_h5ad_is_one_piece_per_block(tmp_path, s3_server):
    """On an object store each piece would wait for its own round trip: a block is read at once."""
    import uuid

    s3fs = pytest.importorskip("s3fs")
    (path,) = _files(tmp_path, "h5ad", "float32")[:1]
    opts = s3_server["storage_options"]
    prefix = f"{s3_server['bucket']}/{uuid.uuid4().hex}"
    s3fs.S3FileSystem(**opts).put(path, f"{prefix}/a.h5ad")
    with dask.config.set({"dask_loom.block-size": "16KiB"}):
        x = dask_loom.MappedCollection([f"s3://{prefix}/a.h5ad"], storage_options=opts).to_dask(sparse=True)
    plan, rows = getattr(x, dask_loom.anndata._dask.ROW_VALUES)[0]
    assert len(list(plan.iter_parts(rows, piece_bytes=8))) == 1
    (got,) = G.compute(G.column_stats(x), scheduler="threads")
    dense = anndata.read_h5ad(path).X.toarray()
    np.testing.assert_allclose(got, _numpy_stats(dense, np.zeros(len(dense), dtype=int), 1), rtol=1e-12)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "contiguous"])
def test_read_ahead_hint_names_the_blocks_bytes(tmp_path, monkeypatch, chunked):
    """The ranges the pass asks the OS to read ahead are exactly its rows' values and column indices."""
    import os

    import h5py

    from dask_loom.anndata import _read

    (path,) = _files(tmp_path, "h5ad", "float32")[:1]
    if not chunked:
        with h5py.File(path, "r+") as f:
            for name in ("data", "indices"):
                v = f[f"X/{name}"][:]
                del f[f"X/{name}"]
                f.create_dataset(f"X/{name}", data=v)  # contiguous
    advised = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, off, n, how: advised.append((off, n, how)), raising=False
    )
    with dask.config.set({"dask_loom.block-size": "16KiB"}):
        x = dask_loom.MappedCollection([path]).to_dask(sparse=True)
    plan, rows = getattr(x, dask_loom.anndata._dask.ROW_VALUES)[1]
    _read.will_need_csr(plan.store, plan.meta, rows)
    assert advised and all(how == os.POSIX_FADV_WILLNEED for *_, how in advised)
    raw = open(path, "rb").read()
    got = b"".join(raw[off : off + n] for off, n, _ in advised)
    with h5py.File(path, "r") as f:
        ip = f["X/indptr"][:]
        e0, e1 = ip[rows[0]], ip[rows[-1] + 1]
        want = f["X/data"][e0:e1].tobytes() + f["X/indices"][e0:e1].tobytes()
    assert got == want
