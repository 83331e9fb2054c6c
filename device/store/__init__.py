"""The durable result store: SQLite (WAL, synchronous=FULL) plus frame JPEGs in the state dir.

The screening loop lights the LEDs and publishes a result only after
:meth:`ResultStore.record` has returned, and ``record`` returns only after the
row is committed (WAL + ``synchronous=FULL`` fsyncs on commit) and the JPEG
it points to is on disk (temp file, fsync, rename, directory fsync). So a
power cut can lose a field that was being classified, never one that was
shown.

Images are the expendable part (:mod:`device.store.images`): a disk budget
prunes the oldest JPEGs first, a free-space reserve stops writing new ones,
and the records (a few hundred bytes each) are never pruned. Every storage
failure is a :class:`~device.errors.StoreError` naming the file and the fix
(:mod:`device.store.failures`); the loop turns it into a fault and keeps
classifying.

The parts: :mod:`~device.store.records` (what is kept and how it maps to rows),
:mod:`~device.store.schema` (the file, its schema and migrations),
:mod:`~device.store.images`, :mod:`~device.store.export` (CSV) and this
module's :class:`ResultStore`, which holds the connections (one writing, one reading) and their locks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device.config import StoreConfig
from device.errors import StoreError
from device.status import STATUSES
from device.store.export import csv_lines
from device.store.failures import store_error
from device.store.images import ImageStore
from device.store.records import (
    COLUMNS,
    INSERT,
    NO_FILTERS,
    SLIDE_ROWS,
    FieldResult,
    Filters,
    SlideRow,
    StoreStats,
    from_row,
    to_row,
)
from device.store.schema import DB_NAME, connect, connect_reader, rollback

log = logging.getLogger(__name__)


class ResultStore:
    """Thread-safe store of field results, slides and frame JPEGs in ``state_dir``.

    Two connections, each with its lock: writes (the recorder's commits, slides, pruning) on one, reads (the
    page, exports, counts) on the other, so the page never waits for a commit, which on an SD card or behind a
    database locked by another process can take seconds.
    """

    def __init__(self, state_dir: str | Path, *, image_budget_bytes: int = 2 << 30, reserve_bytes: int = 200 << 20,
                 jpeg_quality: int = 90, save_images: bool = True, busy_timeout_s: float = 5.0):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.images = ImageStore(self.state_dir, budget_bytes=image_budget_bytes, reserve_bytes=reserve_bytes,
                                 jpeg_quality=jpeg_quality, enabled=save_images)
        self.images_dir = self.images.folder
        self._lock = threading.RLock()  # the writing connection, and the image files
        self._rlock = threading.Lock()  # the reading connection
        # Row counts for ``stats``, kept up to date by counting only the rows added since (rows are only ever
        # appended): ``count(*)`` walks a whole index, ~5 ms a million fields on a fast x86 core, and the page
        # asks for it every few seconds for the life of the box. table -> (highest rowid counted, rows).
        self._counted = {"fields": (0, 0), "slides": (0, 0)}
        self._counted_lock = threading.Lock()  # one count updated at a time (the page's threads ask at once)
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.images_dir}: cannot create the state folder ({exc.strerror}); "
                             "check [store] state_dir and its permissions") from exc
        try:
            self._db = connect(self.path, busy_timeout_s)
        except StoreError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise store_error(self.path, "open", exc) from exc
        try:
            self._rdb = connect_reader(self.path, busy_timeout_s)
        except (sqlite3.Error, OSError) as exc:
            self._db.close()
            raise store_error(self.path, "open", exc) from exc
        referenced = {r[0] for r in self._read("SELECT image FROM fields WHERE image IS NOT NULL")}
        self.images.scan(referenced)

    @property
    def last_image_error(self) -> str:
        """Why the last frame image was not kept ("" once one is again)."""
        return self.images.last_error

    # -- writing -------------------------------------------------------------------------------------------

    def record(self, result: FieldResult, image: bytes | np.ndarray | None = None) -> FieldResult:
        """Store ``result`` (and its frame) durably; returns it with ``id``, ``image`` and the store timing.

        ``image`` is JPEG bytes or an HxWx3 uint8 frame (encoded here). An image
        that cannot be written is dropped (see ``last_image_error``); a record
        that cannot be committed raises :class:`StoreError`.
        """
        out = self.record_batch([(result, image)])[0]
        if isinstance(out, StoreError):
            raise out
        return out

    def record_batch(self, items: Sequence[tuple[FieldResult, bytes | np.ndarray | None]]
                     ) -> list[FieldResult | StoreError]:
        """Store several results durably with one database commit; per item, the recorded result or why not.

        The loop's recorder takes every result waiting for it at once: each JPEG is written and fsynced, each
        folder written to is fsynced once, then one transaction (one fsync of the WAL) inserts every row. On a
        slow SD card fsyncs, not bytes, are what a record costs. If the database refuses a row (a constraint),
        each result is tried again in a transaction of its own, so one bad row cannot take the others with it;
        when the store itself fails (locked, read-only, full), every result of the batch fails with it.
        """
        for result, _image in items:
            if result.status not in STATUSES:
                raise ValueError(f"status {result.status!r} is not one of {STATUSES}")
        with self._lock:
            saved: list[tuple[FieldResult, str | None, dict]] = []
            folders: list[Path] = []
            for result, image in items:
                t0 = time.perf_counter()
                rel = self.images.save(self._db, image, result.time, folders) if image is not None else None
                saved.append((result, rel, {**result.timings, "store": round((time.perf_counter() - t0) * 1000, 3)}))
            self.images.sync(folders)  # before the rows that point at the files are committed
            try:
                return list(self._insert(saved))
            except StoreError as exc:
                if len(saved) == 1 or not isinstance(exc.__cause__, sqlite3.IntegrityError):
                    # locked, read-only, full, I/O: the store's state, not a row's; trying each row again would
                    # only wait out the busy timeout once more per row
                    self._discard(saved)
                    return [exc] * len(saved)
                log.warning("committing %d results at once failed (%s); committing them one by one", len(saved), exc)
            out: list[FieldResult | StoreError] = []
            for one in saved:
                try:
                    out += self._insert([one])
                except StoreError as exc:
                    self._discard([one])
                    out.append(exc)
            return out

    def _insert(self, saved: list[tuple[FieldResult, str | None, dict]]) -> list[FieldResult]:
        """One transaction inserting ``saved`` (result, image path, timings); :class:`StoreError` if it fails."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            ids = [self._db.execute(INSERT, to_row(r, timings, rel)).lastrowid for r, rel, timings in saved]
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(self._db)
            raise store_error(self.path, "record the result", exc) from exc
        return [dataclasses.replace(r, id=id_, image=rel, timings=timings)
                for (r, rel, timings), id_ in zip(saved, ids, strict=True)]

    def _discard(self, saved: list[tuple[FieldResult, str | None, dict]]) -> None:
        """Remove the images of results that were not committed (never an image without its record)."""
        for _r, rel, _t in saved:
            if rel is not None:
                self.images.discard(rel)

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
                raise store_error(self.path, "start a slide", exc) from exc
            return sid

    def end_slide(self, slide_id: str, ended: float | None = None) -> None:
        with self._lock:
            try:
                self._db.execute("UPDATE slides SET ended = ? WHERE id = ? AND ended IS NULL",
                                 (time.time() if ended is None else ended, slide_id))
            except sqlite3.Error as exc:
                raise store_error(self.path, "end the slide", exc) from exc

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
                raise store_error(self.path, "close open slides", exc) from exc
            return ids

    # -- reading -------------------------------------------------------------------------------------------

    def _read(self, sql: str, args: Any = ()) -> list[tuple]:
        with self._rlock:
            try:
                return self._rdb.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise store_error(self.path, "read", exc) from exc

    def get(self, field_id: int) -> FieldResult | None:
        rows = self._read(f"SELECT {COLUMNS} FROM fields WHERE id = ?", (int(field_id),))
        return from_row(rows[0]) if rows else None

    def query(self, filters: Filters = NO_FILTERS, *, limit: int = 50, offset: int = 0,
              newest_first: bool = True) -> list[FieldResult]:
        """One page of results matching ``filters``, newest first by default."""
        where, args = filters.where()
        order = "DESC" if newest_first else "ASC"
        rows = self._read(f"SELECT {COLUMNS} FROM fields{where} ORDER BY id {order} LIMIT ? OFFSET ?",
                          [*args, max(0, int(limit)), max(0, int(offset))])
        return [from_row(r) for r in rows]

    def count(self, filters: Filters = NO_FILTERS) -> int:
        where, args = filters.where()
        return int(self._read(f"SELECT count(*) FROM fields{where}", args)[0][0])

    def iter_results(self, filters: Filters = NO_FILTERS, *, batch: int = 500) -> Iterator[FieldResult]:
        """All matching results, oldest first, read in batches (for exports)."""
        last = 0
        where, args = filters.where()
        where = (where + " AND" if where else " WHERE") + " id > ?"
        while True:
            rows = self._read(f"SELECT {COLUMNS} FROM fields{where} ORDER BY id LIMIT ?", [*args, last, batch])
            if not rows:
                return
            for r in rows:
                yield from_row(r)
            last = rows[-1][0]

    def slide_fields(self, slide_id: str) -> list[FieldResult]:
        return list(self.iter_results(Filters(slide_id=slide_id)))

    def slides(self, *, limit: int = 50, offset: int = 0) -> list[SlideRow]:
        rows = self._read(f"{SLIDE_ROWS} GROUP BY s.id ORDER BY s.started DESC, s.id DESC LIMIT ? OFFSET ?",
                          (int(limit), int(offset)))
        return [SlideRow(*r) for r in rows]

    def slide(self, slide_id: str) -> SlideRow | None:
        rows = self._read(f"{SLIDE_ROWS} WHERE s.id = ? GROUP BY s.id", (slide_id,))
        return SlideRow(*rows[0]) if rows else None

    def image_file(self, result: FieldResult | int) -> Path | None:
        """Absolute path of a result's JPEG if it still exists (and lies inside the images folder)."""
        r = self.get(result) if isinstance(result, int) else result
        return self.images.file(r.image) if r is not None else None

    def csv_rows(self, filters: Filters = NO_FILTERS, classes: tuple[str, ...] = ()) -> Iterator[str]:
        """The matching results as CSV text lines (header first), oldest first, read as the lines are taken."""
        return csv_lines(self.iter_results(filters), classes)

    def _row_count(self, table: str) -> int:
        """Rows of ``table`` (``fields`` or ``slides``): the last count plus the rows past its highest rowid."""
        with self._counted_lock:
            last, n = self._counted[table]
            new, top = self._read(f"SELECT count(*), max(rowid) FROM {table} WHERE rowid > ?", (last,))[0]
            if top is not None:
                self._counted[table] = (int(top), n + int(new))
            return self._counted[table][1]

    def stats(self) -> StoreStats:
        fields, slides = self._row_count("fields"), self._row_count("slides")
        db_bytes = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                db_bytes += os.stat(str(self.path) + suffix).st_size
            except OSError:
                pass
        images = self.images  # its figures as the last write left them (the writer updates them under its lock)
        return StoreStats(fields, slides, db_bytes, images.bytes, images.count, images.enabled,
                          images.last_error)

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])

    def close(self) -> None:
        with self._lock, self._rlock:
            for db in (self._rdb, self._db):
                try:
                    db.close()
                except sqlite3.Error as exc:
                    log.warning("closing %s: %s", self.path, exc)


def open_store(state_dir: Path, cfg: StoreConfig) -> ResultStore:
    """A store from ``[store]`` config values."""
    return ResultStore(state_dir, image_budget_bytes=int(cfg.image_budget_mb) << 20,
                       reserve_bytes=int(cfg.reserve_mb) << 20, jpeg_quality=cfg.jpeg_quality,
                       save_images=cfg.save_images)
