"""Writing OME-Arrow: records, single-record OME-Parquet files and typed chunk datasets.

Pixels stream block by block: a dask (or any sliceable) array is computed a
few whole-chunk blocks at a time, each block is cut into chunks and encoded,
and nothing holds the whole image except the output itself.

* :func:`to_ome_arrow` returns the record (a ``StructScalar``) built in one
  pre-sized buffer.
* :func:`to_ome_parquet` writes the single-row, single-column file ome-arrow
  reads.  A Parquet row cannot be split across row groups, so the record's
  pixel payloads are first spilled to a temporary file next to the output
  and handed to the Parquet writer as a memory map (pages already written
  are released as it goes): peak memory stays at a few blocks, not the image.
* :func:`write_ome_arrow_dataset` writes the typed chunk dataset through
  :func:`dask_loom.store`: each image is an :class:`~dask_loom.ome.OMEDatasetTarget`
  whose tasks cut and cast chunks and whose single writer appends them to a
  ``ParquetWriter``, one chunk per row group, so readers fetch single chunks.

Pixel data is stored dtype-exact: uint16 as ome-arrow's numeric chunk lists,
every other dtype as typed byte chunks (``OME_ARROW_BYTE_STRUCT``), never
truncated to uint16.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import mmap
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dask_loom._config import block_size_bytes
from dask_loom.errors import OMEArrowError, SelectionError, UnsupportedDtypeError
from dask_loom.ome._schema import (
    OME_ARROW_BYTE_STRUCT,
    OME_ARROW_STRUCT,
    OME_ARROW_TYPE,
    OME_ARROW_VERSION,
    choose_chunk_shape,
    default_channels,
)
from dask_loom.ome._schema import channel_record as _channel
from dask_loom.ome._schema import pixel_dtype as _pixel_dtype
from dask_loom.ome._target import WRITE_BLOCK_BYTES
from dask_loom.storage._urls import check_scheme

__all__ = ["WithMeta", "to_ome_arrow", "to_ome_parquet"]

_DIM_DEFAULTS = {2: "YX", 3: "ZYX", 4: "TCYX", 5: "TCZYX"}


# --------------------------------------------------------------------------- inputs


class _Image5:
    """An input image as a lazily sliceable TCZYX array plus its metadata."""

    def __init__(self, array: Any, meta: dict[str, Any]) -> None:
        self.array = array
        self.meta = meta
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = _pixel_dtype(array.dtype, what="array dtype")


class WithMeta:
    """A TCZYX array plus OME metadata (name, channels, physical sizes), as converters hand it over."""

    def __init__(self, array: Any, meta: dict[str, Any]) -> None:
        self.array = array
        self.meta = dict(meta)
        self.shape = tuple(array.shape)
        self.dtype = array.dtype


def _is_dask(a: Any) -> bool:
    return hasattr(a, "dask") and hasattr(a, "chunks") and hasattr(a, "blocks")


def _to_tczyx(array: Any, dim_order: str | None) -> Any:
    ndim = len(array.shape)
    dims = (dim_order or _DIM_DEFAULTS.get(ndim, "")).upper()
    if not dims:
        raise SelectionError(f"cannot infer dim_order for a {ndim}-D array: give dim_order (letters from TCZYX)")
    if len(dims) != ndim or len(set(dims)) != ndim or set(dims) - set("TCZYX") or not {"Y", "X"} <= set(dims):
        raise SelectionError(
            f"dim_order {dim_order!r} does not describe a {ndim}-D array: one distinct letter per axis from "
            "TCZYX, Y and X included"
        )
    if _is_dask(array) or isinstance(array, np.ndarray):
        a = array
        missing = [d for d in "TCZYX" if d not in dims]
        for _ in missing:
            a = a[..., None]
        order = list(dims) + missing
        return a.transpose([order.index(d) for d in "TCZYX"])
    if dims == "TCZYX":
        return array
    return _to_tczyx(np.asarray(array), dim_order)  # array-likes that cannot transpose lazily


def _from_view(obj: Any) -> tuple[Any, dict[str, Any]] | None:
    """(dask TCZYX array, metadata) for OME-Arrow records and tensor views, else None."""
    from dask_loom.ome._lazy import LazyTensorView
    from dask_loom.ome._read import RecordImage, _Image, open_image
    from dask_loom.ome._views import TensorView

    if isinstance(obj, LazyTensorView):
        obj = obj.collect()
    if isinstance(obj, TensorView):
        img = obj.image
        arr = obj.to_dask()
        layout = obj.layout
        dims = "".join({"H": "Y", "W": "X"}.get(d, d) for d in layout)
        arr = _to_tczyx(arr, dims)
        return arr, _meta_of(img)
    if isinstance(obj, (dict, pa.StructScalar, pa.StructArray, pa.ChunkedArray, _Image)):
        img = obj if isinstance(obj, _Image) else open_image(obj)
        view = TensorView(img, layout="TZCYX")
        arr = view.to_dask().transpose(0, 2, 1, 3, 4)
        assert isinstance(img, (RecordImage, _Image))
        return arr, _meta_of(img)
    return None


def _meta_of(img: Any) -> dict[str, Any]:
    m = img.meta
    out: dict[str, Any] = {
        "image_id": m.image_id,
        "name": m.name,
        "image_type": m.image_type,
        "channels": [dict(ch) for ch in m.channels] or None,
    }
    for ax in "xyz":
        v = m.physical_size.get(f"physical_size_{ax}")
        if v is not None:
            out[f"physical_size_{ax}"] = float(v)
        u = m.physical_size.get(f"physical_size_{ax}_unit")
        if u is not None:
            out[f"physical_size_{ax}_unit"] = str(u)
    return out


def _prepare(array: Any, dim_order: str | None, overrides: dict[str, Any]) -> _Image5:
    got = (array.array, {k: v for k, v in array.meta.items() if v is not None}) if isinstance(array, WithMeta) else _from_view(array)
    if got is not None:
        arr, meta = got
    else:
        if not hasattr(array, "shape") or not hasattr(array, "dtype"):
            array = np.asarray(array)
        arr, meta = _to_tczyx(array, dim_order), {}
    for k, v in overrides.items():
        if v is not None:
            meta[k] = v
    return _Image5(arr, meta)


def _normalize_chunk(chunk_shape: Sequence[int] | None, shape: tuple[int, ...], dtype: np.dtype, *, record: bool) -> tuple[int, ...]:
    if chunk_shape is None:
        chunk = choose_chunk_shape(shape, dtype)
    else:
        cs = tuple(int(v) for v in chunk_shape)
        if len(cs) == 3:
            cs = (1, 1, *cs)
        if len(cs) != 5 or any(v <= 0 for v in cs):
            raise SelectionError(f"chunk_shape {tuple(chunk_shape)} must be 3 (ZYX) or 5 (TCZYX) positive ints")
        if record and (cs[0] != 1 or cs[1] != 1):
            raise SelectionError(f"chunk_shape {tuple(chunk_shape)}: OME-Arrow record chunks hold one (t, c); give (Z, Y, X)")
        chunk = cs
    return tuple(max(1, min(c, s)) for c, s in zip(chunk, shape))


# --------------------------------------------------------------------------- streaming


def _aligned(chunks: tuple[tuple[int, ...], ...], unit: tuple[int, ...], limit: int, itemsize: int) -> bool:
    """True when every dask block is a union of whole *unit* chunks and at most *limit* bytes."""
    for sizes, u in zip(chunks, unit):
        if np.any(np.cumsum(sizes)[:-1] % u):
            return False
    return math.prod(max(c) for c in chunks) * itemsize <= limit


def _write_input(img: _Image5, chunk: tuple[int, ...]) -> Any:
    """The image as written: a dask input is rechunked to blocks of whole chunks first (silently,
    since its blocks usually come from a view of another image), anything else as it is."""
    from dask_loom.blocks import plan_blocks

    target = min(block_size_bytes(), WRITE_BLOCK_BYTES)
    arr = img.array
    if _is_dask(arr) and not _aligned(arr.chunks, chunk, 2 * target, img.dtype.itemsize):
        arr = arr.rechunk(plan_blocks(img.shape, chunk, img.dtype.itemsize, target_bytes=target))
    return arr


def _iter_blocks(img: _Image5, chunk: tuple[int, ...], *, scheduler: Any, client: Any) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """(origin, block) for blocks made of whole chunks, computed under :func:`dask_loom.store`'s batching."""
    from dask_loom.blocks import block_regions, plan_blocks
    from dask_loom.blocks._store import computed_in_batches

    arr = _write_input(img, chunk)
    if _is_dask(arr):
        regions = block_regions(arr.chunks)
        values = computed_in_batches((arr.blocks[idx] for idx, _ in regions), scheduler=scheduler, client=client)
        for (_, region), v in zip(regions, values):
            yield tuple(r.start for r in region), np.asarray(v)
    else:
        target = min(block_size_bytes(), WRITE_BLOCK_BYTES)
        for _, region in block_regions(plan_blocks(img.shape, chunk, img.dtype.itemsize, target_bytes=target)):
            yield tuple(r.start for r in region), np.asarray(arr[region])


