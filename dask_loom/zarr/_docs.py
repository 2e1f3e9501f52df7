"""Reading a Zarr node's metadata documents (``zarr.json``, or ``.zarray``/``.zgroup`` + ``.zattrs``), capped in size.

Shared by the nodes (:mod:`dask_loom.zarr._nodes`), the source's check for
an array replaced under a reader (:mod:`dask_loom.zarr._source`), the
targets and the ``.loom.zarr`` tree; of its siblings it imports only the
leaf :mod:`dask_loom.zarr._meta`.
"""

from __future__ import annotations

import json
from typing import Any

from dask_loom._config import get_config
from dask_loom.errors import FormatError, MissingKeyError
from dask_loom.storage._stores import BaseStore
from dask_loom.zarr._meta import ensure_open, store_label

__all__ = ["NodeNotFoundError", "read_node_metadata", "readable_metadata"]


class NodeNotFoundError(FormatError, FileNotFoundError):
    """No Zarr metadata (``zarr.json``, ``.zgroup``, ``.zarray``) at a path of a store."""


def _metadata_cap() -> int:
    from dask.utils import parse_bytes

    v = get_config("max-metadata-bytes")
    return parse_bytes(v) if isinstance(v, str) else int(v)


def _read_key(store: Any, key: str) -> bytes | None:
    # Metadata documents are read with a byte limit (one ranged request): a
    # damaged or hostile store cannot make us allocate more than the cap.
    cap = _metadata_cap()
    if isinstance(store, BaseStore):
        # A first small read answers ordinary documents in one request; a
        # longer one is sized first, so a huge document is refused before the
        # cap's worth of memory is allocated.
        first = min(cap + 1, 1 << 16)
        try:
            raw = store._get(key, (0, first))
            if len(raw) == first:
                size = store._size(key)
                if size > cap:
                    from dask_loom.errors import TooLargeError

                    raise TooLargeError(
                        f"{store_label(store)}: {key!r} holds {size} bytes, more than the {cap}-byte cap (dask_loom.max-metadata-bytes)"
                    )
                raw = store._get(key, (0, cap + 1))
        except MissingKeyError:
            return None
    else:
        from zarr.abc.store import RangeByteRequest
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        ensure_open(store)
        buf = sync(store.get(key, prototype=default_buffer_prototype(), byte_range=RangeByteRequest(0, cap + 1)))
        raw = None if buf is None else buf.to_bytes()
    if raw is not None and len(raw) > cap:
        from dask_loom.errors import TooLargeError

        raise TooLargeError(f"{store_label(store)}: {key!r} is larger than the {cap}-byte cap (dask_loom.max-metadata-bytes)")
    return raw


def _json(store: Any, key: str, raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{store_label(store)}: {key!r} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{store_label(store)}: {key!r} holds a JSON {type(doc).__name__}, not an object")
    return doc


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


def read_node_metadata(store: Any, path: str) -> tuple[str, dict[str, Any]]:
    """``("array" | "group", metadata)`` for the node at *path* (v3 first, then v2)."""
    raw = _read_key(store, _join(path, "zarr.json"))
    if raw is not None:
        doc = _json(store, _join(path, "zarr.json"), raw)
        if doc.get("zarr_format") != 3:
            raise FormatError(f"{store_label(store)}: {_join(path, 'zarr.json')!r} declares zarr_format {doc.get('zarr_format')!r}, not 3")
        kind = doc.get("node_type")
        if kind not in ("array", "group"):
            raise FormatError(f"{store_label(store)}: {_join(path, 'zarr.json')!r} has node_type {kind!r}")
        if kind == "group" and doc.get("consolidated_metadata", 0) is None:
            doc = {k: v for k, v in doc.items() if k != "consolidated_metadata"}  # written by zarr-python <= 3.1.3
        return kind, doc
    raw = _read_key(store, _join(path, ".zarray"))
    attrs_raw = _read_key(store, _join(path, ".zattrs"))
    attrs = _json(store, _join(path, ".zattrs"), attrs_raw) if attrs_raw else {}
    if raw is not None:
        doc = _json(store, _join(path, ".zarray"), raw)
        doc.pop("node_type", None)  # zarrs adds it to .zarray; not part of v2
        doc["attributes"] = attrs
        doc.setdefault("zarr_format", 2)
        if doc.get("zarr_format") != 2:
            raise FormatError(f"{store_label(store)}: {_join(path, '.zarray')!r} declares zarr_format {doc.get('zarr_format')!r}, not 2")
        return "array", doc
    raw = _read_key(store, _join(path, ".zgroup"))
    if raw is not None:
        doc = _json(store, _join(path, ".zgroup"), raw)
        doc["attributes"] = attrs
        return "group", doc
    raise NodeNotFoundError(
        f"{store_label(store)}: no Zarr metadata (zarr.json, .zarray or .zgroup) at path {path or '/'!r}"
    )


def readable_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """*meta* as dask_loom reads the array (the same object when nothing needs changing).

    zarr-python 2 wrote ``fill_value`` 0 for fixed-length string arrays and
    read it as ``np.zeros((), dtype)[()]`` (the empty string); zarr-python 3
    refuses it, so it is read as an empty fill value.  Object arrays
    (``"|O"``) are left to zarr-python 3, which fills them with
    ``str(fill_value)``.
    """
    dtype = str(meta.get("dtype", ""))
    fill = meta.get("fill_value")
    if meta.get("zarr_format") == 2 and dtype[1:2] in ("S", "U") and fill is not None and not isinstance(fill, str):
        return {**meta, "fill_value": None}
    return meta
