"""Keys, prefixes and byte ranges of the stores, checked as simplezarr does; the two-faced key listing.

Below :mod:`dask_loom.storage._basestore` and :mod:`dask_loom.storage._stores`
(which re-exports the public names).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    SuffixByteRequest,
)

from dask_loom.errors import InvalidKeyError

_NO = object()  # "argument not given": tells simplezarr calls from zarr calls

# A byte request in the sync primitives: (start, length_or_None) or ("suffix", n).
Req = tuple[Any, Any] | None


def _checked_args(fn: str, args: tuple[Any, ...], store: str | None) -> tuple[Any, str | None]:
    """``(value, store label)`` from ``f(value)`` or simplezarr's ``f(ob, method, value)``."""
    if len(args) == 3:
        ob, method, value = args
        return value, store or f"{type(ob).__name__}.{method}()"
    if len(args) == 1:
        return args[0], store
    raise TypeError(f"{fn}() takes (value) or simplezarr's (ob, method, value), got {len(args)} arguments")


def check_key(*args: Any, store: str | None = None) -> str:
    """Validate a store key and return it: ``check_key(key)`` or simplezarr's ``check_key(ob, method, key)``.

    A key is a non-empty ``str`` without a leading or trailing ``/``.  Also
    refused, so that no key can escape its store: empty or all-dot segments
    (``..``), NUL bytes, backslashes (a path separator on Windows and to some
    servers), and percent-encoded forms of these (``%2e%2e``, ``%5c``,
    ``%00``), which an HTTP server or object store may decode.

    Raises
    ------
    TypeError
        *key* is not a ``str``.
    dask_loom.errors.InvalidKeyError
        (a ``ValueError``) naming the store (*store*, or ``Class.method()``
        in the three-argument form) and the problem.

    Examples
    --------
    >>> from dask_loom.stores import check_key
    >>> check_key("a/b")
    'a/b'
    >>> check_key(None, "get", "a/../b")
    Traceback (most recent call last):
    ...
    dask_loom.errors.InvalidKeyError: NoneType.get(): invalid store key 'a/../b': empty or all-dot segment '..'
    """
    key, store = _checked_args("check_key", args, store)
    where = f"{store}: " if store else ""
    if not isinstance(key, str):
        raise TypeError(f"{where}store keys must be str, not {type(key).__name__}")
    if not key or key.startswith("/") or key.endswith("/"):
        raise InvalidKeyError(
            f"{where}invalid store key {key!r}: must be non-empty without a leading or trailing '/'"
        )
    _check_text(key, key, where)
    if "%" in key:
        from urllib.parse import unquote

        decoded = unquote(key)
        if decoded != key:
            if decoded.startswith("/"):
                raise InvalidKeyError(
                    f"{where}invalid store key {key!r}: percent-encoded absolute path {decoded!r}"
                )
            _check_text(key, decoded, where, encoded=True)
    return key


def _check_text(key: str, text: str, where: str, *, encoded: bool = False) -> None:
    how = " (percent-encoded)" if encoded else ""
    if "\x00" in text:
        raise InvalidKeyError(f"{where}invalid store key {key!r}: contains a NUL byte{how}")
    if "\\" in text:
        raise InvalidKeyError(f"{where}invalid store key {key!r}: contains a backslash{how}")
    for part in text.split("/"):
        if not part or set(part) == {"."}:
            raise InvalidKeyError(f"{where}invalid store key {key!r}: empty or all-dot segment {part!r}{how}")


def check_prefix(*args: Any, store: str | None = None) -> str:
    """Validate a simplezarr prefix and return it: ``check_prefix(prefix)`` or ``check_prefix(ob, method, prefix)``.

    A prefix names a directory: it ends with ``/`` (``"a/b/"``), and the
    root is ``"/"``.  ``""``, ``"a"`` (no trailing ``/``) and ``"/a/"`` are
    refused, as are the segments :func:`check_key` refuses.

    Examples
    --------
    >>> from dask_loom.stores import check_prefix
    >>> check_prefix("a/b/"), check_prefix("/")
    ('a/b/', '/')
    >>> check_prefix("dir1")
    Traceback (most recent call last):
    ...
    dask_loom.errors.InvalidKeyError: invalid store prefix 'dir1': a prefix names a directory and must end with '/' ('dir1/'; the root is '/')
    """
    prefix, store = _checked_args("check_prefix", args, store)
    where = f"{store}: " if store else ""
    if not isinstance(prefix, str):
        raise TypeError(f"{where}store prefixes must be str, not {type(prefix).__name__}")
    if prefix == "/":
        return prefix
    if not prefix.endswith("/"):
        hint = f"{prefix + '/'!r}; " if prefix and not prefix.startswith("/") else ""
        raise InvalidKeyError(
            f"{where}invalid store prefix {prefix!r}: a prefix names a directory and must end with '/' ({hint}the root is '/')"
        )
    try:
        check_key(prefix[:-1], store=store)
    except InvalidKeyError as exc:
        head = f"invalid store key {prefix[:-1]!r}"
        raise InvalidKeyError(
            str(exc).replace(head, f"invalid store prefix {prefix!r} (directory {prefix[:-1]!r})", 1)
        ) from None
    return prefix


