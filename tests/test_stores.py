"""Stores: zarr-python's conformance suite for every class, plus simplezarr's sync contract."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import time
import uuid
from collections.abc import Iterator

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype
from zarr.testing.store import StoreTests

from dask_loom.errors import MissingKeyError, ReadOnlyError, StoreError
from dask_loom.stores import (
    CredentialsError,
    KeyList,
    ListableStore,
    LocalStore,
    MemoryStore,
    ObjectStore,
    ReadableStore,
    SlowStore,
    WrapperStore,
    WritableStore,
    check_key,
    check_prefix,
    open_store,
)

# --------------------------------------------------------------------------------------
# zarr-python's StoreTests, once per class
# --------------------------------------------------------------------------------------


class TestMemoryStore(StoreTests[MemoryStore, cpu.Buffer]):
    store_cls = MemoryStore
    buffer_cls = cpu.Buffer

    async def set(self, store: MemoryStore, key: str, value: Buffer) -> None:
        store.dict[key] = value.to_bytes()

    async def get(self, store: MemoryStore, key: str) -> Buffer:
        return self.buffer_cls.from_bytes(store.dict[key])

    @pytest.fixture
    def store_kwargs(self) -> dict:
        return {}

    def test_store_repr(self, store: MemoryStore) -> None:
        assert repr(store).startswith("MemoryStore(")

    def test_store_supports_writes(self, store: MemoryStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: MemoryStore) -> None:
        assert store.supports_listing


class TestLocalStore(StoreTests[LocalStore, cpu.Buffer]):
    store_cls = LocalStore
    buffer_cls = cpu.Buffer

    async def set(self, store: LocalStore, key: str, value: Buffer) -> None:
        p = store.path / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(value.to_bytes())

    async def get(self, store: LocalStore, key: str) -> Buffer:
        return self.buffer_cls.from_bytes((store.path / key).read_bytes())

    @pytest.fixture
    def store_kwargs(self, tmp_path) -> dict:
        return {"path": str(tmp_path / "store")}

    def test_store_repr(self, store: LocalStore) -> None:
        assert repr(store) == f"LocalStore({str(store.path)!r})"

    def test_store_supports_writes(self, store: LocalStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: LocalStore) -> None:
        assert store.supports_listing


class TestWrapperStore(StoreTests[WrapperStore, cpu.Buffer]):
    store_cls = WrapperStore
    buffer_cls = cpu.Buffer

    async def set(self, store: WrapperStore, key: str, value: Buffer) -> None:
        store.sub.dict[key] = value.to_bytes()

    async def get(self, store: WrapperStore, key: str) -> Buffer:
        return self.buffer_cls.from_bytes(store.sub.dict[key])

    @pytest.fixture
    def store_kwargs(self) -> dict:
        return {"store": MemoryStore()}

    def test_store_repr(self, store: WrapperStore) -> None:
        assert repr(store).startswith("WrapperStore(MemoryStore(")

    def test_store_supports_writes(self, store: WrapperStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: WrapperStore) -> None:
        assert store.supports_listing


class TestSlowStore(TestWrapperStore):
    store_cls = SlowStore  # type: ignore[assignment]

    @pytest.fixture
    def store_kwargs(self) -> dict:
        return {"store": MemoryStore(), "base_delay": 0.0005, "bits_per_second": 1e9}

    def test_store_repr(self, store: SlowStore) -> None:
        assert repr(store).startswith("SlowStore(MemoryStore(")


class TestObjectStoreMemory(StoreTests[ObjectStore, cpu.Buffer]):
    """ObjectStore over fsspec's in-memory filesystem (no async implementation: thread path)."""

    store_cls = ObjectStore
    buffer_cls = cpu.Buffer

    def _fs(self, store: ObjectStore):
        import fsspec

        return fsspec.filesystem("memory")

    async def set(self, store: ObjectStore, key: str, value: Buffer) -> None:
        self._fs(store).pipe_file(f"{store.url}/{key}", value.to_bytes())

    async def get(self, store: ObjectStore, key: str) -> Buffer:
        return self.buffer_cls.from_bytes(self._fs(store).cat_file(f"{store.url}/{key}"))

    @pytest.fixture
    def store_kwargs(self) -> dict:
        return {"url": f"memory://storetests-{uuid.uuid4().hex}"}

    def test_store_repr(self, store: ObjectStore) -> None:
        assert repr(store) == f"ObjectStore({store.url!r})"

    def test_store_supports_writes(self, store: ObjectStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: ObjectStore) -> None:
        assert store.supports_listing


