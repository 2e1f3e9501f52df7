"""``convert``: a Loom container to another kind (``.loom`` ↔ ``.loom.zarr``) as a parallel graph.

Layers are read block by block (whole source chunks) and handed to
:func:`dask_loom.store` with the target layer (tasks named ``loom-convert``):
into a ``.loom.zarr`` the tasks store their chunks directly; into an HDF5
``.loom`` they return compressed chunks that the single writer stores.
Attributes, graphs and global attributes follow.  The target is built beside
its final name and swapped in at the end, so a failed conversion leaves no
half-written container.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["convert"]


def _spec(path: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> Any:
    from dask_loom.storage import FileSpec

    text = os.fspath(path)
    if "://" not in text:
        text = os.path.expanduser(text)
    return FileSpec.from_path(text, storage_options)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    chunks: tuple[int, int] | None = None,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    validate: bool = False,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
) -> None:
    """Convert a Loom container: ``.loom`` (HDF5) ↔ ``.loom.zarr`` (Zarr), locally or on an object store.

    The kind of *dst* follows its name (``*.zarr`` → Zarr, else HDF5).  Every
    layer, row/column attribute, graph and global attribute is copied; layer
    dtypes are kept.  Layer chunks default to the target kind's:
    ``dask_loom.loom-zarr-chunks`` (256 x 256 inner chunks, in shards of about
    ``dask_loom.block-size``) for Zarr, and ``dask_loom.loom-chunks`` (loompy's 64 x 64) for HDF5.

    Parameters
    ----------
    src, dst
        Paths or URLs (``s3://…``); *dst* is replaced if it exists.
    chunks
        Chunk shape of the target's layers (default: see above).
    storage_options, dst_storage_options
        fsspec options for *src* and *dst* (*dst* defaults to *src*'s).
    validate
        Check *src* against the Loom spec first (off by default: a copy does
        not need a valid file; ``dask-loom convert`` turns it on unless
        ``--no-validate`` is given, like the other commands).
    scheduler, client, progress
        Where the graph runs and whether to show a progress bar.

    Examples
    --------
    >>> import dask_loom, numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> dask_loom.create(os.path.join(d, "a.loom"), np.arange(12.0).reshape(3, 4), {"g": np.arange(3)}, {"c": np.arange(4)})
    >>> dask_loom.convert(os.path.join(d, "a.loom"), os.path.join(d, "a.loom.zarr"), scheduler="sync")
    >>> with dask_loom.connect(os.path.join(d, "a.loom.zarr"), "r") as ds:
    ...     print(ds.shape, ds[2, :].tolist())
    (3, 4) [8.0, 9.0, 10.0, 11.0]
    """
    from dask_loom.blocks import plan_blocks, store
    from dask_loom.loom._connection import connect
    from dask_loom.loom._create import creating
    from dask_loom.loom._layerhost import layer_path
    from dask_loom.loom._store import init_layout, put_attr, put_global, put_graph
    from dask_loom.loom._write import LayerTarget, create_layer_array

    dst_spec = _spec(dst, dst_storage_options if dst_storage_options is not None else storage_options)
    with connect(src, "r", validate=validate, storage_options=storage_options) as ds:
        shape = ds.shape
        if 0 in shape:
            raise ValueError(f"{ds.filename}: the main matrix is empty; nothing to convert")
        layer_names = ds.layers.keys()
        host = ds.__dask_loom_layer_host__()
        sources = {name: host.source(name) for name in layer_names}
        names = {m: list(getattr(ds, m).keys()) for m in ("attrs", "ra", "ca", "row_graphs", "col_graphs")}
        globals_ = {k: ds.attrs[k] for k in names["attrs"] if k != "LOOM_SPEC_VERSION"}
        attrs = [{k: ds.ra[k] for k in names["ra"]}, {k: ds.ca[k] for k in names["ca"]}]
        graphs = [
            {k: ds.row_graphs[k] for k in names["row_graphs"]},
            {k: ds.col_graphs[k] for k in names["col_graphs"]},
        ]
        kw = {"scheduler": scheduler, "client": client}
        from dask_loom._config import get_config
        from dask_loom.loom._tree import is_zarr_spec

        default_chunks = (
            get_config("loom-zarr-chunks") if is_zarr_spec(dst_spec) else get_config("loom-chunks")
        )
        with creating(dst_spec) as w:
            init_layout(w)
            for name in layer_names:
                src_layer = sources[name]
                dt = np.dtype(src_layer.dtype)
                path = layer_path(name)
                layer_chunks = tuple(int(c) for c in (chunks or default_chunks))
                layer_chunks = tuple(max(1, min(c, n)) for c, n in zip(layer_chunks, shape))
                # Sharded in a .loom.zarr, sized by a few chunks read from the source and compressed.
                create_layer_array(w, path, shape, dt, layer_chunks, sample=ds.layers[name])
                target = LayerTarget.on(w, path, f"{dst_spec.name}: layer '{name}'", prefix="loom-convert")
                # Blocks whole in both the source's and the target's chunks: each read once, each written once.
                unit = tuple(int(np.lcm(a, b)) for a, b in zip(src_layer.chunk_shape, target.chunk_shape))
                x = ds.layers[name].to_dask(chunks=plan_blocks(shape, unit, dt.itemsize))
                store(x, target, progress=progress, **kw)
            for axis in (0, 1):
                for k, v in attrs[axis].items():
                    put_attr(w, axis, k, v, n=shape[axis], stamp=False, nested=True)
                for k, g in graphs[axis].items():
                    put_graph(w, axis, k, g, stamp=False)
            for k, v in globals_.items():
                put_global(w, k, v, in_group=True)
