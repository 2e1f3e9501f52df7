"""Build hook for the optional C extensions; everything else is in pyproject.toml.

``dask_loom.hdf5._cinflate`` inflates a block's HDF5 chunks in one call with
the GIL released, and ``dask_loom.hdf5._chunkcalls`` stores a block's encoded
chunks and lists a dataset's chunks the same way (docs/performance.md
measures why).  Both are optional: where no compiler is available the build
goes on without them and dask_loom inflates chunk by chunk through ctypes and
calls h5py per chunk instead (same results, slower on threads).  Neither links a library: the functions
they call come from the ``deflate`` package and from h5py's HDF5 at run time.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(name, [f"{name.replace('.', '/')}.c"], extra_compile_args=["-O2"], optional=True)
        for name in ("dask_loom.hdf5._cinflate", "dask_loom.hdf5._chunkcalls")
    ]
)
