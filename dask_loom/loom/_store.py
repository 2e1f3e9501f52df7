"""How each Loom element is laid out in a container, written through a ``TreeWriter``.

Shared by connection methods (one element at a time) and by whole-file
writers (``create``, ``permute``, ``combine``…), which write many elements
inside a single transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom.loom._common import AXIS_ATTRS, AXIS_GRAPHS, check_name, timestamp
from dask_loom.loom._values import normalize_for_write

if TYPE_CHECKING:
    pass

__all__ = [
    "LOOM_SPEC_VERSION",
    "init_layout",
    "put_attr",
    "put_global",
    "put_graph",
    "touch",
]

LOOM_SPEC_VERSION = "3.0.0"
GROUPS = ("attrs", "layers", "row_attrs", "col_attrs", "row_graphs", "col_graphs")


def touch(w: Any, *paths: str) -> None:
    """Write loompy's ``last_modified`` timestamp on *paths* and the root."""
    ts = timestamp()
    for p in (*paths, "/"):
        if w.exists(p):
            w.set_attr(p, "last_modified", ts)


def init_layout(w: Any, file_attrs: dict[str, Any] | None = None) -> None:
    """The empty spec-3 layout ``loompy.new`` writes."""
    for g in GROUPS:
        w.create_group(g)
    put_global(w, "LOOM_SPEC_VERSION", LOOM_SPEC_VERSION, in_group=True)
    put_global(w, "CreationDate", timestamp(), in_group=True)
    for k, v in (file_attrs or {}).items():
        put_global(w, k, "None" if v is None else v, in_group=True)


def _label(w: Any) -> str | None:
    """The file or store a writer writes, for messages."""
    label = getattr(w, "label", None)
    if label is None:
        label = getattr(getattr(w, "f", None), "filename", None)
    return None if label is None else str(label)


def _swap_in(w: Any, path: str, **kwargs: Any) -> None:
    head, _, tail = path.rpartition("/")
    tmp = f"{head}/.tmp-{tail}" if head else f".tmp-{tail}"
    w.delete(tmp)
    w.create_array(tmp, **kwargs)
    w.move(tmp, path)


def put_attr(
    w: Any, axis: int, name: str, values: Any, *, n: int | None = None, spec3: bool = True, stamp: bool = True, nested: bool = False
) -> None:
    """Write a row (axis 0) or column (axis 1) attribute, replacing any old one.

    ``nested=True`` (for copies such as ``convert``) accepts a flattened name
    ``"group/name"`` as the reader gives it for LoomExperiment's nested
    groups, and writes it back nested.
    """
    for part in name.split("/") if nested else [name]:
        check_name("Attribute", part, _label(w))
    arr, strings = normalize_for_write(values, name, spec3=spec3)
    if n and arr.shape[0] != n:
        raise ValueError(f"Attribute '{name}' must have exactly {n} values but {arr.shape[0]} were given")
    group = AXIS_ATTRS[axis]
    path = f"{group}/{name}"
    w.create_group(group)
    maxshape = (arr.shape[0],) if arr.ndim == 1 else (arr.shape[0], *([None] * (arr.ndim - 1)))
    _swap_in(w, path, data=arr, strings=strings, maxshape=maxshape)
    if stamp:
        touch(w, path, group)


def put_global(w: Any, name: str, value: Any, *, in_group: bool) -> None:
    """Write a global attribute: a dataset under ``/attrs`` (spec 3) or a root attribute."""
    check_name("Global attribute", name, _label(w))
    if not in_group:
        if isinstance(value, str):
            value = value.encode("ascii", "xmlcharrefreplace")
        w.set_attr("/", name, value)
        return
    w.create_group("attrs")
    path = f"attrs/{name}"
    if value is None:
        value = "None"
    if isinstance(value, (str, bytes)):
        v = value.decode("utf-8") if isinstance(value, bytes) else value
        w.create_array(path, data=np.array(v, dtype=object), strings=True, compression=None)
        return
    arr = np.asarray(value)
    if arr.dtype.kind in "SUO":
        # String arrays work (loompy raises here).
        out, _ = normalize_for_write(arr, name)
        w.create_array(path, data=out if arr.ndim else out.reshape(()), strings=True, compression=None)
    else:
        w.create_array(path, data=arr, compression=None)


def put_graph(w: Any, axis: int, name: str, g: Any, *, stamp: bool = True) -> None:
    """Write a graph as ``a``, ``b`` (int32) and ``w`` (float) vectors."""
    import scipy.sparse as sp

    check_name("Graph", name, _label(w))
    g = sp.coo_matrix(g)
    group = AXIS_GRAPHS[axis]
    path = f"{group}/{name}"
    weights = g.data if g.data.dtype.kind == "f" else g.data.astype(np.float64)
    w.create_group(group)
    tmp = f"{group}/.tmp-{name}"
    w.delete(tmp)
    w.create_group(tmp)
    w.create_array(f"{tmp}/a", data=g.row.astype(np.int32, copy=False), compression=None)
    w.create_array(f"{tmp}/b", data=g.col.astype(np.int32, copy=False), compression=None)
    w.create_array(f"{tmp}/w", data=weights, compression=None)
    w.move(tmp, path)
    if stamp:
        touch(w, path, group)
