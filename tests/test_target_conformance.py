"""One conformance suite for chunk targets, in the manner of zarr-python's ``StoreTests``.

:class:`TargetTests` holds the tests; each target kind (HDF5, Zarr local v3 /
sharded / v2, Zarr on an object store, an OME-Arrow chunk dataset, a Loom
layer in a .loom and in a .loom.zarr) subclasses it with its ``kind``.  Every
kind is read back by its peer (h5py, zarr-python, ome-arrow) and compared
with numpy: alignment, pickling and running on a process LocalCluster,
deterministic tokens, edge chunks, empty axes, and a transaction aborted
half-way leaving nothing of itself.
"""

from __future__ import annotations

import pickle
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from _targets import HDF5, OME, AnnData, LoomHDF5, LoomZarr, ZarrLocal, ZarrS3, ZarrSharded, ZarrV2
from dask.base import tokenize
from dask.callbacks import Callback
from dask.utils import key_split

import dask_loom
from dask_loom.blocks import ChunkTarget, align_chunks, block_regions
from dask_loom.errors import ChunkAlignmentError, ChunkAlignmentWarning

SHAPE = (70, 45)  # not a multiple of the chunks: edge chunks on both axes
CHUNKS = (16, 16)


def _data(shape, seed=0, dtype="f4"):
    return (np.random.default_rng(seed).random(shape) * 100).astype(dtype)


class _Boom(RuntimeError):
    pass


def _fail_at(block, block_info=None):
    # One block in the middle of the array fails: the write is aborted half-way.
    if block_info[0]["chunk-location"][-2:] == (1, 1):
        raise _Boom("block (1, 1) failed half-way")
    return block


