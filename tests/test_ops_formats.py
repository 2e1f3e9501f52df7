"""dask_loom.map / aggregate / scan / permute on every format, against numpy on the same data.

Each kind of object the operations accept is built from files written by the
format's own writer (loompy, zarr-python, anndata, the OME-Arrow dataset
writer) and compared with numpy on the data read back by that writer's
reader (or by numpy from the array that was written): Loom (HDF5 and
.loom.zarr), Zarr v2/v3/sharded arrays (2-D and 3-D), MappedCollections over
h5ad and AnnData-zarr with dense, CSR and CSC files, TensorView and
LazyTensorView (5-D), a dask array built by from_source, and plain dask
arrays (dense and of CSR blocks).  Pseudobulk is also checked against
scanpy.get.aggregate; hypothesis drives map and aggregate over random
shapes, chunkings and labels; bad input must raise a typed error naming the
source before any task runs.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from dask.callbacks import Callback
from dask.utils import key_split
from hypothesis import given
from hypothesis import strategies as st

import dask_loom
from dask_loom.errors import OperationError, ReadOnlyError, UnsupportedDtypeError, UnsupportedSourceError

MAP_FUNCS = [np.sum, np.mean, np.std, np.var, np.min, np.max, np.count_nonzero, np.nanmean, np.nanmax, np.nanstd]
GROUP_FUNCS = ["sum", "mean", "var", "std", "min", "max", "count_nonzero"]
SMALL_BLOCKS = {"dask_loom.block-size": 4096}  # several blocks (and combine levels) on small data


def _np_group(f: str, x: np.ndarray, axis: int) -> np.ndarray:
    return getattr(np, f)(x, axis=axis)


def group_ref(x: np.ndarray, labels: np.ndarray, axis: int, f: str, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """numpy's answer: *axis* replaced by the sorted distinct labels (entries with ``keep`` False left out)."""
    if keep is not None:
        x, labels = np.compress(keep, x, axis=axis), labels[keep]
    cats = np.unique(labels)
    return np.stack([_np_group(f, np.compress(labels == c, x, axis=axis), axis) for c in cats], axis=axis), cats


# -- the files ------------------------------------------------------------------------------


