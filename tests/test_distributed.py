"""A real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 run the Loom operations."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

import dask_loom
from tests._processes import free_port, start_scheduler, start_worker, stop

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory):
    logs = tmp_path_factory.mktemp("dask-logs")
    files = [open(logs / name, "w") for name in ("scheduler.log", "worker0.log", "worker1.log")]
    scheduler, address = start_scheduler(files[0])
    procs = [scheduler]
    try:
        from distributed import Client

        procs += [start_worker(address, f"w{i}", files[i + 1]) for i in range(2)]
        with Client(address, timeout=10) as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        stop(procs)
        for f in files:
            f.close()


def test_cli_commands_exist():
    # The hyphenated executables are gone (distributed 2026.6); the module entry points remain.
    out = subprocess.run([sys.executable, "-m", "distributed.cli.dask_worker", "--help"], capture_output=True, text=True, timeout=60)
    assert "--nworkers" in out.stdout


def test_operations_through_real_processes(scheduler_address, loompy_file, tmp_path):
    from distributed import Client

    path, ref = loompy_file
    local, remote = tmp_path / "local.loom", tmp_path / "remote.loom"
    shutil.copy(path, local)
    shutil.copy(path, remote)
    with Client(scheduler_address) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        with dask_loom.connect(remote, client=client) as ds, dask_loom.connect(local, scheduler="threads") as lo:
            for a, b in zip(ds.map([np.mean, np.std, np.median], axis=0), lo.map([np.mean, np.std, np.median], axis=0)):
                np.testing.assert_allclose(a, b, rtol=1e-12)
            got = np.concatenate([v[:, :] for _, _, v in ds.scan(axis=1, batch_size=128)], axis=1)
            np.testing.assert_array_equal(got, ref[""])
            np.testing.assert_array_equal(ds.aggregate(aggr_by="mean"), lo.aggregate(aggr_by="mean"))
            order = np.random.default_rng(0).permutation(ds.shape[1])
            ds.permute(order, axis=1)
            lo.permute(order, axis=1)
            ds["doubled"] = ds.layers["spliced"].dask * 2
            lo["doubled"] = lo.layers["spliced"].dask * 2
            np.testing.assert_array_equal(ds["doubled"][:, :], lo["doubled"][:, :])
            np.testing.assert_array_equal(ds["doubled"][:, :], ref["spliced"][:, order] * 2)
            np.testing.assert_array_equal(ds[:, :], lo[:, :])
        # Tasks really ran on the two workers, with readable names.
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        assert {"loom-map", "loom-aggregate", "loom-permute", "loom-write"} <= set(prefixes)


def test_scheduler_from_environment(scheduler_address, loompy_file, monkeypatch):
    path, ref = loompy_file
    monkeypatch.setenv("DASK_LOOM_SCHEDULER", scheduler_address)
    import dask

    with dask.config.set({"dask_loom.scheduler": scheduler_address}):
        with dask_loom.connect(path, "r") as ds:
            np.testing.assert_allclose(ds.map([np.sum], axis=1)[0], ref[""].sum(axis=0), rtol=1e-6)
        from dask_loom.cluster import resolve_scheduler

        assert hasattr(resolve_scheduler(), "submit")


def test_unreachable_scheduler_is_a_clear_error(loompy_file):
    import dask

    from dask_loom.errors import SchedulerError

    path, _ = loompy_file
    port = free_port()
    with dask.config.set({"dask_loom.connect-timeout": 2}), dask_loom.connect(path, "r") as ds, pytest.raises(SchedulerError, match=f"127.0.0.1:{port}"):
        ds.map([np.sum], scheduler=f"tcp://127.0.0.1:{port}")
