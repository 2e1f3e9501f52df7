"""The first call (issue 11): the embedded default everywhere, GIL-free inflate, cheap imports, threads.

Each scenario a user meets on the first line that computes runs as a real
process: a plain script without a main guard (threads, and the explicit
process cluster), ``python -c``, a forked child after the parent computed, and
a task inside a dask worker; the values are checked against numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import zlib

import numpy as np
import pytest
from conftest import REPO, make_matrix
from hypothesis import given
from hypothesis import strategies as st

import dask_loom
from dask_loom.cluster import resolve_scheduler, thread_pool
from dask_loom.errors import CorruptChunkError
from dask_loom.hdf5._inflate import GIL_FREE, inflate_into


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A loompy-chunked (64 x 64, gzip) file and its matrix."""
    m = make_matrix((700, 900), seed=11)
    path = tmp_path_factory.mktemp("first") / "cells.loom"
    dask_loom.create(path, m, {"Gene": np.array([f"g{i}" for i in range(700)])}, {"CellID": np.array([f"c{i}é" for i in range(900)])})
    return str(path), m


def _run(code: str, *, cwd: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *code], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def _expected(m: np.ndarray) -> tuple[float, float]:
    return float(m.mean(axis=1).sum()), float(m.std(axis=1).sum())


SCRIPT = """\
import numpy as np
import dask_loom

with dask_loom.connect({path!r}, "r") as ds:
    means, sds = ds.map([np.mean, np.std], axis=0{extra})
print(repr(float(means.sum())), repr(float(sds.sum())))
"""


