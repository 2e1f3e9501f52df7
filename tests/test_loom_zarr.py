"""Loom on Zarr (``.loom.zarr``): the same checks as on HDF5, convert, object stores.

Every read test of ``test_loom_read`` that takes the ``pair`` fixture is
collected here again with ``pair`` bound to a ``.loom.zarr`` copy of the
loompy-written file (loompy on the ``.loom`` stays the reference); write,
map and view checks run on both containers.
"""

from __future__ import annotations

import inspect
import shutil
import uuid

import dask.array as da
import loompy
import numpy as np
import pytest
import scipy.sparse as sp
import test_loom_read as _read_tests
import zarr

import dask_loom
from dask_loom.errors import LoomFormatError, ReadOnlyError

# -- the read suite of test_loom_read, on .loom.zarr -------------------------------------------

for _name, _fn in vars(_read_tests).items():
    if _name.startswith("test_") and callable(_fn) and "pair" in inspect.signature(_fn).parameters:
        globals()[f"{_name}_on_zarr"] = _fn
del _name, _fn


@pytest.fixture(scope="module")
def zarr_twin(loompy_file, tmp_path_factory):
    path, _ = loompy_file
    out = tmp_path_factory.mktemp("twin") / "ref.loom.zarr"
    dask_loom.convert(path, out, scheduler="sync")
    return out


@pytest.fixture(scope="module")
def pair(loompy_file, zarr_twin):
    path, ref = loompy_file
    with loompy.connect(str(path), "r") as lp, dask_loom.connect(zarr_twin, "r") as ds:
        yield lp, ds, ref


# -- both containers -------------------------------------------------------------------------


@pytest.fixture(params=["loom", "loom.zarr"])
def container(request, loompy_file, zarr_twin, tmp_path):
    """A writable copy of the reference file as .loom (HDF5) or .loom.zarr."""
    path, ref = loompy_file
    if request.param == "loom":
        dst = tmp_path / "w.loom"
        shutil.copy(path, dst)
    else:
        dst = tmp_path / "w.loom.zarr"
        shutil.copytree(zarr_twin, dst)
    return dst, ref


def test_zarr_layout(zarr_twin, loompy_file):
    g = zarr.open_group(str(zarr_twin), mode="r")
    assert sorted(k for k, _ in g.members()) == ["attrs", "col_attrs", "col_graphs", "layers", "matrix", "row_attrs", "row_graphs"]
    m = g["matrix"]
    assert m.chunks == (256, 256)  # dask_loom.loom-zarr-chunks: the inner chunks
    # One shard (the small matrix is far below dask_loom.block-size) of whole inner chunks.
    assert m.shards == (512, 768)
    assert m.dtype == np.float32
    assert [c.to_dict()["name"] for c in m.compressors] == ["blosc"]
    assert m.compressors[0].to_dict()["configuration"]["cname"] == "lz4hc"  # dask_loom.zarr-codec
    assert str(g["row_attrs/Gene"].dtype) == "StringDType()" or g["row_attrs/Gene"].metadata.data_type.to_json(zarr_format=3) == "string"
    assert g["attrs/LOOM_SPEC_VERSION"][()] == "3.0.0"
    _, ref = loompy_file
    np.testing.assert_array_equal(m[:], ref[""])


