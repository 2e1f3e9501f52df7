"""A worker process SIGKILLed while ``map``, ``aggregate`` and ``convert`` run on a process cluster.

A dedicated LocalCluster (2 worker processes under nannies) runs each
operation; a worker plugin makes one worker kill its own process with
``os.kill(os.getpid(), SIGKILL)`` after it has finished a random number of
the run's tasks, so every kill lands while the graph runs.  The nanny starts a new worker, the
scheduler reruns the lost tasks, and the result must equal the threaded
result exactly (or the call must fail with a clear error; none did).
``DASK_LOOM_WORKER_KILLS`` sets the kills per operation.
"""

from __future__ import annotations

import os
import signal
import time
import warnings

import numpy as np
import pytest
from distributed.diagnostics.plugin import WorkerPlugin

import dask_loom
from tests._faults import zarr_digest
from tests._reliability import record
from tests.conftest import make_matrix

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster, pytest.mark.xdist_group("workerkill")]

# Kills per operation (CI: 2; the published table: DASK_LOOM_WORKER_KILLS=10).
KILLS = int(os.environ.get("DASK_LOOM_WORKER_KILLS", "2"))


@pytest.fixture(scope="module")
def cluster():
    import dask
    from distributed import Client, LocalCluster

    # A LocalCluster closes a worker's nanny for good when no worker of that name has come back
    # `lost-worker-timeout` after a removal; the timer of one kill can fire while the nanny is
    # restarting after the next kill, and the test then waits for a worker that never comes.
    # Here the nannies must keep restarting their workers, so that timer is put out of reach.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lc = LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=50
            )
            client = Client(lc, set_as_default=False)
        yield client
        client.close()
        lc.close()


@pytest.fixture(scope="module")
def loom_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wk") / "big.loom"
    m = make_matrix((1200, 6000), seed=11, density=0.5)
    dask_loom.create(
        path,
        m,
        {"Gene": np.array([f"g{i}" for i in range(1200)])},
        {"CellID": np.array([f"c{i}" for i in range(6000)]), "Clusters": np.arange(6000) % 13},
        chunks=(64, 64),
    )
    return str(path)


class KillSwitch(WorkerPlugin):
    """A worker plugin: the worker that finishes its N-th task after the switch is armed SIGKILLs itself.

    The switch is a file holding N; the first worker to reach N removes it
    (so exactly one worker dies per arming, and its replacement does not).
    """

    name = "dask-loom-kill-switch"

    def __init__(self, arm_file: str) -> None:
        self.arm_file = arm_file
        self.done = 0

    def setup(self, worker) -> None:
        self.done = 0

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "memory":
            return
        self.done += 1
        try:
            with open(self.arm_file) as fh:
                n = int(fh.read())
        except (OSError, ValueError):
            return
        if self.done >= n:
            try:
                os.unlink(self.arm_file)
            except OSError:
                return  # the other worker won
            os.kill(os.getpid(), signal.SIGKILL)


def _wait_workers(client, n: int = 2, timeout: float = 180) -> None:
    # A nanny restarting its worker on a loaded 2-core machine has been seen to need over a minute.
    deadline = time.monotonic() + timeout
    while len(client.scheduler_info()["workers"]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("the nanny did not restart the killed worker")
        time.sleep(0.1)


def _reset(client) -> None:
    def zero(dask_worker) -> None:
        dask_worker.plugins[KillSwitch.name].done = 0

    client.run(zero)


def _done(client) -> int:
    return sum(client.run(lambda dask_worker: dask_worker.plugins[KillSwitch.name].done).values())


def _check(name: str, client, fn, same, tmp_path) -> None:
    rng = np.random.default_rng(len(name))
    arm = str(tmp_path / f"arm-{len(name)}")
    client.register_plugin(KillSwitch(arm), name=KillSwitch.name)
    _wait_workers(client)
    _reset(client)
    fn()  # warm-up, and the number of tasks each run finishes
    tasks = _done(client)
    mid = 0
    ok = 0
    errors: list[str] = []
    for _ in range(KILLS):
        _wait_workers(client)
        _reset(client)
        # Each worker finishes about half of the tasks: the kill lands inside the run.
        n = int(rng.integers(1, max(2, int(tasks * 0.4))))
        with open(arm, "w") as fh:
            fh.write(str(n))
        try:
            out = fn()
        except Exception as exc:  # a clear error is acceptable; record it
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        finally:
            fired = not os.path.exists(arm)
            if not fired:
                os.unlink(arm)
        mid += fired
        ok += bool(same(out))
    _wait_workers(client)
    client.unregister_worker_plugin(KillSwitch.name)
    record(
        "kill-worker",
        name,
        injected=f"a worker SIGKILLs its own process after finishing a random number (1..{int(tasks * 0.4)}) of the run's {tasks} tasks "
        "(LocalCluster, 2 worker processes under nannies)",
        times=mid,
        result=f"{ok} of {KILLS} results identical to the threaded run; {len(errors)} clear errors",
        ok=ok + len(errors) == KILLS and mid == KILLS,
        lost_or_corrupt=KILLS - ok - len(errors),
    )
    assert mid == KILLS  # every run really lost a worker
    assert ok + len(errors) == KILLS
    assert ok >= 1, errors


def test_worker_killed_mid_map(cluster, loom_file, tmp_path):
    import dask

    with dask.config.set({"dask_loom.block-size": "1MiB"}), dask_loom.connect(loom_file, "r") as ds:
        expected = ds.map([np.mean, np.std], axis=0, scheduler="threads")
        # A per-vector function (full-width bands) as well as the decomposable ones.
        expected_max = ds.map([lambda v: float(np.percentile(v, 90))], axis=1, scheduler="threads")

        def run():
            return ds.map([np.mean, np.std], axis=0, client=cluster), ds.map([lambda v: float(np.percentile(v, 90))], axis=1, client=cluster)

        def same(out):
            (a, b), (c,) = out
            return np.array_equal(a, expected[0]) and np.array_equal(b, expected[1]) and np.array_equal(c, expected_max[0])

        _check("map (mean/std and a per-column function)", cluster, run, same, tmp_path)


def test_worker_killed_mid_aggregate(cluster, loom_file, tmp_path):
    import dask

    with dask.config.set({"dask_loom.block-size": "1MiB"}), dask_loom.connect(loom_file, "r") as ds:
        expected = ds.aggregate(None, group_by="Clusters", aggr_by="mean", scheduler="threads")

        def run():
            return ds.aggregate(None, group_by="Clusters", aggr_by="mean", client=cluster)

        _check("aggregate (mean by Clusters)", cluster, run, lambda out: np.array_equal(out, expected), tmp_path)


def test_worker_killed_mid_convert(cluster, loom_file, tmp_path):
    import dask

    with dask.config.set({"dask_loom.block-size": "1MiB"}):
        _convert_checked(cluster, loom_file, tmp_path)


def _convert_checked(cluster, loom_file, tmp_path) -> None:
    ref = str(tmp_path / "ref.loom.zarr")
    dask_loom.convert(loom_file, ref, chunks=(128, 128), scheduler="threads")
    expected = zarr_digest(ref)
    out = str(tmp_path / "out.loom.zarr")

    def run():
        dask_loom.convert(loom_file, out, chunks=(128, 128), client=cluster)
        return zarr_digest(out)

    _check("convert .loom -> .loom.zarr", cluster, run, lambda d: d == expected, tmp_path)
    with dask_loom.connect(out, "r") as ds, dask_loom.connect(loom_file, "r") as src:
        np.testing.assert_array_equal(ds[:, :], src[:, :])
