"""Security: hostile keys and names, unsafe deserialisation, URL schemes, credentials, sizes.

* **Keys and node paths** — store keys with ``..``, absolute paths, NUL bytes,
  backslashes and their percent-encodings are refused with
  :class:`~dask_loom.errors.InvalidKeyError` naming the store and the key, for
  every store kind (``LocalStore``, ``MemoryStore``, ``ObjectStore`` on
  ``memory://`` and on the local S3 server) and every operation (simplezarr's
  sync API and zarr-python's async one); so are node paths given to
  ``open_zarr``, ``ZarrGroup[...]``, ``to_zarr`` and layer/attribute/graph
  names written to ``.loom`` and ``.loom.zarr`` files.  Afterwards every file
  around a local store is byte-for-byte what it was.
* **No unsafe deserialisation** — an AST scan of ``dask_loom/**/*.py`` finds no
  call to ``pickle``/``cloudpickle``/``marshal`` loaders, ``eval``/``exec``,
  ``yaml.load``, ``html.unescape`` or ``np.load(allow_pickle=True)``; strings
  such as ``&amp;`` and ``&lt;script&gt;`` read back verbatim (the bytes h5py
  and the JSON hold); Zarr arrays whose metadata names the pickle codec are
  refused, and their payload (which would create a marker file) never runs.
* **URL schemes** — every public entry point taking a path or URL refuses
  schemes outside ``dask_loom.storage.ALLOWED_SCHEMES`` (chained ones too)
  with ``UnsupportedSchemeError`` before any I/O (watched with an audit hook);
  the CLI exits 2.
* **Credentials** — an access key and secret given as storage options never
  appear in reprs, exception texts, dask task keys, DEBUG logs or the logs of
  a process-based cluster's scheduler and workers.
* **Sizes** — declared 10^12-element attributes and an 8 MB ``zarr.json`` are
  covered in ``tests/test_bad_input.py`` (``test_loom_damage``,
  ``test_loom_zarr_damage``, ``test_zarr_metadata_size_capped``); here only a
  sparse 2 GiB v2 ``.zattrs``, which is refused before it is read.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import dask_loom
from dask_loom.errors import (
    InvalidKeyError,
    InvalidNameError,
    TooLargeError,
    UnsupportedCodecError,
    UnsupportedSchemeError,
)
from tests._reliability import is_typed, record, run_limited

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- hostile store keys -------------------------------------------------------------------

HOSTILE_KEYS = [
    "../x",
    "a/../../x",
    "..",
    ".",
    "a/./b",
    "a//b",
    "/etc/passwd",
    "/abs",
    "a\x00b",
    "\x00",
    "a\\..\\..\\x",
    "..\\x",
    "a\\b",
    "%2e%2e/x",  # '../x' once a server decodes it
    "a/%2E%2E/%2e%2e/x",
    "%2e%2e%2fx",  # '../x', the slash encoded too
    "%2fetc/passwd",  # '/etc/passwd'
    "a%5c..%5cx",  # 'a\..\x'
    "a%00b",  # NUL
]


def _key_ops(store: Any, key: str) -> dict[str, Callable[[], Any]]:
    """Every way to reach a key: simplezarr's sync API and zarr-python's async one."""
    from zarr.core.buffer import cpu, default_buffer_prototype

    proto = default_buffer_prototype()
    buf = cpu.Buffer.from_bytes(b"evil")
    return {
        "get": lambda: store.get(key),
        "set": lambda: store.set(key, b"evil"),
        "erase": lambda: store.erase(key),
        "get_partial_values": lambda: store.get_partial_values([(key, 0, 1)]),
        "set_partial_values": lambda: store.set_partial_values([(key, 0, b"evil")]),
        "list_prefix": lambda: list(store.list_prefix(key + "/")),
        "list_prefix (zarr's spelling)": lambda: list(store.list_prefix(key)),
        "list_dir": lambda: list(store.list_dir(key + "/")),
        "erase_prefix": lambda: store.erase_prefix(key + "/"),
        "zarr get": lambda: asyncio.run(store.get(key, proto)),
        "zarr set": lambda: asyncio.run(store.set(key, buf)),
        "zarr delete": lambda: asyncio.run(store.delete(key)),
        "zarr exists": lambda: asyncio.run(store.exists(key)),
        "zarr get_partial_values": lambda: asyncio.run(store.get_partial_values(proto, [(key, None)])),
    }


def _tree(top: str) -> dict[str, str]:
    """Every file under *top* (the store's parent: outside the store too) with a hash of its bytes."""
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), top) + "/"] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, top)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _make_store(kind: str, tmp_path: Any, request: Any) -> tuple[Any, Callable[[], Any]]:
    """A store holding one key ``a/b``, and a function giving everything around it (to compare before/after)."""
    from dask_loom.stores import LocalStore, MemoryStore, ObjectStore

    if kind == "local":
        s = LocalStore(tmp_path / "store")
        # A sibling the traversals aim at.
        (tmp_path / "x").write_bytes(b"outside")
        snap = lambda: _tree(str(tmp_path))  # noqa: E731
    elif kind == "memory":
        s = MemoryStore()
        snap = lambda: dict(s.dict)  # noqa: E731
    elif kind == "object-memory":
        import fsspec

        s = ObjectStore(f"memory://security-{uuid.uuid4().hex}/store")
        fs = fsspec.filesystem("memory")
        snap = lambda: {p: fs.cat_file(p) for p in fs.find("/")}  # noqa: E731
    else:
        server = request.getfixturevalue("s3_server")
        s = ObjectStore(f"s3://{server['bucket']}/security-{uuid.uuid4().hex}/store", storage_options=server["storage_options"])
        import boto3

        client = boto3.client(
            "s3", endpoint_url=server["endpoint_url"], aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )

        def snap() -> dict[str, str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=server["bucket"])
            return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}

    s.set("a/b", b"keep")
    return s, snap


