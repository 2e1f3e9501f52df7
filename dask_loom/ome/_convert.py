"""OME-TIFF (tifffile) and OME-Zarr (zarr) to OME-Arrow, streaming.

Both readers give a lazy TCZYX dask array whose blocks are whole stored units
(TIFF pages, Zarr chunks or shards) plus the image metadata (name, channel
names and colours, physical sizes); the OME-Arrow writers consume it block
by block, so a conversion never holds the image in memory.
"""

from __future__ import annotations

import contextlib
import os
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dask_loom._handles import HandleCache
from dask_loom.errors import MissingDependencyError, OMEArrowError, SelectionError
from dask_loom.ome._schema import pixel_dtype
from dask_loom.storage._urls import check_scheme

__all__ = [
    "TiffSource",
    "convert_to_ome_arrow",
    "image_kind",
    "ome_tiff_to_ome_arrow",
    "ome_zarr_to_ome_arrow",
    "read_ome_tiff",
    "read_ome_zarr",
]

_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3, "m": 1e6, "pm": 1e-6, "Å": 1e-4}


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError:
        raise MissingDependencyError("reading TIFF needs tifffile: pip install 'dask_loom[tiff]'") from None
    return tifffile


# --------------------------------------------------------------------------- TIFF

# Open TIFF files with a lock each (tifffile handles are not thread-safe), per file version.
_tiffs: HandleCache[tuple[Any, threading.Lock]] = HandleCache("tiff files", maxsize=8, close=lambda got: got[0].close())


def _tiff_handle(path: str) -> tuple[Any, threading.Lock]:
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    return _tiffs.get(key, lambda: (_tifffile().TiffFile(path), threading.Lock()))


@dataclass(frozen=True)
class _TiffLayout:
    """How TCZ positions map to pages (and samples) of one TIFF series."""

    shape: tuple[int, int, int, int, int]  # TCZYX
    page_dims: tuple[str, ...]  # series axes that index pages, in order (T/C/Z or dropped singletons)
    page_shape: tuple[int, ...]  # sizes of page_dims
    samples_as_c: bool  # RGB samples play the channel axis
    page_axes: str  # axes of one page array ("YX", "YXS", "SYX")


def _layout(series: Any, label: str) -> _TiffLayout:
    axes = str(series.axes).upper()
    shape = tuple(int(s) for s in series.shape)
    sizes = dict(zip(axes, shape))
    page_axes = str(series.keyframe.axes).upper() if getattr(series, "keyframe", None) is not None else "YX"
    samples_as_c = "S" in axes and sizes["S"] > 1
    if samples_as_c and sizes.get("C", 1) > 1:
        raise OMEArrowError(f"{label}: series axes {axes} {shape} hold both channels and samples per pixel")
    out = {"T": 1, "C": 1, "Z": 1}
    page_dims = []
    for a, n in zip(axes, shape):
        if a in "YXS":
            continue
        page_dims.append(a)
        if a in out:
            out[a] = n
        elif n > 1:
            if a in "IQ" and out["T"] == 1 and "T" not in axes:
                out["T"] = n  # a plain image sequence: frames as time points
                page_dims[-1] = "T"
            else:
                raise OMEArrowError(f"{label}: series axis {a!r} of size {n} (axes {axes}) has no OME-Arrow counterpart")
    if samples_as_c:
        out["C"] = sizes["S"]
    return _TiffLayout(
        (out["T"], out["C"], out["Z"], sizes["Y"], sizes["X"]),
        tuple(page_dims),
        tuple(sizes.get(a, 1) if a in axes else shape[axes.index("I")] for a in page_dims),
        samples_as_c,
        page_axes,
    )


