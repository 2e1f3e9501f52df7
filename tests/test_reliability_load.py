"""Load and leaks: 200 consecutive operations in one process with RSS and open descriptors flat.

The loop cycles through every reader: ``.loom`` and ``.loom.zarr`` scans and
maps (a connection opened and closed per operation, as scripts do), a
``MappedCollection`` over small ``.h5ad`` files (built, iterated in batches,
indexed, closed), Zarr array reads and OME-Arrow ``TensorView`` reads.  Every
result is checked against numpy on the same data, so the loop also proves the
200th answer is as right as the first.  Memory and descriptors are measured
after a warm-up (caches, thread pools and lazy imports filled), then after
the 200 operations.
"""

from __future__ import annotations

import gc
import os
import threading
import warnings

import numpy as np
import pytest

import dask_loom
from tests._reliability import record

pytestmark = [pytest.mark.reliability]

MiB = 1 << 20
N_OPS = 200
WARMUP = 24
FD_SLACK = 2


def rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def matrix(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.negative_binomial(2, 0.3, size=shape) * (rng.random(shape) < 0.3)).astype("float32")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    d = tmp_path_factory.mktemp("load")
    m = matrix((512, 320), 1)
    loom = str(d / "a.loom")
    dask_loom.create(loom, m, {"Gene": np.arange(m.shape[0])}, {"CellID": np.arange(m.shape[1])}, chunks=(64, 64))
    zloom = str(d / "a.loom.zarr")
    dask_loom.convert(loom, zloom, chunks=(128, 128))
    # Three small AnnData files (one sparse X) sharing their genes.
    h5ads, xs = [], []
    genes = [f"g{i}" for i in range(40)]
    for i in range(3):
        x = matrix((150, 40), 10 + i)
        obs = pd.DataFrame({"kind": pd.Categorical(np.array(["a", "b", "c"])[np.arange(150) % 3])}, index=[f"c{i}-{j}" for j in range(150)])
        p = str(d / f"{i}.h5ad")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad.AnnData(sp.csr_matrix(x) if i == 1 else x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(p)
        h5ads.append(p)
        xs.append(x)
    z = matrix((300, 200), 20)
    zpath = str(d / "z.zarr")
    dask_loom.to_zarr(z, zpath, chunks=(64, 64))
    img = (np.arange(2 * 128 * 96) % 4093).astype("uint16").reshape(2, 128, 96)
    ome = dask_loom.to_ome_parquet(img, str(d / "i.ome.parquet"), dim_order="ZYX", chunk_shape=(1, 32, 32))
    return {"m": m, "loom": loom, "zloom": zloom, "h5ads": h5ads, "X": np.concatenate(xs), "z": z, "zpath": zpath, "img": img, "ome": ome}


def _scan(path: str, m: np.ndarray, i: int) -> None:
    axis = i % 2
    got = np.zeros_like(m)
    with dask_loom.connect(path, "r", scheduler="threads") as ds:
        for _ix, sel, view in ds.scan(axis=axis, batch_size=128, what=["layers"]):
            if axis == 0:
                got[sel, :] = view[:, :]
            else:
                got[:, sel] = view[:, :]
    np.testing.assert_array_equal(got, m)


def _map(path: str, m: np.ndarray, i: int) -> None:
    axis = i % 2
    with dask_loom.connect(path, "r", scheduler="threads") as ds:
        s, mu = ds.map([np.sum, np.mean], axis=axis)
    ref = m.astype("float64")
    np.testing.assert_allclose(s, ref.sum(axis=1 - axis), rtol=1e-6)
    np.testing.assert_allclose(mu, ref.mean(axis=1 - axis), rtol=1e-6)


def _mapped(d: dict, i: int) -> None:
    X = d["X"]
    with dask_loom.MappedCollection(d["h5ads"], obs_keys="kind") as mc:
        seen = []
        for batch in mc.iter_batches(64, shuffle=True, seed=i, block_size=32, preload_blocks=4):
            idx = np.asarray(batch["_index"])
            np.testing.assert_array_equal(np.asarray(batch["X"]), X[idx])
            seen.append(idx)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(len(X)))
        k = (i * 37) % len(X)
        np.testing.assert_array_equal(np.asarray(mc[k]["X"]).ravel(), X[k])


def _zarr(d: dict, i: int) -> None:
    node = dask_loom.open_zarr(d["zpath"], mode="r")
    r0 = (i * 53) % 250
    np.testing.assert_array_equal(node.to_dask()[r0 : r0 + 50].compute(scheduler="threads"), d["z"][r0 : r0 + 50])
    ci = (i % 4, i % 3)
    np.testing.assert_array_equal(node.get_chunk(ci), d["z"][ci[0] * 64 : ci[0] * 64 + 64, ci[1] * 64 : ci[1] * 64 + 64])


