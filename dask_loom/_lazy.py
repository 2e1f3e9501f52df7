"""Questions about optional heavy modules, answered without importing them.

``import dask_loom`` must stay cheap (``dask-loom info`` and ``--help`` never
touch scipy, zarr or dask.array); an object can only be a scipy sparse matrix
if scipy.sparse is already imported.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["issparse"]


def issparse(x: Any) -> bool:
    """``scipy.sparse.issparse(x)``, without importing scipy when it is not loaded.

    Examples
    --------
    >>> import numpy as np
    >>> issparse(np.eye(2))
    False
    """
    if "scipy.sparse" not in sys.modules:
        return False
    return sys.modules["scipy.sparse"].issparse(x)
