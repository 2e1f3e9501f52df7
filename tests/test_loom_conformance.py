"""What existing loompy users' code and files still hit (issue 12, items 1-6).

References: loompy 3.0.8 on the same files (types, dtypes, errors), h5py's raw
reading of the stored datasets, zarr-python's reading of a ``.loom.zarr``, and
numpy.  CLI checks run ``dask_loom.cli.main`` in this process, or the real
executable where what is left on disk after the process exits matters.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import warnings

import h5py
import loompy
import numpy as np
import pytest
import scipy.sparse as sp

import dask_loom
from dask_loom import cli
from dask_loom.errors import LoomFormatError, LoomValidationError, WriteConflictError


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid loompy-written file: a layer, string/number/2-D/bool attributes, a column graph."""
    path = tmp_path_factory.mktemp("conf") / "base.loom"
    rng = np.random.default_rng(5)
    ra = {"Gene": np.array([f"g{i}" for i in range(8)]), "Score": rng.random(8), "Count": np.arange(8), "PCA": rng.random((8, 2)), "Flag": np.arange(8) % 2 == 0}
    ca = {"CellID": np.array([f"c{i}" for i in range(6)]), "Clusters": np.array([0, 1, 0, 2, 1, 0])}
    loompy.create(str(path), {"": rng.random((8, 6)).astype("float32"), "x": np.ones((8, 6))}, ra, ca)
    with loompy.connect(str(path)) as ds:
        ds.col_graphs["G"] = sp.coo_matrix(np.eye(6))
    return path


# -- 1. a node of the wrong kind ---------------------------------------------------------------------


def _swap(kind):
    """Replace an object of the file by one of the other kind (group <-> dataset)."""

    def to_group(path):
        return lambda f: (f.__delitem__(path), f.create_group(path))

    def to_dataset(path):
        return lambda f: (f.__delitem__(path), f.create_dataset(path, data=np.arange(3)))

    return {
        "matrix": ("/matrix", to_group("matrix"), True),
        "layer": ("/layers/x", to_group("layers/x"), False),
        "global": ("/attrs/CreationDate", to_group("attrs/CreationDate"), False),
        "spec-version": ("/attrs/LOOM_SPEC_VERSION", to_group("attrs/LOOM_SPEC_VERSION"), True),
        "graph": ("/col_graphs/G", to_dataset("col_graphs/G"), False),
        "graph-vector": ("/col_graphs/G/a", to_group("col_graphs/G/a"), False),
        "layers-group": ("/layers", to_dataset("layers"), True),
        "row_attrs-group": ("/row_attrs", to_dataset("row_attrs"), True),
        "col_graphs-group": ("/col_graphs", to_dataset("col_graphs"), True),
        "attrs-group": ("/attrs", to_dataset("attrs"), True),
    }[kind]


def _read_everything(ds):
    out = [ds.layers[k][:, :] for k in ds.layers.keys()]
    out += [dict(ds.ra.items()), dict(ds.ca.items()), dict(ds.attrs.items())]
    out += [dict(ds.row_graphs.items()), dict(ds.col_graphs.items())]
    return out


@pytest.mark.parametrize(
    "kind",
    ["matrix", "layer", "global", "spec-version", "graph", "graph-vector", "layers-group", "row_attrs-group", "col_graphs-group", "attrs-group"],
)
def test_wrong_kind_of_node_is_a_loom_format_error(base, tmp_path, capsys, kind):
    node, change, at_open = _swap(kind)
    path = tmp_path / "wrong.loom"
    shutil.copy(base, path)
    with h5py.File(path, "r+") as f:
        change(f)
    # loompy's validator crashes on most of these with AttributeError/TypeError; ours reports them.
    v = dask_loom.LoomValidator()
    assert v.validate(path) is False
    assert any(node in e for e in v.errors), v.errors
    with pytest.raises(LoomFormatError) as err:
        dask_loom.connect(path, "r")
    assert node in str(err.value) and str(path) in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if at_open:
            with pytest.raises(LoomFormatError, match=f"{path}: '{node}' is an? "):
                dask_loom.connect(path, "r", validate=False)
        else:
            with dask_loom.connect(path, "r", validate=False) as ds, pytest.raises(LoomFormatError, match=f"{path}: '{node}' is an? "):
                _read_everything(ds)
    rc, out, err = run(capsys, "validate", path)
    assert rc == 1 and "Traceback" not in out + err
    assert node in out and f"{path}: NOT valid" in out
    rc, out, err = run(capsys, "stats", path, "--no-validate")
    if at_open:  # (stats reads only the main matrix and the row names)
        assert rc == 1 and err.count("\n") == 1 and node in err and str(path) in err


