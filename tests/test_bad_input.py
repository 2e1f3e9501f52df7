"""Hostile input to every reader: a typed error naming the file and the problem, fast, memory bounded.

Each case of the catalogue writes a real damaged file (truncated or
bit-flipped HDF5 and Zarr chunks, wrong shapes and dtypes in metadata, huge
or negative declared sizes, malformed OME-Arrow records, AnnData files
missing required keys, NaN/Inf writes), runs the reader, and checks that

* the reader raises a typed error: a ``dask_loom.errors.DaskLoomError``, or
  the builtin such an error derives from (``ValueError``, ``OSError``, ...)
  raised by dask_loom itself — never an exception escaping from inside a
  dependency (a bare ``KeyError`` from h5py, a ``TypeError`` from zarr ...);
* the message names the file (or store, or record field) and the problem;
* it happens within 10 s (a hang is a failure) and the reader allocates at
  most 64 MiB while failing (huge declared shapes are refused before
  allocation; traced with ``tracemalloc``, which sees numpy's buffers).

Some cases run through the process-based ``local_cluster`` too: the worker
raises, the client gets the same typed error, and no worker dies.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import dask_loom
from tests._reliability import Outcome, is_typed, record, run_limited
from tests.conftest import make_matrix

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

LIMIT = 10.0  # seconds a reader may take to refuse a bad input
# A process cluster's first graph also pays its workers' imports (zarr, numcodecs), which a
# loaded machine stretches past LIMIT; a hang is still caught.
CLUSTER_LIMIT = 60.0
MEMORY = 64 << 20  # bytes a reader may allocate while refusing it


def _run(fn: Callable[[], Any], limit: float = LIMIT) -> Outcome:
    return run_limited(fn, limit)


_typed = is_typed


def _record_case(case: str, error: str, out: Outcome, msg: str) -> None:
    record(
        "bad-input",
        case,
        injected=case.split(":", 1)[1].strip(),
        times=1,
        result=error,
        ok=True,
        seconds=round(out.seconds, 3),
        peak_mib=round(out.peak / 2**20, 2),
        message=msg[:200],
    )


def check(
    case: str,
    fn: Callable[[], Any],
    names: str | tuple[str, ...],
    *,
    problem: str | tuple[str, ...] = (),
    limit: float = LIMIT,
) -> BaseException:
    """Assert that *fn* refuses its input properly within *limit* seconds; return the error."""
    out = _run(fn, limit)
    assert not out.hung, f"{case}: no answer within {limit:.0f} s"
    exc = out.error
    assert exc is not None, f"{case}: the bad input was accepted"
    where = traceback.format_exception(exc)[-3:]
    assert _typed(exc), f"{case}: untyped {type(exc).__name__} from a dependency: {exc}\n{''.join(where)}"
    msg = str(exc)
    names = (names,) if isinstance(names, str) else names
    assert any(n in msg for n in names), f"{case}: the message does not name {names}: {msg}"
    problem = (problem,) if isinstance(problem, str) else problem
    if problem:
        assert any(p.lower() in msg.lower() for p in problem), f"{case}: the message does not say {problem}: {msg}"
    assert out.peak < MEMORY, f"{case}: {out.peak / 2**20:.0f} MiB allocated while refusing the input"
    _record_case(case, type(exc).__name__, out, msg)
    return exc


# -- pristine inputs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import zarr

    d = tmp_path_factory.mktemp("pristine")
    out: dict[str, str] = {}
    m = make_matrix((200, 300), seed=3, density=0.5)
    out["loom"] = str(d / "good.loom")
    dask_loom.create(out["loom"], m, {"Gene": np.array([f"g{i}" for i in range(200)])}, {"CellID": np.arange(300)}, chunks=(64, 64))
    with dask_loom.connect(out["loom"]) as ds:
        ds.col_graphs.KNN = sp.random(300, 300, density=0.01, random_state=1, format="coo")
    out["loom.zarr"] = str(d / "good.loom.zarr")
    dask_loom.convert(out["loom"], out["loom.zarr"], chunks=(64, 64), scheduler="sync")
    # Plain Zarr arrays: blosc (v3), gzip + crc32c (v3), and v2 zlib.
    out["zarr"] = str(d / "good.zarr")
    g = zarr.open_group(out["zarr"], mode="w")
    data = np.arange(64 * 48, dtype="f4").reshape(64, 48)
    g.create_array("blosc", data=data, chunks=(16, 16))
    from zarr.codecs import Crc32cCodec, GzipCodec

    g.create_array("crc", data=data, chunks=(16, 16), compressors=[GzipCodec(level=1), Crc32cCodec()])
    out["zarr2"] = str(d / "good2.zarr")
    g2 = zarr.open_group(out["zarr2"], mode="w", zarr_format=2)
    import numcodecs

    g2.create_array("z", data=data, chunks=(16, 16), compressors=numcodecs.Zlib(level=1))
    # AnnData: h5ad and zarr, CSR X and a categorical obs column.
    X = sp.random(120, 40, density=0.3, random_state=2, format="csr", dtype="float32")
    obs = pd.DataFrame({"cell_type": pd.Categorical(np.array(["a", "b", "c"])[np.arange(120) % 3])}, index=[f"c{i}" for i in range(120)])
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"v{i}" for i in range(40)]))
    out["h5ad"] = str(d / "good.h5ad")
    a.write_h5ad(out["h5ad"])
    out["adzarr"] = str(d / "good.ad.zarr")
    a.write_zarr(out["adzarr"])
    out["X"] = X.toarray()
    out["data"] = data
    out["m"] = m
    return out


@pytest.fixture
def copy_of(pristine, tmp_path):
    def make(key: str, name: str | None = None) -> str:
        src = pristine[key]
        dst = str(tmp_path / (name or os.path.basename(src)))
        (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, dst)
        return dst

    return make


def _read_loom(path: str) -> None:
    with dask_loom.connect(path, "r") as ds:
        ds[:, :]
        for k in ds.ca.keys():
            ds.ca[k]
        for k in ds.ra.keys():
            ds.ra[k]
        for k in ds.attrs.keys():
            ds.attrs[k]
        for k in ds.col_graphs.keys():
            ds.col_graphs[k]


def _flip(path: str, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = bytearray(fh.read(n))
        fh.seek(offset)
        fh.write(bytes(x ^ 0xFF for x in b))


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def _chunk_offset(path: str, dataset: str, index: int = 0) -> tuple[int, int]:
    import h5py

    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(index)
        return int(info.byte_offset), int(info.size)


# -- HDF5 .loom -------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 0.9, 0.999])
def test_truncated_loom(copy_of, fraction):
    p = copy_of("loom")
    _truncate(p, int(os.path.getsize(p) * fraction))
    check(f"HDF5 .loom: truncated to {fraction:.1%}", lambda: _read_loom(p), os.path.basename(p))


def test_loom_bit_flips(copy_of):
    p = copy_of("loom")
    off, size = _chunk_offset(p, "matrix", 3)
    _flip(p, off + size // 2, 4)
    exc = check("HDF5 .loom: bits flipped inside a compressed chunk", lambda: _read_loom(p), os.path.basename(p), problem=("chunk", "decode", "corrupt"))
    p2 = copy_of("loom", "sig.loom")
    _flip(p2, 0, 8)  # the HDF5 signature
    check("HDF5 .loom: signature overwritten", lambda: _read_loom(p2), os.path.basename(p2), problem=("hdf5", "loom"))
    assert exc is not None


def test_loom_chunk_zeroed(copy_of):
    p = copy_of("loom")
    off, size = _chunk_offset(p, "matrix", 0)
    with open(p, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\0" * size)
    check("HDF5 .loom: a chunk overwritten with zeros", lambda: _read_loom(p), os.path.basename(p), problem=("chunk", "decode", "corrupt"))


def _h5_edit(path: str, fn: Callable[[Any], None]) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        fn(f)


def test_loom_wrong_metadata(copy_of):
    import h5py

    p = copy_of("loom", "attrlen.loom")
    _h5_edit(p, lambda f: (f.__delitem__("col_attrs/CellID"), f.create_dataset("col_attrs/CellID", data=np.arange(7))))
    check("HDF5 .loom: a column attribute of the wrong length", lambda: _read_loom(p), "attrlen.loom", problem=("values", "expected", "attribute"))

    p = copy_of("loom", "layershape.loom")
    _h5_edit(p, lambda f: f.create_dataset("layers/odd", data=np.zeros((5, 5), "f4")))
    check("HDF5 .loom: a layer whose shape differs from the matrix", lambda: _read_loom(p), "layershape.loom", problem=("shape",))

    p = copy_of("loom", "dtype.loom")
    _h5_edit(p, lambda f: (f.__delitem__("matrix"), f.create_dataset("matrix", data=np.zeros((200, 300), dtype="S4"))))
    check("HDF5 .loom: a matrix of strings", lambda: _read_loom(p), "dtype.loom", problem=("dtype", "type", "string", "integer or float"))

    p = copy_of("loom", "graph.loom")
    _h5_edit(p, lambda f: (f.__delitem__("col_graphs/KNN/a"), f.create_dataset("col_graphs/KNN/a", data=np.full(900, 10**6, "i8"))))
    check("HDF5 .loom: graph node indices out of range", lambda: _read_loom(p), "graph.loom", problem=("outside", "indices"))

    p = copy_of("loom", "huge.loom")

    def huge(f: h5py.File) -> None:
        del f["col_attrs/CellID"]
        f.create_dataset("col_attrs/CellID", shape=(300,), dtype="i8")
        f.create_dataset("attrs/Huge", shape=(10**12,), dtype="f8", chunks=(1024,))
        f.create_dataset("col_graphs/Big/a", shape=(10**12,), dtype="i4", chunks=(1024,))
        f.create_dataset("col_graphs/Big/b", shape=(10**12,), dtype="i4", chunks=(1024,))
        f.create_dataset("col_graphs/Big/w", shape=(10**12,), dtype="f4", chunks=(1024,))

    _h5_edit(p, huge)
    with dask_loom.connect(p, "r") as ds:
        check("HDF5 .loom: a global attribute declaring 8 TB", lambda: ds.attrs["Huge"], "huge.loom", problem=("cap", "larger", "bytes"))
        check("HDF5 .loom: a graph declaring 10^12 edges", lambda: ds.col_graphs["Big"], "huge.loom", problem=("cap", "larger", "bytes"))

    p = copy_of("loom", "hugeattr.loom")
    _h5_edit(p, lambda f: f.create_dataset("row_attrs/Huge", shape=(10**12,), dtype="f8", chunks=(1024,)))
    check("HDF5 .loom: a row attribute declaring 8 TB", lambda: _read_loom(p), "hugeattr.loom", problem=("cap", "larger", "values", "match"))

    p = copy_of("loom", "hugeh5attr.loom")
    # (HDF5 keeps attributes in the object header: at most 64 KiB in a loompy file.)
    _h5_edit(p, lambda f: f["/"].attrs.create("Blob", data=np.zeros(7000, "f8")))
    import dask

    with dask.config.set({"dask_loom.max-metadata-bytes": "16KiB"}):
        check("HDF5 .loom: a 56 KB HDF5 attribute over a 16 KiB cap", lambda: _read_loom(p), "hugeh5attr.loom", problem=("cap", "larger", "bytes"))


def test_loom_missing_parts(copy_of):
    p = copy_of("loom", "nomatrix.loom")
    _h5_edit(p, lambda f: (f.__delitem__("matrix"), f.__delitem__("row_attrs"), f.__delitem__("col_attrs")))
    check("HDF5 .loom: no matrix and no attributes", lambda: _read_loom(p), "nomatrix.loom", problem=("not a loom", "loom"))
    p2 = str(os.path.dirname(p) + "/plain.h5")
    import h5py

    with h5py.File(p2, "w") as f:
        f["x"] = np.arange(3)
    check("HDF5 .loom: an HDF5 file that is not Loom", lambda: _read_loom(p2), "plain.h5", problem=("loom",))
    p3 = os.path.dirname(p) + "/text.loom"
    with open(p3, "w") as fh:
        fh.write("this is not HDF5\n" * 100)
    check("HDF5 .loom: a text file", lambda: _read_loom(p3), "text.loom", problem=("hdf5", "loom"))


# -- NaN / Inf writes ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["loom", "loom.zarr"])
def test_nan_inf_writes(copy_of, kind):
    p = copy_of(kind)
    bad = np.ones((200, 300), "f4")
    bad[5, 7] = np.nan
    with dask_loom.connect(p) as ds:
        check(f"NaN/Inf writes ({kind}): a layer with NaN", lambda: ds.layers.__setitem__("bad", bad), os.path.basename(p), problem=("nan",))
        check(f"NaN/Inf writes ({kind}): Inf into a region", lambda: ds.layers[""].__setitem__((slice(0, 2), slice(0, 2)), np.inf), os.path.basename(p), problem=("inf",))
        cols = np.ones((200, 4), "f4")
        cols[0, 0] = -np.inf
        check(f"NaN/Inf writes ({kind}): add_columns with -Inf", lambda: ds.add_columns(cols, {"CellID": np.arange(4)}), os.path.basename(p), problem=("inf",))
        import dask.array as da

        lazy = da.from_array(bad, chunks=(64, 64))
        check(f"NaN/Inf writes ({kind}): a dask layer with NaN", lambda: ds.layers.__setitem__("lazy", lazy), os.path.basename(p), problem=("nan",))
    # Nothing was written.
    with dask_loom.connect(p, "r") as ds:
        assert "bad" not in ds.layers and "lazy" not in ds.layers and ds.shape == (200, 300)
        np.testing.assert_array_equal(ds[:, :], dask_loom.connect(copy_of(kind, "again." + kind), "r")[:, :])
    target = os.path.join(os.path.dirname(p), "new." + kind)
    check(f"NaN/Inf writes ({kind}): create with NaN", lambda: dask_loom.create(target, bad, {"g": np.arange(200)}, {"c": np.arange(300)}), "new." + kind, problem=("nan",))
    assert not os.path.exists(target)


# -- Zarr -----------------------------------------------------------------------------------------


def _read_zarr_array(path: str, name: str) -> np.ndarray:
    return np.asarray(dask_loom.open_zarr(path, name, mode="r").to_dask().compute(scheduler="threads"))


def _chunk_file(store: str, arr: str, v2: bool = False) -> str:
    return os.path.join(store, arr, "1.1" if v2 else "c/1/1")


@pytest.mark.parametrize(("arr", "v2"), [("blosc", False), ("crc", False), ("z", True)])
def test_zarr_chunk_damage(copy_of, arr, v2):
    key = "zarr2" if v2 else "zarr"
    p = copy_of(key, f"trunc-{arr}.zarr")
    f = _chunk_file(p, arr, v2)
    _truncate(f, os.path.getsize(f) // 2)
    check(f"Zarr chunks: {arr} chunk truncated to half", lambda: _read_zarr_array(p, arr), (f"trunc-{arr}.zarr",), problem=("chunk",))
    p = copy_of(key, f"flip-{arr}.zarr")
    f = _chunk_file(p, arr, v2)
    _flip(f, os.path.getsize(f) - 6, 2)  # in the payload/trailer (gzip crc, crc32c, zlib adler)
    if arr != "blosc":  # blosc carries no checksum: a payload flip may decode to other numbers
        check(f"Zarr chunks: {arr} chunk bit-flipped", lambda: _read_zarr_array(p, arr), (f"flip-{arr}.zarr",), problem=("chunk",))
    p = copy_of(key, f"head-{arr}.zarr")
    f = _chunk_file(p, arr, v2)
    _flip(f, 0, 4)  # the codec's header
    check(f"Zarr chunks: {arr} chunk header overwritten", lambda: _read_zarr_array(p, arr), (f"head-{arr}.zarr",), problem=("chunk",))
    p = copy_of(key, f"empty-{arr}.zarr")
    f = _chunk_file(p, arr, v2)
    _truncate(f, 0)
    check(f"Zarr chunks: {arr} chunk of zero bytes", lambda: _read_zarr_array(p, arr), (f"empty-{arr}.zarr",), problem=("chunk",))


def _edit_json(path: str, fn: Callable[[dict], Any]) -> None:
    with open(path) as fh:
        doc = json.load(fh)
    fn(doc)
    with open(path, "w") as fh:
        json.dump(doc, fh)


META_CASES: dict[str, Callable[[dict], Any]] = {
    "shape negative": lambda d: d.__setitem__("shape", [-64, 48]),
    "shape huge (10^15 x 10^15)": lambda d: d.__setitem__("shape", [10**15, 10**15]),
    "chunk shape zero": lambda d: d["chunk_grid"]["configuration"].__setitem__("chunk_shape", [0, 16]),
    "chunk shape huge (2^31 x 2^31)": lambda d: d["chunk_grid"]["configuration"].__setitem__("chunk_shape", [2**31, 2**31]),
    "chunk shape larger than the stored chunks": lambda d: d["chunk_grid"]["configuration"].__setitem__("chunk_shape", [32, 32]),
    "dtype float32 -> float64": lambda d: d.__setitem__("data_type", "float64"),
    "dtype unknown": lambda d: d.__setitem__("data_type", "float128x"),
    "codec unknown": lambda d: d["codecs"].append({"name": "no-such-codec"}),
    "fill_value of the wrong type": lambda d: d.__setitem__("fill_value", {"x": 1}),
    "shape missing": lambda d: d.pop("shape"),
    "rank mismatch (3-D shape, 2-D chunks)": lambda d: d.__setitem__("shape", [64, 48, 3]),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_zarr_wrong_metadata(copy_of, case):
    p = copy_of("zarr", "meta.zarr")
    _edit_json(os.path.join(p, "blosc", "zarr.json"), META_CASES[case])
    check(f"Zarr metadata: {case}", lambda: _read_zarr_array(p, "blosc"), ("meta.zarr",))


def test_zarr_metadata_not_json(copy_of):
    p = copy_of("zarr", "json.zarr")
    with open(os.path.join(p, "blosc", "zarr.json"), "w") as fh:
        fh.write('{"zarr_format": 3, "node_type": "arr')
    check("Zarr metadata: zarr.json truncated (not JSON)", lambda: _read_zarr_array(p, "blosc"), ("json.zarr",), problem=("json",))
    with open(os.path.join(p, "blosc", "zarr.json"), "w") as fh:
        fh.write("[1, 2, 3]")
    check("Zarr metadata: zarr.json is a JSON list", lambda: _read_zarr_array(p, "blosc"), ("json.zarr",), problem=("object", "json"))
    p2 = copy_of("zarr2", "v2.zarr")
    _edit_json(os.path.join(p2, "z", ".zarray"), lambda d: d.__setitem__("dtype", "<f8"))
    check("Zarr metadata: .zarray dtype <f4 -> <f8", lambda: _read_zarr_array(p2, "z"), ("v2.zarr",))
    p3 = copy_of("zarr2", "v2c.zarr")
    _edit_json(os.path.join(p3, "z", ".zarray"), lambda d: d.__setitem__("compressor", {"id": "nope"}))
    check("Zarr metadata: .zarray compressor unknown", lambda: _read_zarr_array(p3, "z"), ("v2c.zarr",))


def test_zarr_metadata_size_capped(copy_of):
    import dask

    p = copy_of("zarr", "big.zarr")
    _edit_json(os.path.join(p, "blosc", "zarr.json"), lambda d: d.__setitem__("attributes", {"blob": "x" * (8 << 20)}))
    with dask.config.set({"dask_loom.max-metadata-bytes": "1MiB"}):
        check("Zarr metadata: an 8 MB zarr.json over a 1 MiB cap", lambda: _read_zarr_array(p, "blosc"), ("big.zarr",), problem=("cap", "larger", "bytes"))


@pytest.mark.parametrize("kind", ["loom.zarr"])
def test_loom_zarr_damage(copy_of, kind):
    p = copy_of(kind, "chunk.loom.zarr")
    # The layer's first stored object: a shard (layers are sharded), or a chunk in an older store.
    f = sorted(glob.glob(os.path.join(p, "matrix", "c", "**", "*"), recursive=True), key=os.path.isdir)[0]
    _truncate(f, os.path.getsize(f) // 2)
    check("Zarr .loom.zarr: a layer shard truncated", lambda: _read_loom(p), "chunk.loom.zarr", problem=("chunk", "shard"))
    p = copy_of(kind, "attr.loom.zarr")
    _edit_json(os.path.join(p, "col_attrs", "CellID", "zarr.json"), lambda d: d.__setitem__("shape", [7]))
    check("Zarr .loom.zarr: a column attribute of the wrong length", lambda: _read_loom(p), "attr.loom.zarr", problem=("values", "expected", "match"))
    p = copy_of(kind, "root.loom.zarr")
    os.remove(os.path.join(p, "zarr.json"))
    check("Zarr .loom.zarr: no root metadata", lambda: _read_loom(p), "root.loom.zarr", problem=("zarr group", "not"))
    p = copy_of(kind, "hugeattr.loom.zarr")
    import zarr

    zarr.create_array(p, name="attrs/Huge", shape=(10**12,), chunks=(4096,), dtype="f8")
    check("Zarr .loom.zarr: a global attribute declaring 8 TB", lambda: _read_loom(p), "hugeattr.loom.zarr", problem=("cap", "larger", "bytes"))


# -- AnnData ----------------------------------------------------------------------------------


def _read_anndata(path: str) -> None:
    mc = dask_loom.MappedCollection([path], layers_keys="X", obs_keys="cell_type")
    try:
        mc[0]
        mc.to_dask().compute(scheduler="threads")
    finally:
        mc.close()


def _ad_edit(path: str, fn: Callable[[Any], None]) -> None:
    if path.endswith(".h5ad"):
        import h5py

        with h5py.File(path, "r+") as f:
            fn(f)
    else:
        import zarr

        fn(zarr.open_group(path, mode="r+", use_consolidated=False))
        # A real file missing the key: its consolidated metadata agrees.
        zarr.consolidate_metadata(path)


AD_CASES: dict[str, Callable[[Any], Any]] = {
    "no X": lambda f: f.__delitem__("X"),
    "X without indptr": lambda f: f["X"].__delitem__("indptr"),
    "X with an unknown encoding-type": lambda f: f["X"].attrs.__setitem__("encoding-type", "banana_matrix"),
    "X with a negative declared shape": lambda f: f["X"].attrs.__setitem__("shape", [-120, 40]),
    "X with a huge declared shape": lambda f: f["X"].attrs.__setitem__("shape", [2**40, 2**40]),
    "X whose indices point past n_vars": lambda f: f["X"]["indices"].__setitem__(slice(0, 5), np.full(5, 10**6, dtype=f["X"]["indices"].dtype)),
    "X whose indptr runs past the data": lambda f: f["X"]["indptr"].__setitem__(slice(-1, None), np.array([10**7], dtype=f["X"]["indptr"].dtype)),
    "var without its index (needed to join)": lambda f: f["var"].attrs.__setitem__("_index", "nope"),
    "obs column missing": lambda f: f["obs"].__delitem__("cell_type"),
    "categorical codes out of range": lambda f: f["obs"]["cell_type"]["codes"].__setitem__(slice(0, 3), np.array([7, 8, 9], dtype=f["obs"]["cell_type"]["codes"].dtype)),
}


@pytest.mark.parametrize("fmt", ["h5ad", "adzarr"])
@pytest.mark.parametrize("case", list(AD_CASES))
def test_anndata_damage(copy_of, fmt, case):
    p = copy_of(fmt)
    _ad_edit(p, AD_CASES[case])
    check(f"AnnData ({'h5ad' if fmt == 'h5ad' else 'zarr'}): {case}", lambda: _read_anndata(p), os.path.basename(p))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9])
def test_truncated_h5ad(copy_of, fraction):
    p = copy_of("h5ad")
    _truncate(p, int(os.path.getsize(p) * fraction))
    check(f"AnnData (h5ad): truncated to {fraction:.0%}", lambda: _read_anndata(p), os.path.basename(p))


# -- OME-Arrow records ------------------------------------------------------------------------


def _record() -> dict[str, Any]:
    a = np.arange(2 * 16 * 16, dtype="uint16").reshape(2, 16, 16)
    return dask_loom.to_ome_arrow(a, dim_order="ZYX", chunk_shape=(1, 8, 8)).as_py()


OME_CASES: dict[str, Callable[[dict], Any]] = {
    "no pixels_meta": lambda r: r.pop("pixels_meta"),
    "size_x negative": lambda r: r["pixels_meta"].__setitem__("size_x", -16),
    "size_x huge (2^31-1 x 2^31-1)": lambda r: (r["pixels_meta"].__setitem__("size_x", 2**31 - 1), r["pixels_meta"].__setitem__("size_y", 2**31 - 1)),
    "size_x a string": lambda r: r["pixels_meta"].__setitem__("size_x", "sixteen"),
    "pixel type unknown": lambda r: r["pixels_meta"].__setitem__("type", "complex256"),
    "a chunk with too few pixels": lambda r: r["chunks"][0].__setitem__("pixels", r["chunks"][0]["pixels"][:-5]),
    "a chunk outside the image": lambda r: r["chunks"][0].__setitem__("x", 1000),
    "chunk grid of zeros": lambda r: r["chunk_grid"].__setitem__("chunk_x", 0),
    "chunks missing": lambda r: r.pop("chunks"),
    "dimension order nonsense": lambda r: r["pixels_meta"].__setitem__("dimension_order", "QQQQQ"),
    "type not ome.arrow": lambda r: r.__setitem__("type", "something.else"),
}


# Fields a reader may ignore when the record is otherwise whole: then the pixels must be right.
OME_IGNORABLE = {"chunk grid of zeros", "dimension order nonsense"}


@pytest.mark.parametrize("case", list(OME_CASES))
def test_ome_arrow_malformed_records(case):
    r = _record()
    OME_CASES[case](r)
    expected = np.arange(2 * 16 * 16, dtype="uint16").reshape(2, 16, 16)
    read = lambda: dask_loom.open_ome_arrow(r, layout="ZYX").to_numpy()  # noqa: E731
    if case in OME_IGNORABLE:
        out = _run(read)
        if out.error is None:
            np.testing.assert_array_equal(np.asarray(out.value), expected)
            _record_case(f"OME-Arrow records: {case}", "no error: the field is not needed, pixels exact", out, "")
            return
    check(
        f"OME-Arrow records: {case}",
        read,
        ("pixels_meta", "size_x", "size_y", "type", "chunk", "pixels", "dimension", "record", "ome", "OME"),
    )


def test_ome_parquet_damage(tmp_path):
    a = np.arange(2 * 64 * 64, dtype="uint16").reshape(2, 64, 64)
    p = dask_loom.to_ome_parquet(a, str(tmp_path / "img.ome.parquet"), dim_order="ZYX", chunk_shape=(1, 32, 32))
    _truncate(p, os.path.getsize(p) // 2)
    check("OME-Arrow records: a Parquet file truncated to half", lambda: dask_loom.open_ome_arrow(p).to_numpy(), "img.ome.parquet")


# -- through a process cluster: the worker raises, the client gets the typed error, nobody dies --


@pytest.mark.cluster
def test_bad_chunks_on_a_process_cluster(copy_of, local_cluster):
    from dask_loom.errors import CorruptChunkError

    pids = local_cluster.run(os.getpid)
    p = copy_of("loom", "cluster.loom")
    off, size = _chunk_offset(p, "matrix", 5)
    _flip(p, off + size // 2, 4)
    z = copy_of("zarr", "cluster.zarr")
    f = _chunk_file(z, "crc")
    _truncate(f, os.path.getsize(f) // 2)

    def loom_on_cluster() -> Any:
        with dask_loom.connect(p, "r") as ds:
            return ds.map([np.sum], axis=0, client=local_cluster)

    def zarr_on_cluster() -> Any:
        return dask_loom.open_zarr(z, "crc", mode="r").to_dask().compute(scheduler=local_cluster)

    e1 = check("Process cluster: a bit-flipped .loom chunk read by a worker", loom_on_cluster, "cluster.loom", problem=("chunk",), limit=CLUSTER_LIMIT)
    e2 = check("Process cluster: a truncated Zarr chunk read by a worker", zarr_on_cluster, "cluster.zarr", problem=("chunk",), limit=CLUSTER_LIMIT)
    assert isinstance(e1, CorruptChunkError) and isinstance(e2, CorruptChunkError)
    assert local_cluster.run(os.getpid) == pids  # no worker died or restarted
