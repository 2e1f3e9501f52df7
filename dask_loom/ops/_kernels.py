"""Per-block numpy kernels, kept apart from the graph builders (pure functions of arrays)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_loom.ops._combine import combine_partials

__all__ = ["REDUCTIONS", "Reduction", "block_partials", "combine_partials", "recognise"]


@dataclass(frozen=True)
class Reduction:
    """A decomposable reduction: which partial sums it needs and how to finish it."""

    name: str
    needs: tuple[str, ...]
    finish: Callable[[dict[str, np.ndarray]], np.ndarray]


def _var(p: dict[str, np.ndarray], nan: bool = False) -> np.ndarray:
    n, s1, s2 = (p["nn"], p["ns1"], p["ns2"]) if nan else (p["n"], p["s1"], p["s2"])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        return np.maximum(s2 / n - mean * mean, 0.0)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return a / b


REDUCTIONS: dict[str, Reduction] = {
    r.name: r
    for r in [
        Reduction("sum", ("s1",), lambda p: p["s1"]),
        Reduction("mean", ("n", "s1"), lambda p: _div(p["s1"], p["n"])),
        Reduction("var", ("n", "s1", "s2"), _var),
        Reduction("std", ("n", "s1", "s2"), lambda p: np.sqrt(_var(p))),
        Reduction("min", ("min",), lambda p: p["min"]),
        Reduction("max", ("max",), lambda p: p["max"]),
        Reduction("count_nonzero", ("nnz",), lambda p: p["nnz"]),
        Reduction("nansum", ("ns1",), lambda p: p["ns1"]),
        Reduction("nanmean", ("nn", "ns1"), lambda p: _div(p["ns1"], p["nn"])),
        Reduction("nanvar", ("nn", "ns1", "ns2"), lambda p: _var(p, nan=True)),
        Reduction("nanstd", ("nn", "ns1", "ns2"), lambda p: np.sqrt(_var(p, nan=True))),
        Reduction("nanmin", ("nmin",), lambda p: p["nmin"]),
        Reduction("nanmax", ("nmax",), lambda p: p["nmax"]),
    ]
}

_ALIASES = {"amin": "min", "amax": "max", "average": "mean"}

_NUMPY: dict[Any, str] = {
    np.sum: "sum",
    np.mean: "mean",
    np.average: "mean",
    np.std: "std",
    np.var: "var",
    np.min: "min",
    np.max: "max",
    np.amin: "min",
    np.amax: "max",
    np.count_nonzero: "count_nonzero",
    np.nansum: "nansum",
    np.nanmean: "nanmean",
    np.nanstd: "nanstd",
    np.nanvar: "nanvar",
    np.nanmin: "nanmin",
    np.nanmax: "nanmax",
}


def recognise(f: Any) -> Reduction | None:
    """The :class:`Reduction` for a numpy function or its name, or ``None``.

    Examples
    --------
    >>> recognise(np.std).needs
    ('n', 's1', 's2')
    >>> recognise(lambda x: x.sum()) is None
    True
    """
    if isinstance(f, str):
        return REDUCTIONS.get(_ALIASES.get(f, f))
    try:
        name = _NUMPY.get(f)
    except TypeError:  # unhashable callables are never numpy's
        return None
    return REDUCTIONS.get(name) if name else None


def _sum(b: np.ndarray, red: int) -> np.ndarray:
    if b.dtype in (np.float32, np.float64) and b.size:
        # A BLAS matrix-vector product: several times faster than ndarray.sum.
        ones = np.ones(b.shape[red], dtype=b.dtype)
        return (b @ ones if red == 1 else ones @ b).astype(np.float64)
    return b.sum(axis=red, dtype=np.float64)


def _sumsq(b: np.ndarray, red: int) -> np.ndarray:
    if b.dtype not in (np.float32, np.float64):
        return _tiled_sums(b, red, square=True)[1]
    return np.einsum("ij,ij->i" if red == 1 else "ij,ij->j", b, b).astype(np.float64)


#: Bytes of float64 a non-float block is converted to at a time (fits in cache, bounds the copy).
TILE_BYTES = 4 << 20


def _tile_rows(b: np.ndarray) -> int:
    return max(1, TILE_BYTES // max(1, 8 * b.shape[1]))


def _tiled_sums(b: np.ndarray, red: int, *, square: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Sums (and sums of squares) of a non-float 2-D block along *red*, converted to float64 a tile of rows at a time.

    Converting a whole uint16 block to float64 makes a copy 4x its size and is
    slower than converting cache-sized tiles and reducing each at once.
    Integer sums are exact in float64 below 2**53, as with ``sum(dtype=float64)``.
    """
    n_rows, n_cols = b.shape
    step = _tile_rows(b)
    keep = n_rows if red == 1 else n_cols
    s1 = np.zeros(keep)
    s2 = np.zeros(keep) if square else None
    for i in range(0, n_rows, step):
        f = b[i : i + step].astype(np.float64)
        # Not BLAS: on tiles this small a threaded BLAS spends more time waking its threads than adding.
        if red == 1:
            s1[i : i + step] = np.einsum("ij->i", f)
            if s2 is not None:
                s2[i : i + step] = np.einsum("ij,ij->i", f, f)
        else:
            s1 += np.einsum("ij->j", f)
            if s2 is not None:
                s2 += np.einsum("ij,ij->j", f, f)
    return s1, s2


