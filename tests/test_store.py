"""``dask_loom.store``: every input kind into every chunk target, batching, windows, aborts.

Targets are read back by their peers (tests/_targets.py) and compared with
numpy.  A counting target measures what store() holds in memory (payloads
encoded but not yet stored) and the order in which the writer gets them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from _targets import HDF5, KINDS, LoomHDF5, ZarrLocal

import dask_loom
from dask_loom.blocks import BlockTarget, batch_size, block_regions
from dask_loom.blocks._store import _parallelism
from dask_loom.errors import ChunkAlignmentError, ChunkAlignmentWarning

SHAPE = (150, 77)
CHUNKS = (32, 16)


def _ref(seed=0):
    rng = np.random.default_rng(seed)
    m = rng.random(SHAPE) * (rng.random(SHAPE) < 0.3)
    return (m * 100).astype("f4")


class _ArrayLike:
    """Shape, dtype and slicing only (an h5py dataset, a TIFF page stack ...)."""

    def __init__(self, a):
        self.a = a
        self.shape = a.shape
        self.dtype = a.dtype
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return self.a[key].copy()


INPUTS = {
    "numpy": lambda a: a,
    "dask": lambda a: da.from_array(a, chunks=(64, 32)),
    "dask-misaligned": lambda a: da.from_array(a, chunks=(50, 30)),
    "csr": lambda a: sp.csr_matrix(a),
    "csc": lambda a: sp.csc_matrix(a),
    "coo": lambda a: sp.coo_matrix(a),
    "array-like": _ArrayLike,
}


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("input_kind", list(INPUTS))
def test_every_input_into_every_target(tmp_path, kind, input_kind):
    a = _ref(1)
    if kind.lead and input_kind in ("csr", "csc", "coo"):
        pytest.skip("sparse matrices are 2-D; OME images are 5-D")
    x = INPUTS[input_kind](a)
    if kind.lead:
        x = x.reshape(kind.full(SHAPE)) if not isinstance(x, _ArrayLike) else _ArrayLike(a.reshape(kind.full(SHAPE)))
    target = kind.make(tmp_path, kind.full(SHAPE), kind.full_chunks(CHUNKS), "f4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dask_loom.store(x, target, scheduler="threads")
    rounded = [w for w in caught if issubclass(w.category, ChunkAlignmentWarning)]
    # Only a user chunking that splits the target's write units is rounded, with a warning.
    splits = hasattr(x, "dask") and any(
        any(b % u for b in np.cumsum(c)[:-1]) for c, u in zip(x.chunks, target.chunk_shape)
    )
    assert bool(rounded) == bool(splits)
    if input_kind == "dask-misaligned":
        assert splits
    np.testing.assert_array_equal(kind.read(tmp_path), a.reshape(kind.full(SHAPE)))


@pytest.mark.cluster
@pytest.mark.parametrize("kind", [HDF5(), ZarrLocal(), LoomHDF5()], ids=str)
def test_inputs_on_a_process_cluster(tmp_path, kind, local_cluster):
    for seed, make in enumerate((lambda a: da.from_array(a, chunks=(64, 32)), sp.csr_matrix, lambda a: a)):
        a = _ref(10 + seed)
        dask_loom.store(make(a), kind.make(tmp_path, SHAPE, CHUNKS, "f4"), client=local_cluster)
        np.testing.assert_array_equal(kind.read(tmp_path), a)


# -- what store() holds at once -----------------------------------------------------------------


class Counting(BlockTarget):
    """Counts payloads encoded but not yet stored; records the writer's order and the transaction."""

    prefix = "count-write"

    def __init__(self, shape, chunks, *, fail_at=None):
        self.shape = shape
        self.chunk_shape = chunks
        self.dtype = np.dtype("f4")
        self.label = "counting target"
        self.lock = threading.Lock()
        self.encoded = 0
        self.stored: list[tuple[int, ...]] = []
        self.payloads: list[tuple[tuple[int, ...], float]] = []
        self.peak = 0
        self.fail_at = fail_at
        self.events: list[tuple[str, float]] = []

    def __dask_tokenize__(self):
        return ("Counting", self.shape, self.chunk_shape)

    def __reduce__(self):
        # A copy in a worker counts there; the caller's object counts what it stores.
        return (Counting, (self.shape, self.chunk_shape), {"fail_at": self.fail_at})

    def __setstate__(self, state):
        self.fail_at = state["fail_at"]

    def encode_block(self, region, data):
        block = self.as_block(region, data)
        start = tuple(r.start for r in region)
        if start == self.fail_at:
            raise RuntimeError(f"block at {start} failed")
        time.sleep(0.002)
        with self.lock:
            self.encoded += 1
            self.peak = max(self.peak, self.encoded - len(self.stored))
            self.events.append(("encode", time.monotonic()))
        return start, float(block.sum())

    def store_payload(self, payload):
        with self.lock:
            self.stored.append(payload[0])
            self.payloads.append(payload)

    @contextlib.contextmanager
    def _transaction(self):
        self.events.append(("begin", time.monotonic()))
        try:
            yield
        except BaseException:
            self.events.append(("abort", time.monotonic()))
            raise
        self.events.append(("commit", time.monotonic()))


