"""The ``"loom"`` xarray engine, ``LoomConnection.to_xarray``, ``TensorView.to_xarray``, ``MappedCollection.to_xarray``.

References: the numpy arrays loompy wrote (``loompy_file``), h5py on the
same file for chunk shapes, numpy for the OME-Arrow tensors, and the real
files in ``shared/data``.
"""

from __future__ import annotations

import pickle
import warnings

import dask
import dask.array as da
import h5py
import numpy as np
import pytest
import xarray as xr
from hypothesis import assume, given
from hypothesis import strategies as st

import dask_loom
from dask_loom.errors import ElementNotFoundError, LoomFormatError
from dask_loom.hdf5 import STATS
from dask_loom.xarray_backend import LoomBackendArray, LoomBackendEntrypoint

# -- helpers ---------------------------------------------------------------------------------


class CountingScheduler:
    """xarray's ``raise_if_dask_computes`` pattern: count dask computes, raise past a limit."""

    def __init__(self, max_computes: int = 0) -> None:
        self.total = 0
        self.max = max_computes

    def __call__(self, dsk, keys, **kwargs):
        self.total += 1
        if self.total > self.max:
            raise RuntimeError(f"too many dask computes: {self.total} > {self.max}")
        return dask.get(dsk, keys, **kwargs)


def raise_if_dask_computes(max_computes: int = 0):
    return dask.config.set(scheduler=CountingScheduler(max_computes))


class ReadCounter:
    """Count ``read_block`` calls (= stored-chunk reads) of every chunk source class."""

    def __init__(self, monkeypatch) -> None:
        from dask_loom.hdf5 import HDF5Source
        from dask_loom.zarr._source import ZarrSource

        self.regions: list[tuple[slice, ...]] = []
        for cls in (HDF5Source, ZarrSource):
            orig = cls.read_block

            def counted(src, region, out=None, _orig=orig):
                self.regions.append(tuple(region))
                return _orig(src, region, out)

            monkeypatch.setattr(cls, "read_block", counted)

    @property
    def n(self) -> int:
        return len(self.regions)


@pytest.fixture(scope="module")
def zarr_twin(loompy_file, tmp_path_factory):
    path, _ = loompy_file
    out = tmp_path_factory.mktemp("xr") / "ref.loom.zarr"
    dask_loom.convert(path, out, scheduler="sync")
    return out


@pytest.fixture(params=["loom", "loom.zarr"])
def any_file(request, loompy_file, zarr_twin):
    path, ref = loompy_file
    return (path if request.param == "loom" else zarr_twin), ref


def _chunks(path) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        return f["matrix"].chunks


# -- registration ----------------------------------------------------------------------------


def test_entry_point_registered():
    xr.backends.refresh_engines()
    engines = xr.backends.list_engines()
    assert isinstance(engines["loom"], LoomBackendEntrypoint)
    # explicit parameters only: xarray rejects *args/**kwargs in a backend's open_dataset
    assert engines["loom"].open_dataset_parameters == (
        "filename_or_obj",
        "drop_variables",
        "row_dim",
        "col_dim",
        "layers",
        "storage_options",
        "validate",
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.loom", True),
        ("dir/a.LOOM", True),
        ("s3://bucket/a.loom.zarr/", True),
        ("a.loom.zarr", True),
        ("a.zarr", False),
        ("a.h5ad", False),
        ("a.nc", False),
    ],
)
def test_guess_can_open(name, expected):
    assert LoomBackendEntrypoint().guess_can_open(name) is expected


def test_engine_guessed_from_suffix(loompy_file):
    path, ref = loompy_file
    with xr.open_dataset(path) as ds:  # no engine=: the suffix picks "loom"
        np.testing.assert_array_equal(ds["matrix"].values, ref[""])


# -- layout and values ---------------------------------------------------------------------


