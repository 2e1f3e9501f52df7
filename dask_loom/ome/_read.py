"""Reading OME-Arrow images: in-memory records, Parquet files, typed chunk datasets.

Every source is an *image*: metadata (sizes, dtype, channels, physical sizes)
plus a *unit index* — the origin and extent (TCZYX) of each stored unit of
pixels: a chunk, or a plane when a record has no chunks.  A read asks the
index which units a selection touches and decodes only those.  Images are
small and picklable (Arrow records pickle through Arrow IPC; file images
carry a :class:`~dask_loom.storage.FileSpec`), so they travel inside task
graphs and reopen their files lazily in each worker process.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dask.base import tokenize

from dask_loom._config import get_config
from dask_loom.errors import CorruptChunkError, OMEArrowError, SelectionError, UnsupportedDtypeError
from dask_loom.ome._schema import (
    DATASET_MANIFEST,
    OME_ARROW_BYTE_STRUCT,
    OME_ARROW_STRUCT,
    OME_ARROW_TYPE,
    is_ome_struct,
    pixel_dtype,
)
from dask_loom.storage import FileSpec

_X = "\u00d7"  # the multiplication sign, as in the image sizes of messages

__all__ = [
    "DatasetImage",
    "ImageMeta",
    "LoaderImage",
    "ParquetImage",
    "RecordImage",
    "UnitIndex",
    "find_ome_column",
    "open_image",
    "read_tzchw",
    "record_from_data",
]

AXES = "TCZYX"


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ImageMeta:
    """What an OME-Arrow image declares about itself (``pixels_meta`` and identity)."""

    size_t: int
    size_c: int
    size_z: int
    size_y: int
    size_x: int
    type_name: str | None
    image_id: str | None = None
    name: str | None = None
    image_type: str | None = None
    version: str | None = None
    dimension_order: str | None = None
    physical_size: dict[str, Any] = field(default_factory=dict)
    channels: tuple[dict[str, Any], ...] = ()
    chunk_grid: dict[str, Any] | None = None

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(T, C, Z, Y, X)``."""
        return (self.size_t, self.size_c, self.size_z, self.size_y, self.size_x)

    @property
    def channel_names(self) -> list[str]:
        return [str(ch.get("name")) if ch.get("name") is not None else f"C{i}" for i, ch in enumerate(self.channels)]

    def dtype(self, label: str) -> np.dtype:
        """The declared pixel dtype (uint16 when the record declares none)."""
        if self.type_name is None:
            return np.dtype("uint16")
        return pixel_dtype(self.type_name, what=f"{label}: pixels_meta.type")


def _meta_from_dict(rec: dict[str, Any], label: str) -> ImageMeta:
    pm = rec.get("pixels_meta")
    if not isinstance(pm, dict):
        raise OMEArrowError(f"{label}: field 'pixels_meta' is missing or null")
    sizes = {}
    for ax in "tczyx":
        v = pm.get(f"size_{ax}")
        if v is None:
            if ax in "yx":
                raise OMEArrowError(f"{label}: field 'pixels_meta.size_{ax}' is missing or null")
            v = 1
        try:
            v = int(v)
        except (TypeError, ValueError):
            raise OMEArrowError(f"{label}: field 'pixels_meta.size_{ax}' is {v!r}, not an integer") from None
        if v <= 0:
            raise OMEArrowError(f"{label}: field 'pixels_meta.size_{ax}' is {v}; sizes must be positive")
        sizes[ax] = v
    typ = rec.get("type")
    if typ is not None and typ != OME_ARROW_TYPE:
        raise OMEArrowError(f"{label}: field 'type' is {typ!r}, not {OME_ARROW_TYPE!r}: not an OME-Arrow record")
    phys = {
        k: pm.get(k)
        for k in (
            "physical_size_x",
            "physical_size_y",
            "physical_size_z",
            "physical_size_x_unit",
            "physical_size_y_unit",
            "physical_size_z_unit",
        )
        if pm.get(k) is not None
    }
    grid = rec.get("chunk_grid") or None
    if grid is not None and not isinstance(grid, dict):
        raise OMEArrowError(f"{label}: field 'chunk_grid' is {grid!r}, not a struct")
    channels = pm.get("channels") or []
    if not isinstance(channels, list) or not all(isinstance(ch, dict) for ch in channels):
        raise OMEArrowError(f"{label}: field 'pixels_meta.channels' is not a list of structs")
    return ImageMeta(
        size_t=sizes["t"],
        size_c=sizes["c"],
        size_z=sizes["z"],
        size_y=sizes["y"],
        size_x=sizes["x"],
        type_name=None if pm.get("type") is None else str(pm.get("type")),
        image_id=rec.get("id"),
        name=rec.get("name"),
        image_type=rec.get("image_type"),
        version=rec.get("version"),
        dimension_order=pm.get("dimension_order"),
        physical_size=phys,
        channels=tuple(dict(ch) for ch in channels),
        chunk_grid=grid,
    )


# --------------------------------------------------------------------------- unit index


@dataclass
class UnitIndex:
    """Origins and extents (TCZYX) of the stored pixel units of one image."""

    kind: str  # "chunks", "planes", "dataset" or "loader"
    start: np.ndarray  # (N, 5) int64
    size: np.ndarray  # (N, 5) int64
    grid: tuple[int, int, int, int, int] | None  # regular unit shape, or None

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def touching(
        self, t: np.ndarray, c: np.ndarray, z: np.ndarray, y: tuple[int, int], x: tuple[int, int]
    ) -> np.ndarray:
        """Ids of the units holding any selected pixel."""
        m = np.ones(len(self), dtype=bool)
        for axis, sel in ((0, t), (1, c), (2, z)):
            u = np.unique(sel)
            lo = np.searchsorted(u, self.start[:, axis], "left")
            hi = np.searchsorted(u, self.start[:, axis] + self.size[:, axis], "left")
            m &= hi > lo
        for axis, (a, b) in ((3, y), (4, x)):
            m &= (self.start[:, axis] < b) & (self.start[:, axis] + self.size[:, axis] > a)
        return np.flatnonzero(m)


