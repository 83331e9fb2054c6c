"""``python -m bench.clients``: N page clients polling the status API on loopback, for a bounded time.

A separate process (as browsers would be), standard library only, one
keep-alive HTTP/1.1 connection per client. Refuses any host but loopback.
Prints one JSON line: requests, errors, latencies, its own CPU seconds and
the wall-clock window it ran in.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def client(host: str, port: int, paths: list[str], interval: float, t_end: float, out: dict, lock: threading.Lock
           ) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    lat, errors, i = [], 0, 0
    while time.monotonic() < t_end:
        path = paths[i % len(paths)]
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors += 1
            lat.append((time.perf_counter() - t0) * 1000)
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
        if interval > 0:
            time.sleep(max(0.0, min(interval, t_end - time.monotonic())))
    conn.close()
    with lock:
        out["latencies_ms"].extend(lat)
        out["requests"] += len(lat) + errors
        out["errors"] += errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--interval", type=float, default=0.1, help="pause after each response (s)")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--paths", default="/api/status")
    args = p.parse_args(argv)
    u = urllib.parse.urlsplit(args.url)
    if u.hostname not in LOOPBACK:
        print(f"refusing {u.hostname}: page-load clients only talk to loopback", file=sys.stderr)
        return 2
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 120:
        print("clients must be 1..64 and seconds 0..120", file=sys.stderr)
        return 2
    paths = [x for x in args.paths.split(",") if x.startswith("/")]
    out = {"latencies_ms": [], "requests": 0, "errors": 0}
    lock = threading.Lock()
    cpu0 = time.process_time()
    t_start = time.time()
    t_end = time.monotonic() + args.seconds
    threads = [threading.Thread(target=client, args=(u.hostname, u.port or 80, paths, args.interval, t_end, out, lock),
                                daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + 30)
    out.update(t_start=t_start, t_end=time.time(), seconds=args.seconds, cpu_s=time.process_time() - cpu0)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