@pytest.mark.parametrize("extra", ["", ", scheduler='local'"], ids=["default", "process-cluster"])
def test_plain_script_without_main_guard(tmp_path, big_file, extra):
    # The README's example as top-level code: spawned workers must not re-run it.
    path, m = big_file
    script = tmp_path / "plain.py"
    script.write_text(SCRIPT.format(path=path, extra=extra))
    r = _run([str(script)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    got = [float(v) for v in r.stdout.split()]
    np.testing.assert_allclose(got, _expected(m), rtol=1e-6)
    assert "bootstrapping phase" not in r.stderr


def test_python_dash_c(tmp_path, big_file):
    path, m = big_file
    r = _run(["-c", SCRIPT.format(path=path, extra="")], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose([float(v) for v in r.stdout.split()], _expected(m), rtol=1e-6)


def test_forked_child_after_parent_computed(tmp_path, big_file):
    # dask's own default pool survives a fork without threads: a child computing would hang.
    path, m = big_file
    code = textwrap.dedent(
        f"""
        import os, numpy as np, dask_loom
        with dask_loom.connect({path!r}, "r") as ds:
            parent = float(ds.map([np.sum], axis=0)[0].sum())
        pid = os.fork()
        if pid == 0:
            with dask_loom.connect({path!r}, "r") as ds:
                child = float(ds.map([np.sum], axis=1)[0].sum())
            os._exit(0 if abs(child - parent) < 1e-3 * abs(parent) else 3)
        _, status = os.waitpid(pid, 0)
        print(parent, os.waitstatus_to_exitcode(status))
        """
    )
    r = _run(["-c", code], cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    total, child_status = r.stdout.split()
    assert float(total) == pytest.approx(float(m.sum()), rel=1e-6)
    assert child_status == "0"


@pytest.mark.cluster
def test_inside_a_dask_worker_runs_synchronously(big_file, local_cluster):
    # A task computing a dask_loom graph runs it in its own thread: no nested cluster, no thread pool.
    path, m = big_file

    def task() -> tuple[str, float, int]:
        import dask_loom
        from dask_loom import cluster

        with dask_loom.connect(path, "r") as ds:
            means = ds.map([np.mean], axis=0)[0]
        return str(cluster.resolve_scheduler()), float(means.sum()), int(cluster._embedded is not None)

    where, total, started = local_cluster.submit(task, pure=False).result(timeout=120)
    assert where == "sync"
    assert started == 0
    assert total == pytest.approx(float(m.mean(axis=1).sum()), rel=1e-6)


def test_default_is_threads_on_our_own_pool():
    assert resolve_scheduler() == "threads"
    pool = thread_pool()
    assert pool is thread_pool()
    assert pool._max_workers == (os.cpu_count() or 1)


def test_nested_compute_from_a_pool_thread_does_not_deadlock(tmp_path):
    # A user's map function that itself computes through dask_loom runs that graph in place.
    m = make_matrix((12, 150), seed=5)
    path = str(tmp_path / "small.loom")
    dask_loom.create(path, m, {"Gene": np.arange(12)}, {"CellID": np.arange(150)}, chunks=(4, 64))

    def nested(v: np.ndarray) -> float:
        with dask_loom.connect(path, "r") as inner:
            return float(inner.map([np.max], axis=0)[0][0]) + float(v.sum()) * 0

    with dask_loom.connect(path, "r") as ds:
        out = ds.map([nested], axis=0, chunksize=4)[0]
    assert np.all(out == m[0].max())


def test_inflate_releases_the_gil():
    # The decoder the fast path uses must be the ctypes one on supported installs.
    assert GIL_FREE


@pytest.mark.parametrize("route", ["compiled", "ctypes"])
@given(parts=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=20), level=st.integers(0, 9))
def test_inflate_into_matches_zlib(route, parts, level):
    from dask_loom.hdf5 import _inflate

    saved = _inflate._BATCH
    if route == "ctypes":  # the chunk-by-chunk route serves where the extension is not built
        _inflate._BATCH = None
    try:
        _inflate_matches_zlib(parts, level)
    finally:
        _inflate._BATCH = saved


def _inflate_matches_zlib(parts: list[bytes], level: int) -> None:
    nbytes = 300
    padded = [p.ljust(nbytes, b"\0") for p in parts]
    raws = [zlib.compress(p, level) for p in padded]
    out = np.empty(len(raws) * nbytes + 7, np.uint8)
    slots = list(range(len(raws)))[::-1]
    inflate_into(raws, out, nbytes, slots=slots)
    for k, s in enumerate(slots):
        assert out[s * nbytes : (s + 1) * nbytes].tobytes() == padded[k]


def test_inflate_into_refuses_damaged_and_wrong_size_streams():
    good = zlib.compress(b"x" * 64)
    out = np.empty(64 * 2, np.uint8)
    with pytest.raises(CorruptChunkError, match="does not inflate"):
        inflate_into([good, good[:-5] + b"\0" * 5], out, 64, where="f.loom:/matrix")
    with pytest.raises(CorruptChunkError, match="expected 64"):
        inflate_into([zlib.compress(b"x" * 63)], out, 64, where="f.loom:/matrix")
    with pytest.raises(ValueError, match="needed"):
        inflate_into([good, good, good], out, 64)


def test_string_attributes_from_many_threads_and_connections(tmp_path):
    # h5py issue #2920: concurrent variable-length string reads through separate handles.
    import loompy

    files = []
    for k in range(3):
        fn = str(tmp_path / f"s{k}.loom")
        genes = np.array([f"gene{k}_{i}_ü" for i in range(400)])
        cells = np.array([f"cell{k}_{i}" for i in range(150)])
        loompy.create(fn, np.zeros((400, 150), np.float32), {"Gene": genes}, {"CellID": cells})
        files.append((fn, genes, cells))
    errors: list[str] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                fn, genes, cells = files[(t + i) % len(files)]
                with dask_loom.connect(fn, "r") as ds:
                    if not (np.array_equal(ds.ra["Gene"], genes) and np.array_equal(ds.ca["CellID"], cells)):
                        errors.append(f"wrong values in {fn}")
                    if ds.attrs["LOOM_SPEC_VERSION"] != "3.0.0":
                        errors.append(f"spec version of {fn}")
        except Exception as exc:  # collected: a thread's exception must fail the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads)
    assert errors == []


def test_import_is_cheap():
    # `import dask_loom` and `dask-loom --help` load none of the heavy machinery.
    heavy = ["dask.array", "distributed", "zarr", "pyarrow", "xarray", "torch", "scipy.sparse", "pandas", "anndata"]
    code = f"import sys, dask_loom; print([m for m in {heavy!r} if m in sys.modules])"
    r = _run(["-c", code], cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    code = f"import sys\nfrom dask_loom.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint([m for m in {heavy!r} if m in sys.modules])"
    r = _run(["-c", code], cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_info_imports_only_what_it_needs(data_dir):
    heavy = ["dask.array", "distributed", "zarr", "pyarrow", "xarray", "torch", "pandas", "anndata"]
    fn = str(data_dir / "loom" / "scopeloomr" / "example.loom")
    code = f"import sys\nfrom dask_loom.cli import main\nrc = main(['info', {fn!r}])\nprint([m for m in {heavy!r} if m in sys.modules], rc)"
    r = _run(["-c", code], cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[] 0"


def test_pseudobulk_of_a_collection_imports_neither_pandas_nor_scipy(tmp_path):
    # Opening a MappedCollection of CSR files and aggregating by an obs key (categorical in one
    # file, plain strings in the other) runs on numpy: pandas and scipy.sparse cost 0.5 s to import.
    import json

    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(8)
    xs, labels, paths = [], [], []
    for i in range(2):
        x = (rng.integers(0, 9, (40, 25)) * (rng.random((40, 25)) < 0.3)).astype("f4")
        ct = rng.choice(["B", "T", "NK"], 40).astype(object)
        obs = pd.DataFrame({"ct": pd.Categorical(ct)}, index=[f"f{i}c{j}" for j in range(40)])
        paths.append(str(tmp_path / f"p{i}.h5ad"))
        var = pd.DataFrame(index=[f"g{k}" for k in range(25)])
        ad.AnnData(sp.csr_matrix(x), obs=obs, var=var).write_h5ad(paths[-1])
        xs.append(x)
        labels.append(ct)
    with h5py.File(paths[1], "r+") as f:  # plain strings (anndata writes categoricals)
        del f["obs/ct"]
        ds = f["obs"].create_dataset("ct", data=labels[1], dtype=h5py.string_dtype())
        ds.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    heavy = ["pandas", "scipy", "dask.array", "anndata", "pyarrow", "zarr"]
    code = (
        "import json, sys, dask_loom\n"
        f"with dask_loom.MappedCollection({paths!r}, obs_keys='ct') as mc:\n"
        "    s, cats = dask_loom.aggregate(mc, 'ct', axis=0, func='sum', return_labels=True)\n"
        f"print(json.dumps([[m for m in {heavy!r} if m in sys.modules], list(map(str, cats)), s.tolist()]))"
    )
    r = _run(["-c", code], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    loaded, cats, s = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded == []
    x, lab = np.concatenate(xs).astype(np.float64), np.concatenate(labels)
    assert cats == ["B", "NK", "T"]
    np.testing.assert_allclose(s, [x[lab == c].sum(axis=0) for c in cats], rtol=1e-12)


def test_compiled_batch_inflater_is_built():
    # `pip install -e .` builds dask_loom/hdf5/_cinflate.c; without it the ctypes path serves (slower on threads).
    from dask_loom.hdf5._inflate import BATCHED

    assert BATCHED


@pytest.fixture(scope="module")
def gzip_h5(tmp_path_factory):
    import h5py

    m = make_matrix((300, 470), seed=4)
    path = str(tmp_path_factory.mktemp("place") / "g.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=m, chunks=(64, 48), compression="gzip")
        f.create_dataset("holes", shape=m.shape, dtype="f4", chunks=(64, 48), compression="gzip", fillvalue=7.0)
        f["holes"][100:160, 50:200] = m[100:160, 50:200]
    return path, m


@given(st.integers(0, 299), st.integers(1, 300), st.integers(0, 469), st.integers(1, 470))
def test_chunks_placed_directly_equal_h5py(gzip_h5, r0, nr, c0, nc):
    # Any region, aligned or not: the compiled decode-and-place path against h5py's own reading.
    import h5py

    from dask_loom.hdf5 import dataset_layout
    from dask_loom.hdf5._source import HDF5Source
    from dask_loom.storage import FileSpec

    path, _ = gzip_h5
    region = (slice(r0, min(300, r0 + nr)), slice(c0, min(470, c0 + nc)))
    with h5py.File(path, "r") as f:
        want_x, want_h = f["x"][region], f["holes"][region]
    spec = FileSpec.from_path(path)
    for name, want in (("x", want_x), ("holes", want_h)):
        src = HDF5Source(spec, dataset_layout(spec, name))
        np.testing.assert_array_equal(src.read_block(region), want)
