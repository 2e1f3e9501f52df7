"""``TensorView`` and ``LazyTensorView``: ome-arrow's tensor views over chunk-aware reads.

Same constructor arguments, properties and methods as ``ome_arrow.tensor``
(the seed API), with these differences, all deliberate:

* reads decode only the stored units (chunks, or planes) a selection
  touches, instead of rebuilding whole planes per (t, z, c);
* ``prefetch`` in ``iter_dlpack``/``iter_tiles_3d`` reads ahead on a
  background thread pool;
* ``LazyTensorView.layout`` is normalised like ``TensorView.layout``
  (``"ZCYX"`` -> ``"ZCHW"``): one layout naming for both;
* a layout that drops a non-singleton axis raises when the view is built
  (``TensorView``) or collected (``LazyTensorView``), not on first use;
* ``to_dask()`` gives the view as a dask array whose blocks are the stored
  chunks (task prefix ``ome-read``), selection and layout applied lazily.

``LazyTensorView`` lives in ``_lazy``; selections in ``_selection``, DLPack
export in ``_dlpack``, the chunk source in ``_chunksource``.
"""

from __future__ import annotations

import random
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from dask_loom.errors import SelectionError
from dask_loom.ome._chunksource import OMEChunkSource, _as_slice, _shared_source_array
from dask_loom.ome._dlpack import _device, _export, _jax_numpy, _mode, _prefetched, _torch
from dask_loom.ome._read import (
    LoaderImage,
    RecordImage,
    _Image,
    open_image,
    read_tzchw,
    record_from_data,
)
from dask_loom.ome._record import meta_of_row
from dask_loom.ome._schema import pixel_dtype
from dask_loom.ome._selection import (
    _TZCHW,
    Index,
    _check_policy,
    _drops,
    _normalize_selection,
    normalize_layout,
)

__all__ = ["OMEChunkSource", "TensorView", "normalize_layout"]


# --------------------------------------------------------------------------- TensorView


