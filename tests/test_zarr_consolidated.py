"""Consolidated metadata of ``.loom.zarr``: written by every dask_loom write, read on open when verified.

References: the documents on disk read one by one (``os.walk``), ``hashlib.md5``
of their bytes, zarr-python's reading with and without consolidated metadata,
loompy on the ``.loom`` the store was converted from, and a store opened on
the S3 server behind the counting proxy against the same store on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid
import warnings

import loompy
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import dask_loom
from dask_loom.errors import LoomFormatError, LoomValidationError


def _docs_on_disk(root: pathlib.Path) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        if "zarr.json" in files and pathlib.Path(d) != root:
            out[pathlib.Path(d).relative_to(root).as_posix()] = (pathlib.Path(d) / "zarr.json").read_bytes()
    return out


def _assert_consolidated_current(root: pathlib.Path) -> None:
    """The root's consolidated metadata holds exactly the documents on disk, with their MD5s."""
    cm = json.loads((root / "zarr.json").read_bytes())["consolidated_metadata"]
    docs = _docs_on_disk(root)
    assert set(cm["metadata"]) == set(docs)
    assert cm["dask_loom"]["digests"] == {p: hashlib.md5(raw).hexdigest() for p, raw in docs.items()}
    for p, raw in docs.items():
        doc = json.loads(raw)
        got = dict(cm["metadata"][p])
        if doc["node_type"] == "group":
            assert got.pop("consolidated_metadata") == {
                "kind": "inline",
                "must_understand": False,
                "metadata": {},
            }
        assert got == doc, p


def _zarr_python_view(root: pathlib.Path, *, consolidated: bool) -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = zarr.open_group(str(root), mode="r", use_consolidated=consolidated)
        out = {}
        for name, node in g.members(max_depth=None):
            out[name] = (
                ("array", node.shape, str(node.dtype), dict(node.attrs))
                if isinstance(node, zarr.Array)
                else ("group", dict(node.attrs))
            )
    return out


def _snapshot(ds) -> dict[str, object]:
    """Everything a connection tells about a file (metadata and values)."""
    return {
        "shape": ds.shape,
        "layers": {k: np.asarray(ds.layers[k][:, :]) for k in ds.layers.keys()},
        "ra": {k: np.asarray(ds.ra[k]) for k in ds.ra.keys()},
        "ca": {k: np.asarray(ds.ca[k]) for k in ds.ca.keys()},
        "attrs": {k: ds.attrs[k] for k in ds.attrs.keys()},
        "row_graphs": {k: ds.row_graphs[k].tocsr() for k in ds.row_graphs.keys()},
        "col_graphs": {k: ds.col_graphs[k].tocsr() for k in ds.col_graphs.keys()},
    }


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["shape"] == b["shape"]
    for part in ("layers", "ra", "ca"):
        assert list(a[part]) == list(b[part]), part  # names, in file order
        for k in a[part]:
            np.testing.assert_array_equal(a[part][k], b[part][k])
    assert a["attrs"] == b["attrs"]
    for part in ("row_graphs", "col_graphs"):
        assert list(a[part]) == list(b[part])
        for k in a[part]:
            assert (a[part][k] != b[part][k]).nnz == 0


@pytest.fixture
def loom_zarr(loompy_file, tmp_path):
    path, ref = loompy_file
    out = tmp_path / "c.loom.zarr"
    dask_loom.convert(path, out, scheduler="sync")
    return out, path, ref


# -- written by every write --------------------------------------------------------------------


def test_every_write_keeps_consolidated_metadata_current(loom_zarr):
    fn, _, ref = loom_zarr
    _assert_consolidated_current(fn)  # convert
    n, m = ref[""].shape
    steps = [
        lambda ds: ds.layers.__setitem__("twice", ds.layers[""].dask * 2),
        lambda ds: ds.layers.__setitem__("twice", ds.layers[""].dask * 3),  # replace
        lambda ds: ds.ra.__setitem__("Rank", np.arange(n)),
        lambda ds: ds.ca.__setitem__("CellID", np.array([f"c{i}" for i in range(m)], dtype=object)),
        lambda ds: ds.attrs.__setitem__("Note", "changed"),
        lambda ds: ds.ra.__delitem__("Score"),
        lambda ds: ds.col_graphs.__setitem__("G", sp.eye(m, format="coo")),
        lambda ds: ds.layers.__delitem__("spliced"),
        # to_zarr into the container (a layer written by hand) keeps it current too.
        lambda ds: dask_loom.to_zarr(np.ones((n, m), "f4"), str(fn), "layers/ext", scheduler="sync"),
        lambda ds: ds.permute(np.arange(m)[::-1], axis=1),
        lambda ds: ds.add_columns(
            {k: np.ones((n, 2), dtype=ds.layers[k].dtype) for k in ds.layers.keys()},
            {k: np.asarray(ds.ca[k])[:2] for k in ds.ca.keys()},
        ),
    ]
    for i, step in enumerate(steps):
        with dask_loom.connect(fn, "r+") as ds:
            step(ds)
        _assert_consolidated_current(fn)
        assert _zarr_python_view(fn, consolidated=True) == _zarr_python_view(fn, consolidated=False), i
    with dask_loom.connect(fn, "r") as ds:
        assert ds.shape == (n, m + 2)
        assert ds.attrs["Note"] == "changed"
        assert "Score" not in ds.ra.keys() and "spliced" not in ds.layers.keys()
        np.testing.assert_array_equal(ds.layers["twice"][:, :m], ref[""][:, ::-1] * 3)


