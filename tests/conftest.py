"""Shared fixtures: the real-data folder, a process-based LocalCluster, loompy-written files."""

from __future__ import annotations

import os
import pathlib
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = pathlib.Path(__file__).resolve().parents[1]

# ``s3_server``: a real S3-compatible server (moto) on 127.0.0.1, for cloud tests.
# ``azurite``: Microsoft's Azure Storage emulator on 127.0.0.1, for the az:// tests.
from _azurite import azurite  # noqa: E402, F401
from _s3server import s3_server  # noqa: E402, F401


@pytest.fixture
def s3_proxy(s3_server):  # noqa: F811
    """A factory of proxies in front of the local S3 server: ``s3_proxy(latency=0.02, bandwidth=None)``.

    Each proxy (``tests/_faultproxy.py``) injects latency per request, caps the
    bandwidth, counts requests and bytes by method and can inject faults; its
    ``storage_options`` attribute holds s3fs options that go through it.  All
    are closed at the end of the test.
    """
    from _faultproxy import FaultProxy, options_via

    made = []

    def make(*, latency: float = 0.0, bandwidth: float | None = None, stall_seconds: float = 5.0):
        p = FaultProxy(s3_server["endpoint_url"], latency=latency, bandwidth=bandwidth, stall_seconds=stall_seconds)
        p.storage_options = options_via(s3_server["storage_options"], p.url)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _data_root() -> pathlib.Path:
    env = os.environ.get("DASK_LOOM_TEST_DATA")
    return pathlib.Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The folder of real public files (``../shared/data`` or ``$DASK_LOOM_TEST_DATA``)."""
    root = _data_root()
    if not (root / "MANIFEST.md").exists():
        pytest.skip(f"real-data folder not found at {root} (set DASK_LOOM_TEST_DATA to its location)")
    return root


@pytest.fixture(scope="session")
def local_cluster():
    """A process-based LocalCluster (2 workers x 1 thread) and its client, shared by the session."""
    from distributed import Client, LocalCluster

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


def make_matrix(shape: tuple[int, int], *, seed: int = 0, dtype: str = "float32", density: float = 0.2) -> np.ndarray:
    """Negative-binomial counts with about ``1 - density`` zeros."""
    rng = np.random.default_rng(seed)
    m = rng.negative_binomial(2, 0.3, size=shape) * (rng.random(shape) < density)
    return m.astype(dtype)


@pytest.fixture(scope="session")
def loompy_file(tmp_path_factory):
    """A Loom file written by the real loompy: 2 layers, string/int/float/2-D attrs, graphs.

    Returns ``(path, reference)`` where ``reference`` holds the numpy arrays written.
    """
    import loompy
    import scipy.sparse as sp

    path = tmp_path_factory.mktemp("loompy") / "ref.loom"
    n, m = 300, 517
    main = make_matrix((n, m), seed=1)
    spliced = make_matrix((n, m), seed=2, dtype="int32")
    rng = np.random.default_rng(3)
    ra = {
        "Gene": np.array([f"gene{i}" for i in range(n)]),
        "Accession": np.array([f"ENSG{i:08d}" for i in range(n)]),
        "Score": rng.random(n),
        "PCA": rng.random((n, 3)),
    }
    ca = {
        "CellID": np.array([f"cell_{i}" for i in range(m)]),
        "Clusters": rng.integers(0, 7, size=m),
        "ClusterName": np.array([f"type{c}" for c in rng.integers(0, 7, size=m)]),
        "Total": main.sum(axis=0).astype("float64"),
    }
    loompy.create(str(path), {"": main, "spliced": spliced}, ra, ca, file_attrs={"Title": "reference"})
    knn = sp.random(m, m, density=0.01, random_state=4, format="coo")
    rknn = sp.random(n, n, density=0.02, random_state=5, format="coo")
    with loompy.connect(str(path)) as ds:
        ds.col_graphs.KNN = knn
        ds.row_graphs.RKNN = rknn
    ref = {"": main, "spliced": spliced, "ra": ra, "ca": ca, "KNN": knn, "RKNN": rknn}
    return path, ref
