"""The result store: durable records, JPEGs written atomically, a disk budget that prunes images and
never records, queries, slides, CSV, and storage failures as StoreError."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import threading
import time
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.errors import StoreError
from device.quality import assess
from device.sources import synthetic_field
from device.store import ResultStore
from device.store.records import FieldResult, Filters

SHA = "ab" * 32


def result(i: int = 0, *, status: str = "ok", label: str | None = "Pro-B", all_: bool = True,
           slide: str | None = None, t: float | None = None, name: str | None = None) -> FieldResult:
    frame = synthetic_field(i)
    return FieldResult(time=t if t is not None else 1_700_000_000.0 + i, status=status, label=label, all=all_,
                       confidence=0.9, scores={"Benign": 0.1, "Pro-B": 0.9}, reason="" if status == "ok" else "why",
                       quality=assess(frame), timings={"capture": 1.0, "invoke": 20.0}, model_sha256=SHA,
                       source="replay", name=name or f"f{i}.jpg", slide_id=slide, distance=1.1, p_all=0.9)


@pytest.fixture
def store(tmp_path: Path):
    s = ResultStore(tmp_path / "state", reserve_bytes=0, busy_timeout_s=0.2)
    yield s
    s.close()


def test_record_is_committed_before_it_returns_and_round_trips(store: ResultStore) -> None:
    r = store.record(result(1), synthetic_field(1))
    assert r.id == 1 and r.image is not None and "store" in r.timings
    # another connection (as after a power cut and restart) sees it at once
    with sqlite3.connect(store.path) as other:
        assert other.execute("SELECT count(*) FROM fields").fetchone()[0] == 1
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._db.execute("PRAGMA cache_size").fetchone()[0] == -512  # KiB: a bounded page cache
    got = store.get(r.id)
    assert got == r
    img = store.image_file(r)
    assert img is not None and Image.open(img).size == (224, 224)
    assert not list(store.images_dir.rglob("*.tmp"))


def test_jpeg_bytes_are_stored_as_given(store: ResultStore) -> None:
    buf = io.BytesIO()
    Image.fromarray(synthetic_field(2)).save(buf, "JPEG")
    r = store.record(result(2), buf.getvalue())
    assert store.image_file(r).read_bytes() == buf.getvalue()


def test_budget_prunes_oldest_images_never_records(tmp_path: Path) -> None:
    one = len(_jpeg(0))
    s = ResultStore(tmp_path / "s", image_budget_bytes=int(one * 3.5), reserve_bytes=0)
    ids = [s.record(result(i), synthetic_field(i)).id for i in range(10)]
    assert s.count() == 10  # every record kept
    kept = [s.get(i).image is not None for i in ids]
    assert kept[-3:] == [True] * 3 and not any(kept[:6])  # the oldest images went first
    assert sum(p.stat().st_size for p in s.images_dir.rglob("*.jpg")) <= one * 3.5 * 1.2
    assert s.stats().image_count == sum(kept) == len(list(s.images_dir.rglob("*.jpg")))
    s.close()


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_field(i)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_low_disk_stops_images_before_records(tmp_path: Path) -> None:
    s = ResultStore(tmp_path / "s", reserve_bytes=1 << 60)  # "less free space than the reserve"
    r = s.record(result(1), synthetic_field(1))
    assert r.id == 1 and r.image is None and "no longer saved" in s.last_image_error
    s.close()


def test_an_image_that_cannot_be_written_still_leaves_the_record(store: ResultStore) -> None:
    t = 1_700_000_000.0
    day = time.strftime("%Y-%m-%d", time.gmtime(t))
    (store.images_dir / day).write_text("a file where the day's folder should be")
    r = store.record(result(0, t=t), synthetic_field(0))
    assert r.id is not None and r.image is None and "cannot write" in store.last_image_error


def test_locked_database_is_a_store_error_naming_the_fix(store: ResultStore) -> None:
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="another process holds the database"):
            store.record(result(1), synthetic_field(1))
        assert not list(store.images_dir.rglob("*.jpg"))  # no image without its record
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.record(result(1)).id is not None  # and it recovers


def test_read_only_database_is_a_store_error(store: ResultStore) -> None:
    store._db.execute("PRAGMA query_only = 1")  # what a remounted-read-only SD card looks like to SQLite
    with pytest.raises(StoreError, match="read-only|readonly"):
        store.record(result(1))
    store._db.execute("PRAGMA query_only = 0")


def test_unusable_state_dir_and_damaged_database(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the state folder"):
        ResultStore(blocker / "state")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="damaged"):
        ResultStore(bad)


def test_stray_images_from_a_crash_are_removed_at_open(tmp_path: Path) -> None:
    s = ResultStore(tmp_path / "s", reserve_bytes=0)
    r = s.record(result(1), synthetic_field(1))
    s.close()
    (tmp_path / "s" / "images" / "stray.jpg").write_bytes(b"x")
    (tmp_path / "s" / "images" / "half.jpg.tmp").write_bytes(b"x")
    s = ResultStore(tmp_path / "s", reserve_bytes=0)
    files = sorted(p.name for p in s.images_dir.rglob("*") if p.is_file())
    assert files == [Path(r.image).name]
    assert s.stats().image_count == 1
    s.close()


def test_queries_filter_and_page(store: ResultStore) -> None:
    a = store.start_slide(started=1_700_000_000.0)
    for i in range(6):
        store.record(result(i, slide=a, label="Pro-B" if i % 2 else "Benign", all_=bool(i % 2)))
    store.record(result(6, status="retake", label=None, all_=False))
    assert store.count() == 7
    assert [r.id for r in store.query(limit=3)] == [7, 6, 5]
    assert [r.id for r in store.query(limit=3, offset=3)] == [4, 3, 2]
    assert [r.id for r in store.query(Filters(label="Benign"), newest_first=False)] == [1, 3, 5]
    assert store.count(Filters(all=True)) == 3
    assert store.count(Filters(status="retake")) == 1
    assert store.count(Filters(slide_id=a)) == 6
    assert store.count(Filters(since=1_700_000_004.0)) == 3
    assert store.count(Filters(since=1_700_000_001.0, until=1_700_000_003.0)) == 2
    assert [r.id for r in store.iter_results(batch=2)] == list(range(1, 8))


def test_slides(store: ResultStore) -> None:
    a = store.start_slide(started=1_700_000_000.0)
    b = store.start_slide(started=1_700_000_000.0)  # same second: still a unique id
    assert a != b and b.startswith(a)
    store.record(result(1, slide=a))
    store.record(result(2, slide=a, label="Benign", all_=False))
    store.end_slide(a, 1_700_000_100.0)
    rows = {s.id: s for s in store.slides()}
    assert rows[a].fields == 2 and rows[a].all_fields == 1 and rows[a].ended == 1_700_000_100.0
    assert rows[b].ended is None
    assert store.slide(a).fields == 2 and store.slide("nope") is None
    assert [r.id for r in store.slide_fields(a)] == [1, 2]
    assert store.close_open_slides() == [b]
    assert store.slide(b).ended == store.slide(b).started


def test_csv_export_is_spreadsheet_safe(store: ResultStore) -> None:
    store.record(result(1, name="=HYPERLINK(\"x\")"))
    lines = list(store.csv_rows(classes=("Benign", "Pro-B")))
    assert lines[0].startswith("id,time,slide_id,source,name,status,label,all,confidence,reason,p_Benign,p_Pro-B")
    assert "'=HYPERLINK" in lines[1] and lines[1].startswith("1,2023-11-14T22:13:21.000Z")
    assert len(lines) == 2


def test_image_paths_cannot_escape_the_images_folder(store: ResultStore) -> None:
    r = store.record(result(1))
    import dataclasses

    assert store.image_file(dataclasses.replace(r, image="../results.sqlite3")) is None
    assert store.image_file(r) is None  # recorded without an image


def test_integrity_and_stats(store: ResultStore) -> None:
    store.record(result(1), synthetic_field(1))
    st = store.stats()
    assert store.integrity_check() == "ok"
    assert st.fields == 1 and st.db_bytes > 0 and st.image_bytes > 0 and st.image_count == 1


def test_stats_counts_stay_exact_as_rows_arrive_from_this_and_other_connections(tmp_path: Path) -> None:
    a = ResultStore(tmp_path / "state", reserve_bytes=0)
    b = ResultStore(tmp_path / "state", reserve_bytes=0)  # another writer on the same database
    assert (a.stats().fields, a.stats().slides) == (0, 0)
    sid = a.start_slide()
    a.record_batch([(result(i, slide=sid), None) for i in range(3)])
    assert (a.stats().fields, a.stats().slides) == (3, 1)
    b.record(result(9))
    b.start_slide()
    a.record(result(10))
    truth = a._read("SELECT (SELECT count(*) FROM fields), (SELECT count(*) FROM slides)")[0]
    assert (a.stats().fields, a.stats().slides) == truth == (5, 2)
    assert b.stats().fields == 5  # b counts from its own start, and sees a's rows too
    a.close()
    b.close()
    c = ResultStore(tmp_path / "state", reserve_bytes=0)
    assert c.stats().fields == 5  # reopened: counted afresh
    c.close()


def test_bad_status_is_refused(store: ResultStore) -> None:
    with pytest.raises(ValueError):
        store.record(result(1, status="maybe"))


def test_frozen_result_to_dict_is_json_ready(store: ResultStore) -> None:
    import json

    from device.web.presenters import result_json

    r = store.record(result(1), np.zeros((64, 64, 3), np.uint8))
    d = json.loads(json.dumps(result_json(r)))
    assert d["id"] == 1 and d["quality"]["ok"] is True and d["time_iso"].endswith("Z")


# the schema before results named their bundle (version 1), as an old box's database has it
_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE slides (id TEXT PRIMARY KEY, started REAL NOT NULL, ended REAL);
CREATE TABLE fields (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, slide_id TEXT, source TEXT NOT NULL, name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'retake', 'refer')), label TEXT, is_all INTEGER NOT NULL,
    confidence REAL NOT NULL, scores TEXT NOT NULL, reason TEXT NOT NULL, quality TEXT NOT NULL, timings TEXT NOT NULL,
    model_sha256 TEXT NOT NULL, distance REAL, p_all REAL, image TEXT, image_pruned INTEGER NOT NULL DEFAULT 0
);
INSERT INTO meta VALUES ('schema', '1');
"""


