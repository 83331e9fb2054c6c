"""Area 7: soak. The real process (``python -m device run``: replay of the samples, tiny bundle, continuous
trigger with no interval and change detection off, frame images on with a 1 MB budget so pruning runs
all the time, the web page up) classifies field after field while the test samples its memory and file
descriptors with psutil.

Both modes first warm up for 2,500 fields, until SQLite's page cache (2 MiB by default, filled as the
database grows) is full; the table also shows the RSS at field 100, so the warm-up's own growth is visible.
Full (``LEUKO_SOAK=full``): then 10,000 fields; RSS growth under 5 MB.
Reduced (every suite): then 1,000 fields; RSS growth must be under 5 MB *and* its rate, projected to
10,000 fields, too (a leak of ~1.7 KB per field, like a slide keeping every result in memory, fails here).
Both: no file-descriptor growth, a clean SIGTERM stop, and a database whose size per record lies between
the bytes of the record itself and twice that (SQLite pages and four indexes), with images within budget.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import time
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from tests.reliability.conftest import DeviceProc, full_only, write_config

AREA = "7 soak"
RSS_LIMIT = 5 << 20
BUDGET_MB = 1
PAYLOAD_SQL = ("SELECT avg(length(CAST(time AS BLOB)) + 8 * 5 + length(coalesce(slide_id, '')) + length(source)"
               " + length(name) + length(status) + length(coalesce(label, '')) + length(scores) + length(reason)"
               " + length(quality) + length(timings) + length(model_sha256) + length(coalesce(image, ''))),"
               " count(*) FROM fields")


def _sample(ps: psutil.Process, n: int = 5) -> tuple[int, int, int]:
    """(median RSS, min fds, max fds) over ``n`` samples 50 ms apart."""
    rss, fds = [], []
    for _ in range(n):
        rss.append(ps.memory_info().rss)
        fds.append(ps.num_fds())
        time.sleep(0.05)
    return int(statistics.median(rss)), min(fds), max(fds)


def _soak(tmp_path: Path, warmup: int, fields: int, table, case: str, projected: bool) -> None:
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "c.toml", state, store={"state_dir": str(state), "reserve_mb": 0,
                                                          "image_budget_mb": BUDGET_MB, "save_images": True})
    proc = DeviceProc(cfg)
    ps = psutil.Process(proc.p.pid)
    timeout = 60 + fields * 0.1

    def reach(n: int) -> None:
        deadline = time.monotonic() + timeout
        while len(proc.shown_ids()) < n:
            assert proc.p.poll() is None, f"the process ended: {proc.tail()}"
            assert time.monotonic() < deadline, f"only {len(proc.shown_ids())} of {n} fields: {proc.tail()}"
            time.sleep(0.05)

    try:
        reach(100)
        rss_start = _sample(ps, 1)[0]
        reach(warmup)
        rss0, _fd_min0, fd_max0 = _sample(ps)
        t0, n0 = time.monotonic(), len(proc.shown_ids())
        reach(warmup + fields // 2)
        rss_mid = _sample(ps)[0]
        reach(warmup + fields)
        rss1, fd_min1, fd_max1 = _sample(ps)
        elapsed, n1 = time.monotonic() - t0, len(proc.shown_ids())
        proc.p.terminate()
        code = proc.finish(60)
    finally:
        if proc.p.poll() is None:
            proc.kill()
    db = state / "results.sqlite3"
    with closing(sqlite3.connect(db)) as c:
        payload, records = c.execute(PAYLOAD_SQL).fetchone()
        integrity = c.execute("PRAGMA integrity_check").fetchone()[0]
    db_bytes = sum(p.stat().st_size for p in state.glob("results.sqlite3*"))
    per_record = db_bytes / records
    images = sum(p.stat().st_size for p in (state / "images").rglob("*.jpg"))
    growth = rss1 - rss0
    measured = n1 - n0
    # A leak grows in both halves of the window; a one-off allocation (a cache reaching its size, an allocator
    # arena) lands in one. The projection to 10,000 fields uses the smaller half, so it measures the steady rate.
    steady = min(rss_mid - rss0, rss1 - rss_mid) * 2
    rate_10k = steady / measured * 10_000 if measured else float("inf")
    checks = {
        "rss": growth < RSS_LIMIT,
        "rss rate": (rate_10k < RSS_LIMIT) if projected else True,
        "fds": fd_min1 <= fd_max0,
        "clean stop": code == 0,
        "db size": payload <= per_record <= 2 * payload and integrity == "ok" and records >= n1,
        "images within budget": images <= BUDGET_MB << 20,
    }
    bad = [k for k, v in checks.items() if not v]
    table(AREA, case, "RSS growth < 5 MB" + (" (and its rate x10,000)" if projected else "")
          + "; no fd growth; db ~ records x bytes/record",
          f"RSS {growth / 1024:+.0f} KB over {measured} fields" + (f" (rate -> {rate_10k / 2**20:.2f} MB per 10,000)"
                                                                   if projected else "")
          + f"; fds {fd_max0} -> {fd_min1}..{fd_max1}; {per_record:.0f} B/record (record itself {payload:.0f} B)"
          + ("" if not bad else f"; FAILED {bad}"), not bad,
          f"{measured} fields in {elapsed:.0f} s ({measured / elapsed:.0f}/s) after {warmup} warm-up; RSS "
          f"{rss_start / 2**20:.1f} MB at field 100, {rss0 / 2**20:.1f} MB after warm-up, {rss1 / 2**20:.1f} MB at "
          f"the end; db {db_bytes >> 10} KB for {records} records; images {images >> 10} KB "
          f"(budget {BUDGET_MB} MB); exit {code}")
    assert not bad, (bad, growth, rate_10k, fd_max0, fd_min1, per_record, payload)


def test_soak_reduced_1000_fields(tmp_path: Path, table) -> None:
    _soak(tmp_path, warmup=int(os.environ.get("LEUKO_SOAK_WARMUP", "2500")), fields=1000, table=table,
          case="1,000 replayed fields after the page cache is warm (reduced)", projected=True)


@pytest.mark.slow
@full_only("10,000 soak fields")
def test_soak_full_10000_fields(tmp_path: Path, table) -> None:
    _soak(tmp_path, warmup=int(os.environ.get("LEUKO_SOAK_WARMUP", "2500")), fields=10_000, table=table,
          case="10,000 replayed fields after the page cache is warm (full)", projected=False)