def block_partials(block: np.ndarray, red: int, needs: Iterable[str]) -> dict[str, np.ndarray]:
    """Partial statistics of a 2-D block along axis *red* (the axis being reduced)."""
    needs = set(needs)
    out: dict[str, np.ndarray] = {}
    keep = block.shape[1 - red]
    if "n" in needs:
        out["n"] = np.full(keep, block.shape[red], dtype=np.float64)
    if block.dtype in (np.float32, np.float64) or not needs & {"s1", "s2"}:
        if "s1" in needs:
            out["s1"] = _sum(block, red)
        if "s2" in needs:
            out["s2"] = _sumsq(block, red)
    else:  # one conversion of each tile for both sums
        s1, s2 = _tiled_sums(block, red, square="s2" in needs)
        if "s1" in needs:
            out["s1"] = s1
        if s2 is not None:
            out["s2"] = s2
    empty = block.shape[red] == 0
    if "min" in needs:
        out["min"] = np.full(keep, np.nan) if empty else block.min(axis=red).astype(np.float64)
    if "max" in needs:
        out["max"] = np.full(keep, np.nan) if empty else block.max(axis=red).astype(np.float64)
    if "nnz" in needs:
        out["nnz"] = np.count_nonzero(block, axis=red).astype(np.float64)
    if needs & {"nn", "ns1", "ns2", "nmin", "nmax"}:
        if block.dtype.kind == "f":
            nanmask = np.isnan(block)
            clean = np.where(nanmask, 0, block)
            valid = ~nanmask
        else:
            clean, valid = block, np.ones(block.shape, dtype=bool)
        if "nn" in needs:
            out["nn"] = valid.sum(axis=red, dtype=np.float64)
        if "ns1" in needs:
            out["ns1"] = _sum(clean, red)
        if "ns2" in needs:
            out["ns2"] = _sumsq(clean, red)
        if "nmin" in needs or "nmax" in needs:
            with np.errstate(invalid="ignore"):
                if "nmin" in needs:
                    out["nmin"] = (
                        np.where(valid, block, np.inf).min(axis=red, initial=np.inf).astype(np.float64)
                        if not empty
                        else np.full(keep, np.inf)
                    )
                if "nmax" in needs:
                    out["nmax"] = (
                        np.where(valid, block, -np.inf).max(axis=red, initial=-np.inf).astype(np.float64)
                        if not empty
                        else np.full(keep, -np.inf)
                    )
    return out