def _ome_xml_meta(xml: str | None, series: int, label: str) -> dict[str, Any]:
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise OMEArrowError(f"{label}: the OME-XML does not parse: {exc}") from None

    def local(el: ET.Element) -> str:
        return el.tag.rsplit("}", 1)[-1]

    images = [el for el in root if local(el) == "Image"]
    if not images:
        return {}
    image = images[min(series, len(images) - 1)]
    pixels = next((el for el in image if local(el) == "Pixels"), None)
    meta: dict[str, Any] = {"name": image.get("Name"), "image_id": image.get("ID")}
    acq = next((el for el in image if local(el) == "AcquisitionDate"), None)
    if acq is not None and acq.text:
        import datetime as dt

        with contextlib.suppress(ValueError):
            meta["acquisition_datetime"] = dt.datetime.fromisoformat(acq.text.strip().replace("Z", "+00:00"))
    if pixels is None:
        return meta
    for ax in "XYZ":
        v = pixels.get(f"PhysicalSize{ax}")
        if v is not None:
            meta[f"physical_size_{ax.lower()}"] = float(v)
            meta[f"physical_size_{ax.lower()}_unit"] = pixels.get(f"PhysicalSize{ax}Unit") or "µm"
    def wavelength(ch: ET.Element, kind: str) -> float:
        v = ch.get(f"{kind}Wavelength")
        if v is None:
            return 0.0
        return float(v) * _UM.get(ch.get(f"{kind}WavelengthUnit") or "nm", 1e-3)

    channels = []
    for i, ch in enumerate(el for el in pixels if local(el) == "Channel"):
        color = ch.get("Color")
        channels.append(
            {
                "id": ch.get("ID") or f"ch-{i}",
                "name": ch.get("Name") if ch.get("Name") is not None else f"C{i}",
                "emission_um": wavelength(ch, "Emission"),
                "excitation_um": wavelength(ch, "Excitation"),
                "illumination": ch.get("IlluminationType") or "Unknown",
                "color_rgba": (int(color) & 0xFFFFFFFF) if color is not None else 0xFFFFFFFF,
            }
        )
    if channels:
        meta["channels"] = channels
    return meta