def _iter_chunks(img: _Image5, chunk: tuple[int, ...], *, scheduler: Any, client: Any) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    for origin, block in _iter_blocks(img, chunk, scheduler=scheduler, client=client):
        if block.dtype != img.dtype:
            block = block.astype(img.dtype.newbyteorder("="))
        elif not block.dtype.isnative:
            block = block.astype(block.dtype.newbyteorder("="))
        for idx in np.ndindex(*[-(-b // c) for b, c in zip(block.shape, chunk)]):
            sl = tuple(slice(i * c, min((i + 1) * c, b)) for i, c, b in zip(idx, chunk, block.shape))
            start = tuple(o + s.start for o, s in zip(origin, sl))
            yield start, block[sl]


def _check_uint16(chunk: np.ndarray, start: tuple[int, ...], label: str) -> np.ndarray:
    if chunk.dtype == np.uint16:
        return chunk
    if not np.issubdtype(chunk.dtype, np.integer):
        raise UnsupportedDtypeError(
            f"{label}: {chunk.dtype} pixels cannot be stored exactly in uint16 chunk lists; use chunk_encoding='bytes'"
        )
    lo, hi = (int(chunk.min()), int(chunk.max())) if chunk.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise UnsupportedDtypeError(
            f"{label}: the chunk at TCZYX {start} holds {chunk.dtype} values {lo}..{hi} outside uint16 0..65535; "
            "uint16 chunk lists would wrap them. Use chunk_encoding='bytes' (dtype-exact)"
        )
    return chunk.astype(np.uint16)


# "auto" writes uint16 images up to this size as numeric lists (readable by every
# ome-arrow version); larger ones as byte chunks, since Parquet stores a list
# with one repetition level per pixel and reads and writes it ~10x slower.
LIST_MAX_BYTES = 64 << 20


class _Encoder:
    """Chunk payload encoding for one record: list (uint16) or typed bytes."""

    def __init__(
        self, dtype: np.dtype, encoding: str, compression: str | None, level: int | None, label: str, nbytes: int = 0
    ) -> None:
        enc = str(encoding).lower()
        if enc not in ("auto", "list", "bytes"):
            raise SelectionError(f"chunk_encoding {encoding!r} must be 'auto', 'list' or 'bytes'")
        comp = None if compression in (None, "", "none", "None") else str(compression).lower()
        if enc == "auto":
            enc = "list" if dtype == np.uint16 and comp is None and nbytes <= LIST_MAX_BYTES else "bytes"
        if enc == "list" and comp is not None:
            raise SelectionError("chunk_compression needs chunk_encoding='bytes' (list chunks are plain numbers)")
        if comp is not None and not pa.Codec.is_available(comp):
            raise SelectionError(f"chunk_compression {compression!r} is not a codec pyarrow provides")
        self.list = enc == "list"
        self.dtype = np.dtype("uint16") if self.list else dtype
        self.codec = pa.Codec(comp, compression_level=level) if comp else None
        self.compression = comp
        self.label = label

    def encode(self, chunk: np.ndarray, start: tuple[int, ...]) -> memoryview | bytes:
        if self.list:
            chunk = _check_uint16(chunk, start, self.label)
        data = np.ascontiguousarray(chunk)
        if self.codec is not None:
            return self.codec.compress(memoryview(data).cast("B"), asbytes=True)
        return memoryview(data).cast("B")


class _Columns:
    """Chunk coordinates collected while payloads stream to a sink."""

    def __init__(self) -> None:
        self.coords: list[tuple[int, ...]] = []
        self.lengths: list[int] = []

    def add(self, start: tuple[int, ...], shape: tuple[int, ...], nbytes: int) -> None:
        self.coords.append((*start, *shape))
        self.lengths.append(nbytes)

    def arrays(self) -> np.ndarray:
        return np.asarray(self.coords, dtype=np.int64).reshape(-1, 10)

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.asarray(self.lengths, dtype=np.int64))]).astype(np.int64)


