"""obstore as the object-store client: storage options, error classes over the wire, no s3fs on the read path."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import subprocess
import sys
import uuid

import dask
import numpy as np
import pytest

import dask_loom
from dask_loom.errors import MissingKeyError, StoreError
from dask_loom.storage._obstore import message, translate_options
from dask_loom.storage._rangefile import RangeFile
from dask_loom.stores import CredentialsError, open_store
from tests._processes import in_forked_child


def test_s3fs_style_options_translate_to_obstore_config():
    config, client = translate_options(
        "s3",
        {
            "key": "AKIA-TEST",
            "secret": "s3cr3t",
            "token": "tok",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 1}},
            "use_listings_cache": False,
        },
    )
    assert config == {
        "aws_access_key_id": "AKIA-TEST",
        "aws_secret_access_key": "s3cr3t",
        "aws_session_token": "tok",
        "aws_endpoint": "http://127.0.0.1:9000",
        "aws_region": "eu-west-1",
    }
    assert client == {
        "connect_timeout": datetime.timedelta(seconds=5),
        "timeout": datetime.timedelta(seconds=30),
        "allow_http": True,  # an http:// endpoint
    }


def test_top_level_endpoint_anon_and_obstore_keys():
    config, client = translate_options("s3", {"anon": True, "endpoint_url": "https://minio.example"})
    assert config == {"aws_skip_signature": True, "aws_endpoint": "https://minio.example"}
    assert client == {}  # https: no allow_http
    config, _ = translate_options("s3", {"anon": False, "key": "k", "secret": "s"})
    assert "aws_skip_signature" not in config
    # obstore's own keys pass through unchanged, client and retry options as given (retries stay ours).
    config, client = translate_options(
        "s3a",
        {
            "aws_region": "us-west-2",
            "skip_signature": True,
            "client_options": {"allow_http": True},
            "retry_config": {},
        },
    )
    assert config == {"aws_region": "us-west-2", "skip_signature": True}
    assert client == {"allow_http": True}


def test_gcs_and_azure_options():
    assert translate_options("gs", {"token": "anon"})[0] == {"google_skip_signature": True}
    assert translate_options("gcs", {"anon": True, "project": "p"})[0] == {"google_skip_signature": True}
    config, _ = translate_options("az", {"account_name": "acct", "account_key": "k==", "sas_token": "sv=1"})
    assert config == {
        "azure_storage_account_name": "acct",
        "azure_storage_account_key": "k==",
        "azure_storage_sas_key": "sv=1",
    }
    with pytest.raises(ValueError, match="'aws_region' does not apply to gs://"):
        translate_options("gs", {"aws_region": "x"})
    with pytest.raises(ValueError, match="'key' does not apply to https://"):
        translate_options("https", {"key": "k"})
    assert translate_options("http", {})[1] == {"allow_http": True}


def test_unknown_option_is_refused_by_name_without_its_value(s3_server):
    opts = {**s3_server["storage_options"], "not_an_option": "SECRET-VALUE"}
    s = open_store(f"s3://{s3_server['bucket']}/opt-{uuid.uuid4().hex}", **opts)
    with pytest.raises(Exception, match="not_an_option") as info:
        s.get("k")
    assert "SECRET-VALUE" not in str(info.value)
    assert "testing" not in repr(s)


# -- errors over the wire ---------------------------------------------------------------
@pytest.mark.s3
def test_503_then_success_is_retried_once(s3_server):
    stats = s3_server["stats"]
    s = open_store(f"s3://{s3_server['bucket']}/r-{uuid.uuid4().hex}", **s3_server["storage_options"])
    s.set("k", b"value")
    with dask.config.set({"dask_loom.retries": 3, "dask_loom.retry-backoff": 0.01}):
        stats.reset()
        stats.fail_next(1, status=503)
        assert s.get("k") == b"value"
        assert stats.get_requests == 1  # one answered GET after the injected 503 (not counted)
    # obstore's own retries are off: with none of ours, one 503 fails the read and the second stays queued.
    with dask.config.set({"dask_loom.retries": 0}):
        stats.fail_next(2, status=503)
        try:
            with pytest.raises(StoreError, match="get 'k' failed after 1 attempts.*503"):
                s.get("k")
            assert stats._take_failure() == 503 and stats._take_failure() is None
        finally:
            stats.clear_failures()


@pytest.mark.s3
def test_403_fails_at_once_as_credentials_error_naming_the_store(s3_server):
    stats = s3_server["stats"]
    url = f"s3://{s3_server['bucket']}/d-{uuid.uuid4().hex}"
    s = open_store(url, **s3_server["storage_options"])
    s.set("k", b"v")
    with dask.config.set({"dask_loom.retries": 3, "dask_loom.retry-backoff": 0.01}):
        stats.deny_next(2)
        try:
            with pytest.raises(CredentialsError, match=rf"{url}: access to 'k' refused \(get\).*403") as info:
                s.get("k")
            assert "Debug source" not in str(info.value)
            # Not asked again: the second 403 is still queued.
            assert stats._take_failure() == 403 and stats._take_failure() is None
        finally:
            stats.clear_failures()
    assert s.get("k") == b"v"


@pytest.mark.s3
def test_missing_key_is_missing_key_error(s3_server):
    s = open_store(f"s3://{s3_server['bucket']}/m-{uuid.uuid4().hex}", **s3_server["storage_options"])
    with pytest.raises(MissingKeyError, match="no key 'nope'"):
        s.get("nope")
    assert not s._exists("nope") and s._exists("k") is False
    s.set("k", b"1")
    assert s._exists("k")


@pytest.mark.s3
def test_remote_hdf5_503_retried_403_refused(s3_server, tmp_path):
    stats = s3_server["stats"]
    m = np.arange(100 * 130, dtype="f4").reshape(100, 130)
    local = str(tmp_path / "x.loom")
    dask_loom.create(local, m, {"Gene": np.arange(100)}, {"CellID": np.arange(130)}, chunks=(32, 32))
    url = f"s3://{s3_server['bucket']}/h-{uuid.uuid4().hex}/x.loom"
    with open(local, "rb") as fh:
        open_store(url.rsplit("/", 1)[0], **s3_server["storage_options"]).set("x.loom", fh.read())
    with dask.config.set({"dask_loom.retries": 3, "dask_loom.retry-backoff": 0.01}):
        stats.fail_next(1, status=503)
        with dask_loom.connect(url, "r", storage_options=s3_server["storage_options"]) as ds:
            np.testing.assert_allclose(ds.map([np.mean], axis=0)[0], m.mean(axis=1), rtol=1e-6)
        from dask_loom.hdf5._files import clear_all

        clear_all()
        stats.deny_next(1)
        try:
            with pytest.raises(CredentialsError, match="x.loom: access refused.*403"):
                dask_loom.connect(url, "r", storage_options=s3_server["storage_options"])
        finally:
            stats.clear_failures()
            clear_all()


def test_message_keeps_the_cause_not_the_dump():
    class GenericError(Exception):
        pass

    text = (
        "Generic S3 error: Error performing GET http://h/b/k in 1ms - HTTP error: error sending request\n\n"
        'Debug source:\nGeneric {\n  inner: Http(\n HttpError {\n   kind: Connect,\n  message: "Connection refused",\n}'
    )
    assert message(GenericError(text)) == (
        "Generic S3 error: Error performing GET http://h/b/k in 1ms - HTTP error: error sending request "
        "(connect error: Connection refused)"
    )


# -- the block file h5py reads through -------------------------------------------------------
def test_range_file_reads_equal_the_bytes_and_fetch_missing_blocks_together():
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    calls: list[list[int]] = []

    def fetch(starts, sizes):
        calls.append(list(starts))
        return [data[s : s + n] for s, n in zip(starts, sizes)]

    f = RangeFile(len(data), fetch, block_size=1000, maxblocks=4, seed={9: data[9000:]})
    f.seek(8500)
    assert f.read(1000) == data[8500:9500]  # block 8 fetched, block 9 from the seed
    assert calls == [[8000]]
    f.seek(100)
    buf = bytearray(2500)
    assert f.readinto(buf) == 2500 and bytes(buf) == data[100:2600]
    assert calls[-1] == [0, 1000, 2000]  # one call for the three blocks
    f.seek(-10, os.SEEK_END)
    assert f.read() == data[-10:] and f.read() == b""
    assert calls[-1] == [0, 1000, 2000]  # block 9 is cached now
    f.seek(0)
    assert f.read(5) == data[:5]
    assert len(calls) == 2
    f.seek(5000)
    f.read(10)  # a fifth block: the least recently used (8) goes
    f.seek(8000)
    f.read(1)
    assert calls[-1] == [8000]


# -- processes ---------------------------------------------------------------------------
def _read_in_child(s, q):
    q.put(s.get("k"))


@pytest.mark.s3
def test_object_store_pickles_and_worksin_forked_child(s3_server):
    s = open_store(f"s3://{s3_server['bucket']}/p-{uuid.uuid4().hex}", **s3_server["storage_options"])
    s.set("k", b"forked")
    assert s.get("k") == b"forked"  # the parent built its client first
    assert pickle.loads(pickle.dumps(s)).get("k") == b"forked"
    got, exitcode = in_forked_child(_read_in_child, s)
    assert got == b"forked" and exitcode == 0


def _read_without_s3fs(s, q):
    try:
        import importlib

        # fsspec's package attribute ``registry`` is the mapping, not the module
        reg = importlib.import_module("fsspec.registry")
        reg.known_implementations["s3"] = {"class": "s3fs_missing.S3FileSystem", "err": "Install s3fs"}
        reg._registry.pop("s3", None)
        s.get("k")
        q.put("read")
    except Exception as exc:  # the child reports what it raised
        q.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.s3
def test_forked_child_without_the_fallback_gets_a_clear_error(s3_server):
    """No s3fs in a child forked after obstore use: a typed error saying to spawn, not a hang."""
    s = open_store(f"s3://{s3_server['bucket']}/p-{uuid.uuid4().hex}", **s3_server["storage_options"])
    s.set("k", b"x")
    assert s.get("k") == b"x"
    got, _ = in_forked_child(_read_without_s3fs, s)
    assert got.startswith("StoreError: s3://") and "forked" in got and "'spawn'" in got, got
    assert s3_server["storage_options"].get("secret", "no-secret-here") not in got


@pytest.mark.s3
def test_s3_read_path_imports_no_s3fs(s3_server, tmp_path):
    """connect("s3://…loom") + map, a .loom.zarr and the AnnData reader, in a fresh process: no s3fs, no botocore."""
    m = np.arange(90 * 70, dtype="f4").reshape(90, 70)
    local = str(tmp_path / "x.loom")
    dask_loom.create(local, m, {"Gene": np.arange(90)}, {"CellID": np.arange(70)}, chunks=(32, 32))
    opts = s3_server["storage_options"]
    base = f"s3://{s3_server['bucket']}/ns-{uuid.uuid4().hex}"
    with open(local, "rb") as fh:
        open_store(base, **opts).set("x.loom", fh.read())
    dask_loom.convert(
        local, f"{base}/x.loom.zarr", chunks=(32, 32), dst_storage_options=opts, scheduler="sync"
    )
    code = f"""
import json, sys
import numpy as np
import dask_loom
opts = {opts!r}
sums = []
for url in ["{base}/x.loom", "{base}/x.loom.zarr"]:
    with dask_loom.connect(url, "r", storage_options=opts) as ds:
        sums.append(ds.map([np.mean], axis=0)[0].tolist())
a = dask_loom.read_loom("{base}/x.loom", storage_options=opts)
x = a.X.compute() if hasattr(a.X, "compute") else a.X
sums.append(np.asarray(x.sum(axis=1)).ravel().tolist())
print(json.dumps([sums, [m for m in ("s3fs", "aiobotocore", "botocore") if m in sys.modules]]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sums, imported = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(sums[0], m.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(sums[1], m.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(sums[2], m.T.sum(axis=1), rtol=1e-5)  # AnnData: cells are rows
    assert imported == []