@dataclass(frozen=True, eq=False)
class TiffSource:
    """Chunk source of one TIFF series as TCZYX; one unit = one page (plane)."""

    path: str
    series: int
    layout: _TiffLayout
    dtype: np.dtype
    prefix: str = "tiff-read"
    label: str = field(default="")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (1, 1, 1, self.layout.shape[3], self.layout.shape[4])

    def _page(self, t: int, c: int, z: int) -> tuple[int, int]:
        pos = {"T": t, "C": 0 if self.layout.samples_as_c else c, "Z": z}
        coords = [pos.get(d, 0) for d in self.layout.page_dims]
        page = int(np.ravel_multi_index(coords, self.layout.page_shape)) if coords else 0
        return page, c

    def read_block(self, region: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
        ts, cs, zs, ys, xs = region
        res = np.empty(tuple(s.stop - s.start for s in region), dtype=self.dtype)
        wanted = [(t, c, z) for t in range(ts.start, ts.stop) for c in range(cs.start, cs.stop) for z in range(zs.start, zs.stop)]
        pages = sorted({self._page(t, c, z)[0] for t, c, z in wanted})
        tf, lock = _tiff_handle(self.path)
        with lock:
            data = tf.asarray(key=pages, series=self.series)
        data = np.asarray(data).reshape(len(pages), *data.shape[-len(self.layout.page_axes):])
        where = {p: i for i, p in enumerate(pages)}
        ax = self.layout.page_axes
        for t, c, z in wanted:
            page, sample = self._page(t, c, z)
            plane = data[where[page]]
            if "S" in ax:
                plane = np.take(plane, sample if self.layout.samples_as_c else 0, axis=ax.index("S"))
            res[t - ts.start, c - cs.start, z - zs.start] = plane[ys, xs]
        return res

    def __dask_tokenize__(self) -> Any:
        st = os.stat(self.path)
        return ("TiffSource", self.path, st.st_mtime_ns, st.st_size, self.series)


def read_ome_tiff(path: str | os.PathLike[str], *, series: int = 0) -> tuple[Any, dict[str, Any]]:
    """A TIFF series as a lazy TCZYX dask array (one page per unit) and its OME metadata.

    Plain TIFF without OME-XML is read as (1, 1, 1, Y, X) (or its page stack);
    big-endian data comes back in native byte order.

    Examples
    --------
    >>> import numpy as np, tifffile, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.ome.tif")
    >>> tifffile.imwrite(p, np.arange(2 * 5 * 6, dtype=">u2").reshape(2, 5, 6), ome=True, photometric="minisblack",
    ...                  metadata={"axes": "CYX", "Channel": {"Name": ["DNA", "ER"]}, "PhysicalSizeX": 0.25})
    >>> arr, meta = read_ome_tiff(p)
    >>> arr.shape, arr.dtype.isnative, [c["name"] for c in meta["channels"]], meta["physical_size_x"]
    ((1, 2, 1, 5, 6), True, ['DNA', 'ER'], 0.25)
    >>> os.remove(p)
    """
    from dask_loom.blocks import from_source

    check_scheme(path)  # a local file: any URL scheme is refused before tifffile sees it
    path = os.path.abspath(os.fspath(path))
    label = os.path.basename(path)
    tf, lock = _tiff_handle(path)
    with lock:
        if not tf.series:
            raise OMEArrowError(f"{label}: the TIFF holds no image series")
        if not (0 <= series < len(tf.series)):
            raise OMEArrowError(f"{label}: series {series} out of range for {len(tf.series)} series")
        s = tf.series[series]
        layout = _layout(s, label)
        dtype = pixel_dtype(np.dtype(s.dtype).newbyteorder("="), what=f"{label}: pixel type")
        xml = tf.ome_metadata if tf.is_ome else None
    meta = _ome_xml_meta(xml, series, label)
    meta.setdefault("name", label)
    if meta.get("channels") and len(meta["channels"]) != layout.shape[1]:
        names = [ch["name"] for ch in meta["channels"]]
        meta["channels"] = None
        meta["channel_names"] = (names * layout.shape[1])[: layout.shape[1]] if names else None
    src = TiffSource(path, series, layout, dtype, label=label)
    return from_source(src), meta


# --------------------------------------------------------------------------- OME-Zarr


def _hex_rgba(color: Any) -> int:
    if color is None:
        return 0xFFFFFFFF
    if isinstance(color, int):
        return color & 0xFFFFFFFF
    s = str(color).lstrip("#")
    try:
        v = int(s, 16)
    except ValueError:
        return 0xFFFFFFFF
    return ((v << 8) | 0xFF) & 0xFFFFFFFF if len(s) <= 6 else v & 0xFFFFFFFF


def read_ome_zarr(
    path: str | os.PathLike[str], *, level: int = 0, storage_options: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """One resolution level of an OME-Zarr image (NGFF 0.1-0.5) as a lazy TCZYX dask array.

    Blocks are whole stored chunks (shards, where the array is sharded);
    metadata comes from ``multiscales`` (axes, scale transformations, units)
    and ``omero`` (channel labels and colours).
    """
    import dask.array as da
    import zarr

    url = os.fspath(path)
    check_scheme(url)  # before zarr hands the URL to fsspec
    label = os.path.basename(url.rstrip("/")) or url
    try:
        g = zarr.open_group(url, mode="r", storage_options=storage_options) if "://" in url else zarr.open_group(url, mode="r")
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise OMEArrowError(f"{label}: not a Zarr group: {exc}") from None
    attrs = dict(g.attrs)
    ome = attrs.get("ome", attrs)
    ms_all = ome.get("multiscales")
    if not ms_all:
        raise OMEArrowError(f"{label}: no 'multiscales' metadata: not an OME-Zarr image")
    ms = ms_all[0]
    raw_axes = ms.get("axes") or ["t", "c", "z", "y", "x"]
    axes = [(a["name"] if isinstance(a, dict) else str(a)).lower() for a in raw_axes]
    units = {(a["name"]).lower(): a.get("unit") for a in raw_axes if isinstance(a, dict)}
    datasets = ms.get("datasets") or []
    if not (0 <= level < len(datasets)):
        raise OMEArrowError(f"{label}: level {level} out of range for {len(datasets)} multiscale level(s)")
    ds = datasets[level]
    try:
        arr = g[ds["path"]]
    except KeyError:
        raise OMEArrowError(f"{label}: multiscales dataset path {ds['path']!r} is missing") from None
    if len(axes) != arr.ndim:
        raise OMEArrowError(f"{label}/{ds['path']}: {arr.ndim}-D array but axes {axes}")
    unknown = [a for a in axes if a not in "tczyx"]
    if unknown:
        raise OMEArrowError(f"{label}: axes {unknown} have no OME-Arrow counterpart (TCZYX)")
    scale = [1.0] * len(axes)
    for tr in [*(ds.get("coordinateTransformations") or []), *(ms.get("coordinateTransformations") or [])]:
        if tr.get("type") == "scale" and "scale" in tr:
            scale = [a * float(b) for a, b in zip(scale, tr["scale"])]
    pixel_dtype(arr.dtype, what=f"{label}/{ds['path']} dtype")
    unit_chunks = getattr(arr, "shards", None) or arr.chunks
    d = da.from_zarr(arr, chunks=unit_chunks, name=f"zarr-read-{_token(url, ds['path'])}")
    order = list(axes)
    for a in "tczyx":
        if a not in order:
            d = d[..., None]
            order.append(a)
    d = d.transpose([order.index(a) for a in "tczyx"])
    meta: dict[str, Any] = {"name": ms.get("name") or label, "image_id": ms.get("name") or label}
    for a in "zyx":
        if a in axes:
            meta[f"physical_size_{a}"] = float(scale[axes.index(a)])
            meta[f"physical_size_{a}_unit"] = _unit(units.get(a))
    omero = ome.get("omero") or attrs.get("omero") or {}
    chans = omero.get("channels") or []
    if chans and len(chans) == d.shape[1]:
        meta["channels"] = [
            {"id": f"ch-{i}", "name": str(ch.get("label") or f"C{i}"), "color_rgba": _hex_rgba(ch.get("color"))}
            for i, ch in enumerate(chans)
        ]
    return d, meta


def _unit(u: Any) -> str:
    if u in (None, "micrometer", "micron"):
        return "µm"
    return {"nanometer": "nm", "millimeter": "mm", "meter": "m"}.get(str(u), str(u))


def _token(*parts: Any) -> str:
    from dask.base import tokenize

    return tokenize(*parts)


# --------------------------------------------------------------------------- converters


_WRITE_OPTS = (
    "chunk_shape",
    "chunk_encoding",
    "chunk_compression",
    "chunk_compression_level",
    "compression",
    "image_id",
    "name",
    "image_type",
    "channel_names",
    "column_name",
    "scheduler",
    "client",
)
_DATASET_OPTS = (
    "chunk_shape",
    "compression",
    "layout",
    "access_pattern",
    "target_chunk_mb",
    "chunk_rows_per_row_group",
    "pixel_dtype",
    "clamp",
    "channel_names",
    "scheduler",
    "client",
)


def _write(arr: Any, meta: dict[str, Any], dst: str, fmt: str, opts: dict[str, Any]) -> str:
    from dask_loom.ome._dataset import write_ome_arrow_dataset
    from dask_loom.ome._write import WithMeta, to_ome_parquet

    {k: meta[k] for k in ("physical_size_x", "physical_size_y", "physical_size_z") if k in meta}
    units = [meta.get(f"physical_size_{a}_unit") for a in "xyz" if meta.get(f"physical_size_{a}_unit")]
    if opts.get("channel_names") is not None:
        meta = {**meta, "channels": None}
    overwrite = bool(opts.pop("overwrite", False))
    if fmt == "record":
        bad = sorted(set(opts) - set(_WRITE_OPTS))
        if bad:
            raise TypeError(f"options {bad} do not apply to a single-record OME-Parquet file")
        if os.path.exists(dst) and not overwrite:
            raise FileExistsError(f"{dst}: exists; pass overwrite=True to replace it")
        kw: dict[str, Any] = {"physical_size_unit": units[0] if units else None}
        kw.update(opts)
        return to_ome_parquet(WithMeta(arr, meta), dst, **kw)
    bad = sorted(set(opts) - set(_DATASET_OPTS) - {"image_id"})
    if bad:
        raise TypeError(f"options {bad} do not apply to a typed chunk dataset")
    image_id = opts.pop("image_id", None) or meta.get("image_id") or meta.get("name")
    kw = {"physical_size_unit": units[0] if units else None, "overwrite": overwrite}
    kw.update(opts)
    write_ome_arrow_dataset({str(image_id): WithMeta(arr, meta)}, dst, **kw)
    return dst


def _kind(src: str, storage_options: dict[str, Any] | None) -> str:
    from dask_loom.ome._read import is_dataset
    from dask_loom.storage import FileSpec

    spec = FileSpec.from_path(src, storage_options)
    if not spec.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    low = src.lower().rstrip("/")
    if low.endswith((".tif", ".tiff", ".btf", ".tf8")):
        return "tiff"
    if low.endswith((".parquet", ".pq")):
        return "ome-arrow"
    if spec.is_local and os.path.isdir(spec.url):
        if is_dataset(spec):
            return "ome-arrow"
        if any(os.path.exists(os.path.join(spec.url, n)) for n in ("zarr.json", ".zattrs", ".zgroup")):
            return "zarr"
    elif low.endswith(".zarr"):
        return "zarr"
    if spec.is_local and os.path.isfile(spec.url):
        with open(spec.url, "rb") as f:
            head = f.read(4)
        if head[:2] in (b"II", b"MM"):
            return "tiff"
        if head == b"PAR1":
            return "ome-arrow"
    raise OMEArrowError(f"{src}: neither TIFF, OME-Zarr nor OME-Arrow (by name and content)")


def image_kind(src: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> str | None:
    """``"tiff"``, ``"zarr"`` (OME-Zarr) or ``"ome-arrow"`` for what :func:`convert_to_ome_arrow` reads, else None.

    For command lines that route ``convert`` by source: a Loom file gives None.
    """
    try:
        kind = _kind(os.fspath(src), storage_options)
    except (OMEArrowError, FileNotFoundError):
        return None
    if kind == "zarr":
        import zarr

        try:
            g = zarr.open_group(os.fspath(src), mode="r")
        except Exception:
            return None
        attrs = dict(g.attrs)
        if "multiscales" not in attrs.get("ome", attrs):
            return None
    return kind


def convert_to_ome_arrow(src: str | os.PathLike[str], dst: str | os.PathLike[str], **opts: Any) -> str:
    """Convert OME-TIFF, OME-Zarr (or OME-Arrow, re-chunked) to OME-Arrow, streaming.

    The entry point of ``dask-loom convert`` for images.

    Parameters
    ----------
    src
        An OME-TIFF/TIFF file, an OME-Zarr group, an OME-Parquet file or a
        typed chunk dataset.
    dst
        ``*.parquet``/``*.pq``: a single-record OME-Parquet file; anything
        else: a typed chunk dataset directory.
    **opts
        ``format`` (``"record"``/``"dataset"``, overriding the suffix rule),
        ``series`` (TIFF), ``level`` (OME-Zarr), ``storage_options``,
        ``overwrite``, and the writer options (``chunk_shape``,
        ``chunk_encoding``, ``chunk_compression``, ``compression``,
        ``channel_names``, ``image_id``, ``name``, ``scheduler``, ``client``, ...).

    Returns
    -------
    str
        *dst*.

    Examples
    --------
    >>> import numpy as np, tifffile, tempfile, os, dask_loom
    >>> d = tempfile.mkdtemp()
    >>> a = np.arange(2 * 3 * 5 * 7, dtype="uint8").reshape(2, 3, 5, 7)
    >>> tifffile.imwrite(os.path.join(d, "a.ome.tif"), a, ome=True, metadata={"axes": "ZCYX"})
    >>> out = convert_to_ome_arrow(os.path.join(d, "a.ome.tif"), os.path.join(d, "a.ome.parquet"))
    >>> v = dask_loom.open_ome_arrow(out, layout="ZCYX")
    >>> v.shape, bool((v.to_numpy() == a).all())
    ((2, 3, 5, 7), True)
    >>> import shutil; shutil.rmtree(d)
    """
    src, dst = os.fspath(src), os.fspath(dst)
    check_scheme(src)
    check_scheme(dst)
    fmt = opts.pop("format", None) or ("record" if dst.lower().endswith((".parquet", ".pq")) else "dataset")
    if fmt not in ("record", "dataset"):
        raise SelectionError(f"format {fmt!r} must be 'record' or 'dataset'")
    series = opts.pop("series", 0)
    level = opts.pop("level", 0)
    storage_options = opts.pop("storage_options", None)
    kind = _kind(src, storage_options)
    if kind == "tiff":
        arr, meta = read_ome_tiff(src, series=series)
    elif kind == "zarr":
        arr, meta = read_ome_zarr(src, level=level, storage_options=storage_options)
    else:
        from dask_loom.ome._open import open_ome_arrow
        from dask_loom.ome._write import _meta_of

        view = open_ome_arrow(src, storage_options=storage_options, layout="TZCYX")
        arr = view.to_dask().transpose(0, 2, 1, 3, 4)
        meta = _meta_of(view.image)
    return _write(arr, meta, dst, fmt, opts)


def ome_tiff_to_ome_arrow(src: str | os.PathLike[str], dst: str | os.PathLike[str], **opts: Any) -> str:
    """Convert an OME-TIFF series to OME-Arrow (see :func:`convert_to_ome_arrow`)."""
    if _kind(os.fspath(src), None) != "tiff":
        raise OMEArrowError(f"{os.fspath(src)}: not a TIFF file")
    return convert_to_ome_arrow(src, dst, **opts)


def ome_zarr_to_ome_arrow(src: str | os.PathLike[str], dst: str | os.PathLike[str], **opts: Any) -> str:
    """Convert an OME-Zarr image level to OME-Arrow (see :func:`convert_to_ome_arrow`)."""
    if _kind(os.fspath(src), opts.get("storage_options")) != "zarr":
        raise OMEArrowError(f"{os.fspath(src)}: not an OME-Zarr group")
    return convert_to_ome_arrow(src, dst, **opts)