@pytest.mark.s3
class TestObjectStoreS3(TestObjectStoreMemory):
    """ObjectStore over s3fs against the local moto server (real HTTP, async path)."""

    @pytest.fixture(autouse=True)
    def _server(self, s3_server):
        self.server = s3_server

    def _fs(self, store: ObjectStore):
        import s3fs

        return s3fs.S3FileSystem(**self.server["storage_options"])

    async def set(self, store: ObjectStore, key: str, value: Buffer) -> None:
        await asyncio.to_thread(self._fs(store).pipe_file, f"{store.url}/{key}", value.to_bytes())

    async def get(self, store: ObjectStore, key: str) -> Buffer:
        data = await asyncio.to_thread(self._fs(store).cat_file, f"{store.url}/{key}")
        return self.buffer_cls.from_bytes(data)

    @pytest.fixture
    def store_kwargs(self, s3_server) -> dict:
        return {
            "url": f"s3://{s3_server['bucket']}/storetests-{uuid.uuid4().hex}",
            "storage_options": s3_server["storage_options"],
        }


# --------------------------------------------------------------------------------------
# simplezarr's synchronous contract (its tests/test_stores.py, re-stated)
# --------------------------------------------------------------------------------------

STORE = {
    "foo": b"foo-value",
    "bar": b"bar-value",
    "dir1/foo": b"dir1-foo",
    "dir1/bar": b"dir1-bar",
    "dir2/index": b"dir2-index",
    "dir2/sub/foo": b"sub-foo",
    "dir2/sub/bar": b"sub-bar",
}


def _local(tmp_path):
    s = LocalStore(tmp_path / "local")
    for k, v in STORE.items():
        s.set(k, v)
    return s


STORE_MAKERS = {
    "memory": lambda tmp: MemoryStore(STORE),
    "local": _local,
    "wrapper": lambda tmp: WrapperStore(MemoryStore(STORE)),
    "slow": lambda tmp: SlowStore(MemoryStore(STORE), 0.001, 10_000),
    "object": lambda tmp: _object_filled(),
}


def _object_filled():
    s = ObjectStore(f"memory://sync-{uuid.uuid4().hex}")
    for k, v in STORE.items():
        s.set(k, v)
    return s


@pytest.fixture(params=sorted(STORE_MAKERS))
def filled(request, tmp_path):
    return STORE_MAKERS[request.param](tmp_path)


def test_mixins(filled):
    assert isinstance(filled, ReadableStore)
    assert isinstance(filled, WritableStore)
    assert isinstance(filled, ListableStore)
    assert isinstance(filled, zarr.abc.store.Store)


def test_read(filled):
    for k, v in STORE.items():
        assert filled.get(k) == v
    with pytest.raises(IOError, match="no key 'spam'"):
        filled.get("spam")
    with pytest.raises(MissingKeyError):
        filled.get("dir1")  # a directory is not a key
    with pytest.raises(TypeError):
        filled.get(3)
    for bad in ("", "/foo", "foo/", "a/../b", "./foo"):
        with pytest.raises(ValueError):
            filled.get(bad)
    assert filled.get_partial_values([("foo", 0, 3), ("dir2/sub/foo", 4, None), ("bar", 1, 2)]) == [
        b"foo",
        b"foo",
        b"ar",
    ]
    with pytest.raises(IOError):
        filled.get_partial_values([("nope", 0, 1)])
    with pytest.raises(TypeError):
        filled.get_partial_values([("foo", 0)])