def staged_partials(staged: np.ndarray, red: int, needs: Iterable[str]) -> dict[str, np.ndarray]:
    """:func:`block_partials` of a 2-D block given as its chunks ``(k0, k1, c0, c1)``.

    The row-major block would be ``staged.transpose(0, 2, 1, 3)``; instead of
    paying that copy, reduce a contiguous 2-D view and then the grid axis.
    """
    k0, k1, c0, c1 = staged.shape
    if red == 1:  # one value per row (i, a): reduce over (j, b)
        parts = block_partials(staged.reshape(k0 * k1 * c0, c1), 1, needs)
        return {k: _reduce_axis(k, v.reshape(k0, k1, c0), 1).ravel() for k, v in parts.items()}
    parts = block_partials(staged.reshape(k0, k1 * c0 * c1), 0, needs)  # one value per column (j, b)
    return {k: _reduce_axis(k, v.reshape(k1, c0, c1), 1).ravel() for k, v in parts.items()}


def _reduce_axis(key: str, v: np.ndarray, axis: int) -> np.ndarray:
    if key in ("min", "nmin"):
        return v.min(axis=axis)
    if key in ("max", "nmax"):
        return v.max(axis=axis)
    return v.sum(axis=axis)


def finish(parts: dict[str, np.ndarray], reductions: list[Reduction]) -> list[np.ndarray]:
    """Final values of every reduction from combined partials."""
    res = []
    for r in reductions:
        v = np.asarray(r.finish(parts), dtype=np.float64)
        if r.name in ("nanmin", "nanmax"):
            v = np.where(
                np.isinf(v)
                & (
                    parts["nmin" if r.name == "nanmin" else "nmax"]
                    == (np.inf if r.name == "nanmin" else -np.inf)
                ),
                np.nan,
                v,
            )
        res.append(v)
    return res


def apply_vectors(block: np.ndarray, red: int, funcs: list[Callable[[np.ndarray], Any]]) -> list[np.ndarray]:
    """Call each function once per vector along *red* (per row when ``red == 1``)."""
    vectors = block if red == 1 else block.T
    out = [np.empty(vectors.shape[0], dtype=np.float64) for _ in funcs]
    for i in range(vectors.shape[0]):
        v = vectors[i]
        for k, f in enumerate(funcs):
            out[k][i] = f(v)
    return out


__all__ += ["apply_vectors", "finish", "staged_partials"]


# --- group-by reductions along the columns of a band ------------------------------------

_MATMUL = {
    "sum",
    "mean",
    "len",
    "nansum",
    "nanmean",
    "nanlen",
    "sumofsquares",
    "var",
    "std",
    "nanvar",
    "nanstd",
}
_REDUCEAT = {
    "max": np.maximum,
    "min": np.minimum,
    "prod": np.multiply,
    "any": np.logical_or,
    "all": np.logical_and,
}
_NPG_ALIASES = {
    "count": "len",
    "add": "sum",
    "plus": "sum",
    "amax": "max",
    "maximum": "max",
    "amin": "min",
    "minimum": "min",
    "average": "mean",
    # numpy-groupies' other spellings: one name each, so the wide path knows them
    "and": "all",
    "or": "any",
    "multiply": "prod",
    "product": "prod",
    "times": "prod",
    "kurtosis": "kurt",
}
#: Functions whose result is not one number per group (not valid for ``aggregate``).
NOT_REDUCING = {
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "sort",
    "array",
    "nancumsum",
    "nancumprod",
    "nancummax",
    "nancummin",
    "sorted",
    "rsorted",
    "asort",
    "dsort",
    "asorted",
    "split",
    "splice",
}


