"""What the operations accept, turned into chunk sources: one resolver for every format.

``dask_loom.map``/``aggregate``/``scan``/``permute`` take a Loom layer or
connection, a ``ZarrArray``, a ``MappedCollection``, a ``TensorView`` /
``LazyTensorView``, a dask array or any :class:`~dask_loom.blocks.ChunkSource`.
:func:`as_source` turns each into a :class:`SourceInfo`: the chunk sources to
read (several, stacked along axis 0, for a collection of files), the format
name used in task names (``loom``, ``zarr``, ``h5ad``, ``ome`` ...), how the
object's axes map onto the source's, and what the format allows (obs labels by
key, an in-place permutation).

Formats adapt themselves to the operations through one duck-typed hook,
``obj.__dask_loom_source__(layer=None) -> SourceInfo``; this module imports no
format.  A dask array built by :func:`~dask_loom.blocks.from_source` is read
through its source; any other dask array takes the generic blockwise path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dask_loom.blocks import ChunkSource, source_of
from dask_loom.errors import OperationError, UnsupportedSourceError

__all__ = ["SourceInfo", "as_source", "format_of", "resolve"]


def format_of(prefix: str) -> str:
    """The format name of a read prefix: ``"zarr-read"`` -> ``"zarr"``.

    Examples
    --------
    >>> format_of("loom-read"), format_of("h5ad-read"), format_of("ome")
    ('loom', 'h5ad', 'ome')
    """
    return prefix[: -len("-read")] if prefix.endswith("-read") else prefix


@dataclass(frozen=True, eq=False)
class SourceInfo:
    """An accepted object as the operations see it.

    Parameters
    ----------
    parts
        Chunk sources, stacked along axis 0 (one for an ordinary array; one
        per file for a collection).  Empty when *array* is given.
    format
        Format name for task names (``<format>-map`` ...).
    label
        Names the object in error messages (file, store, path).
    axes
        Axis ``i`` of the object is axis ``axes[i]`` of the sources (a
        transposed or squeezed view); source axes not listed have size 1.
        ``None``: the same axes.
    array
        A dask array read through its own graph (the generic path).
    labels
        For collections: obs key -> ``(codes, categories)``, one code per row
        (``-1`` where the label is missing).
    permute
        ``permute(ordering, source_axis)`` rewrites the object in place, as a
        transaction; ``None`` when it is read-only (*read_only* says why).
    compute
        Default ``scheduler``/``client`` of the object (a connection's own).
    """

    parts: tuple[Any, ...] = ()
    format: str = "dask"
    label: str = "dask array"
    axes: tuple[int, ...] | None = None
    array: Any = None
    labels: Callable[[str], tuple[np.ndarray, np.ndarray]] | None = None
    permute: Callable[[np.ndarray, int], None] | None = None
    read_only: str = "it is not writable storage"
    compute: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_array(
        cls, array: Any, *, format: str | None = None, label: str | None = None, **kw: Any
    ) -> SourceInfo:
        """The info of a dask array: its source when :func:`from_source` built it, else the generic path."""
        src = source_of(array)
        if src is not None:
            dense = getattr(src, "dense_source", None)
            if dense is not None and "axes" not in kw:
                # CSR blocks made from dense stored chunks (a Loom layer's sparse view):
                # reduce the stored chunks with the fused dense kernels instead of building
                # CSR first; a transposed view (cells as rows) is the source's axes swapped.
                return cls.from_source(
                    dense, format=format, label=label, axes=(1, 0) if src.transpose else None, **kw
                )
            return cls.from_source(src, format=format, label=label, **kw)
        if format is None:
            from dask.utils import key_split

            name = key_split(array.name)
            format = format_of(name) if name.endswith("-read") else "dask"
        return cls(array=array, format=format, label=label or f"dask array {array.name!r}", **kw)

    @classmethod
    def from_source(
        cls, source: Any, *, format: str | None = None, label: str | None = None, **kw: Any
    ) -> SourceInfo:
        """The info of one chunk source."""
        return cls(
            parts=(source,),
            format=format or format_of(str(source.prefix)),
            label=label or str(getattr(source, "label", type(source).__name__)),
            **kw,
        )

    # -- shape of the sources and of the object -------------------------------------------

    @property
    def source_shape(self) -> tuple[int, ...]:
        if self.array is not None:
            return tuple(int(s) for s in self.array.shape)
        first = tuple(int(s) for s in self.parts[0].shape)
        return (sum(int(p.shape[0]) for p in self.parts), *first[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the object (its own axis order)."""
        s = self.source_shape
        return s if self.axes is None else tuple(s[a] for a in self.axes)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        if self.array is not None:
            return np.dtype(self.array.dtype)
        return np.dtype(self.parts[0].dtype)

    @property
    def sparse(self) -> bool:
        """Whether blocks can come as ``scipy.sparse`` CSR (a CSR file, or a dask array of CSR blocks)."""
        if self.array is not None:
            from dask_loom._lazy import issparse

            return issparse(getattr(self.array, "_meta", None))
        return any(getattr(p, "sparse", False) for p in self.parts)

    @property
    def offsets(self) -> list[int]:
        """Row offset of each part."""
        out, pos = [], 0
        for p in self.parts:
            out.append(pos)
            pos += int(p.shape[0])
        return out

    def source_axis(self, axis: Any, what: str) -> int:
        """The source axis of the object's *axis* (negative counts from the end)."""
        nd = self.ndim
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise OperationError(f"{what}: axis must be an integer, not {axis!r} ({self.label})")
        a = int(axis)
        if not -nd <= a < nd:
            raise OperationError(
                f"{what}: axis {a} is out of range for {self.label}, which has {nd} axes (shape {self.shape})"
            )
        a %= nd
        return a if self.axes is None else self.axes[a]

    def to_view(self, block: Any) -> Any:
        """A block in source axis order, in the object's axis order (transposed, size-1 axes dropped)."""
        if self.axes is None:
            return block
        rest = [a for a in range(len(self.source_shape)) if a not in self.axes]
        moved = np.transpose(block, (*self.axes, *rest))
        return moved.reshape(moved.shape[: len(self.axes)])


def _dask_array_type() -> Any:
    mod = sys.modules.get("dask.array")
    return getattr(mod, "Array", None) if mod is not None else None


def resolve(x: Any, *, layer: str | None = None, what: str = "dask_loom") -> SourceInfo:
    """The :class:`SourceInfo` of *x* (see the module docstring for what is accepted)."""
    if isinstance(x, SourceInfo):
        return x
    hook = getattr(type(x), "__dask_loom_source__", None)
    if hook is not None:
        return hook(x, layer=layer)
    if layer is not None:
        raise OperationError(
            f"{what}: layer={layer!r} applies to Loom connections and collections, not to {type(x).__name__}"
        )
    array_type = _dask_array_type()
    if array_type is not None and isinstance(x, array_type):
        return SourceInfo.from_array(x)
    if isinstance(x, ChunkSource):
        return SourceInfo.from_source(x)
    kind = f"{type(x).__module__}.{type(x).__qualname__}"
    hint = (
        " (wrap it with dask.array.from_array to run on it)"
        if hasattr(x, "shape") and hasattr(x, "dtype")
        else ""
    )
    raise UnsupportedSourceError(
        f"{what}: cannot use a {kind}: it is not chunked storage. Pass a Loom layer or connection, a ZarrArray, "
        f"a MappedCollection, a TensorView, a dask array or a ChunkSource{hint}"
    )


def as_source(x: Any, *, layer: str | None = None) -> tuple[Any, SourceInfo]:
    """``(source, info)`` for an accepted object.

    *source* is the one :class:`~dask_loom.blocks.ChunkSource` to read, the
    list of per-file sources of a collection, or the dask array itself when
    there is no source behind it (the generic blockwise path).

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> src, info = as_source(da.ones((4, 6), chunks=2))
    >>> info.format, info.shape, src is info.array
    ('dask', (4, 6), True)
    """
    info = resolve(x, layer=layer)
    if info.array is not None:
        return info.array, info
    return (info.parts[0] if len(info.parts) == 1 else list(info.parts)), info