def test_list(filled):
    assert filled.list() == sorted(STORE)
    for listing in (filled.list(), filled.list_prefix("dir2/"), filled.list_dir("/")):
        assert type(listing) is list  # outside an event loop: simplezarr's plain list
    assert filled.list_prefix("dir2/") == ["dir2/index", "dir2/sub/bar", "dir2/sub/foo"]
    assert filled.list_dir("/") == ["bar", "dir1/", "dir2/", "foo"]
    assert filled.list_dir("dir2/") == ["dir2/index", "dir2/sub/"]
    assert filled.list_dir("dir3/") == []
    assert filled.list_prefix("/") == sorted(STORE)


def test_write(filled):
    filled.set("new/key", b"abc")
    assert filled.get("new/key") == b"abc"
    filled.set("new/key", memoryview(b"xyz"))
    assert filled.get("new/key") == b"xyz"
    with pytest.raises(TypeError):
        filled.set("new/key", np.arange(3))
    if not isinstance(filled, ObjectStore):
        # Object stores (S3 …) hold "foo" and "foo/sub" side by side; the others refuse.
        with pytest.raises(IOError):
            filled.set("foo/sub", b"x")  # "foo" is a key, not a directory
        with pytest.raises(IOError):
            filled.set("dir1", b"x")  # "dir1/" is a directory
    filled.set_partial_values([("new/key", 1, b"YZW")])
    assert filled.get("new/key") == b"xYZW"
    with pytest.raises(IOError):
        filled.set_partial_values([("nope", 0, b"x")])
    filled.erase("new/key")
    with pytest.raises(IOError):
        filled.erase("new/key")
    assert "new/" not in filled.list_dir("/")
    filled.erase_values(["foo", "bar"])
    assert filled.list_dir("/") == ["dir1/", "dir2/"]
    filled.erase_prefix("dir2/sub/")
    assert filled.list_dir("dir2/") == ["dir2/index"]
    filled.erase_prefix("nothing/")  # no-op
    filled.erase_prefix("/")
    assert filled.list() == []


def test_zarr_semantics_of_the_same_names(filled):
    """The async zarr calls on the very same object: None for missing, relative list_dir."""
    from zarr.core.sync import sync

    proto = default_buffer_prototype()
    assert sync(filled.get("spam", prototype=proto)) is None
    assert sync(filled.get("foo", proto)).to_bytes() == b"foo-value"

    async def as_zarr_lists():  # zarr calls the listings inside its event loop
        return (
            [k async for k in filled.list_dir("dir2")],
            [k async for k in filled.list_dir("dir2/")],
            [k async for k in filled.list_prefix("dir2/")],
        )

    d, d_slash, p = sync(as_zarr_lists())
    assert sorted(d) == sorted(d_slash) == ["index", "sub"]
    assert sorted(p) == ["dir2/index", "dir2/sub/bar", "dir2/sub/foo"]
    sync(filled.delete("spam"))  # no error


def test_read_only_refuses_writes(tmp_path):
    ro = LocalStore(tmp_path, read_only=True)
    with pytest.raises(ReadOnlyError):
        ro.set("a", b"x")
    with pytest.raises(ReadOnlyError):
        ro.erase_prefix("/")


# --------------------------------------------------------------------------------------
# A store written against the base classes as simplezarr documents it
# --------------------------------------------------------------------------------------


class _DictStore(ReadableStore, WritableStore, ListableStore):
    """simplezarr's recipe: override get/set/erase/list, no base ``__init__`` call."""

    def __init__(self, data=None):
        self.data = dict(data or {})
        self.calls = []

    def get(self, key):
        check_key(self, "get", key)
        self.calls.append(("get", key))
        try:
            return self.data[key]
        except KeyError:
            raise OSError(f"get(): key {key!r} does not exist.") from None

    def set(self, key, value):
        check_key(self, "set", key)
        self.calls.append(("set", key))
        self.data[key] = bytes(value)

    def erase(self, key):
        check_key(self, "erase", key)
        self.calls.append(("erase", key))
        try:
            del self.data[key]
        except KeyError:
            raise OSError(f"erase(): key {key!r} does not exist.") from None

    def list(self):
        self.calls.append(("list",))
        return sorted(self.data)


