"""``LazyTensorView``: a tensor view whose image is loaded (and selection applied) on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
from dask.base import tokenize

from dask_loom.ome._selection import Index, normalize_layout
from dask_loom.ome._views import TensorView

__all__ = ["LazyTensorView"]

# --------------------------------------------------------------------------- lazy


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class LazyTensorView:
    """A deferred ``TensorView`` plan with Polars-style ``collect()``.

    ``loader()`` returns the record; ``resolver(kwargs)`` (if given) builds the
    ``TensorView`` directly.  ``collect()`` runs once (under a lock) and is
    cached; ``select``/``with_layout`` return new plans.  Views opened with
    ``dask_loom.open_ome_arrow(..., lazy=True)`` resolve to a view that reads
    metadata only, so ``shape``/``dtype``/``to_dask()`` never read pixels.

    Examples
    --------
    >>> import numpy as np, dask_loom
    >>> rec = dask_loom.to_ome_arrow(np.zeros((1, 2, 3, 4, 5), "uint8"))
    >>> lazy = dask_loom.LazyTensorView(loader=lambda: rec, layout="ZCYX", t=0)
    >>> lazy.layout, lazy.select(c=1).shape
    ('ZCHW', (3, 1, 4, 5))
    """

    def __init__(
        self,
        *,
        loader: Callable[[], Any],
        resolver: Callable[[dict[str, Any]], TensorView] | None = None,
        t: Index = None,
        z: Index = None,
        c: Index = None,
        roi: tuple[int, int, int, int] | None = None,
        roi3d: tuple[int, int, int, int, int, int] | None = None,
        roi_nd: tuple[int, ...] | None = None,
        roi_type: Literal["2d", "2d_timelapse", "3d", "4d"] | None = None,
        tile: tuple[int, int] | None = None,
        layout: str | None = None,
        dtype: Any = None,
        chunk_policy: Literal["auto", "combine", "keep"] = "auto",
        channel_policy: Literal["error", "first"] = "error",
    ) -> None:
        self._loader = loader
        self._resolver = resolver
        self._kwargs: dict[str, Any] = {
            "t": t,
            "z": z,
            "c": c,
            "roi": roi,
            "roi3d": roi3d,
            "roi_nd": roi_nd,
            "roi_type": roi_type,
            "tile": tile,
            "layout": layout,
            "dtype": dtype,
            "chunk_policy": chunk_policy,
            "channel_policy": channel_policy,
        }
        normalize_layout(layout)  # a bad layout string fails now; axis drops fail at collect()
        self._resolved: TensorView | None = None
        self._collect_lock = threading.Lock()

    def _spawn(self, **updates: Any) -> LazyTensorView:
        kw = dict(self._kwargs)
        kw.update(updates)
        return LazyTensorView(loader=self._loader, resolver=self._resolver, **kw)

    def collect(self) -> TensorView:
        """Materialise the plan into a ``TensorView`` (once; cached)."""
        if self._resolved is not None:
            return self._resolved
        with self._collect_lock:
            if self._resolved is None:
                if self._resolver is not None:
                    self._resolved = self._resolver(dict(self._kwargs))
                else:
                    self._resolved = TensorView(self._loader(), **self._kwargs)
        return self._resolved

    def with_layout(self, layout: str) -> LazyTensorView:
        """A new lazy plan with another layout."""
        return self._spawn(layout=layout)

    def select(
        self,
        *,
        t: Any = _UNSET,
        z: Any = _UNSET,
        c: Any = _UNSET,
        roi: Any = _UNSET,
        roi3d: Any = _UNSET,
        roi_nd: Any = _UNSET,
        roi_type: Any = _UNSET,
        tile: Any = _UNSET,
    ) -> LazyTensorView:
        """A new lazy plan with these selections replaced (unset ones kept)."""
        given = {
            "t": t,
            "z": z,
            "c": c,
            "roi": roi,
            "roi3d": roi3d,
            "roi_nd": roi_nd,
            "roi_type": roi_type,
            "tile": tile,
        }
        return self._spawn(**{k: v for k, v in given.items() if v is not _UNSET})

    @property
    def dtype(self) -> np.dtype:
        """The tensor dtype (collects)."""
        return self.collect().dtype

    @property
    def device(self) -> str:
        """``"cpu"`` (without collecting)."""
        return "cpu" if self._resolved is None else self._resolved.device

    @property
    def layout(self) -> str:
        """The layout, normalised like ``TensorView.layout`` (collects only when none was given)."""
        given = normalize_layout(self._kwargs.get("layout"))
        return given if given is not None else self.collect().layout

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor shape (collects)."""
        return self.collect().shape

    @property
    def strides(self) -> tuple[int, ...]:
        """Byte strides (collects)."""
        return self.collect().strides

    def to_numpy(self, *, contiguous: bool = False) -> np.ndarray:
        """Collect and read as numpy."""
        return self.collect().to_numpy(contiguous=contiguous)

    def to_dlpack(self, *, device: str = "cpu", contiguous: bool = True, mode: str = "arrow") -> Any:
        """Collect and export as DLPack (see ``TensorView.to_dlpack``)."""
        return self.collect().to_dlpack(device=device, contiguous=contiguous, mode=mode)

    def to_torch(self, *, device: str = "cpu", contiguous: bool = True, mode: str = "arrow") -> Any:
        """Collect and convert to torch."""
        return self.collect().to_torch(device=device, contiguous=contiguous, mode=mode)

    def to_jax(self, *, device: str = "cpu", contiguous: bool = True, mode: str = "arrow") -> Any:
        """Collect and convert to JAX."""
        return self.collect().to_jax(device=device, contiguous=contiguous, mode=mode)

    def iter_dlpack(
        self,
        *,
        batch_size: int | None = None,
        tile_size: tuple[int, int] | None = None,
        tiles: tuple[int, int] | None = None,
        shuffle: bool = False,
        seed: int | None = None,
        prefetch: int = 0,
        device: str = "cpu",
        contiguous: bool = True,
        mode: str = "arrow",
    ) -> Iterator[Any]:
        """Collect and iterate (see ``TensorView.iter_dlpack``)."""
        return self.collect().iter_dlpack(
            batch_size=batch_size,
            tile_size=tile_size,
            tiles=tiles,
            shuffle=shuffle,
            seed=seed,
            prefetch=prefetch,
            device=device,
            contiguous=contiguous,
            mode=mode,
        )

    def iter_tiles_3d(
        self,
        *,
        tile_size: tuple[int, int, int],
        shuffle: bool = False,
        seed: int | None = None,
        prefetch: int = 0,
        device: str = "cpu",
        contiguous: bool = True,
        mode: str = "numpy",
    ) -> Iterator[Any]:
        """Collect and iterate 3-D tiles (see ``TensorView.iter_tiles_3d``)."""
        return self.collect().iter_tiles_3d(
            tile_size=tile_size,
            shuffle=shuffle,
            seed=seed,
            prefetch=prefetch,
            device=device,
            contiguous=contiguous,
            mode=mode,
        )

    def to_dask(self, *, chunks: Any = None) -> Any:
        """The plan as a dask array (collects metadata only for file-backed views)."""
        return self.collect().to_dask(chunks=chunks)

    def __dask_loom_source__(self, layer: str | None = None) -> Any:
        """As ``TensorView.__dask_loom_source__`` (collects metadata only for file-backed views)."""
        return self.collect().__dask_loom_source__(layer)

    def to_xarray(self, *, chunks: Any = None, name: str | None = None) -> Any:
        """The plan as a lazy ``xarray.DataArray`` (see ``TensorView.to_xarray``)."""
        return self.collect().to_xarray(chunks=chunks, name=name)

    def __getstate__(self) -> dict[str, Any]:
        return {"_loader": self._loader, "_resolver": self._resolver, "_kwargs": self._kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._resolved = None
        self._collect_lock = threading.Lock()

    def __dask_tokenize__(self) -> Any:
        return ("LazyTensorView", tokenize(self._loader), tokenize(self._resolver), tokenize(self._kwargs))

    def __repr__(self) -> str:
        state = "collected" if self._resolved is not None else "pending"
        return f"LazyTensorView({state}, {', '.join(f'{k}={v!r}' for k, v in self._kwargs.items() if v is not None)})"