class GroupPlan:
    """Precomputed column grouping for :func:`group_reduce` (one per aggregate call, or per block).

    ``idx`` maps each column to its group (0..n_groups-1).  A group may be
    empty in a block's plan (its sums are 0); ``first``/``last``/``starts``
    of an empty group point at a neighbour and are only used for groups
    that hold columns.
    """

    def __init__(self, idx: np.ndarray, n_groups: int) -> None:
        self.idx = np.asarray(idx, dtype=np.int64)
        self.n_groups = int(n_groups)
        self.order = np.argsort(self.idx, kind="stable")
        counts = np.bincount(self.idx, minlength=self.n_groups)
        self.counts = counts
        self.starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        top = max(len(self.idx) - 1, 0)
        order = self.order if len(self.idx) else np.zeros(1, dtype=np.int64)
        self.first = order[np.minimum(self.starts, top)]
        self.last = order[np.clip(self.starts + counts - 1, 0, top)]

    def onehot(self, dtype: Any) -> np.ndarray:
        m = np.zeros((len(self.idx), self.n_groups), dtype=dtype)
        m[np.arange(len(self.idx)), self.idx] = 1
        return m

    def __dask_tokenize__(self) -> Any:
        return ("GroupPlan", self.idx.tobytes(), self.n_groups)

    def __reduce__(self) -> tuple[Any, tuple[np.ndarray, int]]:
        # Graphs carry a plan per block (6,448 in an aggregate of the full atlas): only the labels
        # travel, in the smallest integer type (4 KiB for 4,096 columns of 50 groups, not 66 KiB);
        # the sort and counts are recomputed where the plan lands.
        return (GroupPlan, (self.idx.astype(np.min_scalar_type(max(self.n_groups - 1, 0))), self.n_groups))


def check_group_func(func: str) -> str:
    """Canonical name of a numpy-groupies reduction; ``ValueError`` for unknown or non-reducing names."""
    if not isinstance(func, str):
        raise TypeError(
            f"aggregation function must be a numpy-groupies function name, not {type(func).__name__}"
        )
    name = _NPG_ALIASES.get(func, func)
    if name in NOT_REDUCING:
        raise ValueError(
            f"'{func}' does not reduce each group to one value; use a reducing numpy-groupies function"
        )
    if name in _MATMUL or name in _REDUCEAT or name in ("first", "last"):
        return name  # computed here without numpy-groupies: no need to import it (and numba) to check
    from numpy_groupies import aggregate_np

    try:
        aggregate_np(np.array([0, 0, 1]), np.array([1.0, 2.0, 3.0]), func=name, size=2)
    except (ValueError, NotImplementedError, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"unknown aggregation function '{func}' (numpy-groupies says: {exc})") from None
    return name


def group_reduce(band: np.ndarray, plan: GroupPlan, func: str) -> np.ndarray:
    """Reduce the columns of *band* by group: ``(rows, n_groups)`` float64.

    Sums and means run as one matrix product with a one-hot group matrix (BLAS,
    about 10x faster than a scatter-add); max/min/prod/any/all as ``reduceat``
    over group-sorted columns; every other numpy-groupies function through
    ``numpy_groupies.aggregate``.
    """
    if band.shape[1] == 0 or band.shape[0] == 0:
        return np.zeros((band.shape[0], plan.n_groups))
    work_dtype = band.dtype if band.dtype in (np.float32, np.float64) else np.float64
    if func in _MATMUL:
        # An integer band is cast a slice at a time in _onehot_sums, not whole here.
        x = (
            band
            if band.dtype.kind != "f" and not func.startswith("nan")
            else band.astype(work_dtype, copy=False)
        )
        if func.startswith("nan"):
            valid = ~np.isnan(x) if x.dtype.kind == "f" else np.ones(x.shape, bool)
            x = np.where(valid, x, 0)
            n = valid.astype(work_dtype) @ plan.onehot(work_dtype)
        else:
            n = np.broadcast_to(plan.counts.astype(np.float64), (band.shape[0], plan.n_groups))
        oh = plan.onehot(work_dtype)
        base = func[3:] if func.startswith("nan") else func
        if base == "len":
            return np.asarray(n, dtype=np.float64).copy()
        s1, s2 = _onehot_sums(x, oh, squares=base in ("sumofsquares", "var", "std"))
        if not np.isfinite(s1).all():
            # NaN or inf times the 0s of the other groups spread to every group: numpy-groupies adds group by group
            # (a cell without values stays 0/0, NaN, for the means and variances, as below)
            return _npg_reduce(band, plan, func, fill_value=np.nan if base in ("mean", "var", "std") else 0)
        if base == "sum":
            return s1
        with np.errstate(invalid="ignore", divide="ignore"):
            if base == "mean":
                return s1 / n
            if base == "sumofsquares":
                return s2
            var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)
            return var if base == "var" else np.sqrt(var)
    if func in _REDUCEAT or func in ("first", "last"):
        # A group without columns has no segment (reduceat would give, or overrun to, a neighbour's): 0, numpy-groupies' fill.
        present = np.flatnonzero(plan.counts)
        out = np.zeros((band.shape[0], plan.n_groups))
        if func in _REDUCEAT:
            out[:, present] = _REDUCEAT[func].reduceat(band[:, plan.order], plan.starts[present], axis=1)
        else:
            out[:, present] = band[:, (plan.first if func == "first" else plan.last)[present]]
        return out
    return _npg_reduce(band, plan, func)


