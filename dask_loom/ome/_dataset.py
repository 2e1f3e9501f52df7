"""The OME-Arrow typed chunk dataset writer: ``choose_chunking`` and ``write_ome_arrow_dataset``.

Images are prepared as for :func:`~dask_loom.ome.to_ome_arrow` (``_write``) and
stored through :func:`dask_loom.store` into an :class:`~dask_loom.ome._target.OMEDatasetTarget`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from dask_loom.errors import SelectionError
from dask_loom.ome._schema import choose_chunk_shape
from dask_loom.ome._schema import pixel_dtype as _pixel_dtype
from dask_loom.ome._write import _is_dask, _overrides, _prepare, _write_input
from dask_loom.storage._urls import check_scheme

__all__ = ["choose_chunking", "write_ome_arrow_dataset"]

_LAYOUTS = ("auto", "image", "tile", "volume", "z-plane", "block", "hybrid")
_PATTERNS = {
    "balanced": "block",
    "full_image": "image",
    "random_image": "image",
    "crop_2d": "tile",
    "fast_crop_2d": "tile",
    "full_volume": "volume",
    "plane_3d": "z-plane",
    "subvolume_3d": "block",
    "balanced_5d": "block",
    "time_series": "block",
}


def choose_chunking(
    shape: Sequence[int],
    dtype: Any,
    *,
    layout: str = "auto",
    access_pattern: str = "balanced",
    target_chunk_mb: float | None = None,
    chunk_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The TCZYX chunk shape of a typed chunk dataset (ome-arrow's ``choose_chunking`` names).

    ``layout`` ``"image"``/``"hybrid"`` (one chunk per image), ``"volume"``
    (per (t, c)), ``"z-plane"`` (per plane), ``"tile"`` (512 x 512 planes;
    256 for ``access_pattern="fast_crop_2d"``), ``"block"`` (the default
    for ``"balanced"``: a Z slab of square tiles of about *target_chunk_mb*).

    Examples
    --------
    >>> choose_chunking((1, 3, 64, 2048, 2048), "uint16")["chunk_shape"]
    (1, 1, 16, 256, 256)
    >>> choose_chunking((2, 1, 5, 600, 700), "uint8", layout="z-plane")["chunk_shape"]
    (1, 1, 1, 600, 700)
    """
    if len(shape) != 5 or any(int(s) <= 0 for s in shape):
        raise SelectionError(f"shape {tuple(shape)} must be five positive TCZYX sizes")
    st, sc, sz, sy, sx = (int(s) for s in shape)
    if layout not in _LAYOUTS:
        raise SelectionError(f"layout {layout!r} is not one of {_LAYOUTS}")
    if access_pattern not in _PATTERNS:
        raise SelectionError(f"access_pattern {access_pattern!r} is not one of {tuple(_PATTERNS)}")
    resolved = _PATTERNS[access_pattern] if layout == "auto" else layout
    if chunk_shape is not None:
        cs = tuple(int(v) for v in chunk_shape)
        if len(cs) != 5 or any(v <= 0 for v in cs):
            raise SelectionError(f"chunk_shape {tuple(chunk_shape)} must be five positive TCZYX sizes")
    elif resolved in ("image", "hybrid"):
        cs = (st, sc, sz, sy, sx)
    elif resolved == "volume":
        cs = (1, 1, sz, sy, sx)
    elif resolved == "z-plane":
        cs = (1, 1, 1, sy, sx)
    elif resolved == "tile":
        side = 256 if access_pattern == "fast_crop_2d" else 512
        cs = (1, 1, 1, min(sy, side), min(sx, side))
    else:
        target = None if target_chunk_mb is None else int(float(target_chunk_mb) * (1 << 20))
        if target is not None and target <= 0:
            raise SelectionError(f"target_chunk_mb must be > 0, got {target_chunk_mb}")
        cs = choose_chunk_shape((st, sc, sz, sy, sx), dtype, target_bytes=target)
    cs = tuple(max(1, min(c, s)) for c, s in zip(cs, (st, sc, sz, sy, sx)))
    return {"layout": resolved, "chunk_shape": cs}


def _dataset_images(images: Any) -> list[tuple[str | None, Any]]:
    if isinstance(images, Mapping):
        return [(str(k), v) for k, v in images.items()]
    if isinstance(images, np.ndarray) or _is_dask(images) or _from_view_type(images):
        return [(None, images)]
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        return [(None, v) for v in images]
    return [(None, images)]


def _from_view_type(obj: Any) -> bool:
    from dask_loom.ome._lazy import LazyTensorView
    from dask_loom.ome._views import TensorView

    return isinstance(
        obj, (TensorView, LazyTensorView, dict, pa.StructScalar, pa.StructArray, pa.ChunkedArray)
    )


