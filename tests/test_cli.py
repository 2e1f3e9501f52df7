"""``dask-loom``: every subcommand on small files, exit codes, messages, help, schedulers, progress.

Most tests run ``dask_loom.cli.main([...])`` in this process (fast); a few run
the installed ``dask-loom`` executable to check what a shell sees.  Results
are checked against numpy on the matrix written, and ``export`` against loompy.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys

import dask
import h5py
import loompy
import numpy as np
import pytest

import dask_loom
from dask_loom import cli

N_ROWS, N_COLS = 40, 70


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A small Loom file (two layers, string/int attributes) and the arrays written."""
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(11)
    m = (rng.poisson(2.0, size=(N_ROWS, N_COLS)) * (rng.random((N_ROWS, N_COLS)) < 0.4)).astype("float32")
    spliced = rng.integers(0, 5, size=(N_ROWS, N_COLS)).astype("int32")
    ra = {"Gene": np.array([f"g{i}" for i in range(N_ROWS)]), "Score": rng.random(N_ROWS)}
    ca = {"CellID": np.array([f"c{i}" for i in range(N_COLS)]), "Clusters": rng.integers(0, 4, size=N_COLS)}
    path = folder / "small.loom"
    loompy.create(str(path), {"": m, "spliced": spliced}, ra, ca)
    return {"path": path, "m": m, "spliced": spliced, "ra": ra, "ca": ca}


@pytest.fixture
def small(ref, tmp_path):
    """A private copy (for commands that write)."""
    dst = tmp_path / "small.loom"
    shutil.copy(ref["path"], dst)
    return dst


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMPUTING = ["stats", "demo", "convert", "aggregate", "permute", "export", "scan"]


# -- help ------------------------------------------------------------------------------------


def test_help_lists_every_command(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for name in ["info", "validate", *COMPUTING]:
        assert f"    {name}" in out
    assert "exit codes" in out


@pytest.mark.parametrize("name", ["info", "validate", *COMPUTING])
def test_subcommand_help(capsys, name):
    rc, out, _ = run(capsys, name, "--help")
    assert rc == 0
    assert out.startswith(f"usage: dask-loom {name}")
    assert "example:" in out
    if name in COMPUTING:
        assert "--scheduler ADDR" in out
        assert "--progress, --no-progress" in out


def test_no_command_and_version(capsys):
    rc, _, err = run(capsys)
    assert rc == 2
    assert "usage: dask-loom" in err
    rc, out, _ = run(capsys, "--version")
    assert rc == 0
    assert out.strip() == f"dask-loom {dask_loom.__version__}"


# -- each subcommand -------------------------------------------------------------------------


def test_info(capsys, ref):
    rc, out, _ = run(capsys, "info", ref["path"])
    assert rc == 0
    assert f"shape {N_ROWS} rows x {N_COLS} columns" in out
    assert "'spliced'" in out
    for k in [*ref["ra"], *ref["ca"]]:
        assert k in out


def test_validate(capsys, ref, tmp_path):
    rc, out, _ = run(capsys, "validate", ref["path"])
    assert rc == 0
    assert out.strip().endswith("valid (Loom spec 3.0.0)")
    bad = tmp_path / "bad.loom"
    shutil.copy(ref["path"], bad)
    with h5py.File(bad, "r+") as f:  # a row attribute one value short
        del f["row_attrs/Score"]
        f["row_attrs/Score"] = np.zeros(N_ROWS - 1)
    rc, out, _ = run(capsys, "validate", bad)
    assert rc == 1
    assert "NOT valid" in out
    assert "Score" in out


@pytest.mark.parametrize("axis", [0, 1])
def test_stats_table_against_numpy(capsys, ref, tmp_path, axis):
    out_file = tmp_path / "stats.tsv"
    rc, _, err = run(capsys, "stats", ref["path"], "--axis", axis, "-o", out_file, "--no-progress")
    assert rc == 0
    assert f"wrote {ref['m'].shape[axis]} rows" in err
    table = np.genfromtxt(out_file, delimiter="\t", names=True, dtype=None, encoding="utf-8")
    m = ref["m"].astype("float64")
    red = 1 - axis
    names = ref["ra"]["Gene"] if axis == 0 else ref["ca"]["CellID"]
    assert list(table["name"]) == list(names)
    np.testing.assert_allclose(table["mean"], m.mean(axis=red), rtol=1e-5)
    np.testing.assert_allclose(table["std"], m.std(axis=red), rtol=1e-5)
    np.testing.assert_allclose(table["min"], m.min(axis=red))
    np.testing.assert_allclose(table["max"], m.max(axis=red))
    np.testing.assert_array_equal(table["count_nonzero"], np.count_nonzero(m, axis=red))


def test_stats_summary_on_a_layer(capsys, ref):
    rc, out, _ = run(capsys, "stats", ref["path"], "--layer", "spliced")
    assert rc == 0
    assert out.startswith(f"{N_ROWS} genes, layer 'spliced'")
    means = ref["spliced"].mean(axis=1)
    assert f"range [{means.min():.4g}, {means.max():.4g}]" in out


def test_aggregate(capsys, ref, tmp_path):
    out_file = tmp_path / "agg.loom"
    rc, _, err = run(
        capsys,
        "aggregate",
        ref["path"],
        out_file,
        "--group-by",
        "Clusters",
        "--aggr-by",
        "sum",
        "--ca",
        "CellID=first",
    )
    assert rc == 0
    labels = np.unique(ref["ca"]["Clusters"])
    assert f"{N_ROWS} rows x {len(labels)} groups" in err
    expected = np.stack([ref["m"][:, ref["ca"]["Clusters"] == g].sum(axis=1) for g in labels], axis=1)
    with dask_loom.connect(out_file, "r") as ds:
        np.testing.assert_allclose(ds[:, :], expected)
        first = [ref["ca"]["CellID"][np.flatnonzero(ref["ca"]["Clusters"] == g)[0]] for g in labels]
        assert list(ds.ca["CellID"]) == first


@pytest.mark.parametrize("how", ["order-by", "random", "ordering"])
def test_permute(capsys, ref, small, tmp_path, how):
    if how == "order-by":
        order = np.argsort(ref["ca"]["Clusters"], kind="stable")
        extra = ["--order-by", "Clusters"]
    elif how == "random":
        order = np.random.default_rng(5).permutation(N_COLS)
        extra = ["--random", "5"]
    else:
        order = np.random.default_rng(9).permutation(N_COLS)
        np.save(tmp_path / "order.npy", order)
        extra = ["--ordering", tmp_path / "order.npy"]
    rc, _, err = run(capsys, "permute", small, "--axis", "1", *extra)
    assert rc == 0
    assert f"({N_COLS} items)" in err
    with dask_loom.connect(small, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], ref["m"][:, order])
        np.testing.assert_array_equal(ds.layers["spliced"][:, :], ref["spliced"][:, order])
        np.testing.assert_array_equal(ds.ca["CellID"], ref["ca"]["CellID"][order])


