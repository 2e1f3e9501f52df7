"""The loompy read API against the real loompy 3.0.8 on the same files."""

from __future__ import annotations

import warnings

import loompy
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom.errors import LoomFormatError, ReadOnlyError


@pytest.fixture(scope="module")
def pair(loompy_file):
    path, ref = loompy_file
    with loompy.connect(str(path), "r") as lp, dask_loom.connect(path, "r") as ds:
        yield lp, ds, ref


def test_shape_layers_and_attribute_names(pair):
    lp, ds, _ = pair
    assert ds.shape == lp.shape
    assert ds.layers.keys() == lp.layers.keys()
    assert ds.ra.keys() == lp.ra.keys()
    assert ds.ca.keys() == lp.ca.keys()
    assert ds.attrs.keys() == lp.attrs.keys()
    assert ds.row_graphs.keys() == lp.row_graphs.keys()
    assert ds.col_graphs.keys() == lp.col_graphs.keys()
    assert ds.layers["spliced"].dtype == lp.layers["spliced"].dtype == "int32"


def test_attribute_values_equal_loompy(pair):
    lp, ds, _ = pair
    for mine, theirs in ((ds.ra, lp.ra), (ds.ca, lp.ca)):
        for k in theirs.keys():
            a, b = mine[k], theirs[k]
            assert a.dtype == b.dtype, k
            np.testing.assert_array_equal(a, b)
            assert getattr(mine, k) is mine[k]  # cached, same object
    for k in lp.attrs.keys():
        assert ds.attrs[k] == lp.attrs[k]


def test_tuple_keys(pair):
    lp, ds, _ = pair
    np.testing.assert_array_equal(ds.ca["Missing", "CellID"], lp.ca["Missing", "CellID"])
    assert ds.ca["Nope", "Neither"] is None
    with pytest.raises(AttributeError, match="same dtype"):
        ds.ca["Clusters", "Total"]
    stacked = ds.ra["Score", "Score"]
    assert stacked.shape == (ds.shape[0], 2)


def test_attribute_slicing_and_errors(pair):
    lp, ds, ref = pair
    sub = ds.ca[10:20]
    np.testing.assert_array_equal(sub.CellID, lp.ca[10:20].CellID)
    mask = ref["ca"]["Clusters"] == 3
    np.testing.assert_array_equal(ds.ca[mask].Total, lp.ca[mask].Total)
    # Deliberate fix: numpy ints and int lists select positions (loompy treats them as names).
    assert (
        ds.ca[np.int64(2)].CellID == ref["ca"]["CellID"][2]
    )  # an integer drops the axis, as numpy and loompy
    np.testing.assert_array_equal(ds.ca[[5, 1]].CellID, ref["ca"]["CellID"][[5, 1]])
    with pytest.raises(AttributeError):
        ds.ca.NoSuchAttribute
    with pytest.raises(AttributeError):
        ds.ca["NoSuchAttribute"]
    with pytest.raises(ValueError, match="Default must be an np.ndarray"):  # loompy's check of the default
        ds.ca.get("NoSuchAttribute", None)
    assert "CellID" in ds.ca and len(ds.ca) == len(lp.ca)
    assert dict(ds.ra).keys() == dict(lp.ra).keys()


def test_graphs_equal_loompy(pair):
    lp, ds, ref = pair
    for name in lp.col_graphs.keys():
        a, b = ds.col_graphs[name], lp.col_graphs[name]
        assert isinstance(a, sp.coo_matrix)
        assert (a != b).nnz == 0
    assert (ref["RKNN"] != ds.row_graphs.RKNN).nnz == 0


