"""Per-block numpy kernels, kept apart from the graph builders (pure functions of arrays)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

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
        b = b.astype(np.float64)
    return np.einsum("ij,ij->i" if red == 1 else "ij,ij->j", b, b).astype(np.float64)


def block_partials(block: np.ndarray, red: int, needs: Iterable[str]) -> dict[str, np.ndarray]:
    """Partial statistics of a 2-D block along axis *red* (the axis being reduced)."""
    needs = set(needs)
    out: dict[str, np.ndarray] = {}
    keep = block.shape[1 - red]
    if "n" in needs:
        out["n"] = np.full(keep, block.shape[red], dtype=np.float64)
    if "s1" in needs:
        out["s1"] = _sum(block, red)
    if "s2" in needs:
        out["s2"] = _sumsq(block, red)
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
                    out["nmin"] = np.where(valid, block, np.inf).min(axis=red, initial=np.inf).astype(np.float64) if not empty else np.full(keep, np.inf)
                if "nmax" in needs:
                    out["nmax"] = np.where(valid, block, -np.inf).max(axis=red, initial=-np.inf).astype(np.float64) if not empty else np.full(keep, -np.inf)
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


def combine_partials(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine partials of blocks that cover the same rows (columns)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    out = dict(parts[0])
    for p in parts[1:]:
        for k, v in p.items():
            if k in ("min", "nmin"):
                out[k] = np.minimum(out[k], v)
            elif k in ("max", "nmax"):
                out[k] = np.maximum(out[k], v)
            else:
                out[k] = out[k] + v
    return out


def finish(parts: dict[str, np.ndarray], reductions: list[Reduction]) -> list[np.ndarray]:
    """Final values of every reduction from combined partials."""
    res = []
    for r in reductions:
        v = np.asarray(r.finish(parts), dtype=np.float64)
        if r.name in ("nanmin", "nanmax"):
            v = np.where(np.isinf(v) & (parts["nmin" if r.name == "nanmin" else "nmax"] == (np.inf if r.name == "nanmin" else -np.inf)), np.nan, v)
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

_MATMUL = {"sum", "mean", "len", "nansum", "nanmean", "nanlen", "sumofsquares", "var", "std", "nanvar", "nanstd"}
_REDUCEAT = {"max": np.maximum, "min": np.minimum, "prod": np.multiply, "any": np.logical_or, "all": np.logical_and}
_NPG_ALIASES = {"count": "len", "add": "sum", "plus": "sum", "amax": "max", "maximum": "max", "amin": "min", "minimum": "min", "average": "mean"}
#: Functions whose result is not one number per group (not valid for ``aggregate``).
NOT_REDUCING = {"cumsum", "cumprod", "cummax", "cummin", "sort", "array", "nancumsum", "nancumprod", "nancummax", "nancummin", "sorted", "rsorted", "asort", "dsort", "asorted", "split", "splice"}


class GroupPlan:
    """Precomputed column grouping for :func:`group_reduce` (one per aggregate call).

    ``idx`` maps each column to its group (0..n_groups-1, every group
    non-empty).
    """

    def __init__(self, idx: np.ndarray, n_groups: int) -> None:
        self.idx = np.asarray(idx, dtype=np.int64)
        self.n_groups = int(n_groups)
        self.order = np.argsort(self.idx, kind="stable")
        counts = np.bincount(self.idx, minlength=self.n_groups)
        self.counts = counts
        self.starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        self.first = self.order[self.starts]
        self.last = self.order[self.starts + counts - 1]

    def onehot(self, dtype: Any) -> np.ndarray:
        m = np.zeros((len(self.idx), self.n_groups), dtype=dtype)
        m[np.arange(len(self.idx)), self.idx] = 1
        return m

    def __dask_tokenize__(self) -> Any:
        return ("GroupPlan", self.idx.tobytes(), self.n_groups)


def check_group_func(func: str) -> str:
    """Canonical name of a numpy-groupies reduction; ``ValueError`` for unknown or non-reducing names."""
    from numpy_groupies import aggregate_np

    if not isinstance(func, str):
        raise TypeError(f"aggregation function must be a numpy-groupies function name, not {type(func).__name__}")
    name = _NPG_ALIASES.get(func, func)
    if name in NOT_REDUCING:
        raise ValueError(f"'{func}' does not reduce each group to one value; use a reducing numpy-groupies function")
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
    # numpy-groupies' numpy implementation: its numba one compiles each
    # function on first use in every worker process, which costs seconds.
    from numpy_groupies import aggregate_np

    if band.shape[1] == 0 or band.shape[0] == 0:
        return np.zeros((band.shape[0], plan.n_groups))
    work_dtype = band.dtype if band.dtype in (np.float32, np.float64) else np.float64
    if func in _MATMUL:
        x = band.astype(work_dtype, copy=False)
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
        s1 = (x @ oh).astype(np.float64)
        if base == "sum":
            return s1
        with np.errstate(invalid="ignore", divide="ignore"):
            if base == "mean":
                return s1 / n
            s2 = ((x * x) @ oh).astype(np.float64)
            if base == "sumofsquares":
                return s2
            var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)
            return var if base == "var" else np.sqrt(var)
    if func in _REDUCEAT:
        sorted_cols = band[:, plan.order]
        out = _REDUCEAT[func].reduceat(sorted_cols, plan.starts, axis=1)
        return out.astype(np.float64)
    if func == "first":
        return band[:, plan.first].astype(np.float64)
    if func == "last":
        return band[:, plan.last].astype(np.float64)
    return np.asarray(aggregate_np(plan.idx, band, func=func, axis=1, size=plan.n_groups, fill_value=0), dtype=np.float64)


__all__ += ["GroupPlan", "NOT_REDUCING", "check_group_func", "group_reduce"]