@pytest.mark.parametrize("kind", ["local", "memory", "object-memory", pytest.param("object-s3", marks=pytest.mark.s3)])
def test_hostile_store_keys_refused(kind, tmp_path, request):
    store, snap = _make_store(kind, tmp_path, request)
    before = snap()
    tried = refused = 0
    failures = []
    for key in HOSTILE_KEYS:
        for op, fn in _key_ops(store, key).items():
            tried += 1
            try:
                fn()
            except InvalidKeyError as exc:
                msg = str(exc)
                if store.name in msg and repr(key) in msg:
                    refused += 1
                else:
                    failures.append(f"{op}({key!r}): the message does not name the store and key: {msg}")
            except Exception as exc:
                failures.append(f"{op}({key!r}): {type(exc).__name__}: {exc}")
            else:
                failures.append(f"{op}({key!r}) was accepted")
    after = snap()
    assert store.get("a/b") == b"keep"
    record(
        "security",
        f"hostile store keys: {kind}",
        injected=f"{len(HOSTILE_KEYS)} keys ('..', absolute, NUL, backslash, percent-encoded) x "
        f"{len(_key_ops(store, 'k'))} operations (simplezarr sync and zarr async API)",
        times=tried,
        result=f"{refused} refused with InvalidKeyError naming the store and key; "
        f"{'nothing changed in or around the store' if before == after else 'CONTENT CHANGED'}",
        ok=not failures and before == after,
    )
    assert not failures, "\n".join(failures[:20])
    assert before == after, "a hostile key changed what is stored in or around the store"


# -- hostile node paths and names ------------------------------------------------------------

NODE_PATHS = [
    "../secret.zarr",
    "a/../../secret.zarr",
    "..",
    ".",
    "a\\..\\..\\secret.zarr",
    "%2e%2e/secret.zarr",
    "%2e%2e%2fsecret.zarr",
    "a\x00",
    "a//b",
]


def _expect_refused(label: str, fn: Callable[[], Any], names: tuple[str, ...], bad: str, failures: list[str], *, cls: type = InvalidKeyError) -> bool:
    try:
        fn()
    except cls as exc:
        msg = str(exc)
        if not any(n in msg for n in names):
            failures.append(f"{label}: the message names none of {names}: {msg}")
            return False
        if repr(bad) not in msg and f"'{bad}'" not in msg:
            failures.append(f"{label}: the message does not name {bad!r}: {msg}")
            return False
        return True
    except Exception as exc:
        failures.append(f"{label}: {type(exc).__name__} instead of {cls.__name__}: {exc}")
        return False
    failures.append(f"{label}: accepted")
    return False


def test_hostile_zarr_node_paths_refused(tmp_path):
    import dask.array as da
    import zarr

    from dask_loom.stores import LocalStore

    root = tmp_path / "store.zarr"
    g = zarr.open_group(str(root), mode="w")
    g.create_array("a", data=np.arange(4))
    zarr.open_array(str(tmp_path / "secret.zarr"), mode="w", shape=(3,), dtype="i4")[:] = 7
    before = _tree(str(tmp_path))
    failures: list[str] = []
    tried = refused = 0
    names = (str(root), "store.zarr")
    for p in NODE_PATHS:
        grp = dask_loom.open_zarr(str(root), mode="r")
        for label, fn in [
            (f"open_zarr(path, {p!r})", lambda p=p: dask_loom.open_zarr(str(root), p, mode="r")),
            (f"open_zarr(LocalStore, {p!r})", lambda p=p: dask_loom.open_zarr(LocalStore(root), p, mode="r")),
            (f"ZarrGroup[{p!r}]", lambda p=p, grp=grp: grp[p]),
            (f"to_zarr(path={p!r})", lambda p=p: dask_loom.to_zarr(da.arange(4, chunks=2), str(root), p, scheduler="sync")),
            (f"to_zarr(MemoryStore, path={p!r})", lambda p=p: dask_loom.to_zarr(np.arange(4), dask_loom.stores.MemoryStore(), p, scheduler="sync")),
        ]:
            tried += 1
            ns = names if "MemoryStore" not in label else ("MemoryStore",)
            refused += _expect_refused(label, fn, ns, p.strip("/"), failures)
    after = _tree(str(tmp_path))
    # A leading '/' is the store's root, as in zarr-python: it stays inside.
    z = dask_loom.to_zarr(np.arange(5), str(root), "/inside", scheduler="sync")
    assert os.path.isdir(root / "inside") and z.to_dask().compute(scheduler="sync").tolist() == [0, 1, 2, 3, 4]
    assert dask_loom.open_zarr(str(root), "/inside", mode="r").to_dask().compute(scheduler="sync").tolist() == [0, 1, 2, 3, 4]
    # Outside the store only the writer's lock file of that legitimate write is new.
    outside = {k: v for k, v in _tree(str(tmp_path)).items() if not k.startswith(("store.zarr", ".store.zarr.dask-loom.lock"))}
    record(
        "security",
        "hostile Zarr node paths",
        injected=f"{len(NODE_PATHS)} paths ('..', NUL, backslash, percent-encoded) x open_zarr (path and store), ZarrGroup[...], to_zarr (local, memory)",
        times=tried,
        result=f"{refused} refused with InvalidKeyError naming the store and path; "
        f"{'no file changed' if before == after else 'FILES CHANGED'}; '/inside' lands inside the store",
        ok=not failures and before == after,
    )
    assert not failures, "\n".join(failures[:20])
    assert before == after
    assert outside == {k: v for k, v in before.items() if not k.startswith("store.zarr")}


