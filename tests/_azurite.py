"""Azurite, Microsoft's Azure Storage emulator, on 127.0.0.1 for the ``az://`` tests.

The ``azurite`` session fixture starts Azurite's blob service (a node
program, installed by ``.ci/run`` from ``tests/azurite/package.json``; set
``DASK_LOOM_AZURITE`` to another ``azurite-blob``) on a free port, in memory,
creates a container and yields a dict::

    {"endpoint": "http://127.0.0.1:PORT/devstoreaccount1", "container": "dask-loom-test",
     "storage_options": {"connection_string": ...}, "store_config": {...obstore's...}}

``storage_options`` is what an adlfs user passes for Azurite (a connection
string holding the emulator's well-known account and key).  Containers are
created with a Shared Key signed request: obstore reads and writes blobs but
does not create containers.  The test is skipped, saying why, when node or
Azurite is absent.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import hmac
import os
import pathlib
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["ACCOUNT", "KEY", "azurite", "connection_string", "running_azurite"]

# The emulator's documented development account (public, the same in every Azurite).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINER = "dask-loom-test"
_HERE = pathlib.Path(__file__).resolve().parent


def _binary() -> str | None:
    env = os.environ.get("DASK_LOOM_AZURITE")
    if env:
        return env
    local = _HERE / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    return shutil.which("azurite-blob")


def connection_string(endpoint: str) -> str:
    """The connection string an adlfs user gives for Azurite at *endpoint*."""
    return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};"


def create_container(endpoint: str, container: str) -> None:
    """``PUT ?restype=container`` signed with the account's Shared Key (Azure's documented scheme)."""
    date = email.utils.formatdate(usegmt=True)
    headers = {"x-ms-date": date, "x-ms-version": "2021-10-04"}
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    # VERB and the eleven standard headers (all empty here), then x-ms-* headers and the resource.
    to_sign = "PUT\n" + "\n" * 11 + canonical_headers + f"/{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container"
    sig = base64.b64encode(hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()).decode()
    req = urllib.request.Request(
        f"{endpoint}/{container}?restype=container",
        method="PUT",
        headers={**headers, "Authorization": f"SharedKey {ACCOUNT}:{sig}", "Content-Length": "0"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201, resp.status


@contextlib.contextmanager
def running_azurite(workdir: str | os.PathLike) -> Iterator[dict[str, Any] | None]:
    """Azurite's blob service in *workdir* while the block runs (``None`` when node or Azurite is absent)."""
    binary = _binary()
    if binary is None or shutil.which("node") is None:
        yield None
        return
    proc = subprocess.Popen(
        [binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence", "--disableTelemetry",
         "--skipApiVersionCheck"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    port: list[int] = []
    seen: list[str] = []

    def watch() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # also drains its log so it never blocks on a full pipe
            seen.append(line)
            m = re.search(r"listens on http://127\.0\.0\.1:(\d+)", line)
            if m and not port:
                port.append(int(m.group(1)))

    watcher = threading.Thread(target=watch, daemon=True, name="azurite-log")
    watcher.start()
    try:
        for _ in range(300):
            if port or proc.poll() is not None:
                break
            threading.Event().wait(0.1)
        if not port:
            raise RuntimeError(f"Azurite did not start ({binary}): {''.join(seen)[-2000:]}")
        endpoint = f"http://127.0.0.1:{port[0]}/{ACCOUNT}"
        create_container(endpoint, CONTAINER)
        yield {
            "endpoint": endpoint,
            "container": CONTAINER,
            "storage_options": {"connection_string": connection_string(endpoint)},
            "store_config": {"azure_storage_account_name": ACCOUNT, "azure_storage_account_key": KEY,
                             "azure_storage_endpoint": endpoint},
        }  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Azurite's blob service on 127.0.0.1 with container ``dask-loom-test`` (see module docstring)."""
    with running_azurite(tmp_path_factory.mktemp("azurite")) as info:
        if info is None:
            pytest.skip("Azurite is not installed (.ci/run installs it: npm install --prefix tests/azurite; "
                        "or set DASK_LOOM_AZURITE to an azurite-blob)")  # fmt: skip
        yield info
