"""The cold cost of an object-store client, s3fs against obstore, side by side.

Each run is a fresh ``python -c`` process that imports the client, makes one
ranged GET (64 KiB of a 1 MiB object) and one whole GET (the 1 MiB object) on
the local S3 server (moto, ``tests/_s3server.py``, no latency added), and
reports its own import time and first-request time; the whole-process wall
(interpreter start to exit) and peak RSS come from the harness.  Medians of
``--repeat`` runs (5 by default), the clients alternating run by run so a
busy machine weighs on both alike.

    python benchmarks/bench_client.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _harness import run_process, save

KEY = "bench-client/blob.bin"
SIZE = 1 << 20
RANGE = (SIZE // 2, 1 << 16)

_S3FS = """
import json, time
t0 = time.perf_counter()
import s3fs
t1 = time.perf_counter()
fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url={endpoint!r},
                       client_kwargs={{"region_name": "us-east-1"}})
part = fs.cat_file({path!r}, start={start}, end={end})
t2 = time.perf_counter()
whole = fs.cat_file({path!r})
t3 = time.perf_counter()
assert len(part) == {length} and len(whole) == {size}
print(json.dumps({{"import": t1 - t0, "first_request": t2 - t1, "second_request": t3 - t2}}))
"""

_OBSTORE = """
import json, time
t0 = time.perf_counter()
import obstore
from obstore.store import S3Store
t1 = time.perf_counter()
store = S3Store({bucket!r}, aws_access_key_id="testing", aws_secret_access_key="testing", aws_endpoint={endpoint!r},
                aws_region="us-east-1", client_options={{"allow_http": True}})
part = obstore.get_range(store, {key!r}, start={start}, length={length})
t2 = time.perf_counter()
whole = obstore.get(store, {key!r}).bytes()
t3 = time.perf_counter()
assert len(part) == {length} and len(whole) == {size}
print(json.dumps({{"import": t1 - t0, "first_request": t2 - t1, "second_request": t3 - t2}}))
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    from _s3server import S3Server

    server = S3Server()
    info = server.start()
    try:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=info["endpoint_url"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).put_object(Bucket=info["bucket"], Key=KEY, Body=os.urandom(SIZE))
        fields = {
            "endpoint": info["endpoint_url"],
            "bucket": info["bucket"],
            "key": KEY,
            "path": f"{info['bucket']}/{KEY}",
            "start": RANGE[0],
            "end": RANGE[0] + RANGE[1],
            "length": RANGE[1],
            "size": SIZE,
        }
        codes = {"s3fs": _S3FS.format(**fields), "obstore": _OBSTORE.format(**fields)}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
        for i in range(args.repeat):
            for name, code in codes.items():
                r = run_process(code)
                runs[name].append(r)
                print(f"{name:8} run {i + 1}: {r['wall']:.3f} s, {r['peak_rss'] / 2**20:.0f} MiB", flush=True)
    finally:
        server.stop()

    summary: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        summary[name] = {
            "process_wall_s": statistics.median(r["wall"] for r in rs),
            "import_s": statistics.median(r["result"]["import"] for r in rs),
            "first_request_s": statistics.median(r["result"]["first_request"] for r in rs),
            "second_request_s": statistics.median(r["result"]["second_request"] for r in rs),
            "peak_rss_mib": statistics.median(r["peak_rss"] for r in rs) / 2**20,
        }
    print(
        f"\n{'client':<10} {'process s':>10} {'import s':>10} {'1st GET s':>10} {'2nd GET s':>10} {'peak MiB':>9}"
    )
    for name, s in summary.items():
        print(
            f"{name:<10} {s['process_wall_s']:>10.3f} {s['import_s']:>10.3f} {s['first_request_s']:>10.3f} "
            f"{s['second_request_s']:>10.3f} {s['peak_rss_mib']:>9.0f}"
        )
    a, b = summary["s3fs"], summary["obstore"]
    ratios = {
        "s3fs / obstore (process wall)": a["process_wall_s"] / b["process_wall_s"],
        "s3fs / obstore (import)": a["import_s"] / b["import_s"],
        "s3fs / obstore (first request)": a["first_request_s"] / b["first_request_s"],
        "s3fs / obstore (peak RSS)": a["peak_rss_mib"] / b["peak_rss_mib"],
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    payload = {
        "object_bytes": SIZE,
        "range": {"start": RANGE[0], "length": RANGE[1]},
        "repeat": args.repeat,
        "summary": summary,
        "ratios": ratios,
        "runs": {
            name: [{"wall": r["wall"], "peak_rss": r["peak_rss"], **r["result"]} for r in rs]
            for name, rs in runs.items()
        },
        "notes": "each run a fresh process: import + one ranged GET + one whole GET on the local S3 server (no added "
        "latency); process_wall is interpreter start to exit; first_request includes building the client; medians",
    }
    print(save("client", payload))
    return payload


if __name__ == "__main__":
    main()