def _onehot_sums(x: np.ndarray, oh: np.ndarray, *, squares: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``x @ oh`` and (with *squares*) ``(x * x) @ oh`` as float64.

    A float band is multiplied as it is.  Any other (the uint16 counts of an
    atlas) is cast to float64 :data:`TILE_BYTES` at a time, a slice of
    columns multiplied with its rows of *oh* while it is in cache (as
    :func:`_tiled_sums` does for ``map``): a whole-band cast held four times
    the band (a 64 MiB uint16 band, 256 MiB) and its square as much again.
    """
    if x.dtype.kind == "f":
        s1 = (x @ oh).astype(np.float64)
        return s1, ((x * x) @ oh).astype(np.float64) if squares else None
    rows, cols = x.shape
    s1 = np.zeros((rows, oh.shape[1]))
    s2 = np.zeros((rows, oh.shape[1])) if squares else None
    step = max(1, TILE_BYTES // (8 * max(rows, 1)))
    for j in range(0, cols, step):
        f = x[:, j : j + step].astype(np.float64)
        part = oh[j : j + step]
        s1 += f @ part
        if s2 is not None:
            f *= f
            s2 += f @ part
    return s1, s2


def _npg_reduce(band: np.ndarray, plan: GroupPlan, func: str, *, fill_value: float = 0) -> np.ndarray:
    # numpy-groupies' numpy implementation: its numba one compiles each function on
    # first use in every worker process (seconds).  Imported here, when needed: the
    # package imports numba where it is installed (0.4-0.9 s).
    from numpy_groupies import aggregate_np

    return np.asarray(
        aggregate_np(plan.idx, band, func=func, axis=1, size=plan.n_groups, fill_value=fill_value), dtype=np.float64
    )


__all__ += ["GroupPlan", "NOT_REDUCING", "check_group_func", "group_reduce"]


# --- n-d blocks, CSR blocks and group partials (dask_loom.map / dask_loom.aggregate) --------


def nd_partials(block: np.ndarray, axis: int, needs: Iterable[str]) -> dict[str, np.ndarray]:
    """:func:`block_partials` of an n-d block: one value per index along *axis*, over all other axes.

    The block is viewed as ``(pre * k, post)`` (a free reshape of a C-ordered
    block): the 2-D kernel reduces each row, then the ``pre`` rows of each
    index are folded together, so no transposed copy is made.
    """
    block = np.ascontiguousarray(block)
    shape = block.shape
    pre = math.prod(shape[:axis])
    k = shape[axis]
    post = math.prod(shape[axis + 1 :])
    if pre == 1:
        return block_partials(block.reshape(k, post), 1, needs)
    if post == 1:
        return block_partials(block.reshape(pre, k), 0, needs)
    parts = block_partials(block.reshape(pre * k, post), 1, needs)
    return {key: _reduce_axis(key, v.reshape(pre, k), 0) for key, v in parts.items()}


def _entry_rows(x: Any) -> np.ndarray:
    return np.repeat(np.arange(x.shape[0], dtype=np.int64), np.diff(x.indptr))


def _with_data(x: Any, data: np.ndarray) -> Any:
    """A CSR matrix with *x*'s structure and other values (the structure is shared, not copied)."""
    import scipy.sparse as sp

    return sp.csr_matrix((data, x.indices, x.indptr), shape=x.shape, copy=False)


def csr_group_partials(
    x: Any, axis: int, idx: np.ndarray, n_groups: int, needs: Iterable[str]
) -> dict[str, np.ndarray]:
    """Partial statistics of a CSR block grouped along *axis* (0: rows, 1: columns).

    Every entry of the result has the block's shape with *axis* replaced by
    ``n_groups``: ``(n_groups, n_cols)`` for ``axis=0``, ``(n_rows, n_groups)``
    for ``axis=1``.  Sums run as one sparse product with a one-hot group matrix
    (in float64); minima, maxima and NaN counts scatter the stored entries
    into their cells and account for the implicit zeros of each cell.  The
    block is never densified.
    """
    import scipy.sparse as sp

    needs = set(needs)
    x = x.tocsr() if not sp.isspmatrix_csr(x) else x
    n_rows, n_cols = x.shape
    idx = np.asarray(idx, dtype=np.int64)
    size = np.bincount(idx, minlength=n_groups).astype(np.float64)  # members per group
    other = n_cols if axis == 0 else n_rows
    shape = (n_groups, other) if axis == 0 else (other, n_groups)
    members = np.broadcast_to(size[:, None] if axis == 0 else size[None, :], shape)
    onehot = sp.csr_matrix((np.ones(len(idx)), (idx, np.arange(len(idx)))), shape=(n_groups, len(idx)))
    data = x.data.astype(np.float64, copy=False)

    def grouped(values: np.ndarray) -> np.ndarray:
        m = _with_data(x, values)
        out = onehot @ m if axis == 0 else m @ onehot.T
        return np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float64)

    out: dict[str, np.ndarray] = {}
    if "n" in needs:
        out["n"] = members.copy()
    if "s1" in needs:
        out["s1"] = grouped(data)
    if "s2" in needs:
        out["s2"] = grouped(data * data)
    if "nnz" in needs:
        out["nnz"] = grouped((data != 0).astype(np.float64))
    nan_keys = needs & {"nn", "ns1", "ns2", "nmin", "nmax"}
    isnan = np.isnan(data) if nan_keys and data.dtype.kind == "f" else None
    clean = np.where(isnan, 0.0, data) if isnan is not None else data
    if "nn" in needs:
        out["nn"] = members - (grouped(isnan.astype(np.float64)) if isnan is not None else 0.0)
    if "ns1" in needs:
        out["ns1"] = grouped(clean)
    if "ns2" in needs:
        out["ns2"] = grouped(clean * clean)
    extremes = [k for k in ("min", "max", "nmin", "nmax") if k in needs]
    if extremes:
        rows = _entry_rows(x)
        gid = idx[rows] if axis == 0 else idx[x.indices]
        flat = gid * other + x.indices if axis == 0 else rows * n_groups + gid
        stored = np.bincount(flat, minlength=n_groups * other).reshape(shape)
        implicit = stored < members  # the cell also holds zeros that are not stored
        for key in extremes:
            low = key in ("min", "nmin")
            init = np.inf if low else -np.inf
            ufunc = {"min": np.minimum, "max": np.maximum, "nmin": np.fmin, "nmax": np.fmax}[key]
            v = np.full(n_groups * other, init)
            ufunc.at(v, flat, data)
            v = v.reshape(shape)
            # A cell without members keeps the neutral value (+-inf), so blocks combine.
            out[key] = np.where(implicit, ufunc(v, 0.0), v)
    return out