def _record_arrays(
    img: _Image5,
    enc: _Encoder,
    cols: _Columns,
    data: pa.Buffer,
    chunk: tuple[int, ...],
    *,
    image_id: str | None,
    name: str | None,
    image_type: str | None,
    acquisition_datetime: _dt.datetime | None,
) -> pa.StructArray:
    """The 1-row OME-Arrow StructArray around already-encoded chunk payloads."""
    t, c, z, y, x = img.shape
    coords = cols.arrays()
    n = len(coords)
    offsets = cols.offsets()
    struct_type = OME_ARROW_STRUCT if enc.list else OME_ARROW_BYTE_STRUCT
    chunk_type = struct_type.field("chunks").type.value_type
    fields = [
        pa.array(coords[:, 0], pa.int32()),
        pa.array(coords[:, 1], pa.int16()),
        pa.array(coords[:, 2], pa.int32()),
        pa.array(coords[:, 3], pa.int32()),
        pa.array(coords[:, 4], pa.int32()),
        pa.array(coords[:, 7], pa.int32()),
        pa.array(coords[:, 8], pa.int32()),
        pa.array(coords[:, 9], pa.int32()),
    ]
    if enc.list:
        elems = offsets // 2
        if elems[-1] > np.iinfo(np.int32).max:
            raise UnsupportedDtypeError(
                f"{img.meta.get('name') or 'image'}: {elems[-1]} uint16 values exceed Arrow list offsets (2**31 - 1); "
                "use chunk_encoding='bytes'"
            )
        values = pa.Array.from_buffers(pa.uint16(), int(elems[-1]), [None, data])
        fields.append(pa.ListArray.from_arrays(pa.array(elems.astype(np.int32), pa.int32()), values))
    else:
        fields.append(pa.array([enc.dtype.name] * n, pa.string()))
        fields.append(pa.array([enc.compression] * n, pa.string()))
        fields.append(pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), data]))
    units = pa.StructArray.from_arrays(fields, fields=list(chunk_type))
    chunks = pa.ListArray.from_arrays(pa.array([0, n], pa.int32()), units, type=pa.list_(chunk_type))
    plane_type = struct_type.field("planes").type
    planes = pa.array([[]], type=plane_type)
    meta = img.meta
    channels = meta.get("channels") or default_channels(c, meta.get("channel_names"))
    if len(channels) != c:
        raise SelectionError(f"{len(channels)} channel records for {c} channels")
    unit = meta.get("physical_size_unit") or "µm"
    pm = {
        "dimension_order": "XYCT" if z == 1 else "XYZCT",
        "type": enc.dtype.name if not enc.list else img.dtype.name,
        "size_x": x,
        "size_y": y,
        "size_z": z,
        "size_c": c,
        "size_t": t,
        "physical_size_x": meta.get("physical_size_x", 1.0),
        "physical_size_y": meta.get("physical_size_y", 1.0),
        "physical_size_z": meta.get("physical_size_z", 1.0),
        "physical_size_x_unit": meta.get("physical_size_x_unit") or unit,
        "physical_size_y_unit": meta.get("physical_size_y_unit") or unit,
        "physical_size_z_unit": meta.get("physical_size_z_unit") or unit,
        "channels": [_channel(ch, i) for i, ch in enumerate(channels)],
    }
    grid = {
        "order": "TCZYX",
        "chunk_t": 1,
        "chunk_c": 1,
        "chunk_z": chunk[2],
        "chunk_y": chunk[3],
        "chunk_x": chunk[4],
        "chunk_order": "ZYX",
    }
    when = acquisition_datetime or meta.get("acquisition_datetime") or _dt.datetime.now(_dt.UTC)
    top = {
        "type": pa.array([OME_ARROW_TYPE]),
        "version": pa.array([OME_ARROW_VERSION]),
        "id": pa.array([str(image_id or meta.get("image_id") or "unnamed")]),
        "name": pa.array([str(name or meta.get("name") or "unknown")]),
        "image_type": pa.array([image_type or meta.get("image_type")], pa.string()),
        "acquisition_datetime": pa.array([when], pa.timestamp("us")),
        "pixels_meta": pa.array([pm], struct_type.field("pixels_meta").type),
        "chunk_grid": pa.array([grid], struct_type.field("chunk_grid").type),
        "chunks": chunks,
        "planes": planes,
        "masks": pa.nulls(1),
    }
    return pa.StructArray.from_arrays([top[f.name] for f in struct_type], fields=list(struct_type))