def test_an_old_database_opens_its_rows_say_unknown_bundle_and_new_rows_name_theirs(tmp_path: Path) -> None:
    import json

    db = sqlite3.connect(tmp_path / "results.sqlite3")
    db.executescript(_SCHEMA_V1)
    q = result(0).quality.to_dict()
    db.execute("INSERT INTO fields (time, source, name, status, label, is_all, confidence, scores, reason, quality,"
               " timings, model_sha256) VALUES (1.0, 'camera', 'old.jpg', 'ok', 'Pro-B', 1, 0.9, '{}', '', ?, '{}',"
               " 'abc')", (json.dumps(q),))
    db.commit()
    db.close()
    s = ResultStore(tmp_path, save_images=False)
    try:
        old = s.query()[0]
        assert old.name == "old.jpg" and old.bundle is None
        new = s.record(dataclasses_replace(result(1), bundle="tiny-1a2b3c4d"))
        assert s.get(new.id).bundle == "tiny-1a2b3c4d"
        rows = list(csv.DictReader(io.StringIO("".join(s.csv_rows()))))
        assert [r["bundle"] for r in rows] == ["unknown", "tiny-1a2b3c4d"]
        assert s.integrity_check() == "ok"
    finally:
        s.close()
    db = sqlite3.connect(tmp_path / "results.sqlite3")
    assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == "2"
    db.close()
    ResultStore(tmp_path, save_images=False).close()  # opening again is a no-op