@st.composite
def axis_index(draw, n):
    kind = draw(st.sampled_from(["slice", "int", "list", "mask", "array"]))
    if kind == "slice":
        start = draw(st.none() | st.integers(-n, n))
        stop = draw(st.none() | st.integers(-n, n))
        step = draw(st.none() | st.integers(-7, 7).filter(lambda s: s != 0))
        return slice(start, stop, step)
    if kind == "int":
        return draw(st.integers(-n, n - 1))
    if kind == "mask":
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    idx = draw(st.lists(st.integers(-n, n - 1), max_size=12))
    return idx if kind == "list" else np.array(idx, dtype=np.int64)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_indexing_matches_numpy_outer(pair, data):
    _, ds, ref = pair
    n, m = ds.shape
    r = data.draw(axis_index(n))
    c = data.draw(axis_index(m))
    layer = data.draw(st.sampled_from(["", "spliced"]))
    expected = ref[layer]
    rr = r if not isinstance(r, int) else [r]
    cc = c if not isinstance(c, int) else [c]
    want = expected[rr, :][:, cc]
    if isinstance(r, int):
        want = want[0]
    if isinstance(c, int):
        want = want[..., 0]
    got = ds.layers[layer][r, c]
    np.testing.assert_array_equal(got, want)
    assert np.asarray(got).dtype == expected.dtype


def test_loompy_style_reads(pair):
    lp, ds, _ = pair
    for key in [
        (slice(None), slice(None)),
        (slice(0, 10), slice(5, 9)),
        (slice(-5, None), slice(None)),
        (0, slice(None)),
        (-1, slice(None)),
        (slice(None), -1),
        ([0, 2, 5], slice(None)),
    ]:
        np.testing.assert_array_equal(ds[key], lp[key])
    assert ds[0, 0] == lp[0, 0]
    np.testing.assert_array_equal(ds["spliced"][10:20, :], lp["spliced"][10:20, :])
    np.testing.assert_array_equal(ds.layers["spliced"][()], lp.layers["spliced"][:, :])


def test_out_of_range(pair):
    _, ds, _ = pair
    with pytest.raises(IndexError, match="out of bounds"):
        ds[ds.shape[0], :]
    with pytest.raises(IndexError, match="out of bounds"):
        ds[:, [0, ds.shape[1] + 3]]
    with pytest.raises(KeyError, match="nope"):
        ds.layers["nope"]


def test_views_equal_loompy(pair):
    lp, ds, _ = pair
    rows, cols = slice(5, 60), np.array([3, 9, 100, 400])
    v, w = ds.view[rows, cols], lp.view[rows, cols]
    assert v.shape == w.shape
    for k in w.layers.keys():
        np.testing.assert_array_equal(v.layers[k].values, w.layers[k].values)
        np.testing.assert_array_equal(v[k][:, :], w[k][:, :])
    for k in w.ra.keys():
        np.testing.assert_array_equal(v.ra[k], w.ra[k])
    for k in w.ca.keys():
        np.testing.assert_array_equal(v.ca[k], w.ca[k])
    assert (v.col_graphs.KNN != w.col_graphs.KNN).nnz == 0
    assert (v.row_graphs.RKNN != w.row_graphs.RKNN).nnz == 0
    np.testing.assert_array_equal(v[:, :], w[:, :])
    assert v.attrs.Title == "reference"


def test_view_unsorted_keeps_graph_consistent_with_attributes(pair):
    _, ds, ref = pair
    cols = np.array([400, 3, 250, 3])
    v = ds.view[:, cols]
    g = ref["KNN"].tocsr()
    expected = g[cols][:, cols].toarray()
    np.testing.assert_array_equal(v.col_graphs.KNN.toarray(), expected)
    np.testing.assert_array_equal(v.ca.CellID, ref["ca"]["CellID"][cols])


@pytest.mark.parametrize("axis", [0, 1])
def test_map_equals_loompy(pair, axis):
    lp, ds, _ = pair
    funcs = [np.mean, np.std, np.var, np.sum, np.min, np.max, np.count_nonzero]
    mine = ds.map(funcs, axis=axis)
    theirs = lp.map(funcs, axis=axis)
    for f, a, b in zip(funcs, mine, theirs):
        assert a.dtype == np.float64 and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f.__name__)