def _regular_grid(start: np.ndarray, size: np.ndarray, shape: Sequence[int], nominal: Sequence[int]) -> bool:
    nominal = np.asarray(nominal, dtype=np.int64)
    if np.any(nominal <= 0) or len(start) == 0:
        return False
    if np.any(start % nominal):
        return False
    want = np.minimum(nominal, np.asarray(shape, dtype=np.int64) - start)
    if np.any(size != want):
        return False
    # Every grid cell present exactly once.
    n = int(np.prod(-(-np.asarray(shape, dtype=np.int64) // nominal)))
    if len(start) != n:
        return False
    cells = np.ravel_multi_index(tuple((start // nominal).T), tuple(-(-np.asarray(shape) // nominal)))
    return len(np.unique(cells)) == n


def _make_index(kind: str, start: np.ndarray, size: np.ndarray, meta: ImageMeta, label: str, what: str) -> UnitIndex:
    shape = np.asarray(meta.shape, dtype=np.int64)
    start = start.astype(np.int64, copy=False)
    size = size.astype(np.int64, copy=False)
    bad = np.flatnonzero(np.any(start < 0, axis=1) | np.any(size <= 0, axis=1) | np.any(start + size > shape, axis=1))
    if len(bad):
        i = int(bad[0])
        raise OMEArrowError(
            f"{label}: {what}[{i}] covers TCZYX origin {tuple(start[i].tolist())} extent {tuple(size[i].tolist())}, "
            f"outside the image {tuple(shape.tolist())} declared by pixels_meta ({len(bad)} unit(s) out of bounds)"
        )
    nominal = None
    if len(start):
        if kind == "planes":
            nominal = (1, 1, 1, meta.size_y, meta.size_x)
        elif meta.chunk_grid and kind == "chunks":
            g = meta.chunk_grid
            try:
                nominal = (
                    int(g.get("chunk_t") or 1),
                    int(g.get("chunk_c") or 1),
                    int(g["chunk_z"]),
                    int(g["chunk_y"]),
                    int(g["chunk_x"]),
                )
            except (KeyError, TypeError, ValueError):
                nominal = None
        if nominal is None:
            nominal = tuple(int(v) for v in size.max(axis=0))
    grid = tuple(nominal) if nominal is not None and _regular_grid(start, size, meta.shape, nominal) else None
    return UnitIndex(kind, start, size, grid)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- payloads


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data) numpy views of a (large_)binary array, honouring its slice offset."""
    bufs = arr.buffers()
    off_dtype = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(bufs[1], dtype=off_dtype)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
    return offsets, data


def _check_fits(v: np.ndarray, dtype: np.dtype, where: str) -> None:
    """Refuse list pixel values the declared pixel type cannot hold (a cast would wrap them silently)."""
    if not v.size or np.can_cast(v.dtype, dtype, "safe") or dtype.kind == "f":
        return
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = v.min(), v.max()
        if lo < info.min or hi > info.max or (v.dtype.kind == "f" and not np.array_equal(v, np.round(v))):
            raise OMEArrowError(
                f"{where}: values {lo}..{hi} ({v.dtype}) do not fit the declared pixel type {dtype.name} (pixels_meta.type)"
            )


class _Payload:
    """Pixel data of one record's units, decoded one unit at a time."""

    def __init__(self, units: pa.StructArray, kind: str, label: str, what: str) -> None:
        self.label = label
        self.what = what
        names = {units.type.field(i).name for i in range(units.type.num_fields)}
        self.arrow_ids = units.field("chunk_id").to_numpy() if "chunk_id" in names else None
        self.binary = "pixel_bytes" in names
        if self.binary:
            pb = units.field("pixel_bytes")
            if pb.null_count:
                i = int(np.flatnonzero(pb.is_null().to_numpy(zero_copy_only=False))[0])
                raise OMEArrowError(f"{label}: {what}[{i}].pixel_bytes is null")
            self.arrow = pb
            self.offsets, self.data = _binary_parts(pb)
            self.dtypes = units.field("dtype").to_pylist() if "dtype" in names else [None] * len(units)
            self.compression = units.field("compression").to_pylist() if "compression" in names else [None] * len(units)
        else:
            if "pixels" not in names:
                raise OMEArrowError(f"{label}: {what} entries have neither 'pixels' nor 'pixel_bytes'")
            pl = units.field("pixels")
            if pl.null_count:
                i = int(np.flatnonzero(pl.is_null().to_numpy(zero_copy_only=False))[0])
                raise OMEArrowError(f"{label}: {what}[{i}].pixels is null")
            vt = pl.type.value_type
            if not (pa.types.is_integer(vt) or pa.types.is_floating(vt)):
                raise UnsupportedDtypeError(f"{label}: {what}.pixels holds {vt} values, not numbers")
            self.arrow = pl
            self.offsets = pl.offsets.to_numpy().astype(np.int64)
            values = pl.values
            if values.null_count:
                raise OMEArrowError(f"{label}: {what}.pixels contains null values")
            self.values = values.to_numpy(zero_copy_only=False)

    def check_lengths(self, sizes: np.ndarray, meta: ImageMeta) -> None:
        """Compare stored value counts with the unit extents (list payloads only)."""
        if self.binary:
            return
        have = np.diff(self.offsets)
        want = np.prod(sizes, axis=1)
        bad = np.flatnonzero(have != want)
        if not len(bad):
            return
        i = int(bad[0])
        n, w = int(have[i]), int(want[i])
        if self.what == "planes":
            detail = (
                f"expected {w} = {meta.size_x} {_X} {meta.size_y} {_X} 1 (size_x {_X} size_y {_X} one plane); "
                f"pixels_meta (size_c={meta.size_c}, size_z={meta.size_z}, size_t={meta.size_t}) disagrees with the pixel data"
            )
            if n % w == 0:
                detail += f" ({n // w} values per pixel: several samples, e.g. RGB, packed into one plane)"
        else:
            sep = f" {_X} "
            detail = f"expected {w} = {sep.join(str(int(s)) for s in sizes[i][2:])} (shape_z{sep}shape_y{sep}shape_x)"
        raise OMEArrowError(f"{self.label}: {self.what}[{i}].pixels holds {n} values, {detail}")

    def unit(self, i: int, shape: tuple[int, ...], fallback: np.dtype) -> np.ndarray:
        n = int(np.prod(shape))
        if not self.binary:
            v = self.values[self.offsets[i] : self.offsets[i + 1]]
            if v.size != n:
                raise OMEArrowError(f"{self.label}: {self.what}[{i}].pixels holds {v.size} values, expected {n}")
            _check_fits(v, fallback, f"{self.label}: {self.what}[{i}].pixels")
            return v.reshape(shape)
        dt = pixel_dtype(self.dtypes[i], what=f"{self.label}: {self.what}[{i}].dtype") if self.dtypes[i] else fallback
        raw = self.data[self.offsets[i] : self.offsets[i + 1]]
        comp = self.compression[i]
        if comp and str(comp).strip().lower() not in ("none", ""):
            try:
                raw = np.frombuffer(pa.Codec(str(comp)).decompress(raw, decompressed_size=n * dt.itemsize), np.uint8)
            except (pa.ArrowException, ValueError, OSError) as exc:
                raise CorruptChunkError(
                    f"{self.label}: {self.what}[{i}].pixel_bytes do not decompress with {comp!r}: {exc}"
                ) from None
        if raw.size != n * dt.itemsize:
            raise OMEArrowError(
                f"{self.label}: {self.what}[{i}].pixel_bytes holds {raw.size} bytes, expected {n * dt.itemsize} "
                f"= {n} {dt.name} values of the unit's extent {shape[2:]}"
            )
        return raw.view(dt).reshape(shape)

    def arrow_values(self, i: int, dtype: np.dtype) -> pa.Array:
        """The stored values of unit *i* as a 1-D Arrow array sharing the record's memory."""
        if not self.binary:
            return self.arrow.values.slice(int(self.offsets[i]), int(self.offsets[i + 1] - self.offsets[i]))
        comp = self.compression[i]
        if comp and str(comp).strip().lower() not in ("none", ""):
            raise SelectionError(
                f"{self.label}: {self.what}[{i}] is stored {comp}-compressed: no zero-copy Arrow buffer; use mode='numpy'"
            )
        dt = pixel_dtype(self.dtypes[i], what=f"{self.label}: {self.what}[{i}].dtype") if self.dtypes[i] else dtype
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if start % dt.itemsize:
            raise SelectionError(f"{self.label}: {self.what}[{i}] bytes are not aligned for {dt.name}; use mode='numpy'")
        buf = self.arrow.buffers()[2].slice(start, stop - start)
        return pa.Array.from_buffers(pa.from_numpy_dtype(dt), (stop - start) // dt.itemsize, [None, buf])


# --------------------------------------------------------------------------- record parsing


def _struct_names(t: pa.DataType) -> set[str]:
    return {t.field(i).name for i in range(t.num_fields)} if pa.types.is_struct(t) else set()


def _coords(units: pa.StructArray, names: Sequence[str]) -> np.ndarray:
    cols = []
    for n in names:
        if n is None:
            cols.append(np.zeros(len(units), dtype=np.int64))
            continue
        a = units.field(n)
        if a.null_count:
            raise OMEArrowError(f"field {n!r} has null entries")
        cols.append(a.to_numpy(zero_copy_only=False).astype(np.int64))
    return np.stack(cols, axis=1) if cols else np.zeros((0, len(names)), np.int64)


@dataclass
class _Parsed:
    meta: ImageMeta
    index: UnitIndex
    what: str  # "chunks" or "planes"
    binary: bool


def _units_of(row: pa.StructArray, what: str) -> pa.StructArray | None:
    if what not in _struct_names(row.type):
        return None
    lst = row.field(what)
    if pa.types.is_null(lst.type) or lst.null_count == len(lst):
        return None
    t = lst.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        raise OMEArrowError(f"OME-Arrow record: field {what!r} is {t}, not a list of structs")
    units = lst.flatten()
    return units if len(units) else None


def meta_of_row(row: pa.StructArray, label: str) -> ImageMeta:
    """Only the metadata of a 1-row OME-Arrow StructArray."""
    if len(row) != 1:
        raise OMEArrowError(f"{label}: expected one record, got {len(row)}")
    if row.null_count:
        raise OMEArrowError(f"{label}: the value is null (no image stored in this row)")
    names = _struct_names(row.type)
    small = {n: row.field(n)[0].as_py() for n in names if n in ("type", "version", "id", "name", "image_type", "chunk_grid")}
    small["pixels_meta"] = row.field("pixels_meta")[0].as_py() if "pixels_meta" in names else None
    return _meta_from_dict(small, label)


def _parse_record(row: pa.StructArray, label: str) -> _Parsed:
    """Metadata and unit index of a 1-row OME-Arrow StructArray (pixels untouched)."""
    meta = meta_of_row(row, label)
    chunks = _units_of(row, "chunks")
    if chunks is not None:
        grid = meta.chunk_grid or {}
        order = str(grid.get("chunk_order") or "ZYX").upper()
        if order != "ZYX":
            raise OMEArrowError(f"{label}: field 'chunk_grid.chunk_order' is {order!r}; only 'ZYX' is defined")
        try:
            start = _coords(chunks, ["t", "c", "z", "y", "x"])
            ext = _coords(chunks, [None, None, "shape_z", "shape_y", "shape_x"])
        except (KeyError, OMEArrowError) as exc:
            raise OMEArrowError(f"{label}: chunks: {exc}") from None
        ext[:, 0] = 1
        ext[:, 1] = 1
        index = _make_index("chunks", start, ext, meta, label, "chunks")
        return _Parsed(meta, index, "chunks", "pixel_bytes" in _struct_names(chunks.type))
    planes = _units_of(row, "planes")
    if planes is None:
        raise OMEArrowError(f"{label}: the record has no pixel data (fields 'chunks' and 'planes' are empty or null)")
    try:
        start = _coords(planes, ["t", "c", "z", None, None])
    except (KeyError, OMEArrowError) as exc:
        raise OMEArrowError(f"{label}: planes: {exc}") from None
    ext = np.tile(np.array([1, 1, 1, meta.size_y, meta.size_x], np.int64), (len(start), 1))
    index = _make_index("planes", start, ext, meta, label, "planes")
    return _Parsed(meta, index, "planes", False)


# --------------------------------------------------------------------------- images


class _Image:
    """Common read interface of every image kind."""

    label: str
    meta: ImageMeta

    def index(self) -> UnitIndex:  # pragma: no cover - interface
        raise NotImplementedError

    def stored_dtype(self) -> np.dtype:
        return self.meta.dtype(self.label)

    def fetch(self, ids: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:  # pragma: no cover - interface
        raise NotImplementedError

    def arrow_values(self, uid: int, dtype: np.dtype) -> pa.Array:
        raise SelectionError(f"{self.label}: mode='arrow' needs pixels held in Arrow memory; use mode='numpy'")

    def token(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def __dask_tokenize__(self) -> Any:
        return self.token()


class RecordImage(_Image):
    """An OME-Arrow record held in memory (1-row StructArray)."""

    def __init__(self, row: pa.StructArray, *, label: str = "OME-Arrow record") -> None:
        self.row = row
        self.label = label
        parsed = _parse_record(row, label)
        self.meta = parsed.meta
        self._index = parsed.index
        self.what = parsed.what
        self.binary = parsed.binary
        self._payload: _Payload | None = None
        self._lock = threading.Lock()
        self._token: str | None = None

    def index(self) -> UnitIndex:
        return self._index

    def payload(self) -> _Payload:
        if self._payload is None:
            with self._lock:
                if self._payload is None:
                    units = _units_of(self.row, self.what)
                    assert units is not None
                    p = _Payload(units, self.what, self.label, self.what)
                    p.check_lengths(self._index.size, self.meta)
                    self._payload = p
        return self._payload

    def stored_dtype(self) -> np.dtype:
        if self.meta.type_name is None and self.binary:
            first = self.payload().dtypes[0]
            if first:
                return pixel_dtype(first, what=f"{self.label}: chunks[0].dtype")
        return self.meta.dtype(self.label)

    def fetch(self, ids: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        p = self.payload()
        dt = self.stored_dtype()  # list values are checked against it
        for i in ids:
            yield int(i), p.unit(int(i), tuple(int(s) for s in self._index.size[i]), dt)

    def arrow_values(self, uid: int, dtype: np.dtype) -> pa.Array:
        return self.payload().arrow_values(uid, dtype)

    def token(self) -> Any:
        if self._token is None:
            # Content-based: hash the Arrow buffers (fast, and the same data gives the same name).
            parts = []
            for buf in self.row.buffers():
                if buf is not None:
                    parts.append(np.frombuffer(buf, dtype=np.uint8))
            self._token = tokenize("ome-record", str(self.row.type), self.row.offset, *parts)
        return ("RecordImage", self._token)

    def __getstate__(self) -> dict[str, Any]:
        return {"row": self.row, "label": self.label, "_token": self._token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["row"], label=state["label"])  # type: ignore[misc]
        self._token = state["_token"]


class LoaderImage(_Image):
    """Pixels from a user ``plane_loader(t, z, c)`` (metadata from a record)."""

    def __init__(self, meta: ImageMeta, loader: Any, *, label: str) -> None:
        self.meta = meta
        self.loader = loader
        self.label = label
        shape = meta.shape
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape[:3]], indexing="ij"), -1).reshape(-1, 3)
        start = np.concatenate([grid, np.zeros((len(grid), 2), np.int64)], axis=1)
        size = np.tile(np.array([1, 1, 1, meta.size_y, meta.size_x], np.int64), (len(grid), 1))
        self._index = UnitIndex("loader", start.astype(np.int64), size, (1, 1, 1, meta.size_y, meta.size_x))

    def index(self) -> UnitIndex:
        return self._index

    def fetch(self, ids: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        for i in ids:
            t, c, z = (int(v) for v in self._index.start[i, :3])
            plane = np.asarray(self.loader(t, z, c))
            if plane.size != self.meta.size_y * self.meta.size_x:
                raise OMEArrowError(
                    f"{self.label}: plane_loader(t={t}, z={z}, c={c}) returned {plane.size} values, "
                    f"expected {self.meta.size_y} {_X} {self.meta.size_x}"
                )
            yield int(i), plane.reshape(1, 1, 1, self.meta.size_y, self.meta.size_x)

    def token(self) -> Any:
        return ("LoaderImage", tokenize(self.meta), tokenize(self.loader))


# ---- files ------------------------------------------------------------------------


_md_lock = threading.Lock()
_md_cache: OrderedDict[Any, pq.FileMetaData] = OrderedDict()


def _stat_key(spec: FileSpec) -> Any:
    if spec.is_local:
        try:
            st = os.stat(spec.url)
        except FileNotFoundError:
            raise FileNotFoundError(f"{spec.url}: no such file") from None
        return (spec.url, st.st_mtime_ns, st.st_size)
    fs, path = spec.fs()
    info = fs.info(path)
    return (spec.url, info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""))


def _open_input(spec: FileSpec) -> Any:
    if spec.is_local:
        return spec.url
    fs, path = spec.fs()
    return fs.open(path, "rb")


def parquet_file(spec: FileSpec, *, label: str | None = None) -> pq.ParquetFile:
    """A fresh ``ParquetFile`` whose footer is parsed once per process and file version."""
    key = _stat_key(spec)
    with _md_lock:
        md = _md_cache.get(key)
        if md is not None:
            _md_cache.move_to_end(key)
    try:
        pf = pq.ParquetFile(_open_input(spec), metadata=md)
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise OMEArrowError(f"{label or spec.name}: not a readable Parquet file: {exc}") from None
    if md is None:
        with _md_lock:
            _md_cache[key] = pf.metadata
            while len(_md_cache) > 64:
                _md_cache.popitem(last=False)
    return pf


def find_ome_column(schema: pa.Schema, column: str | None, label: str) -> str:
    """The OME-Arrow struct column to read: *column*, or the first found by struct shape."""
    names = list(schema.names)
    ome = [f.name for f in schema if is_ome_struct(f.type)]
    if column is None:
        if not ome:
            raise OMEArrowError(
                f"{label}: no OME-Arrow column (a struct with pixels_meta and planes or chunks) "
                f"among the columns {names}"
            )
        for preferred in ("image", "ome_arrow"):
            if preferred in ome:
                return preferred
        return ome[0]
    if column not in names:
        raise OMEArrowError(f"{label}: no column {column!r}; the OME-Arrow columns are {ome}")
    t = schema.field(column).type
    if pa.types.is_null(t):
        raise OMEArrowError(
            f"{label}: column {column!r} has Arrow type null (every value is null): it holds no image"
        )
    if not is_ome_struct(t):
        raise OMEArrowError(
            f"{label}: column {column!r} of type {t} is not an OME-Arrow struct "
            f"(needs pixels_meta with size_x/size_y and planes or chunks); the OME-Arrow columns are {ome}"
        )
    return column


def _payload_leaf(path: str) -> bool:
    return path.endswith(".pixel_bytes") or ".pixels.list." in path or path.endswith(".pixels")


_rec_lock = threading.Lock()
_rec_cache: OrderedDict[Any, _Payload] = OrderedDict()
_rec_loading: dict[Any, threading.Lock] = {}


class ParquetImage(_Image):
    """One OME-Arrow record in a Parquet file (column *column*, row *row*).

    Metadata and the unit index are read without the pixel columns.  A
    Parquet row cannot be read in part, so the first pixel access reads the
    record's pixel column (chunks *or* planes, never both) once per process;
    only the units a selection touches are then decoded.
    """

    def __init__(self, spec: FileSpec, column: str | None = None, row: int = 0) -> None:
        self.spec = spec
        base = os.path.basename(spec.url.rstrip("/")) or spec.url
        pf = parquet_file(spec, label=base)
        self.column = find_ome_column(pf.schema_arrow, column, base)
        n = pf.metadata.num_rows
        if not (-n <= row < n):
            raise OMEArrowError(f"{base}: row_index {row} out of range for {n} row(s)")
        self.row = row % n if n else 0
        self.label = f"{base} column {self.column!r} row {self.row}"
        rg, local = 0, self.row
        for g in range(pf.metadata.num_row_groups):
            k = pf.metadata.row_group(g).num_rows
            if local < k:
                rg = g
                break
            local -= k
        self.row_group, self.local_row = rg, local
        leaves = [pf.schema.column(i).path for i in range(len(pf.schema))]
        mine = [p for p in leaves if p.startswith(self.column + ".")]
        meta_cols = [p for p in mine if not _payload_leaf(p)]
        table = pf.read_row_group(rg, columns=meta_cols)
        record = table.column(self.column).combine_chunks().slice(local, 1)
        parsed = _parse_record(record, self.label)
        self.meta, self._index, self.what, self.binary = parsed.meta, parsed.index, parsed.what, parsed.binary
        prefix = f"{self.column}.{self.what}."
        # The metadata read left the payload out, so tell byte chunks by the file schema.
        self.binary = any(p.startswith(prefix) and p.endswith(".pixel_bytes") for p in mine)
        self.pixel_cols = [p for p in mine if p.startswith(prefix) and _payload_leaf(p)]
        if self.binary:
            self.pixel_cols += [p for p in mine if p.startswith(prefix) and p.endswith((".dtype", ".compression"))]
        self._key = (*_stat_key(spec), self.column, self.row, self.what)

    def index(self) -> UnitIndex:
        return self._index

    def payload(self) -> _Payload:
        key = self._key
        with _rec_lock:
            p = _rec_cache.get(key)
            if p is not None:
                _rec_cache.move_to_end(key)
                return p
            lock = _rec_loading.setdefault(key, threading.Lock())
        with lock:
            with _rec_lock:
                p = _rec_cache.get(key)
            if p is not None:
                return p
            pf = parquet_file(self.spec, label=self.label)
            table = pf.read_row_group(self.row_group, columns=self.pixel_cols)
            record = table.column(self.column).combine_chunks().slice(self.local_row, 1)
            units = _units_of(record, self.what)
            if units is None:
                raise OMEArrowError(f"{self.label}: field {self.what!r} lost its entries between reads (file changed?)")
            p = _Payload(units, self.what, self.label, self.what)
            p.check_lengths(self._index.size, self.meta)
            with _rec_lock:
                _rec_cache[key] = p
                _rec_loading.pop(key, None)
                while len(_rec_cache) > max(1, int(get_config("ome-record-cache"))):
                    _rec_cache.popitem(last=False)
            return p

    def stored_dtype(self) -> np.dtype:
        if self.meta.type_name is None and self.binary:
            first = self.payload().dtypes[0]
            if first:
                return pixel_dtype(first, what=f"{self.label}: chunks[0].dtype")
        return self.meta.dtype(self.label)

    def fetch(self, ids: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        p = self.payload()
        dt = self.stored_dtype()  # list values are checked against it
        for i in ids:
            yield int(i), p.unit(int(i), tuple(int(s) for s in self._index.size[i]), dt)

    def arrow_values(self, uid: int, dtype: np.dtype) -> pa.Array:
        return self.payload().arrow_values(uid, dtype)

    def token(self) -> Any:
        return ("ParquetImage", tokenize(self.spec), self._key)

    # Pickle the spec only: a graph carries this object in every task, so the
    # chunk index is rebuilt once per process (cached) rather than shipped.
    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "column": self.column, "row": self.row}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(_reopen(ParquetImage, state["spec"], state["column"], state["row"]).__dict__)


def _join(spec: FileSpec, name: str) -> FileSpec:
    if spec.is_local:
        return FileSpec(os.path.join(spec.url, name), {})
    return FileSpec(spec.url.rstrip("/") + "/" + name, dict(spec.storage_options))


def _isdir(spec: FileSpec) -> bool:
    if spec.is_local:
        return os.path.isdir(spec.url)
    fs, path = spec.fs()
    return bool(fs.isdir(path))


def _exists(spec: FileSpec) -> bool:
    return spec.exists()


def is_dataset(spec: FileSpec) -> bool:
    """True for a typed chunk dataset directory (manifest, or images + chunks tables)."""
    if not _isdir(spec):
        return False
    return _exists(_join(spec, DATASET_MANIFEST)) or (
        _exists(_join(spec, "images.parquet")) and _exists(_join(spec, "chunks.parquet"))
    )


class DatasetImage(_Image):
    """One image of a typed chunk dataset: per-chunk random access by row group.

    ``index.parquet`` (or, without it, the coordinate columns of
    ``chunks.parquet``) maps every chunk to its row group; a read fetches
    exactly the row groups of the chunks it touches.
    """

    def __init__(self, spec: FileSpec, image_id: str | None = None, row: int = 0) -> None:
        self.spec = spec
        base = os.path.basename(spec.url.rstrip("/")) or spec.url
        images_spec = _join(spec, "images.parquet")
        if not _exists(images_spec):
            raise OMEArrowError(f"{base}: typed chunk dataset without images.parquet")
        images = parquet_file(images_spec, label=f"{base}/images.parquet").read()
        rows = images.to_pylist()
        if not rows:
            raise OMEArrowError(f"{base}/images.parquet: no images")
        if image_id is None:
            if not (-len(rows) <= row < len(rows)):
                raise OMEArrowError(f"{base}: row_index {row} out of range for {len(rows)} image(s)")
            rec = rows[row]
        else:
            found = [r for r in rows if str(r.get("image_id")) == str(image_id)]
            if not found:
                raise OMEArrowError(
                    f"{base}: no image_id {image_id!r}; the dataset holds {[r.get('image_id') for r in rows]}"
                )
            rec = found[0]
        self.image_id = str(rec["image_id"])
        self.label = f"{base} image {self.image_id!r}"
        try:
            channels = json.loads(rec.get("channels_json") or "[]")
        except ValueError:
            raise OMEArrowError(f"{self.label}: images.parquet channels_json is not JSON") from None
        extra = {}
        if rec.get("physical_json"):
            extra = json.loads(rec["physical_json"])
        sizes = {a: rec.get(f"size_{a}") for a in "tczyx"}
        for a, v in sizes.items():
            if v is None or int(v) <= 0:
                raise OMEArrowError(f"{self.label}: images.parquet size_{a} is {v!r}")
        grid = {f"chunk_{a}": rec.get(f"chunk_{a}") for a in "tczyx"}
        self.meta = ImageMeta(
            size_t=int(sizes["t"]),
            size_c=int(sizes["c"]),
            size_z=int(sizes["z"]),
            size_y=int(sizes["y"]),
            size_x=int(sizes["x"]),
            type_name=rec.get("dtype"),
            image_id=self.image_id,
            name=rec.get("name"),
            image_type=rec.get("image_type"),
            version=None,
            dimension_order="XYZCT",
            physical_size=extra,
            channels=tuple(channels),
            chunk_grid={k: v for k, v in grid.items() if v is not None} or None,
        )
        self._build_index(base)

    def _build_index(self, base: str) -> None:
        index_spec = _join(self.spec, "index.parquet")
        cols = ["chunk_id", *AXES.lower(), *[f"shape_{a}" for a in "tczyx"]]
        if _exists(index_spec):
            tbl = parquet_file(index_spec, label=f"{base}/index.parquet").read()
            tbl = tbl.filter(pc.equal(tbl["image_id"], self.image_id))
            rg = tbl["row_group_id"].to_numpy().astype(np.int64)
            frag = [f or "chunks.parquet" for f in tbl["fragment_path"].to_pylist()]
        else:
            pf = parquet_file(_join(self.spec, "chunks.parquet"), label=f"{base}/chunks.parquet")
            tbl = pf.read(columns=["image_id", *cols])
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
            rows_all = np.arange(tbl.num_rows)
            rg_all = np.searchsorted(starts, rows_all, side="right") - 1
            mask = pc.equal(tbl["image_id"], self.image_id).to_numpy(zero_copy_only=False)
            tbl = tbl.filter(pa.array(mask))
            rg = rg_all[mask]
            frag = ["chunks.parquet"] * tbl.num_rows
        if tbl.num_rows == 0:
            raise OMEArrowError(f"{self.label}: the dataset stores no chunks for this image")
        start = np.stack([tbl[a].to_numpy().astype(np.int64) for a in "tczyx"], axis=1)
        size = np.stack([tbl[f"shape_{a}"].to_numpy().astype(np.int64) for a in "tczyx"], axis=1)
        self.chunk_ids = tbl["chunk_id"].to_numpy().astype(np.int64)
        self.row_groups = rg
        self.fragments = frag
        self._index = _make_index("dataset", start, size, self.meta, self.label, "chunks")

    def index(self) -> UnitIndex:
        return self._index

    def _read_group(self, frag: str, group: int) -> _Payload:
        pf = parquet_file(_join(self.spec, frag), label=f"{self.label} {frag}")
        names = set(pf.schema_arrow.names)
        want = ["chunk_id", "dtype", "pixel_bytes"] + (["compression"] if "compression" in names else [])
        # One row group at a time, single-threaded: pyarrow's own threads only
        # add contention here, and the caller decodes groups in parallel.
        tbl = pf.read_row_group(group, columns=want, use_threads=False)
        units = pa.StructArray.from_arrays([tbl[n].combine_chunks() for n in want], names=want)
        return _Payload(units, "chunks", f"{self.label} {frag} row group {group}", "chunks")

    def fetch(self, ids: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        fallback = self.stored_dtype()
        groups: dict[tuple[str, int], list[int]] = {}
        for i in sorted((int(i) for i in ids), key=lambda i: (self.fragments[i], int(self.row_groups[i]))):
            groups.setdefault((self.fragments[i], int(self.row_groups[i])), []).append(i)
        keys = list(groups)

        def load(key: tuple[str, int]) -> list[tuple[int, np.ndarray]]:
            payload = self._read_group(*key)
            pos = {int(cid): j for j, cid in enumerate(payload.arrow_ids)}
            out = []
            for i in groups[key]:
                j = pos.get(int(self.chunk_ids[i]))
                if j is None:
                    raise OMEArrowError(
                        f"{self.label}: chunk_id {int(self.chunk_ids[i])} is not in row group {key[1]} of {key[0]} "
                        "(stale index.parquet?)"
                    )
                out.append((i, payload.unit(j, tuple(int(s) for s in self._index.size[i]), fallback)))
            return out

        for part in ordered_parallel(load, keys):
            yield from part

    def token(self) -> Any:
        files = [_stat_key(_join(self.spec, n)) for n in ("images.parquet", "chunks.parquet")]
        return ("DatasetImage", tokenize(self.spec), self.image_id, files)

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "image_id": self.image_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(_reopen(DatasetImage, state["spec"], state["image_id"], 0).__dict__)


_open_lock = threading.Lock()
_open_cache: OrderedDict[Any, _Image] = OrderedDict()


def _reopen(cls: type, spec: FileSpec, key: Any, row: int) -> _Image:
    """The image *cls(spec, key, row)*, built once per process and file version."""
    names = ("images.parquet", "chunks.parquet") if cls is DatasetImage else ()
    stamp = tuple(_stat_key(_join(spec, n)) for n in names) if names else _stat_key(spec)
    ck = (cls.__name__, spec.url, key, row, stamp)
    with _open_lock:
        img = _open_cache.get(ck)
        if img is not None:
            _open_cache.move_to_end(ck)
            return img
    img = cls(spec, key, row)
    with _open_lock:
        _open_cache[ck] = img
        while len(_open_cache) > 32:
            _open_cache.popitem(last=False)
    return img


# --------------------------------------------------------------------------- reading


def ordered_parallel(fn: Any, items: Sequence[Any], *, workers: int | None = None, window: int | None = None) -> Iterator[Any]:
    """``map(fn, items)`` on a few threads, in order, at most *window* results ahead.

    Decompression and Parquet decoding release the GIL, so a large read
    decodes chunks on several cores; the window bounds what waits in memory.
    """
    import concurrent.futures as cf
    from collections import deque

    n = len(items)
    workers = workers or min(4, os.cpu_count() or 1)
    if n <= 1 or workers <= 1:
        for it in items:
            yield fn(it)
        return
    window = window or 2 * workers
    pending: deque[Any] = deque()
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ome-read") as pool:
        nxt = 0
        try:
            while nxt < n or pending:
                while nxt < n and len(pending) < window:
                    pending.append(pool.submit(fn, items[nxt]))
                    nxt += 1
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _take(sel: np.ndarray, lo: int, hi: int) -> tuple[Any, Any]:
    """(positions in the selection, offsets inside the unit) for selected values in [lo, hi)."""
    pos = np.flatnonzero((sel >= lo) & (sel < hi))
    loc = sel[pos] - lo
    if len(pos) and np.all(np.diff(pos) == 1) and np.all(np.diff(loc) == 1):
        return slice(int(pos[0]), int(pos[-1]) + 1), slice(int(loc[0]), int(loc[-1]) + 1)
    return pos, loc


def read_tzchw(
    image: _Image,
    t: Sequence[int],
    z: Sequence[int],
    c: Sequence[int],
    roi: tuple[int, int, int, int],
    dtype: Any,
) -> np.ndarray:
    """Read a selection as a TZCHW array, decoding only the units it touches.

    *t*, *z*, *c* are index lists (any order, repeats allowed); *roi* is
    ``(x, y, w, h)``.
    """
    t_ = np.asarray(t, dtype=np.int64)
    z_ = np.asarray(z, dtype=np.int64)
    c_ = np.asarray(c, dtype=np.int64)
    x0, y0, w, h = (int(v) for v in roi)
    out = np.zeros((len(t_), len(z_), len(c_), h, w), dtype=np.dtype(dtype))
    if not out.size:
        return out
    index = image.index()
    ids = index.touching(t_, c_, z_, (y0, y0 + h), (x0, x0 + w))
    if index.kind == "planes":
        have = {tuple(int(v) for v in index.start[i, :3]) for i in ids}
        for tt in np.unique(t_):
            for cc in np.unique(c_):
                for zz in np.unique(z_):
                    if (int(tt), int(cc), int(zz)) not in have:
                        raise OMEArrowError(f"{image.label}: plane (t={tt}, z={zz}, c={cc}) not found in 'planes'")
    for uid, data in image.fetch(ids):
        s = index.start[uid]
        e = s + index.size[uid]
        tp, tl = _take(t_, int(s[0]), int(e[0]))
        cp, cl = _take(c_, int(s[1]), int(e[1]))
        zp, zl = _take(z_, int(s[2]), int(e[2]))
        ya, yb = max(y0, int(s[3])), min(y0 + h, int(e[3]))
        xa, xb = max(x0, int(s[4])), min(x0 + w, int(e[4]))
        block = data[..., ya - int(s[3]) : yb - int(s[3]), xa - int(s[4]) : xb - int(s[4])]
        oy, ox = slice(ya - y0, yb - y0), slice(xa - x0, xb - x0)
        if all(isinstance(v, slice) for v in (tp, cp, zp, tl, cl, zl)):
            out[tp, zp, cp, oy, ox] = block[tl, cl, zl].transpose(0, 2, 1, 3, 4)
            continue
        tl_, cl_, zl_ = (np.arange(v.start, v.stop) if isinstance(v, slice) else v for v in (tl, cl, zl))
        tp_, cp_, zp_ = (np.arange(v.start, v.stop) if isinstance(v, slice) else v for v in (tp, cp, zp))
        sub = block[np.ix_(tl_, cl_, zl_)].transpose(0, 2, 1, 3, 4)
        out[tp_[:, None, None], zp_[None, :, None], cp_[None, None, :], oy, ox] = sub
    return out


# --------------------------------------------------------------------------- sources


def _one_row(arr: pa.Array | pa.ChunkedArray, row: int, chunk_policy: str, label: str) -> pa.StructArray:
    if isinstance(arr, pa.ChunkedArray):
        if chunk_policy == "combine" or arr.num_chunks == 1:
            arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
        else:
            # "keep"/"auto" on several chunks: locate the row without combining.
            n = len(arr)
            if not (-n <= row < n):
                raise OMEArrowError(f"{label}: row {row} out of range for {n} record(s)")
            r = row % n
            for ch in arr.chunks:
                if r < len(ch):
                    return ch.slice(r, 1)
                r -= len(ch)
    n = len(arr)
    if n == 0:
        raise OMEArrowError(f"{label}: empty array: no OME-Arrow record")
    if not (-n <= row < n):
        raise OMEArrowError(f"{label}: row {row} out of range for {n} record(s)")
    return arr.slice(row % n, 1)


def _dict_to_array(d: dict[str, Any]) -> pa.StructArray:
    chunks = d.get("chunks") or []
    first = chunks[0] if isinstance(chunks, list) and chunks else {}
    typed = OME_ARROW_BYTE_STRUCT if isinstance(first, dict) and "pixel_bytes" in first else OME_ARROW_STRUCT
    try:
        return pa.array([d], type=typed)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        pass
    try:
        # Not the canonical types (older versions, other integer widths): let Arrow infer.
        return pa.array([d])
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
        raise OMEArrowError(f"OME-Arrow record: the dict is not a record Arrow can hold ({type(exc).__name__}: {exc})") from None


def record_from_data(data: Any, *, row: int = 0, column: str | None = None, chunk_policy: str = "auto") -> pa.StructArray:
    """A 1-row StructArray from a dict, StructScalar, StructArray, ChunkedArray or Table."""
    label = "OME-Arrow record"
    if isinstance(data, dict):
        return _dict_to_array(data)
    if isinstance(data, pa.StructScalar):
        if not data.is_valid:
            raise OMEArrowError(f"{label}: the StructScalar is null")
        return pa.repeat(data, 1)  # handles null-typed fields ("masks") that pa.array cannot append
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        name = find_ome_column(data.schema, column, "table")
        return _one_row(data.column(name), row, chunk_policy, f"table column {name!r}")
    if isinstance(data, (pa.StructArray, pa.ChunkedArray)):
        if not is_ome_struct(data.type):
            raise OMEArrowError(f"{label}: Arrow type {data.type} is not an OME-Arrow struct")
        return _one_row(data, row, chunk_policy, label)
    raise TypeError(
        f"cannot read an OME-Arrow image from {type(data).__name__}: give a dict, StructScalar, "
        "StructArray, ChunkedArray, Table, a Parquet path or a typed chunk dataset directory"
    )


def open_image(
    source: Any,
    *,
    column: str | None = None,
    row_index: int = 0,
    image_id: str | None = None,
    chunk_policy: str = "auto",
    storage_options: dict[str, Any] | None = None,
) -> _Image:
    """The image object behind :func:`dask_loom.open_ome_arrow`."""
    if isinstance(source, _Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        spec = FileSpec.from_path(source, storage_options)
        if not spec.exists():
            raise FileNotFoundError(f"{spec.name}: no such file or directory")
        if _isdir(spec):
            if is_dataset(spec):
                return DatasetImage(spec, image_id=image_id, row=row_index)
            raise OMEArrowError(
                f"{spec.name}: a directory without {DATASET_MANIFEST} or images.parquet + chunks.parquet "
                "is not an OME-Arrow typed chunk dataset (OME-Zarr? use dask_loom.convert_to_ome_arrow)"
            )
        low = spec.url.lower()
        if low.endswith((".tif", ".tiff")):
            raise OMEArrowError(
                f"{spec.name}: a TIFF file, not OME-Arrow; convert it with dask_loom.convert_to_ome_arrow first"
            )
        return ParquetImage(spec, column, row_index)
    arr = record_from_data(source, row=row_index, column=column, chunk_policy=chunk_policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        return RecordImage(arr)
