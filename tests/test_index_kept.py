"""A file's chunk index outlives a read connection (issue 13, scan warm): reopened, never stale.

Closing a connection keeps the chunk indexes it built, with the identity of
the file they describe; reopening the unchanged file reuses them (the walk of
a large file's chunk B-tree took longer than reading it).  A write through
dask_loom (a transaction, or in place) and a write by another program must
give a fresh index and the new values.
"""

from __future__ import annotations

import dask
import h5py
import numpy as np
import pytest

import dask_loom
from dask_loom.hdf5 import _files, _source


@pytest.fixture
def counted(monkeypatch):
    """How many times a chunk index was built."""
    calls = []
    orig = _source.build_index

    def build(*args, **kwargs):
        calls.append(args[1].path.lstrip("/"))
        return orig(*args, **kwargs)

    monkeypatch.setattr(_source, "build_index", build)
    _files.clear_all()
    yield calls
    _files.clear_all()


@pytest.fixture
def loom_file(tmp_path):
    rng = np.random.default_rng(3)
    m = rng.integers(0, 50, (150, 230)).astype("f4")
    path = tmp_path / "kept.loom"
    dask_loom.create(path, m, {"Gene": np.arange(150)}, {"CellID": np.arange(230)})
    return str(path), m


def _scan_sum(path: str) -> np.ndarray:
    with dask_loom.connect(path, "r") as ds:
        return np.concatenate(
            [v[""][:, :] for _, _, v in ds.scan(axis=1, batch_size=64, layers=[""])], axis=1
        )


def test_reopening_the_unchanged_file_reuses_its_index(counted, loom_file):
    path, m = loom_file
    for _ in range(3):
        np.testing.assert_array_equal(_scan_sum(path), m)
    assert counted == ["matrix"]


@pytest.mark.parametrize("atomic", [True, False], ids=["transaction", "in-place"])
def test_a_write_through_dask_loom_gives_a_fresh_index(counted, loom_file, atomic):
    path, m = loom_file
    np.testing.assert_array_equal(_scan_sum(path), m)
    with dask.config.set({"dask_loom.atomic-writes": atomic}), dask_loom.connect(path, "r+") as ds:
        ds.layers["extra"] = m * 2
        ds.layers[""][:70, :] = m[:70] + 1
    m2 = m.copy()
    m2[:70] += 1
    np.testing.assert_array_equal(_scan_sum(path), m2)
    with dask_loom.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds.layers["extra"][:, :], m * 2)
    assert counted.count("matrix") >= 2  # built again after the write


def test_a_write_by_another_program_gives_a_fresh_index(counted, loom_file):
    path, m = loom_file
    np.testing.assert_array_equal(_scan_sum(path), m)
    # h5py rewrites the matrix with other chunks: new offsets, a new file size and mtime
    with h5py.File(path, "r+") as f:
        del f["matrix"]
        f.create_dataset("matrix", data=m[::-1], chunks=(32, 32), compression="gzip")
    np.testing.assert_array_equal(_scan_sum(path), m[::-1])
    assert counted == ["matrix", "matrix"]


def test_kept_indexes_are_bounded(counted, tmp_path):
    m = np.arange(64 * 64, dtype="f4").reshape(64, 64)
    paths = []
    for i in range(_files._KEPT_FILES + 3):
        paths.append(str(tmp_path / f"f{i}.loom"))
        dask_loom.create(paths[-1], m + i, {"Gene": np.arange(64)}, {"CellID": np.arange(64)})
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(_scan_sum(p), m + i)
    assert len(_files._kept_indexes) == _files._KEPT_FILES
    assert list(_files._kept_indexes) == [
        _files.FileSpec.from_path(p).url for p in paths[-_files._KEPT_FILES :]
    ]


def test_small_ranges_come_back_as_bytes(tmp_path):
    """Small ranges are copies (never tracked by the garbage collector), large ones views; the bytes are the file's."""
    import gc

    data = np.random.default_rng(1).integers(0, 256, 1 << 19, dtype=np.uint8).tobytes()
    p = tmp_path / "raw.bin"
    p.write_bytes(data)
    spec = _files.FileSpec.from_path(str(p))
    starts = [0, 100, 5000, 70_000, 200_000]
    sizes = [50, 4000, 60_000, 100_000, 1 << 17]
    got = _files.read_ranges(spec, starts, sizes)
    for s, n, g in zip(starts, sizes, got):
        assert bytes(g) == data[s : s + n]
        assert isinstance(g, bytes) == (n <= _files._COPY_BELOW)
        assert not gc.is_tracked(g) or n > _files._COPY_BELOW
    (whole,) = _files.read_ranges(spec, [10], [1 << 18])
    assert bytes(whole) == data[10 : 10 + (1 << 18)]