def _data(shape: tuple[int, ...], seed: int, dtype: str = "float32", density: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.negative_binomial(2, 0.3, size=shape) * (rng.random(shape) < density)
    return (m + rng.random(shape) * (m > 0)).astype(dtype)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import anndata as ad
    import loompy
    import pandas as pd
    import zarr

    warnings.simplefilter("ignore")
    root = tmp_path_factory.mktemp("opsfmt")
    out: dict[str, Any] = {}
    rng = np.random.default_rng(7)

    m = _data((70, 95), 1)
    loompy.create(str(root / "a.loom"), m, {"Gene": np.arange(70)}, {"Cell": np.arange(95), "Clusters": np.arange(95) % 4})
    # Sharded (the default): shards of 2 x 2 inner chunks under the small block size, so the
    # layer still has several stored units on this small matrix (a coalesce-bytes this small never
    # grows them, test_shard_sizing.py).
    with dask.config.set({"dask_loom.block-size": 4 * 32 * 32 * 4, "dask_loom.coalesce-bytes": 64}):
        dask_loom.convert(root / "a.loom", root / "a.loom.zarr", chunks=(32, 32))
    out["loom"] = (root / "a.loom", m)
    out["loom-zarr"] = (root / "a.loom.zarr", m)

    z2 = _data((61, 47), 2, "float64")
    zarr.create_array(str(root / "v2.zarr"), shape=z2.shape, chunks=(16, 10), dtype="f8", zarr_format=2)[:] = z2
    z3 = _data((61, 47), 3, "int32")
    zarr.create_array(str(root / "v3.zarr"), shape=z3.shape, chunks=(16, 10), dtype="i4")[:] = z3
    zs = _data((61, 47), 4)
    g = zarr.open_group(str(root / "sharded.zarr"), mode="w")
    g.create_array("x", shape=zs.shape, chunks=(8, 8), shards=(16, 24), dtype="f4")[:] = zs
    z3d = _data((9, 23, 14), 5, "float64")
    z3d[1, 2, 3] = np.nan  # nan variants differ from the plain ones
    zarr.create_array(str(root / "cube.zarr"), shape=z3d.shape, chunks=(4, 8, 5), dtype="f8")[:] = z3d
    out.update({"zarr-v2": (root / "v2.zarr", z2), "zarr-v3": (root / "v3.zarr", z3), "zarr-sharded": (root / "sharded.zarr", zs), "zarr-3d": (root / "cube.zarr", z3d)})

    # AnnData: dense (chunked), CSR and CSC files, as h5ad and as zarr
    xs, labels, paths_h5, paths_z = [], [], [], []
    for i, (n, kind) in enumerate([(40, "dense"), (57, "csr"), (33, "csc")]):
        x = _data((n, 30), 10 + i)
        cats = rng.choice(["B", "T", "NK", "Mono"], n).astype(object)
        if i == 1:
            cats[[3, 9]] = np.nan  # missing labels: left out of every group
        obs = pd.DataFrame({"ct": pd.Categorical(cats)}, index=[f"f{i}c{j}" for j in range(n)])
        mat = x if kind == "dense" else (sp.csr_matrix(x) if kind == "csr" else sp.csc_matrix(x))
        a = ad.AnnData(mat, obs=obs, var=pd.DataFrame(index=[f"g{k}" for k in range(30)]))
        paths_h5.append(root / f"p{i}.h5ad")
        a.write_h5ad(paths_h5[-1], compression="gzip" if kind == "dense" else None)
        paths_z.append(root / f"p{i}.zarr")
        a.write_zarr(paths_z[-1])
        xs.append(x)
        labels.append(cats)
    ref = np.concatenate(xs)
    # the reference read back by anndata itself
    back = np.concatenate([np.asarray(ad.read_h5ad(p).X.todense()) if sp.issparse(ad.read_h5ad(p).X) else ad.read_h5ad(p).X for p in paths_h5])
    np.testing.assert_array_equal(back, ref)
    out["mapped-h5ad"] = (paths_h5, ref, np.concatenate(labels))
    out["mapped-zarr"] = (paths_z, ref, np.concatenate(labels))

    img = rng.integers(0, 4000, (2, 3, 5, 26, 38)).astype("uint16")  # TCZYX
    dask_loom.write_ome_arrow_dataset(img, root / "img", chunk_shape=(1, 1, 2, 16, 16))
    out["image"] = (root / "img", img.transpose(0, 2, 1, 3, 4))  # TensorView layout TZCHW
    return out


@dataclass
class Case:
    obj: Any
    ref: np.ndarray
    fmt: str
    obs: np.ndarray | None = None  # a collection's "ct" labels
    csr: bool = False


KINDS = [
    "loom",
    "loom-zarr",
    "zarr-v2",
    "zarr-v3",
    "zarr-sharded",
    "zarr-3d",
    "mapped-h5ad",
    "mapped-zarr",
    "tensorview",
    "lazytensorview",
    "from-source",
    "dask",
    "dask-csr",
]


def _open(kind: str, files: dict[str, Any]) -> tuple[Case, Any]:
    """The object of one kind (and what closes it)."""
    if kind in ("loom", "loom-zarr"):
        path, m = files[kind]
        ds = dask_loom.connect(path, "r")
        return Case(ds, m, "loom"), ds.close
    if kind.startswith("zarr"):
        path, m = files[kind]
        return Case(dask_loom.open_zarr(str(path), "x" if kind == "zarr-sharded" else "", mode="r"), m, "zarr"), None
    if kind.startswith("mapped"):
        paths, m, labels = files[kind]
        mc = dask_loom.MappedCollection(paths, obs_keys="ct")
        return Case(mc, m, "h5ad" if kind.endswith("h5ad") else "zarr", obs=labels, csr=True), mc.close
    if kind == "tensorview":
        path, img = files["image"]
        return Case(dask_loom.open_ome_arrow(path), img, "ome"), None
    if kind == "lazytensorview":
        path, img = files["image"]
        return Case(dask_loom.open_ome_arrow(path, lazy=True), img, "ome"), None
    if kind == "from-source":
        path, m = files["zarr-3d"]
        return Case(dask_loom.open_zarr(str(path), mode="r").to_dask(), m, "zarr"), None
    if kind == "dask":
        path, m = files["zarr-3d"]
        return Case(da.from_array(m, chunks=(2, 9, 4)), m, "dask"), None
    if kind == "dask-csr":
        _, m = files["loom"]
        return Case(da.from_array(sp.csr_matrix(m), chunks=(16, 95), asarray=False), m, "dask", csr=True), None
    raise AssertionError(kind)


@pytest.fixture(params=KINDS)
def case(request, files):
    c, close = _open(request.param, files)
    with dask.config.set(SMALL_BLOCKS):
        yield c
    if close is not None:
        close()


def _labels_for(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array(["x", "y", "z", "w"]), n)


# -- map --------------------------------------------------------------------------------------


def test_every_kind_resolves_to_its_format(case):
    from dask_loom.ops import as_source

    src, info = as_source(case.obj)
    assert info.format == case.fmt
    assert info.shape == case.ref.shape
    if isinstance(case.obj, dask_loom.MappedCollection):
        assert isinstance(src, list) and len(src) == 3  # one source per file
    elif case.fmt == "dask":
        assert src is case.obj  # the generic path: no source behind it
    else:
        assert isinstance(src, dask_loom.blocks.ChunkSource)


def test_map_matches_numpy(case):
    ref = case.ref.astype(np.float64)
    for axis in range(ref.ndim):
        got = dask_loom.map(case.obj, MAP_FUNCS, axis=axis)
        other = tuple(d for d in range(ref.ndim) if d != axis)
        for f, v in zip(MAP_FUNCS, got):
            assert v.shape == (ref.shape[axis],) and v.dtype == np.float64
            np.testing.assert_allclose(v, f(ref, axis=other), rtol=2e-5, atol=1e-9, err_msg=f"{f.__name__} axis {axis}")


def test_map_calls_other_functions_per_vector(case):
    ref = case.ref.astype(np.float64)
    axis = ref.ndim - 1
    got = dask_loom.map(case.obj, [lambda v: float(np.median(v)), "max"], axis=axis)
    vecs = np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1)
    np.testing.assert_allclose(got[0], np.median(vecs, axis=1), rtol=1e-6)
    np.testing.assert_allclose(got[1], vecs.max(axis=1), rtol=1e-6)