def normalize_prefix(prefix: Any, store: str | None = None) -> str:
    """A directory prefix in any spelling as ``""`` (root) or ``"a/b/"``.

    For zarr's calls and internal use: ``"/"`` and ``""`` both mean the
    root, ``"a/b"`` is read as ``"a/b/"``.  The simplezarr methods use the
    strict :func:`check_prefix` instead.
    """
    if not isinstance(prefix, str):
        raise TypeError(
            f"{store + ': ' if store else ''}store prefixes must be str, not {type(prefix).__name__}"
        )
    if prefix in ("", "/"):
        return ""
    p = prefix if prefix.endswith("/") else prefix + "/"
    check_key(p[:-1], store=store)
    return p


def check_node_path(path: Any, store: str | None = None) -> str:
    """Validate a Zarr node path inside a store and return it without outer ``/``.

    As in zarr-python, a leading ``/`` means the store's root (``"/a"`` is
    ``"a"``), never the file system's; everything else follows
    :func:`check_key` (``..``, NUL, backslashes and their percent-encodings
    are refused).
    """
    if not isinstance(path, str):
        raise TypeError(f"{store + ': ' if store else ''}node paths must be str, not {type(path).__name__}")
    p = path.strip("/")
    if p:
        try:
            check_key(p, store=store)
        except InvalidKeyError as exc:
            raise InvalidKeyError(str(exc).replace("invalid store key", "invalid node path", 1)) from None
    return p


def _plain_key(key: Any) -> bool:
    """Cheap test that *key* is an ordinary key (the hot path: one call per chunk); others get :func:`check_key`."""
    return (
        type(key) is str
        and bool(key)
        and key[0] != "/"
        and key[-1] != "/"
        and "//" not in key
        and "\\" not in key
        and "\x00" not in key
        and "%" not in key
        and ("." not in key or not any(set(part) == {"."} for part in key.split("/")))
    )


def _in_event_loop() -> bool:
    """True inside a running asyncio loop (where zarr-python calls the listings)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _parse_range(byte_range: ByteRequest | None) -> Req:
    if byte_range is None:
        return None
    if isinstance(byte_range, RangeByteRequest):
        return (byte_range.start, max(0, byte_range.end - byte_range.start))
    if isinstance(byte_range, OffsetByteRequest):
        return (byte_range.offset, None)
    if isinstance(byte_range, SuffixByteRequest):
        return ("suffix", byte_range.suffix)
    raise ValueError(f"Unexpected byte_range, got {byte_range}.")


def _slice(data: bytes, req: Req) -> bytes:
    if req is None:
        return data
    if req[0] == "suffix":
        n = int(req[1])
        return data[len(data) - n :] if n else b""
    start, length = req
    return data[start:] if length is None else data[start : start + length]


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, memoryview):
        return value.tobytes()
    raise TypeError(f"{what}: values must be bytes or memoryview, not {type(value).__name__}")


class KeyList(Sequence[str]):
    """What ``list``/``list_prefix``/``list_dir`` return inside a running event loop.

    zarr-python calls the listings there and consumes them with
    ``async for``, which yields zarr's entries through the store's async
    path.  Used as a sequence (``==``, ``len``, iteration, indexing) it is
    simplezarr's sorted list, computed (and its prefix checked) on first use:
    so the simplezarr API still works in a notebook, whose cells run inside
    an event loop.  Outside a loop the listings return a plain ``list``.

    Examples
    --------
    >>> import asyncio
    >>> from dask_loom.stores import MemoryStore
    >>> s = MemoryStore({"a/b": b"1", "a/c/d": b"2", "e": b"3"})
    >>> s.list_dir("a/")  # no running loop: a plain list
    ['a/b', 'a/c/']
    >>> async def zarr_style():
    ...     return [k async for k in s.list_dir("a")]
    >>> asyncio.run(zarr_style())
    ['b', 'c']
    """

    __slots__ = ("_afn", "_items", "_sfn")

    def __init__(self, sync_fn: Callable[[], list[str]], async_fn: Callable[[], AsyncIterator[str]]) -> None:
        self._sfn = sync_fn
        self._afn = async_fn
        self._items: list[str] | None = None

    def _list(self) -> list[str]:
        if self._items is None:
            self._items = sorted(self._sfn())
        return self._items

    def __getitem__(self, i: Any) -> Any:
        return self._list()[i]

    def __len__(self) -> int:
        return len(self._list())

    def __iter__(self) -> Iterator[str]:
        return iter(self._list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyList):
            other = other._list()
        if isinstance(other, (list, tuple)):
            return self._list() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._list())

    def __aiter__(self) -> AsyncIterator[str]:
        return self._afn().__aiter__()


def _dir_entries(keys: Iterable[str], prefix: str) -> list[str]:
    """simplezarr's ``list_dir``: full keys of files, ``"prefix/sub/"`` for sub-directories."""
    out = set()
    for k in keys:
        rest = k[len(prefix) :]
        head, sep, _ = rest.partition("/")
        out.add(prefix + head + "/" if sep else k)
    return sorted(out)
