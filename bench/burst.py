"""``python -m bench.burst PORT N [PATH]``: N concurrent GETs to 127.0.0.1:PORT, all opened at once (asyncio,
one connection each, ``Connection: close``); prints one JSON line: status codes, errors, bad bodies, wall time
and the slowest request. A separate process, like the page's real clients. ``make bench`` (section ``burst``)
measures the loop's slow-down under these bursts; the reliability suite checks that every request is answered."""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def one(port: int, path: str) -> tuple[int | str, float, bool]:
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        code = int(head.split(b" ", 2)[1])
        try:
            ok_body = isinstance(json.loads(body), dict)
        except ValueError:
            ok_body = False
        return code, time.monotonic() - t0, ok_body
    except Exception as exc:  # a refused or reset connection is a result, not a crash of the client
        return f"{type(exc).__name__}", time.monotonic() - t0, False


async def main(port: int, n: int, path: str) -> dict:
    t0 = time.monotonic()
    results = await asyncio.gather(*[one(port, path) for _ in range(n)])
    codes: dict[str, int] = {}
    for code, _, _ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    return {"codes": codes, "bad_bodies": sum(1 for c, _, b in results if c == 200 and not b),
            "seconds": round(time.monotonic() - t0, 3), "slowest": round(max(t for _, t, _ in results), 3)}


if __name__ == "__main__":
    port, n = int(sys.argv[1]), int(sys.argv[2])
    path = sys.argv[3] if len(sys.argv) > 3 else "/api/status"
    print(json.dumps(asyncio.run(main(port, n, path))), flush=True)