class TensorView:
    """View OME-Arrow pixel data as a tensor-like object.

    Parameters
    ----------
    data
        An OME-Arrow record: dict, ``StructScalar``, 1-row ``StructArray`` or
        ``ChunkedArray`` (or an image opened by :func:`dask_loom.open_ome_arrow`).
    plane_loader
        Optional ``plane_loader(t, z, c) -> (Y, X) array`` used instead of the
        record's pixels.
    t, z, c
        Index selection: int, slice, sequence of ints, or ``None`` (all);
        negative indices count from the end.
    roi
        ``(x, y, w, h)`` spatial crop.
    roi3d
        ``(x, y, z, w, h, d)``: ``roi`` plus ``z=slice(z, z + d)``.
    roi_nd, roi_type
        Min/max bounds: ``"2d"`` ``(ymin, xmin, ymax, xmax)``, ``"2d_timelapse"``
        ``(tmin, ymin, xmin, tmax, ymax, xmax)``, ``"3d"`` ``(zmin, ymin, xmin,
        zmax, ymax, xmax)``, ``"4d"`` ``(tmin, zmin, ymin, xmin, tmax, zmax, ymax, xmax)``.
    tile
        ``(tile_y, tile_x)``: the ROI of one cell of the record's chunk grid.
    layout
        Output axis order with TZCYX letters (TZCHW accepted); default
        ``"CHW"`` for one t and one z, else ``"TZCHW"``.
    dtype
        Output dtype (default: ``pixels_meta.type``).
    chunk_policy
        ``ChunkedArray`` inputs: ``"auto"``, ``"combine"`` or ``"keep"``.
    channel_policy
        ``"error"`` (default) or ``"first"`` (keep the first selected channel
        when the layout drops C).

    Examples
    --------
    >>> import numpy as np, dask_loom
    >>> rec = dask_loom.to_ome_arrow(np.arange(2 * 3 * 4 * 5, dtype="uint16").reshape(2, 3, 1, 4, 5))
    >>> tv = dask_loom.TensorView(rec, t=1, roi=(1, 1, 3, 2), layout="CYX")
    >>> tv.layout, tv.shape
    ('CHW', (3, 2, 3))
    >>> tv.to_numpy()[0]
    array([[66, 67, 68],
           [71, 72, 73]], dtype=uint16)
    """

    def __init__(
        self,
        data: Any,
        *,
        plane_loader: Callable[[int, int, int], np.ndarray] | None = None,
        t: Index = None,
        z: Index = None,
        c: Index = None,
        roi: tuple[int, int, int, int] | None = None,
        roi3d: tuple[int, int, int, int, int, int] | None = None,
        roi_nd: tuple[int, ...] | None = None,
        roi_type: Literal["2d", "2d_timelapse", "3d", "4d"] | None = None,
        tile: tuple[int, int] | None = None,
        layout: str | None = None,
        dtype: Any = None,
        chunk_policy: Literal["auto", "combine", "keep"] = "auto",
        channel_policy: Literal["error", "first"] = "error",
    ) -> None:
        self._chunk_policy = _check_policy(chunk_policy, ("auto", "combine", "keep"), "chunk_policy")
        self._channel_policy = _check_policy(channel_policy, ("error", "first"), "channel_policy")
        if plane_loader is not None:
            if isinstance(data, _Image):
                meta, label = data.meta, data.label
            else:
                row = record_from_data(data, chunk_policy=self._chunk_policy)
                meta, label = meta_of_row(row, "OME-Arrow record"), "OME-Arrow record"
            image: _Image = LoaderImage(meta, plane_loader, label=label)
        else:
            image = open_image(data, chunk_policy=self._chunk_policy)
        self._image = image
        self._data = data
        self._plane_loader = plane_loader
        meta = image.meta
        self._dtype = image.stored_dtype() if dtype is None else pixel_dtype(dtype, what="dtype")
        self._sel = _normalize_selection(
            meta, t=t, z=z, c=c, roi=roi, roi3d=roi3d, roi_nd=roi_nd, roi_type=roi_type, tile=tile
        )
        self._layout_override = normalize_layout(layout)
        _drops(self.layout, self._dims(), self._channel_policy)
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()

    # -- helpers --------------------------------------------------------------------

    def _dims(self) -> dict[str, int]:
        s = self._sel
        return {"T": len(s.t), "Z": len(s.z), "C": len(s.c), "H": s.roi[3], "W": s.roi[2]}

    def _child(self, **sel: Any) -> TensorView:
        kw: dict[str, Any] = {"t": list(self._sel.t), "z": list(self._sel.z), "c": list(self._sel.c), "roi": self._sel.roi}
        kw.update(sel)
        kw.setdefault("layout", self.layout)
        return TensorView(
            self._image,
            dtype=self._dtype,
            chunk_policy=self._chunk_policy,
            channel_policy=self._channel_policy,
            **kw,
        )

    @property
    def image(self) -> Any:
        """The image behind the view (metadata in ``.meta``)."""
        return self._image

    @property
    def meta(self) -> Any:
        """Image metadata: sizes, ``channel_names``, ``physical_size``, ``chunk_grid`` ..."""
        return self._image.meta

    def info(self) -> dict[str, Any]:
        """Shape (TCZYX), dtype, channel names, physical sizes and chunking of the image."""
        m = self._image.meta
        return {
            "shape": m.shape,
            "dtype": str(self._image.stored_dtype()),
            "channels": m.channel_names,
            "physical_size": dict(m.physical_size),
            "chunk_shape": self._image.index().grid,
            "source": self._image.label,
        }

    # -- properties -----------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype:
        """The tensor dtype."""
        return self._dtype

    @property
    def device(self) -> str:
        """The storage device of the view (always ``"cpu"``)."""
        return "cpu"

    @property
    def layout(self) -> str:
        """The effective layout (H/W letters)."""
        if self._layout_override:
            return self._layout_override
        if len(self._sel.t) == 1 and len(self._sel.z) == 1:
            return "CHW"
        return _TZCHW

    def _shape_strides(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        dims = self._dims()
        shape = [dims[d] for d in _TZCHW]
        if "C" not in self.layout and self._channel_policy == "first":
            shape[2] = 1  # only the first channel is read, so the buffer holds one
        strides = [0] * 5
        stride = self._dtype.itemsize
        for axis in range(4, -1, -1):
            strides[axis] = stride
            stride *= shape[axis]
        pos = {d: i for i, d in enumerate(_TZCHW)}
        return tuple(shape[pos[d]] for d in self.layout), tuple(strides[pos[d]] for d in self.layout)

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor shape in the current layout (no pixels read)."""
        return self._shape_strides()[0]

    @property
    def strides(self) -> tuple[int, ...]:
        """Byte strides of the C-contiguous TZCHW buffer, permuted to the layout."""
        return self._shape_strides()[1]

    # -- new views ------------------------------------------------------------------

    def with_layout(self, layout: str) -> TensorView:
        """A new view with a layout override."""
        return self._child(layout=layout)

    def select(
        self,
        *,
        t: Index = None,
        z: Index = None,
        c: Index = None,
        roi: tuple[int, int, int, int] | None = None,
        roi3d: tuple[int, int, int, int, int, int] | None = None,
        roi_nd: tuple[int, ...] | None = None,
        roi_type: str | None = None,
        tile: tuple[int, int] | None = None,
        layout: str | None = None,
    ) -> TensorView:
        """A new view of the whole image with this selection (indices refer to the image)."""
        return TensorView(
            self._image,
            t=t,
            z=z,
            c=c,
            roi=roi,
            roi3d=roi3d,
            roi_nd=roi_nd,
            roi_type=roi_type,
            tile=tile,
            layout=layout if layout is not None else self._layout_override,
            dtype=self._dtype,
            chunk_policy=self._chunk_policy,
            channel_policy=self._channel_policy,
        )

    def collect(self) -> TensorView:
        """The view itself (a ``TensorView`` is already concrete)."""
        return self

    # -- reads ----------------------------------------------------------------------

    def _channels(self) -> tuple[int, ...]:
        if "C" not in self.layout and self._channel_policy == "first":
            return self._sel.c[:1]
        return self._sel.c

    def _materialize(self) -> np.ndarray:
        if self._array is None:
            with self._lock:
                if self._array is None:
                    s = self._sel
                    base = read_tzchw(self._image, s.t, s.z, self._channels(), s.roi, self._dtype)
                    layout = self.layout
                    for d in reversed(_TZCHW):
                        if d not in layout:
                            base = base.squeeze(axis=_TZCHW.index(d))
                    current = [d for d in _TZCHW if d in layout]
                    self._array = base.transpose([current.index(d) for d in layout])
        return self._array

    def to_numpy(self, *, contiguous: bool = False) -> np.ndarray:
        """The view as a numpy array in its layout (reads only the chunks it touches)."""
        arr = self._materialize()
        return np.ascontiguousarray(arr) if contiguous else arr

    def _arrow_values(self) -> pa.Array:
        s = self._sel
        if len(s.t) != 1 or len(s.z) != 1 or len(s.c) != 1:
            raise SelectionError("mode='arrow' requires a single (t, z, c) selection.")
        index = self._image.index()
        x, y, w, h = s.roi
        ids = index.touching(np.array(s.t), np.array(s.c), np.array(s.z), (y, y + h), (x, x + w))
        if len(ids) != 1:
            raise SelectionError(
                f"mode='arrow' requires the ROI to match one stored unit; it touches {len(ids)}: use mode='numpy'"
            )
        uid = int(ids[0])
        start, size = index.start[uid], index.size[uid]
        if index.kind in ("loader",):
            raise SelectionError("mode='arrow' needs Arrow-held pixels; a plane_loader view has none: use mode='numpy'")
        if tuple(size[:3]) != (1, 1, 1):
            raise SelectionError(
                f"mode='arrow' requires shape_z == 1 for chunked selections (the chunk holds {int(size[2])} z planes): "
                "use mode='numpy'"
            )
        if (int(start[4]), int(start[3]), int(size[4]), int(size[3])) != (x, y, w, h):
            what = "a full-frame ROI" if index.kind == "planes" else "the ROI to match chunk size"
            raise SelectionError(f"mode='arrow' requires {what}; use mode='numpy' for crops.")
        return self._image.arrow_values(uid, self._dtype)

    def _export_source(self, mode: str, contiguous: bool) -> Any:
        return self._arrow_values() if mode == "arrow" else self.to_numpy(contiguous=contiguous)

    def to_dlpack(self, *, device: str = "cpu", contiguous: bool = True, mode: str = "arrow") -> Any:
        """Export as a single-use DLPack object.

        ``mode="arrow"``: the stored values of one (t, z, c) unit, 1-D and
        zero-copy (the ROI must be exactly one stored plane or one chunk with
        ``shape_z == 1``; uncompressed byte chunks qualify too).
        ``mode="numpy"``: the view's tensor in its layout.
        """
        device = _device(device)
        mode = _mode(mode)
        if device == "cuda" and mode == "arrow":
            raise SelectionError("mode='arrow' does not support device='cuda'.")
        return _export(self._export_source(mode, contiguous), device)

    def to_torch(self, *, device: str = "cpu", contiguous: bool = True, mode: str = "arrow") -> Any:
        """A ``torch.Tensor`` through DLPack (needs the ``torch`` extra)."""
        torch = _torch()
        return torch.from_dlpack(self.to_dlpack(device=device, contiguous=contiguous, mode=mode))

    def to_jax(self, *, device: str = "cpu", contiguous: bool = True, mode: str = "arrow") -> Any:
        """A JAX array through DLPack (needs the ``jax`` extra)."""
        jnp = _jax_numpy()
        return jnp.from_dlpack(self.to_dlpack(device=device, contiguous=contiguous, mode=mode))

    def iter_dlpack(
        self,
        *,
        batch_size: int | None = None,
        tile_size: tuple[int, int] | None = None,
        tiles: tuple[int, int] | None = None,
        shuffle: bool = False,
        seed: int | None = None,
        prefetch: int = 0,
        device: str = "cpu",
        contiguous: bool = True,
        mode: str = "arrow",
    ) -> Iterator[Any]:
        """DLPack objects per batch of T indices, or per 2-D tile with ``tile_size=(h, w)``.

        ``shuffle`` with ``seed`` gives the same order as ome-arrow;
        ``prefetch=k`` reads the next *k* items on background threads while
        the caller works on the current one.
        """
        if prefetch < 0:
            raise SelectionError(f"prefetch must be >= 0, got {prefetch}")
        device, mode = _device(device), _mode(mode)
        if tiles is not None:
            if tile_size is not None:
                raise SelectionError("give only one of tile_size or tiles")
            warnings.warn("iter_dlpack(tiles=...) is deprecated; use tile_size=...", DeprecationWarning, stacklevel=2)
            tile_size = tiles
        if tile_size is not None:
            th, tw = (int(v) for v in tile_size)
            if th <= 0 or tw <= 0:
                raise SelectionError(f"tile_size {tuple(tile_size)} must be positive")
            x0, y0, w0, h0 = self._sel.roi
            items = [
                {"roi": (x, y, min(tw, x0 + w0 - x), min(th, y0 + h0 - y))}
                for y in range(y0, y0 + h0, th)
                for x in range(x0, x0 + w0, tw)
            ]
            if shuffle:
                random.Random(seed).shuffle(items)
        else:
            t_idx = list(self._sel.t)
            if batch_size is None:
                batch_size = len(t_idx)
            if batch_size <= 0:
                raise SelectionError(f"batch_size must be > 0, got {batch_size}")
            if shuffle:
                random.Random(seed).shuffle(t_idx)
            items = [{"t": t_idx[i : i + batch_size]} for i in range(0, len(t_idx), batch_size)]
        yield from self._iterate(items, prefetch, device, contiguous, mode)

    def iter_tiles_3d(
        self,
        *,
        tile_size: tuple[int, int, int],
        shuffle: bool = False,
        seed: int | None = None,
        prefetch: int = 0,
        device: str = "cpu",
        contiguous: bool = True,
        mode: str = "numpy",
    ) -> Iterator[Any]:
        """DLPack objects per (t, z-batch, y tile, x tile) with ``tile_size=(tz, th, tw)``."""
        if _mode(mode) != "numpy":
            raise SelectionError("iter_tiles_3d supports only mode='numpy'.")
        if prefetch < 0:
            raise SelectionError(f"prefetch must be >= 0, got {prefetch}")
        tz, th, tw = (int(v) for v in tile_size)
        if tz <= 0 or th <= 0 or tw <= 0:
            raise SelectionError(f"tile_size {tuple(tile_size)} entries must be positive")
        device = _device(device)
        x0, y0, w0, h0 = self._sel.roi
        zs = list(self._sel.z)
        items = [
            {"t": [t], "z": zs[i : i + tz], "roi": (x, y, min(tw, x0 + w0 - x), min(th, y0 + h0 - y))}
            for t in self._sel.t
            for i in range(0, len(zs), tz)
            for y in range(y0, y0 + h0, th)
            for x in range(x0, x0 + w0, tw)
        ]
        if shuffle:
            random.Random(seed).shuffle(items)
        yield from self._iterate(items, prefetch, device, contiguous, "numpy")

    def _iterate(self, items: list[dict[str, Any]], prefetch: int, device: str, contiguous: bool, mode: str) -> Iterator[Any]:
        def thunk(sel: dict[str, Any]) -> Callable[[], Any]:
            return lambda: self._child(**sel)._export_source(mode, contiguous)

        for obj in _prefetched([thunk(s) for s in items], prefetch):
            yield _export(obj, device)

    # -- dask -----------------------------------------------------------------------

    def to_dask(self, *, chunks: Any = None) -> Any:
        """The view as a dask array in its layout; blocks are the stored chunks.

        Parameters
        ----------
        chunks
            ``None`` (default): one block per stored chunk (per plane when the
            record has no chunks).  ``"auto"``: blocks of whole chunks sized
            to ``dask_loom.block-size``.  Anything else: dask chunks in TZCYX
            order over the whole image, rounded out to stored chunks.

        Examples
        --------
        >>> import numpy as np, dask_loom
        >>> a = np.arange(2 * 3 * 4 * 8 * 8, dtype="uint16").reshape(2, 3, 4, 8, 8)
        >>> tv = dask_loom.TensorView(dask_loom.to_ome_arrow(a, chunk_shape=(2, 4, 4)), c=1)
        >>> d = tv.to_dask()
        >>> d.shape, d.chunksize, d.name.startswith("getitem") or "ome-read" in str(d.dask.keys())
        ((2, 4, 1, 8, 8), (1, 2, 1, 4, 4), True)
        >>> bool((d.compute() == a[:, 1:2].transpose(0, 2, 1, 3, 4)).all())
        True
        """
        from dask_loom.blocks import align_chunks, from_source, plan_blocks

        source = OMEChunkSource(self._image, self._dtype)
        if isinstance(self._image, RecordImage):
            # An in-memory record is the data itself: keep it one graph key that
            # each worker receives once, instead of a copy inside every task.
            if chunks is None:
                plan = align_chunks(source.chunk_shape, source.shape, source.chunk_shape, self._dtype)
            elif isinstance(chunks, str) and chunks == "auto":
                plan = plan_blocks(source.shape, source.chunk_shape, self._dtype.itemsize)
            else:
                plan = align_chunks(chunks, source.shape, source.chunk_shape, self._dtype, what=source.label)
            arr = _shared_source_array(source, plan)
        elif chunks is None:
            arr = from_source(source, chunks=source.chunk_shape)
        elif isinstance(chunks, str) and chunks == "auto":
            arr = from_source(source)
        else:
            arr = from_source(source, chunks=chunks)
        s = self._sel
        m = self._image.meta
        x, y, w, h = s.roi
        c = self._channels()
        key: list[Any] = [_as_slice(s.t, m.size_t), _as_slice(s.z, m.size_z), _as_slice(c, m.size_c)]
        # One fancy axis at a time: dask (like numpy) would otherwise pair the lists up.
        for axis in range(3):
            if isinstance(key[axis], list):
                idx: list[Any] = [slice(None)] * 5
                idx[axis] = key[axis]
                arr = arr[tuple(idx)]
                key[axis] = slice(None)
        arr = arr[(*key, slice(y, y + h), slice(x, x + w))]
        layout = self.layout
        drop = tuple(i for i, d in enumerate(_TZCHW) if d not in layout)
        if drop:
            arr = arr.squeeze(axis=drop)
        current = [d for d in _TZCHW if d in layout]
        order = [current.index(d) for d in layout]
        return arr.transpose(order) if order != sorted(order) else arr

    def __dask_loom_source__(self, layer: str | None = None) -> Any:
        """The view as ``dask_loom.map``/``aggregate``/``scan`` read it (format ``ome``).

        A view of the whole image of a file reads the stored chunks directly
        (its layout is an axis order of the TZCYX source); a selection, or an
        in-memory record, goes through :meth:`to_dask`.
        """
        from dask_loom.errors import OperationError
        from dask_loom.ops._sources import SourceInfo

        if layer is not None:
            raise OperationError(f"{self._image.label}: layer={layer!r} does not apply to an image")
        s, m = self._sel, self._image.meta
        whole = (
            s.t == tuple(range(m.size_t))
            and s.z == tuple(range(m.size_z))
            and self._channels() == tuple(range(m.size_c))
            and tuple(s.roi) == (0, 0, m.size_x, m.size_y)
        )
        read_only = "an OME-Arrow image view is read-only"
        if whole and not isinstance(self._image, RecordImage):
            axes = tuple(_TZCHW.index(d) for d in self.layout)
            source = OMEChunkSource(self._image, self._dtype)
            return SourceInfo.from_source(source, format="ome", label=self._image.label, axes=axes, read_only=read_only)
        return SourceInfo.from_array(self.to_dask(), format="ome", label=self._image.label, read_only=read_only)

    def to_xarray(self, *, chunks: Any = None, name: str | None = None) -> Any:
        """The view as a lazy ``xarray.DataArray`` over :meth:`to_dask`: dims in layout order
        (``t z c y x``), channel names and physical positions (``physical_size * index``) as coordinates."""
        from dask_loom._doors import converter

        return converter("tensor", "xarray")(self, chunks=chunks, name=name)

    def __dask_tokenize__(self) -> Any:
        return ("TensorView", self._image.token(), self._sel, self.layout, self._dtype.str, self._channel_policy)

    def __repr__(self) -> str:
        return f"TensorView(shape={self.shape}, dtype={self.dtype}, layout={self.layout!r}, source={self._image.label!r})"


