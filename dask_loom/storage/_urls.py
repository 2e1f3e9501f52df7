"""Picklable specs for files that may live on a local disk or an object store."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dask.base import tokenize

__all__ = ["ALLOWED_SCHEMES", "FileSpec", "check_scheme", "is_url"]

# URL schemes dask_loom opens; anything else is refused before any I/O.
ALLOWED_SCHEMES = frozenset(
    {"file", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "zip"}
)


def is_url(path: str | os.PathLike[str]) -> bool:
    """True when *path* carries a URL scheme (``s3://``, ``memory://`` …)."""
    return "://" in os.fspath(path)


def check_scheme(url: str) -> str:
    """Return the scheme of *url*, refusing schemes outside :data:`ALLOWED_SCHEMES`."""
    if "://" not in url:
        return "file"
    scheme = url.split("://", 1)[0].lower()
    for part in scheme.split("::"):
        if part not in ALLOWED_SCHEMES:
            raise ValueError(
                f"{url!r}: URL scheme {part!r} is not allowed; dask_loom opens {', '.join(sorted(ALLOWED_SCHEMES))}"
            )
    return scheme


@dataclass(frozen=True)
class FileSpec:
    """Where a single file lives: a local path or a URL plus storage options.

    Small and picklable, so it can travel inside task graphs; the file itself
    is opened lazily in whichever process needs it.
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> FileSpec:
        path = os.fspath(path)
        if is_url(path):
            scheme = check_scheme(path)
            if scheme == "file":
                return cls(os.path.abspath(path.split("://", 1)[1]), {})
            return cls(path, dict(storage_options or {}))
        return cls(os.path.abspath(os.path.expanduser(path)), {})

    @property
    def is_local(self) -> bool:
        return not is_url(self.url)

    @property
    def name(self) -> str:
        """The path or URL, for messages (never includes credentials)."""
        return self.url

    def fs(self) -> Any:
        """The fsspec filesystem and path for a remote spec."""
        import fsspec.core

        return fsspec.core.url_to_fs(self.url, **self.storage_options)

    def exists(self) -> bool:
        if self.is_local:
            return os.path.exists(self.url)
        fs, path = self.fs()
        return bool(fs.exists(path))

    def __dask_tokenize__(self) -> Any:
        return ("FileSpec", self.url, tokenize(sorted((k, repr(v)) for k, v in self.storage_options.items())))

    def __repr__(self) -> str:  # storage options may hold credentials: never print them
        return f"FileSpec({self.url!r})"