LOOM_NAMES = ["../x", "../../escape", "a/b", "/abs", "..", ".", "a\\..\\b", "%2e%2e", "%2e%2e%2fx", "a\x00b", ""]


def _loom_writes(ds: Any, name: str, m: np.ndarray) -> dict[str, Callable[[], Any]]:
    import scipy.sparse as sp

    ops: dict[str, Callable[[], Any]] = {
        "row attribute": lambda: ds.ra.__setitem__(name, np.arange(m.shape[0])),
        "column attribute": lambda: ds.ca.__setitem__(name, np.arange(m.shape[1])),
        "global attribute": lambda: ds.attrs.__setitem__(name, "v"),
        "row graph": lambda: ds.row_graphs.__setitem__(name, sp.eye(m.shape[0], format="coo")),
        "column graph": lambda: ds.col_graphs.__setitem__(name, sp.eye(m.shape[1], format="coo")),
    }
    if name:  # layer '' is the main matrix
        ops["layer"] = lambda: ds.layers.__setitem__(name, m)
    return ops


@pytest.mark.parametrize("ext", [".loom", ".loom.zarr"])
def test_hostile_loom_names_refused(tmp_path, ext):
    path = str(tmp_path / f"f{ext}")
    m = np.arange(12, dtype="f4").reshape(3, 4)
    dask_loom.create(path, m, {"Gene": np.array(["a", "b", "c"])}, {"CellID": np.arange(4)})
    before = _tree(str(tmp_path))
    failures: list[str] = []
    tried = refused = 0
    with dask_loom.connect(path) as ds:
        for name in LOOM_NAMES:
            for what, fn in _loom_writes(ds, name, m).items():
                tried += 1
                # InvalidNameError is also a KeyError, as loompy's "cannot contain a slash".
                refused += _expect_refused(f"{what} {name!r}", fn, (path,), name, failures, cls=InvalidNameError)
        # create() takes names too.
        for name in ("../x", "a\x00b", ".."):
            tried += 1
            refused += _expect_refused(
                f"create(layers={{{name!r}: ...}})",
                lambda name=name: dask_loom.create(str(tmp_path / f"g{ext}"), {"": m, name: m}, {}, {}),
                (str(tmp_path / f"g{ext}"),),
                name,
                failures,
                cls=InvalidNameError,
            )
        assert ds.ra.keys() == ["Gene"] and ds.ca.keys() == ["CellID"] and list(ds.layers.keys()) == [""]
    after = {k: v for k, v in _tree(str(tmp_path)).items() if not k.startswith(("g.loom", ".g.loom"))}
    assert issubclass(InvalidNameError, KeyError)
    record(
        "security",
        f"hostile layer/attribute/graph names: {ext}",
        injected=f"{len(LOOM_NAMES)} names ('..', '/', NUL, backslash, percent-encoded, empty) x layers, ra, ca, attrs, row/col graphs; 3 via create()",
        times=tried,
        result=f"{refused} refused with InvalidNameError (a KeyError) naming the file and name; "
        f"{'no file changed' if before == after else 'FILES CHANGED'}",
        ok=not failures and before == after,
    )
    assert not failures, "\n".join(failures[:20])
    assert before == after


# -- no pickle, eval, exec, yaml.load, html.unescape ---------------------------------------------

BANNED_CALLS = {
    "pickle.load": "unpickles", "pickle.loads": "unpickles", "pickle.Unpickler": "unpickles",
    "_pickle.load": "unpickles", "_pickle.loads": "unpickles",
    "cloudpickle.load": "unpickles", "cloudpickle.loads": "unpickles",
    "dill.load": "unpickles", "dill.loads": "unpickles",
    "pandas.read_pickle": "unpickles", "shelve.open": "unpickles",
    "distributed.protocol.pickle.loads": "unpickles",
    "marshal.load": "runs bytecode", "marshal.loads": "runs bytecode",
    "eval": "runs code", "exec": "runs code", "builtins.eval": "runs code", "builtins.exec": "runs code",
    "yaml.load": "constructs objects", "yaml.load_all": "constructs objects",
    "yaml.unsafe_load": "constructs objects", "yaml.unsafe_load_all": "constructs objects",
    "yaml.full_load": "constructs objects", "yaml.full_load_all": "constructs objects",
    "html.unescape": "rewrites file content",
}
# (path, call) pairs allowed, each with the reason.  None today: ast.literal_eval
# (dask_loom/_config.py, worker_setup.py) evaluates literals only and is not banned.
ALLOWED_CALLS: dict[tuple[str, str], str] = {}


def _aliases(tree: ast.AST) -> dict[str, str]:
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def unsafe_calls(source: str, filename: str = "<src>") -> list[tuple[int, str, str]]:
    """``(line, call, why)`` for every banned call in *source* (aliases resolved)."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        if name.startswith("numpy.") and name.rsplit(".", 1)[-1] == "load":
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append((node.lineno, name + "(allow_pickle=...)", "unpickles"))
            continue
        if name in BANNED_CALLS:
            found.append((node.lineno, name, BANNED_CALLS[name]))
    return found


def test_scanner_finds_every_banned_form():
    """The scan below can fail: each banned form, aliased or not, is found in a snippet."""
    snippet = """