def test_new_and_create_write_consolidated_metadata(tmp_path):
    fn = tmp_path / "n.loom.zarr"
    m = np.arange(12, dtype="f4").reshape(3, 4)
    dask_loom.create(
        str(fn), m, {"g": np.arange(3)}, {"c": np.arange(4)}, file_attrs={"t": "x"}, scheduler="sync"
    )
    _assert_consolidated_current(fn)
    ds = dask_loom.new(str(tmp_path / "e.loom.zarr"))
    ds.attrs["a"] = "b"
    ds.close()
    _assert_consolidated_current(tmp_path / "e.loom.zarr")


# -- read on open, on the S3 server behind the counting proxy ------------------------------


def _upload(s3_server, local: pathlib.Path) -> str:
    import s3fs

    key = f"{s3_server['bucket']}/{uuid.uuid4().hex}/{local.name}"
    s3fs.S3FileSystem(**s3_server["storage_options"], skip_instance_cache=True).put(
        str(local), key, recursive=True
    )
    return f"s3://{key}"


def _s3fs(s3_server):
    import s3fs

    return s3fs.S3FileSystem(**s3_server["storage_options"], skip_instance_cache=True)


@pytest.mark.s3
def test_open_remote_loom_zarr_in_three_requests(loom_zarr, s3_server, s3_proxy):
    fn, path, ref = loom_zarr
    with dask_loom.connect(fn, "r+") as ds:  # a layer and attributes added after convert
        ds.layers["twice"] = ds.layers[""].dask * 2
        ds.ra["Rank"] = np.arange(ds.shape[0])
        ds.attrs["Note"] = "n"
    url = _upload(s3_server, fn)
    proxy = s3_proxy(latency=0.0)
    with dask_loom.connect(url, "r", storage_options=proxy.storage_options) as ds:
        opened = proxy.snapshot()
        log = [(r.method, r.path.rpartition("/")[2], r.range) for r in proxy.log]
        remote = _snapshot(ds)
    # The root document, one listing that verifies it, the spec version's value: no HEAD.
    assert opened["total_requests"] <= 3, log
    assert opened["requests"].get("HEAD", 0) == 0, log
    with dask_loom.connect(fn, "r") as ds:
        local = _snapshot(ds)
    _assert_same(remote, local)
    # ... and the local store is what loompy wrote, plus the additions.
    np.testing.assert_array_equal(remote["layers"]["twice"], ref[""] * 2)
    with loompy.connect(str(path), "r") as lp:
        assert remote["ra"]["Gene"].tolist() == lp.ra.Gene.tolist()
        assert (remote["col_graphs"]["KNN"] != lp.col_graphs.KNN.tocsr()).nnz == 0


@pytest.mark.s3
def test_open_remote_without_consolidated_metadata(loom_zarr, s3_server, s3_proxy):
    fn, _, _ = loom_zarr
    with dask_loom.connect(fn, "r") as ds:
        local = _snapshot(ds)
    # As an older dask_loom (or zarr-python) wrote it: no consolidated metadata, or zarr-python's without digests.
    doc = json.loads((fn / "zarr.json").read_bytes())
    cm = doc.pop("consolidated_metadata")
    url = _upload(s3_server, fn)
    fs = _s3fs(s3_server)
    proxy = s3_proxy(latency=0.0)
    for root in (doc, {**doc, "consolidated_metadata": {k: v for k, v in cm.items() if k != "dask_loom"}}):
        fs.pipe_file(f"{url[5:]}/zarr.json", json.dumps(root).encode())
        proxy.reset_counts()
        with dask_loom.connect(url, "r", storage_options=proxy.storage_options) as ds:
            opened = proxy.snapshot()["total_requests"]
            _assert_same(_snapshot(ds), local)
        assert opened > 10  # every document read on its own


