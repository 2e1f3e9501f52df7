"""``az://`` against Azurite and ``gs://`` against an XML-API server: write, read, map, faults.

Azure runs against Azurite, Microsoft's emulator (``tests/_azurite.py``),
with the connection string an adlfs user gives it.  GCS has no local
emulator that speaks the XML API obstore reads with (gcp-storage-emulator
answers 501 to its HEAD and listing requests), and that API is
S3-interoperable: the ``gs://`` tests read through obstore's GCS client from
the local S3 server (moto), in a bucket of its own, anonymously.  Writes to
``gs://`` need a Google token and are not tested here.
"""

from __future__ import annotations

import uuid

import dask
import numpy as np
import pytest

import dask_loom
from dask_loom.errors import StoreError
from dask_loom.hdf5._btree import PendingChunkIndex
from dask_loom.hdf5._files import clear_all
from dask_loom.storage._obstore import translate_options
from dask_loom.stores import CredentialsError
from tests.conftest import make_matrix

pytestmark = [pytest.mark.s3]


def _loompy_file(path, shape, *, seed: int = 0, chunks=(64, 64)) -> np.ndarray:
    import loompy

    m = make_matrix(shape, seed=seed)
    rows = {"Gene": np.array([f"g{i}" for i in range(shape[0])])}
    cols = {"CellID": np.array([f"c{i}" for i in range(shape[1])]), "group": np.arange(shape[1]) % 7}
    loompy.create(str(path), m, rows, cols, file_attrs={"title": "t"})
    return m


# -- options ---------------------------------------------------------------------------------------


def test_azure_connection_string_translates():
    key = "S3CR3T=="
    config, client = translate_options(
        "az", {"connection_string": f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={key};"
                                    "BlobEndpoint=http://127.0.0.1:10000/acct;QueueEndpoint=http://x"}
    )  # fmt: skip
    assert config == {"azure_storage_account_name": "acct", "azure_storage_account_key": key,
                      "azure_storage_endpoint": "http://127.0.0.1:10000/acct"}  # fmt: skip
    assert client == {"allow_http": True}
    assert translate_options("abfs", {"connection_string": "UseDevelopmentStorage=true"}) == (
        {"azure_use_emulator": True},
        {"allow_http": True},
    )
    sovereign = translate_options("az", {"connection_string": "AccountName=a;AccountKey=k;EndpointSuffix=core.chinacloudapi.cn"})
    assert sovereign[0]["azure_storage_endpoint"] == "https://a.blob.core.chinacloudapi.cn" and sovereign[1] == {}
    with pytest.raises(ValueError, match="connection_string': field 2 is not NAME=VALUE") as info:
        translate_options("az", {"connection_string": "AccountName=a;S3CR3TKEY"})
    assert "S3CR3TKEY" not in str(info.value)
    assert translate_options("gs", {"endpoint_url": "http://127.0.0.1:4443", "token": "anon"}) == (
        {"google_base_url": "http://127.0.0.1:4443", "google_skip_signature": True},
        {"allow_http": True},
    )


# -- Azure (Azurite) -------------------------------------------------------------------------------


def _az_url(azurite, name: str) -> str:
    return f"az://{azurite['container']}/{uuid.uuid4().hex[:10]}/{name}"


def _az_put(azurite, url: str, local) -> None:
    import obstore
    from obstore.store import AzureStore

    store = AzureStore(azurite["container"], config=azurite["store_config"], client_options={"allow_http": True})
    obstore.put(store, url.split("/", 3)[3], open(local, "rb").read())


