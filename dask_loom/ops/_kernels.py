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


__all__ += ["apply_vectors", "finish"]
