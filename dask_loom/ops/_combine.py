"""Combining the partial statistics of blocks that cover the same cells (pure functions of arrays).

Most partials combine one key at a time (sums add, extremes take the
extreme, products multiply).  Two kinds combine as a whole:

* a *pick* (``<mode>_v``, ``<mode>_i``, ``<mode>_p``): one value per cell
  chosen among the blocks' by its value and its position among the selected
  columns (argmax/argmin: the larger/smaller value, the earlier position on a
  tie; first/last: the earlier/later position).  Positions make the choice
  independent of the order the blocks come in.
* counts, means and sums of squared deviations (``wn``, ``wmean``, ``m2``),
  merged by Chan, Golub and LeVeque's pairwise update: no sum of squares is
  ever subtracted from another, so variances keep their precision.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PICK_MODES", "combine_partials"]

#: Pick modes and whether a candidate is chosen by value (``1``: larger, ``-1``: smaller) or by position alone (``0``).
PICK_MODES: dict[str, int] = {"pmax": 1, "pmin": -1, "pfirst": 0, "plast": 0}


def _pick(out: dict[str, np.ndarray], p: dict[str, np.ndarray], mode: str) -> None:
    v, i, have = f"{mode}_v", f"{mode}_i", f"{mode}_p"
    a_p, b_p = out[have], p[have]
    if PICK_MODES[mode] == 0:
        better = b_p & (~a_p | ((p[i] < out[i]) if mode == "pfirst" else (p[i] > out[i])))
    else:
        a_v, b_v = out[v], p[v]
        strict = b_v > a_v if PICK_MODES[mode] > 0 else b_v < a_v
        better = b_p & (~a_p | strict | ((b_v == a_v) & (p[i] < out[i])))
    out[v] = np.where(better, p[v], out[v])
    out[i] = np.where(better, p[i], out[i])
    out[have] = a_p | b_p


def _chan(out: dict[str, np.ndarray], p: dict[str, np.ndarray]) -> None:
    na, nb = out["wn"], p["wn"]
    n = na + nb
    delta = p["wmean"] - out["wmean"]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n > 0, nb / n, 0.0)
    out["m2"] = out["m2"] + p["m2"] + delta * delta * na * frac
    out["wmean"] = out["wmean"] + delta * frac
    out["wn"] = n


def combine_partials(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine partials of blocks that cover the same rows (columns)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    out = dict(parts[0])
    modes = [m for m in PICK_MODES if f"{m}_v" in out]
    for p in parts[1:]:
        for mode in modes:
            _pick(out, p, mode)
        if "m2" in out:
            _chan(out, p)
        for k, v in p.items():
            if k in ("min", "nmin"):
                out[k] = np.minimum(out[k], v)
            elif k in ("max", "nmax"):
                out[k] = np.maximum(out[k], v)
            elif k == "prod":
                out[k] = out[k] * v
            elif k == "nanp":  # a NaN in any block decides the cell (argmax/argmin)
                out[k] = out[k] | v
            elif k.partition("_")[0] not in PICK_MODES and k not in ("wn", "wmean", "m2"):
                out[k] = out[k] + v
    return out