@pytest.mark.parametrize("scheduler", ["threads", "cluster"])
def test_map_sparse_view_on_both(container, scheduler, request):
    path, ref = container
    kw = {"client": request.getfixturevalue("local_cluster")} if scheduler == "cluster" else {"scheduler": "threads"}
    main = ref[""].astype("f8")
    with dask_loom.connect(path, "r", **kw) as ds:
        mean, std = ds.map([np.mean, np.std], axis=0)
        np.testing.assert_allclose(mean, main.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(std, main.std(axis=1), rtol=1e-6)
        (cmax,) = ds.map([lambda v: float(np.max(v) - np.min(v))], axis=1)
        np.testing.assert_allclose(cmax, main.max(axis=0) - main.min(axis=0))
        rows, cols = np.array([5, 3, 299, 3]), np.arange(0, 517, 7)
        np.testing.assert_array_equal(ds[rows, cols], ref[""][np.ix_(rows, cols)])
        np.testing.assert_array_equal(ds.layers["spliced"][10:20, ::-3], ref["spliced"][10:20, ::-3])
        s = ds.sparse(rows=np.arange(50), cols=np.arange(100, 300))
        np.testing.assert_array_equal(s.toarray(), ref[""][:50, 100:300])
        v = ds.view[:40, ref["ca"]["Clusters"] == 2]
        np.testing.assert_array_equal(v[:, :], ref[""][:40][:, ref["ca"]["Clusters"] == 2])
        assert v.ra.Gene.tolist() == ref["ra"]["Gene"][:40].tolist()
        x = ds.layers[""].dask
        for sizes in x.chunks:
            assert (np.cumsum(sizes)[:-1] % 64 == 0).all()
        np.testing.assert_allclose(float(x.sum().compute(**kw)), float(main.sum()), rtol=1e-6)


def test_writes_on_both(container):
    path, ref = container
    n, m = ref[""].shape
    knn = sp.random(m, m, density=0.02, random_state=9, format="coo")
    with dask_loom.connect(path, "r+") as ds:
        ds.ra["Doubled"] = np.arange(n) * 2
        ds.ca["Label"] = np.array([f"lab-é{i}" for i in range(m)])
        ds.col_graphs["NEW"] = knn
        ds.layers["plus"] = ref[""] + 1
        ds.layers["fromdask"] = da.from_array(ref["spliced"].astype("f8"), chunks=(37, 51))  # misaligned blocks
        ds[5:9, [1, 3, 500]] = 7.0
        del ds.ra["Score"]
        del ds.layers["spliced"]
        ds.attrs["Note"] = "written"
    expect = ref[""].copy()
    expect[5:9][:, [1, 3, 500]] = 7.0
    with dask_loom.connect(path, "r") as ds:
        assert ds.ra.Doubled.tolist() == (np.arange(n) * 2).tolist()
        assert ds.ca.Label[3] == "lab-é3"
        np.testing.assert_array_equal(ds.col_graphs.NEW.toarray(), knn.toarray())
        np.testing.assert_array_equal(ds.layers["plus"][:, :], ref[""] + 1)
        np.testing.assert_array_equal(ds.layers["fromdask"][:, :], ref["spliced"])
        np.testing.assert_array_equal(ds[:, :], expect)
        assert "Score" not in ds.ra
        assert "spliced" not in ds.layers
        assert ds.attrs.Note == "written"
        assert ds.layers["fromdask"].dtype == "float64"
    if str(path).endswith(".loom"):
        with loompy.connect(str(path), "r") as lp:  # still a valid loompy file
            np.testing.assert_array_equal(lp[:, :], expect)


def test_create_new_and_add_on_zarr(tmp_path):
    fn = tmp_path / "new.loom.zarr"
    m = np.arange(60, dtype="i4").reshape(6, 10)
    dask_loom.create(fn, {"": m, "x": m.astype("f4") / 2}, {"g": np.arange(6)}, {"c": np.array(list("abcdefghij"))})
    with dask_loom.connect(fn, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m)
        assert ds.layers["x"].dtype == "float32"
        assert ds.ca.c.tolist() == list("abcdefghij")
    with pytest.raises(ReadOnlyError):
        dask_loom.connect(fn, "r").ra.__setattr__("new", np.zeros(6))


def test_convert_roundtrip_and_cli(zarr_twin, loompy_file, tmp_path):
    from dask_loom.cli import main

    _path, ref = loompy_file
    back = tmp_path / "back.loom"
    assert main(["convert", str(zarr_twin), str(back), "--no-progress", "--scheduler", "sync"]) == 0
    with loompy.connect(str(back), "r", validate=True) as lp:
        np.testing.assert_array_equal(lp[:, :], ref[""])
        np.testing.assert_array_equal(lp.layers["spliced"][:, :], ref["spliced"])
        assert lp.ra.Gene.tolist() == ref["ra"]["Gene"].tolist()
        np.testing.assert_allclose(lp.ra.PCA, ref["ra"]["PCA"])
        np.testing.assert_allclose(lp.col_graphs.KNN.toarray(), ref["KNN"].toarray())
        assert lp.attrs.Title == "reference"
    rechunked = tmp_path / "r.loom.zarr"
    dask_loom.convert(back, rechunked, chunks=(100, 30), progress=True, scheduler="threads")
    g = zarr.open_group(str(rechunked), mode="r")
    assert g["matrix"].chunks == (100, 30)
    np.testing.assert_array_equal(g["layers/spliced"][:], ref["spliced"])


@pytest.mark.cluster
def test_convert_on_process_cluster(loompy_file, tmp_path, local_cluster):
    path, ref = loompy_file
    out = tmp_path / "c.loom.zarr"
    dask_loom.convert(path, out, client=local_cluster)
    with dask_loom.connect(out, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], ref[""])
        np.testing.assert_array_equal(ds.layers["spliced"][:, :], ref["spliced"])