@pytest.mark.xdist_group("azurite")
@pytest.mark.cluster
def test_loom_zarr_written_to_azure_and_read_back(tmp_path, azurite, local_cluster):
    m = _loompy_file(tmp_path / "a.loom", (1024, 2048), seed=1)
    url = _az_url(azurite, "a.loom.zarr")
    opts = azurite["storage_options"]
    with dask.config.set({"dask_loom.block-size": "1MiB", "dask_loom.coalesce-bytes": "16KiB"}):  # several shards
        dask_loom.convert(str(tmp_path / "a.loom"), url, dst_storage_options=opts)
    import zarr

    from dask_loom.stores import open_store

    # The layer is sharded Zarr v3 on the container, readable by zarr-python through our store.
    store = open_store(url, **opts)
    arr = zarr.open_array(store, path="matrix", mode="r")
    assert arr.shards is not None
    np.testing.assert_array_equal(arr[:], m)
    # The synchronous path's last bytes (Azure has no suffix ranges: the size first).
    doc = store._get("zarr.json")
    assert store._get("zarr.json", ("suffix", 17)) == doc[-17:] and store._get("zarr.json", (5, 9)) == doc[5:14]
    with dask_loom.connect(url, "r", storage_options=opts) as ds:
        np.testing.assert_array_equal(ds[:, :], m)
        np.testing.assert_array_equal(ds[17:933:5, [3, 2047, 7]], m[17:933:5][:, [3, 2047, 7]])
        mean, sd = ds.map([np.mean, np.std], axis=0, scheduler="threads")
        np.testing.assert_allclose(mean, m.mean(axis=1), rtol=1e-5)
        np.testing.assert_allclose(sd, m.std(axis=1), rtol=1e-4)
        cmax = ds.map([np.max], axis=1, client=local_cluster)[0]
        np.testing.assert_array_equal(cmax, m.max(axis=0))
        groups = ds.ca["group"]
        sums = ds.aggregate(None, group_by="group", aggr_by="sum", scheduler="threads")
        np.testing.assert_allclose(sums, np.stack([m[:, groups == g].sum(axis=1) for g in range(7)], axis=1), rtol=1e-5)
    # What a map asks Azure for: dask_loom writes each shard's index at its start, so the index and
    # the first pieces come in one bounded range, as on S3; every request is a ranged GET.
    import obstore
    from _azurite import connection_string
    from _faultproxy import FaultProxy
    from obstore.store import AzureStore

    blob = AzureStore(azurite["container"], config=azurite["store_config"], client_options={"allow_http": True})
    shards = list(obstore.list(blob, url.split("/", 3)[3] + "/matrix/c/").collect())
    host, _, account = azurite["endpoint"].rpartition("/")
    with (
        FaultProxy(host) as proxy,
        dask.config.set({"dask_loom.coalesce-bytes": "16KiB"}),
        dask_loom.connect(url, "r", storage_options={"connection_string": connection_string(f"{proxy.url}/{account}")}) as ds,
    ):
        proxy.reset_counts()
        np.testing.assert_allclose(ds.map([np.mean], axis=0, scheduler="threads")[0], m.mean(axis=1), rtol=1e-5)
        snap = proxy.snapshot()
    assert len(shards) >= 4
    assert snap["requests"].get("HEAD", 0) == 0, snap
    assert snap["requests"]["GET"] <= sum(-(-o["size"] // (16 << 10)) for o in shards), snap
    assert snap["bytes"]["GET"] >= sum(o["size"] for o in shards)

    # A store zarr-python wrote (index at the shard's end, its default): still read, with the
    # size of each shard asked first (Azure has no suffix ranges).
    zurl = _az_url(azurite, "zarr-python.zarr")
    zstore = open_store(zurl, **opts)
    z = zarr.create_array(zstore, name="x", shape=m.shape, chunks=(128, 256), shards=(512, 512), dtype=m.dtype)
    z[:] = m
    assert z.metadata.codecs[0].index_location.value == "end"
    with (
        FaultProxy(host) as proxy,
        dask.config.set({"dask_loom.coalesce-bytes": "16KiB"}),
    ):
        via = {"connection_string": connection_string(f"{proxy.url}/{account}")}
        arr = dask_loom.open_zarr(zurl, "x", mode="r", **via)
        proxy.reset_counts()
        np.testing.assert_allclose(dask_loom.map(arr, [np.mean], axis=0, scheduler="threads")[0], m.mean(axis=1), rtol=1e-5)
        snap = proxy.snapshot()
    assert snap["requests"].get("HEAD", 0) == (m.shape[0] // 512) * (m.shape[1] // 512), snap


@pytest.mark.xdist_group("azurite")
def test_loom_zarr_on_azure_opens_from_its_consolidated_metadata(tmp_path, azurite):
    """Azure lists no content digest; the ETags recorded when dask_loom consolidated are checked instead."""
    import json

    import obstore
    from _azurite import connection_string
    from _faultproxy import FaultProxy
    from obstore.store import AzureStore

    from dask_loom.errors import LoomValidationError

    m = _loompy_file(tmp_path / "c.loom", (300, 517), seed=3)
    url = _az_url(azurite, "c.loom.zarr")
    opts = azurite["storage_options"]
    dask_loom.convert(str(tmp_path / "c.loom"), url, dst_storage_options=opts, scheduler="sync")
    blob = AzureStore(azurite["container"], config=azurite["store_config"], client_options={"allow_http": True})
    root = url.split("/", 3)[3]
    host, _, account = azurite["endpoint"].rpartition("/")

    def opened(**kw):
        with FaultProxy(host) as proxy:
            via = {"connection_string": connection_string(f"{proxy.url}/{account}")}
            with dask_loom.connect(url, "r", storage_options=via, **kw) as ds:
                count = proxy.snapshot()["total_requests"]
                values = ds[:, :]
                gene = ds.ra["Gene"]
        return count, values, gene

    count, values, gene = opened()
    np.testing.assert_array_equal(values, m)
    assert count <= 3, count  # the root, one listing, a scalar attribute: not every node's document

    # Another tool rewrites a node's document (a new shape, same length): the root is stale now.
    key = f"{root}/row_attrs/Gene/zarr.json"
    raw = bytes(obstore.get(blob, key).bytes())
    assert json.loads(raw)["shape"] == [300]
    obstore.put(blob, key, raw.replace(b"[\n    300\n  ]", b"[\n    299\n  ]", 1))
    with pytest.raises(LoomValidationError, match="Gene"):  # the new document was read, not the stale copy
        opened()
    # Put back by hand: the same bytes, but a new version, so still not believed (read one by one).
    obstore.put(blob, key, raw)
    count, values, gene = opened()
    assert count > 10 and gene.tolist() == [f"g{i}" for i in range(300)]
    # A dask_loom write consolidates again, with the versions it lists then.
    with dask_loom.connect(url, "r+", storage_options=opts) as ds:
        ds.attrs["Again"] = "yes"
    count, values, _ = opened()
    assert count <= 4, count


@pytest.mark.xdist_group("azurite")
def test_hdf5_loom_on_azure_streams_its_index(tmp_path, azurite, local_cluster):
    m = _loompy_file(tmp_path / "h.loom", (1024, 3000), seed=2)
    url = _az_url(azurite, "h.loom")
    _az_put(azurite, url, tmp_path / "h.loom")
    opts = azurite["storage_options"]
    try:
        with dask_loom.connect(url, "r", storage_options=opts) as ds:
            assert ds.shape == m.shape and ds.attrs["title"] == "t"
            np.testing.assert_array_equal(ds[100:900:3, 2500:], m[100:900:3, 2500:])
            np.testing.assert_allclose(ds.map([np.mean], axis=0, scheduler="threads")[0], m.mean(axis=1), rtol=1e-5)
            # The chunk index came from the B-tree read over the store, its leaf pages streamed in.
            index = ds.__dask_loom_layer_host__().source("").chunk_index()
            assert isinstance(index, PendingChunkIndex) and index.complete
            np.testing.assert_allclose(ds.map([np.sum], axis=1, client=local_cluster)[0], m.sum(axis=0), rtol=1e-5)
    finally:
        clear_all()


@pytest.mark.xdist_group("azurite")
def test_azure_faults_are_retried_refused_or_missing(tmp_path, azurite):
    from _faultproxy import FaultProxy

    m = _loompy_file(tmp_path / "f.loom", (200, 300), seed=3)
    url = _az_url(azurite, "f.loom")
    _az_put(azurite, url, tmp_path / "f.loom")
    host, _, account = azurite["endpoint"].rpartition("/")
    with FaultProxy(host) as proxy, dask.config.set({"dask_loom.retries": 3, "dask_loom.retry-backoff": 0.01}):
        from _azurite import connection_string

        opts = {"connection_string": connection_string(f"{proxy.url}/{account}")}
        try:
            proxy.inject("503", 2)
            proxy.inject("short", 1)
            with dask_loom.connect(url, "r", storage_options=opts) as ds:
                np.testing.assert_array_equal(ds[:, :], m)
            assert proxy.pending == 0 and proxy.counts["503"] == 2 and proxy.counts["short"] == 1
        finally:
            clear_all()
        with pytest.raises(FileNotFoundError, match=r"az://.*/absent\.loom"):
            dask_loom.connect(url.replace("f.loom", "absent.loom"), "r", storage_options=opts)
    # A wrong account key: Azurite refuses the signature (403), not retried.
    wrong = {"connection_string": connection_string(azurite["endpoint"]).replace("AccountKey=Eby8", "AccountKey=Xby8")}
    try:
        with dask.config.set({"dask_loom.retries": 3, "dask_loom.retry-backoff": 0.01}):
            with pytest.raises(CredentialsError, match=r"f\.loom: access refused.*403"):
                dask_loom.connect(url, "r", storage_options=wrong)
    finally:
        clear_all()


# -- GCS (its XML API, served by the local S3 server) ----------------------------------------------

GCS_BUCKET = "daskloomgcs"  # no dashes: obstore's GCS client percent-encodes them, which moto's routing keeps


@pytest.fixture(scope="module")
def gcs(s3_server):
    import boto3

    boto3.client(
        "s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    ).create_bucket(Bucket=GCS_BUCKET)  # fmt: skip
    return {"storage_options": {"endpoint_url": s3_server["endpoint_url"], "token": "anon"}, "server": s3_server}


def _gcs_upload(gcs, local, name: str) -> str:
    import s3fs

    key = f"{GCS_BUCKET}/{uuid.uuid4().hex[:10]}/{name}"
    s3fs.S3FileSystem(**gcs["server"]["storage_options"], skip_instance_cache=True).put(str(local), key, recursive=True)
    return f"gs://{key}"


@pytest.mark.cluster
def test_loom_zarr_and_hdf5_loom_read_from_gcs(tmp_path, gcs, local_cluster):
    m = _loompy_file(tmp_path / "g.loom", (400, 900), seed=4)
    with dask.config.set({"dask_loom.coalesce-bytes": "16KiB"}):
        dask_loom.convert(str(tmp_path / "g.loom"), str(tmp_path / "g.loom.zarr"))
    opts = gcs["storage_options"]
    try:
        for name in ("g.loom.zarr", "g.loom"):
            url = _gcs_upload(gcs, tmp_path / name, name)
            with dask_loom.connect(url, "r", storage_options=opts) as ds:
                np.testing.assert_array_equal(ds[:, :], m)
                np.testing.assert_array_equal(ds[::7, 850:], m[::7, 850:])
                mean = ds.map([np.mean], axis=0, scheduler="threads")[0]
                np.testing.assert_allclose(mean, m.mean(axis=1), rtol=1e-5)
                np.testing.assert_array_equal(ds.map([np.max], axis=1, client=local_cluster)[0], m.max(axis=0))
    finally:
        clear_all()


def test_gcs_faults_are_retried_refused_or_missing(tmp_path, gcs):
    stats = gcs["server"]["stats"]
    m = _loompy_file(tmp_path / "f.loom", (120, 200), seed=5)
    url = _gcs_upload(gcs, tmp_path / "f.loom", "f.loom")
    opts = gcs["storage_options"]
    with dask.config.set({"dask_loom.retries": 3, "dask_loom.retry-backoff": 0.01}):
        try:
            stats.fail_next(2, status=503)
            with dask_loom.connect(url, "r", storage_options=opts) as ds:
                np.testing.assert_array_equal(ds[:, :], m)
            assert stats._take_failure() is None
            clear_all()
            stats.deny_next(1)
            with pytest.raises(CredentialsError, match=r"f\.loom: access refused.*403"):
                dask_loom.connect(url, "r", storage_options=opts)
        finally:
            stats.clear_failures()
            clear_all()
        with pytest.raises(FileNotFoundError, match=r"gs://.*/absent\.loom"):
            dask_loom.connect(url.replace("f.loom", "absent.loom"), "r", storage_options=opts)
        with dask.config.set({"dask_loom.retries": 0}):
            stats.fail_next(1, status=503)
            try:
                with pytest.raises(StoreError, match=r"f\.loom.*503"):
                    dask_loom.connect(url, "r", storage_options=opts)
            finally:
                stats.clear_failures()
                clear_all()