def test_open_dataset_layout_and_values(any_file):
    path, ref = any_file
    with xr.open_dataset(path, engine="loom") as ds:
        assert set(ds.data_vars) == {"matrix", "spliced", "PCA"}
        assert ds["matrix"].dims == ("gene", "cell")
        assert dict(ds.sizes) == {"gene": 300, "cell": 517, "PCA_dim1": 3}
        assert ds["matrix"].dtype == ref[""].dtype
        assert ds["spliced"].dtype == ref["spliced"].dtype
        np.testing.assert_array_equal(ds["matrix"].values, ref[""])
        np.testing.assert_array_equal(ds["spliced"].values, ref["spliced"])
        for k, v in ref["ra"].items():
            if v.ndim == 1:
                assert ds.coords[k].dims == ("gene",)
                np.testing.assert_array_equal(ds.coords[k].values, v)
        for k, v in ref["ca"].items():
            assert ds.coords[k].dims == ("cell",)
            np.testing.assert_array_equal(ds.coords[k].values, v)
        assert ds["PCA"].dims == ("gene", "PCA_dim1")
        np.testing.assert_allclose(ds["PCA"].values, ref["ra"]["PCA"])
        assert ds.attrs["Title"] == "reference"
        # unaligned and fancy outer selections, read without dask
        m = ref[""]
        for kr, kc in [(slice(3, 70), slice(60, 130)), ([299, 0, 5, 5], slice(None, None, 7)), (5, [516, 2]), (slice(None, None, -9), 400)]:
            expected = m[kr][..., kc] if np.ndim(m[kr]) == 2 else m[kr][kc]
            np.testing.assert_array_equal(ds["matrix"][kr, kc].values, expected)
        # label-based selection through the attributes
        sub = ds.set_xindex("CellID")["matrix"].sel(CellID=["cell_9", "cell_2"])
        np.testing.assert_array_equal(sub.values, ref[""][:, [9, 2]])


def test_dims_layers_and_drop_variables(loompy_file):
    path, ref = loompy_file
    with xr.open_dataset(path, engine="loom", row_dim="feature", col_dim="obs", layers=["spliced"], drop_variables=["Score", "PCA"]) as ds:
        assert set(ds.data_vars) == {"spliced"}
        assert ds["spliced"].dims == ("feature", "obs")
        assert "Score" not in ds.coords
        assert "Gene" in ds.coords
        np.testing.assert_array_equal(ds["spliced"][5:9, ::50].values, ref["spliced"][5:9, ::50])
    with xr.open_dataset(path, engine="loom", layers="matrix") as ds:
        assert set(ds.data_vars) == {"matrix", "PCA"}


