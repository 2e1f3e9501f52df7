"""Attribute values on their way in and out of a Loom file.

Deliberate differences from loompy (documented in docs/differences.md):
strings are decoded as UTF-8 (loompy drops non-ASCII characters of spec-3
files), and only the ``&#NNN;`` references that loompy's spec-2 writer
produces are decoded; no general HTML unescaping of file content, which would
turn a stored ``"a&amp;b"`` into ``"a&b"``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from dask_loom._lazy import issparse

__all__ = ["check_compound", "decode_strings", "materialize", "normalize_for_write", "spec_at_least"]

_CHARREF = re.compile(r"&#(\d{1,7});")


def spec_at_least(version: str, target: str) -> bool:
    """Compare dotted spec versions numerically (``"10.0.0" > "3.0.0"``)."""

    def parts(v: str) -> tuple[int, ...]:
        out = []
        for p in str(v).split("."):
            m = re.match(r"\d+", p)
            out.append(int(m.group()) if m else 0)
        return tuple(out)

    return parts(version) >= parts(target)


def _unref(s: str) -> str:
    if "&#" not in s:
        return s
    return _CHARREF.sub(lambda m: chr(int(m.group(1))) if int(m.group(1)) < 0x110000 else m.group(0), s)


def decode_strings(values: np.ndarray, *, charrefs: bool) -> np.ndarray:
    """Bytes or str elements → an ``object`` array of ``str`` (UTF-8, errors replaced)."""
    arr = np.asarray(values)
    out = np.empty(arr.shape, dtype=object)
    flat = arr.ravel()
    res = out.ravel()
    for i, v in enumerate(flat.tolist()):
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        elif not isinstance(v, str):
            v = str(v)
        res[i] = _unref(v) if charrefs else v
    return out


def materialize(values: Any, *, kind: str = "plain", enum: dict[int, str] | None = None, spec: str = "3.0.0") -> Any:
    """Turn raw stored values into what ``ds.ra``/``ds.ca``/``ds.attrs`` return."""
    arr = np.asarray(values) if not isinstance(values, (bytes, str)) else values
    if isinstance(arr, bytes):
        return _unref(arr.decode("utf-8", errors="replace")) if not spec_at_least(spec, "3.0.0") else arr.decode("utf-8", errors="replace")
    if isinstance(arr, str):
        return arr
    if kind == "enum" and enum is not None:
        labels = np.empty(arr.shape, dtype=object)
        flat = labels.ravel()
        for i, v in enumerate(arr.ravel().tolist()):
            flat[i] = enum.get(int(v), str(v))
        return labels
    if arr.dtype.kind in "SO" or arr.dtype.kind == "U":
        if arr.dtype.kind == "O" and arr.size and not isinstance(arr.ravel()[0], (bytes, str)):
            return arr
        return decode_strings(arr, charrefs=arr.dtype.kind == "S" or not spec_at_least(spec, "3.0.0"))
    return arr


def check_compound(dt: np.dtype, name: str = "") -> None:
    """Refuse compound dtypes whose fields are not fixed-size numbers, booleans or bytes (nested structs, objects, text)."""
    for field in dt.names or ():
        base = dt.fields[field][0].base
        if base.kind not in "biufS" or base.names is not None:
            raise TypeError(
                f"attribute {name!r}: compound field {field!r} has dtype {base}; "
                "only numbers, booleans and fixed-length bytes can be stored in compound attributes"
            )


def normalize_for_write(values: Any, name: str = "", *, spec3: bool = True) -> tuple[np.ndarray, bool]:
    """Prepare attribute values for writing: ``(array, is_string)``.

    Scalars become 1-element arrays, lists/tuples/``np.matrix``/sparse vectors
    become 1-D arrays, bools become ``uint8`` (as loompy stores them), strings
    and mixed objects become ``object`` arrays of ``str`` (N-D string arrays keep
    their shape, unlike loompy).
    """
    if issparse(values):
        values = values.toarray()
    if isinstance(values, np.matrix):
        values = np.asarray(values)
        if values.ndim == 2 and 1 in values.shape:
            values = values.ravel()
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8), False
    if arr.dtype.kind in "iuf":
        return arr, False
    if arr.dtype.names is not None:
        # Compound (struct) values, as R writers store embeddings and marker tables.
        check_compound(arr.dtype, name)
        return arr, False
    if arr.dtype.kind in "SUO":
        out = np.empty(arr.shape, dtype=object)
        flat = out.ravel()
        for i, v in enumerate(arr.ravel().tolist()):
            flat[i] = v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
        if not spec3:
            return np.array([s.encode("ascii", "xmlcharrefreplace") for s in out.ravel()]).reshape(out.shape), False
        return out, True
    raise TypeError(f"attribute {name!r}: cannot store values of dtype {arr.dtype}")