def test_export_is_loompys(capsys, ref, tmp_path):
    ours, theirs = tmp_path / "ours.tsv", tmp_path / "theirs.tsv"
    rc, _, _ = run(capsys, "export", ref["path"], ours, "--layer", "spliced")
    assert rc == 0
    with loompy.connect(str(ref["path"]), "r") as lp:
        lp.export(str(theirs), layer="spliced")
    assert ours.read_bytes() == theirs.read_bytes()


def test_scan(capsys, ref, tmp_path):
    out_dir = tmp_path / "batches"
    rc, _, err = run(capsys, "scan", ref["path"], "--axis", "1", "--batch-size", "32", "--out", out_dir)
    assert rc == 0
    files = sorted(glob.glob(str(out_dir / "batch_*.npz")))
    assert len(files) == 3
    assert f"wrote 3 batches to {out_dir}" in err
    parts = [np.load(f) for f in files]
    np.testing.assert_array_equal(np.concatenate([p["indexes"] for p in parts]), np.arange(N_COLS))
    np.testing.assert_array_equal(np.concatenate([p["layer_matrix"] for p in parts], axis=1), ref["m"])
    np.testing.assert_array_equal(np.concatenate([p["layer_spliced"] for p in parts], axis=1), ref["spliced"])
    np.testing.assert_array_equal(np.concatenate([p["attr_CellID"] for p in parts]), ref["ca"]["CellID"])


def test_convert_round_trip(capsys, ref, tmp_path):
    z = tmp_path / "small.loom.zarr"
    back = tmp_path / "back.loom"
    assert run(capsys, "convert", ref["path"], z, "--chunks", "16,32")[0] == 0
    assert run(capsys, "convert", z, back)[0] == 0
    with dask_loom.connect(z, "r") as ds:
        # Sharded: --chunks is the inner chunk shape, the shard (the read unit) whole inner chunks.
        assert ds.__dask_loom_layer_host__().info("spliced").inner_chunks == (16, 32)
        shard = ds.layers["spliced"]._source().chunk_shape
        assert shard[0] % 16 == 0 and shard[1] % 32 == 0
        np.testing.assert_array_equal(ds.layers["spliced"][:, :], ref["spliced"])
    with loompy.connect(str(back), "r") as lp:
        np.testing.assert_array_equal(lp[:, :], ref["m"])
        np.testing.assert_array_equal(lp.ca["CellID"], ref["ca"]["CellID"])


