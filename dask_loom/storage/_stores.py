"""Stores with simplezarr's API that are also zarr-python ``Store`` objects.

One object serves two callers:

* **simplezarr's synchronous contract** — ``get(key) -> bytes`` (a missing key
  raises :class:`~dask_loom.errors.MissingKeyError`, an ``IOError``),
  ``set(key, bytes)``, ``erase``, ``erase_values``, ``erase_prefix("a/")``,
  ``get_partial_values([(key, start, length)])``, ``set_partial_values``,
  ``list()``, ``list_prefix("a/")`` (full keys), ``list_dir("a/")`` (full keys
  and ``"a/sub/"`` prefixes), all returning plain lists.  A prefix is a
  directory: it ends with ``/`` (the root is ``"/"``); anything else is an
  :class:`~dask_loom.errors.InvalidKeyError` (a ``ValueError``).
* **zarr-python's asynchronous ``Store`` ABC** — ``await get(key, prototype,
  byte_range)`` (``None`` when missing), ``await set(key, Buffer)``,
  ``delete``, ``exists``, ``async for k in list_dir("a")`` (relative names),
  with zarr's own prefix semantics.

The two share method names.  ``get``/``set``/``get_partial_values`` are told
apart by their arguments: a ``prototype`` (zarr always passes one) or a
``Buffer`` value selects the async path.  The listings are told apart by where
they are called: zarr calls them inside a running event loop, and there they
return a :class:`KeyList` (``async for`` yields zarr's entries; used as a
sequence it is the simplezarr list, prefix checked on first use); called
without a running loop they return the simplezarr ``list`` at once.

A store written against the base classes as simplezarr documents it —
subclass :class:`ReadableStore`/:class:`WritableStore`/:class:`ListableStore`,
override the public ``get``/``set``/``erase``/``list`` (and optionally
``list_prefix``/``list_dir``/...), no base ``__init__`` call — gets the other
methods built on those, and works with zarr-python and
:func:`dask_loom.open_zarr` as well.  The built-in stores implement private
primitives (``_get``, ``_set``, ``_erase``, ``_keys``, ``_dir``) instead,
which keep their fast paths (ranged reads, one-level listings).

Stores pickle as a spec (path, URL, options; a :class:`MemoryStore` by value),
never as an open connection.

This module holds the memory and local stores and re-exports the rest: key
checks in ``_keys``, the base classes and the wrapper stores in ``_basestore``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
import uuid
from typing import Any

from dask_loom.errors import InvalidKeyError, StoreError
from dask_loom.storage._basestore import (
    BaseStore,
    ListableStore,
    ReadableStore,
    SlowStore,
    WrapperStore,
    WritableStore,
    _Base3,
)
from dask_loom.storage._keys import (
    KeyList,
    Req,
    _as_bytes,
    _plain_key,
    _slice,
    check_key,
    check_node_path,
    check_prefix,
    normalize_prefix,
)

__all__ = [
    "BaseStore",
    "KeyList",
    "ListableStore",
    "LocalStore",
    "MemoryStore",
    "ReadableStore",
    "SlowStore",
    "WritableStore",
    "WrapperStore",
    "check_key",
    "check_node_path",
    "check_prefix",
    "normalize_prefix",
]

# --------------------------------------------------------------------------------------
# MemoryStore
# --------------------------------------------------------------------------------------


class MemoryStore(_Base3):
    """A readable, writable, listable store in a Python dict.

    Parameters
    ----------
    fields
        Initial ``{key: bytes}`` (copied).
    read_only
        Refuse writes.

    Examples
    --------
    >>> import numpy as np, zarr
    >>> from dask_loom.stores import MemoryStore
    >>> s = MemoryStore()
    >>> z = zarr.create_array(s, name="x", shape=(4,), chunks=(2,), dtype="i4")
    >>> z[:] = np.arange(4)
    >>> s.list_dir("x/")
    ['x/c/', 'x/zarr.json']
    >>> len(s.get("x/c/1")) > 0
    True
    """

    def __init__(self, fields: dict[str, Any] | None = None, *, read_only: bool = False) -> None:
        super().__init__(read_only=read_only)
        self._dict: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._uid = uuid.uuid4().hex  # tokens name the store, never hash its data
        for k, v in (fields or {}).items():
            self._dict[check_key(k, store="MemoryStore")] = _as_bytes(v, f"MemoryStore: key {k!r}")

    @property
    def dict(self) -> dict[str, bytes]:
        """The dict holding the data."""
        return self._dict

    @property
    def nbytes(self) -> int:
        """Total bytes stored."""
        return sum(len(v) for v in self._dict.values())

    def _spec(self) -> Any:
        return self._dict

    def _token_spec(self) -> Any:
        return self._uid

    def _copy(self, *, read_only: bool) -> MemoryStore:
        new = MemoryStore(read_only=read_only)
        new._dict = self._dict  # same data, as zarr's MemoryStore.with_read_only
        new._lock = self._lock
        new._uid = self._uid
        return new

    def __reduce__(self) -> Any:
        return (_memory_from_state, (dict(self._dict), self.read_only, self._uid))

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._dict)} keys>)"

    def _get(self, key: str, req: Req = None) -> bytes:
        try:
            data = self._dict[key]
        except KeyError:
            raise self._missing(key) from None
        return _slice(data, req)

    def _exists(self, key: str) -> bool:
        return key in self._dict

    def _size(self, key: str) -> int:
        try:
            return len(self._dict[key])
        except KeyError:
            raise self._missing(key) from None

    def _set(self, key: str, data: bytes) -> None:
        with self._lock:
            parts = key.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in self._dict:
                    raise StoreError(f"{self.name}: cannot set {key!r}: {'/'.join(parts[:i])!r} is a key, not a directory")
            if key not in self._dict and any(k.startswith(key + "/") for k in self._dict):
                raise StoreError(f"{self.name}: cannot set {key!r}: it is a directory")
            self._dict[key] = data

    def _erase(self, key: str) -> None:
        with self._lock:
            if self._dict.pop(key, None) is None and key not in self._dict:
                raise self._missing(key)

    def _keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._dict if k.startswith(prefix))

    def _move_prefix(self, src: str, dst: str) -> None:
        src_p, dst_p = normalize_prefix(src), normalize_prefix(dst)
        with self._lock:
            for k in [k for k in self._dict if k.startswith(dst_p)]:
                del self._dict[k]
            for k in [k for k in self._dict if k.startswith(src_p)]:
                self._dict[dst_p + k[len(src_p) :]] = self._dict.pop(k)


def _memory_from_state(d: dict[str, bytes], read_only: bool, uid: str) -> MemoryStore:
    s = MemoryStore(read_only=read_only)
    s._dict = d
    s._uid = uid
    return s


# --------------------------------------------------------------------------------------
# LocalStore
# --------------------------------------------------------------------------------------

_TMP_MARK = ".dlpart-"


class LocalStore(_Base3):
    """A store in a directory of the local file system.

    Keys are paths relative to *path*; keys that would escape it (``..``,
    absolute paths, NUL bytes) are refused.  Values are written to a
    temporary file beside the target and renamed into place, so a failed
    write never leaves a partial value behind.

    Examples
    --------
    >>> import tempfile
    >>> from dask_loom.stores import LocalStore
    >>> s = LocalStore(tempfile.mkdtemp())
    >>> s.set("a/b", b"xyz")
    >>> s.get("a/b"), s.list_dir("/")
    (b'xyz', ['a/'])
    >>> s.get("../etc/passwd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dask_loom.errors.InvalidKeyError: LocalStore('...'): invalid store key '../etc/passwd': empty or all-dot segment '..'
    """

    _blocking_io = True

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LocalStore path must be a str or os.PathLike, not {type(path).__name__}")
        super().__init__(read_only=read_only)
        self.path = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        self._root = str(self.path)

    @property
    def name(self) -> str:
        return f"LocalStore({str(self.path)!r})"

    def _spec(self) -> Any:
        return str(self.path)

    def _copy(self, *, read_only: bool) -> LocalStore:
        return LocalStore(self.path, read_only=read_only)

    def __reduce__(self) -> Any:
        return (_local_from_state, (str(self.path), self.read_only))

    def __repr__(self) -> str:
        return f"LocalStore({str(self.path)!r})"

    def __str__(self) -> str:
        return f"file://{self.path}"

    def _file(self, key: str) -> pathlib.Path:
        if not isinstance(key, str):
            raise TypeError(f"store keys must be str, not {type(key).__name__}")
        if key.startswith(("/", "\\")) or os.path.isabs(key):
            raise InvalidKeyError(f"{self.name}: key {key!r} is an absolute path; keys must stay inside the store")
        check_key(key, store=self.name)
        p = self.path.joinpath(*key.split("/"))
        root = str(self.path)
        if os.path.commonpath([root, os.path.normpath(p)]) != root:
            raise InvalidKeyError(f"{self.name}: key {key!r} escapes the store root")
        return p

    def _fspath(self, key: str) -> str:
        # Hot path (one call per chunk read): plain string checks for ordinary
        # keys; anything unusual goes through the full checks of _file.
        if _plain_key(key):
            return f"{self._root}/{key}"
        return str(self._file(key))

    def _get(self, key: str, req: Req = None) -> bytes:
        p = self._fspath(key)
        try:
            with open(p, "rb") as f:
                if req is None:
                    return f.read()
                if req[0] == "suffix":
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - int(req[1])))
                    return f.read() if req[1] else b""
                f.seek(int(req[0]))
                if req[1] is None:
                    return f.read()
                # read(n) allocates n bytes up front: clamp to what the file holds.
                left = max(0, os.fstat(f.fileno()).st_size - int(req[0]))
                return f.read(min(int(req[1]), left))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None
        except OSError as exc:
            raise StoreError(f"{self.name}: cannot read {key!r}: {exc}") from exc

    def _exists(self, key: str) -> bool:
        return os.path.isfile(self._fspath(key))

    def _size(self, key: str) -> int:
        try:
            st = os.stat(self._fspath(key))
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(key) from None
        return int(st.st_size)

    def _set(self, key: str, data: bytes) -> None:
        p = self._file(key)
        tmp = p.with_name(f"{_TMP_MARK}{p.name}.{uuid.uuid4().hex}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if p.is_dir():
                raise StoreError(f"{self.name}: cannot set {key!r}: it is a directory") from exc
            raise StoreError(f"{self.name}: cannot write {key!r}: {exc}") from exc

    def _erase(self, key: str) -> None:
        p = self._file(key)
        try:
            p.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None
        except PermissionError as exc:
            if p.is_dir():
                raise self._missing(key) from None
            raise StoreError(f"{self.name}: cannot erase {key!r}: {exc}") from exc
        # Empty directories are not keys: prune them so listings match the keys.
        parent = p.parent
        while parent != self.path and str(parent).startswith(str(self.path)):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def _keys(self, prefix: str) -> list[str]:
        base = self.path / prefix if prefix else self.path
        if prefix:
            self._file(prefix[:-1])
        if not base.is_dir():
            return []
        out = []
        root_len = len(str(self.path)) + 1
        for dirpath, _dirs, files in os.walk(base):
            for fn in files:
                if fn.startswith(_TMP_MARK):
                    continue
                out.append(os.path.join(dirpath, fn)[root_len:].replace(os.sep, "/"))
        return sorted(out)

    def _dir(self, prefix: str) -> list[str]:
        base = self._file(prefix[:-1]) if prefix else self.path
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            if e.name.startswith(_TMP_MARK):
                continue
            out.append(prefix + e.name + "/" if e.is_dir() else prefix + e.name)
        return sorted(out)

    def _move_prefix(self, src: str, dst: str) -> None:
        src_p, dst_p = normalize_prefix(src), normalize_prefix(dst)
        s, d = self._file(src_p[:-1]), self._file(dst_p[:-1])
        if not s.is_dir():
            super()._move_prefix(src, dst)
            return
        import shutil

        if d.exists():
            # Rename the old directory away first so the swap itself is one rename.
            trash = d.with_name(f"{_TMP_MARK}{d.name}.{uuid.uuid4().hex}")
            os.replace(d, trash)
            os.replace(s, d)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            d.parent.mkdir(parents=True, exist_ok=True)
            os.replace(s, d)


def _local_from_state(path: str, read_only: bool) -> LocalStore:
    return LocalStore(path, read_only=read_only)
