"""Area 4: power loss. ``python -m device run`` (replay, tiny bundle, continuous, images on with a small budget
so pruning runs too) is killed with SIGKILL at random moments (start-up included), again and again on the
same state folder. After every kill the database must pass ``PRAGMA integrity_check``, every result the
process had shown must be in it (the process logs ``field <id> ...`` only after the durable commit and
the LED update, so the log is exactly what the technician could have seen), with its image file when
the record names one, and the next start must tidy up (open slides closed, stray temp images removed).

8 kills in every suite; 50 with ``LEUKO_SOAK=full`` (``make soak``). The seed is printed in the table.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

import pytest

from device.store import ResultStore
from tests.reliability.conftest import DeviceProc, full_only, write_config

AREA = "4 power loss"
MAX_DELAY_S = 3.0


def _check(state: Path, shown: set[int]) -> tuple[str, set[int], list[str]]:
    """(integrity_check, ids shown but not stored, images of shown results that are missing)."""
    db_path = state / "results.sqlite3"
    if not db_path.exists():
        return "ok", set(shown), []
    db = sqlite3.connect(db_path)
    try:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        stored = {r[0] for r in db.execute("SELECT id FROM fields")}
        missing: list[str] = []
        ids = sorted(shown)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for (image,) in db.execute(f"SELECT image FROM fields WHERE id IN ({marks}) AND image IS NOT NULL",
                                       chunk):
                if not (state / image).is_file():
                    missing.append(image)
    finally:
        db.close()
    return integrity, shown - stored, missing


def _kill_cycles(kills: int, tmp_path: Path, seed: int, table, case: str) -> None:
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "config.toml", state, store={"state_dir": str(state), "reserve_mb": 0,
                                                               "image_budget_mb": 1, "save_images": True})
    rng = random.Random(seed)
    shown_all: set[int] = set()
    problems: list[str] = []
    before_first_result = 0
    t0 = time.monotonic()
    for i in range(kills):
        proc = DeviceProc(cfg)
        # half the kills in the first 0.8 s (imports, model check, schema, token, first fields), half later
        time.sleep(rng.uniform(0.02, 0.8) if rng.random() < 0.5 else rng.uniform(0.8, MAX_DELAY_S))
        code = proc.kill()
        shown = set(proc.shown_ids())
        if not shown:
            before_first_result += 1
        if code != -9 and code != 137:
            problems.append(f"kill {i}: exit {code} before the kill: {proc.tail(3)}")
        shown_all |= shown
        integrity, lost, missing = _check(state, shown_all)
        if integrity != "ok" or lost or missing:
            problems.append(f"kill {i}: integrity {integrity}, lost {sorted(lost)[:10]}, missing images {missing[:3]}")
            break
    # the next start tidies up after the last crash
    tmp_names = [p for p in (state / "images").rglob("*.tmp")] if (state / "images").is_dir() else []
    store = ResultStore(state)
    try:
        closed = store.close_open_slides()
        count = store.count()
        strays_left = [p for p in (state / "images").rglob("*.tmp")]
        integrity = store.integrity_check()
    finally:
        store.close()
    elapsed = time.monotonic() - t0
    db_kb = sum(os.path.getsize(p) for p in state.glob("results.sqlite3*")) >> 10
    ok = not problems and integrity == "ok" and count >= len(shown_all) and not strays_left
    table(AREA, case, "after every kill: integrity ok, every shown result stored (with its image)",
          f"{kills} kills, {len(shown_all)} shown results, 0 lost" if ok else "; ".join(problems)[:200], ok,
          f"seed {seed}; {before_first_result} kills before the first result; {count} records; "
          f"{len(closed)} open slide(s) closed at restart; {len(tmp_names)} temp image(s) removed; "
          f"db {db_kb} KB; {elapsed:.0f} s")
    assert ok, problems


def test_kill_9_at_random_moments_loses_no_shown_result(tmp_path: Path, table) -> None:
    _kill_cycles(8, tmp_path, seed=int(os.environ.get("LEUKO_KILL_SEED", "7")), table=table,
                 case="kill -9 at random moments (reduced: 8)")


@pytest.mark.slow
@full_only("50 kills")
def test_kill_9_fifty_times_loses_no_shown_result(tmp_path: Path, table) -> None:
    _kill_cycles(50, tmp_path, seed=int(os.environ.get("LEUKO_KILL_SEED", "50")), table=table,
                 case="kill -9 at random moments (full: 50)")
