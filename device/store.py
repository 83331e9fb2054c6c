"""The durable result store: SQLite (WAL, synchronous=FULL) plus frame JPEGs in the state dir.

The screening loop lights the LEDs and publishes a result only after
:meth:`ResultStore.record` has returned, and ``record`` returns only after the
row is committed (WAL + ``synchronous=FULL`` fsyncs on commit) and the JPEG
it points to is on disk (temp file, fsync, rename, directory fsync). So a
power cut can lose a field that was being classified, never one that was
shown.

Images are the expendable part: a disk budget prunes the oldest JPEGs
first, a free-space reserve stops writing new ones, and the records (a few
hundred bytes each) are never pruned. Every storage failure is a
:class:`~device.errors.StoreError` naming the file and the fix; the loop
turns it into a fault and keeps classifying.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from device.errors import StoreError
from device.quality import Quality

log = logging.getLogger(__name__)

DB_NAME = "results.sqlite3"
IMAGES = "images"
SCHEMA_VERSION = 2
#: What an older database is brought up to, one step per version (each in one transaction).
MIGRATIONS = {
    # 1 -> 2: every result names the bundle (<name>-<sha8>) that produced it; older rows keep NULL ("unknown").
    2: ("ALTER TABLE fields ADD COLUMN bundle TEXT",),
}
UNKNOWN_BUNDLE = "unknown"
STATUSES = ("ok", "retake", "refer")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slides (
    id TEXT PRIMARY KEY,
    started REAL NOT NULL,
    ended REAL
);
CREATE TABLE IF NOT EXISTS fields (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    slide_id TEXT,
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'retake', 'refer')),
    label TEXT,
    is_all INTEGER NOT NULL,
    confidence REAL NOT NULL,
    scores TEXT NOT NULL,
    reason TEXT NOT NULL,
    quality TEXT NOT NULL,
    timings TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    distance REAL,
    p_all REAL,
    image TEXT,
    image_pruned INTEGER NOT NULL DEFAULT 0,
    bundle TEXT
);
CREATE INDEX IF NOT EXISTS fields_time ON fields (time);
CREATE INDEX IF NOT EXISTS fields_slide ON fields (slide_id, id);
CREATE INDEX IF NOT EXISTS fields_label ON fields (label, id);
CREATE INDEX IF NOT EXISTS fields_with_image ON fields (id) WHERE image IS NOT NULL;
"""