# -- aggregate --------------------------------------------------------------------------------


def test_aggregate_matches_numpy(case):
    ref = case.ref.astype(np.float64)
    for axis in range(ref.ndim):
        labels = _labels_for(ref.shape[axis], axis)
        got, cats = dask_loom.aggregate(case.obj, labels, axis=axis, func=GROUP_FUNCS, return_labels=True)
        for f, v in zip(GROUP_FUNCS, got):
            want, want_cats = group_ref(ref, labels, axis, f)
            np.testing.assert_array_equal(cats, want_cats)
            np.testing.assert_allclose(v, want, rtol=2e-5, atol=1e-9, err_msg=f"{f} axis {axis}")
        # one function alone (2-D: the column path Loom's aggregate runs)
        one = dask_loom.aggregate(case.obj, labels, axis=axis, func="mean")
        np.testing.assert_allclose(one, group_ref(ref, labels, axis, "mean")[0], rtol=2e-5)


@pytest.mark.parametrize("kind", ["mapped-h5ad", "mapped-zarr"])
def test_pseudobulk_by_obs_key(files, kind):
    case, close = _open(kind, files)
    try:
        _check_pseudobulk(case)
    finally:
        close()


def _check_pseudobulk(case: Case) -> None:
    keep = np.array([isinstance(v, str) for v in case.obs])
    labels = np.where(keep, case.obs, "").astype(str)
    got, cats = dask_loom.aggregate(case.obj, "ct", axis=0, func=["sum", "mean", "count_nonzero"], return_labels=True)
    for f, v in zip(["sum", "mean", "count_nonzero"], got):
        want, want_cats = group_ref(case.ref.astype(np.float64), labels, 0, f, keep=keep)
        np.testing.assert_array_equal(cats, want_cats)
        np.testing.assert_allclose(v, want, rtol=2e-5)


# -- scan -------------------------------------------------------------------------------------


def test_scan_matches_numpy(case):
    ref = case.ref
    for axis, size in ((0, 7), (ref.ndim - 1, 5)):
        starts, blocks = zip(*dask_loom.scan(case.obj, axis=axis, batch_size=size))
        assert list(starts) == list(range(0, ref.shape[axis], size))
        assert all(isinstance(b, np.ndarray) for b in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks, axis=axis), ref)
    if ref.ndim == 2:
        blocks = [b for _, b in dask_loom.scan(case.obj, axis=0, batch_size=11, sparse=True)]
        assert all(isinstance(b, sp.csr_matrix) for b in blocks)
        np.testing.assert_array_equal(sp.vstack(blocks).toarray(), ref)


# -- the process cluster ------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("kind", ["loom", "loom-zarr", "zarr-sharded", "zarr-3d", "mapped-h5ad", "mapped-zarr", "tensorview", "from-source", "dask-csr"])
def test_operations_on_process_cluster(files, kind, local_cluster):
    c, close = _open(kind, files)
    try:
        with dask.config.set(SMALL_BLOCKS):
            ref = c.ref.astype(np.float64)
            axis = ref.ndim - 1
            other = tuple(range(ref.ndim - 1))
            mean, top = dask_loom.map(c.obj, [np.mean, np.max], axis=axis, client=local_cluster)
            np.testing.assert_allclose(mean, ref.mean(axis=other), rtol=2e-5)
            np.testing.assert_allclose(top, ref.max(axis=other))
            labels = _labels_for(ref.shape[0], 3)
            got = dask_loom.aggregate(c.obj, labels, axis=0, func=["sum", "max"], client=local_cluster)
            np.testing.assert_allclose(got[0], group_ref(ref, labels, 0, "sum")[0], rtol=2e-5)
            np.testing.assert_allclose(got[1], group_ref(ref, labels, 0, "max")[0])
            blocks = [b for _, b in dask_loom.scan(c.obj, axis=0, batch_size=13, client=local_cluster)]
            np.testing.assert_array_equal(np.concatenate(blocks), c.ref)
    finally:
        if close is not None:
            close()