def _overrides(**kw: Any) -> dict[str, Any]:
    out = {k: v for k, v in kw.items() if v is not None}
    if "channel_names" in out:
        out["channel_names"] = [str(v) for v in out["channel_names"]]
    return out


# --------------------------------------------------------------------------- to_ome_arrow


def to_ome_arrow(
    array: Any,
    *,
    dim_order: str | None = None,
    image_id: str | None = None,
    name: str | None = None,
    image_type: str | None = "image",
    channel_names: Sequence[str] | None = None,
    channels: Sequence[Mapping[str, Any]] | None = None,
    acquisition_datetime: _dt.datetime | None = None,
    chunk_shape: Sequence[int] | None = None,
    chunk_encoding: str = "auto",
    chunk_compression: str | None = None,
    chunk_compression_level: int | None = None,
    physical_size_x: float | None = None,
    physical_size_y: float | None = None,
    physical_size_z: float | None = None,
    physical_size_unit: str | None = None,
    scheduler: Any = None,
    client: Any = None,
) -> pa.StructScalar:
    """An OME-Arrow record (``StructScalar``) from a numpy, dask or array-like image.

    Parameters
    ----------
    array
        The image; axes named by *dim_order* (default by rank: ``YX``,
        ``ZYX``, ``TCYX``, ``TCZYX``).  An OME-Arrow record or a tensor view
        is re-encoded keeping its metadata.
    chunk_shape
        ``(Z, Y, X)`` of a chunk (default: chosen for the data, see
        :func:`~dask_loom.ome._schema.choose_chunk_shape`).
    chunk_encoding
        ``"auto"`` (uint16 images up to 64 MiB as numeric lists, anything
        else as typed bytes),
        ``"list"`` (uint16 lists; refuses values uint16 cannot hold) or
        ``"bytes"``.
    chunk_compression, chunk_compression_level
        Per-chunk compression of byte chunks (any pyarrow codec: ``"zstd"``,
        ``"lz4"`` ...).

    Returns
    -------
    pyarrow.StructScalar
        Of type ``OME_ARROW_STRUCT`` or ``OME_ARROW_BYTE_STRUCT``; planes are
        not duplicated (only chunks carry pixels).

    Examples
    --------
    >>> import numpy as np, dask_loom
    >>> rec = dask_loom.to_ome_arrow(np.full((2, 3, 4), -1.5, "float32"), chunk_shape=(1, 2, 2))
    >>> rec["pixels_meta"]["type"].as_py(), len(rec["chunks"]), rec["chunks"][0]["dtype"].as_py()
    ('float32', 8, 'float32')
    """
    img = _prepare(
        array,
        dim_order,
        _overrides(channel_names=channel_names, channels=channels, physical_size_x=physical_size_x,
                   physical_size_y=physical_size_y, physical_size_z=physical_size_z,
                   physical_size_unit=physical_size_unit),
    )
    label = f"image {name or image_id or img.meta.get('name') or ''}".strip()
    chunk = _normalize_chunk(chunk_shape, img.shape, img.dtype, record=True)
    enc = _Encoder(
        img.dtype, chunk_encoding, chunk_compression, chunk_compression_level, label,
        math.prod(img.shape) * img.dtype.itemsize,
    )
    cols = _Columns()
    if enc.codec is None:
        # Sizes are known: fill one pre-sized buffer, no second copy of the image.
        total = math.prod(img.shape) * enc.dtype.itemsize
        out = np.empty(total, dtype=np.uint8)
        pos = 0
        for start, ch in _iter_chunks(img, chunk, scheduler=scheduler, client=client):
            payload = enc.encode(ch, start)
            n = len(payload)
            out[pos : pos + n] = np.frombuffer(payload, np.uint8)
            cols.add(start, ch.shape, n)
            pos += n
        data = pa.py_buffer(out)
    else:
        sink = pa.BufferOutputStream()
        for start, ch in _iter_chunks(img, chunk, scheduler=scheduler, client=client):
            payload = enc.encode(ch, start)
            sink.write(payload)
            cols.add(start, ch.shape, len(payload))
        data = sink.getvalue()
    row = _record_arrays(
        img, enc, cols, data, chunk, image_id=image_id, name=name, image_type=image_type,
        acquisition_datetime=acquisition_datetime,
    )
    return row[0]


