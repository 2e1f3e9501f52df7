"""Per-block partials of ``aggregate`` on a layer too wide for full-width bands, and their finish.

A block holds some of a row band's columns; for each function here its
``(rows, n_groups)`` partials combine exactly with the other blocks' of the
band (:func:`~dask_loom.ops._combine.combine_partials`), so the band is never
read whole.  What a block's value is worth is recorded with it: a group
absent from the block, or whose values in a row are all NaN (for the
nan-aware functions), holds the neutral value and is marked absent.  The
finish gives what the band path gives (``numpy_groupies.aggregate`` with
``fill_value=0``, or the 0/0 NaN of the means and variances) where no value
was seen.  Functions outside :data:`TILED` need a group's values together
(:mod:`dask_loom.ops._aggregate_shuffle`).
"""

from __future__ import annotations

import numpy as np

from dask_loom.ops._combine import combine_partials
from dask_loom.ops._kernels import TILE_BYTES, GroupPlan, group_finish, group_reduce

__all__ = ["ELEMENTWISE", "PICKS", "ColumnMap", "TILED", "positions_of", "tile_partials", "tiled_finish"]

#: Functions whose value of a block's columns combines with the others' one element at a time:
#: the partial it is kept under (``combine_partials`` adds ``s1``, multiplies ``prod``, takes the
#: extreme of ``max``/``min``) and the value a group absent from the block holds.
#: ``any``/``all``/``anynan``/``allnan`` of 0/1 values are their max/min.
ELEMENTWISE: dict[str, tuple[str, float]] = {
    "nansum": ("s1", 0.0),
    "sumofsquares": ("s1", 0.0),
    "nansumofsquares": ("s1", 0.0),
    "len": ("s1", 0.0),
    "nanlen": ("s1", 0.0),
    "prod": ("prod", 1.0),
    "any": ("max", -np.inf),
    "all": ("min", np.inf),
    "anynan": ("max", -np.inf),
    "allnan": ("min", np.inf),
}

#: Nan-aware functions combining one element at a time, whose cell is absent where all its
#: values in the block are NaN (numpy-groupies' value there, 0, is no neutral value for them).
_MASKED: dict[str, tuple[str, float]] = {
    "nanprod": ("prod", 1.0),
    "nanmin": ("nmin", np.inf),
    "nanmax": ("nmax", -np.inf),
    "nanany": ("max", -np.inf),
    "nanall": ("min", np.inf),
}

#: Functions giving one of the group's values or its position: the pick mode they combine by.
PICKS: dict[str, str] = {
    "argmax": "pmax",
    "argmin": "pmin",
    "nanargmax": "pmax",
    "nanargmin": "pmin",
    "first": "pfirst",
    "last": "plast",
    "nanfirst": "pfirst",
    "nanlast": "plast",
}

#: Functions a wide layer is grouped by over blocks, their partials combined a row band at a time.
TILED = frozenset(
    {"sum", "mean", "var", "std", "min", "max", "nanmean", "nanvar", "nanstd", *ELEMENTWISE, *_MASKED, *PICKS}
)


class ColumnMap:
    """The selected columns a block of columns holds: their block-local indices, groups and positions.

    A position is a column's index among the selected columns (what the band
    path's ``argmax`` returns and the order its ``first``/``last`` and
    order-dependent functions see).  *select* may be unsorted or repeat a
    column: each block lists its selected columns in position order.
    """

    def __init__(self, select: np.ndarray | None, idx: np.ndarray) -> None:
        self.select = None if select is None else np.asarray(select, dtype=np.int64)
        self.idx = idx
        if self.select is not None:
            self.order = np.argsort(self.select, kind="stable")
            self.sorted = self.select[self.order]

    def block(self, cols: slice) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | int]:
        """``(local, groups, positions)`` of the selected columns in *cols*.

        ``local`` is ``None`` where they are all of *cols* in order;
        ``positions`` is an ``int`` (the first, the others following it)
        where they are consecutive, so a graph does not carry them.
        """
        if self.select is None:
            return None, self.idx[cols], cols.start
        lo, hi = np.searchsorted(self.sorted, [cols.start, cols.stop])
        pos = np.sort(self.order[lo:hi])
        local = self.select[pos] - cols.start
        if len(local) == cols.stop - cols.start and (np.diff(local) == 1).all():
            local = None
        consecutive = len(pos) and pos[-1] - pos[0] == len(pos) - 1
        return local, self.idx[pos], int(pos[0]) if consecutive else pos