def test_chunks_empty_dict_is_storage_aligned(loompy_file):
    path, ref = loompy_file
    cr, cc = _chunks(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # xarray warns when chunks split the preferred ones
        ds = xr.open_dataset(path, engine="loom", chunks={})
    with ds:
        assert ds["matrix"].encoding["preferred_chunks"] == {"gene": cr, "cell": cc}
        rows, cols = ds["matrix"].data.chunks
        assert set(rows[:-1]) == {cr}
        assert set(cols[:-1]) == {cc}
        assert sum(rows) == 300
        assert sum(cols) == 517
        auto = xr.open_dataset(path, engine="loom", chunks="auto")["matrix"].data.chunks
        for sizes, c in zip(auto, (cr, cc)):
            assert all(s % c == 0 for s in sizes[:-1])
        np.testing.assert_allclose(ds["matrix"].mean("cell").values, ref[""].mean(axis=1), rtol=1e-6)


def test_subset_writes_to_zarr(loompy_file, tmp_path):
    path, ref = loompy_file
    with xr.open_dataset(path, engine="loom", chunks={}) as ds, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notes on fixed-width strings and consolidated metadata
        # a subset on stored-chunk boundaries keeps zarr's uniform chunks
        ds.isel(cell=slice(64, 448)).to_zarr(tmp_path / "sub.zarr", mode="w")
        back = xr.open_zarr(tmp_path / "sub.zarr")
        np.testing.assert_array_equal(back["spliced"].values, ref["spliced"][:, 64:448])
        np.testing.assert_array_equal(back["CellID"].values, ref["ca"]["CellID"][64:448])


def test_misaligned_chunks_warn(loompy_file):
    path, _ = loompy_file
    with pytest.warns(UserWarning, match="separate the stored chunks"):
        xr.open_dataset(path, engine="loom", chunks={"gene": 50})


# -- laziness --------------------------------------------------------------------------------


def test_no_data_read_while_opening_and_selecting(loompy_file, monkeypatch):
    path, ref = loompy_file
    reads = ReadCounter(monkeypatch)
    before = dict(STATS)
    with raise_if_dask_computes(0):
        ds = xr.open_dataset(path, engine="loom", chunks={})
        sel = ds["matrix"].isel(gene=slice(70, 130), cell=[400, 3, 7]).astype("float64") * 2
        lazy = xr.open_dataset(path, engine="loom")["spliced"].isel(gene=[5, 299], cell=slice(10, 20))
    assert reads.n == 0
    assert before == STATS
    assert isinstance(sel.data, da.Array)
    out = sel.compute(scheduler="sync")
    np.testing.assert_array_equal(out.values, ref[""][70:130][:, [400, 3, 7]] * 2)
    # only the chunks holding the selection: rows 64..191 (2 chunk rows) x cols in chunks 0 and 6
    cr, cc = _chunks(path)
    touched = {(r[0].start // cr, r[1].start // cc) for r in reads.regions}
    assert touched == {(1, 0), (2, 0), (1, 6), (2, 6)}
    n = reads.n
    np.testing.assert_array_equal(lazy.values, ref["spliced"][[5, 299], 10:20])
    assert reads.n - n == 2  # row chunks 0 and 4, one column chunk


def test_lazy_zarr(zarr_twin, loompy_file, monkeypatch):
    _, ref = loompy_file
    reads = ReadCounter(monkeypatch)
    with raise_if_dask_computes(0):
        ds = xr.open_dataset(zarr_twin, engine="loom", chunks={})
        x = ds["spliced"][:64, :64]
    assert reads.n == 0
    np.testing.assert_array_equal(x.compute(scheduler="sync").values, ref["spliced"][:64, :64])
    assert reads.n == 1


class _Ref:
    """The file and its main matrix, with a short repr (hypothesis prints its arguments)."""

    def __init__(self, path, matrix) -> None:
        self.path, self.matrix = path, matrix

    def __repr__(self) -> str:
        return "<loompy reference file>"


@pytest.fixture(scope="module")
def main_ref(loompy_file):
    path, ref = loompy_file
    return _Ref(path, ref[""])


@given(data=st.data())
def test_outer_indexing_against_numpy(main_ref, data):
    ds = xr.open_dataset(main_ref.path, engine="loom")
    m = main_ref.matrix

    def axis_key(n):
        key = data.draw(
            st.one_of(
                st.integers(-n, n - 1),
                st.builds(slice, st.none() | st.integers(-n, n), st.none() | st.integers(-n, n), st.sampled_from([None, 1, 2, 5, -1, -3])),
                st.lists(st.integers(0, n - 1), min_size=1, max_size=12).map(np.array),
            )
        )
        # xarray's own outer-indexer decomposition fails on empty negative-step
        # slices for every backend (zarr too): not what this test is about.
        assume(not (isinstance(key, slice) and (key.step or 1) < 0 and not len(range(*key.indices(n)))))
        return key

    kr, kc = axis_key(300), axis_key(517)
    # numpy's outer selection: one axis at a time
    expected = m[kr][..., kc] if np.ndim(m[kr]) == 2 else m[kr][kc]
    got = ds["matrix"][{"gene": kr, "cell": kc}].values
    np.testing.assert_array_equal(got, expected)


def test_vectorized_indexing(loompy_file):
    path, ref = loompy_file
    with xr.open_dataset(path, engine="loom") as ds:
        pts = ds["matrix"].isel(gene=xr.DataArray([1, 200, 5], dims="p"), cell=xr.DataArray([500, 3, 3], dims="p"))
        np.testing.assert_array_equal(pts.values, ref[""][[1, 200, 5], [500, 3, 3]])


# -- distributed -------------------------------------------------------------------------------


def test_backend_array_pickles_without_a_handle(loompy_file):
    path, ref = loompy_file
    ds = xr.open_dataset(path, engine="loom")
    arr = LoomBackendArray(ds["matrix"].variable._data.array.array.array.source)
    back = pickle.loads(pickle.dumps(arr))
    assert back.shape == (300, 517)
    assert back.dtype == ref[""].dtype
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds))["matrix"][3:5].values, ref[""][3:5])


