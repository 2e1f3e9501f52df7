"""``reshard``: rewrite an unsharded Zarr array, or every layer of a ``.loom.zarr``, as sharded.

Stores written by dask_loom are sharded (decision 13 of the design: a dask
block is one object on an object store); stores written before, or by other
tools, hold one object per chunk.  :func:`reshard` rewrites them in place,
as a transaction: the new array is built from the old one (one task per
shard, reading the old chunks the shard covers) and takes its place at the
end, so a crash leaves the old array readable.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dask_loom.errors import FormatError

__all__ = ["reshard"]

_LOOM_ATTRS = ("row_attrs", "col_attrs")


def _is_loom_group(store: Any) -> bool:
    from dask_loom.zarr._nodes import NodeNotFoundError, read_node_metadata

    try:
        kind, _ = read_node_metadata(store, "")
    except NodeNotFoundError:
        return False
    if kind != "group":
        return False
    for node in ("matrix", *_LOOM_ATTRS):
        try:
            read_node_metadata(store, node)
        except NodeNotFoundError:
            return False
    return True


def reshard(
    url: str | os.PathLike[str],
    path: str = "",
    *,
    chunks: tuple[int, ...] | None = None,
    storage_options: dict[str, Any] | None = None,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
) -> list[str]:
    """Rewrite a ``.loom.zarr`` (every layer) or a Zarr array as sharded Zarr v3.

    Shards hold about ``dask_loom.block-size`` bytes of whole inner chunks
    (:func:`dask_loom.zarr.default_shards`), so a dask block of the result is
    one stored object.  Arrays already sharded are left alone.

    Parameters
    ----------
    url
        The store (path or URL).  A ``.loom.zarr`` has every layer resharded;
        otherwise *path* names the array.
    path
        The array inside a plain Zarr store (``""``: the store is the array).
    chunks
        Inner chunk shape (default: the array's current chunks).
    storage_options
        fsspec options for *url*.
    scheduler, client, progress
        Where the graph runs and whether to show a progress bar.

    Returns
    -------
    list of str
        The arrays rewritten (Loom layer paths, or *path*).

    Examples
    --------
    >>> import numpy as np, tempfile, os, zarr, dask_loom
    >>> fn = os.path.join(tempfile.mkdtemp(), "a.zarr")
    >>> zarr.create_array(fn, shape=(300, 200), chunks=(64, 64), dtype="f4")[:] = np.ones((300, 200))
    >>> dask_loom.reshard(fn, scheduler="sync")
    ['/']
    >>> z = zarr.open_array(fn, mode="r")
    >>> z.shards, z.chunks, float(z[:].sum())
    ((320, 256), (64, 64), 60000.0)
    """
    from dask_loom.storage._objectstore import open_store

    text = os.fspath(url)
    if "://" not in text:
        text = os.path.expanduser(text)
    store = open_store(text, **(storage_options or {}))
    kw = {"scheduler": scheduler, "client": client, "progress": progress}
    if not path and _is_loom_group(store):
        return _reshard_loom(text, storage_options, chunks, kw)
    if not _needs(store, path):
        return []
    _reshard_array(store, text, storage_options, path, chunks, kw)
    return [path or "/"]


def _needs(store: Any, path: str) -> bool:
    from dask_loom.zarr._nodes import NodeNotFoundError, read_node_metadata
    from dask_loom.zarr._source import build_array, store_label

    try:
        kind, meta = read_node_metadata(store, path)
    except NodeNotFoundError:
        raise FormatError(f"{store_label(store)}: no Zarr array at {path or '/'!r}") from None
    if kind != "array":
        raise FormatError(
            f"{store_label(store)}: {path or '/'!r} is a Zarr group, not an array (nor a .loom.zarr)"
        )
    return build_array(store, path, meta).shards is None


def _reshard_array(
    store: Any,
    url: str,
    storage_options: dict[str, Any] | None,
    path: str,
    chunks: tuple[int, ...] | None,
    kw: dict[str, Any],
) -> None:
    """Rewrite one unsharded array of *store* (v2 or v3) as a sharded v3 array at the same path."""
    from dask_loom.blocks import plan_blocks
    from dask_loom.blocks import store as store_blocks
    from dask_loom.blocks._source import from_source
    from dask_loom.storage._stores import LocalStore
    from dask_loom.zarr._nodes import read_node_metadata
    from dask_loom.zarr._source import ZarrSource, build_array, store_label
    from dask_loom.zarr._target import ZarrTarget, default_shards

    _, meta = read_node_metadata(store, path)
    arr = build_array(store, path, meta)
    where = f"{store_label(store)}: array {path or '/'!r}"
    if meta.get("zarr_format") == 2 and path:
        # A v3 array inside a v2 hierarchy would not be found by v2 readers of its group.
        raise FormatError(
            f"{where}: a Zarr v2 array inside a v2 group cannot be sharded (sharding is Zarr v3); "
            "rewrite the store as Zarr v3 first"
        )
    src = ZarrSource(store, path, meta, prefix="zarr-read")
    inner = tuple(int(c) for c in (chunks or arr.chunks))
    inner = tuple(max(1, min(c, n)) if n else max(1, c) for c, n in zip(inner, src.shape))
    shards = default_shards(src.shape, inner, src.dtype.itemsize)
    compressors: Any = arr.compressors if meta.get("zarr_format") == 3 else "auto"
    attrs = dict(meta.get("attributes") or {}) if meta.get("zarr_format") == 3 else dict(arr.attrs)
    dims = tuple(meta["dimension_names"]) if meta.get("dimension_names") else None
    local = type(store) is LocalStore
    # Local stores: the target's transaction writes a copy and swaps it in (reads see the old
    # array until then).  Object stores have no rename: the new array is built beside the old
    # one (a sibling prefix for a store that is the array), then copied into place with its
    # metadata document last.
    out, dest = store, path
    if not local:
        if path:
            dest = f"{path}.reshard-tmp"
        else:
            from dask_loom.loom._zarrtree import _sibling
            from dask_loom.storage._objectstore import open_store

            out = open_store(_sibling(url), **(storage_options or {}))
    target = ZarrTarget(
        out,
        dest,
        shape=src.shape,
        dtype=src.dtype,
        chunks=inner,
        shards=shards,
        compressors=compressors,
        fill_value=arr.fill_value,
        attributes=attrs,
        dimension_names=dims,
        zarr_format=3,
        prefix="zarr-reshard",
    )
    unit = tuple(int(np.lcm(a, b)) for a, b in zip(src.chunk_shape, target.chunk_shape))
    x = from_source(src, chunks=plan_blocks(src.shape, unit, src.dtype.itemsize))
    store_blocks(x, target, **kw)
    if local:
        return
    if path:
        store._move_prefix(dest, path)
    else:
        from dask_loom.loom._zarrtree import _swap_stores

        for doc in (".zarray", ".zattrs"):  # the v2 documents of the old array
            if store.exists(doc):
                store.erase(doc)
        _swap_stores(out, store)


def _reshard_loom(
    url: str, storage_options: dict[str, Any] | None, chunks: tuple[int, ...] | None, kw: dict[str, Any]
) -> list[str]:
    """Every unsharded layer of a ``.loom.zarr``, rewritten in one write of the container."""
    from dask_loom.blocks import plan_blocks, store
    from dask_loom.loom._connection import connect
    from dask_loom.loom._layerhost import layer_path
    from dask_loom.loom._store import touch
    from dask_loom.loom._write import LayerTarget, create_layer_array

    done: list[str] = []
    progress = kw.pop("progress")
    with connect(url, "r+", validate=False, storage_options=storage_options) as ds:
        host = ds.__dask_loom_layer_host__()
        todo = [n for n in ds.layers.keys() if host.info(n).inner_chunks is None]
        if not todo:
            return done
        kw = {k: v for k, v in kw.items() if v is not None} or host.compute_kwargs()
        with host.writing(atomic=True) as w:
            for name in todo:
                info = host.info(name)
                src = host.source(name)
                path = layer_path(name)
                head, _, tail = path.rpartition("/")
                tmp = f"{head}/.tmp-{tail}" if head else f".tmp-{tail}"
                shape = tuple(int(s) for s in info.shape)
                inner = tuple(max(1, min(int(c), n)) for c, n in zip(chunks or info.chunks or shape, shape))
                w.delete(tmp)
                create_layer_array(w, tmp, shape, info.dtype, inner, sample=ds.layers[name])
                target = LayerTarget.on(w, tmp, f"{ds.filename}: layer '{name}'", prefix="loom-reshard")
                unit = tuple(int(np.lcm(a, b)) for a, b in zip(src.chunk_shape, target.chunk_shape))
                x = ds.layers[name].to_dask(chunks=plan_blocks(shape, unit, np.dtype(info.dtype).itemsize))
                store(x, target, progress=progress, **kw)
                w.move(tmp, path)
                done.append(path)
            touch(w)
    return done