import pickle, pickle as pk, yaml, html, marshal, numpy as np, cloudpickle
from pickle import loads as L
from html import unescape
import builtins
pickle.loads(b""); pk.load(f); L(b""); cloudpickle.loads(b"")
eval("1"); exec("x=1"); builtins.eval("1")
yaml.load(s); yaml.unsafe_load(s); html.unescape(s); unescape(s)
marshal.loads(b""); np.load(f, allow_pickle=True); np.load(f, allow_pickle=flag)
np.load(f); np.load(f, allow_pickle=False); yaml.safe_load(s); ast.literal_eval("1")
"""
    found = [c for _, c, _ in unsafe_calls(snippet)]
    assert found == [
        "pickle.loads", "pickle.load", "pickle.loads", "cloudpickle.loads", "eval", "exec", "builtins.eval",
        "yaml.load", "yaml.unsafe_load", "html.unescape", "html.unescape", "marshal.loads",
        "numpy.load(allow_pickle=...)", "numpy.load(allow_pickle=...)",
    ]  # fmt: skip


def test_no_unsafe_deserialisation_in_source():
    pkg = os.path.join(REPO, "dask_loom")
    files = calls = 0
    hits = []
    for dirpath, _dirs, names in os.walk(pkg):
        for n in sorted(names):
            if not n.endswith(".py"):
                continue
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, REPO)
            with open(p, encoding="utf-8") as fh:
                src = fh.read()
            files += 1
            calls += sum(isinstance(x, ast.Call) for x in ast.walk(ast.parse(src, rel)))
            for line, call, why in unsafe_calls(src, rel):
                if (rel, call) not in ALLOWED_CALLS:
                    hits.append(f"{rel}:{line}: {call} ({why})")
    record(
        "security",
        "no pickle/eval/exec/yaml.load/html.unescape in dask_loom",
        injected=f"AST scan of every call in dask_loom/**/*.py ({len(BANNED_CALLS)} banned names, aliases resolved, np.load(allow_pickle=True))",
        times=calls,
        result=f"{files} files, {calls} calls scanned: {len(hits)} unsafe",
        ok=not hits,
    )
    assert files > 50 and calls > 1000
    assert not hits, "\n".join(hits)


HOSTILE_STRINGS = ["&amp;", "&lt;script&gt;alert(1)&lt;/script&gt;", "&#233;t&#233;", "a&b<c>", "&quot;q&quot;", "&nbsp;&#x27;"]


def test_loom_strings_read_verbatim(tmp_path):
    """loompy html-unescapes attribute strings on read; dask_loom returns the stored bytes."""
    import h5py

    p = str(tmp_path / "s.loom")
    n = len(HOSTILE_STRINGS)
    dask_loom.create(p, np.ones((n, 3), "f4"), {"Gene": np.array([f"g{i}" for i in range(n)])}, {"CellID": np.arange(3)})
    with h5py.File(p, "r+") as f:
        del f["row_attrs/Gene"]
        f.create_dataset("row_attrs/Gene", data=np.array(HOSTILE_STRINGS, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("attrs/Note", data=HOSTILE_STRINGS[1], dtype=h5py.string_dtype())
        f["/"].attrs["title"] = np.bytes_(HOSTILE_STRINGS[0])
    with h5py.File(p, "r") as f:
        raw = [bytes(x).decode() for x in f["row_attrs/Gene"][:]]
        raw_note = bytes(f["attrs/Note"][()]).decode()
        raw_title = bytes(f["/"].attrs["title"]).decode()
    assert raw == HOSTILE_STRINGS
    checked = 0
    with dask_loom.connect(p, "r") as ds:
        got = [str(x) for x in ds.ra.Gene]
        assert got == raw
        assert str(ds.attrs.Note) == raw_note
        checked += n + 1
        if "title" in ds.attrs:
            assert str(ds.attrs.title) == raw_title
            checked += 1
    # Converted to .loom.zarr, the same strings, and the JSON/array bytes hold them verbatim.
    z = str(tmp_path / "s.loom.zarr")
    dask_loom.convert(p, z, scheduler="sync")
    with dask_loom.connect(z, "r") as ds:
        assert [str(x) for x in ds.ra.Gene] == HOSTILE_STRINGS
        assert str(ds.attrs.Note) == raw_note
        checked += n + 1
    record(
        "security",
        "HTML entities in .loom strings read verbatim",
        injected=f"{n} row-attribute strings ('&amp;', '&lt;script&gt;', '&#233;' ...) plus global attributes, written with h5py; read from .loom and after convert to .loom.zarr",
        times=checked,
        result="every value equals h5py's raw bytes (no html.unescape)",
        ok=True,
    )


def test_zarr_attributes_read_verbatim(tmp_path):
    import zarr

    doc = {"title": HOSTILE_STRINGS[0], "html": HOSTILE_STRINGS[1], "list": HOSTILE_STRINGS, "nested": {"x": HOSTILE_STRINGS[2]}}
    g2 = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    g2.create_array("a", data=np.arange(3))
    with open(tmp_path / "v2.zarr" / "a" / ".zattrs", "w") as fh:
        json.dump(doc, fh)
    g3 = zarr.open_group(str(tmp_path / "v3.zarr"), mode="w")
    g3.create_array("a", data=np.arange(3), attributes=doc)
    for p in ("v2.zarr", "v3.zarr"):
        node = dask_loom.open_zarr(str(tmp_path / p), "a", mode="r")
        assert node.attributes == doc, p
    with open(tmp_path / "v2.zarr" / "a" / ".zattrs") as fh:
        assert json.load(fh) == doc
    record(
        "security",
        "HTML entities in Zarr attributes read verbatim",
        injected="'&amp;', '&lt;script&gt;' ... in .zattrs (v2) and zarr.json attributes (v3), nested and in lists",
        times=2,
        result="attributes equal the JSON document",
        ok=True,
    )


class _Evil:
    """Unpickling this creates a file: proof that the payload ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def _pickle_variants() -> dict[str, tuple[dict[str, Any], str, str]]:
    v3 = {
        "zarr_format": 3, "node_type": "array", "shape": [2], "data_type": "float64",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2]}},
        "chunk_key_encoding": {"name": "default"}, "fill_value": 0,
    }  # fmt: skip
    v2 = {"zarr_format": 2, "shape": [2], "chunks": [2], "fill_value": None, "order": "C"}
    return {
        "v2 |O dtype, pickle filter": ({**v2, "dtype": "|O", "compressor": None, "filters": [{"id": "pickle", "protocol": 4}]}, ".zarray", "0"),
        "v2 |O dtype, pickle compressor": ({**v2, "dtype": "|O", "compressor": {"id": "pickle"}, "filters": None}, ".zarray", "0"),
        "v2 <f8 dtype, pickle compressor": ({**v2, "dtype": "<f8", "fill_value": 0, "compressor": {"id": "pickle"}, "filters": None}, ".zarray", "0"),
        "v3 numcodecs.pickle after bytes": ({**v3, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "numcodecs.pickle"}]}, "zarr.json", "c/0"),
        "v3 numcodecs.pickle alone": ({**v3, "codecs": [{"name": "numcodecs.pickle"}]}, "zarr.json", "c/0"),
    }