# --------------------------------------------------------------------------- to_ome_parquet


class _Releaser:
    """Drops already-read pages of a read-only file map from this process's RSS.

    ``MADV_DONTNEED`` on a shared, clean file mapping only unmaps pages: the
    next access maps them again from the page cache, so readers never see a
    difference.  It keeps a large spilled record from counting as resident
    memory while the Parquet writer walks through it.
    """

    def __init__(self, mm: mmap.mmap, every: float = 0.05) -> None:
        self.mm = mm
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ome-page-release", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            with contextlib.suppress(Exception):
                self.mm.madvise(mmap.MADV_DONTNEED)

    def __enter__(self) -> _Releaser:
        if hasattr(mmap, "MADV_DONTNEED") and hasattr(self.mm, "madvise"):
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


# A Parquet page header stores the uncompressed page size as int32.
_PAGE_LIMIT = 2**31 - 1


def _tmp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{uuid.uuid4().hex[:8]}.tmp")


def to_ome_parquet(
    array: Any,
    path: str | os.PathLike[str],
    *,
    column_name: str = "image",
    dim_order: str | None = None,
    image_id: str | None = None,
    name: str | None = None,
    image_type: str | None = "image",
    channel_names: Sequence[str] | None = None,
    channels: Sequence[Mapping[str, Any]] | None = None,
    acquisition_datetime: _dt.datetime | None = None,
    chunk_shape: Sequence[int] | None = None,
    chunk_encoding: str = "auto",
    chunk_compression: str | None = None,
    chunk_compression_level: int | None = None,
    physical_size_x: float | None = None,
    physical_size_y: float | None = None,
    physical_size_z: float | None = None,
    physical_size_unit: str | None = None,
    compression: str | None = "zstd",
    file_metadata: Mapping[str, str] | None = None,
    scheduler: Any = None,
    client: Any = None,
) -> str:
    """Write an image as a single-record OME-Parquet file, streaming block by block.

    The file has one row and one struct column (*column_name*, ``"image"`` as
    ome-arrow writes it) with schema metadata ``ome.arrow.type`` and
    ``ome.arrow.version``; ``ome_arrow.OMEArrow(path)`` and
    :func:`dask_loom.open_ome_arrow` read it.  The file appears atomically
    (written under a temporary name, then renamed).  Options are those of
    :func:`to_ome_arrow`; *compression* is the Parquet page codec.

    The input is read block by block and its encoded chunks are spilled to a
    temporary file, never held twice.  The Parquet side cannot stream: one
    record is one Parquet row, a row never spans row groups, and pyarrow
    encodes a row's pixel column as a single data page.  So the writer needs
    about two (three, with page *compression*) times the stored pixels in
    memory, and the stored pixels must stay under 2 GiB (Parquet's page size
    limit; an error says so before anything is written).  Per-chunk
    compression (``chunk_compression="zstd"``, with ``compression=None``)
    shrinks both; for larger images, or bounded memory, write a typed chunk
    dataset with :func:`write_ome_arrow_dataset`, which streams.

    Returns
    -------
    str
        The path written.

    Examples
    --------
    >>> import numpy as np, tempfile, os, dask_loom
    >>> d = tempfile.mkdtemp()
    >>> a = np.arange(3 * 5 * 6, dtype="int16").reshape(3, 5, 6) - 40
    >>> p = dask_loom.to_ome_parquet(a, os.path.join(d, "img.ome.parquet"), dim_order="CYX")
    >>> bool((dask_loom.open_ome_arrow(p).to_numpy() == a).all())
    True
    >>> import shutil; shutil.rmtree(d)
    """
    path = os.fspath(path)
    check_scheme(path)
    img = _prepare(
        array,
        dim_order,
        _overrides(channel_names=channel_names, channels=channels, physical_size_x=physical_size_x,
                   physical_size_y=physical_size_y, physical_size_z=physical_size_z,
                   physical_size_unit=physical_size_unit),
    )
    label = f"{os.path.basename(path)}"
    chunk = _normalize_chunk(chunk_shape, img.shape, img.dtype, record=True)
    enc = _Encoder(
        img.dtype, chunk_encoding, chunk_compression, chunk_compression_level, label,
        math.prod(img.shape) * img.dtype.itemsize,
    )
    cols = _Columns()
    spill = _tmp_name(path) + ".pixels"
    out_tmp = _tmp_name(path)
    try:
        with open(spill, "wb", buffering=8 << 20) as f:
            for start, ch in _iter_chunks(img, chunk, scheduler=scheduler, client=client):
                payload = enc.encode(ch, start)
                f.write(payload)
                cols.add(start, ch.shape, len(payload))
        size = os.path.getsize(spill)
        page = size + 4 * len(cols.lengths) + 4096  # values, their length prefixes, RLE levels
        if page > _PAGE_LIMIT:
            raise OMEArrowError(
                f"{label}: the record's pixels take {size / 2**30:.2f} GiB, and a single-record OME-Parquet file "
                f"stores them in one Parquet data page, limited to 2 GiB. Write a typed chunk dataset "
                f"(dask_loom.write_ome_arrow_dataset), or compress the chunks (chunk_compression='zstd')"
            )
        with open(spill, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None
        try:
            data = pa.py_buffer(mm) if mm is not None else pa.py_buffer(b"")
            row = _record_arrays(
                img, enc, cols, data, chunk, image_id=image_id, name=name, image_type=image_type,
                acquisition_datetime=acquisition_datetime,
            )
            table = pa.table({column_name: row})
            md = {b"ome.arrow.type": OME_ARROW_TYPE.encode(), b"ome.arrow.version": OME_ARROW_VERSION.encode()}
            for k, v in (file_metadata or {}).items():
                md[str(k).encode()] = str(v).encode()
            table = table.replace_schema_metadata(md)
            releaser = _Releaser(mm) if mm is not None else contextlib.nullcontext()
            with releaser, pq.ParquetWriter(
                out_tmp, table.schema, compression=compression, use_dictionary=False, write_statistics=False
            ) as writer:
                writer.write_table(table)
            del table, row, data
        finally:
            if mm is not None:
                with contextlib.suppress(BufferError):
                    mm.close()
        os.replace(out_tmp, path)
    finally:
        for p in (spill, out_tmp):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
    return path