def test_convert_reshard(capsys, ref, tmp_path):
    z = tmp_path / "old.loom.zarr"
    with dask.config.set({"dask_loom.block-size": 1}):  # one object per chunk, as before sharding
        assert run(capsys, "convert", ref["path"], z, "--chunks", "16,16")[0] == 0
    with dask_loom.connect(z, "r") as ds:
        assert ds.__dask_loom_layer_host__().info("").inner_chunks is None
    # Shards of block-size (coalesce-bytes this small never grows them: test_shard_sizing.py).
    with dask.config.set({"dask_loom.block-size": 16 * 16 * 4 * 4, "dask_loom.coalesce-bytes": 64}):
        rc, _, err = run(capsys, "convert", "--reshard", z, "--no-progress")
    assert rc == 0 and "resharded" in err and "matrix" in err
    with dask_loom.connect(z, "r") as ds:
        assert ds.__dask_loom_layer_host__().info("").inner_chunks == (16, 16)
        assert ds.layers[""]._source().chunk_shape == (32, 32)
        np.testing.assert_array_equal(ds[:, :], ref["m"])
        np.testing.assert_array_equal(ds.layers["spliced"][:, :], ref["spliced"])
    assert "already sharded" in run(capsys, "convert", "--reshard", z, "--no-progress")[2]
    with pytest.raises(SystemExit):
        run(capsys, "convert", "--reshard", z, tmp_path / "other.loom.zarr")


def test_demo(capsys, tmp_path):
    rc, out, _ = run(capsys, "demo", "--genes", "60", "--cells", "300", "--dir", tmp_path, "--no-progress")
    assert rc == 0
    assert "60 genes x 300 cells" in out
    assert "per-gene stats" in out
    assert "per-cell stats" in out
    with dask_loom.connect(tmp_path / "demo.loom", "r") as ds:
        assert ds.shape == (60, 300)
        expected = ds[:, :].mean(axis=1)
    table = np.genfromtxt(
        tmp_path / "gene_stats.tsv", delimiter="\t", names=True, dtype=None, encoding="utf-8"
    )
    np.testing.assert_allclose(table["mean"], expected, rtol=1e-5)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "{f}", "--bogus"],
        ["info"],
        ["scan", "{f}"],  # --out is required
        ["scan", "{f}", "--out", "x", "--batch-size", "0"],
        ["stats", "{f}", "--axis", "2"],
        ["stats", "{f}", "--scheduler", "not-an-address"],
        ["permute", "{f}", "--axis", "0"],  # one of --order-by/--random/--ordering
        ["frobnicate", "{f}"],
    ],
)
def test_usage_errors_exit_2(capsys, ref, argv):
    rc, out, err = run(capsys, *[a.format(f=ref["path"]) for a in argv])
    assert rc == 2
    assert "usage: dask-loom" in err
    assert "error:" in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    "name", ["info", "validate", "stats", "export", "scan", "aggregate", "convert", "permute"]
)
def test_missing_file_exit_1(capsys, tmp_path, name):
    missing = tmp_path / "absent.loom"
    extra = {
        "export": [tmp_path / "o.tsv"],
        "aggregate": [tmp_path / "o.loom"],
        "convert": [tmp_path / "o.loom.zarr"],
        "scan": ["--out", tmp_path / "b"],
        "permute": ["--axis", "0", "--random", "1"],
    }.get(name, [])
    rc, _out, err = run(capsys, name, missing, *extra)
    assert rc == 1
    assert err.count("\n") == 1  # one line
    assert err.startswith(f"dask-loom {name}: error: ")
    assert str(missing) in err
    assert "not found" in err


@pytest.mark.parametrize("name", ["info", "validate", "stats"])
def test_not_a_loom_file_exit_1(capsys, tmp_path, name):
    txt = tmp_path / "notes.loom"
    txt.write_text("hello")
    h5 = tmp_path / "other.loom"
    with h5py.File(h5, "w") as f:
        f["data"] = np.arange(3)
    for path, why in ((txt, "not a readable HDF5 file"), (h5, "not a Loom file")):
        rc, out, err = run(capsys, name, path)
        assert rc == 1
        if name == "validate" and path == h5:  # an HDF5 file: the validator's report, on stdout
            assert f"{path}: NOT valid" in out
            assert "Main matrix missing" in out
            continue
        assert str(path) in err
        assert why in err
        assert err.count("\n") == 1