def test_h5ad_file_validates_with_reasons(data_dir, capsys):
    h5ad = data_dir / "anndata" / "anndataR" / "example.h5ad"  # /layers holds groups (sparse matrices)
    v = dask_loom.LoomValidator()
    assert v.validate(h5ad) is False
    assert "Layer 'counts' (/layers/counts) is a group, not a dataset" in v.errors
    rc, out, err = run(capsys, "validate", h5ad)
    assert rc == 1 and "Traceback" not in out + err
    assert "/layers/csc_counts" in out and out.strip().endswith(f"{h5ad}: NOT valid (Loom spec 0.0.0)")
    for name in ("info", "stats"):
        rc, _, err = run(capsys, name, h5ad)
        assert rc == 1 and err.count("\n") == 1 and f"{h5ad}: not a Loom file" in err


def test_wrong_kind_in_a_loom_zarr(base, tmp_path):
    store = tmp_path / "w.loom.zarr"
    dask_loom.convert(base, store, scheduler="sync")
    import zarr

    g = zarr.open_group(store, mode="r+")
    del g["layers/x"]
    g.create_group("layers/x")
    with pytest.raises(LoomFormatError, match="'/layers/x' is a Zarr group where the Loom spec wants an array"):
        dask_loom.connect(store, "r", validate=False).layers["x"][:, :]
    with pytest.raises(LoomValidationError, match="Layer 'x'"):
        dask_loom.connect(store, "r")


# -- 2. convert: compound attributes, nested groups, failures leave nothing --------------------------