# -- pseudobulk against scanpy / anndata ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["mapped-h5ad", "mapped-zarr"])
def test_pseudobulk_equals_scanpy(files, kind):
    sc = pytest.importorskip("scanpy")
    import anndata as ad

    paths, _, _ = files[kind]
    read = ad.read_h5ad if kind.endswith("h5ad") else ad.read_zarr
    adata = ad.concat([read(p) for p in paths])
    adata = adata[~adata.obs["ct"].isna()].copy()
    want = sc.get.aggregate(adata, by="ct", func=["sum", "mean", "count_nonzero", "var"], dof=0)
    with dask_loom.MappedCollection(paths, obs_keys="ct") as mc:
        got, cats = dask_loom.aggregate(mc, "ct", axis=0, func=["sum", "mean", "count_nonzero", "var"], return_labels=True)
    order = [list(want.obs_names).index(c) for c in cats]
    assert sorted(want.obs_names) == list(cats)
    for f, v in zip(["sum", "mean", "count_nonzero", "var"], got):
        np.testing.assert_allclose(v, np.asarray(want.layers[f])[order], rtol=1e-5, atol=1e-9, err_msg=f)


def test_collection_with_filter_and_joined_vars(files, tmp_path):
    """obs_filter keeps some rows of each file; an outer join scatters each file's columns."""
    import anndata as ad
    import pandas as pd

    paths, ref, labels = files["mapped-h5ad"]
    keep = np.array([v in ("T", "B") for v in labels])
    with dask_loom.MappedCollection(paths, obs_keys="ct", obs_filter={"ct": ["T", "B"]}) as mc:
        got = dask_loom.map(mc, [np.sum], axis=1)[0]
        np.testing.assert_allclose(got, ref[keep].sum(axis=0), rtol=1e-5)
        agg, cats = dask_loom.aggregate(mc, "ct", axis=0, func="sum", return_labels=True)
        assert list(cats) == ["B", "T"]
        np.testing.assert_allclose(agg, group_ref(ref, labels.astype(str), 0, "sum", keep=keep)[0], rtol=1e-5)
    # two files with different genes, outer join: anndata's own outer concat is the reference
    a = ad.AnnData(sp.csr_matrix(_data((20, 6), 1)), obs=pd.DataFrame(index=[f"a{i}" for i in range(20)]), var=pd.DataFrame(index=list("abcdef")))
    b = ad.AnnData(sp.csr_matrix(_data((15, 4), 2)), obs=pd.DataFrame(index=[f"b{i}" for i in range(15)]), var=pd.DataFrame(index=list("cdxy")))
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    joined = ad.concat([a, b], join="outer")
    with dask_loom.MappedCollection([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], join="outer") as mc:
        order = [list(mc.var_joint).index(v) for v in joined.var_names]
        got = dask_loom.map(mc, [np.sum, np.count_nonzero], axis=1)
        np.testing.assert_allclose(got[0][order], np.asarray(joined.X.sum(axis=0)).ravel(), rtol=1e-6)
        np.testing.assert_allclose(got[1][order], np.asarray((joined.X != 0).sum(axis=0)).ravel())


# -- sources behind dask arrays ------------------------------------------------------------------


def test_from_source_array_reads_its_source_and_agrees_with_generic(files):
    from dask_loom.ops import as_source

    path, ref = files["zarr-3d"]
    x = dask_loom.open_zarr(str(path), mode="r").to_dask()
    _src, info = as_source(x)
    assert info.array is None and info.format == "zarr"
    y = x.map_blocks(lambda b: b, dtype=x.dtype)  # the same data through the generic path
    _, info_y = as_source(y)
    assert info_y.array is y and info_y.format == "dask"
    for axis in range(3):
        a = dask_loom.map(x, MAP_FUNCS, axis=axis)
        b = dask_loom.map(y, MAP_FUNCS, axis=axis)
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=1e-12)
        labels = _labels_for(ref.shape[axis], axis)
        for u, v in zip(dask_loom.aggregate(x, labels, axis=axis, func=GROUP_FUNCS), dask_loom.aggregate(y, labels, axis=axis, func=GROUP_FUNCS)):
            np.testing.assert_allclose(u, v, rtol=1e-12)


