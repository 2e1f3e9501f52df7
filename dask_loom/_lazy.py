"""Questions about optional heavy modules, answered without importing them.

``import dask_loom`` must stay cheap (``dask-loom info`` and ``--help`` never
touch scipy, zarr or dask.array); an object can only be a scipy sparse matrix
if scipy.sparse is already imported, and a pandas missing value only if pandas is.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["isna", "isna_numpy", "issparse"]


def issparse(x: Any) -> bool:
    """``scipy.sparse.issparse(x)``, without importing scipy when it is not loaded.

    Examples
    --------
    >>> import numpy as np
    >>> issparse(np.eye(2))
    False
    """
    mod = sys.modules.get("scipy.sparse")
    if mod is None:
        return False
    check = getattr(mod, "issparse", None)
    if check is None:
        # Another thread is importing scipy.sparse right now (the module is in
        # sys.modules half made): the import statement waits for it to finish.
        import scipy.sparse

        check = scipy.sparse.issparse
    return check(x)


def _missing_scalar(x: Any) -> bool:
    if x is None:
        return True
    try:
        return bool(x != x)  # NaN, NaT and Decimal("NaN") differ from themselves
    except (TypeError, ValueError):  # arrays and other objects that are no scalar are never missing
        return False


def isna(x: Any) -> Any:
    """``pandas.isna(x)`` for a scalar or a 1-D array, without importing pandas when it is not loaded.

    Without pandas loaded no ``pd.NA`` or ``pd.NaT`` can exist, so missing
    means ``None`` or a value unequal to itself (NaN, NaT).  A scalar gives a
    ``bool``, an array a boolean array.

    Examples
    --------
    >>> import numpy as np
    >>> isna(np.array(["a", None, np.nan], dtype=object)).tolist()
    [False, True, True]
    >>> isna(float("nan")), isna("x")
    (True, False)
    """
    mod = sys.modules.get("pandas")
    if mod is None:
        return isna_numpy(x)
    check = getattr(mod, "isna", None)
    if check is None:  # another thread is importing pandas: wait for it (as in issparse)
        import pandas

        check = pandas.isna
    return check(x)


def isna_numpy(x: Any) -> Any:
    """:func:`isna` for values that hold no pandas objects (what ``pandas.isna`` gives for them)."""
    import numpy as np

    if not isinstance(x, np.ndarray):
        return _missing_scalar(x)
    if x.dtype.kind in "fc":
        return np.isnan(x)
    if x.dtype.kind in "mM":
        return np.isnat(x)
    if x.dtype != object:
        return np.zeros(x.shape, dtype=bool)
    return np.fromiter(map(_missing_scalar, x.ravel()), dtype=bool, count=x.size).reshape(x.shape)
