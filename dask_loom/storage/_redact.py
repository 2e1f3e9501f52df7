"""Credentials out of messages: the one place a URL's ``user:password@`` is hidden.

A leaf module (nothing of dask_loom imported) so that every storage module,
the object-store client included, can redact without an import cycle.
"""

from __future__ import annotations

import re

__all__ = ["redact_url"]

# URL userinfo (``//user:password@host``): never shown in messages.
_USERINFO = re.compile(r"(?<=//)[^/@\s]*@")


def redact_url(url: str) -> str:
    """*url* with any ``user:password@`` part replaced by ``***@`` (for messages and reprs).

    Examples
    --------
    >>> redact_url("s3://AKIA:secret@bucket/cells.loom")
    's3://***@bucket/cells.loom'
    """
    return _USERINFO.sub("***@", url)
