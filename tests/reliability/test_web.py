"""Area 6: the page under abuse, over real HTTP (waitress on 127.0.0.1, as shipped), against a running loop.

Tokens, body size and path traversal are checked with raw requests (no client-side path normalisation).
The load case sends bursts of 200 concurrent status requests from a separate local process (``python -m
bench.burst``) while the loop runs, and checks what must hold on any machine: every request is answered 200
with a JSON body, the loop keeps recording fields during every burst, and no fault is raised. How much the
bursts slow the loop (the time-per-field ratio, bound 1.10) is a measurement, not a test: it depends on the
machine and its load, so it lives in ``make bench`` (section ``burst``, the same bursts against the same loop).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from device.sources import ReplaySource
from device.web import serve
from tests.reliability.conftest import ROOT, SAMPLES, make_config, wait

AREA = "6 web"
TOKEN = "tok-reliability"
UPLOAD_MB = 1


@pytest.fixture
def served(harness, short_tmp):
    """(harness, server) with a running replay loop and the real waitress server on a free port."""
    cfg = make_config(short_tmp / "state", web={"port": 0, "max_upload_mb": UPLOAD_MB},
                      store={"save_images": False})
    h = harness(cfg, lambda: ReplaySource(SAMPLES))
    assert wait(lambda: h.store.count() >= 3)
    srv = serve(h.svc, "127.0.0.1", 0)
    yield h, srv
    srv.close()


def request(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
            timeout: float = 30) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.putrequest(method, path, skip_accept_encoding=True)
        for k, v in {"Accept": "application/json", **(headers or {})}.items():
            c.putheader(k, v)
        if body is not None and "Transfer-Encoding" not in (headers or {}):
            c.putheader("Content-Length", str(len(body)))
        c.endheaders()
        if body is not None:
            try:
                c.send(body)
            except (BrokenPipeError, ConnectionResetError):  # the server refused early: read its answer
                pass
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


POSTS = ["/api/classify", "/api/slides/start", "/api/slides/end", "/api/alert/acknowledge"]


@pytest.mark.parametrize("path", POSTS)
def test_posts_need_the_token(served, path: str, table) -> None:
    h, srv = served
    slide = (h.svc.status().to_json()["slide"] or {}).get("id")
    missing = request(srv.port, "POST", path)[0]
    scheme = request(srv.port, "POST", path, {"Authorization": "Basic dXNlcjpwYXNz"})[0]
    wrong = request(srv.port, "POST", path, {"X-Token": "nope"})[0]
    near = request(srv.port, "POST", path, {"Authorization": f"Bearer {TOKEN}x"})[0]
    unchanged = (h.svc.status().to_json()["slide"] or {}).get("id") == slide
    ok = (missing, scheme, wrong, near) == (401, 401, 403, 403) and unchanged
    table(AREA, f"POST {path} without / with a wrong token", "401 / 403, nothing done",
          f"none {missing}, Basic {scheme}, wrong {wrong}, token+x {near}; state unchanged {unchanged}", ok)
    assert ok


def test_oversized_bodies_are_413(served, table) -> None:
    h, srv = served
    limit = UPLOAD_MB << 20
    just_over = request(srv.port, "POST", "/api/classify?name=a.jpg",
                        {"X-Token": TOKEN, "Content-Type": "image/jpeg"}, b"\xff\xd8" + b"\0" * limit)[0]
    huge = request(srv.port, "POST", "/api/classify?name=a.jpg",
                   {"X-Token": TOKEN, "Content-Type": "image/jpeg"}, b"\0" * (3 * limit))[0]
    boundary = "b0undary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff" * (limit + 10) + f"\r\n--{boundary}--\r\n".encode()
    multipart = request(srv.port, "POST", "/api/classify",
                        {"X-Token": TOKEN, "Content-Type": f"multipart/form-data; boundary={boundary}"}, form)[0]
    no_token_huge = request(srv.port, "POST", "/api/classify", {"Content-Type": "image/jpeg"}, b"\0" * (3 * limit))[0]
    alive = h.svc.running and request(srv.port, "GET", "/api/health")[0] == 200
    ok = just_over == 413 and huge == 413 and multipart == 413 and no_token_huge in (401, 413) and alive
    table(AREA, f"oversized body (limit {UPLOAD_MB} MiB)", "413, loop unaffected",
          f"limit+2 B raw {just_over}, 3x limit raw {huge}, multipart {multipart}, 3x without token "
          f"{no_token_huge}; health 200 after: {alive}", ok)
    assert ok


TRAVERSALS = [
    "/api/results/../../results.sqlite3", "/api/results/..%2F..%2Fresults.sqlite3",
    "/api/results/%2e%2e%2f%2e%2e%2fresults.sqlite3/image", "/api/results/1/image/../../../../etc/passwd",
    "/api/results/1%2F..%2F..%2Fresults.sqlite3/image", "/api/results/-1/image", "/api/results/1%00/image",
    "/api/results/99999999999999999999/thumb", "/api/slides/..%2F..%2Fetc%2Fpasswd/report",
    "/api/slides/%2e%2e/report", "/api/slides/S1..S2/report", "/static/../results.sqlite3",
    "/static/..%2f..%2fdevice%2fconfig%2fdefault.toml", "/static/%2e%2e/%2e%2e/token", "/../../etc/passwd",
]


def test_path_traversal_in_ids_is_404(served, table) -> None:
    h, srv = served
    got = {p: request(srv.port, "GET", p) for p in TRAVERSALS}
    secrets = (b"SQLite format", b"root:", TOKEN.encode())
    leaks = [p for p, (_, body) in got.items() if any(s in body for s in secrets)]
    codes = {p: c for p, (c, _) in got.items()}
    ok = all(c == 404 for c in codes.values()) and not leaks
    table(AREA, f"path traversal in ids ({len(TRAVERSALS)} paths)", "404, nothing leaked",
          "all 404" if ok else f"codes {codes}, leaks {leaks}", ok,
          f"codes seen: {sorted(set(codes.values()))}")
    assert ok, (codes, leaks)


# -- 200 concurrent status requests vs the loop ----------------------------------------------------------------


def _last_id(h) -> int:
    r = h.store.query(limit=1)
    return r[0].id if r else 0


BURSTS, BURST_SIZE, BURST_TIMEOUT_S = 3, 200, 120  # the time-out only stops a hung run; nothing is timed


def test_200_concurrent_status_requests_are_all_answered_while_the_loop_keeps_recording(harness, table) -> None:
    state = Path(tempfile.mkdtemp(prefix="ls-web-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    cfg = make_config(state / "state", store={"save_images": False},
                      trigger={"mode": "continuous", "interval_ms": 0, "change_threshold": 0.0})
    h = harness(cfg, lambda: ReplaySource(SAMPLES))
    srv = serve(h.svc, "127.0.0.1", 0)
    bursts: list[dict] = []
    during: list[int] = []
    try:
        assert wait(lambda: h.store.count() >= 50)
        for _ in range(BURSTS):
            a = _last_id(h)
            r = subprocess.run([sys.executable, "-m", "bench.burst", str(srv.port), str(BURST_SIZE)], cwd=ROOT,
                               capture_output=True, text=True, timeout=BURST_TIMEOUT_S)
            bursts.append(json.loads(r.stdout) if r.returncode == 0 and r.stdout else {"error": r.stderr[-500:]})
            during.append(_last_id(h) - a)
        st = h.svc.status().to_json()
    finally:
        srv.close()
        h.svc.stop()
    all_ok = all(b.get("codes") == {"200": BURST_SIZE} and b.get("bad_bodies") == 0 for b in bursts)
    kept_going = all(n > 0 for n in during)
    healthy = st["faults"] == [] and st["counts"]["store_errors"] == 0 and st["counts"]["camera_errors"] == 0
    ok = all_ok and kept_going and healthy
    table(AREA, f"{BURSTS} bursts of {BURST_SIZE} concurrent GET /api/status (127.0.0.1)",
          "every request 200 with a JSON body; the loop records fields during every burst; no fault",
          f"all {BURSTS * BURST_SIZE} answered 200: {all_ok}; fields recorded during each burst: {during}; "
          f"faults {st['faults']}", ok,
          f"bursts took {[b.get('seconds') for b in bursts]} s (the slow-down ratio is measured by `make bench`)")
    assert ok, (bursts, during, st["faults"])


def test_the_page_governor_waits_only_when_in_debt(table) -> None:
    """The mechanism that keeps bursts from slowing the loop (`make bench` measures how much), alone: a page
    polling normally never waits; in a flood, after a burst the next request waits until the page's share of
    the time is back under the cap; without a flood (a browser loading the page) nothing waits even in debt.
    Asserted on the seconds the governor itself slept, not on wall-clock time."""
    from device.web.server import CpuGovernor

    g = CpuGovernor(share=0.5, burst_s=0.05, overhead_s=0.0)
    normal = 0.0
    for _ in range(20):  # a page polling: 1 ms of handling per request
        normal += g.wait()
        g.charge(0.001)
    g.charge(0.2)  # a burst: 200 ms of handling; at 50% the debt takes ~0.3 s to repay
    waited = g.wait()  # the seconds it slept: a lower bound that a slow machine cannot break
    stopped = CpuGovernor(share=0.01, burst_s=0.0, overhead_s=0.0)
    stopped.charge(10.0)
    stopped.stop.set()
    released = stopped.wait()  # closing the server releases waiting requests at once: no sleep at all
    calm = CpuGovernor(share=0.01, burst_s=0.0, overhead_s=0.0, pending=lambda: 2)  # a browser loading the page
    calm.charge(0.5)
    calm_s = calm.wait()
    ok = normal == 0.0 and waited >= 0.25 and released == 0.0 and calm_s == 0.0
    table(AREA, "page governor (unit)", "polling never waits; a burst's debt is repaid at the cap; stop releases",
          f"polling waited {normal:.3f} s; after 200 ms at 50%: waited {waited:.2f} s; on stop {released:.3f} s; "
          f"in debt but no flood (2 queued): {calm_s:.3f} s", ok)
    assert ok
