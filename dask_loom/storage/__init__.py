"""Where bytes live: file specs, stores (simplezarr API + zarr-python Store)."""

from dask_loom.storage._urls import ALLOWED_SCHEMES, FileSpec, check_scheme, is_url, redact_url

__all__ = ["ALLOWED_SCHEMES", "FileSpec", "check_scheme", "is_url", "redact_url"]
