"""Stores with simplezarr's API, each also a zarr-python ``Store`` (as ``simplezarr.stores``).

>>> import numpy as np, zarr
>>> from dask_loom.stores import MemoryStore, SlowStore
>>> store = SlowStore(MemoryStore(), base_delay=0.001)
>>> z = zarr.create_array(store, name="x", shape=(6,), chunks=(3,), dtype="i2")
>>> z[:] = np.arange(6)
>>> store.list_dir("x/")
['x/c/', 'x/zarr.json']
>>> zarr.open_array(store, path="x", mode="r")[:].tolist()
[0, 1, 2, 3, 4, 5]
"""

from dask_loom.storage._objectstore import CredentialsError, ObjectStore, open_store
from dask_loom.storage._stores import (
    BaseStore,
    KeyList,
    ListableStore,
    LocalStore,
    MemoryStore,
    ReadableStore,
    SlowStore,
    WrapperStore,
    WritableStore,
    check_key,
    check_prefix,
)

__all__ = [
    "BaseStore",
    "CredentialsError",
    "KeyList",
    "ListableStore",
    "LocalStore",
    "MemoryStore",
    "ObjectStore",
    "ReadableStore",
    "SlowStore",
    "WrapperStore",
    "WritableStore",
    "check_key",
    "check_prefix",
    "open_store",
]
