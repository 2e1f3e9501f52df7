"""``ds.scan`` decodes bands into reused buffers: never one the caller still refers to."""

from __future__ import annotations

import gc
import pickle

import loompy
import numpy as np
import pytest
from dask.base import tokenize

import dask_loom
from dask_loom.ops._bandpool import BandPool


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize(("axis", "batch"), [(0, 32), (1, 32), (1, 64)])
def test_kept_blocks_are_never_overwritten(loompy_file, axis, batch):
    """Blocks kept in every form a caller may keep them stay equal to loompy's bands."""
    path, _ = loompy_file
    kept = []
    with dask_loom.connect(path, "r") as ds:
        for k, (ix, _sel, view) in enumerate(
            ds.scan(axis=axis, batch_size=batch, layers=["", "spliced"], prefetch=1)
        ):
            form = k % 5
            if form == 0:
                kept.append((ix, "view", view))  # the whole view
            elif form == 1:
                kept.append((ix, "slice", view[""][:, :][1:, ::2]))  # a strided view of the band
            elif form == 2:
                kept.append((ix, "memoryview", memoryview(view.layers[""].values)))
            elif form == 3:
                kept.append((ix, "transpose", view.layers["spliced"][:, :].T))
            else:
                kept.append((ix, "layer", view.layers[""]))  # the in-memory layer object
            del view
            gc.collect()
    assert 2 * len(kept) > (1 + 3) * 2  # more bands than the pool holds buffers
    with loompy.connect(str(path), "r") as lp:
        theirs = {ix: v for ix, _, v in lp.scan(axis=axis, batch_size=batch, layers=["", "spliced"])}
        for ix, form, got in kept:
            ref = theirs[ix]
            if form == "view":
                np.testing.assert_array_equal(got[""][:, :], ref[""][:, :])
                np.testing.assert_array_equal(got.layers["spliced"][:, :], ref.layers["spliced"][:, :])
            elif form == "slice":
                np.testing.assert_array_equal(got, ref[""][:, :][1:, ::2])
            elif form == "memoryview":
                np.testing.assert_array_equal(np.asarray(got), ref[""][:, :])
            elif form == "transpose":
                np.testing.assert_array_equal(got, ref.layers["spliced"][:, :].T)
            else:
                np.testing.assert_array_equal(got[:, :], ref[""][:, :])


def test_kept_views_hold_distinct_memory(loompy_file):
    path, ref = loompy_file
    with dask_loom.connect(path, "r") as ds:
        views = [v for _, _, v in ds.scan(axis=1, batch_size=64, layers=[""])]
    arrays = [v.layers[""].values for v in views]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert not np.shares_memory(arrays[i], arrays[j])
    np.testing.assert_array_equal(np.concatenate(arrays, axis=1), ref[""])


def test_dropped_blocks_are_reused(loompy_file):
    """A caller that lets go of each view gets its buffers back: few distinct addresses, right data."""
    path, ref = loompy_file
    addrs = []
    n = 0
    with dask_loom.connect(path, "r") as ds:
        for ix, _, view in ds.scan(axis=1, batch_size=64, layers=[""], prefetch=2):
            band = view[""][:, :]
            np.testing.assert_array_equal(band, ref[""][:, ix : ix + 64])
            addrs.append(_addr(view.layers[""].values))
            n += 1
            del band
    assert n == 9
    assert len(set(addrs)) < n  # reused (the last, narrower band may take any free buffer)


def test_pool_refuses_buffers_still_referred_to():
    pool = BandPool(2)
    a = pool.take((4, 5), np.float32)
    a[...] = 1
    mv = memoryview(a)[1:]  # refers to the buffer through a's base
    del a
    b = pool.take((4, 5), np.float32)  # the pool's second buffer
    b[...] = 2
    c = pool.take((4, 5), np.float32)  # both pooled buffers referred to: fresh memory
    c[...] = 3
    np.testing.assert_array_equal(np.asarray(mv), np.ones((3, 5), np.float32))
    assert not np.shares_memory(b, c)
    del mv, b
    d = pool.take((2, 5), np.float64)  # a free pooled buffer serves a smaller band of another dtype
    assert d.shape == (2, 5) and d.dtype == np.float64 and d.flags.c_contiguous
    e = pool.take((4, 5), np.float32)
    assert not np.shares_memory(d, e)
    assert pool.take((3,), object).dtype == object  # object arrays are never pooled


def test_pool_pickles_empty_and_tokenizes_stably():
    pool = BandPool(3)
    held = pool.take((10,), np.int64)
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.size == 3 and not copy._bufs
    assert tokenize(pool) == tokenize(BandPool(3))
    assert held.shape == (10,)


def test_kept_blocks_of_a_loom_zarr(loompy_file, tmp_path):
    """The same on a ``.loom.zarr`` (another chunk source, its own chunk shape)."""
    path, ref = loompy_file
    twin = tmp_path / "twin.loom.zarr"
    dask_loom.convert(path, twin, scheduler="sync")
    kept, dropped = [], 0
    with dask_loom.connect(twin, "r") as ds:
        for ix, _, view in ds.scan(axis=1, batch_size=32, layers=["", "spliced"], prefetch=1):
            np.testing.assert_array_equal(view.layers["spliced"][:, :], ref["spliced"][:, ix : ix + 32])
            if ix % 64 == 0:
                kept.append((ix, view[""][:, :]))  # every other band kept, the rest dropped
            else:
                dropped += 1
            del view
    assert len(kept) > 4 and dropped > 4
    for ix, band in kept:
        np.testing.assert_array_equal(band, ref[""][:, ix : ix + 32])
