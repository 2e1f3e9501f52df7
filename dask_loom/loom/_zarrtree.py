"""The Loom layout inside a Zarr group (``*.loom.zarr``), locally or on an object store.

Same node names as the HDF5 file — ``matrix``, ``layers/<name>``,
``row_attrs``/``col_attrs`` arrays, ``row_graphs``/``col_graphs`` groups of
``a``/``b``/``w``, ``attrs/<name>`` scalars — as a Zarr v3 hierarchy.  Strings
are Zarr ``string`` arrays (``vlen-utf8``).  A compound (struct) attribute is a
group of one array per field (``0``, ``1``, …; fixed-length bytes fields as
``uint8`` arrays with one more axis) whose ``compound_dtype`` attribute records
the names, formats, offsets and item size, so the numpy dtype comes back
exactly and any Zarr reader can read the fields (Zarr v3 has no specified
struct data type).  Layers are compressed with
blosc-lz4hc by default (``dask_loom.zarr-codec``) and sharded: a layer's shards
hold about ``dask_loom.block-size`` bytes of whole inner chunks
(``dask_loom.loom-zarr-chunks``), so a dask block is one object on an object
store (:func:`dask_loom.zarr.default_shards`); node attributes
(``last_modified``) are Zarr attributes.  Unsharded stores (older ones, or
written by other tools) read as before; :func:`dask_loom.reshard` rewrites
them sharded.

Unlike HDF5 there is no single writer: a layer is a
:class:`~dask_loom.zarr.ZarrTarget` (``ZarrWriter.target``) whose stored
chunks are written by the tasks of :func:`dask_loom.store` that compute them
(every block is a union of whole chunks, so no two tasks touch the same
chunk).  On a local disk, writes hold the writer lock (a lock file beside the
store) and transactions (``permute``, ``add_columns``, whole layers,
``create``, ``convert``) write a hard-linked copy of the store that replaces
it in one atomic directory exchange
(:func:`~dask_loom.storage._atomic.local_transaction`, the one local Zarr
transaction), so a crash leaves the old or the new store, whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dask_loom._config import get_config
from dask_loom.errors import LoomFormatError, MissingKeyError
from dask_loom.loom._tree import ArrayInfo, Tree, TreeWriter
from dask_loom.storage import FileSpec
from dask_loom.storage._atomic import local_transaction, replace_dir
from dask_loom.storage._objectstore import open_store
from dask_loom.storage._stores import _TMP_MARK, BaseStore, LocalStore, normalize_prefix
from dask_loom.zarr._consolidated import canonical, load_consolidated, prior_documents, write_consolidated
from dask_loom.zarr._nodes import NodeNotFoundError, read_node_metadata
from dask_loom.zarr._source import ZarrSource, _numpy_dtype, build_array
from dask_loom.zarr._target import ZarrTarget, shards_param

__all__ = ["ZarrTree", "ZarrWriter"]

_ROOT_META = {"zarr_format": 3, "node_type": "group", "attributes": {}}
_UNKNOWN = object()  # consolidated metadata not looked at yet


def _p(path: str) -> str:
    return path.strip("/")


_BLOSC = ("lz4hc", "lz4", "zstd", "zlib", "blosclz")


def _codec_spec() -> tuple[str, Any]:
    """``dask_loom.zarr-codec`` parsed: ``(kind, setting)``, e.g. ``("blosc", "lz4hc")`` or ``("none", None)``."""
    spec = str(get_config("zarr-codec") or "blosc-lz4hc").lower()
    if spec == "none":
        return "none", None
    kind, _, cname = spec.partition("-")
    if kind == "blosc" and cname in _BLOSC:
        return "blosc", cname
    if spec in ("zstd", "gzip"):
        return spec, None
    raise ValueError(
        f"dask_loom.zarr-codec: unknown codec {spec!r} (blosc-lz4hc, blosc-lz4, blosc-zstd, blosc-zlib, "
        "blosc-blosclz, zstd, gzip or none)"
    )


def _codecs(compression: str | None) -> Any:
    """zarr compressors for a tree array (``None``: uncompressed)."""
    if compression is None:
        return None
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    kind, cname = _codec_spec()
    if kind == "blosc":
        return [BloscCodec(cname=cname, clevel=5, shuffle="shuffle")]
    if kind == "zstd":
        return [ZstdCodec(level=3)]
    if kind == "gzip":
        return [GzipCodec(level=2)]
    return None


def sample_encoder() -> Callable[[np.ndarray], Any] | None:
    """``encode(chunk) -> bytes`` as :func:`_codecs` stores a layer's chunks (``None``: uncompressed).

    numcodecs with the same settings: for estimating what shards will store
    (:func:`dask_loom.zarr.stored_ratio`) without going through zarr's codec pipeline.
    """
    import numcodecs

    kind, cname = _codec_spec()
    if kind == "blosc":
        return numcodecs.Blosc(cname=cname, clevel=5, shuffle=numcodecs.Blosc.SHUFFLE).encode
    if kind == "zstd":
        return numcodecs.Zstd(level=3).encode
    if kind == "gzip":
        return numcodecs.GZip(level=2).encode
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()] if value.ndim else _jsonable(value[()])
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


_COMPOUND = "compound_dtype"


def _compound_doc(dt: np.dtype) -> dict[str, Any]:
    """The ``compound_dtype`` attribute recording a struct dtype exactly."""
    formats = []
    for name in dt.names or ():
        sub = dt.fields[name][0]
        formats.append([sub.base.str, list(sub.shape)])
    return {"names": list(dt.names or ()), "formats": formats, "offsets": [int(dt.fields[n][1]) for n in dt.names or ()], "itemsize": int(dt.itemsize)}


def _compound_dtype(doc: Any, where: str) -> np.dtype:
    try:
        formats = [np.dtype((np.dtype(base), tuple(shape))) if shape else np.dtype(base) for base, shape in doc["formats"]]
        return np.dtype({"names": list(doc["names"]), "formats": formats, "offsets": list(doc["offsets"]), "itemsize": int(doc["itemsize"])})
    except (KeyError, TypeError, ValueError) as exc:
        raise LoomFormatError(f"{where}: unreadable '{_COMPOUND}' attribute ({exc})") from None


class _ZarrReads:
    """Read operations shared by the tree and its writer."""

    store: BaseStore
    label: str

    def _meta(self, path: str) -> tuple[str, dict[str, Any]] | None:
        path = _p(path)
        cache = self._cache()
        if path not in cache:
            nodes = self._consolidated() if path else None
            if nodes is not None:
                cache[path] = nodes.get(path)  # verified complete: a node not in it does not exist
                return cache[path]
            try:
                cache[path] = read_node_metadata(self.store, path)
            except NodeNotFoundError:
                cache[path] = None
        return cache[path]

    def _cache(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _consolidated(self) -> dict[str, tuple[str, dict[str, Any]]] | None:
        """Every node's metadata from the root's verified consolidated metadata, or ``None`` (read each)."""
        return None

    def exists(self, path: str) -> bool:
        return self._meta(path) is not None

    def is_group(self, path: str) -> bool:
        m = self._meta(path)
        return m is not None and m[0] == "group" and not self._is_compound(m)

    @staticmethod
    def _is_compound(m: tuple[str, dict[str, Any]] | None) -> bool:
        return m is not None and m[0] == "group" and _COMPOUND in (m[1].get("attributes") or {})

    def _compound(self, path: str) -> tuple[np.dtype, tuple[int, ...]] | None:
        """``(dtype, shape)`` of a compound attribute stored as one array per field, else ``None``."""
        m = self._meta(path)
        if not self._is_compound(m):
            return None
        assert m is not None
        where = f"{self.label}: '/{_p(path)}'"
        dt = _compound_dtype(m[1]["attributes"][_COMPOUND], where)
        if not dt.names:
            raise LoomFormatError(f"{where}: compound attribute with no fields")
        if self._meta(f"{_p(path)}/0") is None:
            raise LoomFormatError(f"{where}: compound attribute without its field arrays ('0', '1', ...)")
        first = self._array_meta(f"{_p(path)}/0")
        return dt, (int(first["shape"][0]),) if first.get("shape") else ()

    def _read_compound(self, path: str, dt: np.dtype, shape: tuple[int, ...], sel: Any) -> np.ndarray:
        out = np.zeros(shape, dtype=dt)
        for i, name in enumerate(dt.names or ()):
            sub = dt.fields[name][0]
            try:
                raw = np.asarray(self._array(f"{_p(path)}/{i}")[...])
                if sub.base.kind == "S":  # stored as bytes: one more axis of itemsize uint8
                    raw = np.ascontiguousarray(raw).view(sub.base).reshape(raw.shape[:-1])
            except (KeyError, ValueError) as exc:
                raise LoomFormatError(f"{self.label}: field {i} ({name!r}) of compound attribute '/{_p(path)}' is unreadable ({exc})") from None
            if raw.shape != shape + sub.shape:
                raise LoomFormatError(
                    f"{self.label}: field {i} ({name!r}) of compound attribute '/{_p(path)}' has shape {raw.shape}, expected {shape + sub.shape}"
                )
            out[name] = raw
        return out[sel] if sel != () else out

    def children(self, path: str) -> list[str]:
        if not self.is_group(path):
            return []
        p = _p(path)
        nodes = self._consolidated()
        if nodes is not None:
            inside = [n.rpartition("/")[2] for n in nodes if n.rpartition("/")[0] == p]
            # In the order of a directory listing ("name/" entries), as below.
            return sorted((n for n in inside if not n.startswith(_TMP_MARK)), key=lambda n: n + "/")
        prefix = f"{p}/" if p else "/"
        out = []
        for entry in self.store.list_dir(prefix):
            if not entry.endswith("/"):
                continue
            name = entry[:-1].rpartition("/")[2]
            if name.startswith(_TMP_MARK):
                continue
            if self.exists(f"{p}/{name}" if p else name):
                out.append(name)
        return out

    def _array_meta(self, path: str) -> dict[str, Any]:
        m = self._meta(path)
        if m is None:
            raise KeyError(f"{self.label}: no array '{_p(path)}'")
        if m[0] != "array":
            raise LoomFormatError(f"{self.label}: '/{_p(path)}' is a Zarr group where the Loom spec wants an array")
        return m[1]

    def _array(self, path: str) -> Any:
        return build_array(self.store, _p(path), self._array_meta(path))

    def info(self, path: str) -> ArrayInfo:
        compound = self._compound(path)
        if compound is not None:
            dt, shape = compound
            return ArrayInfo(path=_p(path), shape=shape, dtype=dt, chunks=None, compression=None, compression_opts=None, kind="compound")
        meta = self._array_meta(path)
        arr = self._array(path)
        dt = _numpy_dtype(arr)
        kind = "string" if dt.kind == "O" else "plain"
        codecs = [c.get("name") for c in meta.get("codecs", []) if isinstance(c, dict)]
        comp = next((c for c in codecs if c not in ("bytes", "vlen-utf8", "transpose")), None)
        return ArrayInfo(
            path=_p(path),
            shape=tuple(int(s) for s in arr.shape),
            dtype=dt,
            chunks=tuple(int(c) for c in (arr.shards or arr.chunks)),
            compression=comp,
            compression_opts=None,
            kind=kind,
            inner_chunks=tuple(int(c) for c in arr.chunks) if arr.shards else None,
        )

    def read(self, path: str, sel: Any = ()) -> Any:
        compound = self._compound(path)
        if compound is not None:
            return self._read_compound(path, compound[0], compound[1], sel)
        arr = self._array(path)
        out = arr[sel] if sel != () or arr.ndim == 0 else arr[...]
        out = np.asarray(out)
        if out.dtype.kind == "T":  # numpy StringDType: the Loom code works with object arrays
            out = out.astype(object)
        if out.ndim == 0:
            v = out[()]
            return str(v) if out.dtype.kind in "TU" else v
        return out

    def attrs(self, path: str) -> dict[str, Any]:
        m = self._meta(path)
        if m is None:
            return {}
        return dict(m[1].get("attributes") or {})


class ZarrTree(_ZarrReads, Tree):
    """A Loom container stored as a Zarr group.

    Parameters
    ----------
    spec
        Where the group lives (local path or URL plus storage options).
    mode
        ``"r"`` or ``"r+"``.
    """

    read_prefix = "loom-read"

    def __init__(self, spec: FileSpec, *, mode: str = "r", early: Any = None) -> None:
        self.spec = spec
        self.mode = mode
        self.store = open_store(spec.url, **spec.storage_options)
        # Requests sent before zarr-python was imported (dask_loom.loom._open): the
        # root document, the spec version and the listing, served once each.
        if early is not None and hasattr(self.store, "adopt_early"):
            self.store.adopt_early(early)
        self.read_only = bool(self.store.read_only)  # http(s) stores cannot be written
        self.label = spec.name
        self._meta_cache: dict[str, Any] = {}
        self._nodes: Any = _UNKNOWN
        self._scalars: dict[str, Any] = {}
        if self._meta("") is None:
            raise LoomFormatError(f"{spec.name}: not a Zarr group (no zarr.json or .zgroup at its root)")

    def _cache(self) -> dict[str, Any]:
        return self._meta_cache

    def _forget(self, *, written: bool = True) -> None:
        self._meta_cache.clear()
        self._scalars.clear()
        self._nodes = _UNKNOWN
        if written and hasattr(self.store, "adopt_early"):
            self.store.adopt_early(None)  # read before this tree wrote: not used from now on

    def read(self, path: str, sel: Any = ()) -> Any:
        # A scalar (a file attribute: LOOM_SPEC_VERSION is read by the opening and
        # by the validator) is one request on an object store: read once, as its metadata.
        if isinstance(sel, tuple) and not sel and not isinstance(self.store, LocalStore):
            m = self._meta(path)
            if m is not None and m[0] == "array" and m[1].get("shape") == []:
                key = _p(path)
                if key not in self._scalars:
                    self._scalars[key] = super().read(path)
                return self._scalars[key]
        return super().read(path, sel)

    def _consolidated(self) -> dict[str, tuple[str, dict[str, Any]]] | None:
        # Local documents cost microseconds to read and are always current: read them.
        # Elsewhere the root's consolidated metadata, verified by one listing
        # (dask_loom.zarr._consolidated), replaces a request per node.
        if self._nodes is _UNKNOWN:
            self._nodes = None
            if isinstance(self.store, LocalStore):
                return None
            root = self._meta("")
            if root is not None and root[0] == "group":
                self._nodes = load_consolidated(self.store, root[1])
        return self._nodes  # type: ignore[no-any-return]

    def source(self, path: str, *, prefix: str | None = None) -> ZarrSource:
        return ZarrSource(self.store, _p(path), self._array_meta(path), prefix=prefix or self.read_prefix)

    def identity(self) -> Any:
        # What opening sent early still describes the store as it was opened (each is used once).
        self._forget(written=False)
        m = self._meta("")
        return ("zarr", self.spec.url, hashlib.sha1(json.dumps(m, sort_keys=True, default=str).encode()).hexdigest())

    @contextlib.contextmanager
    def writing(self, *, atomic: bool = False, fresh: bool = False) -> Iterator[ZarrWriter]:
        """Write into the group.

        On a local disk every write holds the writer lock (a lock file beside
        the store, as for HDF5), and ``atomic``/``fresh`` writes go to a copy
        beside the store (hard links of the unchanged chunk files, or an empty
        group for ``fresh``) that replaces it in one atomic directory exchange
        at the end: a crash at any moment leaves the old or the new store.
        On object stores (no rename) ``fresh`` builds a new prefix and copies
        it over at the end; other writes go in place.
        """
        if self.mode != "r+" or self.read_only:
            from dask_loom.errors import ReadOnlyError

            raise ReadOnlyError(f"{self.label}: opened read-only")
        self._forget()
        joined = _active_writer(self.spec)
        if joined is not None:
            # A nested write in the same thread joins the write already open.
            yield joined
            return
        if isinstance(self.store, LocalStore):
            with _local_transaction(self.spec, self.store, self.label, atomic=atomic or fresh, fresh=fresh) as w:
                try:
                    yield w
                finally:
                    self._forget()
            return
        if not fresh:
            w = ZarrWriter(self.store, self.label)
            try:
                yield w
                w.consolidate()
            finally:
                self._forget()
            return
        tmp_url = _sibling(self.spec.url)
        tmp_store = open_store(tmp_url, **self.spec.storage_options)
        w = ZarrWriter(tmp_store, self.label)
        w.create_group("")
        try:
            yield w
        except BaseException:
            with contextlib.suppress(Exception):
                tmp_store.erase_prefix("/")
            raise
        finally:
            self._forget()
        w.consolidate()
        _swap_stores(tmp_store, self.store)

    @classmethod
    @contextlib.contextmanager
    def creating(cls, spec: FileSpec) -> Iterator[ZarrWriter]:
        """Create (replace) the group: built beside a local target and swapped into place atomically; written in place on object stores."""
        target = open_store(spec.url, **spec.storage_options)
        if isinstance(target, LocalStore):
            with _local_transaction(spec, target, spec.name, atomic=True, fresh=True) as w:
                yield w
            return
        # Object stores have no rename (a copy would upload everything twice):
        # the old keys are removed and the new ones written in place, the root
        # metadata last, so an interrupted upload is not a readable group.
        with contextlib.suppress(MissingKeyError):
            target.erase_prefix("/")
        w = ZarrWriter(target, spec.name, defer_root=True)
        w.create_group("")
        try:
            yield w
        except BaseException:
            with contextlib.suppress(Exception):
                target.erase_prefix("/")
            raise
        w.commit_root()

    def __reduce__(self) -> Any:
        return (_rebuild_tree, (self.spec, self.mode))


def _rebuild_tree(spec: FileSpec, mode: str) -> ZarrTree:
    return ZarrTree(spec, mode=mode)


def _sibling(url: str) -> str:
    head, _, tail = url.rstrip("/").rpartition("/")
    return f"{head}/{_TMP_MARK}{tail}.{uuid.uuid4().hex[:12]}"


def _swap_stores(new: BaseStore, old: BaseStore) -> None:
    """Put the content of *new* where *old* is (one atomic directory exchange for local stores)."""
    if isinstance(new, LocalStore) and isinstance(old, LocalStore):
        replace_dir(new.path, old.path)
        return
    # Object stores have no rename: copy the new keys over, then drop the rest.
    # The root metadata goes first and comes back last, so an interrupted copy
    # leaves a store that does not open (the new copy stays whole beside it)
    # rather than a mixture of old and new that opens as complete.
    keys = list(new.list())
    with contextlib.suppress(MissingKeyError):
        old.erase("zarr.json")
    for k in keys:
        if k != "zarr.json":
            old.set(k, new.get(k))
    stale = set(old.list()) - set(keys)
    for k in stale:
        old.erase(k)
    old.set("zarr.json", new.get("zarr.json"))
    new.erase_prefix("/")


_writers_lock = threading.Lock()
_writers: dict[str, tuple[int, ZarrWriter]] = {}


def _active_writer(spec: FileSpec) -> ZarrWriter | None:
    with _writers_lock:
        held = _writers.get(spec.url)
    return held[1] if held is not None and held[0] == threading.get_ident() else None


@contextlib.contextmanager
def _local_transaction(spec: FileSpec, store: LocalStore, label: str, *, atomic: bool, fresh: bool) -> Iterator[ZarrWriter]:
    """Hold the writer lock of a local store; with *atomic*, write a copy and swap it in at the end.

    The one local Zarr transaction (:func:`dask_loom.storage._atomic.local_transaction`),
    shared with :func:`dask_loom.to_zarr`.
    """
    base = "inplace" if not atomic else ("empty" if fresh or not store.path.is_dir() else "clone")
    with local_transaction(store.path, label=label, base=base) as target:
        w = ZarrWriter(target if atomic else store, label)
        if atomic and fresh:
            w.create_group("")
        with _writers_lock:
            _writers[spec.url] = (threading.get_ident(), w)
        try:
            yield w
            w.consolidate()  # into the copy: the exchange brings documents and consolidation together
        finally:
            with _writers_lock:
                _writers.pop(spec.url, None)


class ZarrWriter(_ZarrReads, TreeWriter):
    """Writes into a Loom Zarr group."""

    def __init__(self, store: BaseStore, label: str, *, defer_root: bool = False) -> None:
        self.store = store
        self.label = label
        self._meta_cache: dict[str, Any] = {}
        self._written: dict[str, dict[str, Any]] = {}  # node documents written here (for consolidate)
        # Object stores have no rename: a new store's root metadata is written last
        # (commit_root), so an interrupted upload never opens as a complete group.
        self._defer_root = defer_root

    def _cache(self) -> dict[str, Any]:
        return self._meta_cache

    def _put_meta(self, path: str, doc: dict[str, Any]) -> None:
        p = _p(path)
        if not p and self._defer_root:
            self._meta_cache[""] = ("group", doc)
            return
        key = f"{p}/zarr.json" if p else "zarr.json"
        self.store.set(key, canonical(doc))
        self._meta_cache.pop(p, None)
        if p:
            self._written[p] = doc

    def commit_root(self) -> None:
        """Write the deferred root metadata, consolidated: the store becomes a readable group."""
        if self._defer_root:
            self._defer_root = False
            self.consolidate()

    def consolidate(self) -> None:
        """Rewrite the root document with every node's metadata consolidated (see ``_consolidated``)."""
        root = self._meta_cache.get("") if self._defer_root or "" in self._meta_cache else self._meta("")
        doc = dict(root[1]) if root is not None and root[0] == "group" else dict(_ROOT_META)
        # The documents consolidated before, and those written here: each is checked
        # against the listing's digest before use (a stale one is read afresh).
        known = {**prior_documents(doc), **self._written}
        self._defer_root = False
        write_consolidated(self.store, doc, known)
        self._meta_cache.pop("", None)

    def create_group(self, path: str) -> None:
        p = _p(path)
        parts = p.split("/") if p else []
        for i in range(len(parts) + 1):
            sub = "/".join(parts[:i])
            m = self._meta(sub)
            if m is None:
                self._put_meta(sub, dict(_ROOT_META))
            elif m[0] != "group":
                raise LoomFormatError(f"{self.label}: '{sub}' is an array, not a group")

    def create_array(
        self,
        path: str,
        *,
        data: np.ndarray | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
        chunks: tuple[int, ...] | None = None,
        maxshape: tuple[int | None, ...] | None = None,
        compression: str | None = "gzip",
        compression_opts: Any = 2,
        fillvalue: Any = None,
        strings: bool = False,
        shards: tuple[int, ...] | None = None,
    ) -> None:
        """Create an array (see :meth:`TreeWriter.create_array`); *shards*: Zarr v3 shards of whole *chunks*."""
        import zarr

        p = _p(path)
        self.delete(p)
        head = p.rpartition("/")[0]
        self.create_group(head)
        if data is not None and np.asarray(data).dtype.names is not None:
            self._create_compound(p, np.asarray(data), compression=compression)
            return
        if data is not None:
            data = np.asarray(data)
            shape = data.shape
            if strings or data.dtype.kind in "OUS":
                strings = True
        if strings:
            dtype = str
            if data is not None:
                data = np.asarray([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in data.ravel().tolist()], dtype=object).reshape(data.shape)
        elif dtype is None and data is not None:
            dtype = data.dtype
        shape = tuple(int(s) for s in (shape or ()))
        if chunks is None:
            chunks = shape if shape and all(shape) and np.prod(shape) <= 1 << 20 else "auto"  # type: ignore[assignment]
        if shape and not all(shape):
            chunks = tuple(max(1, c) for c in (chunks if isinstance(chunks, tuple) else shape))
        # The metadata document is made in memory and written by us: zarr.create_array
        # on the store would also write parent groups, the root among them (which
        # an upload to an object store writes last, see commit_root).
        from zarr.core.buffer import default_buffer_prototype

        from dask_loom.storage._stores import MemoryStore

        scratch = zarr.create_array(
            MemoryStore(),
            name="a",
            shape=shape,
            dtype=dtype,
            chunks=chunks if shape else (),
            shards=shards_param(shards) if shards and shape and all(shape) else None,
            compressors=_codecs(compression) if not strings or compression else None,
            fill_value=fillvalue if fillvalue is not None else ("" if strings else 0),
            zarr_format=3,
        )
        doc = json.loads(scratch.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
        self.store.set(f"{p}/zarr.json" if p else "zarr.json", canonical(doc))
        self._meta_cache.pop(p, None)
        if p:
            self._written[p] = doc
        if data is not None and data.size:
            self._array(p)[...] = data

    def _create_compound(self, p: str, data: np.ndarray, *, compression: str | None) -> None:
        """A compound attribute as a group of one array per field (see the module docstring)."""
        from dask_loom.loom._values import check_compound

        dt = data.dtype
        check_compound(dt, p)
        if data.ndim != 1:
            raise TypeError(f"{self.label}: compound attribute '/{p}' must be 1-D, not {data.ndim}-D")
        self._put_meta(p, {**_ROOT_META, "attributes": {_COMPOUND: _compound_doc(dt)}})
        for i, name in enumerate(dt.names or ()):
            field = np.ascontiguousarray(data[name])
            if field.dtype.kind == "S":
                field = field.view(np.uint8).reshape(*field.shape, field.dtype.itemsize)
            self.create_array(f"{p}/{i}", data=field, compression=compression)

    def write(self, path: str, sel: Any, data: np.ndarray) -> None:
        self._array(path)[sel] = data

    def resize(self, path: str, shape: tuple[int, ...]) -> None:
        self._array(path).resize(shape)
        self._meta_cache.pop(_p(path), None)
        self._written.pop(_p(path), None)  # rewritten by zarr-python, not as canonical()

    def delete(self, path: str) -> None:
        p = _p(path)
        if not p:
            raise ValueError(f"{self.label}: refusing to delete the root group")
        with contextlib.suppress(MissingKeyError):
            self.store.erase_prefix(normalize_prefix(p))
        for k in [k for k in self._meta_cache if k == p or k.startswith(p + "/")]:
            del self._meta_cache[k]
        for k in [k for k in self._written if k == p or k.startswith(p + "/")]:
            del self._written[k]

    def move(self, src: str, dst: str) -> None:
        s, d = _p(src), _p(dst)
        self.create_group(d.rpartition("/")[0])
        self.store._move_prefix(s, d)
        for k in [k for k in self._meta_cache if k in (s, d) or k.startswith((s + "/", d + "/"))]:
            del self._meta_cache[k]
        moved = {k: v for k, v in self._written.items() if k == s or k.startswith(s + "/")}
        for k in [k for k in self._written if k in (s, d) or k.startswith((s + "/", d + "/"))]:
            del self._written[k]
        self._written.update({d + k[len(s) :]: v for k, v in moved.items()})

    def set_attr(self, path: str, name: str, value: Any) -> None:
        m = self._meta(path)
        if m is None:
            raise KeyError(f"{self.label}: no node '{_p(path)}'")
        doc = dict(m[1])
        doc["attributes"] = {**(doc.get("attributes") or {}), name: _jsonable(value)}
        self._put_meta(path, doc)

    def del_attr(self, path: str, name: str) -> None:
        m = self._meta(path)
        if m is None or name not in (m[1].get("attributes") or {}):
            return
        doc = dict(m[1])
        doc["attributes"] = {k: v for k, v in doc["attributes"].items() if k != name}
        self._put_meta(path, doc)

    def target(self, path: str, *, prefix: str = "loom-write", label: str | None = None) -> ZarrTarget:
        # Blocks cover whole chunks, so tasks write their chunks directly and in parallel
        # (into this write's store: the transaction's copy when there is one).
        return ZarrTarget.on(self.store, _p(path), self._array_meta(path), prefix=prefix, label=label)

