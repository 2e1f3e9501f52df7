"""The latency-true test bed: the request-counting, latency-injecting proxy in front of the local S3 server.

What the cloud tests and benchmarks rely on is checked here against what was
sent: requests and body bytes counted by method equal what s3fs asked for,
latency is paid per request and overlaps between concurrent requests, the
bandwidth cap bounds the transfer rate, and the ``"short"`` fault gives a
well-formed answer with half the body (the hazard the readers must catch).
"""

from __future__ import annotations

import time
import uuid

import pytest

pytestmark = [pytest.mark.s3, pytest.mark.xdist_group("s3proxy")]


@pytest.fixture
def objects(s3_server):
    """Two objects on the server (written directly, not through a proxy): their keys and bytes."""
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server["storage_options"], skip_instance_cache=True)
    base = f"{s3_server['bucket']}/proxy-{uuid.uuid4().hex[:8]}"
    data = {f"{base}/a": bytes(range(256)) * 4096, f"{base}/b": b"x" * 1000}  # 1 MiB and 1,000 B
    for k, v in data.items():
        fs.pipe_file(k, v)
    return data


def _fs(proxy):
    import fsspec

    return fsspec.filesystem("s3", **proxy.storage_options, skip_instance_cache=True)


def test_counts_requests_and_bytes_by_method(s3_proxy, objects):
    proxy = s3_proxy()
    fs = _fs(proxy)
    a, b = objects
    assert fs.cat_file(a, start=100, end=1100) == objects[a][100:1100]
    assert fs.cat_file(b) == objects[b]
    assert fs.info(a)["size"] == len(objects[a])
    snap = proxy.snapshot()
    assert snap["requests"]["GET"] == 2
    assert snap["ranged_gets"] == 1
    assert snap["bytes"]["GET"] == 1000 + 1000
    # s3fs sends a HEAD before a whole-object GET (the "a GET and a HEAD per chunk object"), and one for info().
    assert snap["requests"].get("HEAD", 0) == 2
    assert snap["bytes"].get("HEAD", 0) == 0
    got = [(r.method, r.range, r.status, r.body_bytes) for r in proxy.log]
    assert ("GET", "bytes=100-1099", 206, 1000) in got
    assert ("GET", None, 200, 1000) in [(m, r, s, n) for m, r, s, n in got if r is None and m == "GET"]
    proxy.reset_counts()
    assert proxy.snapshot()["total_requests"] == 0 and proxy.log == []


def test_latency_is_paid_per_request_and_overlaps(s3_proxy, objects):
    lat = 0.1
    proxy = s3_proxy(latency=lat)
    fs = _fs(proxy)
    _a, b = objects
    fs.cat_file(b)  # connection set-up out of the way
    n = 4
    t0 = time.perf_counter()
    for _ in range(n):
        fs.cat_file(b)
    serial = time.perf_counter() - t0
    assert serial >= n * lat
    # Concurrent requests wait at the same time, as on a real store.
    t0 = time.perf_counter()
    got = fs.cat_ranges([b] * n, [0] * n, [10] * n)
    overlapped = time.perf_counter() - t0
    assert got == [objects[b][:10]] * n
    assert overlapped < serial / 2, (overlapped, serial)
    # All of them were in the proxy at once (each waits in its own thread), none left behind.
    assert proxy.snapshot()["peak_in_flight"] >= n  # (a handler still closing the last sockets may add one)
    deadline = time.monotonic() + 5  # a handler closes its sockets just after the client has its answer
    while proxy.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.in_flight == 0
    proxy.reset_counts()
    assert proxy.snapshot()["peak_in_flight"] == 0


def test_bandwidth_cap_bounds_the_rate(s3_proxy, objects):
    a, _b = objects
    bw = 4 * 2**20  # 4 MiB/s: 1 MiB takes at least 0.25 s
    proxy = s3_proxy(bandwidth=bw)
    fs = _fs(proxy)
    t0 = time.perf_counter()
    # Two concurrent requests share the one link.
    got = fs.cat_ranges([a, a], [0, 0], [len(objects[a])] * 2)
    took = time.perf_counter() - t0
    assert got == [objects[a]] * 2
    assert took >= 2 * len(objects[a]) / bw * 0.95
    assert proxy.paced > 0
    # Lifting the cap stops the pacing; counted, not timed, so a loaded machine cannot fail it.
    proxy.bandwidth = None
    paced = proxy.paced
    assert fs.cat_file(a) == objects[a]
    assert proxy.paced == paced


def test_short_fault_is_a_well_formed_short_answer(s3_proxy, objects):
    """What the readers must detect: s3fs itself returns the short body without complaint."""
    a, _b = objects
    proxy = s3_proxy()
    fs = _fs(proxy)
    proxy.inject("short", 1)
    got = fs.cat_file(a, start=0, end=4000)
    assert got == objects[a][:2000]
    assert proxy.counts["short"] == 1
    assert fs.cat_file(a, start=0, end=4000) == objects[a][:4000]


def test_fast_reads_answer_as_moto(s3_server, objects):
    """The test server's fast read path sends what moto itself sends (status, headers, body)."""
    import boto3
    from _s3server import S3Server

    slow = S3Server(fast_reads=False)  # moto's state is process-wide: it sees the same objects
    info = slow.start()
    try:
        clients = [
            boto3.client(
                "s3",
                endpoint_url=e,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                region_name="us-east-1",
            )
            for e in (s3_server["endpoint_url"], info["endpoint_url"])
        ]
        a, b = objects
        bucket, key = a.split("/", 1)
        skip = {
            "access-control-allow-origin",
            "date",
            "server",
            "x-amzn-requestid",
            "x-amz-request-id",
            "x-amz-id-2",
            "connection",
        }
        for kw in (
            {},
            {"Range": "bytes=10-99"},
            {"Range": "bytes=1000-"},
            {"Range": "bytes=-5"},
            {"Range": "bytes=0-99999999"},
        ):
            fast, moto = (c.get_object(Bucket=bucket, Key=key, **kw) for c in clients)
            assert fast["Body"].read() == moto["Body"].read()
            hf, hm = (
                {k: v for k, v in r["ResponseMetadata"]["HTTPHeaders"].items() if k not in skip}
                for r in (fast, moto)
            )
            assert hf == hm, kw
            assert fast["ResponseMetadata"]["HTTPStatusCode"] == moto["ResponseMetadata"]["HTTPStatusCode"]
        hf, hm = (c.head_object(Bucket=bucket, Key=b.split("/", 1)[1]) for c in clients)
        assert hf["ContentLength"] == hm["ContentLength"] == 1000 and hf["ETag"] == hm["ETag"]
    finally:
        slow.stop()