def test_pickled_zarr_arrays_refused_not_unpickled(tmp_path):
    marker = str(tmp_path / "MARKER")
    payload = pickle.dumps(np.array([_Evil(marker), _Evil(marker)], dtype=object), protocol=4)
    # The payload is live: unpickling it does create the marker.
    pickle.loads(payload)  # the test's own bytes, to prove the payload works
    assert os.path.exists(marker)
    os.remove(marker)
    tried = refused = 0
    failures = []
    for name, (meta, mkey, ckey) in _pickle_variants().items():
        root = tmp_path / f"{len(os.listdir(tmp_path))}.zarr"
        (root / ckey).parent.mkdir(parents=True, exist_ok=True)
        (root / mkey).write_text(json.dumps(meta))
        (root / ckey).write_bytes(payload)
        for how, fn in [
            ("open_zarr", lambda root=root: dask_loom.open_zarr(str(root), mode="r")),
            ("to_dask().compute()", lambda root=root: dask_loom.open_zarr(str(root), mode="r").to_dask().compute(scheduler="sync")),
            ("get_chunk", lambda root=root: dask_loom.open_zarr(str(root), mode="r").get_chunk((0,))),
        ]:
            tried += 1
            out = run_limited(fn, 10.0)
            if os.path.exists(marker):
                failures.append(f"{name} / {how}: THE PICKLE PAYLOAD RAN")
                os.remove(marker)
            elif not isinstance(out.error, UnsupportedCodecError) or "pickle" not in str(out.error) or str(root) not in str(out.error):
                failures.append(f"{name} / {how}: {type(out.error).__name__}: {out.error}")
            else:
                refused += 1
    # The AnnData chunk reader (MappedCollection) decodes with numcodecs itself.
    ad_refused, ad_tried = _pickled_anndata(tmp_path, payload, marker, failures)
    record(
        "security",
        "pickled Zarr arrays refused, never unpickled",
        injected=f"{len(_pickle_variants())} metadata variants naming the pickle codec (v2 filter/compressor, v3 numcodecs.pickle) "
        "with a payload that creates a file when unpickled, read 3 ways; an AnnData zarr X read by MappedCollection",
        times=tried + ad_tried,
        result=f"{refused + ad_refused} refused with UnsupportedCodecError; the payload never ran",
        ok=not failures,
    )
    assert not failures, "\n".join(failures)


def _pickled_anndata(tmp_path: Any, payload: bytes, marker: str, failures: list[str]) -> tuple[int, int]:
    import anndata as ad

    p = tmp_path / "evil.zarr"
    a = ad.AnnData(X=np.ones((4, 3), "f4"))
    a.write_zarr(str(p))
    x = p / "X"
    if (x / "zarr.json").exists():
        meta = json.loads((x / "zarr.json").read_text())
        meta["codecs"] = [{"name": "numcodecs.pickle"}]
        (x / "zarr.json").write_text(json.dumps(meta))
    else:
        meta = json.loads((x / ".zarray").read_text())
        meta["compressor"] = {"id": "pickle"}
        (x / ".zarray").write_text(json.dumps(meta))
    for dirpath, _d, files in os.walk(x):
        for f in files:
            if f not in ("zarr.json", ".zarray", ".zattrs"):
                with open(os.path.join(dirpath, f), "wb") as fh:
                    fh.write(payload)

    def read() -> None:
        mc = dask_loom.MappedCollection([str(p)], layers_keys="X")
        try:
            mc[0]
        finally:
            mc.close()

    out = run_limited(read, 10.0)
    if os.path.exists(marker):
        failures.append("AnnData X: THE PICKLE PAYLOAD RAN")
        return 0, 1
    if out.error is None or not is_typed(out.error) or "pickle" not in str(out.error):
        failures.append(f"AnnData X: {type(out.error).__name__}: {out.error}")
        return 0, 1
    return 1, 1