def test_loom_methods_are_thin_calls(files):
    path, _m = files["loom"]
    with dask_loom.connect(path, "r") as ds:
        a = ds.map([np.mean, np.std], axis=1)
        b = dask_loom.map(ds, [np.mean, np.std], axis=1)
        c = dask_loom.map(ds.layers[""], [np.mean, np.std], axis=1)
        for u, v, w in zip(a, b, c):
            np.testing.assert_array_equal(u, v)
            np.testing.assert_array_equal(u, w)
        agg = ds.aggregate(None, group_by="Clusters", aggr_by="sum")
        np.testing.assert_allclose(agg, dask_loom.aggregate(ds, ds.ca.Clusters, axis=1, func="sum"), rtol=1e-6)


# -- permute ----------------------------------------------------------------------------------


def _zarr_cases(tmp_path):
    import zarr

    from dask_loom.stores import MemoryStore

    rng = np.random.default_rng(0)
    data = rng.random((13, 22, 5))
    cases = {}
    p = tmp_path / "v2.zarr"
    zarr.create_array(str(p), shape=data.shape, chunks=(4, 6, 5), dtype="f8", zarr_format=2)[:] = data
    cases["v2-root"] = lambda: dask_loom.open_zarr(str(p))
    q = tmp_path / "g.zarr"
    g = zarr.open_group(str(q), mode="w")
    g.create_array("a/x", shape=data.shape, chunks=(2, 4, 5), shards=(4, 8, 5), dtype="f8", attributes={"k": 1})[:] = data
    g.create_array("a/y", shape=(3,), chunks=(3,), dtype="i4")[:] = [1, 2, 3]
    cases["v3-sharded-in-group"] = lambda: dask_loom.open_zarr(str(q), "a/x")
    mem = MemoryStore()
    zarr.create_array(mem, name="m", shape=data.shape, chunks=(5, 5, 5), dtype="f8")[:] = data
    cases["memory"] = lambda: dask_loom.open_zarr(mem, "m")
    mem_root = MemoryStore()
    zarr.create_array(mem_root, shape=data.shape, chunks=(5, 5, 5), dtype="f8")[:] = data
    cases["memory-root"] = lambda: dask_loom.open_zarr(mem_root)
    return data, cases


@pytest.mark.parametrize("which", ["v2-root", "v3-sharded-in-group", "memory", "memory-root"])
def test_permute_zarr_arrays(tmp_path, which):
    import zarr

    data, cases = _zarr_cases(tmp_path)
    rng = np.random.default_rng(1)
    expect = data
    for axis in range(3):
        order = rng.permutation(data.shape[axis])
        dask_loom.permute(cases[which](), order, axis=axis)
        expect = np.take(expect, order, axis=axis)
        a = cases[which]()
        np.testing.assert_array_equal(a.to_dask().compute(), expect)
        np.testing.assert_array_equal(np.asarray(a.zarr[...]), expect)  # zarr-python reads the same
    a = cases[which]()
    if which == "v3-sharded-in-group":
        assert a.attributes == {"k": 1} and a.chunk_shape == (4, 8, 5)
        g = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
        assert sorted(g["a"].keys()) == ["x", "y"]  # no leftover copy
        assert not [n for n in os.listdir(tmp_path / "g.zarr" / "a") if n.startswith(".dlpart-")]
    if which == "v2-root":
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".dlpart-")]


def test_permute_zarr_failure_leaves_the_old_array(tmp_path, monkeypatch):
    from dask_loom.zarr import _permute

    data, cases = _zarr_cases(tmp_path)
    calls = []

    def failing(self, region, block):
        calls.append(region)
        if len(calls) == 2:
            raise OSError("disk on fire")
        _orig(self, region, block)

    _orig = _permute._RegionWriter.__call__
    monkeypatch.setattr(_permute._RegionWriter, "__call__", failing)
    for which in ("v3-sharded-in-group", "v2-root"):
        calls.clear()
        with dask.config.set(SMALL_BLOCKS), pytest.raises(OSError, match="disk on fire"):
            dask_loom.permute(cases[which](), np.arange(13)[::-1].copy(), axis=0, scheduler="sync")
        np.testing.assert_array_equal(cases[which]().to_dask().compute(), data)
    assert not [n for n in os.listdir(tmp_path / "g.zarr" / "a") if n.startswith(".dlpart-")]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".dlpart-")]


def test_permute_loom_moves_the_whole_file(files, tmp_path):
    import loompy

    src, _m = files["loom"]
    work = tmp_path / "w.loom"
    shutil.copy(src, work)
    ref = tmp_path / "r.loom"
    shutil.copy(src, ref)
    order = np.random.default_rng(2).permutation(95)
    with dask_loom.connect(work) as ds:
        dask_loom.permute(ds.layers[""], order, axis=1)  # a layer stands for its file
    with loompy.connect(str(ref)) as lp:
        lp.permute(order, axis=1)
        want, cells = lp[:, :], lp.ca.Cell
    with dask_loom.connect(work, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], want)
        np.testing.assert_array_equal(ds.ca.Cell, cells)


