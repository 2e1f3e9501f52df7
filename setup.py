"""Build hook for the one C extension; everything else is in pyproject.toml.

``dask_loom.hdf5._cinflate`` inflates a block's HDF5 chunks in one call with
the GIL released (docs/performance.md measures why).  It is optional: where no
compiler is available the build goes on without it and dask_loom inflates
chunk by chunk through ctypes instead (same results, slower on threads).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dask_loom.hdf5._cinflate",
            ["dask_loom/hdf5/_cinflate.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