@pytest.mark.parametrize("scheduler", ["threads", "sync"])
@pytest.mark.parametrize("input_kind", ["dask", "numpy"])
def test_payloads_in_flight_are_bounded(scheduler, input_kind):
    shape, chunks = (160, 160), (8, 8)
    a = np.ones(shape, "f4")
    x = da.from_array(a, chunks=chunks) if input_kind == "dask" else a
    t = Counting(shape, chunks)
    with dask.config.set({"dask_loom.block-size": 8 * 8 * 4}):  # one chunk per block: 400 blocks
        dask_loom.store(x, t, scheduler=scheduler)
    expect = [tuple(r.start for r in region) for _, region in block_regions(((8,) * 20, (8,) * 20))]
    assert t.stored == expect  # every block once, in block order
    size = batch_size(_parallelism(scheduler, None))
    assert len(expect) > 10 * size  # many batches: the bound below means something
    assert 1 <= t.peak <= 2 * size  # one batch being stored, the next computing; never the array
    assert [e for e, _ in t.events if e != "encode"] == ["begin", "commit"]


@pytest.mark.cluster
def test_payloads_in_flight_are_bounded_on_a_cluster(local_cluster):
    shape, chunks = (64, 64), (8, 8)
    x = da.ones(shape, chunks=chunks, dtype="f4")
    t = Counting(shape, chunks)
    with dask.config.set({"dask_loom.block-size": 8 * 8 * 4}):
        dask_loom.store(x, t, client=local_cluster)
    # Encoded in the workers (their copies count there); stored here, all of them, in order.
    assert t.stored == [tuple(r.start for r in reg) for _, reg in block_regions(((8,) * 8, (8,) * 8))]
    assert all(total == 64.0 for _, total in t.payloads)
    assert t.encoded == 0  # nothing was encoded in this process


def test_an_error_aborts_after_the_batch_in_flight():
    shape, chunks = (160, 160), (8, 8)
    t = Counting(shape, chunks, fail_at=(80, 0))
    with dask.config.set({"dask_loom.block-size": 8 * 8 * 4}), pytest.raises(RuntimeError, match=r"block at \(80, 0\) failed"):
        dask_loom.store(da.ones(shape, chunks=chunks, dtype="f4"), t, scheduler="threads")
    kinds = [e for e, _ in t.events]
    assert kinds[0] == "begin" and kinds[-1] == "abort" and "commit" not in kinds
    # No task of the write still runs when the rollback starts.
    abort_time = t.events[-1][1]
    assert all(when <= abort_time for e, when in t.events if e == "encode")
    assert (80, 0) not in t.stored and len(t.stored) < 400


# -- windows, shapes, nesting -----------------------------------------------------------------


def test_a_window_of_the_target(tmp_path):
    a = _ref(3)
    kind = HDF5()
    t = kind.make(tmp_path, SHAPE, CHUNKS, "f4")
    with t.transaction():
        dask_loom.store(a[:64], t, at=(0, 0))
        dask_loom.store(da.from_array(a[64:], chunks=(32, 77)), t, at=(64, 0))
        with pytest.raises(ChunkAlignmentError, match="splits the stored chunks"):
            dask_loom.store(a[10:42], t, at=(10, 0))  # starts inside a chunk
        with pytest.raises(ChunkAlignmentError, match="splits the stored chunks"):
            dask_loom.store(a[:40], t, at=(0, 0))  # ends inside a chunk
    np.testing.assert_array_equal(kind.read(tmp_path), a)


def test_shapes_must_match(tmp_path):
    t = HDF5().make(tmp_path, SHAPE, CHUNKS, "f4")
    with pytest.raises(ValueError, match=r"shape \(150, 76\) into one of shape \(150, 77\)"):
        dask_loom.store(np.zeros((150, 76), "f4"), t)
    with pytest.raises(ValueError, match="a 1-D array into a 2-D one"):
        dask_loom.store(np.zeros(150, "f4"), t)
    assert HDF5().read(tmp_path) is None  # refused before any write


def test_store_from_inside_a_task(tmp_path):
    # A task of the embedded pool that writes (nested graphs run in that thread).
    a = _ref(4)

    def task(_):
        dask_loom.store(da.from_array(a, chunks=(32, 32)), ZarrLocal().make(tmp_path, SHAPE, CHUNKS, "f4"))
        return 1

    from dask_loom.cluster import compute

    assert compute(dask.delayed(task)(0), scheduler="threads") == (1,)
    np.testing.assert_array_equal(ZarrLocal().read(tmp_path), a)


def test_loom_layer_from_every_input(tmp_path):
    # The Loom layer API (ds.layers[name] = value) is store() into a layer target.
    a = _ref(5)
    fn = str(tmp_path / "f.loom")
    dask_loom.create(fn, a, {"g": np.arange(150)}, {"c": np.arange(77)})
    import loompy

    with dask_loom.connect(fn) as ds:
        for name, make in INPUTS.items():
            ds.layers[name.replace("-", "_")] = make(a) if name != "array-like" else a
    with loompy.connect(fn, "r") as lp:
        for name in INPUTS:
            np.testing.assert_array_equal(lp.layers[name.replace("-", "_")][:, :], a)