@pytest.mark.cluster
def test_on_local_cluster(any_file, local_cluster):
    path, ref = any_file
    with xr.open_dataset(path, engine="loom", chunks={}) as ds:
        total = ds["spliced"].sum("gene").compute(scheduler=local_cluster)
        np.testing.assert_array_equal(total.values, ref["spliced"].sum(axis=0))
        # a lazily indexed (un-chunked) dataset read inside a worker task
        lazy = xr.open_dataset(path, engine="loom")
        fut = local_cluster.submit(lambda d: d["matrix"][10:20, ::3].values, lazy)
        np.testing.assert_array_equal(fut.result(), ref[""][10:20, ::3])


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input(tmp_path, loompy_file):
    path, _ = loompy_file
    txt = tmp_path / "notes.loom"
    txt.write_text("not a loom file")
    with pytest.raises(LoomFormatError, match=r"notes\.loom"):
        xr.open_dataset(txt, engine="loom")
    h5 = tmp_path / "other.loom"
    with h5py.File(h5, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(LoomFormatError, match="not a Loom file"):
        xr.open_dataset(h5, engine="loom")
    with pytest.raises(FileNotFoundError, match=r"missing\.loom"):
        xr.open_dataset(tmp_path / "missing.loom", engine="loom")
    with pytest.raises(TypeError, match="colour"):
        xr.open_dataset(path, engine="loom", colour="red")
    with pytest.raises(ValueError, match="must differ"):
        xr.open_dataset(path, engine="loom", row_dim="x", col_dim="x")
    with pytest.raises(ElementNotFoundError, match="no layer 'unspliced'"):
        xr.open_dataset(path, engine="loom", layers=["unspliced"])


# -- real files ------------------------------------------------------------------------------


def test_real_files(data_dir):
    with xr.open_dataset(data_dir / "loom/loompy-test/test_2018-07.loom", engine="loom", chunks={}) as ds:
        assert ds["matrix"].data.chunksize == (64, 64)
        assert float(ds["matrix"].sum()) == 100.0
        np.testing.assert_array_equal(ds.coords["g_id"].values, np.arange(1000))
        assert ds.attrs["LOOM_SPEC_VERSION"] == "2.0.1"
    with xr.open_dataset(data_dir / "loom/scopeloomr/example.loom", engine="loom") as ds:
        # compound attributes: one variable over the field names
        assert ds["Embedding"].dims == ("cell", "Embedding_field")
        assert list(ds["Embedding_field"].values) == ["_X", "_Y"]
        assert float(ds["matrix"].sum()) == 2418
        assert list(ds.coords["Gene"].values[:2]) == ["gene_1", "gene_2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested row_attrs groups are skipped with a warning
        ds = xr.open_dataset(data_dir / "loom/loomexperiment/legacy-2018/scle_example_2018.loom", engine="loom")
    assert ds["reducedDims/PCA"].dims == ("cell", "reducedDims/PCA_dim1")
    assert int(ds["matrix"].sum()) == 100297
    with h5py.File(data_dir / "loom/loomexperiment/legacy-2018/scle_example_2018.loom", "r") as f:
        np.testing.assert_array_equal(ds["logcounts"].values, f["layers/logcounts"][:])


# -- to_xarray on connections, tensor views and collections ---------------------------------------


def test_connection_to_xarray(any_file):
    path, ref = any_file
    with dask_loom.connect(path, "r") as conn:
        ds = conn.to_xarray(chunks={0: 128})
        assert isinstance(ds["matrix"].data, da.Array)
        assert dask.utils.key_split(ds["matrix"].data.name) == "loom-read"
        unit = conn.layers[""]._source().chunk_shape[0]  # 128 rows, rounded out to the stored unit
        assert ds["matrix"].data.chunks[0][0] == min(300, -(-128 // unit) * unit)
        np.testing.assert_array_equal(ds["spliced"].values, ref["spliced"])
        np.testing.assert_array_equal(ds.coords["ClusterName"].values, ref["ca"]["ClusterName"])
        assert conn.to_xarray(row_dim="g", col_dim="c", layers=["spliced"])["spliced"].dims == ("g", "c")


def test_tensor_view_to_xarray():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4000, size=(3, 2, 4, 20, 24), dtype=np.uint16)  # T C Z Y X
    rec = dask_loom.to_ome_arrow(
        a,
        chunk_shape=(2, 8, 8),
        channel_names=["DNA", "Actin"],
        physical_size_x=0.5,
        physical_size_y=0.25,
        physical_size_z=2.0,
        physical_size_unit="µm",
    )
    tv = dask_loom.TensorView(rec, t=[2, 0], c=[1, 0], roi=(4, 2, 10, 12))
    xa = tv.to_xarray()
    assert xa.dims == ("t", "z", "c", "y", "x")
    assert isinstance(xa.data, da.Array)
    assert list(xa.coords["c"].values) == ["Actin", "DNA"]
    np.testing.assert_allclose(xa.coords["x"].values, np.arange(4, 14) * 0.5)
    np.testing.assert_allclose(xa.coords["y"].values, np.arange(2, 14) * 0.25)
    np.testing.assert_allclose(xa.coords["z"].values, np.arange(4) * 2.0)
    assert xa.coords["x"].attrs["units"] == "µm"
    np.testing.assert_array_equal(xa.coords["t"].values, [2, 0])
    expected = a[[2, 0]][:, [1, 0]][:, :, :, 2:14, 4:14].transpose(0, 2, 1, 3, 4)
    np.testing.assert_array_equal(xa.values, expected)
    np.testing.assert_array_equal(xa.sel(c="DNA").values, expected[:, :, 1])
    # layout order, dropped singleton axes kept as scalar coordinates
    one = dask_loom.TensorView(rec, t=1, z=3, c=0, layout="YX").to_xarray()
    assert one.dims == ("y", "x")
    assert one.coords["c"].item() == "DNA"
    assert one.coords["z"].item() == 6.0
    np.testing.assert_array_equal(one.values, a[1, 0, 3])
    lazy = dask_loom.LazyTensorView(loader=lambda: rec, layout="CZYX", t=0)
    assert lazy.to_xarray().dims == ("c", "z", "y", "x")


def test_tensor_view_to_xarray_real(data_dir):
    tv = dask_loom.open_ome_arrow(data_dir / "ome/BR00117006.ome.parquet")
    xa = tv.to_xarray()
    assert xa.dims == tuple("cyx")
    assert xa.coords["x"].attrs["units"] == "µm"
    np.testing.assert_array_equal(xa.values, tv.to_numpy())


def test_mapped_collection_to_xarray(tmp_path):
    anndata = pytest.importorskip("anndata")
    import pandas as pd

    refs = []
    for i in range(2):
        x = np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * i
        obs = pd.DataFrame({"kind": pd.Categorical(["a", "b", "a", "b"])}, index=[f"c{i}{j}" for j in range(4)])
        ad = anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2"]))
        ad.write_h5ad(tmp_path / f"p{i}.h5ad")
        refs.append(ad)
    mc = dask_loom.MappedCollection([tmp_path / "p0.h5ad", tmp_path / "p1.h5ad"], obs_keys=["kind"], join="inner")
    ds = mc.to_xarray()
    assert ds["X"].dims == ("obs", "var")
    np.testing.assert_array_equal(ds["X"].values, np.concatenate([r.X for r in refs]))
    assert list(ds["obs_names"].values) == [n for r in refs for n in r.obs_names]
