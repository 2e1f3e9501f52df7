"""``aggregate``: loompy's group-by over columns, as a graph that never holds the layer."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom.ops._aggregate import aggregate_columns
from dask_loom.ops._kernels import check_group_func

if TYPE_CHECKING:
    from dask_loom.loom._protocol import LoomConnectionLike

__all__ = ["aggregate"]


def aggregate_np(*args: Any, **kwargs: Any) -> np.ndarray:
    """``numpy_groupies.aggregate_np``, imported on first use (it imports numba where installed: 0.4-0.9 s)."""
    from numpy_groupies import aggregate_np as agg

    return agg(*args, **kwargs)


def _mode(values: np.ndarray, idx: np.ndarray, n_groups: int) -> np.ndarray:
    """Most frequent value per group (smallest on ties, as scipy.stats.mode), any dtype."""
    uniq, codes = np.unique(values, return_inverse=True)
    counts = np.zeros((n_groups, len(uniq)), dtype=np.int64)
    np.add.at(counts, (idx, codes.ravel()), 1)
    return uniq[counts.argmax(axis=1)]


def _tally_name(key: str, value: Any) -> str:
    v = str(value)
    if isinstance(value, str):
        v = v.replace("/", "-").replace(".", "_")
    return f"{key}_{v}"


def aggregate(
    ds: LoomConnectionLike,
    out_file: str | os.PathLike[str] | None = None,
    select: np.ndarray | None = None,
    group_by: str | np.ndarray = "Clusters",
    aggr_by: str = "mean",
    aggr_ca_by: dict[str, str] | None = None,
    layer: str = "",
    aggr_ca_if_equal: bool = False,
    *,
    scheduler: Any = None,
    client: Any = None,
    progress: bool = False,
) -> np.ndarray:
    """Aggregate columns by group: the matrix with *aggr_by*, attributes with *aggr_ca_by*.

    Output columns are the groups in sorted label order.  Differences from
    loompy (deliberate): string and float labels group by value (loompy casts
    to ``int``); ``select`` (bool mask or indices of columns) works (loompy
    raises); unknown function names and unknown attribute names raise
    (loompy ignores them); ``"mode"`` works on current scipy and keeps the
    attribute's dtype; any reducing numpy-groupies function works for
    attributes too; ``tally`` columns come in sorted value order.
    """
    host = ds.__dask_loom_layer_host__()
    host.check_open()
    func = check_group_func(aggr_by)
    n_cols = ds.shape[1]
    sel = None
    if select is not None:
        s = np.asarray(select)
        if s.dtype.kind == "b":
            if len(s) != n_cols:
                raise ValueError(f"select has {len(s)} entries, expected {n_cols}")
            s = np.flatnonzero(s)
        sel = np.asarray(s, dtype=np.int64)
    if isinstance(group_by, str):
        if group_by not in ds.ca:
            raise KeyError(f"Column attribute '{group_by}' (group_by) not found in {ds.filename}")
        labels = np.asarray(ds.ca[group_by])
    else:
        labels = np.asarray(group_by)
        if labels.shape[0] != n_cols:
            raise ValueError(f"group_by has {labels.shape[0]} labels, expected {n_cols} (one per column)")
    if labels.ndim != 1:
        raise ValueError(f"group_by labels must be 1-D, got shape {labels.shape}")
    cols = np.arange(n_cols) if sel is None else sel
    _, idx = np.unique(labels[cols], return_inverse=True)
    idx = idx.ravel()
    n_groups = int(idx.max()) + 1 if len(idx) else 0
    ca: dict[str, np.ndarray] = {}
    aggr_ca_by = dict(aggr_ca_by or {})
    for key in aggr_ca_by:
        if key not in ds.ca:
            raise KeyError(f"Column attribute '{key}' (in aggr_ca_by) not found in {ds.filename}")
    if aggr_ca_if_equal:
        for key in ds.ca.keys():
            if key in aggr_ca_by:
                continue
            v = np.asarray(ds.ca[key])[cols]
            if v.ndim != 1:
                continue
            _, codes = np.unique(v, return_inverse=True)
            per_group = aggregate_np(idx, codes.ravel(), func="nunique", size=n_groups, fill_value=0)
            if np.all(per_group == 1):
                ca[key] = v[aggregate_np(idx, np.arange(len(v)), func="first", size=n_groups, fill_value=0)]
    for key in ds.ca.keys():
        if key not in aggr_ca_by:
            continue
        how = aggr_ca_by[key]
        v = np.asarray(ds.ca[key])[cols]
        if how == "tally":
            for val in np.unique(v):
                ca[_tally_name(key, val)] = aggregate_np(
                    idx, (v == val).astype(np.int64), func="sum", size=n_groups, fill_value=0
                )
        elif how == "mode":
            ca[key] = _mode(v, idx, n_groups)
        elif how in ("first", "last"):
            pos = aggregate_np(idx, np.arange(len(v)), func=how, size=n_groups, fill_value=0)
            ca[key] = v[pos]
        else:
            name = check_group_func(how)
            if v.dtype.kind not in "biuf":
                raise ValueError(f"aggr_ca_by['{key}'] = '{how}' needs numbers, but '{key}' holds {v.dtype}")
            ca[key] = aggregate_np(idx, v, func=name, size=n_groups, fill_value=0)
    kw = host.compute_kwargs()
    if scheduler is not None or client is not None:
        kw = {"scheduler": scheduler, "client": client}
    m = aggregate_columns(host.source(layer), idx, n_groups, func, select=sel, progress=progress, **kw)
    if out_file is not None:
        from dask_loom.loom._create import create

        create(out_file, m, {k: ds.ra[k] for k in ds.ra.keys()}, ca)
    return m