# -- URL schemes ---------------------------------------------------------------------------------

HOSTILE_URLS = [
    "ftp://host.invalid/x.loom",
    "FTP://HOST.INVALID/X.LOOM",
    "file+evil://x.loom",
    "ssh://host.invalid/x",
    "sftp://host.invalid/x.loom",
    "data:text/plain;base64,AAAA",
    "ftp::s3://bucket/x.zarr",
    "simplecache::s3://bucket/x.zarr",
]

_WATCH = threading.local()
_EVENTS = ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename", "os.rmdir", "shutil.copyfile",
           "socket.getaddrinfo", "socket.connect", "socket.gethostbyname", "subprocess.Popen")  # fmt: skip


def _audit(event: str, args: tuple[Any, ...]) -> None:
    seen = getattr(_WATCH, "events", None)
    if seen is None or event not in _EVENTS:
        return
    if event in ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rmdir") and args:
        target = args[0]
        if isinstance(target, int):
            return
        target = os.fsdecode(target) if isinstance(target, (str, bytes, os.PathLike)) else str(target)
        # Imports (python's own files, installed packages, this repo's modules) are not I/O on the user's path.
        if target.endswith((".py", ".pyc", ".so", ".pth", ".json", ".typed")) or target.startswith(
            (sys.prefix, sys.base_prefix, os.path.join(REPO, "dask_loom"), "/proc", "/dev", "/sys", "/etc")
        ):
            return
    seen.append((event, args[:2]))


@contextlib.contextmanager
def _watch_io() -> Iterator[list[tuple[str, Any]]]:
    if not getattr(sys, "_dask_loom_security_hook", False):
        sys.addaudithook(_audit)
        sys._dask_loom_security_hook = True  # type: ignore[attr-defined]
    _WATCH.events = []
    try:
        yield _WATCH.events
    finally:
        _WATCH.events = None


def _entry_points(tmp_path: Any, good: str) -> dict[str, Callable[[str], Any]]:
    import xarray as xr

    from dask_loom.storage import FileSpec
    from dask_loom.stores import ObjectStore, open_store

    out = str(tmp_path / "out")
    m = np.ones((3, 4), "f4")
    return {
        "connect": lambda u: dask_loom.connect(u),
        "create": lambda u: dask_loom.create(u, m, {}, {}),
        "new": lambda u: dask_loom.new(u),
        "convert (source)": lambda u: dask_loom.convert(u, out + ".loom.zarr"),
        "convert (destination)": lambda u: dask_loom.convert(good, u),
        "combine (input)": lambda u: dask_loom.combine([good, u], out + ".loom"),
        "combine (output)": lambda u: dask_loom.combine([good], u),
        "combine_faster (output)": lambda u: dask_loom.combine_faster([good], u),
        "LoomValidator.validate": lambda u: dask_loom.LoomValidator().validate(u),
        "open_zarr": lambda u: dask_loom.open_zarr(u),
        "to_zarr": lambda u: dask_loom.to_zarr(np.arange(3), u),
        "stores.open_store": lambda u: open_store(u),
        "stores.ObjectStore": lambda u: ObjectStore(u),
        "storage.FileSpec.from_path": lambda u: FileSpec.from_path(u),
        "MappedCollection": lambda u: dask_loom.MappedCollection([u]),
        "open_ome_arrow": lambda u: dask_loom.open_ome_arrow(u),
        "read_ome_zarr": lambda u: dask_loom.read_ome_zarr(u),
        "read_ome_tiff": lambda u: dask_loom.read_ome_tiff(u),
        "convert_to_ome_arrow (source)": lambda u: dask_loom.convert_to_ome_arrow(u, out + ".parquet"),
        "convert_to_ome_arrow (destination)": lambda u: dask_loom.convert_to_ome_arrow(out + ".tif", u),
        "to_ome_parquet": lambda u: dask_loom.to_ome_parquet(np.zeros((1, 1, 1, 2, 2), "u1"), u),
        "write_ome_arrow_dataset": lambda u: dask_loom.write_ome_arrow_dataset({"a": np.zeros((1, 1, 1, 2, 2), "u1")}, u),
        'xarray engine="loom"': lambda u: xr.open_dataset(u, engine="loom"),
    }