@dataclass(frozen=True)
class FieldResult:
    """One classified (or rejected) field, as recorded. ``id`` and ``image`` are set by the store."""

    time: float  # epoch seconds of the capture
    status: str  # "ok" | "retake" | "refer"
    label: str | None
    all: bool
    confidence: float
    scores: dict[str, float]
    reason: str
    quality: Quality
    timings: dict[str, float]  # ms per stage: capture, quality, preprocess, invoke, head, store
    model_sha256: str
    bundle: str | None = None  # <name>-<sha8> of the bundle that produced it; None: recorded before bundles were named
    source: str = "camera"  # "camera" | "replay" | "files" | "synthetic" | "upload"
    name: str = ""  # frame or file name
    slide_id: str | None = None
    distance: float | None = None
    p_all: float | None = None
    image: str | None = None  # JPEG path relative to the state dir; None when not kept or pruned
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what the page and ``classify --json`` show)."""
        d = dataclasses.asdict(self)
        d["quality"] = self.quality.to_dict()
        d["time_iso"] = iso(self.time)
        return d


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SlideRow:
    id: str
    started: float
    ended: float | None
    fields: int = 0
    all_fields: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["started_iso"] = iso(self.started)
        d["ended_iso"] = iso(self.ended) if self.ended is not None else None
        return d


@dataclass(frozen=True)
class StoreStats:
    fields: int
    slides: int
    db_bytes: int
    image_bytes: int
    image_count: int
    images_enabled: bool
    last_image_error: str = ""


@dataclass(frozen=True)
class Filters:
    """Query filters; every one is optional."""

    since: float | None = None
    until: float | None = None
    slide_id: str | None = None
    label: str | None = None
    status: str | None = None
    all: bool | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for col, op, val in (("time", ">=", self.since), ("time", "<", self.until), ("slide_id", "=", self.slide_id),
                             ("label", "=", self.label), ("status", "=", self.status), ("source", "=", self.source)):
            if val is not None:
                clauses.append(f"{col} {op} ?")
                args.append(val)
        if self.all is not None:
            clauses.append("is_all = ?")
            args.append(int(bool(self.all)))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


class ResultStore:
    """Thread-safe (one lock) store of field results, slides and frame JPEGs in ``state_dir``."""

    def __init__(self, state_dir: str | Path, *, image_budget_bytes: int = 2 << 30, reserve_bytes: int = 200 << 20,
                 jpeg_quality: int = 90, save_images: bool = True, busy_timeout_s: float = 5.0):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.images_dir = self.state_dir / IMAGES
        self.image_budget_bytes = int(image_budget_bytes)
        self.reserve_bytes = int(reserve_bytes)
        self.jpeg_quality = int(jpeg_quality)
        self.save_images = bool(save_images) and self.image_budget_bytes > 0
        self.last_image_error = ""
        self._image_error_kind = ""
        self._lock = threading.RLock()
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.images_dir}: cannot create the state folder ({exc.strerror}); "
                             "check [store] state_dir and its permissions") from exc
        try:
            if not self.path.exists():
                self._create()
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode}); put the state folder on a "
                                 "local file system (not NFS or a FAT stick)")
            self._db.execute("PRAGMA synchronous=FULL")
            self._open_schema()
        except StoreError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise self._error("open", exc) from exc
        self._image_bytes, self._image_count = self._clean_images()

    def _create(self) -> None:
        """A new database, made whole beside its final name and renamed into place: a power cut while a box
        starts for the first time leaves no database or a complete one, never a file without tables."""
        new = self.path.with_name(self.path.name + ".new")
        for p in (new, *(Path(str(q) + sfx) for q in (new, self.path) for sfx in ("-wal", "-shm"))):
            p.unlink(missing_ok=True)  # a half-made one, or journal files that belong to no database
        con = sqlite3.connect(new, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
            con.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        finally:
            con.close()  # the last connection checkpoints the WAL into the file
        fd = os.open(new, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(new, self.path)
        _fsync_dir(self.state_dir)

    def _open_schema(self) -> None:
        """Create a new database, or bring an older one up to :data:`SCHEMA_VERSION` (rows are kept)."""
        has_fields = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'fields'").fetchone() is not None
        if not has_fields:
            self._db.executescript(_SCHEMA)
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        version = int(row[0]) if row is not None else (SCHEMA_VERSION if not has_fields else 1)
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: database schema {version}, this software writes {SCHEMA_VERSION}; "
                             "update the device software, or move the file aside (results stay readable with "
                             "sqlite3) and restart")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql in MIGRATIONS[target]:
                    self._db.execute(sql)
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(target),))
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
            log.info("%s: database schema %d -> %d", self.path, target - 1, target)
        self._db.executescript(_SCHEMA)  # indexes (IF NOT EXISTS)
        if row is None:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    # -- errors -------------------------------------------------------------------------------------------

    def _error(self, what: str, exc: BaseException) -> StoreError:
        msg = str(exc)
        if "locked" in msg or "busy" in msg:
            fix = "another process holds the database; stop it (only one LeukoScreen may run)"
        elif ("readonly" in msg or "read-only" in msg or getattr(exc, "errno", None) == 30
              or self._read_only_fs()):
            fix = "the state folder is read-only; check the SD card (it may have failed) and the permissions"
        elif "full" in msg or getattr(exc, "errno", None) == 28:
            fix = "the disk is full; free space or lower [store] image_budget_mb"
        elif "not a database" in msg or "malformed" in msg:
            fix = "the database file is damaged; move it aside (keep it for recovery) and restart"
        else:
            fix = "check the disk and the state folder's permissions"
        return StoreError(f"{self.path}: cannot {what} ({type(exc).__name__}: {msg}); {fix}")

    def _read_only_fs(self) -> bool:
        """SQLite reports a read-only file system as "unable to open" or "disk I/O error"; ask the kernel."""
        try:
            return bool(os.statvfs(self.state_dir).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    # -- images --------------------------------------------------------------------------------------------

    def _clean_images(self) -> tuple[int, int]:
        """Sum the kept JPEGs; delete temp files and JPEGs no record points to (a crash between the two)."""
        with self._lock:
            try:
                referenced = {r[0] for r in self._db.execute("SELECT image FROM fields WHERE image IS NOT NULL")}
            except sqlite3.Error as exc:
                raise self._error("read", exc) from exc
            total = count = 0
            for dirpath, _dirs, files in os.walk(self.images_dir):
                for name in files:
                    p = Path(dirpath) / name
                    rel = p.relative_to(self.state_dir).as_posix()
                    if rel not in referenced:
                        try:
                            p.unlink()
                        except OSError as exc:
                            log.warning("cannot remove stray image %s: %s", p, exc)
                        continue
                    try:
                        total += p.stat().st_size
                        count += 1
                    except OSError:
                        pass
            return total, count

    def _image_failed(self, kind: str, msg: str) -> None:
        """Note why a frame image was not saved; warn once per kind of failure, not once per field."""
        if kind != self._image_error_kind:
            log.warning(msg)
        self._image_error_kind = kind
        self.last_image_error = msg

    def _write_image(self, jpeg: bytes, t: float) -> str | None:
        """Write one JPEG durably; returns its path relative to the state dir, or None if not kept."""
        if not self.save_images:
            return None
        try:
            free = shutil.disk_usage(self.state_dir).free
        except OSError:
            free = 0
        if free - len(jpeg) < self.reserve_bytes:
            self._image_failed("low-disk", f"{self.state_dir}: only {free >> 20} MB free (reserve "
                               f"{self.reserve_bytes >> 20} MB); frame images are no longer saved, records still are")
            return None
        self._prune(len(jpeg))
        if self._image_bytes + len(jpeg) > self.image_budget_bytes:
            return None  # one image larger than the whole budget
        day = time.strftime("%Y-%m-%d", time.gmtime(t))
        folder = self.images_dir / day
        name = f"{time.strftime('%H%M%S', time.gmtime(t))}-{int(t * 1000) % 1000:03d}-{secrets.token_hex(4)}.jpg"
        final = folder / name
        tmp = folder / (name + ".tmp")
        try:
            new_folder = not folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(jpeg)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(folder)
            if new_folder:
                _fsync_dir(self.images_dir)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            self._image_failed("write", f"{final}: cannot write the frame image ({exc.strerror}); records are "
                               "still saved; free disk space or check the SD card")
            return None
        if self.last_image_error:
            log.info("frame images are saved again")
        self.last_image_error = self._image_error_kind = ""
        self._image_bytes += len(jpeg)
        self._image_count += 1
        return final.relative_to(self.state_dir).as_posix()

    def _prune(self, incoming: int) -> None:
        """Delete the oldest JPEGs until ``incoming`` bytes fit the budget. Records stay; their image is NULL."""
        while self._image_bytes + incoming > self.image_budget_bytes and self._image_count > 0:
            rows = self._db.execute("SELECT id, image FROM fields WHERE image IS NOT NULL ORDER BY id LIMIT 32"
                                    ).fetchall()
            if not rows:
                self._image_bytes, self._image_count = 0, 0
                return
            excess = self._image_bytes + incoming - self.image_budget_bytes
            victims: list[tuple[int, Path, int]] = []
            for id_, rel in rows:  # just enough of the oldest to make room
                p = self.state_dir / rel
                try:
                    size = p.stat().st_size
                except OSError:
                    size = 0
                victims.append((id_, p, size))
                excess -= size
                if excess <= 0:
                    break
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("UPDATE fields SET image = NULL, image_pruned = 1 WHERE id = ?",
                                     [(v[0],) for v in victims])
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._error("prune images", exc) from exc
            for _id, p, size in victims:  # after the commit: a crash here leaves only strays, removed at next open
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("cannot delete pruned image %s: %s", p, exc)
                self._image_bytes = max(0, self._image_bytes - size)
                self._image_count = max(0, self._image_count - 1)
            log.debug("pruned %d oldest frame image(s) to stay within the %d MB budget", len(victims),
                     self.image_budget_bytes >> 20)

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- writing -------------------------------------------------------------------------------------------

    def record(self, result: FieldResult, image: bytes | np.ndarray | None = None) -> FieldResult:
        """Store ``result`` (and its frame) durably; returns it with ``id``, ``image`` and the store timing.

        ``image`` is JPEG bytes or an HxWx3 uint8 frame (encoded here). An image
        that cannot be written is dropped (see ``last_image_error``); a record
        that cannot be committed raises :class:`StoreError`.
        """
        if result.status not in STATUSES:
            raise ValueError(f"status {result.status!r} is not one of {STATUSES}")
        t0 = time.perf_counter()
        with self._lock:
            rel = None
            if image is not None and self.save_images:
                try:
                    jpeg = image if isinstance(image, bytes) else encode_jpeg(image, self.jpeg_quality)
                except (OSError, ValueError, TypeError) as exc:
                    self.last_image_error = f"cannot encode the frame as JPEG ({exc})"
                    jpeg = None
                if jpeg is not None:
                    try:
                        rel = self._write_image(jpeg, result.time)
                    except StoreError as exc:  # pruning failed: keep the record, skip the image
                        self.last_image_error = str(exc)
                        rel = None
            store_ms = (time.perf_counter() - t0) * 1000
            timings = {**result.timings, "store": round(store_ms, 3)}
            row = (result.time, result.slide_id, result.source, result.name, result.status, result.label,
                   int(bool(result.all)), float(result.confidence), json.dumps(result.scores), result.reason,
                   json.dumps(result.quality.to_dict()), json.dumps(timings), result.model_sha256,
                   result.distance, result.p_all, rel, result.bundle)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(
                    "INSERT INTO fields (time, slide_id, source, name, status, label, is_all, confidence, scores,"
                    " reason, quality, timings, model_sha256, distance, p_all, image, bundle)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                if rel is not None:  # never leave an image without its record
                    try:
                        p = self.state_dir / rel
                        size = p.stat().st_size
                        p.unlink()
                        self._image_count -= 1
                        self._image_bytes -= size
                    except OSError:
                        pass
                raise self._error("record the result", exc) from exc
            return dataclasses.replace(result, id=cur.lastrowid, image=rel, timings=timings)

    def start_slide(self, slide_id: str | None = None, started: float | None = None) -> str:
        started = time.time() if started is None else started
        with self._lock:
            base = slide_id or "S" + time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
            sid, n = base, 1
            try:
                while self._db.execute("SELECT 1 FROM slides WHERE id = ?", (sid,)).fetchone():
                    n += 1
                    sid = f"{base}-{n}"
                self._db.execute("INSERT INTO slides (id, started) VALUES (?, ?)", (sid, started))
            except sqlite3.Error as exc:
                raise self._error("start a slide", exc) from exc
            return sid

    def end_slide(self, slide_id: str, ended: float | None = None) -> None:
        with self._lock:
            try:
                self._db.execute("UPDATE slides SET ended = ? WHERE id = ? AND ended IS NULL",
                                 (time.time() if ended is None else ended, slide_id))
            except sqlite3.Error as exc:
                raise self._error("end the slide", exc) from exc

    def close_open_slides(self) -> list[str]:
        """End slides left open by a crash or power cut (at their last field's time)."""
        with self._lock:
            try:
                ids = [r[0] for r in self._db.execute("SELECT id FROM slides WHERE ended IS NULL")]
                for sid in ids:
                    last = self._db.execute("SELECT max(time) FROM fields WHERE slide_id = ?", (sid,)).fetchone()[0]
                    started = self._db.execute("SELECT started FROM slides WHERE id = ?", (sid,)).fetchone()[0]
                    self._db.execute("UPDATE slides SET ended = ? WHERE id = ?", (last or started, sid))
            except sqlite3.Error as exc:
                raise self._error("close open slides", exc) from exc
            return ids

    # -- reading -------------------------------------------------------------------------------------------

    @staticmethod
    def _from_row(r: sqlite3.Row | tuple) -> FieldResult:
        (id_, t, slide_id, source, name, status, label, is_all, confidence, scores, reason, quality, timings,
         sha, distance, p_all, image, bundle) = r
        return FieldResult(time=t, status=status, label=label, all=bool(is_all), confidence=confidence,
                           scores=json.loads(scores), reason=reason, quality=Quality.from_dict(json.loads(quality)),
                           timings=json.loads(timings), model_sha256=sha, bundle=bundle, source=source, name=name,
                           slide_id=slide_id, distance=distance, p_all=p_all, image=image, id=id_)

    _COLS = ("id, time, slide_id, source, name, status, label, is_all, confidence, scores, reason, quality, timings,"
             " model_sha256, distance, p_all, image, bundle")

    def _read(self, sql: str, args: Any = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise self._error("read", exc) from exc

    def get(self, field_id: int) -> FieldResult | None:
        rows = self._read(f"SELECT {self._COLS} FROM fields WHERE id = ?", (int(field_id),))
        return self._from_row(rows[0]) if rows else None

    def query(self, filters: Filters = Filters(), *, limit: int = 50, offset: int = 0,
              newest_first: bool = True) -> list[FieldResult]:
        """One page of results matching ``filters``, newest first by default."""
        where, args = filters.where()
        order = "DESC" if newest_first else "ASC"
        rows = self._read(f"SELECT {self._COLS} FROM fields{where} ORDER BY id {order} LIMIT ? OFFSET ?",
                          [*args, max(0, int(limit)), max(0, int(offset))])
        return [self._from_row(r) for r in rows]

    def count(self, filters: Filters = Filters()) -> int:
        where, args = filters.where()
        return int(self._read(f"SELECT count(*) FROM fields{where}", args)[0][0])

    def iter_results(self, filters: Filters = Filters(), *, batch: int = 500) -> Iterator[FieldResult]:
        """All matching results, oldest first, read in batches (for exports)."""
        last = 0
        where, args = filters.where()
        where = (where + " AND" if where else " WHERE") + " id > ?"
        while True:
            rows = self._read(f"SELECT {self._COLS} FROM fields{where} ORDER BY id LIMIT ?", [*args, last, batch])
            if not rows:
                return
            for r in rows:
                yield self._from_row(r)
            last = rows[-1][0]

    def slide_fields(self, slide_id: str) -> list[FieldResult]:
        return list(self.iter_results(Filters(slide_id=slide_id)))

    def slides(self, *, limit: int = 50, offset: int = 0) -> list[SlideRow]:
        rows = self._read("SELECT s.id, s.started, s.ended, count(f.id), coalesce(sum(f.status = 'ok' AND f.is_all), 0)"
                          " FROM slides s LEFT JOIN fields f ON f.slide_id = s.id GROUP BY s.id"
                          " ORDER BY s.started DESC, s.id DESC LIMIT ? OFFSET ?", (int(limit), int(offset)))
        return [SlideRow(*r) for r in rows]

    def slide(self, slide_id: str) -> SlideRow | None:
        rows = self._read("SELECT s.id, s.started, s.ended, count(f.id), coalesce(sum(f.status = 'ok' AND f.is_all), 0)"
                          " FROM slides s LEFT JOIN fields f ON f.slide_id = s.id WHERE s.id = ? GROUP BY s.id",
                          (slide_id,))
        return SlideRow(*rows[0]) if rows else None

    def image_file(self, result: FieldResult | int) -> Path | None:
        """Absolute path of a result's JPEG if it still exists (and lies inside the images folder)."""
        r = self.get(result) if isinstance(result, int) else result
        if r is None or not r.image:
            return None
        p = (self.state_dir / r.image).resolve()
        if self.images_dir.resolve() not in p.parents or not p.is_file():
            return None
        return p

    def csv_rows(self, filters: Filters = Filters(), classes: tuple[str, ...] = ()) -> Iterator[str]:
        """The matching results as CSV text lines (header first), oldest first, for streaming exports.

        Text cells that a spreadsheet would run as a formula are prefixed with ``'``.
        """
        header = ["id", "time", "slide_id", "source", "name", "status", "label", "all", "confidence", "reason",
                  *[f"p_{c}" for c in classes], "distance", "p_all", "sharpness", "brightness", "clipped",
                  "stained", "capture_ms", "quality_ms", "preprocess_ms", "invoke_ms", "head_ms", "store_ms",
                  "model_sha256", "bundle", "image"]
        yield _csv_line(header)
        for r in self.iter_results(filters):
            q = r.quality
            t = r.timings
            yield _csv_line([r.id, iso(r.time), r.slide_id or "", r.source, r.name, r.status, r.label or "",
                             int(r.all), f"{r.confidence:.4f}", r.reason,
                             *[f"{r.scores.get(c, 0.0):.4f}" for c in classes],
                             "" if r.distance is None else f"{r.distance:.3f}",
                             "" if r.p_all is None else f"{r.p_all:.4f}", f"{q.sharpness:.2f}",
                             f"{q.brightness:.2f}", f"{q.clipped:.4f}", f"{q.stained:.4f}",
                             *[f"{t[k]:.2f}" if k in t else "" for k in
                               ("capture", "quality", "preprocess", "invoke", "head", "store")],
                             r.model_sha256, r.bundle or UNKNOWN_BUNDLE, r.image or ""])

    def stats(self) -> StoreStats:
        with self._lock:
            fields = int(self._read("SELECT count(*) FROM fields")[0][0])
            slides = int(self._read("SELECT count(*) FROM slides")[0][0])
            db_bytes = 0
            for suffix in ("", "-wal", "-shm"):
                try:
                    db_bytes += os.stat(str(self.path) + suffix).st_size
                except OSError:
                    pass
            return StoreStats(fields, slides, db_bytes, self._image_bytes, self._image_count, self.save_images,
                              self.last_image_error)

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                log.warning("closing %s: %s", self.path, exc)


def _csv_line(cells: list[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_safe_cell(c) for c in cells])
    return buf.getvalue()


def _safe_cell(c: Any) -> Any:
    if isinstance(c, str) and c[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + c
    return c


def open_store(state_dir: Path, cfg: Any) -> ResultStore:
    """A store from ``[store]`` config values."""
    return ResultStore(state_dir, image_budget_bytes=int(cfg.image_budget_mb) << 20,
                       reserve_bytes=int(cfg.reserve_mb) << 20, jpeg_quality=cfg.jpeg_quality,
                       save_images=cfg.save_images)
