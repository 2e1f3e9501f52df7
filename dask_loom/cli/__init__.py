"""``dask-loom``: the command line, one of the package's doors.

Every subcommand is registered in :data:`dask_loom.cli._main.COMMANDS`; the
commands call into the formats and operations, never the reverse (no format
module imports this package).
"""

from dask_loom.cli._main import main

__all__ = ["main"]
