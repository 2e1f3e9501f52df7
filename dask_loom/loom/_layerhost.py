"""``LayerHost``: everything a ``LoomLayer`` uses of its connection, in one narrow interface."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dask_loom.loom._common import scalar_text, timestamp

if TYPE_CHECKING:
    import numpy as np

    from dask_loom.loom._tree import ArrayInfo, Tree

__all__ = ["LayerHost", "layer_path", "node_timestamp"]


def layer_path(name: str) -> str:
    """Where layer *name* is stored: ``matrix`` for the main layer ``""``, else ``layers/<name>``."""
    return "matrix" if name == "" else f"layers/{name}"


def node_timestamp(tree: Tree, path: str) -> str:
    """The ``last_modified`` attribute of the node at *path*, or now if it has none (as loompy)."""
    value = tree.attrs(path).get("last_modified")
    if value is None:
        return timestamp()
    return str(scalar_text(value))


class LayerHost:
    """The layers' side of a Loom connection: what ``ds.layers``, each ``LoomLayer`` and the operations may use of it.

    The operations that read or write layers (``scan``, layer writes,
    ``permute``, ``add_columns``, ``add_loom``, ``export``) take it from
    ``ds.__dask_loom_layer_host__()`` and use the connection's public API
    (shape, attributes, graphs) for the rest.

    The connection builds one host when it opens and hands it to its layer
    manager and every layer it makes, so they hold the host, never the
    connection's internals.  The host owns the layers' metadata and chunk
    sources, cached until :meth:`invalidate`, which the connection calls
    after every write (each call starts a new generation).  A
    layer asks :meth:`source` on each use rather than keeping a source of its
    own: a write may replace the file under it (an HDF5 transaction renames a
    new file over the old one, a permutation rewrites every layer), and a
    source built before would describe the old chunks.  The host outlives
    such replacements (the connection keeps the same one for its whole life),
    so a layer taken before a write reads the new content after it.

    Parameters
    ----------
    tree
        The connection's storage tree (HDF5 or Zarr); the same object for the
        connection's life, whatever happens to the file it reads.
    filename
        The file, for messages.
    check_open
        Raises once the connection is closed.
    compute_kwargs
        Where graphs run now (``scheduler``/``client``), read at each call:
        a permutation given its own scheduler changes it while it runs.
    write_layer
        Creates or replaces a whole layer (``ds.layers[name] = value``).
    write_region
        Writes ``ds.layers[name][key] = value`` (``(name, key, value)``).
    delete_layer
        Deletes a named layer (``del ds.layers[name]``).
    permute
        Permutes the whole file (``dask_loom.permute`` of a layer: every
        layer, attribute and graph moves together); ``None`` when the
        connection cannot write.
    read_only
        Why the connection cannot write, for the error an operation that
        writes raises.
    check_writable
        Raises once the connection is closed, or if it cannot write.
    writing
        ``writing(atomic=False, fresh=False)``: the connection's write, a
        context manager yielding the tree writer (a transaction when atomic).
    refresh
        After a write that may change the file's shape: the connection reads
        it anew (and forgets the layers' cached metadata).
    reopen
        After a whole-file rewrite (``permute``, appended columns): the
        connection remakes its managers.
    """

    def __init__(
        self,
        tree: Tree,
        filename: str,
        *,
        check_open: Callable[[], None],
        compute_kwargs: Callable[[], dict[str, Any]],
        write_layer: Callable[[str, Any], None],
        write_region: Callable[[str, Any, Any], None],
        delete_layer: Callable[[str], None],
        permute: Callable[..., None] | None,
        read_only: str,
        check_writable: Callable[[], None],
        writing: Callable[..., contextlib.AbstractContextManager[Any]],
        refresh: Callable[[], None],
        reopen: Callable[[], None],
    ) -> None:
        self.tree = tree
        self.filename = filename
        self.check_open = check_open
        self.compute_kwargs = compute_kwargs
        self.write_layer = write_layer
        self.write_region = write_region
        self.delete_layer = delete_layer
        self.permute = permute
        self.read_only = read_only
        self.check_writable = check_writable
        self.writing = writing
        self.refresh = refresh
        self.reopen = reopen
        self._cache: dict[tuple[str, str], Any] = {}
        self.generation = 0

    def invalidate(self) -> None:
        """Forget every layer's metadata and source: the file was written, or replaced."""
        self.generation += 1
        self._cache.clear()

    def _cached(self, key: tuple[str, str], make: Callable[[], Any]) -> Any:
        got = self._cache.get(key)
        if got is None:
            gen = self.generation
            got = make()
            # Built while a write finished (another thread): good for this call, not for later ones.
            if gen == self.generation:
                self._cache[key] = got
        return got

    def names(self) -> list[str]:
        """The layers in the file: ``""`` (the main matrix) if present, then the named layers."""
        names = [""] if self.tree.exists("matrix") else []
        return names + self.tree.children("layers")

    def info(self, name: str) -> ArrayInfo:
        """Shape, dtype and chunking of layer *name* (``KeyError`` if the file has none)."""

        def make() -> ArrayInfo:
            path = layer_path(name)
            if not self.tree.exists(path):
                raise KeyError(f"Layer '{name}' not found in {self.filename}")
            return self.tree.info(path)

        return self._cached(("info", name), make)

    def shape(self, name: str) -> tuple[int, int]:
        return tuple(self.info(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return self.info(name).dtype

    def source(self, name: str) -> Any:
        """Layer *name*'s chunk source as the file is now (a ``ChunkSource``: HDF5 or Zarr)."""

        def make() -> Any:
            self.info(name)  # the KeyError of a missing layer, before any open
            return self.tree.source(layer_path(name))

        return self._cached(("source", name), make)

    def read(self, names: list[str], key: Any) -> dict[str, np.ndarray]:
        """Selection *key* (numpy outer semantics) of each layer in *names*, read in one graph."""
        from dask_loom._indexing import normalize_key
        from dask_loom.ops._select import read_selections

        self.check_open()
        try:  # the main matrix's shape is the file's, as ds.shape: (0, 0) for an empty file
            shape = self.shape("")
        except KeyError:
            shape = (0, 0)
        sels = normalize_key(key, shape, where=self.filename)
        arrays = read_selections([self.source(n) for n in names], sels, **self.compute_kwargs())
        return dict(zip(names, arrays))

    def timestamp(self, name: str) -> str:
        """When layer *name* was last written (now if it carries no timestamp)."""
        return node_timestamp(self.tree, layer_path(name))