def test_custom_store_inherits_the_defaults_built_on_its_methods():
    s = _DictStore(STORE)
    assert s.read_only is False
    # Partial reads through get(), then a slice (expected values: Python slicing of STORE).
    assert s.get_partial_values([("foo", 4, 5), ("dir2/sub/foo", 4, None)]) == [STORE["foo"][4:9], STORE["dir2/sub/foo"][4:]]
    assert ("get", "foo") in s.calls and ("get", "dir2/sub/foo") in s.calls
    with pytest.raises(IOError):
        s.get_partial_values([("nope", 0, 1)])
    # Listings through list().
    assert s.list_prefix("dir2/") == sorted(k for k in STORE if k.startswith("dir2/"))
    assert s.list_dir("/") == ["bar", "dir1/", "dir2/", "foo"]
    assert s.list_dir("dir2/") == ["dir2/index", "dir2/sub/"]
    # Partial writes through get() and set(); erases through erase().
    s.calls.clear()
    s.set_partial_values([("foo", 1, b"XY")])
    assert s.data["foo"] == STORE["foo"][:1] + b"XY" + STORE["foo"][3:]
    assert s.calls == [("get", "foo"), ("set", "foo")]
    s.erase_values(["bar"])
    s.erase_prefix("dir2/")
    assert sorted(s.data) == ["dir1/bar", "dir1/foo", "foo"]
    assert ("erase", "dir2/sub/foo") in s.calls
    with pytest.raises(IOError):
        s.erase_values(["nope"])
    s.erase_prefix("/")
    assert s.data == {}


def test_custom_store_works_with_zarr_and_open_zarr():
    import dask_loom

    s = _DictStore()
    ref = np.arange(35, dtype="i4").reshape(5, 7)
    z = zarr.create_array(s, name="g/x", shape=ref.shape, chunks=(2, 3), dtype="i4", fill_value=-1)
    z[:] = ref
    assert ("set", "g/x/c/0/0") in s.calls  # zarr's writes reached the store's own set()
    np.testing.assert_array_equal(zarr.open_array(s, path="g/x", mode="r")[:], ref)
    root = dask_loom.open_zarr(s)
    assert root.keys() == ["g"]
    a = root["g/x"]
    np.testing.assert_array_equal(a.to_dask().compute(scheduler="sync"), ref)
    np.testing.assert_array_equal(a.get_chunk((2, 2)), [[34, -1, -1], [-1, -1, -1]])


def test_custom_store_super_calls_fall_back_to_the_defaults():
    class Hidden(_DictStore):
        def list_dir(self, prefix):
            return [e for e in super().list_dir(prefix) if not e.rstrip("/").rpartition("/")[2].startswith(".")]

        def get(self, key):
            return super().get(key).upper()

    s = Hidden({"a/.tmp/x": b"t", "a/b": b"b", "a/c/d": b"d"})
    assert s.list_dir("a/") == ["a/b", "a/c/"]
    assert s.get_partial_values([("a/b", 0, None)]) == [b"B"]  # built on the subclass's get()

    class Partial(ReadableStore):
        def get(self, key):
            return super().get(key)  # simplezarr's base get() has nothing to fall back to

    with pytest.raises(TypeError, match="not readable"):
        Partial().get("a")