@pytest.mark.s3
def test_writes_by_another_tool_are_never_hidden_by_stale_consolidated_metadata(
    loom_zarr, s3_server, s3_proxy
):
    fn, _, ref = loom_zarr
    n, m = ref[""].shape
    url = _upload(s3_server, fn)
    fs = _s3fs(s3_server)
    proxy = s3_proxy(latency=0.0)
    root = url[len("s3://") :]

    def opened():
        proxy.reset_counts()
        with dask_loom.connect(url, "r", storage_options=proxy.storage_options) as ds:
            count = proxy.snapshot()["total_requests"]  # opening alone
            snap = _snapshot(ds)
        return snap, count

    snap, count = opened()
    assert count <= 3
    # zarr-python adds a layer and changes an attribute's metadata: it leaves the root as it was.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = zarr.storage.FsspecStore.from_url(
            url, storage_options=s3_server["storage_options"], read_only=False
        )
        g = zarr.open_group(store, mode="r+", use_consolidated=False)
        g["layers"].create_array("foreign", shape=(n, m), dtype="f4", chunks=(64, 64))[:] = np.full(
            (n, m), 7, "f4"
        )
        g["row_attrs/Score"].attrs["unit"] = "x"
    before = fs.cat_file(f"{root}/zarr.json")
    snap, count = opened()
    assert fs.cat_file(f"{root}/zarr.json") == before  # stale consolidated metadata in the root ...
    assert "foreign" in snap["layers"]  # ... not believed
    np.testing.assert_array_equal(snap["layers"]["foreign"], np.full((n, m), 7, "f4"))
    assert count > 10
    with dask_loom.connect(url, "r", storage_options=s3_server["storage_options"]) as ds:
        assert ds._tree.attrs("row_attrs/Score")["unit"] == "x"
    # A node removed by hand.
    fs.rm(f"{root}/layers/foreign", recursive=True)
    snap, _ = opened()
    assert "foreign" not in snap["layers"]
    # A document rewritten with the same length (a new shape, one digit changed).
    key = f"{root}/row_attrs/Gene/zarr.json"
    doc = json.loads(fs.cat_file(key))
    assert doc["shape"] == [n]
    fs.pipe_file(
        key, fs.cat_file(key).replace(f"[\n    {n}\n  ]".encode(), f"[\n    {n - 1}\n  ]".encode(), 1)
    )
    with pytest.raises(LoomValidationError, match="Gene"):  # the new shape, which no longer validates
        dask_loom.connect(url, "r", storage_options=s3_server["storage_options"])
    with dask_loom.connect(url, "r", validate=False, storage_options=s3_server["storage_options"]) as ds:
        assert ds._tree.info("row_attrs/Gene").shape == (n - 1,)
    # A dask_loom write brings the consolidated metadata up to date again.
    fs.pipe_file(key, json.dumps(doc, indent=2).encode())
    with dask_loom.connect(url, "r+", storage_options=s3_server["storage_options"]) as ds:
        ds.attrs["Again"] = "yes"
    snap, count = opened()
    # Believed again: the root is the one document read.  (A scalar attribute may be read twice
    # here: this process still holds arrays of the earlier connections' stores, which do not
    # take what the new opening requested early.)
    docs = [r.path for r in proxy.log if r.path.endswith("zarr.json")]
    assert count <= 4 and len(docs) == 1 and snap["attrs"]["Again"] == "yes", (count, docs)


@pytest.mark.s3
def test_remote_loom_zarr_written_on_s3_opens_in_few_requests(loompy_file, s3_server, s3_proxy):
    path, ref = loompy_file
    url = f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}/w.loom.zarr"
    opts = s3_server["storage_options"]
    dask_loom.convert(path, url, dst_storage_options=opts, scheduler="sync")
    with dask_loom.connect(url, "r+", storage_options=opts) as ds:
        ds.ca["Cloud"] = np.arange(ds.shape[1])
        ds.layers["twice"] = ds.layers[""].dask * 2
    proxy = s3_proxy(latency=0.0)
    with dask_loom.connect(url, "r", storage_options=proxy.storage_options) as ds:
        count = proxy.snapshot()["total_requests"]
        assert ds.ca["Cloud"].tolist() == list(range(ref[""].shape[1]))
        np.testing.assert_array_equal(ds.layers["twice"][:, :], ref[""] * 2)
        assert sorted(ds.layers.keys()) == ["", "spliced", "twice"]
    assert count <= 3


@pytest.mark.s3
def test_missing_remote_loom_zarr(s3_server):
    url = f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}/none.loom.zarr"
    with pytest.raises(FileNotFoundError):
        dask_loom.connect(url, "r", storage_options=s3_server["storage_options"])
    _s3fs(s3_server).pipe_file(f"{url[5:]}/other", b"x")
    with pytest.raises(LoomFormatError, match="not a Zarr group"):
        dask_loom.connect(url, "r", storage_options=s3_server["storage_options"])