#: The partials :func:`csr_row_group_partials` computes.
ROW_GROUP_NEEDS = frozenset({"n", "s1", "s2", "nnz"})


def csr_row_group_partials(
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    n_cols: int,
    idx: np.ndarray,
    n_groups: int,
    needs: Iterable[str],
    *,
    piece_entries: int | None = None,
) -> dict[str, np.ndarray]:
    """:func:`csr_group_partials` of the rows (``axis=0``) of CSR arrays, for sums and counts only.

    Each stored entry is added into its ``(group of its row, column)`` cell
    with ``bincount`` in float64; no scipy matrix is built (nor scipy
    imported).  The rows go in pieces of about ``2**16`` entries, so the
    per-entry temporaries (cell numbers, float64 values) stay in cache and a
    task holds about a megabyte of them, not a copy of its block
    (*piece_entries* sets another size).  *needs* must be within
    :data:`ROW_GROUP_NEEDS`; indices may be unsorted within a row.
    """
    needs = set(needs)
    if not needs <= ROW_GROUP_NEEDS:
        raise ValueError(f"csr_row_group_partials computes {sorted(ROW_GROUP_NEEDS)}, not {sorted(needs)}")
    idx = np.asarray(idx, dtype=np.int64)
    indptr = np.asarray(indptr, dtype=np.int64)
    size = n_groups * n_cols
    acc = {k: np.zeros(size) for k in needs if k != "n"}
    row_cell = idx * n_cols  # first cell of each row's group
    firsts = np.arange(0, int(indptr[-1]), piece_entries or _PIECE_ENTRIES)  # an entry opening each piece ...
    rows = np.searchsorted(indptr, firsts, side="right") - 1  # ... and the row holding it (non-decreasing)
    starts = rows[np.concatenate(([True], rows[1:] != rows[:-1]))] if len(rows) else rows
    bounds = [*starts.tolist(), len(idx)]
    for r0, r1 in itertools.pairwise(bounds):
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        if e0 == e1:
            continue
        cell = np.repeat(row_cell[r0:r1], np.diff(indptr[r0 : r1 + 1]))
        cell += indices[e0:e1]
        vals = data[e0:e1]
        if "s1" in acc:
            acc["s1"] += np.bincount(cell, weights=vals, minlength=size)
        if "s2" in acc:
            v = vals.astype(np.float64)
            acc["s2"] += np.bincount(cell, weights=v * v, minlength=size)
        if "nnz" in acc:
            acc["nnz"] += np.bincount(cell[vals != 0], minlength=size)
    out = {k: v.reshape(n_groups, n_cols) for k, v in acc.items()}
    if "n" in needs:
        members = np.bincount(idx, minlength=n_groups).astype(np.float64)
        out["n"] = np.repeat(members[:, None], n_cols, axis=1)
    return out


