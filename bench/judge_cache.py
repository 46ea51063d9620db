"""Judgment-cache lookups on an object store as the cache grows: requests and seconds per lookup.

A real S3-compatible server (moto, on loopback) holds the cache; its request recorder counts the
HTTP requests of each lookup. Two ways to keep the cache:
- `parts`: every batch a part file, never merged (emsweep before compaction: a lookup lists the
  dir and reads every part);
- `compacted`: the same parts, merged by the writers once more than COMPACT_AFTER pile up
  (judge/cache.py).
Each is filled with 100 and then 1,000 batches (20 judgments each) and looked up for 100 keys.

    PYTHONPATH=src:. .venv/bin/python -m bench.judge_cache      (about a minute here)

Prints a table and the ratios `parts` / `compacted` at 1,000 parts, and writes
bench/results/judge_cache.json.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from emsweep.judge import Judgment
from emsweep.judge.cache import COMPACT_AFTER, JudgmentCache

SIZES = (100, 1000)
PER_BATCH = 20
LOOKUP_KEYS = 100
REPEATS = 3


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                server.terminate()
                raise
            time.sleep(0.2)


def recorder(endpoint: str, action: str) -> str:
    method = "GET" if action == "download-recording" else "POST"
    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method=method)) as r:
        return r.read().decode()


def requests_of(endpoint: str, action) -> tuple[int, float]:
    """(S3 requests, seconds) of `action()`, counted by the server's own recorder."""
    recorder(endpoint, "reset-recording")
    recorder(endpoint, "start-recording")
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    recorder(endpoint, "stop-recording")
    lines = [json.loads(line) for line in recorder(endpoint, "download-recording").splitlines() if line.strip()]
    return sum(1 for line in lines if "/moto-api/" not in line.get("url", "")), seconds


def fill(cache: JudgmentCache, start: int, stop: int) -> None:
    for batch in range(start, stop):
        cache.put({f"key-{batch}-{i}": Judgment(float(i), 0.9, {}, [("1", 0.5)]) for i in range(PER_BATCH)},
                  judge_model="bench")


def main() -> None:
    server, endpoint = moto_server()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    rows = []
    try:
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", access_key="bench",
                          secret_key="bench", allow_bucket_creation=True).create_dir("emsweep-bench")
        rng = random.Random(0)
        for mode, compact_after in (("parts", 10**9), ("compacted", COMPACT_AFTER)):
            cache = JudgmentCache(f"s3://emsweep-bench/{mode}/judge_cache", compact_after=compact_after)
            written = 0
            for size in SIZES:
                fill(cache, written, size)
                written = size
                keys = {f"key-{rng.randrange(size)}-{rng.randrange(PER_BATCH)}" for _ in range(LOOKUP_KEYS)}
                measured = [requests_of(endpoint, lambda: cache.get(keys)) for _ in range(REPEATS)]
                found = len(cache.get(keys))
                _, parts, compacted = cache._files()
                requests = sorted(m[0] for m in measured)[REPEATS // 2]
                seconds = sorted(m[1] for m in measured)[REPEATS // 2]
                rows.append({"mode": mode, "batches": size, "files": len(parts) + len(compacted),
                             "requests_per_lookup": requests, "seconds_per_lookup": round(seconds, 4),
                             "keys": len(keys), "found": found})
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"{'mode':10} {'batches':>8} {'files':>6} {'requests':>9} {'seconds':>8} {'found':>9}")
    for row in rows:
        print(f"{row['mode']:10} {row['batches']:>8} {row['files']:>6} {row['requests_per_lookup']:>9} "
              f"{row['seconds_per_lookup']:>8.3f} {row['found']:>4}/{row['keys']}")
    at = {(row["mode"], row["batches"]): row for row in rows}
    big, small = max(SIZES), min(SIZES)
    ratios = {
        "requests parts/compacted at 1000": at["parts", big]["requests_per_lookup"] / at["compacted", big]["requests_per_lookup"],
        "seconds parts/compacted at 1000": at["parts", big]["seconds_per_lookup"] / at["compacted", big]["seconds_per_lookup"],
        "compacted requests 1000/100 batches": at["compacted", big]["requests_per_lookup"] / at["compacted", small]["requests_per_lookup"],
        "parts requests 1000/100 batches": at["parts", big]["requests_per_lookup"] / at["parts", small]["requests_per_lookup"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.1f}")
    out = Path(__file__).resolve().parent / "results" / "judge_cache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "ratios": ratios, "compact_after": COMPACT_AFTER}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