def _h5_attrs(path, group):
    """The attributes as h5py reads the stored datasets (compound ones as numpy structured arrays)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.dtype.names is not None:
                out[name] = obj[()]
        f[group].visititems(visit)
    return out


def test_convert_compound_attributes_round_trip(data_dir, tmp_path, capsys):
    src = data_dir / "loom" / "scopeloomr" / "example.loom"
    compound = {**{("ra", k): v for k, v in _h5_attrs(src, "row_attrs").items()}, **{("ca", k): v for k, v in _h5_attrs(src, "col_attrs").items()}}
    assert {k for _, k in compound} == {"Regulons", "Embedding", "Embeddings_X", "Embeddings_Y", "RegulonsAUC"}
    zarr_path, back = tmp_path / "ex.loom.zarr", tmp_path / "back.loom"
    rc, _, err = run(capsys, "convert", src, zarr_path, "--no-validate")
    assert rc == 0, err
    rc, _, err = run(capsys, "convert", zarr_path, back, "--no-validate")
    assert rc == 0, err
    for target in (zarr_path, back):
        with dask_loom.connect(target, "r", validate=False) as ds:
            for (axis, name), ref in compound.items():
                got = getattr(ds, axis)[name]
                assert got.dtype == ref.dtype, (target, name)
                np.testing.assert_array_equal(got, ref)
            np.testing.assert_array_equal(ds[:, :], h5py.File(src, "r")["matrix"][()])
    # back in HDF5: the same compound datasets, field for field
    for (axis, name), ref in compound.items():
        with h5py.File(back, "r") as f:
            stored = f[f"{'row' if axis == 'ra' else 'col'}_attrs/{name}"][()]
        assert stored.dtype == ref.dtype
        np.testing.assert_array_equal(stored, ref)
    # in the .loom.zarr: one plain array per field, readable by any Zarr reader
    import zarr

    g = zarr.open_group(zarr_path, mode="r")
    emb = compound[("ca", "Embedding")]
    assert g["col_attrs/Embedding"].attrs["compound_dtype"]["names"] == ["_X", "_Y"]
    np.testing.assert_array_equal(g["col_attrs/Embedding/0"][...], emb["_X"])
    np.testing.assert_array_equal(g["col_attrs/Embedding/1"][...], emb["_Y"])


def test_compound_with_bytes_and_subarray_fields(tmp_path):
    dt = np.dtype([("name", "S4"), ("xy", "<f4", (2,)), ("ok", "?"), ("n", "<i8")])
    values = np.zeros(5, dtype=dt)
    values["name"] = [b"a", b"bb", b"ccc", b"dddd", b""]
    values["xy"] = np.arange(10).reshape(5, 2)
    values["ok"] = [True, False, True, True, False]
    values["n"] = [-1, 2**40, 3, 4, 5]
    src = tmp_path / "c.loom"
    dask_loom.create(src, np.ones((3, 5)), {"Gene": np.arange(3)}, {"Rec": values})
    with h5py.File(src, "r") as f:
        assert f["col_attrs/Rec"].dtype == dt
    dask_loom.convert(src, tmp_path / "c.loom.zarr", scheduler="sync")
    dask_loom.convert(tmp_path / "c.loom.zarr", tmp_path / "c2.loom", scheduler="sync")
    for p in ("c.loom.zarr", "c2.loom"):
        with dask_loom.connect(tmp_path / p, "r", validate=False) as ds:  # compound: not in the spec
            got = ds.ca["Rec"]
            assert got.dtype == dt
            np.testing.assert_array_equal(got, values)
    import zarr

    zarr.open_group(tmp_path / "c.loom.zarr", mode="r+")["col_attrs/Rec"].__delitem__("1")  # a field array gone
    with dask_loom.connect(tmp_path / "c.loom.zarr", "r", validate=False) as ds, pytest.raises(
        LoomFormatError, match=r"field 1 \('xy'\) of compound attribute '/col_attrs/Rec' is unreadable"
    ):
        ds.ca["Rec"]
    bad = np.zeros(5, dtype=[("s", object)])
    with pytest.raises(TypeError, match="compound field 's' has dtype object"):
        dask_loom.create(tmp_path / "bad.loom", np.ones((3, 5)), {"Gene": np.arange(3)}, {"Rec": bad})


def test_convert_nested_attribute_groups_round_trip(data_dir, tmp_path):
    src = data_dir / "loom" / "loomexperiment" / "legacy-2018" / "rle_example_2018.loom"
    with h5py.File(src, "r") as f:
        ref = {f"GRanges/{k}": f["row_attrs/GRanges"][k][()] for k in f["row_attrs/GRanges"]}
    dask_loom.convert(src, tmp_path / "r.loom.zarr", scheduler="sync")
    dask_loom.convert(tmp_path / "r.loom.zarr", tmp_path / "r.loom", scheduler="sync")
    for p in ("r.loom.zarr", "r.loom"):
        with dask_loom.connect(tmp_path / p, "r", validate=False) as ds:
            for k, v in ref.items():
                got = ds.ra[k]
                want = v.astype(str).astype(object) if v.dtype.kind in "SO" else v
                if v.dtype.kind == "O":
                    want = np.array([x.decode() if isinstance(x, bytes) else x for x in v], dtype=object)
                np.testing.assert_array_equal(got, want)
    with h5py.File(tmp_path / "r.loom", "r") as f:
        assert isinstance(f["row_attrs/GRanges"], h5py.Group) and "start" in f["row_attrs/GRanges"]
    # a user's own write keeps loompy's rule: no slash in a name
    with dask_loom.connect(tmp_path / "r.loom", "r+", validate=False) as ds, pytest.raises(KeyError, match="slash"):
        ds.ra["a/b"] = np.arange(200)


def _exe(*argv, env):
    exe = shutil.which("dask-loom")
    cmd = [exe] if exe else [sys.executable, "-m", "dask_loom"]
    return subprocess.run([*cmd, *map(str, argv)], capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.slow
def test_failed_convert_prints_one_line_and_leaves_nothing(tmp_path):
    src = tmp_path / "nan.loom"
    loompy.create(str(src), np.ones((70, 80)), {"Gene": np.arange(70)}, {"CellID": np.arange(80)})
    with h5py.File(src, "r+") as f:
        f["matrix"][5, 7] = np.nan  # the writer refuses NaN, in the middle of the transaction
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    out.mkdir()
    for target in ("x.loom.zarr", "x.loom"):
        p = _exe("convert", src, out / target, env=env)
        assert p.returncode == 1
        assert p.stderr == f"dask-loom convert: error: {out / target}: layer '': INF and NaN not allowed in loom matrix\n"
    assert sorted(os.listdir(out)) == []  # no target, no lock file, no temporary copy
    assert sorted(os.listdir(tmpdir)) == []  # no rollback marker left by the exited process
    # an unexpected exception is one line too, not a traceback
    p = _exe("convert", src, out / "y.loom.zarr", "--chunks", "0,0", env=env)
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_lock_file_removed_after_failed_create_keeps_writers_exclusive(tmp_path):
    """A lock file beside a target that was never created goes away, and writers stay one at a time."""
    from dask_loom.hdf5._files import _exclusive, lock_path
    from dask_loom.storage import FileSpec

    spec = FileSpec.from_path(str(tmp_path / "never.loom"))
    holders, errors = [], []
    entered = threading.Event()

    def first():
        with _exclusive(spec, 5.0):
            holders.append("a")
            entered.set()
            time.sleep(0.3)
            holders.remove("a")

    def second():
        entered.wait()
        with _exclusive(spec, 5.0):  # waits on the lock file the first writer removes
            holders.append("b")
            time.sleep(0.5)
            if len(holders) != 1:
                errors.append(list(holders))
            holders.remove("b")

    def third():
        entered.wait()
        time.sleep(0.45)  # after the first left, while the second holds
        try:
            with _exclusive(spec, 0.2):
                holders.append("c")
                if len(holders) != 1:
                    errors.append(list(holders))
                holders.remove("c")
        except WriteConflictError:
            pass

    threads = [threading.Thread(target=f) for f in (first, second, third)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not os.path.exists(lock_path(spec))
    # beside an existing file the lock file stays (docs/differences.md)
    dask_loom.create(tmp_path / "kept.loom", np.ones((2, 2)), {"g": np.arange(2)}, {"c": np.arange(2)})
    assert os.path.exists(lock_path(FileSpec.from_path(str(tmp_path / "kept.loom"))))


# -- 3. --no-validate, and the validator's reasons ---------------------------------------------------


@pytest.mark.parametrize("name", ["stats", "aggregate", "permute", "export", "scan", "convert"])
def test_invalid_file_reasons_and_no_validate(data_dir, tmp_path, capsys, name):
    src = tmp_path / "drg.loom"
    shutil.copy(data_dir / "loom" / "loomexperiment" / "L1_DRG_20_example.loom", src)
    ref = loompy.LoomValidator()
    assert ref.validate(str(src)) is False
    extra = {"aggregate": [tmp_path / "agg.loom", "--group-by", "Class"], "permute": ["--axis", "1", "--random", "3"],
             "export": [tmp_path / "e.tsv"], "scan": ["--out", tmp_path / "batches"], "convert": [tmp_path / "d.loom.zarr"]}.get(name, [])
    rc, _, err = run(capsys, name, src, *extra)
    assert rc == 1 and "Traceback" not in err
    assert err.startswith(f"dask-loom {name}: error: {src} does not appear to be a valid Loom file according to Loom spec version '2.0.1'")
    assert "--no-validate" in err
    for reason in ref.errors[:-1]:  # loompy's reasons, each on its own line ("For help" last)
        assert f"\n  {reason}" in err
    rc, out, err = run(capsys, name, src, *extra, "--no-validate")
    assert rc == 0, err
    with h5py.File(data_dir / "loom" / "loomexperiment" / "L1_DRG_20_example.loom", "r") as f:
        m = f["matrix"][()]
    if name == "stats":
        assert "20 genes" in out
    if name == "aggregate":
        with dask_loom.connect(tmp_path / "agg.loom", "r") as ds:
            np.testing.assert_allclose(ds[:, 0], m.mean(axis=1))
    if name == "permute":
        with dask_loom.connect(src, "r", validate=False) as ds:
            np.testing.assert_array_equal(ds[:, :], m[:, np.random.default_rng(3).permutation(20)])
    if name == "convert":
        with dask_loom.connect(tmp_path / "d.loom.zarr", "r", validate=False) as ds:
            np.testing.assert_array_equal(ds[:, :], m)


def test_validation_error_carries_the_reasons(data_dir):
    path = data_dir / "loom" / "loomexperiment" / "L1_DRG_20_example.loom"
    with pytest.raises(LoomValidationError) as err:
        dask_loom.connect(path, "r")
    ref = loompy.LoomValidator()
    ref.validate(str(path))
    assert err.value.errors == ref.errors
    assert err.value.filename == str(path) and err.value.version == "2.0.1"
    assert isinstance(err.value, ValueError)  # what loompy.connect raises
    import pickle

    again = pickle.loads(pickle.dumps(err.value))
    assert again.errors == ref.errors and str(again) == str(err.value)


# -- 4. an integer index drops the axis ------------------------------------------------------------


def test_integer_index_gives_scalars_as_loompy(base):
    with loompy.connect(str(base), "r") as lp, dask_loom.connect(base, "r") as ds:
        for i in (0, 5, -1):
            for name in lp.ra.keys():
                want, got = lp.ra[i][name], ds.ra[i][name]
                assert type(got) is type(want), (name, type(got), type(want))
                np.testing.assert_array_equal(got, want)
        assert type(ds.ra[5]["Gene"]) is np.str_ and ds.ra[5]["Gene"] == "g5"
        # loompy looks numpy integers up as names (AttributeError); here they select like Python ints
        got = ds.ca[np.int64(2)]["CellID"]
        want = lp.ca[2]["CellID"]
        assert type(got) is type(want) and got == want == "c2"
        assert ds.ca[np.int64(2)].Clusters == lp.ca[2].Clusters
        # slices, masks and lists keep the axis
        np.testing.assert_array_equal(ds.ca[2:3]["CellID"], lp.ca[2:3]["CellID"])


# -- 5. get() and the managers' loompy constructors ------------------------------------------------


def test_get_checks_the_default_as_loompy(base):
    with loompy.connect(str(base), "r") as lp, dask_loom.connect(base, "r") as ds:
        for default in (None, [1, 2, 3, 4, 5, 6, 7, 8], np.zeros(3)):
            with pytest.raises(ValueError) as want:
                lp.ra.get("missing", default)
            with pytest.raises(ValueError) as got:
                ds.ra.get("missing", default)
            assert str(got.value) == str(want.value)
        np.testing.assert_array_equal(ds.ra.get("missing", np.arange(8)), lp.ra.get("missing", np.arange(8)))
        np.testing.assert_array_equal(ds.ca.get("CellID", np.arange(6)), lp.ca.get("CellID", np.arange(6)))
        with pytest.raises(TypeError):
            ds.ra.get("missing")  # loompy's default is required too
        assert ds.attrs.get("missing") is None  # global attributes: None, as loompy


@pytest.mark.parametrize("layout", ["spec3", "spec2"])
def test_global_attribute_manager_on_an_h5py_file(tmp_path, layout):
    path = tmp_path / "g.loom"
    loompy.create(str(path), np.ones((2, 2)), {"g": np.arange(2)}, {"c": np.arange(2)}, file_attrs={"Title": "t"})
    if layout == "spec2":
        with h5py.File(path, "r+") as f:
            del f["attrs"]
            f.attrs["LOOM_SPEC_VERSION"] = "2.0.1"
            f.attrs["Title"] = b"t"
            f.attrs["arr"] = np.arange(3)
    with h5py.File(path, "r") as f:
        want = loompy.GlobalAttributeManager(f)
        got = dask_loom.GlobalAttributeManager(f)
        assert sorted(got.keys()) == sorted(want.keys())
        for k in want.keys():
            np.testing.assert_array_equal(got[k], want[k])
        assert got.get("missing") is None
        np.testing.assert_array_equal(got.get("missing", np.arange(2)), np.arange(2))
    with h5py.File(path, "r+") as f:
        dask_loom.GlobalAttributeManager(f)["Author"] = "me"
    with h5py.File(path, "r") as f:
        assert loompy.GlobalAttributeManager(f)["Author"] == "me"


def test_attribute_manager_on_a_loompy_style_connection(base):
    class Owner:  # what loompy's AttributeManager reads: ``_file`` and ``shape``
        def __init__(self, f):
            self._file = f
            self.shape = f["matrix"].shape

    with h5py.File(base, "r") as f:
        owner = Owner(f)
        for axis in (0, 1):
            want = loompy.AttributeManager(owner, axis=axis)
            got = dask_loom.AttributeManager(owner, axis=axis)
            assert got.keys() == want.keys()
            for k in want.keys():
                np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(TypeError, match="needs a Loom connection"):
        dask_loom.AttributeManager(object(), axis=0)


# -- 6. aggregate writes loompy's dtypes -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "int32", "uint16", "float64"])
def test_aggregate_dtypes_follow_loompy(tmp_path, dtype):
    rng = np.random.default_rng(1)
    src = tmp_path / f"a-{dtype}.loom"
    loompy.create(str(src), rng.poisson(3, (12, 9)).astype(dtype), {"Gene": np.arange(12)},
                  {"Clusters": np.array([0, 1, 2] * 3), "Age": rng.random(9).astype("float32"), "Kind": np.array(list("aab") * 3)})
    for aggr_by in ("mean", "sum", "max", "min", "first", "median", "var", "count", "nanmean", "argmax"):
        outs = {}
        for name, mod in (("loompy", loompy), ("dask_loom", dask_loom)):
            out = tmp_path / f"{name}-{aggr_by}.loom"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mod.connect(str(src), "r") as ds:
                    m = ds.aggregate(str(out), aggr_by=aggr_by, aggr_ca_by={"Age": "mean", "Kind": "tally", "Clusters": "first"})
            with h5py.File(out, "r") as f:
                outs[name] = (m.dtype, f["matrix"].dtype, m, {k: f["col_attrs"][k].dtype for k in f["col_attrs"]})
        (lm, lf, lv, lca), (dm, df, dv, dca) = outs["loompy"], outs["dask_loom"]
        assert (dm, df) == (lm, lf), aggr_by  # float64 whatever the layer's dtype, as loompy
        np.testing.assert_allclose(dv, lv, rtol=1e-6)
        assert dca == lca, aggr_by
