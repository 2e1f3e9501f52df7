"""The writing process killed with SIGKILL at random moments of every write operation.

For each operation a child process (forked from a pre-imported server, see
``tests/_faults.py``) runs the write on a copy of a file; the test kills it
after a uniformly random delay within the operation's duration, then checks
that the file or store validates and holds the old or the new content, whole.
``DASK_LOOM_KILLS`` sets the kills per operation (CI default: a few; the
published table in docs/reliability.md comes from 50).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import dask_loom
from tests._faults import Zygote, any_digest, any_valid, is_valid_zarr, kill_during, zarr_digest
from tests._reliability import kills, record
from tests.conftest import make_matrix

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

SHAPE = (400, 1000)
CHUNKS = (64, 64)


def _make_loom(path: str, seed: int) -> None:
    import scipy.sparse as sp

    m = make_matrix(SHAPE, seed=seed, density=0.4)
    dask_loom.create(
        path,
        {"": m, "spliced": (m * 2).astype("i4")},
        {"Gene": np.array([f"g{i}" for i in range(SHAPE[0])]), "Score": np.linspace(0, 1, SHAPE[0])},
        {"CellID": np.array([f"c{seed}-{i}" for i in range(SHAPE[1])]), "Clusters": np.arange(SHAPE[1]) % 7},
        file_attrs={"Title": f"seed {seed}"},
        chunks=CHUNKS,
    )
    with dask_loom.connect(path) as ds:
        ds.col_graphs.KNN = sp.random(SHAPE[1], SHAPE[1], density=0.002, random_state=seed, format="coo")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kills")
    out = {}
    # .loom (HDF5) and .loom.zarr originals.
    out["loom"] = str(d / "orig.loom")
    _make_loom(out["loom"], 0)
    out["zarr"] = str(d / "orig.loom.zarr")
    dask_loom.convert(out["loom"], out["zarr"], chunks=(128, 128), scheduler="sync")
    # convert .loom -> .loom.zarr over an existing (older) store at the target name.
    out["conv"] = str(d / "conv.loom")
    _make_loom(out["conv"], 1)
    _make_loom(str(d / "older.loom"), 2)
    dask_loom.convert(str(d / "older.loom"), out["conv"] + ".zarr", chunks=(128, 128), scheduler="sync")
    # convert .loom.zarr -> .loom over an existing (older) file at the target name.
    out["back"] = str(d / "back.loom.zarr")
    dask_loom.convert(out["conv"], out["back"], chunks=(128, 128), scheduler="sync")
    _make_loom(out["back"] + ".loom", 3)
    # A plain Zarr store with two arrays; to_zarr replaces one of them.
    import zarr

    out["arr"] = str(d / "arrays.zarr")
    g = zarr.open_group(out["arr"], mode="w")
    g.create_array("x", data=np.arange(600 * 700, dtype="f4").reshape(600, 700), chunks=(64, 64))
    g.create_array("y", data=np.arange(100, dtype="i8"), chunks=(10,))
    return out


@pytest.fixture(scope="module")
def zygote():
    with Zygote() as z:
        yield z


# The connection is opened in the set-up, so kills land inside the write itself.
CONNECT = "\nds = dask_loom.connect(path)"
OPS = {
    # name: (set-up, operation)
    "permute": ("order = np.random.default_rng(1).permutation(1000)" + CONNECT, "ds.permute(order, axis=1)\nds.close()"),
    "add_columns": (
        "m = np.random.default_rng(2).random((400, 300)).astype('f4')" + CONNECT,
        "ds.add_columns({'': m, 'spliced': (m * 10).astype('i4')}, "
        "{'CellID': np.array(['n%d' % i for i in range(300)]), 'Clusters': np.zeros(300, int)})\nds.close()",
    ),
    "layer write": ("m = np.random.default_rng(3).random((400, 1000)).astype('f4')" + CONNECT, "ds['fresh'] = m\nds.close()"),
    "region write": (
        "m = np.random.default_rng(4).random((300, 800)).astype('f4')" + CONNECT,
        "ds.layers[''][50:350, 100:900] = m\nds.close()",
    ),
    "attribute write": (
        "v = np.array(['x%d' % i for i in range(1000)])" + CONNECT,
        "ds.ca['Label'] = v\nds.close()",
    ),
}


def _report(name: str, rep, kind: str) -> None:
    ok = rep.lost_or_corrupt == 0 and rep.old + rep.new == rep.kills
    record(
        "kill-writer",
        f"{name} ({kind})",
        injected=f"SIGKILL after a uniform random delay in [0, 1.05 x {rep.op_seconds:.2f} s]",
        times=rep.kills,
        result=f"{rep.old} old, {rep.new} new, {rep.invalid} invalid, {rep.other} mixed"
        + (f" ({rep.completed_before_kill} kills came after the op finished)" if rep.completed_before_kill else ""),
        ok=ok,
        lost_or_corrupt=rep.lost_or_corrupt,
        old=rep.old,
        new=rep.new,
        seconds=rep.seconds,
    )


@pytest.mark.parametrize("kind", ["loom", "zarr"])
@pytest.mark.parametrize("op", list(OPS))
def test_sigkill_during_write(files, zygote, tmp_path, op, kind):
    setup, code = OPS[op]
    n = kills()
    rep = kill_during(
        files[kind],
        str(tmp_path),
        name=f"{op.replace(' ', '_')}.{kind}",
        setup=setup,
        op=code,
        kills=n,
        seed=sum(map(ord, op + kind)),
        digest=any_digest,
        valid=any_valid,
        zygote=zygote,
    )
    _report(op, rep, ".loom" if kind == "loom" else ".loom.zarr")
    assert rep.kills == n
    assert rep.lost_or_corrupt == 0, rep.notes[:5]
    assert rep.old + rep.new == n
    # The next writer works and removes what dead writers left beside the file.
    work = tmp_path / f"{op.replace(' ', '_')}.{kind}-work"
    with dask_loom.connect(work) as ds:
        ds.ca.After = np.arange(ds.shape[1])
    assert [p for p in os.listdir(tmp_path) if (".dask-loom-" in p and p.endswith(".tmp")) or p.startswith(".dlpart-")] == []


@pytest.mark.parametrize(
    ("direction", "key", "suffix", "chunks"),
    [("convert .loom -> .loom.zarr", "conv", ".zarr", (128, 128)), ("convert .loom.zarr -> .loom", "back", ".loom", (64, 64))],
)
def test_sigkill_during_convert(files, zygote, tmp_path, direction, key, suffix, chunks):
    n = kills()
    rep = kill_during(
        files[key],
        str(tmp_path),
        name=key,
        setup="",
        op=f"dask_loom.convert(path, path + {suffix!r}, chunks={chunks!r}, scheduler='threads')",
        kills=n,
        seed=len(direction),
        digest=any_digest,
        valid=any_valid,
        target=suffix,
        zygote=zygote,
    )
    _report(direction, rep, "target")
    assert rep.lost_or_corrupt == 0, rep.notes[:5]
    assert rep.old + rep.new == n


def test_sigkill_during_to_zarr(files, zygote, tmp_path):
    n = kills()
    rep = kill_during(
        files["arr"],
        str(tmp_path),
        name="to_zarr",
        setup="import dask.array as da\nx = da.random.default_rng(5).random((600, 700), chunks=(100, 350)).astype('f4')",
        op="dask_loom.to_zarr(x, path, 'x', chunks=(64, 64), scheduler='threads')",
        kills=n,
        seed=7,
        digest=zarr_digest,
        valid=lambda p: is_valid_zarr(p, loom=False),
        zygote=zygote,
    )
    _report("to_zarr (replace an array)", rep, "local Zarr store")
    assert rep.lost_or_corrupt == 0, rep.notes[:5]
    assert rep.old + rep.new == n
