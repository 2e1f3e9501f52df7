"""Consolidated metadata of a Zarr v3 hierarchy, written by dask_loom and trusted only when verified.

Opening a ``.loom.zarr`` reads the metadata document of every node (matrix,
layers, row/column attributes, file attributes, graphs): about fifty requests
on an object store, a second at 20 ms each.  dask_loom writes the documents of
all nodes into the root ``zarr.json`` as zarr-python's
``zarr.consolidate_metadata`` does (``consolidated_metadata``, kind
``inline``, flat paths), so zarr-python opens the store with one request too,
and keeps it current at the end of every dask_loom write to the container.

Staleness.  Another tool may change a node without updating the root (zarr-python
itself writes a node's document and leaves the consolidated copy as it was).
Next to the documents, dask_loom records the MD5 of the bytes of every node's
``zarr.json`` (``consolidated_metadata["dask_loom"]["digests"]``, a key
zarr-python ignores).  A reader trusts the consolidated documents only when
one listing of the store shows exactly those ``zarr.json`` objects, each with
a content digest (an S3 ``ETag`` of a single-part upload, a GCS ``md5Hash``)
equal to the recorded one: a node added, removed or rewritten by anyone makes
the reader fall back to reading every document, as without consolidation.
Where the listing tells no digest but an ``ETag`` (Azure: an opaque version,
new with every write), the ``ETag`` the listing showed when the documents were
consolidated is recorded too (``["dask_loom"]["etags"]``) and must be the
same: a document listed before it was read and rewritten in between shows
another ``ETag`` later, so the reader falls back then as well.
Stores whose listing tells no content digest (local directories, where reading
the documents costs microseconds; memory) always read the documents.  The
listing costs one request per thousand objects; past ``LIST_LIMIT`` objects
(an unsharded store of many chunks) the reader stops paging and falls back.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dask_loom.errors import TooLargeError
from dask_loom.storage._obstore import LIST_LIMIT

__all__ = ["canonical", "load_consolidated", "refresh_consolidated", "write_consolidated"]

_EXTRA = "dask_loom"  # our key inside consolidated_metadata: {"digests": {node path: md5 hex}}
_V2_DOCS = (".zarray", ".zgroup", ".zattrs")
_TMP_MARKS = (".dlpart-",)  # transaction copies and parts: never nodes (as ZarrTree.children)


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes dask_loom writes for a node's ``zarr.json`` (so a recorded digest can be recomputed)."""
    return json.dumps(doc, indent=2, default=str).encode("utf-8")


def _md5(raw: bytes) -> str:
    return hashlib.md5(raw, usedforsecurity=False).hexdigest()


def _node_of(key: str) -> str | None:
    """The node path whose ``zarr.json`` *key* is (``None``: not a node document below the root)."""
    head, _, name = key.rpartition("/")
    if name != "zarr.json" or not head or any(p.startswith(_TMP_MARKS) for p in head.split("/")):
        return None
    return head


def _is_v2(key: str) -> bool:
    return key.rpartition("/")[2] in _V2_DOCS


def _listing(store: Any) -> dict[str, tuple[str | None, str | None]] | None:
    """Every key with ``(content MD5, ETag)`` from one listing, or ``None`` (not listable, too many keys)."""
    digests = getattr(store, "content_digests", None)
    if digests is None:
        return None
    try:
        return digests(limit=LIST_LIMIT)  # type: ignore[no-any-return]
    except OSError:
        return None  # listing refused or failing: the documents are read one by one (which say why)


def _read_key(store: Any, key: str) -> bytes | None:
    """A node document read with the metadata cap; one over the cap reads as damaged (``b""``).

    A damaged document leaves the root without consolidated metadata: readers
    then meet the document where it is, and refuse it there with its name.
    """
    from dask_loom.zarr._docs import _read_key as read_capped

    try:
        return read_capped(store, key)
    except TooLargeError:
        return b""


def _walk_docs(store: Any) -> dict[str, bytes] | None:
    """Every node document, by listing directories (not descending into arrays: their chunks)."""
    out: dict[str, bytes] = {}
    todo = [""]
    while todo:
        p = todo.pop()
        entries = store.list_dir(f"{p}/" if p else "/")
        if any(_is_v2(e) for e in entries):
            return None  # Zarr v2 nodes: not a hierarchy dask_loom consolidates
        doc_key = f"{p}/zarr.json" if p else "zarr.json"
        if p and doc_key in entries:
            raw = _read_key(store, doc_key)
            if raw is None:
                continue  # removed since the listing
            out[p] = raw
            try:
                is_array = b'"array"' in raw and json.loads(raw).get("node_type") == "array"
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue  # damaged: write_consolidated leaves the root without consolidation
            if is_array:
                continue
        for e in entries:
            if e.endswith("/"):
                sub = e[:-1]
                if not sub.rpartition("/")[2].startswith(_TMP_MARKS):
                    todo.append(sub)
    return out


