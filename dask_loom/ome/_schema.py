"""OME-Arrow schemas, pixel dtypes and chunk-shape choice.

The record layout follows ome-arrow 0.1.0 (``OME_ARROW_STRUCT`` and its byte
chunk variant); the typed chunk dataset follows ``ome_arrow.dataset``.  The
struct types are written out here rather than imported, so reading and
writing never needs the ``ome-arrow`` package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from dask_loom.errors import UnsupportedDtypeError

__all__ = [
    "channel_record",
    "CHUNK_TABLE_SCHEMA",
    "DATASET_MANIFEST",
    "IMAGE_TABLE_SCHEMA",
    "INDEX_TABLE_SCHEMA",
    "OME_ARROW_BYTE_STRUCT",
    "OME_ARROW_STRUCT",
    "OME_ARROW_TYPE",
    "OME_ARROW_VERSION",
    "SUPPORTED_DTYPES",
    "choose_chunk_shape",
    "default_channels",
    "is_ome_struct",
    "pixel_dtype",
]

OME_ARROW_TYPE = "ome.arrow"
# The record schema version we write: ome-arrow 0.1.0 reads it without a
# version-mismatch warning.
OME_ARROW_VERSION = "0.1.0"
DATASET_MANIFEST = "_ome_arrow_dataset.json"

_CHANNEL = pa.struct(
    [
        pa.field("id", pa.string()),
        pa.field("name", pa.string()),
        pa.field("emission_um", pa.float32()),
        pa.field("excitation_um", pa.float32()),
        pa.field("illumination", pa.string()),
        pa.field("color_rgba", pa.uint32()),
    ]
)

_PIXELS_META = pa.struct(
    [
        pa.field("dimension_order", pa.string()),
        pa.field("type", pa.string()),
        pa.field("size_x", pa.int32()),
        pa.field("size_y", pa.int32()),
        pa.field("size_z", pa.int32()),
        pa.field("size_c", pa.int16()),
        pa.field("size_t", pa.int32()),
        pa.field("physical_size_x", pa.float32()),
        pa.field("physical_size_y", pa.float32()),
        pa.field("physical_size_z", pa.float32()),
        pa.field("physical_size_x_unit", pa.string()),
        pa.field("physical_size_y_unit", pa.string()),
        pa.field("physical_size_z_unit", pa.string()),
        pa.field("channels", pa.list_(_CHANNEL)),
    ]
)

_CHUNK_GRID = pa.struct(
    [
        pa.field("order", pa.string()),
        pa.field("chunk_t", pa.int32()),
        pa.field("chunk_c", pa.int16()),
        pa.field("chunk_z", pa.int32()),
        pa.field("chunk_y", pa.int32()),
        pa.field("chunk_x", pa.int32()),
        pa.field("chunk_order", pa.string()),
    ]
)

_CHUNK_COORDS = [
    pa.field("t", pa.int32()),
    pa.field("c", pa.int16()),
    pa.field("z", pa.int32()),
    pa.field("y", pa.int32()),
    pa.field("x", pa.int32()),
    pa.field("shape_z", pa.int32()),
    pa.field("shape_y", pa.int32()),
    pa.field("shape_x", pa.int32()),
]

_LIST_CHUNK = pa.struct([*_CHUNK_COORDS, pa.field("pixels", pa.list_(pa.uint16()))])
_BYTE_CHUNK = pa.struct(
    [
        *_CHUNK_COORDS,
        pa.field("dtype", pa.string()),
        pa.field("compression", pa.string()),
        pa.field("pixel_bytes", pa.large_binary()),
    ]
)
_PLANE = pa.struct(
    [
        pa.field("z", pa.int32()),
        pa.field("t", pa.int32()),
        pa.field("c", pa.int16()),
        pa.field("pixels", pa.list_(pa.uint16())),
    ]
)


def _record_struct(chunk: pa.StructType) -> pa.StructType:
    return pa.struct(
        [
            pa.field("type", pa.string()),
            pa.field("version", pa.string()),
            pa.field("id", pa.string()),
            pa.field("name", pa.string()),
            pa.field("image_type", pa.string()),
            pa.field("acquisition_datetime", pa.timestamp("us")),
            pa.field("pixels_meta", _PIXELS_META),
            pa.field("chunk_grid", _CHUNK_GRID),
            pa.field("chunks", pa.list_(chunk)),
            pa.field("planes", pa.list_(_PLANE)),
            pa.field("masks", pa.null()),
        ]
    )


#: One image per value, pixel lists of uint16 (ome-arrow's ``OME_ARROW_STRUCT``).
OME_ARROW_STRUCT = _record_struct(_LIST_CHUNK)
#: The same with typed byte chunks (ome-arrow's ``OME_ARROW_BYTE_STRUCT``): any dtype, exact.
OME_ARROW_BYTE_STRUCT = _record_struct(_BYTE_CHUNK)

IMAGE_TABLE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("name", pa.string()),
        pa.field("image_type", pa.string()),
        pa.field("dtype", pa.string()),
        *[pa.field(f"size_{a}", pa.int32()) for a in "tczyx"],
        pa.field("layout", pa.string()),
        *[pa.field(f"chunk_{a}", pa.int32()) for a in "tczyx"],
        pa.field("compression", pa.string()),
        pa.field("channels_json", pa.string()),
    ]
)

_COORDS5 = [*[pa.field(a, pa.int32()) for a in "tczyx"], *[pa.field(f"shape_{a}", pa.int32()) for a in "tczyx"]]

CHUNK_TABLE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("chunk_id", pa.int64()),
        *_COORDS5,
        pa.field("dtype", pa.string()),
        pa.field("pixel_bytes", pa.large_binary()),
    ]
)

INDEX_TABLE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("chunk_id", pa.int64()),
        pa.field("row_group_id", pa.int32()),
        pa.field("row_index_in_group", pa.int32()),
        pa.field("fragment_path", pa.string()),
        *_COORDS5,
    ]
)

# numpy dtype names the format stores exactly (byte chunks); OME-XML's
# "float"/"double" names are accepted when reading.
SUPPORTED_DTYPES = (
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float32",
    "float64",
)
_ALIASES = {"float": "float32", "double": "float64", "single": "float32"}


def pixel_dtype(value: Any, *, what: str = "pixels_meta.type") -> np.dtype:
    """The native-order numpy dtype for an OME-Arrow pixel type.

    Raises :class:`~dask_loom.errors.UnsupportedDtypeError` naming *what* for
    types the format cannot hold exactly (complex, bool, strings, objects).

    Examples
    --------
    >>> pixel_dtype("uint16"), pixel_dtype("double"), pixel_dtype(np.dtype(">i1"))
    (dtype('uint16'), dtype('float64'), dtype('int8'))
    """
    if isinstance(value, str):
        name = _ALIASES.get(value.strip().lower(), value.strip().lower())
    else:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = repr(value)
    if name not in SUPPORTED_DTYPES:
        raise UnsupportedDtypeError(
            f"{what}: pixel type {value!r} is not supported; OME-Arrow stores {', '.join(SUPPORTED_DTYPES)}"
        )
    return np.dtype(name)


def is_ome_struct(type_: pa.DataType) -> bool:
    """True when *type_* has the shape of an OME-Arrow record (any version).

    Detection is by struct shape, not by column name: ``pixels_meta`` with
    ``size_x``/``size_y`` plus pixel data in ``planes`` or ``chunks``.

    Examples
    --------
    >>> is_ome_struct(OME_ARROW_STRUCT), is_ome_struct(pa.struct([pa.field("a", pa.int8())]))
    (True, False)
    """
    if not pa.types.is_struct(type_):
        return False
    names = {type_.field(i).name for i in range(type_.num_fields)}
    if "pixels_meta" not in names or not ({"planes", "chunks"} & names):
        return False
    pm = type_.field("pixels_meta").type
    if not pa.types.is_struct(pm):
        return False
    pm_names = {pm.field(i).name for i in range(pm.num_fields)}
    return {"size_x", "size_y"} <= pm_names


def default_channels(size_c: int, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Channel records for *size_c* channels (names default to ``C0``, ``C1`` ...)."""
    if names is not None and len(names) != size_c:
        raise ValueError(f"channel_names has {len(names)} names for {size_c} channels")
    return [
        {
            "id": f"ch-{i}",
            "name": str(names[i]) if names is not None else f"C{i}",
            "emission_um": 0.0,
            "excitation_um": 0.0,
            "illumination": "Unknown",
            "color_rgba": 0xFFFFFFFF,
        }
        for i in range(size_c)
    ]


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def choose_chunk_shape(
    shape: Sequence[int],
    dtype: Any,
    *,
    target_bytes: int | None = None,
) -> tuple[int, int, int, int, int]:
    """A TCZYX chunk shape for an image: one (t, c), square YX tiles, a Z slab.

    Chunks of about *target_bytes* (default ``dask_loom.ome-chunk-bytes``,
    2 MiB): small enough that a 512 x 512 region touches few of them, large
    enough that a whole-image read is not dominated by per-chunk overhead.

    Examples
    --------
    >>> choose_chunk_shape((4, 3, 32, 2048, 2048), "uint16")
    (1, 1, 16, 256, 256)
    >>> choose_chunk_shape((1, 1, 1, 72, 84), "uint16")
    (1, 1, 1, 72, 84)
    """
    from dask.utils import parse_bytes

    from dask_loom._config import get_config

    if len(shape) != 5:
        raise ValueError(f"shape {tuple(shape)} is not TCZYX (five axes)")
    _, _, sz, sy, sx = (max(1, int(s)) for s in shape)
    item = np.dtype(dtype).itemsize
    if target_bytes is None:
        v = get_config("ome-chunk-bytes")
        target_bytes = parse_bytes(v) if isinstance(v, str) else int(v)
    budget = max(1, int(target_bytes) // item)  # elements per chunk
    ty, tx = min(sy, 256), min(sx, 256)
    cz = max(1, min(sz, 16, budget // (ty * tx)))
    # A thin image (few planes) gets wider tiles instead of a deeper slab.
    while cz * ty * tx * 4 <= budget and (ty < sy or tx < sx):
        ty, tx = min(sy, ty * 2), min(sx, tx * 2)
    if cz * ty * tx > budget and cz > 1:
        cz = max(1, budget // (ty * tx))
        cz = _pow2_floor(cz) if cz < sz else cz
    return (1, 1, int(cz), int(ty), int(tx))


def grid_count(shape: Sequence[int], chunk: Sequence[int]) -> int:
    """Number of chunks of *chunk* shape covering *shape*."""
    return math.prod(-(-int(s) // int(c)) for s, c in zip(shape, chunk))


def channel_record(ch: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Channel *i* as the OME-Arrow ``channels`` struct holds it, defaults filled in."""
    color = ch.get("color_rgba")
    if color is None:
        color = 0xFFFFFFFF
    return {
        "id": str(ch.get("id") or f"ch-{i}"),
        "name": str(ch.get("name") if ch.get("name") is not None else f"C{i}"),
        "emission_um": float(ch.get("emission_um") or 0.0),
        "excitation_um": float(ch.get("excitation_um") or 0.0),
        "illumination": str(ch.get("illumination") or "Unknown"),
        "color_rgba": int(color) & 0xFFFFFFFF,
    }