def write_ome_arrow_dataset(
    images: Any,
    output_path: str | os.PathLike[str],
    *,
    layout: str = "auto",
    access_pattern: str = "balanced",
    target_chunk_mb: float | None = None,
    chunk_shape: Sequence[int] | None = None,
    compression: str | None = "zstd",
    build_physical_index: bool = True,
    chunk_rows_per_row_group: int = 1,
    pixel_dtype: Any = None,
    clamp: bool = True,
    dim_order: str | None = None,
    image_ids: Sequence[str] | None = None,
    channel_names: Sequence[str] | None = None,
    physical_size_x: float | None = None,
    physical_size_y: float | None = None,
    physical_size_z: float | None = None,
    physical_size_unit: str | None = None,
    overwrite: bool = False,
    scheduler: Any = None,
    client: Any = None,
) -> dict[str, Any]:
    """Write images as an OME-Arrow typed chunk dataset, one chunk per row group.

    Writes ``images.parquet``, ``chunks.parquet`` (streamed through a
    ``ParquetWriter``: memory holds a few blocks, never an image),
    ``index.parquet`` and ``_ome_arrow_dataset.json``; ``ome_arrow``'s
    ``OMEArrowDataset`` and :func:`dask_loom.open_ome_arrow` read it.

    Parameters
    ----------
    images
        One image (numpy, dask, array-like, OME-Arrow record or tensor view),
        a sequence of them, or a mapping ``image_id -> image``.
    layout, access_pattern, target_chunk_mb, chunk_shape
        Chunking, see :func:`choose_chunking`.
    pixel_dtype, clamp
        Store pixels as *pixel_dtype* (default: the image dtype, exact);
        with ``clamp=False`` values outside its range raise instead of clipping.

    Returns
    -------
    dict
        ``layout``, ``chunk_shape`` (of the first image), ``image_ids``, ``chunk_count``.

    Examples
    --------
    >>> import numpy as np, tempfile, os, dask_loom
    >>> d = os.path.join(tempfile.mkdtemp(), "ds")
    >>> a = np.random.default_rng(0).random((1, 2, 3, 40, 50)).astype("float32")
    >>> info = dask_loom.write_ome_arrow_dataset({"cells": a}, d, chunk_shape=(1, 1, 2, 16, 16))
    >>> info["chunk_count"]
    48
    >>> v = dask_loom.open_ome_arrow(d, c=1, z=2, roi=(10, 5, 20, 8))
    >>> bool((v.to_numpy()[0] == a[0, 1, 2, 5:13, 10:30]).all())
    True
    >>> import shutil; shutil.rmtree(os.path.dirname(d))
    """
    if chunk_rows_per_row_group <= 0:
        raise SelectionError(f"chunk_rows_per_row_group must be > 0, got {chunk_rows_per_row_group}")
    out = os.fspath(output_path)
    check_scheme(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out}: exists; pass overwrite=True to replace it")
    entries = _dataset_images(images)
    if not entries:
        raise SelectionError("images must hold at least one image")
    if image_ids is not None:
        if len(image_ids) != len(entries):
            raise SelectionError(f"{len(image_ids)} image_ids for {len(entries)} images")
        entries = [(str(i), v) for i, (_, v) in zip(image_ids, entries)]
    target_dtype = None if pixel_dtype is None else _pixel_dtype(pixel_dtype, what="pixel_dtype")
    from dask_loom.blocks import store
    from dask_loom.ome._target import OMEDatasetTarget, _Dataset

    dataset = _Dataset(
        out,
        compression=compression,
        chunk_rows_per_row_group=chunk_rows_per_row_group,
        build_physical_index=build_physical_index,
    )
    seen: set[str] = set()
    with dataset.writing():
        for k, (given_id, image) in enumerate(entries):
            img = _prepare(
                image,
                dim_order,
                _overrides(
                    channel_names=channel_names,
                    physical_size_x=physical_size_x,
                    physical_size_y=physical_size_y,
                    physical_size_z=physical_size_z,
                    physical_size_unit=physical_size_unit,
                ),
            )
            dtype = target_dtype or img.dtype
            iid = str(given_id or img.meta.get("image_id") or f"image-{k:05d}")
            if iid in seen:
                raise SelectionError(f"duplicate image_id {iid!r} in one dataset")
            seen.add(iid)
            choice = choose_chunking(
                img.shape,
                dtype,
                layout=layout,
                access_pattern=access_pattern,
                target_chunk_mb=target_chunk_mb,
                chunk_shape=chunk_shape,
            )
            dataset.first_choice = dataset.first_choice or choice
            target = OMEDatasetTarget(
                out,
                img.shape,
                dtype,
                chunk_shape=choice["chunk_shape"],
                image_id=iid,
                source_dtype=img.dtype,
                clamp=clamp,
                meta=img.meta,
                layout=choice["layout"],
                dataset=dataset,
            )
            store(_write_input(img, target.chunk_shape), target, scheduler=scheduler, client=client)
    first_choice = dataset.first_choice
    image_rows = dataset.image_rows
    chunk_id = dataset.chunk_id
    return {
        "layout": (first_choice or {}).get("layout"),
        "chunk_shape": (first_choice or {}).get("chunk_shape"),
        "image_ids": [r["image_id"] for r in image_rows],
        "chunk_count": chunk_id,
    }
