"""``python -m dask_loom``: the ``dask-loom`` command line (see :mod:`dask_loom.cli`)."""

import sys

from dask_loom.cli import main

if __name__ == "__main__":
    sys.exit(main())
