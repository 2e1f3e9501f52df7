"""Small Zarr helpers shared by the source and the direct chunk reader (a leaf: imports no sibling)."""

from __future__ import annotations

import gzip
import threading
import zlib
from typing import Any

from dask_loom.errors import UnsupportedCodecError

__all__ = ["check_safe_codecs", "ensure_open", "store_label"]


def store_label(store: Any) -> str:
    return getattr(store, "name", None) or str(store)


# Codecs whose decoding runs code stored in the file (numcodecs' Pickle calls pickle.loads).
_UNSAFE_CODECS = frozenset({"pickle"})


def check_safe_codecs(metadata: Any, where: str) -> None:
    """Refuse array metadata naming an unsafe codec (``pickle``) anywhere, before zarr or numcodecs sees it.

    zarr-python 3 happens to refuse these today; this does not rely on it
    (and stops its "install the package providing this codec" advice).

    Examples
    --------
    >>> check_safe_codecs({"zarr_format": 2, "compressor": {"id": "zlib"}}, "x.zarr")
    >>> check_safe_codecs({"zarr_format": 2, "filters": [{"id": "pickle"}]}, "x.zarr")
    Traceback (most recent call last):
    ...
    dask_loom.errors.UnsupportedCodecError: x.zarr: codec 'pickle' is refused: decoding it would run code stored in the file
    """

    def walk(node: Any, top: bool) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if top and k == "attributes":
                    continue  # user attributes, not codecs
                if k in ("id", "name", "object_codec_id") and isinstance(v, str) and v.lower().removeprefix("numcodecs.") in _UNSAFE_CODECS:
                    raise UnsupportedCodecError(f"{where}: codec {v!r} is refused: decoding it would run code stored in the file")
                walk(v, False)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, False)

    walk(metadata, True)


def _problem(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, gzip.BadGzipFile) and "b'x" in text:
        return f"the codec says gzip but the bytes are not gzip ({text}); they look like a zlib stream"
    if "checksum" in text.lower():
        return f"checksum mismatch ({text})"
    if isinstance(exc, zlib.error):
        return f"zlib stream does not decode ({text})"
    return f"{type(exc).__name__}: {text}"


_open_lock = threading.Lock()


def ensure_open(store: Any) -> Any:
    """Open a zarr-python ``ZipStore`` that was built (or unpickled in a worker) but not opened.

    A ``ZipStore`` needs ``_sync_open()`` before its first read (its lock and
    zip handle are made there, and are dropped when it is pickled); zarr's
    other stores read without it.
    """
    if getattr(store, "_is_open", True):
        return store
    from zarr.storage import ZipStore

    if isinstance(store, ZipStore):
        with _open_lock:
            if not store._is_open:
                store._sync_open()
    return store