# -- bad input ----------------------------------------------------------------------------------


class _Count(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def _pretask(self, key: Any, dsk: Any, state: Any) -> None:
        self.n += 1


def _snapshot(path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, names in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]:
        for n in names:
            st = os.stat(os.path.join(dirpath, n))
            out[os.path.join(dirpath, n)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("thing", [np.ones((3, 4)), [[1, 2], [3, 4]], "cells.loom", 3.5, sp.csr_matrix(np.eye(3))])
def test_non_chunked_objects_are_refused(thing):
    for call in (
        lambda: dask_loom.map(thing, [np.mean]),
        lambda: dask_loom.aggregate(thing, [0, 1, 0]),
        lambda: dask_loom.scan(thing),
        lambda: dask_loom.permute(thing, [0, 1, 2], axis=0),
    ):
        with pytest.raises(UnsupportedSourceError, match=type(thing).__name__) as info:
            call()
        assert isinstance(info.value, TypeError)


def test_bad_arguments_raise_before_any_task_and_write_nothing(files, tmp_path):
    import zarr

    path, _m = files["loom"]
    work = tmp_path / "w.loom"
    shutil.copy(path, work)
    zpath = tmp_path / "z.zarr"
    zarr.create_array(str(zpath), shape=(6, 4), chunks=(2, 2), dtype="f4")[:] = np.arange(24).reshape(6, 4)
    before = {**_snapshot(work), **_snapshot(zpath)}
    counter = _Count()
    with counter, dask_loom.connect(work) as ds:
        name = str(work)
        with pytest.raises(OperationError, match=f"{name}.*94 labels|{name}.*95 entries"):
            dask_loom.aggregate(ds, np.arange(94), axis=1)
        with pytest.raises(OperationError, match=f"{name}.*permutation of 0..94"):
            dask_loom.permute(ds, np.arange(95)[::-1][:-1], axis=1)
        with pytest.raises(OperationError, match="permutation"):
            dask_loom.permute(ds, np.zeros(95, dtype=int), axis=1)  # right length, repeats
        with pytest.raises(ValueError, match="permutation"):  # loompy's method, same check
            ds.permute(np.arange(96), axis=1)
        with pytest.raises(OperationError, match=f"axis 2 is out of range for {name}"):
            dask_loom.map(ds, [np.mean], axis=2)
        with pytest.raises(OperationError, match="unknown function"):
            dask_loom.aggregate(ds, np.arange(95) % 2, func="median")
        with pytest.raises(OperationError, match="unknown function name 'avg'"):
            dask_loom.map(ds, ["avg"])
        with pytest.raises(OperationError, match=f"no obs.*{name}|{name}.*no obs"):
            dask_loom.aggregate(ds, "Clusters", axis=1)
        with pytest.raises(OperationError, match="batch_size"):
            dask_loom.scan(ds, batch_size=0)
    z = dask_loom.open_zarr(str(zpath))
    with counter:
        with pytest.raises(OperationError, match=f"{zpath}.*permutation"):
            dask_loom.permute(z, [0, 1, 2, 3, 4, 4], axis=0)
        with pytest.raises(OperationError, match=str(zpath)):
            dask_loom.aggregate(z, [1, 2], axis=0)
    assert counter.n == 0
    assert {**_snapshot(work), **_snapshot(zpath)} == before


def test_read_only_sources_are_not_permuted(files, tmp_path):
    import zarr

    path, _ = files["loom"]
    zpath = tmp_path / "z.zarr"
    zarr.create_array(str(zpath), shape=(6, 4), chunks=(2, 2), dtype="f4")[:] = np.arange(24).reshape(6, 4)
    before = _snapshot(zpath)
    paths, _, _ = files["mapped-h5ad"]
    img_path, _ = files["image"]
    with dask_loom.connect(path, "r") as ds, dask_loom.MappedCollection(paths) as mc:
        objects = {
            str(path): ds,
            str(zpath): dask_loom.open_zarr(str(zpath), mode="r"),
            "MappedCollection": mc,
            "img": dask_loom.open_ome_arrow(img_path),
            "dask array": da.ones((4, 4), chunks=2),
        }
        for where, obj in objects.items():
            n = len(obj) if isinstance(obj, dask_loom.MappedCollection) else obj.shape[0]
            with pytest.raises(ReadOnlyError, match=where) as info:
                dask_loom.permute(obj, np.arange(n), axis=0)
            assert isinstance(info.value, PermissionError)
    assert _snapshot(zpath) == before


def test_non_numeric_arrays_are_refused(tmp_path):
    import zarr

    zarr.create_array(str(tmp_path / "s.zarr"), shape=(3,), chunks=(2,), dtype=str)[:] = ["a", "b", "c"]
    with pytest.raises(UnsupportedDtypeError, match="s.zarr"):
        dask_loom.map(dask_loom.open_zarr(str(tmp_path / "s.zarr")), [np.mean])


def test_obs_key_errors_name_the_files(files):
    from dask_loom.errors import ElementNotFoundError

    paths, _, _ = files["mapped-h5ad"]
    with dask_loom.MappedCollection(paths, obs_keys="ct") as mc:
        with pytest.raises(ElementNotFoundError, match="p0.h5ad"):
            dask_loom.aggregate(mc, "no_such_key", axis=0)
        with pytest.raises(OperationError, match="axis=0"):
            dask_loom.aggregate(mc, "ct", axis=1)
        with pytest.raises(OperationError, match="MappedCollection.*p0.h5ad.*130 entries"):
            dask_loom.aggregate(mc, np.arange(3), axis=0)


# -- task names --------------------------------------------------------------------------------


def _prefixes(fn) -> set[str]:
    keys: list = []
    with Callback(pretask=lambda key, dsk, state: keys.append(key)):
        fn()
    return {key_split(k) for k in keys}


@pytest.mark.parametrize("kind", ["loom", "loom-zarr", "zarr-v3", "zarr-3d", "mapped-h5ad", "mapped-zarr", "tensorview", "dask"])
def test_task_names_per_format(files, kind):
    c, close = _open(kind, files)
    fmt = c.fmt
    try:
        with dask.config.set(SMALL_BLOCKS):
            ref = c.ref
            seen = _prefixes(lambda: dask_loom.map(c.obj, [np.mean, np.std], axis=ref.ndim - 1))
            # A row of more than 8 partials is combined first (-combine), fewer in its result task.
            want = {f"{fmt}-map", f"{fmt}-map-result"}
            assert want <= seen <= want | {f"{fmt}-map-combine"} | {p for p in seen if not p.startswith(f"{fmt}-map")}
            seen_agg = _prefixes(lambda: dask_loom.aggregate(c.obj, _labels_for(ref.shape[0], 0), axis=0, func=["sum", "max"]))
            assert f"{fmt}-aggregate" in seen_agg
            seen_scan = _prefixes(lambda: list(dask_loom.scan(c.obj, batch_size=16)))
            assert f"{fmt}-batch" in seen_scan
            if fmt != "dask":
                assert f"{fmt}-scan" in seen_scan
            for p in seen | seen_agg | seen_scan:
                words = p.split("-")
                # no digits (the dashboard groups by these), except the format name h5ad
                assert all(w.isalpha() for w in words[1:]), p
                if words[0] in ("loom", "zarr", "h5ad", "ome", "dask", "mapped"):
                    assert words[0] == fmt or (fmt == "dask" and p.startswith(("dask-", "array"))), p
    finally:
        if close is not None:
            close()


# -- properties ----------------------------------------------------------------------------------


@st.composite
def arrays_and_chunks(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.integers(1, max(1, s))) for s in shape)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.integers(-5, 6, shape).astype(draw(st.sampled_from(["f8", "f4", "i4"])))
    if x.dtype.kind == "f" and x.size and draw(st.booleans()):
        x.flat[rng.integers(0, x.size)] = np.nan
    return x, chunks, draw(st.integers(0, ndim - 1)), seed


def _store_array(x: np.ndarray, chunks: tuple[int, ...]) -> Any:
    import zarr

    from dask_loom.stores import MemoryStore

    s = MemoryStore()
    zarr.create_array(s, name="x", shape=x.shape, chunks=chunks, dtype=x.dtype)[...] = x
    return dask_loom.open_zarr(s, "x")


@given(arrays_and_chunks(), st.sampled_from(["zarr", "dask"]), st.integers(16, 4096))
def test_map_property(arg, how, block):
    x, chunks, axis, _ = arg
    obj = _store_array(x, chunks) if how == "zarr" else da.from_array(x, chunks=chunks)
    funcs = [np.sum, np.mean, np.min, np.max, np.count_nonzero, np.nansum, np.nanmin]
    other = tuple(d for d in range(x.ndim) if d != axis)
    with dask.config.set({"dask_loom.block-size": block}), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = dask_loom.map(obj, funcs, axis=axis, scheduler="sync")
        for f, v in zip(funcs, got):
            if x.shape[axis] == 0:
                assert v.shape == (0,)
                continue
            if not np.prod([x.shape[d] for d in other]) and f in (np.min, np.max, np.nanmin):
                continue  # numpy raises on an empty reduction; map gives NaN
            want = f(x.astype(np.float64), axis=other)
            np.testing.assert_allclose(v, want, rtol=1e-6, equal_nan=True, err_msg=f.__name__)


@given(arrays_and_chunks(), st.sampled_from(["zarr", "dask"]), st.integers(1, 4), st.integers(16, 4096))
def test_aggregate_property(arg, how, n_labels, block):
    x, chunks, axis, seed = arg
    if x.shape[axis] == 0:
        return
    obj = _store_array(x, chunks) if how == "zarr" else da.from_array(x, chunks=chunks)
    labels = np.random.default_rng(seed).integers(0, n_labels, x.shape[axis]) * 10
    with dask.config.set({"dask_loom.block-size": block}):
        got, cats = dask_loom.aggregate(obj, labels, axis=axis, func=GROUP_FUNCS, return_labels=True, scheduler="sync")
    np.testing.assert_array_equal(cats, np.unique(labels))
    empty = not np.prod([s for d, s in enumerate(x.shape) if d != axis])
    for f, v in zip(GROUP_FUNCS, got):
        want, _ = group_ref(x.astype(np.float64), labels, axis, f) if not empty else (np.zeros(v.shape), None)
        assert v.shape == want.shape
        if not empty:
            np.testing.assert_allclose(v, want, rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=f)


@given(st.integers(1, 30), st.integers(1, 12), st.floats(0, 1), st.integers(1, 6), st.integers(0, 2**16))
def test_csr_kernels_property(n, m, density, row_chunk, seed):
    """CSR blocks (never densified) give numpy's answers, implicit zeros included."""
    rng = np.random.default_rng(seed)
    dense = (rng.integers(-3, 4, (n, m)) * (rng.random((n, m)) < density)).astype("f8")
    x = da.from_array(sp.csr_matrix(dense), chunks=(row_chunk, m), asarray=False)
    for axis in (0, 1):
        got = dask_loom.map(x, [np.sum, np.mean, np.std, np.min, np.max, np.count_nonzero], axis=axis, scheduler="sync")
        for f, v in zip([np.sum, np.mean, np.std, np.min, np.max, np.count_nonzero], got):
            np.testing.assert_allclose(v, f(dense, axis=1 - axis), rtol=1e-9, atol=1e-12, err_msg=f.__name__)
        labels = rng.integers(0, 3, dense.shape[axis])
        res = dask_loom.aggregate(x, labels, axis=axis, func=GROUP_FUNCS, scheduler="sync")
        for f, v in zip(GROUP_FUNCS, res):
            np.testing.assert_allclose(v, group_ref(dense, labels, axis, f)[0], rtol=1e-9, atol=1e-12, err_msg=f)


def test_docstring_examples_run():
    import doctest

    from dask_loom.ops import _api, _sources

    for mod in (_api, _sources):
        failed, tried = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert tried and not failed


def test_nan_and_inf_stay_in_their_group(tmp_path):
    """Group sums are one-hot products: a NaN or inf must not spread to the other groups (loompy keeps them apart)."""
    import h5py
    import loompy
    import zarr

    m = _data((40, 30), 3)
    labels = np.arange(30) % 3
    loompy.create(str(tmp_path / "n.loom"), m, {"G": np.arange(40)}, {"L": labels})
    m[5, 2] = np.nan  # loompy refuses them on create: put them in afterwards
    m[7, 11] = np.inf
    with h5py.File(tmp_path / "n.loom", "r+") as f:
        f["matrix"][5, 2] = np.nan
        f["matrix"][7, 11] = np.inf
    zarr.create_array(str(tmp_path / "n.zarr"), shape=m.shape, chunks=(16, 16), dtype="f4")[:] = m
    with loompy.connect(str(tmp_path / "n.loom")) as lp:
        theirs = lp.aggregate(None, group_by="L", aggr_by="sum")
    with dask_loom.connect(tmp_path / "n.loom", "r") as ds:
        ours = ds.aggregate(None, group_by="L", aggr_by="sum")
        public = dask_loom.aggregate(ds, labels, axis=1, func=["sum", "mean"])
    want = group_ref(m.astype(np.float64), labels, 1, "sum")[0]
    np.testing.assert_allclose(theirs, want, rtol=1e-5)
    z = dask_loom.open_zarr(str(tmp_path / "n.zarr"))
    for got in (ours, public[0], dask_loom.aggregate(z, labels, axis=1), dask_loom.aggregate(z.to_dask().T, labels, axis=0).T):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(public[1], group_ref(m.astype(np.float64), labels, 1, "mean")[0], rtol=1e-5)
    assert np.isnan(ours[5]).sum() == 1 and np.isinf(ours[7]).sum() == 1