def write_consolidated(
    store: Any, root: dict[str, Any], known: dict[str, dict[str, Any]] | None = None
) -> bytes:
    """Write the root document *root* of *store* with the consolidated documents of every node below it.

    *known* maps node paths to documents the caller believes current (written
    in this transaction, or consolidated before it): one is used without a
    read when its canonical bytes match the digest the store's listing shows.
    Returns the root document's bytes as written.  A hierarchy holding Zarr v2
    nodes gets no consolidated metadata (the root is written without it).
    """
    known = known or {}
    root = {k: v for k, v in root.items() if k != "consolidated_metadata"}
    etags: dict[str, str] = {}
    docs: dict[str, bytes] | None
    listing = _listing(store)
    if listing is None:
        docs = _walk_docs(store)
    elif any(_is_v2(k) for k in listing):
        docs = None
    else:
        docs = {}
        unknown: list[tuple[str, str]] = []
        for key, (digest, etag) in listing.items():
            node = _node_of(key)
            if node is None:
                continue
            if etag is not None:
                etags[node] = etag
            raw = canonical(known[node]) if node in known else None
            if raw is None or digest is None or _md5(raw) != digest:
                unknown.append((node, key))
            else:
                docs[node] = raw

        def read(item: tuple[str, str]) -> bytes | None:
            # Capped as every metadata read is (dask_loom.max-metadata-bytes); None: removed since the listing.
            return _read_key(store, item[1])

        from dask_loom._threads import map_threads

        # Documents written by others (or on a store that lists no digests): read at once.
        for (node, _), raw in zip(unknown, map_threads(read, unknown)):
            if raw is not None:
                docs[node] = raw
    if docs is not None:
        metadata: dict[str, Any] = {}
        for node in sorted(docs):
            try:
                doc = json.loads(docs[node])
            except (UnicodeDecodeError, json.JSONDecodeError):
                docs = None  # a damaged document: readers must meet it where it is
                break
            if (
                not isinstance(doc, dict)
                or doc.get("zarr_format") != 3
                or doc.get("node_type") not in ("array", "group")
            ):
                docs = None
                break
            if doc["node_type"] == "group":
                # As zarr.consolidate_metadata writes child groups (their members are listed flat at the root).
                doc = {
                    **doc,
                    "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": {}},
                }
            metadata[node] = doc
    if docs is not None:
        root["consolidated_metadata"] = {
            "kind": "inline",
            "must_understand": False,
            "metadata": metadata,
            _EXTRA: {
                "digests": {node: _md5(raw) for node, raw in sorted(docs.items())},
                # The versions the listing showed, for stores that list no digest (Azure).
                "etags": {node: etags[node] for node in sorted(docs) if node in etags},
            },
        }
    raw = canonical(root)
    store.set("zarr.json", raw)
    return raw


def load_consolidated(store: Any, root: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]] | None:
    """``{node path: (node type, document)}`` from *root*'s consolidated metadata, or ``None``.

    ``None`` (read every document instead) unless the root holds dask_loom's
    digests and one listing of the store shows exactly the recorded
    ``zarr.json`` objects with those content digests (see the module docstring).
    """
    cm = root.get("consolidated_metadata")
    if not isinstance(cm, dict) or cm.get("kind") != "inline":
        return None
    metadata, extra = cm.get("metadata"), cm.get(_EXTRA)
    digests = extra.get("digests") if isinstance(extra, dict) else None
    if not isinstance(metadata, dict) or not isinstance(digests, dict) or set(metadata) != set(digests):
        return None
    etags = extra.get("etags") if isinstance(extra, dict) else None
    etags = etags if isinstance(etags, dict) else {}
    listing = _listing(store)
    if listing is None:
        return None
    seen: dict[str, tuple[str | None, str | None]] = {}
    for key, tags in listing.items():
        if _is_v2(key):
            return None
        node = _node_of(key)
        if node is not None:
            seen[node] = tags
    if set(seen) != set(digests):
        return None
    for node, (digest, etag) in seen.items():
        same_content = digest is not None and digest == digests[node]
        same_version = digest is None and etag is not None and etag == etags.get(node)
        if not (same_content or same_version):
            return None
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for node, doc in metadata.items():
        if (
            not isinstance(doc, dict)
            or doc.get("zarr_format") != 3
            or doc.get("node_type") not in ("array", "group")
        ):
            return None
        if doc["node_type"] == "group":
            doc = {
                k: v for k, v in doc.items() if k != "consolidated_metadata"
            }  # as the node's own document reads
        out[node] = (doc["node_type"], doc)
    return out


def prior_documents(root: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The node documents *root*'s consolidated metadata holds (unverified: ``write_consolidated`` checks them)."""
    cm = root.get("consolidated_metadata")
    metadata = cm.get("metadata") if isinstance(cm, dict) else None
    out: dict[str, dict[str, Any]] = {}
    for node, doc in (metadata or {}).items():
        if isinstance(doc, dict):
            group = doc.get("node_type") == "group"
            out[node] = {k: v for k, v in doc.items() if not (group and k == "consolidated_metadata")}
    return out


def refresh_consolidated(store: Any) -> None:
    """Bring the root's consolidated metadata up to date after a write below it, where dask_loom keeps one.

    A root without dask_loom's digests (no consolidated metadata, or
    zarr-python's own) is left as it is.
    """
    from dask_loom.storage._stores import BaseStore
    from dask_loom.zarr._docs import NodeNotFoundError, read_node_metadata

    if not isinstance(store, BaseStore):
        return  # a zarr-python store given to to_zarr: dask_loom does not rewrite its root
    try:
        kind, root = read_node_metadata(store, "")
    except NodeNotFoundError:
        return
    cm = root.get("consolidated_metadata")
    if kind != "group" or root.get("zarr_format") != 3 or not isinstance(cm, dict) or _EXTRA not in cm:
        return
    write_consolidated(store, root, prior_documents(root))