class TargetTests:
    """The tests every chunk target passes; subclasses set ``kind``."""

    kind = None

    # -- helpers --------------------------------------------------------------------------------

    def make(self, tmp, shape=SHAPE, chunks=CHUNKS, dtype="f4", old=None):
        return self.kind.make(tmp, self.kind.full(shape), self.kind.full_chunks(chunks), dtype, old=old)

    def read(self, tmp):
        return self.kind.read(tmp)

    def full(self, a):
        return a.reshape(self.kind.full(a.shape))

    # -- the protocol ---------------------------------------------------------------------------

    def test_is_a_chunk_target(self, tmp_path):
        t = self.make(tmp_path)
        assert isinstance(t, ChunkTarget)
        assert t.shape == self.kind.full(SHAPE)
        assert np.dtype(t.dtype) == np.dtype("f4")
        assert len(t.chunk_shape) == len(t.shape)
        # Task names group on the dashboard: no digits, no hex-like words.
        assert key_split(f"{t.prefix}-{tokenize(t)}") == t.prefix
        assert all(w.isalpha() for w in t.prefix.split("-"))

    def test_store_dask_reads_back(self, tmp_path):
        a = _data(SHAPE)
        x = da.from_array(self.full(a), chunks=self.kind.full_chunks((32, 32)))
        dask_loom.store(x, self.make(tmp_path))
        np.testing.assert_array_equal(self.read(tmp_path), self.full(a))

    def test_tasks_are_named_by_the_prefix(self, tmp_path):
        a = _data(SHAPE)
        t = self.make(tmp_path)
        keys = []
        with Callback(pretask=lambda key, dsk, state: keys.append(key)):
            dask_loom.store(da.from_array(self.full(a), chunks=self.kind.full_chunks((32, 32))), t, scheduler="threads")
        ours = [k for k in keys if key_split(k) == t.prefix]
        # One task per block of whole write units (32 x 32 blocks, rounded out where a unit is larger).
        plan = align_chunks(self.kind.full_chunks(((32, 32, 6), (32, 13))), t.shape, t.chunk_shape, "f4")
        assert len(ours) == len(block_regions(plan))
        np.testing.assert_array_equal(self.read(tmp_path), self.full(a))

    # -- alignment ------------------------------------------------------------------------------

    def bands(self, t, shape=SHAPE):
        """Full-width row bands of whole write units (chunks or shards) covering the array."""
        lead = tuple(slice(0, n) for n in self.kind.lead)
        rows = t.chunk_shape[-2]
        return [(*lead, slice(r, min(shape[0], r + rows)), slice(0, shape[1])) for r in range(0, shape[0], rows)]

    def test_misaligned_region_refused(self, tmp_path):
        t = self.make(tmp_path)
        lead = tuple(slice(0, n) for n in self.kind.lead)
        rows, cols = t.chunk_shape[-2:]
        ones = (*self.kind.lead,)
        with t.transaction():
            with pytest.raises(ChunkAlignmentError, match="splits the stored chunks"):
                stop = min(SHAPE[0], rows // 2 + rows)
                t.write_block((*lead, slice(rows // 2, stop), slice(0, cols)), np.zeros((*ones, stop - rows // 2, cols), "f4"))
            with pytest.raises(ChunkAlignmentError, match="splits the stored chunks"):
                t.encode_block((*lead, slice(0, rows), slice(0, cols - 3)), np.zeros((*ones, rows, cols - 3), "f4"))
            with pytest.raises(ChunkAlignmentError, match="outside the array"):
                t.encode_block((*lead, slice(0, rows), slice(0, 64)), np.zeros((*ones, rows, 64), "f4"))
            # In order (some targets append), the last band in two blocks: zeros, then ones
            # up to the array's edge, which ends the edge chunk (a whole chunk).
            r0, c0 = (SHAPE[0] - 1) // rows * rows, (SHAPE[1] - 1) // cols * cols
            for region in self.bands(t)[:-1]:
                t.write_block(region, np.zeros(tuple(r.stop - r.start for r in region), "f4"))
            if c0:
                t.write_block((*lead, slice(r0, SHAPE[0]), slice(0, c0)), np.zeros((*ones, SHAPE[0] - r0, c0), "f4"))
            t.write_block((*lead, slice(r0, SHAPE[0]), slice(c0, SHAPE[1])), np.ones((*ones, SHAPE[0] - r0, SHAPE[1] - c0), "f4"))
        expect = np.zeros(SHAPE, "f4")
        expect[r0:, c0:] = 1
        np.testing.assert_array_equal(self.read(tmp_path), self.full(expect))

    def test_misaligned_chunks_rounded_with_a_warning(self, tmp_path):
        a = _data(SHAPE, seed=1)
        x = da.from_array(self.full(a), chunks=self.kind.full_chunks((10, 20)))
        with pytest.warns(ChunkAlignmentWarning, match="rounded out"):
            dask_loom.store(x, self.make(tmp_path))
        np.testing.assert_array_equal(self.read(tmp_path), self.full(a))

    # -- pickling, processes, tokens ---------------------------------------------------------------

    def test_pickled_copy_encodes_the_same(self, tmp_path):
        a = _data(SHAPE, seed=2)
        t = self.make(tmp_path)
        with t.transaction():
            copy = pickle.loads(pickle.dumps(t))
            assert tokenize(copy) == tokenize(t)
            for region in self.bands(t):
                # Encoded in the copy (as a task would), stored by the original (the writer).
                t.store_payload(copy.encode_block(region, self.full(a)[region]))
        np.testing.assert_array_equal(self.read(tmp_path), self.full(a))

    @pytest.mark.cluster
    def test_runs_on_a_process_cluster(self, tmp_path, local_cluster):
        if not self.kind.cluster:
            pytest.skip(f"{self.kind}: tasks in other processes cannot write it")
        a = _data(SHAPE, seed=3)
        x = da.from_array(self.full(a), chunks=self.kind.full_chunks((32, 16)))
        dask_loom.store(x, self.make(tmp_path), client=local_cluster)
        np.testing.assert_array_equal(self.read(tmp_path), self.full(a))
        # numpy input too: blocks travel to the workers with their tasks.
        dask_loom.store(self.full(a[::-1].copy()), self.make(tmp_path), client=local_cluster)
        np.testing.assert_array_equal(self.read(tmp_path), self.full(a[::-1]))

    def test_deterministic_tokens(self, tmp_path):
        t1, t2 = self.make(tmp_path), self.make(tmp_path)
        assert tokenize(t1) == tokenize(t2)
        other = self.make(tmp_path, shape=(70, 44))
        assert tokenize(other) != tokenize(t1)

    # -- edges and empties ------------------------------------------------------------------------

    @pytest.mark.parametrize("shape", [(1, 1), (16, 16), (17, 33), (5, 200)])
    def test_edge_chunks(self, tmp_path, shape):
        a = _data(shape, seed=4)
        dask_loom.store(self.full(a), self.make(tmp_path, shape=shape))
        np.testing.assert_array_equal(self.read(tmp_path), self.full(a))

    @pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
    def test_empty_axis(self, tmp_path, shape):
        if isinstance(self.kind, (LoomHDF5,)):
            pytest.skip("a Loom file's main matrix is never empty (create refuses it, as loompy does)")
        dask_loom.store(np.zeros(shape, "f4").reshape(self.kind.full(shape)), self.make(tmp_path, shape=shape))
        got = self.read(tmp_path)
        assert got is not None and got.shape == self.kind.full(shape)
        dask_loom.store(da.zeros(self.kind.full(shape), chunks=self.kind.full_chunks((4, 4)), dtype="f4"), self.make(tmp_path, shape=shape))
        assert self.read(tmp_path).shape == self.kind.full(shape)

    # -- transactions -----------------------------------------------------------------------------

    def test_abort_half_way_leaves_the_old_content(self, tmp_path):
        old = self.full(_data(SHAPE, seed=5))
        t = self.make(tmp_path, old=old)
        x = da.from_array(self.full(_data(SHAPE, seed=6)), chunks=self.kind.full_chunks((32, 32)))
        bad = x.map_blocks(_fail_at, dtype=x.dtype)
        with pytest.raises(_Boom):
            dask_loom.store(bad, t, scheduler="threads")
        got = self.read(tmp_path)
        if self.kind.keeps_old or got is not None:
            np.testing.assert_array_equal(got, old)
        assert self.kind.leftovers(tmp_path) == []

    def test_abort_without_old_content_leaves_no_array(self, tmp_path):
        if isinstance(self.kind, (LoomHDF5,)):
            pytest.skip("a Loom layer lives in a file that exists before the write")
        t = self.make(tmp_path)
        tx = t.begin()
        region = self.bands(t)[0]
        tx.target.write_block(region, np.ones(tuple(r.stop - r.start for r in region), "f4"))
        tx.abort()
        assert self.read(tmp_path) is None
        assert self.kind.leftovers(tmp_path) == []

    def test_begin_commit(self, tmp_path):
        a = _data(SHAPE, seed=7)
        t = self.make(tmp_path, old=self.full(np.zeros(SHAPE, "f4")))
        tx = t.begin()
        for region in self.bands(t):
            t.write_block(region, self.full(a)[region])
        if self.kind.keeps_old:
            # Nothing is visible before the commit: the old content still is.
            np.testing.assert_array_equal(self.read(tmp_path), self.full(np.zeros(SHAPE, "f4")))
        tx.commit()
        np.testing.assert_array_equal(self.read(tmp_path), self.full(a))
        assert self.kind.leftovers(tmp_path) == []


class TestHDF5(TargetTests):
    kind = HDF5()


class TestZarrLocal(TargetTests):
    kind = ZarrLocal()


class TestZarrSharded(TargetTests):
    kind = ZarrSharded()

    def test_blocks_are_whole_shards(self, tmp_path):
        t = self.make(tmp_path)
        assert t.chunk_shape == (32, 32)  # shards of 2 x 2 chunks are the write unit
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dask_loom.store(da.zeros(SHAPE, chunks=(32, 32), dtype="f4"), t)  # aligned: no warning


class TestZarrV2(TargetTests):
    kind = ZarrV2()


@pytest.mark.s3
class TestZarrS3(TargetTests):
    @pytest.fixture(autouse=True)
    def _server(self, s3_server):
        self.kind = ZarrS3(s3_server)


class TestOME(TargetTests):
    kind = OME()


class TestAnnDataDense(TargetTests):
    kind = AnnData("dense")


class TestAnnDataDenseZarr(TargetTests):
    kind = AnnData("dense", ".zarr")


class TestAnnDataCSR(TargetTests):
    kind = AnnData("csr")

    def test_bands_in_order_only(self, tmp_path):
        t = self.make(tmp_path)
        bands = self.bands(t)
        with pytest.raises(ValueError, match="bands are written in order"), t.transaction():
            t.write_block(bands[1], np.zeros(tuple(r.stop - r.start for r in bands[1]), "f4"))
        assert self.read(tmp_path) is None


class TestAnnDataCSCZarr(TargetTests):
    kind = AnnData("csc", ".zarr")


class TestLoomLayer(TargetTests):
    kind = LoomHDF5()


class TestLoomZarrLayer(TargetTests):
    kind = LoomZarr()


def test_dask_config_scheduler_is_respected(tmp_path):
    # store() runs on whatever dask_loom.cluster picks, dask's own config included.
    a = _data(SHAPE)
    with dask.config.set(scheduler="sync"):
        dask_loom.store(a, HDF5().make(tmp_path, SHAPE, CHUNKS, "f4"))
    np.testing.assert_array_equal(HDF5().read(tmp_path), a)
