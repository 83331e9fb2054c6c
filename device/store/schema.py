"""The database file: its schema and migrations, made whole on first start, opened in WAL with full sync."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from device.errors import StoreError

log = logging.getLogger(__name__)

DB_NAME = "results.sqlite3"
SCHEMA_VERSION = 2
#: What an older database is brought up to, one step per version (each in one transaction).
MIGRATIONS = {
    # 1 -> 2: every result names the bundle (<name>-<sha8>) that produced it; older rows keep NULL ("unknown").
    2: ("ALTER TABLE fields ADD COLUMN bundle TEXT",),
}

# The CHECK lists device.status.STATUSES; it is part of the file format, so it is written out.
SCHEMA = """
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


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (best effort: not every file system allows it)."""
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


def rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


#: Page cache per connection, KiB.
CACHE_KIB = 512


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """Open (creating it whole if absent) and bring up to date the database at ``path``: WAL, ``synchronous=FULL``.

    Raises :class:`StoreError` for what needs a person (WAL refused, a newer schema) and lets
    ``sqlite3.Error``/``OSError`` through for the caller to classify.
    """
    if not path.exists():
        _create(path)
    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: SQLite refused WAL mode (got {mode}); put the state folder on a "
                             "local file system (not NFS or a FAT stick)")
        db.execute("PRAGMA synchronous=FULL")
        # A bounded page cache (512 KiB, not SQLite's default 2 MB per connection): the service's queries read
        # the newest rows and indexes, and a cache that fills as the database grows reads as RSS growth.
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        _upgrade(db, path)
    except BaseException:
        db.close()
        raise
    return db


def connect_reader(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A second, read-only connection to the database :func:`connect` opened: in WAL mode its reads see every
    committed row and neither wait for a commit in progress nor hold one up."""
    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        db.execute("PRAGMA query_only=1")
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    except BaseException:
        db.close()
        raise
    return db


def _create(path: Path) -> None:
    """A new database, made whole beside its final name and renamed into place: a power cut while a box
    starts for the first time leaves no database or a complete one, never a file without tables."""
    new = path.with_name(path.name + ".new")
    for p in (new, *(Path(str(q) + sfx) for q in (new, path) for sfx in ("-wal", "-shm"))):
        p.unlink(missing_ok=True)  # a half-made one, or journal files that belong to no database
    con = sqlite3.connect(new, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)
        con.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    finally:
        con.close()  # the last connection checkpoints the WAL into the file
    fd = os.open(new, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(new, path)
    fsync_dir(path.parent)


def _upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables, or bring an older database up to :data:`SCHEMA_VERSION` (rows are kept)."""
    has_fields = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'fields'").fetchone() is not None
    if not has_fields:
        db.executescript(SCHEMA)
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    version = int(row[0]) if row is not None else (SCHEMA_VERSION if not has_fields else 1)
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path}: database schema {version}, this software writes {SCHEMA_VERSION}; "
                         "update the device software, or move the file aside (results stay readable with "
                         "sqlite3) and restart")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql in MIGRATIONS[target]:
                db.execute(sql)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(target),))
            db.execute("COMMIT")
        except sqlite3.Error:
            rollback(db)
            raise
        log.info("%s: database schema %d -> %d", path, target - 1, target)
    db.executescript(SCHEMA)  # indexes (IF NOT EXISTS)
    if row is None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
