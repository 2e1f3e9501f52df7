"""Selections of a tensor view: layouts, index normalisation, ROIs and tiles, policies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_loom.errors import SelectionError

_X = "\u00d7"  # the multiplication sign, as in the image sizes of messages


_TZCHW = "TZCHW"
_ALIASES = str.maketrans({"Y": "H", "X": "W"})
_ROI_TYPES = ("2d", "2d_timelapse", "3d", "4d")
Index = int | slice | Sequence[int] | None


def normalize_layout(layout: str | None) -> str | None:
    """Upper-case, Y->H and X->W, letters from TZCHW only, none repeated.

    Examples
    --------
    >>> normalize_layout("tzcyx"), normalize_layout("CYX"), normalize_layout(None)
    ('TZCHW', 'CHW', None)
    """
    if layout is None:
        return None
    out = str(layout).strip().upper().translate(_ALIASES)
    if not out:
        raise SelectionError("layout must be non-empty")
    bad = sorted(set(out) - set(_TZCHW))
    if bad:
        raise SelectionError(
            f"layout {layout!r}: letters {bad} are not axes; use T, Z, C plus Y/X (or H/W), e.g. 'CYX' or 'TZCYX'"
        )
    if len(set(out)) != len(out):
        raise SelectionError(f"layout {layout!r} repeats an axis")
    return out


@dataclass(frozen=True)
class _Selection:
    t: tuple[int, ...]
    z: tuple[int, ...]
    c: tuple[int, ...]
    roi: tuple[int, int, int, int]  # x, y, w, h


def _index(index: Index, size: int, name: str) -> tuple[int, ...]:
    if index is None:
        return tuple(range(size))
    if isinstance(index, (bool, np.bool_)):
        raise SelectionError(f"{name} index {index!r}: booleans are not indices")
    if isinstance(index, (int, np.integer)):
        i = int(index) + size if index < 0 else int(index)
        if not 0 <= i < size:
            raise SelectionError(f"{name} index {index} out of range for size_{name.lower()}={size}")
        return (i,)
    if isinstance(index, slice):
        return tuple(range(*index.indices(size)))
    if isinstance(index, (Sequence, np.ndarray)) and not isinstance(index, (str, bytes)):
        out = []
        for item in index:
            if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
                raise SelectionError(f"{name} indices must be integers, got {item!r}")
            i = int(item) + size if item < 0 else int(item)
            if not 0 <= i < size:
                raise SelectionError(f"{name} index {item} out of range for size_{name.lower()}={size}")
            out.append(i)
        return tuple(out)
    raise SelectionError(
        f"unsupported {name} index {index!r}: give an int, a slice, a sequence of ints or None"
    )


def _roi_nd(vals: tuple[int, ...], roi_type: str | None, size_t: int, size_z: int) -> tuple[Any, Any, Any]:
    if roi_type is None:
        if len(vals) == 4:
            roi_type = "2d"
        elif len(vals) == 8:
            roi_type = "4d"
        elif len(vals) == 6:
            raise SelectionError("roi_nd with 6 values is ambiguous; give roi_type='2d_timelapse' or '3d'")
        else:
            raise SelectionError(f"roi_nd must have 4, 6 or 8 values, got {len(vals)}")
    if roi_type not in _ROI_TYPES:
        raise SelectionError(f"roi_type {roi_type!r} is not one of {_ROI_TYPES}")
    need = {"2d": 4, "2d_timelapse": 6, "3d": 6, "4d": 8}[roi_type]
    if len(vals) != need:
        raise SelectionError(f"roi_type={roi_type!r} needs {need} values in roi_nd, got {len(vals)}")
    t_sel = z_sel = None

    def bounds(lo: int, hi: int, size: int, axis: str) -> slice:
        if lo < 0 or hi > size or hi <= lo:
            raise SelectionError(f"roi_nd {axis} bounds [{lo}, {hi}) are out of range for size_{axis}={size}")
        return slice(lo, hi)

    if roi_type == "2d":
        ymin, xmin, ymax, xmax = vals
    elif roi_type == "2d_timelapse":
        tmin, ymin, xmin, tmax, ymax, xmax = vals
        t_sel = bounds(tmin, tmax, size_t, "t")
    elif roi_type == "3d":
        zmin, ymin, xmin, zmax, ymax, xmax = vals
        z_sel = bounds(zmin, zmax, size_z, "z")
    else:
        tmin, zmin, ymin, xmin, tmax, zmax, ymax, xmax = vals
        t_sel = bounds(tmin, tmax, size_t, "t")
        z_sel = bounds(zmin, zmax, size_z, "z")
    if xmax <= xmin or ymax <= ymin:
        raise SelectionError(
            f"roi_nd spatial bounds need max > min, got y [{ymin}, {ymax}) x [{xmin}, {xmax})"
        )
    return (xmin, ymin, xmax - xmin, ymax - ymin), t_sel, z_sel


def _normalize_selection(
    meta: Any,
    *,
    t: Index,
    z: Index,
    c: Index,
    roi: tuple[int, ...] | None,
    roi3d: tuple[int, ...] | None,
    roi_nd: tuple[int, ...] | None,
    roi_type: str | None,
    tile: tuple[int, int] | None,
) -> _Selection:
    if roi_nd is not None:
        if roi is not None or roi3d is not None or tile is not None:
            raise SelectionError("give only one of roi_nd, roi3d, roi or tile")
        roi, t_from, z_from = _roi_nd(tuple(int(v) for v in roi_nd), roi_type, meta.size_t, meta.size_z)
        if t_from is not None:
            if t is not None:
                raise SelectionError("give either t or roi_nd time bounds, not both")
            t = t_from
        if z_from is not None:
            if z is not None:
                raise SelectionError("give either z or roi_nd depth bounds, not both")
            z = z_from
    elif roi_type is not None:
        raise SelectionError("roi_type needs roi_nd")
    if roi3d is not None:
        if roi is not None or tile is not None:
            raise SelectionError("give only one of roi3d, roi or tile")
        if z is not None:
            raise SelectionError("Provide either z or roi3d, not both.")
        if len(roi3d) != 6:
            raise SelectionError(f"roi3d must be (x, y, z, w, h, d), got {tuple(roi3d)}")
        x3, y3, z3, w3, h3, d3 = (int(v) for v in roi3d)
        if d3 <= 0:
            raise SelectionError(f"roi3d depth d={d3} must be positive")
        if z3 < 0 or z3 + d3 > meta.size_z:
            raise SelectionError(f"roi3d z range [{z3}, {z3 + d3}) is out of bounds for size_z={meta.size_z}")
        roi = (x3, y3, w3, h3)
        z = slice(z3, z3 + d3)
    t_idx = _index(t, meta.size_t, "T")
    z_idx = _index(z, meta.size_z, "Z")
    c_idx = _index(c, meta.size_c, "C")
    if roi is not None and tile is not None:
        raise SelectionError("give either roi or tile, not both")
    if tile is not None:
        roi = _tile_roi(meta, tile)
    if roi is None:
        roi = (0, 0, meta.size_x, meta.size_y)
    if len(roi) != 4:
        raise SelectionError(f"roi must be (x, y, w, h), got {tuple(roi)}")
    x, y, w, h = (int(v) for v in roi)
    if w <= 0 or h <= 0:
        raise SelectionError(f"roi {tuple(roi)}: width and height must be positive")
    if x < 0 or y < 0 or x + w > meta.size_x or y + h > meta.size_y:
        raise SelectionError(
            f"roi (x={x}, y={y}, w={w}, h={h}) is out of bounds for the {meta.size_x} {_X} {meta.size_y} (X {_X} Y) image"
        )
    return _Selection(t_idx, z_idx, c_idx, (x, y, w, h))


def _tile_roi(meta: Any, tile: tuple[int, int]) -> tuple[int, int, int, int]:
    if len(tile) != 2:
        raise SelectionError(f"tile must be (tile_y, tile_x), got {tuple(tile)}")
    ty, tx = (int(v) for v in tile)
    g = meta.chunk_grid or {}
    if not g:
        raise SelectionError("tile selection needs chunk_grid metadata (this image has no chunk grid)")
    try:
        cy, cx = int(g["chunk_y"]), int(g["chunk_x"])
    except (KeyError, TypeError, ValueError):
        raise SelectionError("chunk_grid is missing chunk_y/chunk_x") from None
    if cy <= 0 or cx <= 0:
        raise SelectionError(f"chunk_grid chunk sizes must be positive, got chunk_y={cy} chunk_x={cx}")
    if tx < 0 or ty < 0:
        raise SelectionError(f"tile indices {tuple(tile)} must be non-negative")
    x, y = tx * cx, ty * cy
    if x >= meta.size_x or y >= meta.size_y:
        raise SelectionError(
            f"tile {tuple(tile)} is out of bounds: the chunk grid has {-(-meta.size_y // cy)} {_X} "
            f"{-(-meta.size_x // cx)} tiles"
        )
    return x, y, min(cx, meta.size_x - x), min(cy, meta.size_y - y)


def _drops(layout: str, dims: dict[str, int], channel_policy: str) -> None:
    for d in _TZCHW:
        if d not in layout and dims[d] != 1 and not (d == "C" and channel_policy == "first"):
            raise SelectionError(
                f"layout '{layout}' drops non-singleton dimension '{d}' (size {dims[d]}); "
                + (
                    "select one channel or pass channel_policy='first'"
                    if d == "C"
                    else f"select one {d} index"
                )
            )


def _check_policy(value: str, allowed: tuple[str, ...], name: str) -> str:
    v = str(value).strip().lower()
    if v not in allowed:
        # ome-arrow's wording first: code matches on "Unsupported chunk_policy" etc.
        raise SelectionError(f"Unsupported {name} '{value}'. Expected one of: {', '.join(allowed)}.")
    return v