def test_check_key_and_check_prefix_as_simplezarr_calls_them():
    for key in ["foo", "x.y", "foo/bar/spam/eggs.xyz"]:
        assert check_key(None, "test", key) == key
    for key in [b"foo", ("foo",), 42]:
        with pytest.raises(TypeError):
            check_key(None, "test", key)
    for key in ["", "/", "/foo", "foo/", ".", "..", "foo/./bar", "foo//bar"]:
        with pytest.raises(ValueError, match=r"NoneType\.test\(\)"):
            check_key(None, "test", key)
    for prefix in ["/", "foo/", "x.y/", "foo/bar/"]:
        assert check_prefix(None, "test", prefix) == prefix
    for prefix in ["", "foo", "foo/bar", "/foo", "/foo/", "./", "../", "foo/./bar/", "foo//bar/"]:
        with pytest.raises(ValueError):
            check_prefix(None, "test", prefix)
    with pytest.raises(TypeError):
        check_prefix(None, "test", b"foo/")


# --------------------------------------------------------------------------------------
# Prefixes name directories (they end with '/'); zarr's async calls keep zarr's semantics
# --------------------------------------------------------------------------------------

_PREFIX_KEYS = {"dir1/foo": b"1", "dir1/sub/x": b"2", "dir10/bar": b"3", "dir1x": b"4", "other": b"5"}


@pytest.mark.parametrize("kind", ["memory", "local", "wrapper", "object"])
def test_prefix_without_slash_is_refused_by_the_sync_api(tmp_path, kind):
    s = {
        "memory": lambda: MemoryStore(),
        "local": lambda: LocalStore(tmp_path / "s"),
        "wrapper": lambda: WrapperStore(MemoryStore()),
        "object": lambda: ObjectStore(f"memory://prefix-{uuid.uuid4().hex}"),
    }[kind]()
    for k, v in _PREFIX_KEYS.items():
        s.set(k, v)
    for method in (s.list_prefix, s.list_dir, s.erase_prefix):
        with pytest.raises(ValueError, match="must end with '/'"):
            method("dir1")
        with pytest.raises(ValueError):
            method("")
    assert s.list() == sorted(_PREFIX_KEYS)  # the refused erase removed nothing
    assert s.list_prefix("dir1/") == ["dir1/foo", "dir1/sub/x"]
    assert s.list_dir("dir1/") == ["dir1/foo", "dir1/sub/"]
    s.erase_prefix("dir1/")
    assert s.list() == ["dir10/bar", "dir1x", "other"]


def test_zarr_async_listings_match_zarr_pythons_own_store():
    from zarr.core.sync import sync

    ours, theirs = MemoryStore(), zarr.storage.MemoryStore()
    for k, v in _PREFIX_KEYS.items():
        ours.set(k, v)
        sync(theirs.set(k, cpu.Buffer.from_bytes(v)))

    async def lists(store):
        return {
            (name, p): sorted([k async for k in getattr(store, name)(p)])
            for name in ("list_prefix", "list_dir")
            for p in ("", "dir1", "dir1/", "dir1/sub", "nothing")
        } | {("list", ""): sorted([k async for k in store.list()])}

    assert sync(lists(ours)) == sync(lists(theirs))


def test_listings_inside_a_running_loop_stay_usable_synchronously():
    """A notebook cell runs inside an event loop: the simplezarr calls still work there."""
    s = MemoryStore(_PREFIX_KEYS)

    async def cell():
        assert isinstance(s.list_dir("dir1/"), KeyList)
        assert s.list_dir("dir1/") == ["dir1/foo", "dir1/sub/"]
        assert list(s.list()) == sorted(_PREFIX_KEYS)
        with pytest.raises(ValueError, match="must end with '/'"):
            list(s.list_prefix("dir1"))  # checked when used
        with pytest.raises(ValueError, match="must end with '/'"):
            s.erase_prefix("dir1")

    asyncio.run(cell())


# --------------------------------------------------------------------------------------
# LocalStore safety: no escapes, no partial values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "/etc/passwd", "a\x00b", "..", "a/./b"])
def test_local_store_refuses_escaping_keys(tmp_path, key):
    s = LocalStore(tmp_path / "root")
    with pytest.raises(ValueError, match="key"):
        s.set(key, b"x")
    with pytest.raises(ValueError):
        s.get(key)
    assert not (tmp_path / "escape").exists()


