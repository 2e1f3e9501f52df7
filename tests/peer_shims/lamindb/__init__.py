"""A database-free stand-in for the parts of ``lamindb`` its ``test_mapped`` uses.

Artifacts are AnnData objects written to a temporary folder when created
(as lamindb writes them to its cache); collections and query sets are
in-memory lists; ``mapped()`` passes lamindb's arguments, in lamindb's
positional order, to :class:`dask_loom.MappedCollection`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from typing import Any

from lamindb import core, errors
from lamindb.core import MappedCollection

__all__ = ["Artifact", "Collection", "Feature", "Schema", "core", "errors", "save"]

_STORAGE = tempfile.mkdtemp(prefix="lamindb-shim-")
_counter = itertools.count()
_saved: list[Artifact] = []


def _mapped(
    artifacts: list[Artifact],
    layers_keys: Any = None,
    obs_keys: Any = None,
    obsm_keys: Any = None,
    obs_filter: Any = None,
    join: Any = "inner",
    encode_labels: Any = True,
    unknown_label: Any = None,
    cache_categories: bool = True,
    parallel: bool = False,
    dtype: Any = None,
    stream: bool = False,
    is_run_input: Any = None,
) -> MappedCollection:
    # lamindb skips artifacts that are neither .h5ad nor .zarr, and passes the
    # cached path (stream=False) or the storage path (stream=True): both are
    # the same local file here.
    paths = [a.path for a in artifacts if ".h5ad" in a.suffix or ".zarr" in a.suffix]
    return MappedCollection(
        paths, layers_keys, obs_keys, obsm_keys, obs_filter, join, encode_labels, unknown_label,
        cache_categories, parallel, dtype,
    )  # fmt: skip


class Artifact:
    """An AnnData written to the shim's storage folder."""

    def __init__(self, path: str, key: str | None, description: str | None) -> None:
        self.path = path
        self.key = key
        self.description = description
        self.suffix = ".zarr" if path.endswith(".zarr") else ".h5ad"
        self.created_at = next(_counter)

    @classmethod
    def from_anndata(cls, adata: Any, *, key: str | None = None, description: str | None = None, format: str | None = None) -> Artifact:
        zarr = format == "zarr" or (key or "").endswith(".zarr")
        path = os.path.join(_STORAGE, f"artifact{next(_counter)}{'.zarr' if zarr else '.h5ad'}")
        if zarr:
            adata.write_zarr(path)
        else:
            adata.write_h5ad(path)
        return cls(path, key, description)

    def save(self) -> Artifact:
        if self not in _saved:
            _saved.append(self)
        return self

    def cache(self) -> str:
        return self.path

    def delete(self, permanent: bool = False) -> None:
        if self in _saved:
            _saved.remove(self)
        if permanent:
            shutil.rmtree(self.path, ignore_errors=True) if os.path.isdir(self.path) else os.remove(self.path)

    @classmethod
    def filter(cls, **conditions: Any) -> _QuerySet:
        found = list(_saved)
        for name, value in conditions.items():
            field, _, op = name.partition("__")
            if op == "in":
                found = [a for a in found if getattr(a, field) in value]
            else:
                found = [a for a in found if getattr(a, field) == value]
        return _QuerySet(found)


class _QuerySet:
    def __init__(self, artifacts: list[Artifact]) -> None:
        self.artifacts = artifacts

    def order_by(self, field: str) -> _QuerySet:
        reverse = field.startswith("-")
        return _QuerySet(sorted(self.artifacts, key=lambda a: getattr(a, field.lstrip("-")), reverse=reverse))

    def mapped(self, *args: Any, **kwargs: Any) -> MappedCollection:
        return _mapped(self.artifacts, *args, **kwargs)


class Collection:
    """An ordered list of artifacts."""

    def __init__(self, artifacts: list[Artifact], *, key: str | None = None) -> None:
        self.artifacts = list(artifacts)
        self.key = key

    def save(self) -> Collection:
        return self

    def mapped(self, *args: Any, **kwargs: Any) -> MappedCollection:
        return _mapped(self.artifacts, *args, **kwargs)

    def delete(self, permanent: bool = False) -> None:
        self.artifacts = []


class Feature:
    """Imported by the peer's module; not used by ``test_mapped``."""


class Schema:
    """Imported by the peer's module; not used by ``test_mapped``."""


def save(records: Any) -> None:
    """Imported by the peer's module; not used by ``test_mapped``."""
