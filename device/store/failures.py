"""Storage failures as one :class:`~device.errors.StoreError` each, saying what failed and what to do about it.

The one place that tells a locked database from a read-only card, a full disk or a damaged file; the
loop shows the message as its storage fault and the page as its 503.
"""

from __future__ import annotations

import os
from pathlib import Path

from device.errors import StoreError

LOCKED = "another process holds the database; stop it (only one LeukoScreen may run)"
READ_ONLY = "the state folder is read-only; check the SD card (it may have failed) and the permissions"
FULL = "the disk is full; free space or lower [store] image_budget_mb"
DAMAGED = "the database file is damaged; move it aside (keep it for recovery) and restart"
OTHER = "check the disk and the state folder's permissions"


def store_error(db_path: Path, what: str, exc: BaseException) -> StoreError:
    """``exc`` (from sqlite3 or the OS) while trying to ``what`` the database at ``db_path``, with its fix."""
    msg = str(exc)
    errno = getattr(exc, "errno", None)
    if "locked" in msg or "busy" in msg:
        fix = LOCKED
    elif "readonly" in msg or "read-only" in msg or errno == 30 or read_only_fs(db_path.parent):
        fix = READ_ONLY
    elif "full" in msg or errno == 28:
        fix = FULL
    elif "not a database" in msg or "malformed" in msg:
        fix = DAMAGED
    else:
        fix = OTHER
    return StoreError(f"{db_path}: cannot {what} ({type(exc).__name__}: {msg}); {fix}")


def read_only_fs(folder: Path) -> bool:
    """SQLite reports a read-only file system as "unable to open" or "disk I/O error"; ask the kernel."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
