"""A sharded ``.loom.zarr`` on the local S3 server behind 20 ms per request, against the same layer as a local ``.loom``.

The layer: 4,096 genes x 16,384 cells float32 counts (~90 % zeros, the
issue's shape), written as a ``.loom`` by dask_loom (64 x 64 chunks, gzip 2)
and converted to sharded ``.loom.zarr`` (``dask_loom.zarr-codec``, blosc-lz4hc;
shards of about ``dask_loom.block-size`` made of whole inner chunks, grown to
store about ``dask_loom.coalesce-bytes`` each).  Cached in benchmarks/cache/
by inner chunk shape and codec.  Three parts, ratios in one run:

(a) Inner chunk shape: ``map([mean, std])`` over the sharded ``.loom.zarr``
    with 64 x 64, 128 x 128, 256 x 256 and 512 x 512 inner chunks, on the local
    disk and on S3 behind the proxy (20 ms per request); convert time and
    stored bytes of each.
(b) ``map([mean, std], axis=0)`` over the ``.loom`` on the local disk vs over the
    sharded ``.loom.zarr`` (the default inner chunks) on the local S3 server
    behind the request-counting proxy at 20 ms per request (target: <= 1.5x;
    <= 1 request per 4 MiB stored), with the requests and bytes the proxy saw.
(d) Azure: part (b)'s ``.loom`` converted by dask_loom onto Azurite
    (Microsoft's emulator, installed by ``.ci/run``; skipped without node),
    the same shards as the S3 copy of (b),
    read through the same proxy at 20 ms per request: wall time beside the S3
    and local runs of (b), and the requests by method (no ``HEAD``: each
    shard's index is at its start).  Azurite is a node program serving from
    memory; its speed is not Azure's, its requests are.
(c) The object-store client for the shard reads: every shard of the layer read
    as dask_loom reads a shard whose index is at its end (its last 8 MiB in one
    suffix request, the rest in ranged requests of 4 to 8 MiB, every request of
    a shard at once; the shards it writes now have the index at the start and
    are read from their first 8 MiB, the same request shapes) with fsspec/s3fs
    (dask_loom's client before issue 15) and with obstore (its client now),
    through the same proxy.

Every map runs in a fresh process (wall time, peak RSS of the process tree).

    python benchmarks/bench_cloud_zarr.py            # the 4,096 x 16,384 layer
    python benchmarks/bench_cloud_zarr.py --small    # 1,024 x 4,096, to check the script
    python benchmarks/bench_cloud_zarr.py --skip a,c # (b) and (d) only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _harness import CACHE, measure, save, table

LATENCY = 0.02
INNER = (64, 128, 256, 512)
MIB4 = 4 << 20


def files(small: bool) -> tuple[str, dict[int, str]]:
    """The ``.loom`` and its sharded ``.loom.zarr`` twins, one per inner chunk shape."""
    import dask

    import dask_loom
    from dask_loom._synthetic import write_synthetic_loom

    n, m = (1024, 4096) if small else (4096, 16384)
    os.makedirs(CACHE, exist_ok=True)
    loom = os.path.join(CACHE, f"cloud_{n}x{m}.loom")
    if not os.path.exists(loom):
        write_synthetic_loom(loom + ".partial.loom", n, m)
        os.replace(loom + ".partial.loom", loom)
    out = {}
    codec = str(dask.config.get("dask_loom.zarr-codec"))
    for c in INNER:
        # "istart": shards with their index at the start, what dask_loom writes since the Azure change.
        z = os.path.join(CACHE, f"cloud_{n}x{m}.c{c}.{codec}.istart.sharded.loom.zarr")
        if not os.path.exists(z):
            t0 = time.perf_counter()
            with dask.config.set(scheduler="threads"):
                dask_loom.convert(loom, z + ".partial.loom.zarr", chunks=(c, c), scheduler="threads")
            os.replace(z + ".partial.loom.zarr", z)
            convert_s = time.perf_counter() - t0
            with open(z + ".convert_s", "w") as fh:
                fh.write(f"{convert_s:.3f}")
        out[c] = z
    return loom, out


def stored_shards(z: str) -> list[int]:
    root = os.path.join(z, "matrix", "c")
    return sorted(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def run_map(path: str, storage_options: dict | None = None) -> dict:
    """connect + ``map([mean, std])`` in a fresh process; ``wall`` is both, ``map`` the map call alone, ``map_warm`` a second map."""
    import dask_loom

    t0 = time.perf_counter()
    with dask_loom.connect(path, "r", storage_options=storage_options) as ds:
        t1 = time.perf_counter()
        out = ds.map([np.mean, np.std], axis=0, scheduler="threads")
        t2 = time.perf_counter()
        ds.map([np.mean, np.std], axis=0, scheduler="threads")  # warm: clients and pools already made
        t3 = time.perf_counter()
    return {
        "wall": t2 - t0,
        "connect": t1 - t0,
        "map": t2 - t1,
        "map_warm": t3 - t2,
        "checksum": [float(np.nansum(x)) for x in out],
    }


# -- (c) the client -------------------------------------------------------------------------------


def _plan(size: int) -> list[tuple[int, int]]:
    """The byte ranges dask_loom asks for a whole shard of *size* bytes after its 8 MiB tail: pieces of 4 to 8 MiB."""
    rest = size - min(size, 2 * MIB4)
    if rest <= 0:
        return []
    step = -(-rest // max(1, rest // MIB4))
    return [(a, min(a + step, rest)) for a in range(0, rest, step)]


def run_client(client: str, bucket: str, keys: list[str], sizes: list[int], options: dict) -> dict:
    """Read every shard (tail with index, then the rest) with *client*; all requests of a shard at once, shards 2 at a time.

    The client is set up and warmed by one request first; the wall time is the shard reads alone.
    """
    timed: list[float] = []
    if client == "s3fs":
        import fsspec

        fs = fsspec.filesystem("s3", asynchronous=False, skip_instance_cache=True, **options)

        async def shard(key: str, size: int) -> int:
            tail = await fs._cat_file(f"{bucket}/{key}", start=-2 * MIB4)
            rest = await asyncio.gather(
                *(fs._cat_file(f"{bucket}/{key}", start=a, end=b) for a, b in _plan(size))
            )
            return len(tail) + sum(len(r) for r in rest)

        async def main() -> int:
            await fs.set_session()
            await fs._cat_file(
                f"{bucket}/{keys[0]}", start=0, end=1
            )  # warm: session, credentials, connection
            t0 = time.perf_counter()
            got = 0
            for i in range(0, len(keys), 2):
                got += sum(
                    await asyncio.gather(*(shard(k, s) for k, s in zip(keys[i : i + 2], sizes[i : i + 2])))
                )
            timed.append(time.perf_counter() - t0)
            return got

        from fsspec.asyn import sync

        total = sync(fs.loop, main)
    else:
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            bucket,
            endpoint=options["endpoint_url"],
            access_key_id=options["key"],
            secret_access_key=options["secret"],
            region="us-east-1",
            client_options={"allow_http": True},
            virtual_hosted_style_request=False,
        )

        async def shard(key: str, size: int) -> int:
            tail = await (
                await obstore.get_async(store, key, options={"range": {"suffix": 2 * MIB4}})
            ).bytes_async()
            rest = await asyncio.gather(
                *(obstore.get_range_async(store, key, start=a, end=b) for a, b in _plan(size))
            )
            return len(tail) + sum(len(r) for r in rest)

        async def main() -> int:
            await obstore.get_range_async(store, keys[0], start=0, end=1)  # warm: client, connection
            t0 = time.perf_counter()
            got = 0
            for i in range(0, len(keys), 2):
                got += sum(
                    await asyncio.gather(*(shard(k, s) for k, s in zip(keys[i : i + 2], sizes[i : i + 2])))
                )
            timed.append(time.perf_counter() - t0)
            return got

        total = asyncio.run(main())
    if total != sum(sizes):
        raise RuntimeError(f"{client}: read {total} bytes, expected {sum(sizes)}")
    return {"wall": timed[0], "bytes": total}


def azure_part(loom: str, z: str, chunks: tuple[int, int], repeat: int, results: dict) -> None:
    """(d): *loom* converted onto Azurite as *z* was locally, read behind the proxy; rows and requests into *results*."""
    import tempfile

    import obstore
    from _azurite import connection_string, running_azurite
    from _faultproxy import FaultProxy
    from obstore.store import AzureStore

    with tempfile.TemporaryDirectory() as wd, running_azurite(wd) as az:
        if az is None:
            print("(d) skipped: Azurite is not installed (npm install --prefix tests/azurite)", flush=True)
            results["azure"] = "skipped: Azurite is not installed"
            return
        import dask_loom

        # Written there by dask_loom, as a user would (an object-for-object copy keeps the bytes but
        # not the ETags its consolidated metadata records on Azure, and would open node by node).
        url = f"az://{az['container']}/bench/{os.path.basename(z)}"
        dask_loom.convert(loom, url, chunks=chunks, dst_storage_options=az["storage_options"], scheduler="threads")
        blob = AzureStore(az["container"], config=az["store_config"], client_options={"allow_http": True})
        shards = list(obstore.list(blob, f"bench/{os.path.basename(z)}/matrix/c/").collect())
        assert sorted(o["size"] for o in shards) == stored_shards(z), "the Azure copy differs from the S3 one"
        host, _, account = az["endpoint"].rpartition("/")
        with FaultProxy(host, latency=LATENCY) as proxy:
            via = {"connection_string": connection_string(f"{proxy.url}/{account}")}
            proxy.reset_counts()
            r = measure(run_map, url, via, repeat=repeat)
            snap = proxy.snapshot()
        results["rows"]["(d) map sharded .loom.zarr Azure (Azurite) 20 ms"] = r
        local = results["rows"].get("(b) map .loom local disk")
        s3 = next((v for k, v in results["rows"].items() if k.startswith("(b) map sharded")), None)
        per_map = {k: v / repeat for k, v in snap["requests"].items()}
        results["requests"]["(d) Azure per connect+map"] = {"by_method": per_map, "bytes_GET": snap["bytes"].get("GET", 0) / repeat}
        line = f"(d) Azure (Azurite): connect+map {r['wall']:.2f} s, map {r['result']['map']:.2f} s (warm {r['result']['map_warm']:.2f}); requests per connect+map {per_map}"
        if local is not None and s3 is not None:
            results["ratios"]["(d) map call alone: Azure / local .loom"] = r["result"]["map"] / local["result"]["map"]
            results["ratios"]["(d) map call alone: Azure / S3"] = r["result"]["map"] / s3["result"]["map"]
            results["ratios"]["(d) warm map call: Azure / S3"] = r["result"]["map_warm"] / s3["result"]["map_warm"]
            line += f"; map Azure / S3 {r['result']['map'] / s3['result']['map']:.2f}x, Azure / local {r['result']['map'] / local['result']['map']:.2f}x"
        print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,d")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import s3fs
    from _faultproxy import FaultProxy, options_via
    from _s3server import S3Server

    from dask_loom._config import get_config

    loom, zarrs = files(args.small)
    default_inner = int(get_config("loom-zarr-chunks")[0])
    server = S3Server()
    info = server.start()
    proxy = FaultProxy(info["endpoint_url"], latency=LATENCY)
    via = options_via(info["storage_options"], proxy.url)
    fs = s3fs.S3FileSystem(**info["storage_options"])
    urls = {}
    for c, z in zarrs.items():
        key = f"{info['bucket']}/bench/{os.path.basename(z)}"
        fs.put(z, key, recursive=True)
        urls[c] = f"s3://{key}"
    results: dict = {
        "rows": {},
        "ratios": {},
        "requests": {},
        "latency_s": LATENCY,
        "default_inner": default_inner,
        "codec": str(get_config("zarr-codec")),
    }
    try:
        if "a" not in skip:
            rows = []
            for c, z in zarrs.items():
                sizes = stored_shards(z)
                with open(z + ".convert_s") as fh:
                    conv = float(fh.read())
                r_disk = measure(run_map, z, repeat=args.repeat)
                proxy.reset_counts()
                r_s3 = measure(run_map, urls[c], via, repeat=args.repeat)
                snap = proxy.snapshot()
                rows += [
                    (f"(a) map .loom.zarr disk, inner {c}x{c}", r_disk),
                    (f"(a) map .loom.zarr S3 20 ms, inner {c}x{c}", r_s3),
                ]
                results["requests"][f"(a) inner {c}"] = {
                    "convert_s": conv,
                    "stored_bytes": sum(sizes),
                    "shards": len(sizes),
                    "requests_per_map": snap["total_requests"] / args.repeat,
                }
                results["requests"][f"(a) inner {c}"].update(
                    {
                        f"{w} {k}": r["result"][k]
                        for w, r in (("disk", r_disk), ("S3", r_s3))
                        for k in ("map", "map_warm")
                    }
                )
                print(
                    f"inner {c}: map disk {r_disk['result']['map']:.2f} s (warm {r_disk['result']['map_warm']:.2f}), S3 {r_s3['result']['map']:.2f} s (warm {r_s3['result']['map_warm']:.2f})",
                    flush=True,
                )
                print(
                    f"inner {c}: convert {conv:.1f} s, stored {sum(sizes) / 2**20:.1f} MiB in {len(sizes)} shards, "
                    f"disk {r_disk['wall']:.2f} s, S3 {r_s3['wall']:.2f} s, {snap['total_requests'] / args.repeat:.0f} requests/map",
                    flush=True,
                )
            print(table(rows, rows[0][0]))
            results["rows"].update(dict(rows))
            base = dict(rows)[f"(a) map .loom.zarr disk, inner {INNER[0]}x{INNER[0]}"]["wall"]
            for name, r in rows:
                results["ratios"][f"{name} / disk inner 64"] = r["wall"] / base

        if "b" not in skip:
            z = zarrs[default_inner]
            sizes = stored_shards(z)
            r_loom = measure(run_map, loom, repeat=args.repeat)
            proxy.reset_counts()
            r_s3 = measure(run_map, urls[default_inner], via, repeat=args.repeat)
            snap = proxy.snapshot()
            rows = [
                ("(b) map .loom local disk", r_loom),
                (f"(b) map sharded .loom.zarr S3 20 ms ({default_inner}x{default_inner})", r_s3),
            ]
            print(table(rows, rows[0][0]))
            ratio = r_s3["wall"] / r_loom["wall"]
            map_ratio = r_s3["result"]["map"] / r_loom["result"]["map"]
            results["ratios"]["(b) map call alone: S3 sharded .loom.zarr / local .loom (target <= 1.5)"] = (
                map_ratio
            )
            warm_ratio = r_s3["result"]["map_warm"] / r_loom["result"]["map_warm"]
            results["ratios"]["(b) warm map call: S3 sharded .loom.zarr / local .loom (target <= 1.5)"] = (
                warm_ratio
            )
            results["timings_s"] = {
                "(b) local .loom": {k: r_loom["result"][k] for k in ("connect", "map", "map_warm")},
                "(b) S3 .loom.zarr": {k: r_s3["result"][k] for k in ("connect", "map", "map_warm")},
            }
            print(
                f"(b) warm map call: S3 {r_s3['result']['map_warm']:.2f} s / local {r_loom['result']['map_warm']:.2f} s = {warm_ratio:.2f}x",
                flush=True,
            )
            print(
                f"(b) map call alone: S3 {r_s3['result']['map']:.2f} s / local {r_loom['result']['map']:.2f} s = {map_ratio:.2f}x; "
                f"connect S3 {r_s3['result']['connect']:.2f} s / local {r_loom['result']['connect']:.2f} s",
                flush=True,
            )
            per_map = snap["total_requests"] / args.repeat
            results["rows"].update(dict(rows))
            results["ratios"]["(b) connect+map+close: S3 sharded .loom.zarr / local .loom"] = ratio
            # Requests of the map call alone (after connect), counted once in this process.
            import dask_loom

            with dask_loom.connect(urls[default_inner], "r", storage_options=via) as ds:
                proxy.reset_counts()
                ds.map([np.mean, np.std], axis=0, scheduler="threads")
                only = proxy.snapshot()
            results["requests"]["(b) map call alone"] = {
                "requests": only["total_requests"],
                "by_method": only["requests"],
                "bytes_GET": only["bytes"].get("GET", 0),
                "stored_MiB_per_request": sum(sizes) / 2**20 / max(1, only["total_requests"]),
                "limit_one_per_started_4MiB_of_each_shard": sum(-(-n // MIB4) for n in sizes),
            }
            print(
                f"(b) map call alone: {only['total_requests']} requests for {sum(sizes) / 2**20:.1f} MiB stored in "
                f"{len(sizes)} shards = {sum(sizes) / 2**20 / max(1, only['total_requests']):.2f} MiB per request",
                flush=True,
            )
            results["requests"]["(b) per connect+map"] = {
                "requests": per_map,
                "by_method": {k: v / args.repeat for k, v in snap["requests"].items()},
                "bytes_GET": snap["bytes"].get("GET", 0) / args.repeat,
                "stored_bytes": sum(sizes),
                "shards": len(sizes),
                "stored_MiB_per_request": sum(sizes) / 2**20 / per_map,
            }
            print(
                f"(b) connect+map: S3 / local = {ratio:.2f}x; {per_map:.0f} requests per connect+map for "
                f"{sum(sizes) / 2**20:.1f} MiB stored = {sum(sizes) / 2**20 / per_map:.2f} MiB per request",
                flush=True,
            )

        if "d" not in skip:
            azure_part(loom, zarrs[default_inner], (default_inner, default_inner), args.repeat, results)

        if "c" not in skip:
            z = zarrs[default_inner]
            base = f"bench/{os.path.basename(z)}/matrix/c"
            root = os.path.join(z, "matrix", "c")
            keys, sizes = [], []
            for d, _, fs_ in os.walk(root):
                for f in fs_:
                    keys.append(f"{base}/{os.path.relpath(os.path.join(d, f), root)}")
                    sizes.append(os.path.getsize(os.path.join(d, f)))
            rows = []
            for client in ("s3fs", "obstore"):
                proxy.reset_counts()
                r = measure(run_client, client, info["bucket"], keys, sizes, via, repeat=args.repeat)
                r["requests"] = proxy.snapshot()["total_requests"] / args.repeat
                rows.append((f"(c) shard reads with {client}", r))
            print(table(rows, rows[0][0]))
            results["rows"].update(dict(rows))
            ratio = rows[1][1]["wall"] / rows[0][1]["wall"]
            results["ratios"]["(c) obstore / s3fs shard reads"] = ratio
            print(
                f"(c) obstore / s3fs = {ratio:.2f}x; requests {rows[0][1]['requests']:.0f} / {rows[1][1]['requests']:.0f}"
            )
    finally:
        proxy.close()
        server.stop()
    name = "cloud_zarr_small" if args.small else "cloud_zarr"
    print("saved", save(name, results))


if __name__ == "__main__":
    if "--clean" in sys.argv:
        shutil.rmtree(CACHE, ignore_errors=True)
    main()