def test_not_loom_zarr(tmp_path):
    d = tmp_path / "plain.zarr"
    zarr.create_group(str(d))
    with pytest.raises(LoomFormatError, match="not a Loom file"):
        dask_loom.connect(d, "r")
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(LoomFormatError, match="not a Zarr group"):
        dask_loom.connect(empty, "r")


# -- object stores -----------------------------------------------------------------------------


@pytest.mark.s3
def test_loom_zarr_on_s3(s3_server, loompy_file, local_cluster):
    path, ref = loompy_file
    opts = s3_server["storage_options"]
    url = f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}/ref.loom.zarr"
    dask_loom.convert(path, url, dst_storage_options=opts, client=local_cluster)
    with dask_loom.connect(url, "r+", storage_options=opts, client=local_cluster) as ds:
        assert ds.shape == ref[""].shape
        (mean,) = ds.map([np.mean], axis=1)
        np.testing.assert_allclose(mean, ref[""].astype("f8").mean(axis=0), rtol=1e-6)
        np.testing.assert_array_equal(ds.layers["spliced"][::7, 3:9], ref["spliced"][::7, 3:9])
        ds.ca["Cloud"] = np.arange(ref[""].shape[1])
        ds.layers["twice"] = ds.layers[""].dask * 2
    with dask_loom.connect(url, "r", storage_options=opts) as ds:
        assert ds.ca.Cloud.tolist() == list(range(ref[""].shape[1]))
        np.testing.assert_array_equal(ds.layers["twice"][:, :], ref[""] * 2)
        assert ds.ra.Gene.tolist() == ref["ra"]["Gene"].tolist()


@pytest.mark.s3
def test_hdf5_loom_on_s3_is_read_with_range_requests(s3_server, tmp_path):
    import s3fs

    from dask_loom.hdf5 import STATS

    opts = s3_server["storage_options"]
    stats = s3_server["stats"]
    rng = np.random.default_rng(7)
    m = rng.random((3000, 800)).astype("f4")  # incompressible: the file is about as big as the data
    local = tmp_path / "big.loom"
    dask_loom.create(local, m, {"g": np.arange(3000)}, {"c": np.arange(800)})
    key = f"{s3_server['bucket']}/{uuid.uuid4().hex}/big.loom"
    s3fs.S3FileSystem(**opts).put(str(local), key)
    size = local.stat().st_size
    url = f"s3://{key}"
    with pytest.raises(ReadOnlyError, match="read-only"):
        dask_loom.connect(url, "r+", storage_options=opts)
    stats.reset()
    before = STATS["fast_blocks"]
    with dask_loom.connect(url, "r", storage_options=opts) as ds:
        np.testing.assert_array_equal(ds[100:110, 700:720], m[100:110, 700:720])
        partial = stats.bytes_sent
        assert STATS["fast_blocks"] > before  # chunks came through the chunk index, not h5py
        (mean,) = ds.map([np.mean], axis=0)
    np.testing.assert_allclose(mean, m.astype("f8").mean(axis=1), rtol=1e-5)
    # Opening plus a small read fetched a fraction of the object, not the object.
    assert partial < size / 2, (partial, size)
    assert stats.range_requests == stats.get_requests