def test_url_schemes_refused_at_every_entry_point(tmp_path, monkeypatch):
    from dask_loom.storage import ALLOWED_SCHEMES, check_scheme

    assert {"s3", "file", "memory"} <= ALLOWED_SCHEMES and not {"ftp", "sftp", "ssh", "data", "simplecache"} & ALLOWED_SCHEMES
    good = str(tmp_path / "good.loom")
    dask_loom.create(good, np.ones((3, 4), "f4"), {"Gene": np.array(["a", "b", "c"])}, {"CellID": np.arange(4)})
    monkeypatch.chdir(tmp_path)
    eps = _entry_points(tmp_path, good)
    # Warm up each entry point with a refused URL so lazy imports are not counted as I/O below.
    for fn in eps.values():
        with contextlib.suppress(Exception):
            fn(HOSTILE_URLS[0])
    # Control: the audit hook does see I/O on the user's paths and network lookups.
    with _watch_io() as events:
        open(tmp_path / "control", "w").close()
        with contextlib.suppress(OSError):
            socket.getaddrinfo("host.invalid", 21)
    assert [e for e, _ in events] == ["open", "socket.getaddrinfo"], events
    os.remove(tmp_path / "control")
    before = _tree(str(tmp_path))
    failures = []
    tried = refused = 0
    for ep, fn in eps.items():
        for url in HOSTILE_URLS:
            tried += 1
            with _watch_io() as events:
                try:
                    fn(url)
                except UnsupportedSchemeError as exc:
                    err: BaseException | None = exc
                except Exception as exc:
                    err = exc
                else:
                    err = None
            if not isinstance(err, UnsupportedSchemeError):
                failures.append(f"{ep}({url!r}): {type(err).__name__ if err else 'accepted'}: {err}")
            elif url not in str(err):
                failures.append(f"{ep}({url!r}): the message does not name the URL: {err}")
            elif events:
                failures.append(f"{ep}({url!r}): I/O before the refusal: {events[:3]}")
            else:
                refused += 1
    assert _tree(str(tmp_path)) == before
    # Local paths (a colon in a file name, a drive letter) are not URLs.
    assert check_scheme("run:1.loom") == check_scheme("C:x.loom") == check_scheme(good) == "file"
    cli = _cli_refusals()
    record(
        "security",
        "URL schemes outside the allow-list",
        injected=f"{len(HOSTILE_URLS)} URLs (ftp, ssh, sftp, file+evil, data:, chained ftp::s3, simplecache::s3) x {len(eps)} entry points; "
        f"{len(cli)} CLI runs",
        times=tried + len(cli),
        result=f"{refused} refused with UnsupportedSchemeError before any I/O (audit hook); CLI exit codes {sorted(set(cli))}",
        ok=not failures and set(cli) == {2},
    )
    assert not failures, "\n".join(failures[:20])
    assert set(cli) == {2}


