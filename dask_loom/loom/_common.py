"""Small shared pieces of the Loom implementation."""

from __future__ import annotations

import abc
import datetime
from typing import Any

import numpy as np

from dask_loom.loom._values import materialize, spec_at_least

__all__ = ["AXIS_ATTRS", "AXIS_GRAPHS", "LEGACY_GRAPHS", "NamedMapping", "global_value", "read_spec_version", "scalar_text", "timestamp"]

AXIS_ATTRS = ("row_attrs", "col_attrs")
AXIS_GRAPHS = ("row_graphs", "col_graphs")
LEGACY_GRAPHS = ("row_edges", "col_edges")


def check_name(kind: str, name: Any, where: str | None = None, *, allow_empty: bool = False) -> str:
    """Refuse a layer/attribute/graph *name* that is not one safe path segment.

    A ``/`` is refused with loompy's message; so are empty names (except the
    main layer ``""``), ``.``/``..``, NUL bytes, backslashes and their
    percent-encodings, which would name another node or escape a ``.loom.zarr``
    store.  Raises :class:`~dask_loom.errors.InvalidNameError` (a ``KeyError``
    and a ``ValueError``).

    Examples
    --------
    >>> check_name("Layer", "spliced")
    'spliced'
    >>> check_name("Attribute", "..", "x.loom")
    Traceback (most recent call last):
    ...
    dask_loom.errors.InvalidNameError: x.loom: Attribute name '..' is not allowed: empty or all-dot segment '..'
    """
    from dask_loom.errors import InvalidKeyError, InvalidNameError
    from dask_loom.storage._stores import check_key

    if not isinstance(name, str):
        raise TypeError(f"{kind.lower()} names must be str, not {type(name).__name__}")
    prefix = f"{where}: " if where else ""
    if name == "" and allow_empty:
        return name
    if "/" in name:
        raise InvalidNameError(f"{prefix}{kind} name '{name}' cannot contain a slash (/)")
    if name == "":
        raise InvalidNameError(f"{prefix}{kind} name '' is not allowed: names must not be empty")
    try:
        check_key(name)
    except InvalidKeyError as exc:
        msg, head = str(exc), f"invalid store key {name!r}: "
        reason = msg[len(head) :] if msg.startswith(head) else msg
        raise InvalidNameError(f"{prefix}{kind} name {name!r} is not allowed: {reason}") from None
    return name


def timestamp() -> str:
    """A UTC timestamp as loompy writes them: ``20261122T012859.574926Z``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def scalar_text(value: Any) -> Any:
    """Decode a scalar-ish attribute value: bytes, 1-element byte/str arrays → ``str``."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "SOU":
        v = value.ravel()[0]
        return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
    if isinstance(value, np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    return value


def global_value(value: Any, spec: str) -> Any:
    """What ``ds.attrs[name]`` returns for a stored global attribute value (dataset or HDF5 attribute)."""
    if isinstance(value, np.ndarray) and value.ndim and value.size > 1:
        return materialize(value, spec=spec)
    out = scalar_text(value)
    if isinstance(out, str) and not is_spec3(spec):
        out = materialize(out.encode("utf-8"), spec=spec)
    if isinstance(out, np.ndarray) and out.ndim == 0:
        out = out[()]
    return out


def read_spec_version(tree: Any) -> str:
    """The Loom spec version of a container, as loompy infers it.

    Default ``"0.0.0"``; ``/attrs/LOOM_SPEC_VERSION`` if present; a root
    attribute ``LOOM_SPEC_VERSION`` (a string, bytes or a 1-element array, as
    R writers store it) overrides it.
    """
    version = "0.0.0"
    if tree.exists("attrs/LOOM_SPEC_VERSION"):
        version = str(scalar_text(materialize(tree.read("attrs/LOOM_SPEC_VERSION"))))
    root = tree.attrs("/")
    if "LOOM_SPEC_VERSION" in root:
        version = str(scalar_text(root["LOOM_SPEC_VERSION"]))
    return version.strip()


def is_spec3(version: str) -> bool:
    return spec_at_least(version, "3.0.0")


class NamedMapping(abc.ABC):
    """The read-only mapping protocol of loompy's managers, over an ordered ``_names`` list.

    ``keys()`` returns a list (as loompy's managers do), in file order with
    names added during the connection appended.
    """

    _names: list[str]

    @abc.abstractmethod
    def __getitem__(self, name: Any) -> Any:
        """The item called *name* (each manager defines what it returns)."""

    def keys(self) -> list[str]:
        return list(self._names)

    def items(self) -> Any:
        for name in self.keys():
            yield name, self[name]

    def values(self) -> Any:
        for name in self.keys():
            yield self[name]

    def __iter__(self) -> Any:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