def test_map_any_function_and_selection(pair):
    lp, ds, ref = pair
    sel = ref["ca"]["Clusters"] == 2
    funcs = [np.median, lambda v: float(np.percentile(v, 90)), np.mean]
    mine = ds.map(funcs, axis=0, selection=sel, chunksize=64)
    theirs = lp.map(funcs, axis=0, selection=sel)
    for a, b in zip(mine, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    layer = ds.layers["spliced"].map([np.max, "nanmean"], axis=1)
    np.testing.assert_allclose(layer[0], ref["spliced"].max(axis=0))
    np.testing.assert_allclose(layer[1], ref["spliced"].mean(axis=0))
    with pytest.raises(ValueError, match="list"):
        ds.map(np.mean)


def test_nan_reductions():
    rng = np.random.default_rng(0)
    from dask_loom.ops._kernels import block_partials, combine_partials, finish, recognise

    a = rng.random((40, 50))
    a[rng.random(a.shape) < 0.2] = np.nan
    reds = [recognise(n) for n in ("nansum", "nanmean", "nanstd", "nanvar", "nanmin", "nanmax", "sum", "max")]
    needs = sorted({x for r in reds for x in r.needs})
    parts = combine_partials([block_partials(a[:, :20], 1, needs), block_partials(a[:, 20:], 1, needs)])
    for r, v in zip(reds, finish(parts, reds)):
        np.testing.assert_allclose(v, getattr(np, r.name)(a, axis=1), rtol=1e-10, err_msg=r.name)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.int64, np.bool_])
@pytest.mark.parametrize("red", [0, 1])
def test_integer_block_sums_exact_in_tiles(dtype, red, monkeypatch):
    """Integer blocks are summed a tile of rows at a time: exactly what numpy's float64 sums give, at any tile size."""
    from dask_loom.ops import _kernels
    from dask_loom.ops._kernels import block_partials

    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if dtype is not np.bool_ else None
    lo, hi = (0, 2) if info is None else (info.min, info.max)
    lo, hi = max(lo, -(2**20)), min(hi, 2**20)  # int64: values whose float64 sums are exact
    a = rng.integers(lo, hi, size=(37, 23), endpoint=True).astype(dtype)
    if info is not None and info.bits <= 16:
        a[0, :3] = [info.max, info.min, info.max]  # extremes: squares of 65535 overflow 32-bit sums
    f = a.astype(np.float64)
    needs = ["n", "s1", "s2", "nnz"]
    for tile_rows in (1, 5, 37, 1000):  # tiles smaller than, equal to and larger than the block
        monkeypatch.setattr(_kernels, "TILE_BYTES", 8 * a.shape[1] * tile_rows)
        for wanted in (needs, ["s2"], ["s1"]):
            got = block_partials(a, red, wanted)
            if "s1" in wanted:
                np.testing.assert_array_equal(got["s1"], f.sum(axis=red))
                assert got["s1"].dtype == np.float64
            if "s2" in wanted:
                np.testing.assert_array_equal(got["s2"], (f * f).sum(axis=red))
            if "nnz" in wanted:
                np.testing.assert_array_equal(got["nnz"], np.count_nonzero(a, axis=red))
    for empty in (a[:0], a[:, :0]):
        got = block_partials(empty, red, needs)
        np.testing.assert_array_equal(got["s1"], empty.astype(np.float64).sum(axis=red))
        np.testing.assert_array_equal(got["s2"], np.zeros(empty.shape[1 - red]))


def test_sparse_equals_loompy(pair):
    lp, ds, ref = pair
    a = ds.sparse()
    assert isinstance(a, sp.coo_matrix) and a.dtype == np.float32
    np.testing.assert_array_equal(a.toarray(), lp.sparse().toarray())
    rows = np.array([50, 3, 3, 200])
    cols = ref["ca"]["Clusters"] == 1
    b = ds.sparse(rows=rows, cols=cols, layer="spliced")
    np.testing.assert_array_equal(b.toarray(), ref["spliced"][rows][:, cols])


def test_dask_property_is_lazy_and_aligned(pair):
    _, ds, ref = pair
    x = ds.layers[""].dask
    assert x.shape == ds.shape
    for sizes in x.chunks:
        assert all(s % 64 == 0 for s in sizes[:-1])
    np.testing.assert_allclose(x.mean(axis=1).compute(), ref[""].mean(axis=1), rtol=1e-6)
    y = ds.dask("spliced", band_axis=1)
    assert y.chunks[0] == (ds.shape[0],)


def test_map_on_process_cluster(pair, local_cluster):
    lp, ds, _ = pair
    mine = ds.map([np.mean, np.std, np.median], axis=1, client=local_cluster)
    theirs = lp.map([np.mean, np.std, np.median], axis=1)
    for a, b in zip(mine, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ds.layers[""].to_dask().compute(scheduler=local_cluster), lp[:, :])


