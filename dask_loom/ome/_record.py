"""OME-Arrow records: image metadata, the unit index, pixel payloads, record parsing.

An image's *unit index* holds the origin and extent (TCZYX) of each stored
unit of pixels (a chunk, or a plane when a record has no chunks); a read asks
it which units a selection touches.  Payloads decode one unit's pixels from
an Arrow record, dtype-exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dask_loom.errors import CorruptChunkError, OMEArrowError, SelectionError, UnsupportedDtypeError
from dask_loom.ome._schema import (
    OME_ARROW_TYPE,
    pixel_dtype,
)

_X = "\u00d7"  # the multiplication sign, as in the image sizes of messages

__all__ = ["AXES", "ImageMeta", "Payload", "UnitIndex", "make_index", "meta_of_row", "parse_record", "units_of"]

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


def make_index(kind: str, start: np.ndarray, size: np.ndarray, meta: ImageMeta, label: str, what: str) -> UnitIndex:
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


class Payload:
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


def units_of(row: pa.StructArray, what: str) -> pa.StructArray | None:
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


def parse_record(row: pa.StructArray, label: str) -> _Parsed:
    """Metadata and unit index of a 1-row OME-Arrow StructArray (pixels untouched)."""
    meta = meta_of_row(row, label)
    chunks = units_of(row, "chunks")
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
        index = make_index("chunks", start, ext, meta, label, "chunks")
        return _Parsed(meta, index, "chunks", "pixel_bytes" in _struct_names(chunks.type))
    planes = units_of(row, "planes")
    if planes is None:
        raise OMEArrowError(f"{label}: the record has no pixel data (fields 'chunks' and 'planes' are empty or null)")
    try:
        start = _coords(planes, ["t", "c", "z", None, None])
    except (KeyError, OMEArrowError) as exc:
        raise OMEArrowError(f"{label}: planes: {exc}") from None
    ext = np.tile(np.array([1, 1, 1, meta.size_y, meta.size_x], np.int64), (len(start), 1))
    index = make_index("planes", start, ext, meta, label, "planes")
    return _Parsed(meta, index, "planes", False)


