"""Area 3: the state folder fills up, is locked by another process, or turns read-only.

Disk full is real: the state folder sits on a size-capped tmpfs (mounted here, as root, like CI) that a
ballast file fills. The appliance must keep classifying and showing results, stop writing frame images
first (the free-space reserve), then raise a storage fault when records cannot be committed, and recover
by itself when space comes back, with an intact database.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

from device.sources import ReplaySource
from device.store import ResultStore
from tests.reliability.conftest import SAMPLES, make_config, run_device, wait, write_config

AREA = "3 storage"


def _rows(db: Path) -> list[tuple[int, str | None, int]]:
    with closing(sqlite3.connect(db)) as c:
        return c.execute("SELECT id, image, image_pruned FROM fields ORDER BY id").fetchall()


def test_disk_full_images_stop_first_then_records_then_it_recovers(small_disk, harness, table) -> None:
    disk = small_disk(4096)
    state = disk.path / "state"
    cfg = make_config(state, store={"state_dir": str(state), "reserve_mb": 1, "image_budget_mb": 100,
                                    "save_images": True})
    h = harness(cfg, lambda: ReplaySource(SAMPLES), start=False)
    disk.attach(h.store)
    svc = h.svc
    svc.start()
    assert wait(lambda: sum(1 for r in _rows(h.store.path) if r[1]) >= 5, 60), svc.status()

    # 1. below the reserve: no more images, records still go in
    disk.fill((1 << 20) - (96 << 10))
    t_low = h.store.count()
    images_stopped = wait(lambda: h.store.last_image_error != "" and h.store.count() > t_low + 3, 60)
    # 2. the database cannot grow either: records fail, a storage fault, classification goes on
    disk.fill(0)
    failed = wait(lambda: svc.status().counts["store_errors"] >= 3, 120)
    st = h.client.get("/api/status").get_json()
    fault = next((f for f in st["faults"] if f["kind"] == "storage"), None)
    shown_before = st["counts"]["fields"]
    still_classifying = wait(lambda: svc.status().counts["fields"] >= shown_before + 3, 30)
    last = svc.status().last
    leds_fault = h.shows_fault_pattern()
    thread_alive = svc.running
    # 3. space comes back: the fault clears by itself, records and then images resume
    disk.clear()
    n_before = h.store.count()
    recovered = wait(lambda: svc.status().faults == () and h.store.count() > n_before + 3, 60)
    images_back = wait(lambda: _rows(h.store.path)[-1][1] is not None, 60)
    svc.stop()
    rows = _rows(h.store.path)
    with closing(sqlite3.connect(h.store.path)) as c:
        integrity = c.execute("PRAGMA integrity_check").fetchone()[0]
    # records saved without an image (not pruned) after images stopped and before records stopped
    first_imageless = next((i for i, (_id, img, pruned) in enumerate(rows) if img is None and not pruned), None)
    imageless = sum(1 for _id, img, pruned in rows if img is None and not pruned)
    strays = [p.name for p in (state / "images").rglob("*") if p.is_file() and p.suffix != ".jpg"]
    missing = [img for _id, img, _p in rows if img and not (state / img).is_file()]
    checks = {
        "images stop below the reserve": images_stopped and first_imageless is not None,
        "records outlive images": imageless >= 3,
        "storage fault, disk full named": failed and fault is not None and "disk is full" in fault["message"],
        "keeps classifying and showing": still_classifying and last is not None and last.id is None,
        "fault LEDs, loop alive": leds_fault and thread_alive,
        "recovers by itself": recovered and images_back,
        "database intact": integrity == "ok" and not strays and not missing,
    }
    bad = [k for k, v in checks.items() if not v]
    case = "disk full (4 MB tmpfs, reserve 1 MB)" if disk.real else "disk full (SIMULATED: no tmpfs mount)"
    table(AREA, case, "images stop, then records; fault; keeps showing; recovers",
          f"fault: {(fault or {}).get('message', '-').replace(str(state) + '/', '')[:110]}; "
          + ("all checks hold" if not bad else f"FAILED {bad}"),
          not bad, f"{imageless} records kept without an image before records failed; "
          f"{svc.status().counts['store_errors']} failed commits; {len(rows)} records; integrity {integrity}")
    assert not bad, (bad, st, imageless)


def test_database_locked_by_another_process_is_a_clear_fault(harness, short_tmp, table) -> None:
    cfg = make_config(short_tmp / "state")
    h = harness(cfg, lambda: ReplaySource(SAMPLES))
    svc = h.svc
    assert wait(lambda: h.store.count() >= 3)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         f"c = sqlite3.connect({str(h.store.path)!r}, isolation_level=None)\n"
         # held well past the 5 s busy timeout: the pipelined recorder may start its first blocked commit up to
         # a field later, and the fault must still be standing when the page is asked
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(12); c.execute('ROLLBACK')"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        seen: dict = {}

        def page_shows_it() -> bool:  # what the technician sees: the page's status, not the object's
            seen["st"] = h.client.get("/api/status")
            seen["fault"] = next((f for f in seen["st"].get_json()["faults"] if f["kind"] == "storage"), {})
            return bool(seen["fault"])

        faulted = wait(page_shows_it, 30)
        fault_s = time.monotonic() - t0
        st, fault = seen["st"], seen["fault"]
        leds = h.shows_fault_pattern()
    finally:
        holder.wait(30)
    n = h.store.count()
    recovered = wait(lambda: svc.status().faults == () and h.store.count() > n, 30)
    ok = (faulted and st.status_code == 200 and "another process holds the database" in fault.get("message", "")
          and leds and recovered and svc.running)
    table(AREA, "database locked by another process (12 s)", "storage fault naming the cause; no crash; recovers",
          f"fault after {fault_s:.1f} s: {fault.get('message', '-').replace(str(h.state) + '/', '')[:110]}; "
          f"recovered {recovered}", ok,
          f"busy timeout 5 s; {svc.status().counts['store_errors']} failed commits")
    assert ok


def test_database_turning_read_only_mid_run_is_a_clear_fault(harness, short_tmp, table) -> None:
    cfg = make_config(short_tmp / "state")
    h = harness(cfg, lambda: ReplaySource(SAMPLES))
    svc = h.svc
    assert wait(lambda: h.store.count() >= 3)
    with h.store._lock:  # what a remounted-read-only card looks like to SQLite's open connection
        h.store._db.execute("PRAGMA query_only = 1")
    faulted = wait(lambda: svc.status().counts["store_errors"] >= 2)
    st = svc.status().to_json()
    fault = next((f for f in st["faults"] if f["kind"] == "storage"), {})
    shown = st["counts"]["fields"]
    classifying = wait(lambda: svc.status().counts["fields"] > shown + 2)
    leds = h.shows_fault_pattern()
    with h.store._lock:
        h.store._db.execute("PRAGMA query_only = 0")
    n = h.store.count()
    recovered = wait(lambda: svc.status().faults == () and h.store.count() > n)
    ok = faulted and "read-only" in fault.get("message", "") and classifying and leds and recovered
    table(AREA, "database read-only mid-run", "storage fault naming the cause; keeps classifying; recovers",
          f"fault: {fault.get('message', '-').replace(str(h.state) + '/', '')[:110]}; recovered {recovered}", ok)
    assert ok


def test_state_folder_on_a_read_only_file_system_refuses_to_start_clearly(small_fs, tmp_path, table) -> None:
    fs = small_fs(1024)
    state = fs.path / "state"
    ResultStore(state).close()  # a card that worked yesterday
    r = fs.remount(ro=True)
    assert r.returncode == 0, r.stderr
    try:
        res = run_device("run", "--config", str(write_config(tmp_path / "c.toml", state)))
    finally:
        fs.remount(ro=False)
    msg = next((line for line in res.stderr.splitlines() if " ERROR " in line), res.stderr[-300:])
    ok = res.returncode == 1 and "read-only" in res.stderr and "Traceback" not in res.stderr
    table(AREA, "state folder read-only at start", "exit 1, says read-only and what to check",
          f"exit {res.returncode}: {msg.split(': ', 1)[-1].replace(str(fs.path) + '/', '')[:150]}", ok)
    assert ok, res.stderr