_PIECE_ENTRIES = 1 << 16


def csr_map_partials(x: Any, axis: int, needs: Iterable[str]) -> dict[str, np.ndarray]:
    """:func:`block_partials` of a CSR block: one value per row (``axis=0``) or column (``axis=1``)."""
    other = 1 - axis
    parts = csr_group_partials(x, other, np.zeros(x.shape[other], dtype=np.int64), 1, needs)
    return {k: v.ravel() for k, v in parts.items()}


def map_partials(block: Any, axis: int, needs: Iterable[str]) -> dict[str, np.ndarray]:
    """Partials of any block (numpy n-d, or scipy.sparse 2-D) along *axis*."""
    from dask_loom._lazy import issparse

    if issparse(block):
        return csr_map_partials(block, axis, needs)
    return nd_partials(np.asarray(block), axis, needs)


def dense_group_partials(
    block: np.ndarray, axis: int, idx: np.ndarray, n_groups: int, needs: Iterable[str]
) -> dict[str, np.ndarray]:
    """Partial statistics of an n-d block grouped along *axis* (the block's shape with *axis* -> ``n_groups``).

    Sums are matrix products with the one-hot group matrix (BLAS, in the
    block's float dtype); minima and maxima are ``reduceat`` over the block
    sorted by group.
    """
    needs = set(needs)
    block = np.ascontiguousarray(block)
    shape = block.shape
    pre, k, post = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    out_shape = (*shape[:axis], n_groups, *shape[axis + 1 :])
    x3 = block.reshape(pre, k, post)
    idx = np.asarray(idx, dtype=np.int64)
    work = block.dtype if block.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    oh = np.zeros((k, n_groups), dtype=work)
    oh[np.arange(k), idx] = 1

    def grouped(values: np.ndarray) -> np.ndarray:
        v = values.astype(work, copy=False)
        if post == 1:
            res = v[:, :, 0] @ oh  # (pre, G)
        elif pre == 1:
            res = (oh.T @ v[0])[None]  # (1, G, post)
        else:
            res = np.matmul(oh.T, v)  # (pre, G, post)
        if v.dtype.kind == "f" and not np.isfinite(res).all():
            # NaN or inf times the 0s of other groups spread to every group: add up group by group instead
            res = _reduceat_sum(v, idx, n_groups)
        return res.astype(np.float64, copy=False).reshape(out_shape)

    out: dict[str, np.ndarray] = {}
    counts = np.bincount(idx, minlength=n_groups).astype(np.float64)
    if "n" in needs:
        out["n"] = np.broadcast_to(
            counts.reshape([n_groups if i == axis else 1 for i in range(len(shape))]), out_shape
        ).copy()
    if "s1" in needs:
        out["s1"] = grouped(x3)
    if "s2" in needs:
        out["s2"] = grouped(x3 * x3 if x3.dtype.kind == "f" else x3.astype(np.float64) ** 2)
    if "nnz" in needs:
        out["nnz"] = grouped(x3 != 0)
    for key in ("min", "max"):
        if key not in needs:
            continue
        # Groups absent from this block hold the neutral value, so blocks combine.
        v = np.full((pre, n_groups, post), np.inf if key == "min" else -np.inf)
        if k:
            order = np.argsort(idx, kind="stable")
            present = np.flatnonzero(counts)
            starts = np.searchsorted(idx[order], present)
            ufunc = np.minimum if key == "min" else np.maximum
            v[:, present, :] = ufunc.reduceat(np.take(x3, order, axis=1), starts, axis=1)
        out[key] = v.reshape(out_shape)
    return out


