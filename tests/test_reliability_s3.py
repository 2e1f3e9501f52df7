"""Object-store faults: the local S3 server behind a proxy answering 500/503, dropping, stalling, cutting.

s3fs talks to a real TCP proxy (``tests/_faultproxy.py``) in front of moto's
server; faults are queued for the next requests.  Transient faults must be
retried with backoff and the data read or written must be exact; persistent
faults must end in :class:`dask_loom.errors.StoreError` naming the store and
key; an interrupted upload must never leave a store that opens as complete.
"""

from __future__ import annotations

import copy
import time
import uuid

import dask
import numpy as np
import pytest

import dask_loom
from dask_loom.errors import DaskLoomError, StoreError
from tests._faultproxy import FaultProxy
from tests._reliability import record
from tests.conftest import make_matrix

pytestmark = [pytest.mark.reliability, pytest.mark.s3, pytest.mark.xdist_group("s3faults")]

FAULTS = ["500", "503", "drop", "stall", "cut"]
RETRIES = {"dask_loom.retries": 4, "dask_loom.retry-backoff": 0.05}
# Persistent faults: fewer of our retries (s3fs retries 5 times inside each), to keep CI short.
FEW_RETRIES = {"dask_loom.retries": 2, "dask_loom.retry-backoff": 0.05}


@pytest.fixture(scope="module")
def proxy(s3_server):
    with FaultProxy(s3_server["endpoint_url"], stall_seconds=3.0) as p:
        yield p


def _options(s3_server, endpoint: str) -> dict:
    opts = copy.deepcopy(s3_server["storage_options"])
    opts["endpoint_url"] = endpoint
    # Short timeouts so a stalled request fails fast; botocore's own retries are off.
    opts["config_kwargs"] = {"connect_timeout": 1.5, "read_timeout": 1.5, "retries": {"max_attempts": 1}}
    return opts


@pytest.fixture(scope="module")
def remote(s3_server, proxy, tmp_path_factory):
    """A .loom.zarr and a .loom on S3 (uploaded directly), with their local reference."""
    d = tmp_path_factory.mktemp("s3f")
    local = str(d / "ref.loom")
    m = make_matrix((300, 700), seed=21, density=0.5)
    dask_loom.create(local, m, {"Gene": np.arange(300)}, {"CellID": np.arange(700)}, chunks=(64, 64))
    base = f"s3://{s3_server['bucket']}/faults-{uuid.uuid4().hex[:8]}"
    direct = _options(s3_server, s3_server["endpoint_url"])
    dask_loom.convert(local, f"{base}/ref.loom.zarr", chunks=(64, 64), dst_storage_options=direct, scheduler="threads")
    import fsspec

    fs = fsspec.filesystem("s3", **direct)
    fs.put_file(local, f"{base}/ref.loom".split("://", 1)[1])
    return {"base": base, "m": m, "local": local, "via_proxy": _options(s3_server, proxy.url), "direct": direct, "fs": fs}


def _from_the_store(ds) -> None:
    """Let a remote .loom's reads after this go to the store.

    Opening it fetched its first and last MiB, all of this small file, and holds them
    for chunk reads too: the faults would meet no request.
    """
    from dask_loom.hdf5._files import HELD_SPANS, cached_entry

    if not ds._spec.url.endswith(".zarr"):
        cached_entry(ds._spec).cache.pop(HELD_SPANS)


def _read(url: str, opts: dict) -> np.ndarray:
    with dask_loom.connect(url, "r", storage_options=opts, validate=False) as ds:
        return ds[:, :]


@pytest.mark.parametrize("kind", ["loom.zarr", "loom"])
@pytest.mark.parametrize("fault", FAULTS)
def test_transient_faults_are_retried(remote, proxy, fault, kind):
    url = f"{remote['base']}/ref.{kind}"
    n = 3
    with dask.config.set(RETRIES):
        ds = dask_loom.connect(url, "r", storage_options=remote["via_proxy"], validate=False)
        _from_the_store(ds)
        proxy.clear()
        proxy.reset_counts()
        proxy.inject(fault, n)
        t0 = time.perf_counter()
        got = ds[:, :]
        took = time.perf_counter() - t0
        ds.close()
    np.testing.assert_array_equal(got, remote["m"])
    assert proxy.pending == 0 and proxy.counts[fault] == n  # every fault was met and survived
    record(
        "s3",
        f"read .{kind}: {fault} x{n}",
        injected=f"the proxy answers the next {n} requests with {_describe(fault)}",
        times=n,
        result=f"all {n} faults retried; data identical ({proxy.counts['pass']} requests passed, {took:.1f} s)",
        ok=True,
    )


def _describe(fault: str) -> str:
    return {
        "500": "HTTP 500 InternalError",
        "503": "HTTP 503 SlowDown",
        "drop": "a TCP reset (no answer)",
        "stall": "silence for 3 s (client read timeout 1.5 s)",
        "cut": "the answer cut half-way and reset",
    }[fault]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loom.zarr", "loom"])