def test_a_database_from_newer_software_is_refused_untouched(tmp_path: Path) -> None:
    ResultStore(tmp_path, save_images=False).close()
    db = sqlite3.connect(tmp_path / "results.sqlite3")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema 99.*update the device software"):
        ResultStore(tmp_path, save_images=False)


def test_a_new_database_appears_whole_and_a_half_made_one_is_discarded(tmp_path: Path) -> None:
    (tmp_path / "results.sqlite3.new").write_bytes(b"half a database, cut by a power failure")
    (tmp_path / "results.sqlite3-wal").write_bytes(b"a journal of no database")
    s = ResultStore(tmp_path, save_images=False)
    try:
        assert s.count() == 0 and s.integrity_check() == "ok"
    finally:
        s.close()
    assert not (tmp_path / "results.sqlite3.new").exists()
    db = sqlite3.connect(tmp_path / "results.sqlite3")
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {"meta", "slides",
                                                                                                  "fields"}
    db.close()


def test_a_batch_is_one_commit_and_one_fsync_of_its_folder(store: ResultStore, monkeypatch) -> None:
    store.record(result(0), synthetic_field(0))  # the day's folder exists: a batch writes into it
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    out = store.record_batch([(result(i), synthetic_field(i)) for i in range(1, 4)])
    store._db.set_trace_callback(None)
    assert [r.id for r in out] == [2, 3, 4] and all(r.image and store.image_file(r) for r in out)
    assert statements.count("COMMIT") == 1  # one transaction for the three rows
    assert len(fsyncs) == 3 + 1  # each JPEG, then their folder once (SQLite's own fsyncs are not os.fsync)
    assert [store.get(r.id) for r in out] == out


