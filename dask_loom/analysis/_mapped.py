"""A ``MappedCollection`` as one lazy ``anndata.AnnData`` (the files joined, cells as rows)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from dask_loom._doors import provides
from dask_loom.errors import ElementNotFoundError

if TYPE_CHECKING:
    import anndata

    from dask_loom.anndata._mapped import MappedCollection

__all__ = ["mapped_to_anndata"]


@provides("mapped", "anndata")
def mapped_to_anndata(
    mc: MappedCollection,
    *,
    layers: Iterable[str] | None = None,
    sparse: bool = True,
    obs_keys: Iterable[str] | None = None,
    target_bytes: Any = None,
) -> anndata.AnnData:
    """See :meth:`dask_loom.MappedCollection.to_anndata`."""
    import anndata as ad
    import pandas as pd

    from dask_loom.anndata._dask import _column_dtype, _obs_frame

    keys = [k for k in mc.layers_keys if k != "raw.X"]
    if layers is not None:
        wanted = list(layers)
        for k in wanted:
            if k not in keys:
                raise ElementNotFoundError(
                    f"layer '{k}' was not requested: the collection holds layers {keys} (pass it in layers_keys)"
                )
    else:
        wanted = keys
    if not wanted:
        raise ElementNotFoundError("the collection holds no layer to make X of (layers_keys has only 'raw.X')")
    x_key = "X" if "X" in wanted else wanted[0]
    x = mc.to_dask(x_key, sparse=sparse, target_bytes=target_bytes)
    arrays = {k: mc.to_dask(k, sparse=sparse, target_bytes=target_bytes) for k in wanted if k != x_key}

    if obs_keys is None:
        columns = sorted(set().union(*mc._cache_obs_keys)) if mc._cache_obs_keys else []
    else:
        columns = list(obs_keys)
        for key in columns:
            if not any(key in present for present in mc._cache_obs_keys):
                raise ElementNotFoundError(
                    f"obs column '{key}' is absent from every file: {[s.name for s in mc.storages]}"
                )
    dtypes = {key: _column_dtype(mc, key) for key in columns}
    parts = [_obs_frame(mc, i, columns, dtypes) for i, n in enumerate(mc.n_obs_list) if n]
    obs = pd.concat(parts) if parts else _obs_frame(mc, 0, columns, dtypes).iloc[:0]
    obs = obs.rename(columns={"_store_idx": "store_idx"})
    obs["store_idx"] = pd.Categorical.from_codes(
        obs["store_idx"].to_numpy(), categories=[s.name for s in mc.storages]
    )
    obs.index = obs.index.astype(str)

    if mc.var_joint is not None and len(mc.var_joint) == x.shape[1]:
        var = pd.DataFrame(index=pd.Index(np.asarray(mc.var_joint, dtype=object).astype(str)))
    else:
        var = pd.DataFrame(index=pd.RangeIndex(x.shape[1]).astype(str))
    obsm = {k: mc.to_dask(k, target_bytes=target_bytes) for k in (mc.obsm_keys or [])}
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names.*", category=UserWarning)
        return ad.AnnData(x, obs=obs, var=var, layers=arrays or None, obsm=obsm or None)