@pytest.mark.parametrize("fault", ["503", "drop"])
def test_persistent_faults_fail_clearly(remote, proxy, fault, kind):
    url = f"{remote['base']}/ref.{kind}"
    with dask.config.set(FEW_RETRIES):
        ds = dask_loom.connect(url, "r", storage_options=remote["via_proxy"], validate=False)
        ds.layers[""].to_dask()  # metadata read while the server is healthy
        _from_the_store(ds)
        proxy.clear()
        proxy.reset_counts()
        proxy.always(fault)
        t0 = time.perf_counter()
        try:
            with pytest.raises(StoreError) as info:
                ds[:, :]
        finally:
            proxy.clear()
            ds.close()
        took = time.perf_counter() - t0
    msg = str(info.value)
    assert remote["base"] in msg, msg  # names the store/file
    assert "attempt" in msg, msg  # says it retried
    assert "testing" not in msg.replace(remote["base"], "")  # no credentials
    record(
        "s3",
        f"read .{kind}: {fault} forever",
        injected=f"the proxy answers every request with {_describe(fault)}",
        times=proxy.counts[fault],
        result=f"StoreError after {took:.1f} s: {msg[:110]}…",
        ok=True,
    )


def _objects_complete(remote, prefix: str) -> tuple[int, int]:
    """Every object under *prefix* on the server: (count, how many fail to decode)."""
    import json

    import numcodecs
    import zarr

    fs = remote["fs"]
    keys = fs.find(prefix.split("://", 1)[1])
    bad = 0
    meta: dict[str, dict] = {}
    for k in keys:
        if k.endswith("zarr.json"):
            try:
                meta[k.rsplit("/", 1)[0]] = json.loads(fs.cat_file(k))
            except ValueError:
                bad += 1
    for k in keys:
        if "/c/" not in k:
            continue
        arr_dir = k.split("/c/", 1)[0]
        doc = meta.get(arr_dir)
        if doc is None:
            continue
        raw = fs.cat_file(k)
        try:
            data = raw
            for c in reversed(doc.get("codecs", [])[1:]):
                cfg = dict(c.get("configuration") or {})
                if c["name"] == "blosc":
                    data = numcodecs.Blosc().decode(data)
                elif c["name"] == "zstd":
                    data = numcodecs.Zstd().decode(data)
                elif c["name"] == "gzip":
                    data = numcodecs.GZip(cfg.get("level", 1)).decode(data)
            shape = doc["chunk_grid"]["configuration"]["chunk_shape"]
            if doc["codecs"][0]["name"] == "bytes":
                assert len(data) == int(np.prod(shape)) * np.dtype(doc["data_type"]).itemsize
        except Exception:
            bad += 1
    del zarr
    return len(keys), bad


@pytest.mark.parametrize("fault", ["503", "drop", "cut"])
def test_upload_with_transient_faults_is_exact(remote, proxy, fault):
    dst = f"{remote['base']}/up-{fault}.loom.zarr"
    with dask.config.set(RETRIES):
        proxy.clear()
        proxy.reset_counts()
        # Faults spread over the upload: every 7th request fails.
        proxy.inject("pass", 5)
        for _ in range(4):
            proxy.inject(fault, 1)
            proxy.inject("pass", 6)
        dask_loom.convert(remote["local"], dst, chunks=(64, 64), dst_storage_options=remote["via_proxy"], scheduler="threads")
        met = proxy.counts[fault]
        proxy.clear()
    np.testing.assert_array_equal(_read(dst, remote["direct"]), remote["m"])
    n, bad = _objects_complete(remote, dst)
    assert bad == 0
    assert met == 4
    record(
        "s3",
        f"upload .loom.zarr (convert): {fault} every 7th request",
        injected=f"{met} requests of the upload answered with {_describe(fault)}",
        times=met,
        result=f"upload completed after retries; {n} objects, all complete; data identical",
        ok=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "after"), [("503", 60), ("drop", 20), ("drop", 80)])
def test_interrupted_upload_never_looks_complete(remote, proxy, fault, after):
    dst = f"{remote['base']}/cut-{fault}-{after}.loom.zarr"
    with dask.config.set(FEW_RETRIES):
        proxy.clear()
        proxy.reset_counts()
        proxy.inject("pass", after)  # the upload gets going, then the store goes down for good
        proxy.always(fault)
        try:
            with pytest.raises(StoreError) as info:
                dask_loom.convert(remote["local"], dst, chunks=(64, 64), dst_storage_options=remote["via_proxy"], scheduler="threads")
        finally:
            proxy.clear()
    assert dst.split("://")[1].split("/")[0] in str(info.value)
    n, bad = _objects_complete(remote, dst)
    assert bad == 0  # no object is partial: S3 PUTs are whole or absent
    # The store as a whole: it must not open as a complete Loom store.
    opened_ok = False
    try:
        got = _read(dst, remote["direct"])
        opened_ok = np.array_equal(got, remote["m"])
        assert opened_ok, "a partial upload opened and read as if complete"
    except (DaskLoomError, FileNotFoundError) as exc:
        why = f"{type(exc).__name__}"
    else:
        why = "complete"
    record(
        "s3",
        f"upload .loom.zarr (convert): {fault} forever after {after} requests",
        injected=f"the proxy passes {after} of the ~90 requests, then answers every request with {_describe(fault)}",
        times=1,
        result=f"StoreError; {n} objects left, all whole; the partial store does not open ({why})",
        ok=True,
    )