def _reduceat_sum(v3: np.ndarray, idx: np.ndarray, n_groups: int) -> np.ndarray:
    """Group sums of ``(pre, k, post)`` along ``k``, each group added on its own (non-finite values stay in their group)."""
    counts = np.bincount(idx, minlength=n_groups)
    out = np.zeros((v3.shape[0], n_groups, v3.shape[2]))
    if v3.shape[1]:
        order = np.argsort(idx, kind="stable")
        present = np.flatnonzero(counts)
        starts = np.searchsorted(idx[order], present)
        out[:, present, :] = np.add.reduceat(np.take(v3, order, axis=1).astype(np.float64), starts, axis=1)
    return out


def group_partials(
    block: Any, axis: int, idx: np.ndarray, n_groups: int, needs: Iterable[str]
) -> dict[str, np.ndarray]:
    """Group partials of any block (numpy n-d, or scipy.sparse 2-D)."""
    from dask_loom._lazy import issparse

    if issparse(block):
        return csr_group_partials(block, axis, idx, n_groups, needs)
    return dense_group_partials(np.asarray(block), axis, idx, n_groups, needs)


#: What ``dask_loom.aggregate`` computes, and the partial statistics each needs.
GROUP_FUNCS: dict[str, tuple[str, ...]] = {
    "sum": ("s1",),
    "mean": ("n", "s1"),
    "var": ("n", "s1", "s2"),
    "std": ("n", "s1", "s2"),
    "min": ("min",),
    "max": ("max",),
    "count_nonzero": ("nnz",),
}


def combine_group_partials(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Merge group partials of blocks covering the same cells (NaN-propagating min/max)."""
    return combine_partials(parts)


def group_finish(parts: dict[str, np.ndarray], funcs: list[str]) -> list[np.ndarray]:
    """Final per-group values of each function in *funcs* from combined partials."""
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for f in funcs:
            if f == "sum":
                v = parts["s1"]
            elif f == "mean":
                v = parts["s1"] / parts["n"]
            elif f in ("var", "std"):
                mean = parts["s1"] / parts["n"]
                v = np.maximum(parts["s2"] / parts["n"] - mean * mean, 0.0)
                v = np.sqrt(v) if f == "std" else v
            elif f == "count_nonzero":
                v = parts["nnz"]
            else:
                v = parts[f]
            out.append(np.asarray(v, dtype=np.float64))
    return out


__all__ += [
    "GROUP_FUNCS",
    "ROW_GROUP_NEEDS",
    "combine_group_partials",
    "csr_group_partials",
    "csr_row_group_partials",
    "csr_map_partials",
    "dense_group_partials",
    "group_finish",
    "group_partials",
    "map_partials",
    "nd_partials",
]
