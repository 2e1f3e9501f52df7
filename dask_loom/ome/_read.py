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

import functools
import json
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dask.base import tokenize

from dask_loom._config import get_config
from dask_loom._handles import HandleCache
from dask_loom._threads import read_ahead
from dask_loom.blocks._plan import grid_coords
from dask_loom.errors import OMEArrowError, SelectionError
from dask_loom.ome._record import (
    AXES,
    ImageMeta,
    Payload,
    UnitIndex,
    make_index,
    parse_record,
    units_of,
)
from dask_loom.ome._schema import (
    DATASET_MANIFEST,
    OME_ARROW_BYTE_STRUCT,
    OME_ARROW_STRUCT,
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
        parsed = parse_record(row, label)
        self.meta = parsed.meta
        self._index = parsed.index
        self.what = parsed.what
        self.binary = parsed.binary
        self._payload: Payload | None = None
        self._lock = threading.Lock()
        self._token: str | None = None

    def index(self) -> UnitIndex:
        return self._index

    def payload(self) -> Payload:
        if self._payload is None:
            with self._lock:
                if self._payload is None:
                    units = units_of(self.row, self.what)
                    assert units is not None
                    p = Payload(units, self.what, self.label, self.what)
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
        grid = grid_coords([(0, s) for s in shape[:3]])
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


# Parsed Parquet footers, keyed by file identity (a rewritten file is parsed afresh).
_footers: HandleCache[pq.FileMetaData] = HandleCache("parquet footers", maxsize=64)


def _stat_key(spec: FileSpec) -> Any:
    if spec.is_local:
        try:
            st = os.stat(spec.url)
        except FileNotFoundError:
            raise FileNotFoundError(f"{spec.url}: no such file") from None
        return (spec.url, st.st_mtime_ns, st.st_size)
    size, tag = spec.remote().stat()
    return (spec.url, size, tag)


def _open_input(spec: FileSpec) -> Any:
    if spec.is_local:
        return spec.url
    return spec.remote().open()


def parquet_file(spec: FileSpec, *, label: str | None = None) -> pq.ParquetFile:
    """A fresh ``ParquetFile`` whose footer is parsed once per process and file version."""
    key = _stat_key(spec)
    md = _footers.peek(key)
    try:
        pf = pq.ParquetFile(_open_input(spec), metadata=md)
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise OMEArrowError(f"{label or spec.name}: not a readable Parquet file: {exc}") from None
    if md is None:
        _footers.put(key, pf.metadata)
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


# Pixel payloads of records (read once per process and file version; dask_loom.ome-record-cache of them).
_payloads: HandleCache[Payload] = HandleCache("ome payloads", maxsize=lambda: int(get_config("ome-record-cache")))


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
        parsed = parse_record(record, self.label)
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

    def payload(self) -> Payload:
        return _payloads.get(self._key, self._read_payload)

    def _read_payload(self) -> Payload:
        # Called once per record and file version: HandleCache.get serialises callers.
        pf = parquet_file(self.spec, label=self.label)
        table = pf.read_row_group(self.row_group, columns=self.pixel_cols)
        record = table.column(self.column).combine_chunks().slice(self.local_row, 1)
        units = units_of(record, self.what)
        if units is None:
            raise OMEArrowError(f"{self.label}: field {self.what!r} lost its entries between reads (file changed?)")
        p = Payload(units, self.what, self.label, self.what)
        p.check_lengths(self._index.size, self.meta)
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
    try:
        return spec.remote().kind() == "directory"
    except FileNotFoundError:
        return False


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
        self._index = make_index("dataset", start, size, self.meta, self.label, "chunks")

    def index(self) -> UnitIndex:
        return self._index

    def _read_group(self, frag: str, group: int) -> Payload:
        pf = parquet_file(_join(self.spec, frag), label=f"{self.label} {frag}")
        names = set(pf.schema_arrow.names)
        want = ["chunk_id", "dtype", "pixel_bytes"] + (["compression"] if "compression" in names else [])
        # One row group at a time, single-threaded: pyarrow's own threads only
        # add contention here, and the caller decodes groups in parallel.
        tbl = pf.read_row_group(group, columns=want, use_threads=False)
        units = pa.StructArray.from_arrays([tbl[n].combine_chunks() for n in want], names=want)
        return Payload(units, "chunks", f"{self.label} {frag} row group {group}", "chunks")

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


# Opened images (metadata and unit index read), per file version.
_images: HandleCache[_Image] = HandleCache("ome images", maxsize=32)


def _reopen(cls: type, spec: FileSpec, key: Any, row: int) -> _Image:
    """The image *cls(spec, key, row)*, built once per process and file version."""
    names = ("images.parquet", "chunks.parquet") if cls is DatasetImage else ()
    stamp = tuple(_stat_key(_join(spec, n)) for n in names) if names else _stat_key(spec)
    return _images.get((cls.__name__, spec.url, key, row, stamp), lambda: cls(spec, key, row))


# --------------------------------------------------------------------------- reading


def ordered_parallel(fn: Any, items: Sequence[Any], *, workers: int | None = None, window: int | None = None) -> Iterator[Any]:
    """``map(fn, items)`` on a few threads, in order, at most *window* results ahead.

    Decompression and Parquet decoding release the GIL, so a large read
    decodes chunks on several cores; the window bounds what waits in memory.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    if len(items) <= 1 or workers <= 1:
        return (fn(it) for it in items)
    window = window or 2 * workers
    return read_ahead((functools.partial(fn, it) for it in items), window - 1, workers=workers, name="ome-read")


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
