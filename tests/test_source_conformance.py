"""Every ChunkSource implementation passes the same tests (in the manner of zarr-python's ``StoreTests``).

:class:`SourceTests` is the contract of :class:`dask_loom.blocks.ChunkSource`:
its blocks are unions of whole stored chunks (the unit the format's own
writer chose), they read what the format's own reader reads, the source
pickles and runs on a process LocalCluster, its dask token is deterministic
(the same storage opened twice gives the same token, and a pickled copy
too), partial chunks at the array edge read right, and an empty axis gives
empty results.  Each implementation subclasses it with a ``make`` fixture:
HDF5Source (a plain dataset and a Loom layer), ZarrSource (v2, v3, sharded,
a ``.loom.zarr`` layer), AnnDataSource (dense, CSR and CSC files, h5ad and
zarr) and OMEChunkSource.
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from dask.base import tokenize
from dask.utils import key_split

import dask_loom
from dask_loom.blocks import ChunkSource, block_regions, from_source
from dask_loom.ops._engine import plan_source

SMALL = 2048  # bytes per block: several blocks on every fixture


class SourceTests:
    """The ChunkSource contract.

    Subclasses provide ``make``: a fixture returning a zero-argument factory
    ``() -> (source, reference numpy array, stored unit)`` (each call opens
    the storage anew), and ``make_empty`` (the same for data with an empty
    axis; it skips, saying why, where the format cannot hold one).
    """

    #: The format's read prefix.
    prefix: str = ""

    @pytest.fixture
    def make(self) -> Callable[[], tuple[Any, np.ndarray, tuple[int, ...]]]:  # pragma: no cover - overridden
        raise AssertionError("subclasses provide the make fixture")

    @pytest.fixture
    def make_empty(
        self,
    ) -> Callable[[], tuple[Any, np.ndarray, tuple[int, ...]]]:  # pragma: no cover - overridden
        raise AssertionError("subclasses provide the make_empty fixture")

    # -- the protocol ---------------------------------------------------------------------------

    def test_protocol(self, make):
        src, ref, _ = make()
        assert isinstance(src, ChunkSource)
        assert tuple(src.shape) == ref.shape
        assert np.dtype(src.dtype) == ref.dtype
        assert src.prefix == self.prefix
        assert key_split(f"{src.prefix}-{tokenize(src)}") == src.prefix

    def test_chunk_shape_is_the_stored_unit(self, make):
        src, _, unit = make()
        assert tuple(src.chunk_shape) == unit

    def test_blocks_align_with_stored_chunks(self, make):
        src, ref, unit = make()
        for band_axis in (None, *range(ref.ndim)):
            plan = plan_source(src, band_axis=band_axis, target_bytes=SMALL)
            assert tuple(sum(c) for c in plan) == ref.shape
            for sizes, u in zip(plan, unit):
                edges = np.cumsum(sizes)[:-1]
                assert np.all(edges % u == 0), (sizes, u)  # interior boundaries on stored-chunk boundaries
            if band_axis is None:
                assert math.prod(len(c) for c in plan) > 1  # the test covers several blocks
        assert all(np.all(np.cumsum(c)[:-1] % u == 0) for c, u in zip(from_source(src).chunks, unit))

    def test_blocks_read_the_reference(self, make):
        src, ref, _ = make()
        plan = plan_source(src, target_bytes=SMALL)
        for _, region in block_regions(plan):
            np.testing.assert_array_equal(src.read_block(region), ref[region])
        np.testing.assert_array_equal(from_source(src, target_bytes=SMALL).compute(scheduler="threads"), ref)

    def test_edge_chunks(self, make):
        src, ref, unit = make()
        partial = [d for d, (n, u) in enumerate(zip(ref.shape, unit)) if n % u]
        assert partial, "the fixture's shape should not be a multiple of its chunks"
        region = tuple(slice((n - 1) // u * u, n) for n, u in zip(ref.shape, unit))  # the last, partial chunk
        np.testing.assert_array_equal(src.read_block(region), ref[region])
        region = tuple(
            slice(max(0, (n - 1) // u * u - u), n) for n, u in zip(ref.shape, unit)
        )  # with its neighbour
        np.testing.assert_array_equal(src.read_block(region), ref[region])

    def test_deterministic_token(self, make):
        src, _, _ = make()
        again, _, _ = make()  # the same storage, opened anew
        copy = pickle.loads(pickle.dumps(src))
        assert tokenize(src) == tokenize(src) == tokenize(again) == tokenize(copy)
        assert from_source(src).name == from_source(again).name

    def test_pickles(self, make):
        src, ref, _ = make()
        copy = pickle.loads(pickle.dumps(src))
        full = tuple(slice(0, n) for n in ref.shape)
        np.testing.assert_array_equal(copy.read_block(full), ref)
        assert copy.prefix == src.prefix and tuple(copy.chunk_shape) == tuple(src.chunk_shape)

    @pytest.mark.cluster
    def test_runs_on_process_cluster(self, make, local_cluster):
        src, ref, _ = make()
        x = from_source(src, target_bytes=SMALL)
        np.testing.assert_array_equal(x.compute(scheduler=local_cluster), ref)
        axis = ref.ndim - 1
        other = tuple(range(ref.ndim - 1))
        (total,) = dask_loom.map(src, [np.sum], axis=axis, client=local_cluster)
        np.testing.assert_allclose(total, ref.astype(np.float64).sum(axis=other), rtol=1e-6)

    def test_empty_axis(self, make_empty):
        src, ref, _ = make_empty()
        assert 0 in tuple(src.shape) and tuple(src.shape) == ref.shape
        assert from_source(src).compute(scheduler="sync").shape == ref.shape
        for axis in range(ref.ndim):
            (total,) = dask_loom.map(src, [np.sum], axis=axis)
            assert total.shape == (ref.shape[axis],)
            assert not total.any()


class SparseSourceTests(SourceTests):
    """CSR (and CSC) sources also hand out ``scipy.sparse.csr_matrix`` blocks."""

    def test_sparse_blocks(self, make):
        src, ref, _ = make()
        assert src.sparse
        for _, region in block_regions(plan_source(src, target_bytes=SMALL)):
            block = src.read_sparse(region)
            assert isinstance(block, sp.csr_matrix)
            np.testing.assert_array_equal(block.toarray(), ref[region])


# -- HDF5 -------------------------------------------------------------------------------------


def _h5(path, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=data, chunks=chunks, compression="gzip", maxshape=(None,) * data.ndim)


class TestHDF5Source(SourceTests):
    prefix = "hdf-read"

    @pytest.fixture
    def make(self, tmp_path):
        from dask_loom.hdf5 import HDF5Source, dataset_layout
        from dask_loom.storage import FileSpec

        data = np.random.default_rng(0).random((37, 29)).astype("f4")
        _h5(tmp_path / "a.h5", data, (8, 6))

        def make():
            spec = FileSpec.from_path(tmp_path / "a.h5")
            return HDF5Source(spec, dataset_layout(spec, "x")), data, (8, 6)

        return make

    @pytest.fixture
    def make_empty(self, tmp_path):
        from dask_loom.hdf5 import HDF5Source, dataset_layout
        from dask_loom.storage import FileSpec

        data = np.zeros((0, 5), "f4")
        _h5(tmp_path / "e.h5", data, (4, 5))

        def make():
            spec = FileSpec.from_path(tmp_path / "e.h5")
            return HDF5Source(spec, dataset_layout(spec, "x")), data, (4, 5)

        return make


class TestLoomLayerSource(SourceTests):
    """A Loom file's layer (HDF5, loompy's 64x64 chunks)."""

    prefix = "loom-read"

    @pytest.fixture
    def make(self, tmp_path):
        import loompy

        data = np.random.default_rng(1).random((100, 71)).astype("f4")
        loompy.create(str(tmp_path / "a.loom"), data, {"G": np.arange(100)}, {"C": np.arange(71)})

        def make():
            with dask_loom.connect(tmp_path / "a.loom", "r") as ds:
                return ds.__dask_loom_layer_host__().source(""), data, (64, 64)

        return make

    @pytest.fixture
    def make_empty(self):
        pytest.skip("a Loom file has at least one row and one column (loompy refuses empty matrices)")


# -- Zarr -------------------------------------------------------------------------------------


def _zarr_factory(path, data: np.ndarray, node: str = "", **kw: Any) -> Callable[[], Any]:
    import zarr

    if node:
        zarr.open_group(str(path), mode="w").create_array(node, shape=data.shape, dtype=data.dtype, **kw)[
            ...
        ] = data
    else:
        zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, **kw)[...] = data

    def make():
        a = dask_loom.open_zarr(str(path), node, mode="r")
        return a.source(), data, a.chunk_shape

    return make


class TestZarrSourceV2(SourceTests):
    prefix = "zarr-read"

    @pytest.fixture
    def make(self, tmp_path):
        data = np.random.default_rng(2).integers(0, 100, (37, 29)).astype("i4")
        return _zarr_factory(tmp_path / "a.zarr", data, chunks=(8, 6), zarr_format=2)

    @pytest.fixture
    def make_empty(self, tmp_path):
        return _zarr_factory(tmp_path / "e.zarr", np.zeros((0, 7), "f8"), chunks=(4, 4), zarr_format=2)


class TestZarrSourceV3(SourceTests):
    prefix = "zarr-read"

    @pytest.fixture
    def make(self, tmp_path):
        data = np.random.default_rng(3).random((11, 19, 13))
        return _zarr_factory(tmp_path / "a.zarr", data, node="g/x", chunks=(4, 8, 5))

    @pytest.fixture
    def make_empty(self, tmp_path):
        return _zarr_factory(tmp_path / "e.zarr", np.zeros((3, 0, 4), "f4"), chunks=(2, 2, 2))


class TestZarrSourceSharded(SourceTests):
    """The storage unit of a sharded array is the shard."""

    prefix = "zarr-read"

    @pytest.fixture
    def make(self, tmp_path):
        data = np.random.default_rng(4).random((37, 29)).astype("f4")
        return _zarr_factory(tmp_path / "a.zarr", data, chunks=(4, 6), shards=(8, 12))

    @pytest.fixture
    def make_empty(self, tmp_path):
        return _zarr_factory(tmp_path / "e.zarr", np.zeros((0, 6), "f4"), chunks=(2, 3), shards=(4, 6))


class TestLoomZarrLayerSource(SourceTests):
    """A ``.loom.zarr`` layer (sharded: 16 x 16 inner chunks in 32 x 32 shards, the stored unit)."""

    prefix = "loom-read"

    @pytest.fixture
    def make(self, tmp_path):
        import dask

        data = np.random.default_rng(5).random((70, 45)).astype("f4")
        dask_loom.create(str(tmp_path / "a.loom"), data, {"G": np.arange(70)}, {"C": np.arange(45)})
        # Shards of 2 x 2 inner chunks (the default block-size would make one shard of this array).
        # (coalesce-bytes this small never grows them, test_shard_sizing.py).
        with dask.config.set({"dask_loom.block-size": 4 * 16 * 16 * 4, "dask_loom.coalesce-bytes": 64}):
            dask_loom.convert(tmp_path / "a.loom", tmp_path / "a.loom.zarr", chunks=(16, 16))

        def make():
            with dask_loom.connect(tmp_path / "a.loom.zarr", "r") as ds:
                return ds.__dask_loom_layer_host__().source(""), data, (32, 32)

        return make

    @pytest.fixture
    def make_empty(self):
        pytest.skip("a Loom container has at least one row and one column")


# -- AnnData ----------------------------------------------------------------------------------


def _anndata(tmp_path, kind: str, store: str, *, empty: bool = False) -> Callable[[], Any]:
    import anndata as ad
    import pandas as pd

    from dask_loom.anndata._source import collection_info

    warnings.simplefilter("ignore")
    rng = np.random.default_rng(6)
    data = (rng.random((53, 21)) * (rng.random((53, 21)) < 0.3)).astype("f4")
    mat = {"dense": data, "csr": sp.csr_matrix(data), "csc": sp.csc_matrix(data)}[kind]
    obs = pd.DataFrame({"k": pd.Categorical(["a", "b"] * 26 + ["a"])}, index=[f"c{i}" for i in range(53)])
    a = ad.AnnData(mat, obs=obs)
    path = tmp_path / f"x.{store}"
    if store == "h5ad":
        # dense X chunked by rows (9 x 21), as a writer choosing row chunks stores it
        a.write_h5ad(path, compression="gzip", compression_opts=1) if kind != "dense" else a.write_h5ad(path)
        if kind == "dense":
            import h5py

            with h5py.File(path, "a") as f:
                attrs = dict(f["X"].attrs)
                del f["X"]
                f.create_dataset("X", data=data, chunks=(9, 21), compression="gzip")
                f["X"].attrs.update(attrs)
    else:
        a.write_zarr(path, chunks=(9, 21) if kind == "dense" else None)

    def make():
        mc = dask_loom.MappedCollection([path], obs_keys="k", obs_filter={"k": ["none"]} if empty else None)
        src = collection_info(mc).parts[0]
        ref = data[:0] if empty else data
        unit = (9, 21) if kind == "dense" and not empty else (1, 21)
        return src, ref, unit

    return make


class _AnnDataTests(SourceTests):
    kind = ""
    store = ""

    @property
    def prefix(self) -> str:  # type: ignore[override]
        return "h5ad-read" if self.store == "h5ad" else "zarr-read"

    @pytest.fixture
    def make(self, tmp_path):
        return _anndata(tmp_path, self.kind, self.store)

    @pytest.fixture
    def make_empty(self, tmp_path):
        return _anndata(tmp_path, self.kind, self.store, empty=True)  # obs_filter keeps no row of the file


class TestAnnDataDenseH5ad(_AnnDataTests):
    kind, store = "dense", "h5ad"


class TestAnnDataDenseZarr(_AnnDataTests):
    kind, store = "dense", "zarr"


class _AnnDataSparseTests(_AnnDataTests, SparseSourceTests):
    def test_bands_are_the_collections_dask_bands(self, make, tmp_path):
        """The same row bands as MappedCollection.to_dask (the collection's reader and plan)."""
        src, _, _ = make()
        from dask_loom._config import block_size_bytes

        plan = plan_source(src, target_bytes=SMALL)
        import dask

        with dask.config.set({"dask_loom.block-size": SMALL}):
            assert block_size_bytes() == SMALL
            mc = dask_loom.MappedCollection([src.layer_plan.store.spec.url])
            assert mc.to_dask(target_bytes=SMALL).chunks[0] == plan[0]

    def test_edge_chunks(self, make):
        """CSR rows are cut anywhere (unit 1): the edges are the last row band and column ranges inside the width."""
        src, ref, _ = make()
        plan = plan_source(src, target_bytes=SMALL)
        last = (slice(int(sum(plan[0][:-1])), ref.shape[0]), slice(0, ref.shape[1]))
        np.testing.assert_array_equal(src.read_sparse(last).toarray(), ref[last])
        inner = (slice(3, ref.shape[0] - 2), slice(5, ref.shape[1] - 1))
        np.testing.assert_array_equal(src.read_sparse(inner).toarray(), ref[inner])
        np.testing.assert_array_equal(src.read_block(inner), ref[inner])


class TestAnnDataCSRH5ad(_AnnDataSparseTests):
    kind, store = "csr", "h5ad"


class TestAnnDataCSRZarr(_AnnDataSparseTests):
    kind, store = "csr", "zarr"


class TestAnnDataCSCH5ad(_AnnDataSparseTests):
    kind, store = "csc", "h5ad"


class TestAnnDataCSCZarr(_AnnDataSparseTests):
    kind, store = "csc", "zarr"


# -- OME-Arrow -------------------------------------------------------------------------------


class TestOMEChunkSource(SourceTests):
    prefix = "ome-read"

    @pytest.fixture
    def make(self, tmp_path):
        from dask_loom.ome._views import OMEChunkSource

        img = np.random.default_rng(7).integers(0, 4000, (2, 3, 5, 26, 38)).astype("uint16")  # TCZYX
        dask_loom.write_ome_arrow_dataset(img, tmp_path / "img", chunk_shape=(1, 1, 2, 16, 16))

        def make():
            tv = dask_loom.open_ome_arrow(tmp_path / "img")
            return OMEChunkSource(tv.image, tv.dtype), img.transpose(0, 2, 1, 3, 4), (1, 2, 1, 16, 16)

        return make

    @pytest.fixture
    def make_empty(self):
        pytest.skip(
            "an OME-Arrow image has at least one pixel on every axis (the schema requires sizes >= 1)"
        )
