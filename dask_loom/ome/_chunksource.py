"""A whole OME image as a chunk source (see :mod:`dask_loom.blocks`), and its dask array helpers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask.base import tokenize

from dask_loom.ome._read import (
    _Image,
    read_tzchw,
)

__all__ = ["OMEChunkSource"]


@dataclass(frozen=True, eq=False)
class OMEChunkSource:
    """Chunk source (see :mod:`dask_loom.blocks`) of a whole image in TZCYX order."""

    image: _Image
    dtype: np.dtype
    prefix: str = "ome-read"

    @property
    def shape(self) -> tuple[int, ...]:
        t, c, z, y, x = self.image.meta.shape
        return (t, z, c, y, x)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        g = self.image.index().grid or (1, 1, 1, self.image.meta.size_y, self.image.meta.size_x)
        return (g[0], g[2], g[1], g[3], g[4])

    @property
    def label(self) -> str:
        return self.image.label

    def read_block(self, region: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
        ts, zs, cs, ys, xs = region
        return read_tzchw(
            self.image,
            range(ts.start, ts.stop),
            range(zs.start, zs.stop),
            range(cs.start, cs.stop),
            (xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start),
            self.dtype,
        )

    def __dask_tokenize__(self) -> Any:
        return ("OMEChunkSource", self.image.token(), np.dtype(self.dtype).str)


def _read_region(source: OMEChunkSource, region: tuple[slice, ...], *args: Any, **kwargs: Any) -> np.ndarray:
    return source.read_block(region)


def _shared_source_array(source: OMEChunkSource, plan: Any) -> Any:
    """Like ``blocks.from_source``, with the source one key of the graph (not inlined)."""
    import dask.array as da
    from dask.array.core import graph_from_arraylike

    name = f"{source.prefix}-{tokenize(source, plan)}"
    graph = graph_from_arraylike(
        source,
        plan,
        source.shape,
        name,
        getitem=_read_region,
        lock=False,
        asarray=False,
        dtype=source.dtype,
        inline_array=False,
    )
    return da.Array(graph, name, plan, meta=np.empty((0,) * 5, dtype=source.dtype))


def _as_slice(idx: tuple[int, ...], size: int) -> slice | list[int]:
    if len(idx) == size and idx == tuple(range(size)):
        return slice(None)
    if len(idx) >= 1:
        steps = {b - a for a, b in itertools.pairwise(idx)}
        if len(idx) == 1 or (len(steps) == 1 and next(iter(steps)) > 0):
            step = next(iter(steps)) if len(idx) > 1 else 1
            return slice(idx[0], idx[-1] + 1, step)
    return list(idx)
