"""loompy's deprecated ``LoomConnection`` methods, kept so old scripts run (with a warning)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__: list[str] = []


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"'{old}' is deprecated (as in loompy); use {new} instead", DeprecationWarning, stacklevel=3
    )


class _Deprecated:
    """loompy's deprecated ``LoomConnection`` methods, kept so old scripts run (with a warning)."""

    def set_layer(
        self, name: str, matrix: Any, chunks: Any = None, dtype: Any = None, compression_opts: Any = None
    ) -> None:
        _deprecated("set_layer", "ds.layers[name] = matrix")
        self.layers[name] = matrix if dtype is None else np.asarray(matrix, dtype=dtype)  # type: ignore[attr-defined]

    def set_attr(self, name: str, values: Any, axis: int = 0, dtype: Any = None) -> None:
        _deprecated("set_attr", "ds.ra[name] = values or ds.ca[name] = values")
        (self.ra if axis == 0 else self.ca)[name] = (
            values if dtype is None else np.asarray(values, dtype=dtype)
        )  # type: ignore[attr-defined]

    def delete_attr(self, name: str, axis: int = 0) -> None:
        _deprecated("delete_attr", "del ds.ra[name] or del ds.ca[name]")
        del (self.ra if axis == 0 else self.ca)[name]  # type: ignore[attr-defined]

    def list_edges(self, *, axis: int) -> list[str]:
        _deprecated("list_edges", "ds.row_graphs.keys() or ds.col_graphs.keys()")
        return (self.row_graphs if axis == 0 else self.col_graphs).keys()  # type: ignore[attr-defined]

    def get_edges(self, name: str, *, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _deprecated("get_edges", "ds.row_graphs[name] or ds.col_graphs[name]")
        g = (self.row_graphs if axis == 0 else self.col_graphs)[name]  # type: ignore[attr-defined]
        return g.row, g.col, g.data

    def set_edges(self, name: str, a: np.ndarray, b: np.ndarray, w: np.ndarray, *, axis: int) -> None:
        import scipy.sparse as sp

        _deprecated("set_edges", "ds.row_graphs[name] = graph or ds.col_graphs[name] = graph")
        n = self.shape[axis]  # type: ignore[attr-defined]
        (self.row_graphs if axis == 0 else self.col_graphs)[name] = sp.coo_matrix((w, (a, b)), shape=(n, n))  # type: ignore[attr-defined]

    def batch_scan(
        self,
        cells: Any = None,
        genes: Any = None,
        axis: int = 0,
        batch_size: int = 1000,
        layer: str | None = None,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        _deprecated("batch_scan", "scan")
        items = genes if axis == 0 else cells
        other = cells if axis == 0 else genes
        for ix, index, view in self.scan(
            items=items,
            axis=axis,
            batch_size=batch_size,
            layers=["" if layer is None else layer],
            what=["layers"],
        ):  # type: ignore[attr-defined]
            vals = view.layers["" if layer is None else layer].values
            if other is not None:
                o = np.flatnonzero(other) if np.asarray(other).dtype.kind == "b" else np.asarray(other)
                vals = vals[:, o] if axis == 0 else vals[o, :]
            yield ix, index, vals

    def batch_scan_layers(
        self, cells: Any = None, genes: Any = None, axis: int = 0, batch_size: int = 1000, layers: Any = None
    ) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
        _deprecated("batch_scan_layers", "scan")
        items = genes if axis == 0 else cells
        for ix, index, view in self.scan(
            items=items, axis=axis, batch_size=batch_size, layers=layers, what=["layers"]
        ):  # type: ignore[attr-defined]
            yield ix, index, {k: view.layers[k].values for k in view.layers.keys()}
