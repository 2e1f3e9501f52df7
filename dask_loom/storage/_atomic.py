"""Crash-safe replacement of directories on a local disk (Zarr stores and arrays).

A Zarr store is a directory of many files, so "write a new version beside the
old one and rename it into place" needs a rename that swaps two directories:
Linux's ``renameat2(RENAME_EXCHANGE)`` does it in one step (a process killed
at any moment leaves either the old or the new directory at the name, never
none).  Where the kernel or file system lacks it, two renames are used and
the short window between them is documented, not hidden.

Temporary directories carry the ``.dlpart-`` mark (hidden from store
listings) plus the host and process id of their writer, so a later writer can
remove the ones whose writer has died.

:func:`local_transaction` is the one transaction of local Zarr writes (a
``.loom.zarr`` container's, and :func:`dask_loom.to_zarr`'s): under the
writer lock it hands out a copy beside the store and swaps it in at the end.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from dask_loom.errors import StoreError
from dask_loom.storage._stores import LocalStore

__all__ = [
    "TMP_MARK",
    "TransactionStore",
    "disk_full",
    "no_space",
    "abort",
    "clone_tree",
    "exchange",
    "local_transaction",
    "remove_stale",
    "replace_dir",
    "temp_sibling",
]

TMP_MARK = ".dlpart-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc: ctypes.CDLL | bool | None = None


def _renameat2() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            _libc = lib if hasattr(lib, "renameat2") else False
        except OSError:
            _libc = False
    return _libc or None


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Atomically swap two existing paths; ``False`` if this system cannot (nothing changed then)."""
    lib = _renameat2()
    if lib is None:
        return False
    rc = lib.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {os.fspath(a)!r} and {os.fspath(b)!r}: {os.strerror(err)}")


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_dir(new: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put directory *new* at *target* (replacing what is there) and delete the old content.

    With ``RENAME_EXCHANGE`` the switch is one atomic step; the old content
    ends up at *new*'s name (hidden, marked temporary) and is deleted after.
    """
    new, target = os.fspath(new), os.fspath(target)
    if not os.path.lexists(target):
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        os.replace(new, target)
    elif os.path.isdir(target) and not os.path.islink(target) and exchange(new, target):
        pass
    else:
        # No atomic swap here: move the old content away, then the new one in.
        trash = temp_sibling(target, "old")
        os.replace(target, trash)
        os.replace(new, target)
        new = trash
    _fsync_dir(os.path.dirname(target) or ".")
    shutil.rmtree(new, ignore_errors=True)


def clone_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """A copy of directory *src* at *dst* made of hard links (falling back to copies).

    Safe because dask_loom's stores never modify a file in place: every value
    is written to a new file renamed over the old name, which unlinks the
    shared inode from this tree only.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    os.makedirs(dst)
    link = True
    for dirpath, dirs, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out = dst if rel == "." else os.path.join(dst, rel)
        dirs[:] = [d for d in dirs if not d.startswith(TMP_MARK)]
        for d in dirs:
            os.mkdir(os.path.join(out, d))
        for fn in files:
            if fn.startswith(TMP_MARK):
                continue
            s, d = os.path.join(dirpath, fn), os.path.join(out, fn)
            if link:
                try:
                    os.link(s, d)
                    continue
                except OSError:
                    link = False  # file system without hard links: copy from here on
            shutil.copy2(s, d)


def temp_sibling(path: str | os.PathLike[str], kind: str = "new") -> str:
    """A fresh hidden name beside *path*: ``.dlpart-<name>.<kind>-<host>-<pid>-<random>``."""
    head, tail = os.path.split(os.path.normpath(os.fspath(path)))
    host = socket.gethostname().replace("-", "_").replace(".", "_")
    return os.path.join(head, f"{TMP_MARK}{tail}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _owner_alive(name: str) -> bool:
    """Whether the writer that made temporary directory *name* may still be running."""
    try:
        _, host, pid, _ = name.rsplit(".", 1)[1].rsplit("-", 3)
    except ValueError:
        return False
    if host != socket.gethostname().replace("-", "_").replace(".", "_"):
        return True  # another machine's writer: cannot tell, leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def remove_stale(path: str | os.PathLike[str], *, all_of_them: bool = False) -> list[str]:
    """Delete temporary siblings of *path* left by writers that died (all of them when the caller holds the write lock)."""
    head, tail = os.path.split(os.path.normpath(os.fspath(path)))
    prefix = f"{TMP_MARK}{tail}."
    removed = []
    try:
        names = os.listdir(head or ".")
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if rest.endswith(_ABORTED):
            rest = rest[: -len(_ABORTED)]
        if "." in rest:
            continue  # the temporary of another name (``x.zarr`` vs ``x``)
        if not all_of_them and _owner_alive(name.removesuffix(_ABORTED)):
            continue
        full = os.path.join(head, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(full)
        removed.append(full)
    return removed


_ABORTED = ".aborted"


def _marker(path: str | os.PathLike[str]) -> str:
    # In the machine's temporary folder, not beside the store (nothing visible is left
    # there); processes of this machine see it, which covers local clusters.
    import hashlib
    import tempfile

    digest = hashlib.sha1(os.path.abspath(os.fspath(path)).encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"dask-loom-{digest}{_ABORTED}")


class TransactionStore(LocalStore):
    """The :class:`LocalStore` of a copy being written for a transaction.

    When a write fails, tasks of the same graph may still be running (dask's
    threaded scheduler and distributed workers do not stop them).  The
    rollback leaves a marker for the copy in the temporary folder of this
    machine (:func:`abort`); a task that finds it refuses to write, and one
    that wrote just before removes what it wrote, so no half-written copy is
    recreated after the rollback.  (Late tasks on other machines sharing the
    disk can leave a hidden copy; the next writer removes it.)
    """

    def _aborted(self) -> bool:
        return os.path.exists(_marker(self.path))

    def _set(self, key: str, data: bytes) -> None:
        if self._aborted():
            raise StoreError(f"{self.name}: the write this copy belongs to was abandoned; not writing {key!r}")
        super()._set(key, data)
        if self._aborted():
            _discard(self.path)
            raise StoreError(f"{self.name}: the write this copy belongs to was abandoned; {key!r} removed again")

    def __reduce__(self) -> Any:
        return (TransactionStore, (str(self.path),))


def _discard(path: str | os.PathLike[str]) -> None:
    shutil.rmtree(path, ignore_errors=True)


def abort(path: str | os.PathLike[str]) -> None:
    """Roll back a transaction's copy: mark it abandoned, delete it (again a little later, for late tasks)."""
    marker = _marker(path)
    with contextlib.suppress(OSError), open(marker, "w"):
        pass
    _discard(path)

    def later() -> None:
        _discard(path)
        with contextlib.suppress(OSError):
            os.remove(marker)

    # Late tasks see the marker until then; the next writer also removes both.
    t = threading.Timer(30.0, later)
    t.daemon = True
    t.start()
    # A process that exits sooner (a dask-loom command) has no tasks left: it leaves nothing behind.
    atexit.register(later)


def no_space(exc: BaseException) -> bool:
    """Whether *exc* (or an exception it was raised from) is a full disk or quota."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full(name: str, exc: BaseException, what: str = "file") -> StoreError:
    """The error a write that ran out of space raises (the original is unchanged)."""
    return StoreError(
        errno.ENOSPC,
        f"{name}: no space left on the device for the new version of the {what}; the {what} is unchanged "
        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
    )


def _bring_parents(tmp: str, root: str, node: str) -> None:
    """Copy the group documents above *node* that the store lacks (the copy has them)."""
    parts = node.split("/")[:-1]
    for i in range(len(parts) + 1):
        sub = "/".join(parts[:i])
        for doc in ("zarr.json", ".zgroup", ".zattrs"):
            src = os.path.join(tmp, sub, doc)
            dst = os.path.join(root, sub, doc)
            # A v2 document never goes beside a v3 group of the same node.
            v3_there = doc != "zarr.json" and os.path.exists(os.path.join(root, sub, "zarr.json"))
            if os.path.exists(src) and not os.path.exists(dst) and not v3_there:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst)


@contextlib.contextmanager
def local_transaction(
    root: str | os.PathLike[str],
    *,
    label: str | None = None,
    base: str = "clone",
    node: str = "",
    timeout: float | None = None,
) -> Iterator[LocalStore]:
    """Write a local Zarr store (or one node of it) as one transaction, under the writer lock.

    Parameters
    ----------
    root
        The store's directory.
    label
        How errors name the store (default: *root*).
    base
        What the yielded store starts from: ``"clone"`` a hard-linked copy of
        the store, ``"empty"`` an empty directory, ``"inplace"`` the store
        itself (no transaction: only the writer lock is held).
    node
        With ``base="empty"``: the node (array or group path) that replaces
        its namesake at the end; ``""`` replaces the whole store.  Groups
        above it that the store lacks come along.
    timeout
        Seconds to wait for another writer (default ``dask_loom.write-timeout``).

    Yields
    ------
    LocalStore
        A :class:`TransactionStore` on the copy (or the store itself for
        ``"inplace"``).  At a normal exit the copy replaces the store (or the
        node) in one atomic directory exchange; on an exception (a full disk
        becomes :func:`disk_full`'s ``StoreError``) the copy is abandoned and
        tasks still writing into it find it gone.
    """
    from dask_loom._config import get_config
    from dask_loom.storage._locks import exclusive
    from dask_loom.storage._urls import FileSpec

    if base not in ("clone", "empty", "inplace"):
        raise ValueError(f"base must be 'clone', 'empty' or 'inplace', not {base!r}")
    root = os.path.abspath(os.fspath(root))
    label = label or root
    node = node.strip("/")
    os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
    wait = float(get_config("write-timeout") if timeout is None else timeout)
    with exclusive(FileSpec.from_path(root), wait):
        # We hold the lock: copies beside the store belong to writers that died.
        remove_stale(root, all_of_them=True)
        if base == "inplace":
            yield LocalStore(root)
            return
        tmp = temp_sibling(root)
        try:
            if base == "clone" and os.path.isdir(root):
                clone_tree(root, tmp)
            else:
                os.makedirs(tmp)
            yield TransactionStore(tmp)
            if node:
                _bring_parents(tmp, root, node)
                replace_dir(os.path.join(tmp, node), os.path.join(root, node))
            else:
                replace_dir(tmp, root)
        except BaseException as exc:
            abort(tmp)  # tasks still running cannot recreate the copy
            if no_space(exc):
                raise disk_full(label, exc, "store") from exc
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