def _ome(d: dict, i: int) -> None:
    z = i % 2
    x, y = (i * 7) % 60, (i * 11) % 90
    v = dask_loom.open_ome_arrow(d["ome"], z=z, roi=(x, y, 30, 30))
    np.testing.assert_array_equal(v.to_numpy()[0], d["img"][z, y : y + 30, x : x + 30])


def operations(d: dict) -> list[tuple[str, object]]:
    return [
        ("loom scan", lambda i: _scan(d["loom"], d["m"], i)),
        ("loom map", lambda i: _map(d["loom"], d["m"], i)),
        ("MappedCollection batches", lambda i: _mapped(d, i)),
        ("loom.zarr scan", lambda i: _scan(d["zloom"], d["m"], i)),
        ("zarr reads", lambda i: _zarr(d, i)),
        ("loom.zarr map", lambda i: _map(d["zloom"], d["m"], i)),
        ("OME TensorView", lambda i: _ome(d, i)),
    ]


def test_two_hundred_operations_rss_and_fds_flat(datasets):
    ops = operations(datasets)
    for i in range(WARMUP):
        ops[i % len(ops)][1](i)
    gc.collect()
    rss0, fd0, th0 = rss(), fds(), threading.active_count()
    counts: dict[str, int] = {}
    peak_fd = fd0
    for i in range(N_OPS):
        name, fn = ops[i % len(ops)]
        fn(i)
        counts[name] = counts.get(name, 0) + 1
        peak_fd = max(peak_fd, fds())
    gc.collect()
    rss1, fd1, th1 = rss(), fds(), threading.active_count()
    growth = 100.0 * (rss1 - rss0) / rss0
    ok = growth < 5.0 and fd1 <= fd0 + FD_SLACK and th1 <= th0 + FD_SLACK
    record(
        "load",
        "200 operations in one process",
        injected=f"{N_OPS} consecutive operations after {WARMUP} warm-up ones: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
        times=N_OPS,
        result=(
            f"all {N_OPS} results equal numpy; RSS {rss0 / MiB:.0f} -> {rss1 / MiB:.0f} MiB ({growth:+.2f} %); "
            f"open descriptors {fd0} -> {fd1} (peak {peak_fd}); threads {th0} -> {th1}"
        ),
        ok=ok,
        rss_start_mib=round(rss0 / MiB, 1),
        rss_end_mib=round(rss1 / MiB, 1),
        rss_growth_pct=round(growth, 2),
        fds_start=fd0,
        fds_end=fd1,
        fds_peak=peak_fd,
        threads_start=th0,
        threads_end=th1,
    )
    assert growth < 5.0, f"RSS grew {growth:.2f} % ({rss0 / MiB:.0f} -> {rss1 / MiB:.0f} MiB)"
    assert fd1 <= fd0 + FD_SLACK, f"open descriptors {fd0} -> {fd1}"
    assert th1 <= th0 + FD_SLACK, f"threads {th0} -> {th1}"


def _worker_state() -> tuple[int, int]:
    import gc as _gc

    _gc.collect()
    return rss(), fds()


def test_operations_on_process_cluster_rss_and_fds_flat(datasets, local_cluster):
    client = local_cluster
    m = datasets["m"]
    ref = m.astype("float64")

    def op(i: int) -> None:
        path = datasets["loom"] if i % 2 == 0 else datasets["zloom"]
        axis = (i // 2) % 2
        with dask_loom.connect(path, "r", client=client) as ds:
            if i % 3 == 2:
                got = ds[:, :]
                np.testing.assert_array_equal(got, m)
            else:
                s, mu = ds.map([np.sum, np.mean], axis=axis)
                np.testing.assert_allclose(s, ref.sum(axis=1 - axis), rtol=1e-6)
                np.testing.assert_allclose(mu, ref.mean(axis=1 - axis), rtol=1e-6)

    n, warm = 60, 12
    for i in range(warm):
        op(i)
    before = client.run(_worker_state)
    for i in range(n):
        op(i)
    after = client.run(_worker_state)
    rows = []
    worst = 0.0
    fd_ok = True
    for w in sorted(before):
        (r0, f0), (r1, f1) = before[w], after[w]
        g = 100.0 * (r1 - r0) / r0
        worst = max(worst, g)
        fd_ok &= f1 <= f0 + FD_SLACK
        rows.append(f"{r0 / MiB:.0f} -> {r1 / MiB:.0f} MiB ({g:+.2f} %), fds {f0} -> {f1}")
    ok = worst < 5.0 and fd_ok
    record(
        "load",
        "60 graphs on the process cluster",
        injected=f"{n} maps and full reads of .loom and .loom.zarr on a 2-worker process LocalCluster, after {warm} warm-up ones",
        times=n,
        result="all results equal numpy; workers: " + "; ".join(rows),
        ok=ok,
        worst_worker_rss_growth_pct=round(worst, 2),
    )
    assert worst < 5.0, rows
    assert fd_ok, rows
