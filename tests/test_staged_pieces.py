"""Blocks reduced a few rows of chunks at a time (``staged_pieces``): the same values, a buffer of a piece.

``map`` and ``aggregate`` fetch a block's chunks at once, then decode and
reduce them a piece of about ``dask_loom._threads.PIECE_BYTES`` at a time
instead of staging the whole block.  Every value is checked against numpy on
the matrix written (never-written chunks read as the fill value), with pieces
of one row of chunks, of a few, and of the whole block.
"""

from __future__ import annotations

import pathlib
from unittest import mock

import dask
import h5py
import numpy as np
import pytest
from conftest import make_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_loom
from dask_loom import _threads

SHAPE = (300, 517)
CHUNKS = (64, 64)
FILL = 7.5
BLOCKS = {"dask_loom.block-size": "1MiB", "dask_loom.loom-zarr-chunks": list(CHUNKS)}


def _loom_with_holes(fn: pathlib.Path, m: np.ndarray) -> np.ndarray:
    """A Loom whose matrix has chunks never written (they read as the dataset's fill value) and a NaN."""
    dask_loom.create(str(fn), m, {"g": np.arange(SHAPE[0])}, {"c": np.arange(SHAPE[1])}, chunks=CHUNKS)
    ref = m.copy()
    with h5py.File(fn, "r+") as f:
        del f["matrix"]
        ds = f.create_dataset("matrix", shape=SHAPE, dtype="f4", chunks=CHUNKS, fillvalue=FILL, compression="gzip")
        for i in range(0, SHAPE[0], CHUNKS[0]):
            for j in range(0, SHAPE[1], CHUNKS[1]):
                if (i // 64 + 2 * (j // 64)) % 3 == 0:
                    ref[i : i + 64, j : j + 64] = FILL  # left unwritten
                else:
                    ds[i : i + 64, j : j + 64] = m[i : i + 64, j : j + 64]
        ds[5, 70] = ref[5, 70] = np.nan  # for the nan-aware partials (dask_loom.create refuses NaN)
    return ref


@pytest.fixture(scope="module", params=["loom", "loom-holes", "loom.zarr"])
def stored(request, tmp_path_factory):
    m = make_matrix(SHAPE, seed=9)
    d = tmp_path_factory.mktemp("pieces")
    if request.param == "loom-holes":
        fn = d / "holes.loom"
        return fn, _loom_with_holes(fn, m)
    fn = d / f"m.{request.param}"
    with dask.config.set(BLOCKS):
        dask_loom.create(str(fn), {"": m}, {"g": np.arange(SHAPE[0])}, {"c": np.arange(SHAPE[1])}, chunks=CHUNKS, scheduler="sync")
    return fn, m


def _rowmajor(staged: np.ndarray) -> np.ndarray:
    k0, k1, c0, c1 = staged.shape
    return staged.transpose(0, 2, 1, 3).reshape(k0 * c0, k1 * c1)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_pieces_cover_the_region_in_order(stored, data):
    fn, ref = stored
    r0 = data.draw(st.integers(0, SHAPE[0] // 64 - 1)) * 64
    r1 = data.draw(st.integers(r0 // 64 + 1, SHAPE[0] // 64)) * 64
    c0 = data.draw(st.integers(0, SHAPE[1] // 64 - 1)) * 64
    c1 = data.draw(st.integers(c0 // 64 + 1, SHAPE[1] // 64)) * 64
    piece = data.draw(st.sampled_from([1, 64 * 64 * 4 * 3, 1 << 30]))
    with dask_loom.connect(str(fn), "r", validate=False) as ds:
        src = ds.__dask_loom_layer_host__().source("")
        with mock.patch.object(_threads, "PIECE_BYTES", piece):
            runs = src.staged_pieces((slice(r0, r1), slice(c0, c1)))
            got = [_rowmajor(p).copy() for p in runs]
    rows_per_piece = max(1, piece // ((c1 - c0) * 64 * 4))
    assert [g.shape[0] for g in got] == [min(rows_per_piece * 64, r1 - r - 0) for r in range(r0, r1, rows_per_piece * 64)]
    np.testing.assert_array_equal(np.concatenate(got), ref[r0:r1, c0:c1])


def test_pieces_refuse_partial_chunks(stored):
    fn, _ = stored
    with dask_loom.connect(str(fn), "r", validate=False) as ds:
        src = ds.__dask_loom_layer_host__().source("")
        assert src.staged_pieces((slice(0, 30), slice(0, 64))) is None
        assert src.staged_pieces((slice(256, 300), slice(0, 64))) is None  # the last, partial chunk row
        assert src.staged_pieces((slice(0, 64), slice(512, 517))) is None


@pytest.mark.parametrize("piece", [1, 300_000, 1 << 30])
@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_map_and_aggregate_by_pieces_equal_numpy(stored, piece, scheduler):
    fn, ref = stored
    r64 = ref.astype(np.float64)
    groups = (np.arange(SHAPE[1]) * 7) % 5
    funcs = [np.mean, np.std, np.min, np.max, np.nanmean, np.nanstd, np.count_nonzero]
    with mock.patch.object(_threads, "PIECE_BYTES", piece), dask.config.set(BLOCKS):
        with dask_loom.connect(str(fn), "r", validate=False) as ds:
            by_row = ds.map(funcs, axis=0, scheduler=scheduler)
            by_col = ds.map(funcs, axis=1, scheduler=scheduler)
            total = ds.aggregate(group_by=groups, aggr_by="sum", scheduler=scheduler)
            with dask.config.set(scheduler=scheduler):
                coo = ds.sparse()
    for axis, got in ((1, by_row), (0, by_col)):
        want = [f(r64, axis=axis) for f in funcs]
        for f, g, w in zip(funcs, got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=f"{f.__name__} axis={axis}", equal_nan=True)
    want_sum = np.stack([r64[:, groups == g].sum(axis=1) for g in range(5)], axis=1)
    np.testing.assert_allclose(total, want_sum, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(coo.toarray(), ref)  # NaN equals NaN here


def test_a_reduction_stages_a_piece_not_the_block(stored):
    """The thread's staging buffer grows to a piece (two rows of chunks here), never to the 1 MiB block."""
    fn, ref = stored
    row_bytes = (SHAPE[1] // 64) * 64 * 64 * 4  # one row of whole chunks across the block
    with mock.patch.object(_threads, "PIECE_BYTES", 2 * row_bytes), dask.config.set(BLOCKS):
        with dask_loom.connect(str(fn), "r", validate=False) as ds:
            _threads._local.__dict__.pop("scratch", None)
            (mean,) = ds.map([np.mean], axis=0, scheduler="sync")  # runs in this thread
            scratch = _threads._local.scratch
    np.testing.assert_allclose(mean, ref.astype(np.float64).mean(axis=1), rtol=1e-6)
    assert scratch.nbytes <= 2 * row_bytes, scratch.nbytes