def test_data_errors_name_the_problem(capsys, ref, small, tmp_path):
    rc, _, err = run(capsys, "stats", ref["path"], "--layer", "unspliced")
    assert rc == 1
    assert f"error: Layer 'unspliced' not found in {ref['path']}" in err
    rc, _, err = run(capsys, "permute", small, "--axis", "0", "--order-by", "Nope")
    assert rc == 1
    assert "no row attribute 'Nope'" in err
    rc, _, err = run(capsys, "aggregate", ref["path"], tmp_path / "a.loom", "--group-by", "Nope")
    assert rc == 1
    assert "'Nope'" in err
    rc, _, err = run(capsys, "aggregate", ref["path"], tmp_path / "a.loom", "--ca", "CellID")
    assert rc == 1
    assert "--ca expects ATTR=FUNC" in err
    rc, _, err = run(capsys, "export", ref["path"], tmp_path / "no" / "such" / "dir.tsv")
    assert rc == 1
    assert "No such file or directory" in err


def test_unreachable_scheduler(capsys, ref):
    port = closed_port()
    rc, _out, err = run(capsys, "stats", ref["path"], "--scheduler", f"tcp://127.0.0.1:{port}")
    assert rc == 1
    assert (
        err
        == f"dask-loom stats: error: cannot reach the dask scheduler at 'tcp://127.0.0.1:{port}': Connection refused\n"
    )
    # a configured default address is checked the same way
    with dask.config.set({"dask_loom.scheduler": f"127.0.0.1:{port}"}):
        rc, _, err = run(capsys, "export", ref["path"], "x.tsv")
    assert rc == 1
    assert "cannot reach the dask scheduler" in err


# -- schedulers and progress -------------------------------------------------------------------


def test_progress_bar_local(capsys, ref):
    with dask.config.set({"dask_loom.progress-minimum": 0}):
        rc, out, err = run(capsys, "stats", ref["path"], "--progress")
        assert rc == 0
        assert "100% Completed" in err
        assert "Completed" not in out  # the bar never mixes into the data on stdout
        rc, out, err = run(capsys, "stats", ref["path"], "--no-progress")
        assert "Completed" not in err


@pytest.mark.cluster
def test_on_a_cluster_with_progress(capsys, ref, tmp_path, local_cluster):
    address = local_cluster.scheduler.address
    out_file = tmp_path / "s.tsv"
    rc, _out, err = run(capsys, "stats", ref["path"], "-o", out_file, "--scheduler", address, "--progress")
    assert rc == 0
    assert "dask dashboard: http://" in err
    assert "100% Completed" in err
    table = np.genfromtxt(out_file, delimiter="\t", names=True, dtype=None, encoding="utf-8")
    np.testing.assert_allclose(table["mean"], ref["m"].mean(axis=1), rtol=1e-5)
    agg = tmp_path / "agg.loom"
    assert run(capsys, "aggregate", ref["path"], agg, "--scheduler", address, "--no-progress")[0] == 0
    with dask_loom.connect(agg, "r") as ds:
        labels = np.unique(ref["ca"]["Clusters"])
        np.testing.assert_allclose(
            ds[:, 0], ref["m"][:, ref["ca"]["Clusters"] == labels[0]].mean(axis=1), rtol=1e-6
        )


# -- the installed executable ------------------------------------------------------------------


def _exe(*argv, env=None):
    exe = shutil.which("dask-loom") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "dask_loom.cli"]
    return subprocess.run(
        [*cmd, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow  # each run imports dask_loom afresh (seconds on a loaded 2-core machine)
def test_executable_exit_codes(ref, tmp_path):
    p = _exe("info", tmp_path / "absent.loom")
    assert p.returncode == 1
    assert p.stderr.strip() == f"dask-loom info: error: File '{tmp_path / 'absent.loom'}' not found"
    p = _exe("stats", ref["path"], "--bogus")
    assert p.returncode == 2
    assert "unrecognized arguments: --bogus" in p.stderr
    port = closed_port()
    p = _exe("stats", ref["path"], "--scheduler", f"tcp://127.0.0.1:{port}")
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert f"cannot reach the dask scheduler at 'tcp://127.0.0.1:{port}'" in p.stderr


@pytest.mark.slow
def test_executable_stats_with_progress(ref, tmp_path):
    p = _exe(
        "stats",
        ref["path"],
        "--axis",
        "1",
        "-o",
        tmp_path / "c.tsv",
        "--progress",
        env={"DASK_LOOM_PROGRESS_MINIMUM": "0"},
    )
    assert p.returncode == 0, p.stderr
    assert "100% Completed" in p.stderr
    table = np.genfromtxt(tmp_path / "c.tsv", delimiter="\t", names=True, dtype=None, encoding="utf-8")
    np.testing.assert_array_equal(table["count_nonzero"], np.count_nonzero(ref["m"], axis=0))