def _cli_refusals() -> list[int]:
    urls = ["ftp://host.invalid/x.loom", "data:text/plain,hi", "ftp::s3://bucket/x.zarr"]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        (u, subprocess.Popen([sys.executable, "-m", "dask_loom", "info", u], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        for u in urls
    ]
    codes = []
    for u, proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert u in err and "not allowed" in err, err
        codes.append(proc.returncode)
    return codes


# -- credentials ---------------------------------------------------------------------------------

KEY = "AKIDSECRETMARKER"
SECRET = "SECRETMARKER123"


def _secret_options(server: dict[str, Any]) -> dict[str, Any]:
    opts = dict(server["storage_options"])
    opts.update(key=KEY, secret=SECRET)
    return opts


@contextlib.contextmanager
def _all_logs() -> Iterator[io.StringIO]:
    """Everything logged at DEBUG by any logger (propagating or not) while the block runs."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    loggers = [root] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger) and not lg.propagate]
    old = root.level
    root.setLevel(logging.DEBUG)
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield buf
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        root.setLevel(old)


def _texts_of(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


@pytest.mark.s3
def test_credentials_never_shown(s3_server, tmp_path, caplog):
    import dask

    from dask_loom.storage import FileSpec, redact_url
    from dask_loom.stores import ObjectStore, open_store

    opts = _secret_options(s3_server)
    bucket = s3_server["bucket"]
    stats = s3_server["stats"]
    texts: list[str] = []
    errors: list[str] = []
    caplog.set_level(logging.DEBUG)

    def expect_error(label: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:
            texts.extend(_texts_of(exc))
            errors.append(f"{label}: {type(exc).__name__}")
        else:
            raise AssertionError(f"{label}: no error")

    with _all_logs() as logs, dask.config.set({"dask_loom.retries": 1, "dask_loom.retry-backoff": 0.01}):
        base = f"s3://{bucket}/cred-{uuid.uuid4().hex}"
        s = open_store(base + "/store", **opts)
        s.set("a", b"1")
        texts += [repr(s), str(s), s.name, repr(s.with_read_only(True))]
        expect_error("missing key", lambda: s.get("missing"))
        expect_error("missing bucket", lambda: ObjectStore(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", storage_options=opts).get("k"))
        stats.deny_next(1)
        expect_error("access denied", lambda: s.get("a"))
        stats.fail_next(10, status=500)
        expect_error("server errors after retries", lambda: s.get("a"))
        stats.clear_failures()
        # A .loom.zarr on S3: create, connect, read; reprs of everything users see.
        url = base + "/x.loom.zarr"
        m = np.arange(12, dtype="f4").reshape(3, 4)
        dask_loom.create(url, m, {"Gene": np.array(["a", "b", "c"])}, {"CellID": np.arange(4)}, storage_options=opts)
        with dask_loom.connect(url, storage_options=opts) as ds:
            arr = ds.layers[""].dask
            assert np.array_equal(arr.compute(scheduler="threads"), m)
            graph = dict(arr.__dask_graph__())
            texts += [repr(ds), str(ds), repr(ds.layers[""]), repr(arr), str(arr.name), repr(arr.__dask_keys__())]
            texts += [repr(k) for k in graph] + [repr(v) for v in graph.values()]
            spec = FileSpec.from_path(url, opts)
            texts += [repr(spec), str(spec), spec.name]
            assert SECRET in pickle.dumps(spec).decode("latin-1")  # the options travel, by design
            expect_error("write through a read-only connection", lambda: dask_loom.connect(url, "r", storage_options=opts).ra.__setitem__("X", np.arange(3)))
        expect_error("connect to a missing file", lambda: dask_loom.connect(base + "/none.loom.zarr", storage_options=opts))
        expect_error("open_zarr missing node", lambda: dask_loom.open_zarr(base + "/store", "nope", storage_options=opts))
        z = dask_loom.to_zarr(np.arange(6), base + "/z.zarr", storage_options=opts, scheduler="sync")
        texts += [repr(z), repr(z.to_dask()), repr(dict(z.to_dask().__dask_graph__()))]
        expect_error("hostile key on S3", lambda: s.get("../x"))
        # Credentials in a URL's userinfo are redacted too.
        expect_error("userinfo in a refused URL", lambda: dask_loom.connect(f"ftp://user:{SECRET}@host.invalid/x.loom"))
        texts += [repr(FileSpec(f"https://user:{SECRET}@host.invalid/x.loom")), redact_url(f"s3://{KEY}:{SECRET}@b/x")]
    log_text = logs.getvalue() + caplog.text
    shown = "\n".join(texts)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("dask_loom", "distributed", "dask")))
    key_in_botocore = log_text.count(KEY)
    record(
        "security",
        "credentials never shown (S3 storage options)",
        injected=f"key/secret markers as storage_options; {len(errors)} errors (missing key/bucket, 403, 500s, read-only, hostile key ...), "
        "reprs of stores/connections/FileSpec/dask arrays, every task key and task of two graphs, DEBUG logs of all loggers",
        times=len(texts) + len(errors),
        result=f"{len(texts)} texts and {len(log_text) // 1024} KiB of logs: secret found {shown.count(SECRET) + log_text.count(SECRET)} times; "
        f"key id in dask_loom's texts {shown.count(KEY)} times (botocore's own DEBUG request log shows the key id, never the secret: {key_in_botocore})",
        ok=SECRET not in shown and SECRET not in log_text and KEY not in shown and KEY not in ours,
    )
    assert len(errors) == 9, errors
    assert SECRET not in shown, [t for t in texts if SECRET in t][:3]
    assert KEY not in shown, [t for t in texts if KEY in t][:3]
    assert SECRET not in log_text
    assert KEY not in ours


def _read_with(spec: Any, key: str) -> bytes:
    fs, path = spec.fs()
    return fs.cat_file(f"{path}/{key}")


def _fail_with(spec: Any) -> None:
    from dask_loom.errors import StoreError

    raise StoreError(f"{spec!r}: deliberate failure in a worker")


@pytest.mark.s3
def test_credentials_not_in_cluster_logs(s3_server, local_cluster):
    from dask_loom.storage import FileSpec
    from dask_loom.stores import open_store

    client = local_cluster
    opts = _secret_options(s3_server)
    base = f"s3://{s3_server['bucket']}/cluster-cred-{uuid.uuid4().hex}"
    open_store(base, **opts).set("k", b"payload")
    spec = FileSpec.from_path(base, opts)
    assert client.submit(_read_with, spec, "k", pure=False).result(timeout=60) == b"payload"
    with pytest.raises(Exception) as info:
        client.submit(_fail_with, spec, pure=False).result(timeout=60)
    assert SECRET not in str(info.value) and KEY not in str(info.value)
    # A dask_loom graph on the cluster: a .loom.zarr on S3, and a read of a missing chunk's file.
    url = base + "/x.loom.zarr"
    m = np.arange(20, dtype="f4").reshape(4, 5)
    dask_loom.create(url, m, {"Gene": np.array(list("abcd"))}, {"CellID": np.arange(5)}, storage_options=opts)
    with dask_loom.connect(url, "r", storage_options=opts, client=client) as ds:
        assert np.array_equal(client.compute(ds.layers[""].dask).result(timeout=60), m)
    with pytest.raises(Exception) as info:
        client.submit(_read_with, spec, "missing", pure=False).result(timeout=60)
    worker_logs = client.get_worker_logs()
    scheduler_logs = client.get_scheduler_logs()
    text = repr(worker_logs) + repr(scheduler_logs)
    n_lines = sum(len(v) for v in worker_logs.values()) + len(scheduler_logs)
    assert "deliberate failure" in text  # the failure was logged: the logs were really searched
    record(
        "security",
        "credentials not in cluster logs",
        injected="FileSpec with key/secret storage options pickled to a 2-process LocalCluster; tasks read S3, fail, compute a .loom.zarr layer",
        times=n_lines,
        result=f"{n_lines} scheduler and worker log lines: secret {text.count(SECRET)} times, key id {text.count(KEY)} times",
        ok=SECRET not in text and KEY not in text,
    )
    assert SECRET not in text
    assert KEY not in text


# -- sizes -------------------------------------------------------------------------------------


def test_two_gib_zattrs_refused_before_reading(tmp_path):
    """A 2 GiB (sparse) ``.zattrs`` is refused by its size: (10^12-element attributes and an
    8 MB ``zarr.json`` are in tests/test_bad_input.py)."""
    import zarr

    p = tmp_path / "big.zarr"
    zarr.open_group(str(p), mode="w", zarr_format=2).create_array("a", data=np.arange(4))
    with open(p / "a" / ".zattrs", "wb") as fh:
        fh.write(b'{"x": "')
        fh.truncate(2 << 30)  # sparse: no disk blocks
    out = run_limited(lambda: dask_loom.open_zarr(str(p), "a", mode="r"), 10.0)
    assert not out.hung
    assert isinstance(out.error, TooLargeError), out.error
    assert ".zattrs" in str(out.error) and "big.zarr" in str(out.error)
    assert out.peak < 64 << 20
    record(
        "security",
        "2 GiB .zattrs refused before allocation",
        injected="a sparse 2 GiB v2 .zattrs (dask_loom.max-metadata-bytes cap)",
        times=1,
        result=f"TooLargeError in {out.seconds:.2f} s, {out.peak / 2**20:.1f} MiB allocated",
        ok=True,
        seconds=round(out.seconds, 3),
        peak_mib=round(out.peak / 2**20, 2),
    )