def positions_of(positions: np.ndarray | int, k: int) -> np.ndarray:
    """The *k* positions :meth:`ColumnMap.block` described."""
    return np.arange(positions, positions + k) if np.ndim(positions) == 0 else np.asarray(positions)


def _valid_counts(block: np.ndarray, plan: GroupPlan) -> np.ndarray:
    """Values that are not NaN per ``(row, group)``, float64."""
    if block.dtype.kind != "f":
        return np.repeat(plan.counts[None, :].astype(np.float64), block.shape[0], axis=0)
    # float32 counts are exact below 2**24 columns a block
    return ((~np.isnan(block)).astype(np.float32) @ plan.onehot(np.float32)).astype(np.float64)


def _moments(block: np.ndarray, plan: GroupPlan) -> dict[str, np.ndarray]:
    """Counts, means and sums of squared deviations from the mean of the non-NaN values, per ``(row, group)``.

    Two passes over float64 tiles of :data:`TILE_BYTES` (never a float64 copy
    of the block): the sums, then the squared deviations from each cell's
    mean.  Infinite values are kept out of the products (times the one-hot
    matrix's zeros they would make every group NaN); their cells' variance is
    NaN, as numpy-groupies gives.
    """
    rows, k = block.shape
    oh = plan.onehot(np.float64)
    nn = np.zeros((rows, plan.n_groups))
    s1 = np.zeros((rows, plan.n_groups))
    inf = np.zeros((rows, plan.n_groups))
    step = max(1, TILE_BYTES // (8 * max(rows, 1)))
    isfloat = block.dtype.kind == "f"
    for j in range(0, k, step):
        f = block[:, j : j + step].astype(np.float64)
        if isfloat:
            nan = np.isnan(f)
            bad = ~np.isfinite(f)
            f[bad] = 0
            nn += (~nan).astype(np.float64) @ oh[j : j + step]
            inf += (bad & ~nan).astype(np.float64) @ oh[j : j + step]
        s1 += f @ oh[j : j + step]
    if not isfloat:
        nn[:] = plan.counts
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(nn > 0, s1 / nn, 0.0)
    m2 = np.zeros((rows, plan.n_groups))
    for j in range(0, k, step):
        f = block[:, j : j + step].astype(np.float64)
        with np.errstate(invalid="ignore"):
            f -= mean[:, plan.idx[j : j + step]]
        if isfloat:
            f[~np.isfinite(f)] = 0  # NaN values take no part; infinite ones are marked below
        f *= f
        m2 += f @ oh[j : j + step]
    m2[inf > 0] = np.nan
    return {"wn": nn, "wmean": mean, "m2": m2}


def _first_valid(block: np.ndarray, plan: GroupPlan, last: bool) -> np.ndarray:
    """Block-local column of each ``(row, group)``'s first (*last*) non-NaN value (any column where none)."""
    rows, k = block.shape
    present = np.flatnonzero(plan.counts)
    out = np.zeros((rows, plan.n_groups), dtype=np.int64)
    if not len(present):
        return out
    valid = ~np.isnan(block[:, plan.order])
    # Sorted column numbers where valid, else past either end: the segment's min (max) is the first (last) valid one.
    ranks = np.where(valid, np.arange(k, dtype=np.int32 if k < 2**31 - 1 else np.int64), -1 if last else k)
    ufunc = np.maximum if last else np.minimum
    found = ufunc.reduceat(ranks, plan.starts[present], axis=1)
    out[:, present] = plan.order[np.clip(found, 0, k - 1)]
    return out


def _pick_partials(block: np.ndarray, plan: GroupPlan, func: str, positions: np.ndarray) -> dict[str, np.ndarray]:
    rows = block.shape[0]
    mode = PICKS[func]
    isfloat = block.dtype.kind == "f"
    out: dict[str, np.ndarray] = {}
    if func in ("first", "last") or (func in ("nanfirst", "nanlast") and not isfloat):
        local = np.broadcast_to(plan.first if func.endswith("first") else plan.last, (rows, plan.n_groups))
        present = np.broadcast_to(plan.counts > 0, (rows, plan.n_groups))
    elif func in ("nanfirst", "nanlast"):
        local = _first_valid(block, plan, func == "nanlast")
        present = _valid_counts(block, plan) > 0
    else:
        # numpy-groupies' own argmax/argmin (first occurrence; 0 where a group holds a NaN or nothing)
        local = group_reduce(block, plan, func).astype(np.int64)
        if func.startswith("nan"):
            present = _valid_counts(block, plan) > 0
        else:
            present = np.broadcast_to(plan.counts > 0, (rows, plan.n_groups))
            nan = _valid_counts(block, plan) < plan.counts if isfloat else np.zeros((rows, plan.n_groups), bool)
            out["nanp"] = nan & present
    out[f"{mode}_v"] = np.take_along_axis(block, local, axis=1).astype(np.float64)
    out[f"{mode}_i"] = positions[local]
    out[f"{mode}_p"] = np.array(present)
    return out


def tile_partials(block: np.ndarray, plan: GroupPlan, func: str, positions: np.ndarray | int) -> dict[str, np.ndarray]:
    """Partials of *func* over one block's selected columns (``block`` holds just those, in position order).

    For the functions of :data:`TILED` other than sum, mean, var, std, min and
    max (``_aggregate._tile`` takes those).
    """
    if func == "nanmean":
        return {"nn": _valid_counts(block, plan), "ns1": group_reduce(block, plan, "nansum")}
    if func in ("nanvar", "nanstd"):
        return _moments(block, plan)
    if func in PICKS:
        return _pick_partials(block, plan, func, positions_of(positions, block.shape[1]))
    value = group_reduce(block, plan, func)
    if func in _MASKED:
        key, neutral = _MASKED[func]
        nn = _valid_counts(block, plan)
        value[nn == 0] = neutral
        return {key: value, "nn": nn}
    key, neutral = ELEMENTWISE[func]
    value[:, plan.counts == 0] = neutral
    return {key: value}


def tiled_finish(counts: np.ndarray, func: str, *partials: dict[str, np.ndarray]) -> np.ndarray:
    """*func* by group of a row band from its blocks' partials (the last few, combined here).

    *counts* holds each group's number of selected columns.
    """
    parts = combine_partials(list(partials))
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty group's mean is NaN, as in the band path
        if func == "sum":
            return parts["s1"]
        if func == "mean":
            return parts["s1"] / counts
        if func == "nanmean":
            return parts["ns1"] / parts["nn"]
        if func in ("nanvar", "nanstd"):
            var = parts["m2"] / parts["wn"]
            return np.sqrt(var) if func == "nanstd" else var
    if func in PICKS:
        mode = PICKS[func]
        nan = parts.get("nanp")  # argmax/argmin of a cell holding a NaN: numpy-groupies' fill
        have = parts[f"{mode}_p"] if nan is None else parts[f"{mode}_p"] & ~nan
        if mode in ("pmax", "pmin"):
            return np.where(have, parts[f"{mode}_i"], 0).astype(np.float64)
        return np.where(have, parts[f"{mode}_v"], 0.0)
    if func in _MASKED:
        value = parts[_MASKED[func][0]]
        value[parts["nn"] == 0] = 0  # no value: numpy-groupies' fill, as in the band path
        return value
    if func in ELEMENTWISE:
        value = parts[ELEMENTWISE[func][0]]
        value[:, counts == 0] = 0  # a group without columns: numpy-groupies' fill, as in the band path
        return value
    value = group_finish(parts, [func])[0]
    if func in ("min", "max"):
        value[:, counts == 0] = 0  # a group without columns: the band path's 0, not the neutral infinity
    return value