def test_local_store_reads_every_document(loom_zarr):
    """On a local disk the documents are read (cheap, always current), whatever the root says."""
    fn, _, _ = loom_zarr
    doc = json.loads((fn / "zarr.json").read_bytes())
    doc["consolidated_metadata"]["metadata"]["layers/ghost"] = doc["consolidated_metadata"]["metadata"][
        "matrix"
    ]
    doc["consolidated_metadata"]["dask_loom"]["digests"]["layers/ghost"] = "0" * 32
    (fn / "zarr.json").write_text(json.dumps(doc))
    with dask_loom.connect(fn, "r") as ds:
        assert "ghost" not in ds.layers.keys()
    shutil.rmtree(fn / "layers" / "spliced")
    with dask_loom.connect(fn, "r") as ds:
        assert "spliced" not in ds.layers.keys()


def test_oversized_foreign_document_is_not_read_whole_and_drops_consolidation(loom_zarr):
    """A node document over dask_loom.max-metadata-bytes (written by another tool) is refused, not read whole."""
    import dask

    fn, _, ref = loom_zarr
    bad = fn / "row_attrs" / "Huge"
    bad.mkdir()
    (bad / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_type": "array", "pad": "' + b"x" * 300_000 + b'"}')
    with dask.config.set({"dask_loom.max-metadata-bytes": 100_000}):
        dask_loom.to_zarr(np.ones(ref[""].shape, "f4"), str(fn), "layers/ext", scheduler="sync")
    root = json.loads((fn / "zarr.json").read_bytes())
    assert "consolidated_metadata" not in root  # readers meet the foreign document where it is
    assert zarr.open_array(str(fn / "layers" / "ext"), mode="r")[:].sum() == ref[""].size


def _snapshot_and_upload(loom_zarr, s3_server) -> tuple[dict[str, object], str]:
    """What the local store tells (:func:`_snapshot`), and the URL of its copy on the S3 server."""
    fn, _, _ = loom_zarr
    with dask_loom.connect(fn, "r") as ds:
        local = _snapshot(ds)
    return local, _upload(s3_server, fn)


@pytest.mark.s3
def test_opening_requests_go_out_together_before_zarr_is_needed(loom_zarr, s3_server, s3_proxy):
    """The root, the spec version and the listing that checks the consolidated documents are in flight at once."""
    import time

    local, url = _snapshot_and_upload(loom_zarr, s3_server)
    proxy = s3_proxy(latency=0.2)
    arrived: list[tuple[float, str]] = []
    real_next = proxy._next

    def timed(head):
        fault, req = real_next(head)
        arrived.append((time.perf_counter(), req.path))
        return fault, req

    proxy._next = timed
    proxy.reset_counts()
    with dask_loom.connect(url, "r", storage_options=proxy.storage_options) as ds:
        opened = list(arrived)
        _assert_same(_snapshot(ds), local)
    assert len(opened) <= 3, opened  # the root, the listing, LOOM_SPEC_VERSION
    # Sent together: each waits 0.2 s at the proxy, so one after another they would be 0.2 s or more apart.
    assert opened[-1][0] - opened[0][0] < 0.15, opened
    assert any("list-type" in p for _, p in opened) and any(p.endswith("/zarr.json") for _, p in opened), opened


@pytest.mark.s3
def test_opening_requests_refused_early_are_asked_again_or_refused_by_name(loom_zarr, s3_server, monkeypatch):
    """The requests sent before zarr-python is imported fail quietly: the store asks again, with its own errors."""
    from dask_loom.storage import _obstore
    from dask_loom.storage._objectstore import CredentialsError

    local, url = _snapshot_and_upload(loom_zarr, s3_server)
    refused: list[str] = []

    async def refuse_get(store, path, req):
        refused.append(path)
        raise PermissionError(f"{path}: access denied")

    def refuse_list(store, prefix, *, limit=None):
        refused.append(f"list {prefix}")
        raise PermissionError(f"{prefix}: access denied")

    # Only the early reads look these up in the module; the store's own reads are not touched.
    with monkeypatch.context() as m:
        m.setattr(_obstore, "nget_async", refuse_get)
        m.setattr(_obstore, "nlist", refuse_list)
        with dask_loom.connect(url, "r", storage_options=s3_server["storage_options"]) as ds:
            _assert_same(_snapshot(ds), local)
    assert len(refused) == 3, refused  # the root, LOOM_SPEC_VERSION and the listing, all asked again
    stats = s3_server["stats"]
    try:
        stats.deny_next(100)
        with pytest.raises(CredentialsError, match=r"access to 'zarr\.json' refused") as info:
            dask_loom.connect(url, "r", storage_options=s3_server["storage_options"])
    finally:
        stats.clear_failures()
    assert url.split("/")[-2] in str(info.value)
