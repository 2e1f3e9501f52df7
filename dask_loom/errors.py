"""Exceptions and warnings raised by dask_loom.

Each error also derives from the builtin exception a caller of the peer
library would catch (``ValueError``, ``OSError``, ``KeyError`` …), so code
written against loompy, zarr-python or anndata keeps working, while
``except dask_loom.errors.DaskLoomError`` catches everything of ours.
Messages always name the file (or store) and the element concerned.
"""

from __future__ import annotations

__all__ = [
    "AnnDataFormatError",
    "ChunkAlignmentError",
    "ChunkAlignmentWarning",
    "CollectionError",
    "CollectionIndexError",
    "ConfigError",
    "CorruptChunkError",
    "DaskLoomError",
    "ElementNotFoundError",
    "FileBeingWrittenError",
    "FormatError",
    "InvalidKeyError",
    "InvalidNameError",
    "LoomFormatError",
    "LoomValidationError",
    "MissingDependencyError",
    "MissingKeyError",
    "OMEArrowError",
    "OperationError",
    "ReadOnlyError",
    "SchedulerError",
    "SelectionError",
    "StoreError",
    "TargetExistsError",
    "TooLargeError",
    "UnsupportedSchemeError",
    "UnsupportedCodecError",
    "UnsupportedSourceError",
    "UnsupportedDtypeError",
    "UnsupportedFilterError",
    "WriteConflictError",
]


class DaskLoomError(Exception):
    """Base class of every dask_loom error."""


class FormatError(DaskLoomError, ValueError):
    """A file or store does not hold what its format promises."""


class LoomFormatError(FormatError):
    """A file is not a valid Loom file (or not one we can read)."""


class LoomValidationError(LoomFormatError):
    """A file fails the Loom spec checks run by ``connect(validate=True)``.

    ``errors`` holds the validator's reasons, one line each; the message is
    loompy's (the reasons, then the line naming the file and spec version).
    """

    def __init__(
        self, message: str, *, filename: str = "", version: str = "", errors: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.filename = filename
        self.version = version
        self.errors = list(errors or [])

    def __reduce__(
        self,
    ) -> tuple:  # picklable with its keyword-only fields (dask re-raises it across processes)
        return (
            _rebuild_validation_error,
            (self.args[0] if self.args else "", self.filename, self.version, self.errors),
        )


def _rebuild_validation_error(
    message: str, filename: str, version: str, errors: list[str]
) -> LoomValidationError:
    return LoomValidationError(message, filename=filename, version=version, errors=errors)


class AnnDataFormatError(FormatError):
    """A file or store is not AnnData, or holds an element we cannot decode."""


class ElementNotFoundError(DaskLoomError, KeyError):
    """A requested element (layer, obs column, obsm key) is absent."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CollectionError(DaskLoomError, ValueError):
    """Files of a collection cannot be combined as asked (empty join, unknown label, ...)."""


class CollectionIndexError(DaskLoomError, IndexError):
    """An item index outside a collection."""


class OMEArrowError(FormatError):
    """A record, column or file is not a readable OME-Arrow image (names the column/field)."""


class SelectionError(DaskLoomError, ValueError):
    """An index, ROI, tile or layout does not fit the image it selects from."""


class UnsupportedDtypeError(FormatError, TypeError):
    """A pixel dtype the format (or the requested conversion) cannot hold exactly."""


class MissingDependencyError(DaskLoomError, RuntimeError, ImportError):
    """An optional dependency (torch, jax, tifffile, ...) is needed and not installed."""


class CorruptChunkError(DaskLoomError, OSError):
    """Stored bytes of a chunk fail to decode or fail their checksum."""


class UnsupportedFilterError(DaskLoomError, ValueError):
    """An HDF5 filter the byte-range path cannot decode (the caller falls back to h5py)."""


class ReadOnlyError(DaskLoomError, PermissionError):
    """A write was attempted through a read-only connection or store."""


class WriteConflictError(DaskLoomError, BlockingIOError):
    """Another writer holds the file and did not release it in time."""


class FileBeingWrittenError(DaskLoomError, BlockingIOError):
    """A reader met a file in the middle of a write it cannot read around."""


class TargetExistsError(DaskLoomError, FileExistsError):
    """A conversion target that exists, written without ``overwrite=True`` (left as it is)."""


class StoreError(DaskLoomError, OSError):
    """A store could not serve or accept a key (after any retries)."""


class MissingKeyError(StoreError, FileNotFoundError):
    """A store has no value under the requested key (simplezarr's ``IOError``)."""


class InvalidKeyError(DaskLoomError, ValueError):
    """A store key or node path that could escape its store (``..``, absolute, NUL, backslash, percent-encoded dots)."""


class InvalidNameError(InvalidKeyError, KeyError):
    """A layer, attribute or graph name that is not a single safe path segment (a ``KeyError`` too, as loompy raises)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedSchemeError(DaskLoomError, ValueError):
    """A URL scheme outside :data:`dask_loom.storage.ALLOWED_SCHEMES`; refused before any I/O."""


class UnsupportedCodecError(FormatError):
    """A Zarr array names a codec (or data type) this installation cannot decode."""


class SchedulerError(DaskLoomError, ConnectionError):
    """The configured dask scheduler cannot be reached."""


class TooLargeError(DaskLoomError, ValueError):
    """A declared size (array shape, chunk, metadata document) beyond the configured limits; refused before allocation."""


class ConfigError(DaskLoomError, ValueError):
    """A ``dask_loom.*`` setting (config, environment variable or preload argument) is unknown or invalid."""


class ChunkAlignmentError(DaskLoomError, ValueError):
    """A write region that does not start and end on stored-chunk boundaries (design decision 1)."""


class OperationError(DaskLoomError, ValueError):
    """Arguments of ``map``/``aggregate``/``scan``/``permute`` that do not fit their source.

    Labels of the wrong length, an ordering that is not a permutation, an axis
    the source lacks, an unknown function name; raised before any task runs.
    """


class UnsupportedSourceError(DaskLoomError, TypeError):
    """An operation was given an object it cannot read as chunked storage (a numpy array, a list ...)."""


class ChunkAlignmentWarning(UserWarning):
    """Requested dask chunks split stored chunks and were rounded out."""