def test_local_store_zarr_path_also_refuses_escapes(tmp_path):
    from zarr.core.sync import sync

    s = LocalStore(tmp_path / "root")
    with pytest.raises(ValueError):
        sync(s.set("../escape", cpu.Buffer.from_bytes(b"x")))
    assert not (tmp_path / "escape").exists()


def test_local_store_failed_write_leaves_nothing(tmp_path, monkeypatch):
    s = LocalStore(tmp_path / "root")
    s.set("a/b", b"old")

    real_replace = os.replace

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StoreError, match="'a/b'"):
        s.set("a/b", b"new value that must not appear")
    monkeypatch.setattr(os, "replace", real_replace)
    assert s.get("a/b") == b"old"
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["b"]  # no temp file left


# --------------------------------------------------------------------------------------
# pickling, zarr / dask / xarray interop, SlowStore concurrency
# --------------------------------------------------------------------------------------


def test_stores_pickle_as_specs(tmp_path):
    local = LocalStore(tmp_path)
    local.set("k", b"v")
    for s in (local, SlowStore(local, 0.01, 0), WrapperStore(local), ObjectStore("memory://pickled")):
        t = pickle.loads(pickle.dumps(s))
        assert t == s
        assert type(t) is type(s)
    assert pickle.loads(pickle.dumps(SlowStore(local, 0.01, 0))).get("k") == b"v"
    obj = ObjectStore("s3://b/x.zarr", storage_options={"secret": "hunter2"})
    assert "hunter2" not in repr(obj)
    assert dask.base.tokenize(local) == dask.base.tokenize(LocalStore(tmp_path))


class _SlowStoreTestable(SlowStore):
    """simplezarr's test pattern: a zero-argument subclass pre-filled with data."""

    def __init__(self):
        super().__init__(MemoryStore(STORE), 0.05, 0)
        self.label = "mine"


def _timed_get(store, key):
    t0 = time.perf_counter()
    value = store.get(key)
    return value, time.perf_counter() - t0, type(store).__name__


def test_pickled_slow_store_keeps_its_delay():
    import concurrent.futures
    import multiprocessing

    import cloudpickle

    for s in (SlowStore(MemoryStore(STORE), base_delay=0.05), _SlowStoreTestable()):
        copies = [pickle.loads(pickle.dumps(s, protocol=p)) for p in range(2, pickle.HIGHEST_PROTOCOL + 1)]
        copies.append(cloudpickle.loads(cloudpickle.dumps(s)))
        for t in copies:
            assert type(t) is type(s)
            assert (t.base_delay, t.bits_per_second) == (0.05, 0.0)
            value, took, _ = _timed_get(t, "foo")
            assert value == STORE["foo"]
            assert took >= 0.045
        assert copies[0].__dict__.get("label") == s.__dict__.get("label")
        # Shipped to another process (as to a dask worker), it still delays there.
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            value, took, name = pool.submit(_timed_get, s, "dir1/foo").result()
        assert (value, name) == (STORE["dir1/foo"], type(s).__name__)
        assert took >= 0.045


@pytest.mark.parametrize("kind", ["memory", "local", "slow"])
def test_zarr_dask_xarray_interop(tmp_path, kind):
    import xarray as xr

    store = {
        "memory": MemoryStore(),
        "local": LocalStore(tmp_path / "x.zarr"),
        "slow": SlowStore(MemoryStore(), 0.001),
    }[kind]
    ref = np.arange(120, dtype="f8").reshape(10, 12)
    z = zarr.create_array(store, name="a", shape=ref.shape, chunks=(4, 5), dtype="f8", dimension_names=("y", "x"))
    z[:] = ref
    assert store.list_dir("a/") == ["a/c/", "a/zarr.json"]
    x = da.from_zarr(store, component="a")
    np.testing.assert_array_equal(x.compute(scheduler="threads"), ref)
    zarr.create_group(store, path="g", attributes={"k": 1})
    g = xr.open_zarr(store, group="g", consolidated=False)
    assert g.attrs == {"k": 1}


