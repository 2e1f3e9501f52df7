"""Picklable specs for files that may live on a local disk or an object store."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from dask.base import tokenize

from dask_loom.storage._redact import redact_url

__all__ = ["ALLOWED_SCHEMES", "FileSpec", "check_scheme", "is_url", "redact_url"]

# URL schemes dask_loom opens; anything else is refused before any I/O.
ALLOWED_SCHEMES = frozenset(
    {"file", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "zip"}
)


# "name:" or "name::" at the start of a path that has no "://" (data:, ftp::s3://...).
_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)(::|:)")


def is_url(path: str | os.PathLike[str]) -> bool:
    """True when *path* carries a URL scheme (``s3://``, ``memory://`` …)."""
    return "://" in os.fspath(path)


def _known_schemes() -> frozenset[str]:
    from fsspec.registry import known_implementations

    # Also schemes fsspec does not know but other URL handlers do.
    return frozenset(known_implementations) | {"data", "javascript", "vbscript"}


def check_scheme(url: str | os.PathLike[str]) -> str:
    """Return the scheme of *url* (``"file"`` for a local path), refusing schemes outside :data:`ALLOWED_SCHEMES`.

    Every part of a chained URL (``simplecache::s3://...``) must be allowed.  A
    path without ``://`` is local unless it starts with a scheme some URL
    handler knows (``data:...``, ``ftp::...``), which is refused too: a local
    path never reaches a handler that would interpret it.

    Examples
    --------
    >>> check_scheme("s3://bucket/x.zarr"), check_scheme("/tmp/x.loom")
    ('s3', 'file')
    >>> check_scheme("ftp::s3://bucket/x.zarr")
    Traceback (most recent call last):
    ...
    dask_loom.errors.UnsupportedSchemeError: 'ftp::s3://bucket/x.zarr': URL scheme 'ftp' is not allowed; dask_loom opens abfs, abfss, az, file, gcs, gs, http, https, memory, s3, s3a, zip
    """
    from dask_loom.errors import UnsupportedSchemeError

    text = os.fspath(url)
    if not isinstance(text, str):
        raise TypeError(f"paths and URLs must be str, not {type(text).__name__}")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        parts = scheme.split("::")
    else:
        m = _SCHEME_PREFIX.match(text)
        if m is None:
            return "file"
        head = text.split("::")[:-1] if "::" in text else [m.group(1)]
        parts = [h.lower() for h in head]
        if m.group(2) == ":" and parts[0] not in _known_schemes():
            return "file"  # a local name with a colon ("C:", "run:1.loom")
        scheme = "::".join(parts)
        if all(p in ALLOWED_SCHEMES for p in parts):
            # Allowed, but without "://" nothing would handle it as a URL: say so.
            raise UnsupportedSchemeError(
                f"{redact_url(text)!r}: a URL needs '://' after its scheme {scheme!r}"
            )
    for part in parts:
        if part not in ALLOWED_SCHEMES:
            raise UnsupportedSchemeError(
                f"{redact_url(text)!r}: URL scheme {part!r} is not allowed; dask_loom opens {', '.join(sorted(ALLOWED_SCHEMES))}"
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
    def from_path(
        cls, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
    ) -> FileSpec:
        path = os.fspath(path)
        scheme = check_scheme(path)
        if is_url(path):
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
        return redact_url(self.url)

    def fs(self) -> Any:
        """The fsspec filesystem and path for a remote spec (writers and rare paths; readers use :meth:`remote`)."""
        import fsspec.core

        return fsspec.core.url_to_fs(self.url, **self.storage_options)

    def remote(self) -> Any:
        """The :class:`~dask_loom.storage._rangefile.RemoteFile` of a remote spec (obstore, or fsspec for ``memory://``)."""
        from dask_loom.storage._rangefile import RemoteFile

        return RemoteFile(self.url, self.storage_options, name=self.name)

    def exists(self) -> bool:
        if self.is_local:
            return os.path.exists(self.url)
        return bool(self.remote().exists())

    def __dask_tokenize__(self) -> Any:
        return ("FileSpec", self.url, tokenize(sorted((k, repr(v)) for k, v in self.storage_options.items())))

    def __repr__(self) -> str:  # storage options may hold credentials: never print them
        return f"FileSpec({redact_url(self.url)!r})"