def test_a_batch_whose_commit_fails_is_committed_one_by_one(store: ResultStore) -> None:
    with sqlite3.connect(store.path) as other:  # a row the database refuses (as a damaged page would)
        other.execute("CREATE TRIGGER poison BEFORE INSERT ON fields WHEN NEW.name = 'poison.jpg' "
                      "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    items = [(result(1), synthetic_field(1)), (result(2, name="poison.jpg"), synthetic_field(2)),
             (result(3), synthetic_field(3))]
    first, bad, last = store.record_batch(items)
    assert isinstance(bad, StoreError) and "refused" in str(bad)
    assert first.id is not None and last.id is not None and store.count() == 2  # the others are kept
    kept = sorted(p.name for p in store.images_dir.rglob("*.jpg"))
    assert kept == sorted(Path(r.image).name for r in (first, last))  # no image without its record
    with pytest.raises(StoreError, match="refused"):
        store.record(result(4, name="poison.jpg"), synthetic_field(4))


def test_frames_are_stored_as_jpeg_with_pillow_where_simplejpeg_is_missing(store: ResultStore, monkeypatch) -> None:
    from device.store import images

    frame = synthetic_field(5)
    fast = images.encode_jpeg(frame)
    monkeypatch.setattr(images, "_simplejpeg", lambda: None)
    slow = images.encode_jpeg(frame)
    for data in (fast, slow):
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.size == (224, 224)
        # the same picture at quality 90 (4:2:0 chroma) from either encoder
        assert np.abs(np.asarray(img, np.int16) - frame.astype(np.int16)).mean() < 4.0
    r = store.record(result(5), frame)
    assert Image.open(store.image_file(r)).size == (224, 224)


def test_a_locked_database_fails_the_whole_batch_at_once(store: ResultStore) -> None:
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        out = store.record_batch([(result(i), synthetic_field(i)) for i in range(3)])
        waited = time.monotonic() - t0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert all(isinstance(o, StoreError) and "another process holds the database" in str(o) for o in out)
    assert waited < 3 * 0.2  # one busy time-out (0.2 s here), not one per result
    assert not list(store.images_dir.rglob("*.jpg"))  # no image without its record


def test_the_page_reads_while_a_commit_waits_for_the_database(tmp_path: Path) -> None:
    s = ResultStore(tmp_path / "s", reserve_bytes=0, busy_timeout_s=2.0)
    first = s.record(result(0), synthetic_field(0))
    other = sqlite3.connect(s.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process: the commit below waits up to its 2 s busy time-out
    outcome: list = []
    writer = threading.Thread(target=lambda: outcome.extend(s.record_batch([(result(1), synthetic_field(1))])))
    writer.start()
    try:
        deadline = time.monotonic() + 5
        while len(list(s.images_dir.rglob("*.jpg"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # its JPEG is written: the writer holds the write lock and goes on to the commit
        time.sleep(0.05)  # ... where it waits for the database
        t0 = time.monotonic()
        seen = (s.count(), s.stats().fields, s.get(first.id))
        waited = time.monotonic() - t0
    finally:
        other.execute("ROLLBACK")
        other.close()
        writer.join(10)
    assert seen == (1, 1, first) and waited < 0.5  # the committed row, read without waiting for the writer
    assert outcome and outcome[0].id == 2  # and the commit goes through once the database is free
    s.close()


def test_the_encoder_in_use_is_named(monkeypatch) -> None:
    from device.store import images

    assert images.jpeg_encoder().startswith("simplejpeg ")
    monkeypatch.setattr(images, "_simplejpeg", lambda: None)
    assert images.jpeg_encoder().startswith("Pillow ") and "install simplejpeg" in images.jpeg_encoder()