def test_rplus_does_not_lock_out_readers(loompy_file):
    path, ref = loompy_file
    with dask_loom.connect(path, "r+") as ds:
        assert ds.mode == "r+"
        ds[0:3, :]
        with loompy.connect(str(path), "r") as lp:  # loompy's own r+ would refuse this
            np.testing.assert_array_equal(lp[0:3, :], ref[""][0:3])


def test_read_only_connection_refuses_writes(loompy_file):
    path, _ = loompy_file
    with dask_loom.connect(path, "r") as ds:
        with pytest.raises(ReadOnlyError, match="read-only"):
            ds.ca.New = np.zeros(ds.shape[1])
        with pytest.raises(OSError):  # ReadOnlyError is an OSError, as loompy's IOError
            ds.layers["x"] = "float32"


def test_close_and_context_manager(loompy_file):
    path, _ = loompy_file
    ds = dask_loom.connect(path, "r")
    assert not ds.closed
    ds.close()
    assert ds.closed and ds.shape == (0, 0)
    with pytest.warns(UserWarning, match="already closed"):
        ds.close()
    with pytest.raises(ValueError, match="closed"):
        ds.layers[""][0, 0]


def test_last_modified_and_changes(loompy_file, tmp_path):
    import shutil

    path = tmp_path / "copy.loom"
    shutil.copy(loompy_file[0], path)
    with dask_loom.connect(path) as ds:
        t0 = ds.last_modified()
        assert len(t0) == len("20261122T012859.574926Z")
        ds.ca.Extra = np.arange(ds.shape[1])
        changes = ds.get_changes_since(t0)
        assert changes["col_attrs"] == ["Extra"]
        assert changes["layers"] == [] and changes["row_attrs"] == []
        assert ds.last_modified() > t0
    with loompy.connect(str(path), "r") as lp:
        np.testing.assert_array_equal(lp.ca.Extra, np.arange(lp.shape[1]))


@pytest.mark.parametrize(
    "content, exc",
    [
        (None, FileNotFoundError),
        (b"not hdf5 at all" * 50, LoomFormatError),
    ],
)
def test_bad_files(tmp_path, content, exc):
    path = tmp_path / "bad.loom"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(exc, match="bad.loom"):
        dask_loom.connect(path, "r")


def test_hdf5_but_not_loom(tmp_path):
    import h5py

    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["X"] = np.zeros(3)
    with pytest.raises(LoomFormatError, match="other.h5.*not a Loom file"):
        dask_loom.connect(path, "r", validate=False)
    with pytest.raises(ValueError, match="other.h5"):
        dask_loom.connect(path, "r")


def test_wrong_attribute_length_named(tmp_path, loompy_file):
    import shutil

    import h5py

    path = tmp_path / "wrong.loom"
    shutil.copy(loompy_file[0], path)
    with h5py.File(path, "r+") as f:
        f["col_attrs/Short"] = np.arange(5)
    with pytest.raises(ValueError, match="Short"):
        dask_loom.connect(path, "r")  # the validator names it
    with (
        dask_loom.connect(path, "r", validate=False) as ds,
        pytest.raises(LoomFormatError, match="col_attrs/Short.*5 values"),
    ):
        ds.ca.Short


def test_validator_matches_loompy(loompy_file, data_dir):
    files = [loompy_file[0], *sorted((data_dir / "loom").rglob("*.loom"))]
    for f in files:
        mine, theirs = dask_loom.LoomValidator(), loompy.LoomValidator()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = theirs.validate(str(f))
            except Exception:  # loompy crashes on some legacy files; we must still answer
                expected = False
        assert mine.validate(f) == expected, (f, mine.errors, theirs.errors)


def test_import_as_loompy(loompy_file):
    import dask_loom as lp2

    path, ref = loompy_file
    with lp2.connect(str(path)) as ds:
        np.testing.assert_array_equal(ds[:, :], ref[""])
        for _, selection, view in ds.scan(axis=1, batch_size=200):
            np.testing.assert_array_equal(view[:, :], ref[""][:, selection])