def test_xarray_roundtrip(tmp_path):
    import xarray as xr

    store = LocalStore(tmp_path / "ds.zarr")
    ref = xr.Dataset({"v": (("t", "x"), np.arange(24.0).reshape(4, 6))}, attrs={"title": "t"})
    ref.to_zarr(store, consolidated=False, zarr_format=3)
    back = xr.open_zarr(store, consolidated=False)
    xr.testing.assert_equal(back.load(), ref)


class _CountingSlow(SlowStore):
    active = 0
    peak = 0

    async def _aget(self, key, req=None):
        type(self).active += 1
        type(self).peak = max(type(self).peak, type(self).active)
        try:
            return await super()._aget(key, req)
        finally:
            type(self).active -= 1


def test_slow_store_delays_overlap_on_zarrs_event_loop():
    inner = MemoryStore()
    z = zarr.create_array(inner, name="a", shape=(64,), chunks=(4,), dtype="i4")
    z[:] = np.arange(64)
    slow = _CountingSlow(inner, base_delay=0.02)
    out = zarr.open_array(slow, path="a", mode="r")[:]
    np.testing.assert_array_equal(out, np.arange(64))
    # zarr fetched chunks concurrently: the delays overlapped instead of queueing.
    assert _CountingSlow.peak > 1


def test_open_store_resolves(tmp_path):
    assert open_store(tmp_path / "a") == LocalStore(tmp_path / "a")
    assert open_store(f"file://{tmp_path}/a") == LocalStore(tmp_path / "a")
    s = open_store("memory://resolve-test")
    assert isinstance(s, ObjectStore)
    assert open_store(s) is s
    assert open_store(s, read_only=True).read_only
    with pytest.raises(ValueError, match="scheme 'ftp' is not allowed"):
        open_store("ftp://host/x.zarr")


# --------------------------------------------------------------------------------------
# object store over real HTTP: retries, refused credentials, unreachable endpoint
# --------------------------------------------------------------------------------------


@pytest.mark.s3
def test_object_store_retries_transient_errors(s3_server):
    stats = s3_server["stats"]
    s = open_store(f"s3://{s3_server['bucket']}/retry-{uuid.uuid4().hex}", **s3_server["storage_options"])
    s.set("k", b"value")
    with dask.config.set({"dask_loom.retries": 3, "dask_loom.retry-backoff": 0.01}):
        stats.fail_next(2, status=503)
        assert s.get("k") == b"value"
        stats.fail_next(100, status=503)
        try:
            # A whole-object read is one GET (no HEAD first): the 503's body (SlowDown) is the message.
            with pytest.raises(
                StoreError, match=r"get 'k' failed after 4 attempts.*(Service Unavailable|reduce your request rate)"
            ):
                s.get("k")
        finally:
            stats.clear_failures()


@pytest.mark.s3
def test_object_store_credentials_refused(s3_server):
    s = open_store(f"s3://{s3_server['bucket']}/deny-{uuid.uuid4().hex}", **s3_server["storage_options"])
    s.set("k", b"v")
    s3_server["stats"].deny_next(1)
    with pytest.raises(CredentialsError, match=r"access to 'k' refused"):
        s.get("k")
    assert s.get("k") == b"v"


@pytest.mark.s3
def test_object_store_unreachable_endpoint(s3_server):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opts = {**s3_server["storage_options"], "endpoint_url": f"http://127.0.0.1:{port}"}
    s = open_store(f"s3://{s3_server['bucket']}/x.zarr", **opts)
    with dask.config.set({"dask_loom.retries": 1, "dask_loom.retry-backoff": 0.01}):
        with pytest.raises(StoreError, match=r"s3://dask-loom-test/x.zarr: get 'k' failed after 2 attempts.*connect"):
            s.get("k")


