"""Per-gene statistics of a Loom file on a SLURM cluster, with dask-jobqueue and dask_loom.

Run by ``loom-stats.sbatch``; the cluster comes from ``deploy/slurm/jobqueue.yaml``
(``SLURMCluster()`` with no arguments reads it from dask's configuration).

    python deploy/slurm/loom_stats.py FILE.loom --out gene_stats.tsv --jobs 4
    python deploy/slurm/loom_stats.py FILE.loom --local          # same job on a LocalCluster
    python deploy/slurm/loom_stats.py --print-job-script         # what sbatch would receive

The output is a tab-separated table: gene name (the ``Gene`` row attribute when present,
else the row number), mean, standard deviation and number of non-zero values per row.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _cluster(*, local: bool, jobs: int):
    if local:
        from distributed import LocalCluster

        # The same preload the SLURM workers load (jobqueue.yaml worker-extra-args).
        return LocalCluster(
            n_workers=jobs, threads_per_worker=1, dashboard_address=":0", preload=["dask_loom.worker_setup"]
        )
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster()
    cluster.scale(jobs=jobs)
    return cluster


def gene_stats(path: str, client) -> tuple[np.ndarray, list[np.ndarray]]:
    """Names and ``[mean, std, nonzero count]`` per row of the main matrix, computed on *client*."""
    import dask_loom

    # validate=False: statistics need only the matrix, and files from other writers often
    # stray from the spec in their attributes (what `dask-loom validate` reports).
    with dask_loom.connect(path, "r", validate=False, client=client) as ds:
        names = ds.ra["Gene"] if "Gene" in ds.ra else np.arange(ds.shape[0])
        stats = ds.map([np.mean, np.std, np.count_nonzero], axis=0)
    return np.asarray(names), stats


def write_table(out: str, names: np.ndarray, stats: list[np.ndarray]) -> None:
    with open(out, "w", encoding="utf-8") as f:
        f.write("gene\tmean\tstd\tnonzero\n")
        for name, mean, std, nnz in zip(names, *stats):
            f.write(f"{name}\t{mean:.9g}\t{std:.9g}\t{int(nnz)}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="a .loom file (or .loom.zarr, or an s3:// URL)")
    parser.add_argument("--out", default="gene_stats.tsv", help="output table (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM worker jobs (LocalCluster workers with --local)")
    parser.add_argument("--local", action="store_true", help="use a LocalCluster instead of SLURM")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the first worker")
    parser.add_argument("--print-job-script", action="store_true", help="print the worker job script and exit")
    args = parser.parse_args(argv)

    if args.print_job_script:
        from dask_jobqueue import SLURMCluster

        with SLURMCluster() as cluster:
            print(cluster.job_script())
        return 0
    if not args.path:
        parser.error("a Loom file is required")

    from distributed import Client

    start = time.perf_counter()
    with _cluster(local=args.local, jobs=args.jobs) as cluster, Client(cluster) as client:
        print(f"dashboard: {client.dashboard_link}", flush=True)
        # Worker jobs may queue for a while; the first one is enough to start.
        client.wait_for_workers(1, timeout=args.timeout)
        names, stats = gene_stats(args.path, client)
    write_table(args.out, names, stats)
    print(f"{len(names)} rows -> {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
