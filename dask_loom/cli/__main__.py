"""``python -m dask_loom.cli``: the ``dask-loom`` command line."""

import sys

from dask_loom.cli._main import main

if __name__ == "__main__":
    sys.exit(main())