@pytest.mark.s3
def test_object_store_zarr_and_dask_on_s3(s3_server, local_cluster):
    s = open_store(f"s3://{s3_server['bucket']}/arr-{uuid.uuid4().hex}.zarr", **s3_server["storage_options"])
    ref = np.arange(300, dtype="i8").reshape(15, 20)
    z = zarr.create_array(s, name="a", shape=ref.shape, chunks=(4, 6), dtype="i8")
    z[:] = ref
    x = da.from_zarr(s, component="a")
    assert int(local_cluster.compute(x.sum()).result()) == int(ref.sum())


@pytest.mark.s3
def test_object_store_async_reads_retry_then_fail_clearly(s3_server):
    import dask_loom

    stats = s3_server["stats"]
    s = open_store(f"s3://{s3_server['bucket']}/aretry-{uuid.uuid4().hex}.zarr", **s3_server["storage_options"])
    ref = np.arange(64, dtype="i4")
    zarr.create_array(s, name="a", shape=(64,), chunks=(8,), dtype="i4")[:] = ref
    a = dask_loom.open_zarr(s, "a")
    with dask.config.set({"dask_loom.retries": 4, "dask_loom.retry-backoff": 0.01}):
        stats.fail_next(3, status=503)  # transient: the chunk requests on zarr's event loop retry
        np.testing.assert_array_equal(a.to_dask().compute(scheduler="sync"), ref)
        stats.fail_next(1000, status=503)
        try:
            with pytest.raises(StoreError, match=r"a/c/\d+' failed after 5 attempts"):
                a.to_dask().compute(scheduler="sync")
        finally:
            stats.clear_failures()


@contextlib.contextmanager
def _static_http(directory) -> Iterator[str]:
    """python's ``http.server`` serving *directory* on 127.0.0.1 (it ignores Range headers); yields its URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_object_store_reads_a_zarr_array(tmp_path):
    """An ``http://`` URL (a static file server on 127.0.0.1): read-only, values equal."""
    import dask_loom

    ref = np.arange(60, dtype="i2").reshape(6, 10)
    zarr.create_array(str(tmp_path / "web.zarr"), shape=ref.shape, chunks=(4, 4), dtype="i2")[:] = ref
    with _static_http(tmp_path) as base:
        url = f"{base}/web.zarr"
        s = open_store(url)
        assert s.read_only
        assert not s.supports_listing
        with pytest.raises(ReadOnlyError):
            s.set("x", b"1")
        with pytest.raises(MissingKeyError, match="no key 'nope'"):
            s.get("nope")
        a = dask_loom.open_zarr(url)
        np.testing.assert_array_equal(a.to_dask().compute(scheduler="threads"), ref)
        np.testing.assert_array_equal(a.get_chunk((1, 2)), np.pad(ref[4:, 8:], ((0, 2), (0, 2))))


@pytest.mark.parametrize("writer", ["zarr-python", "dask_loom"])  # shard index at the end / at the start
def test_http_server_ignoring_ranges_serves_sharded_arrays(tmp_path, writer):
    """python's http.server answers every ranged GET with the whole file: shard indexes and chunks still read."""
    import dask_loom

    ref = np.arange(128 * 96, dtype="f4").reshape(128, 96)
    if writer == "zarr-python":
        zarr.create_array(str(tmp_path / "s.zarr"), shape=ref.shape, chunks=(16, 16), shards=(64, 48), dtype="f4")[:] = ref
    else:
        dask_loom.to_zarr(ref, str(tmp_path / "s.zarr"), "", chunks=(16, 16), shards=(64, 48), scheduler="sync")
    with _static_http(tmp_path) as base:
        a = dask_loom.open_zarr(f"{base}/s.zarr")
        np.testing.assert_array_equal(a.to_dask().compute(scheduler="threads"), ref)
        np.testing.assert_allclose(dask_loom.map(a, [np.sum], axis=0, scheduler="threads")[0], ref.sum(axis=1))
