"""The frame JPEGs under ``<state>/images/<day>/``: the expendable part of the store.

A disk budget prunes the oldest JPEGs first (their records stay, with ``image`` NULL), a free-space
reserve stops writing new ones, and a JPEG no record points to (a crash between the two writes) is
removed at the next open. A JPEG that cannot be written is dropped and said in ``last_error``; it
never stops a record.

Not locked: :class:`device.store.ResultStore` calls it under its own lock and hands it its database
connection for the rows that point at images.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import secrets
import shutil
import sqlite3
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import PIL
from PIL import Image

from device.errors import StoreError
from device.store.failures import store_error
from device.store.schema import DB_NAME, fsync_dir, rollback

log = logging.getLogger(__name__)

IMAGES = "images"


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """An HxWx3 uint8 RGB frame as a baseline JPEG (4:2:0 chroma, as Pillow's default).

    simplejpeg (libjpeg-turbo; the encoder picamera2 itself uses, so a Pi with the camera has it) releases
    the GIL while it encodes. Pillow's encoder holds it: measured here, a Pillow encode of a 1014x760 frame on
    the recorder thread kept other Python threads out for up to 2.4 ms at a time (simplejpeg: never over
    0.5 ms), and the screening thread needs the GIL back each time an invoke returns. Pillow is the fallback
    where simplejpeg is not installed.
    """
    sj = _simplejpeg()
    if sj is not None:
        return sj.encode_jpeg(np.ascontiguousarray(frame), quality=int(quality), colorspace="RGB",
                              colorsubsampling="420")
    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg_encoder() -> str:
    """Which library encodes the frame JPEGs on this machine (``selftest`` says it)."""
    sj = _simplejpeg()
    if sj is not None:
        return f"simplejpeg {getattr(sj, '__version__', '?')}"
    return f"Pillow {PIL.__version__} (holds the GIL while it encodes: install simplejpeg)"


@functools.cache
def _simplejpeg() -> ModuleType | None:
    """The simplejpeg module, imported on first use; None (Pillow encodes) where it is not installed."""
    try:
        import simplejpeg
    except ImportError:
        log.info("simplejpeg is not installed: frame JPEGs are encoded with Pillow, which holds the GIL")
        return None
    return simplejpeg


class ImageStore:
    """The JPEGs of one state folder, their byte count against the budget, and why the last one was not kept."""

    def __init__(self, state_dir: Path, *, budget_bytes: int, reserve_bytes: int, jpeg_quality: int, enabled: bool):
        self.state_dir = state_dir
        self.folder = state_dir / IMAGES
        self.budget_bytes = int(budget_bytes)
        self.reserve_bytes = int(reserve_bytes)
        self.jpeg_quality = int(jpeg_quality)
        self.enabled = bool(enabled) and self.budget_bytes > 0
        self.bytes = self.count = 0
        self.last_error = ""
        self._error_kind = ""

    def scan(self, referenced: set[str]) -> None:
        """Sum the kept JPEGs; delete temp files and JPEGs no record points to (``referenced``: the rows' paths)."""
        total = count = 0
        for dirpath, _dirs, files in os.walk(self.folder):
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
        self.bytes, self.count = total, count

    def save(self, db: sqlite3.Connection, image: bytes | np.ndarray, t: float,
             folders: list[Path] | None = None) -> str | None:
        """Encode (an HxWx3 frame) and write one image captured at ``t``, pruning to fit the budget; its path
        relative to the state dir, or None when it is not kept (why: :attr:`last_error`).

        ``folders``: the folders whose fsync is left to the caller (:meth:`sync`, once for several images);
        without it, they are fsynced here."""
        if not self.enabled:
            return None
        try:
            jpeg = image if isinstance(image, bytes) else encode_jpeg(image, self.jpeg_quality)
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            self.last_error = f"cannot encode the frame as JPEG ({exc})"
            return None
        try:
            return self._write(db, jpeg, t, folders)
        except StoreError as exc:  # pruning failed: keep the record, skip the image
            self.last_error = str(exc)
            return None

    def discard(self, rel: str) -> None:
        """Remove an image whose record could not be committed (never leave an image without its record)."""
        try:
            p = self.state_dir / rel
            size = p.stat().st_size
            p.unlink()
            self.count -= 1
            self.bytes -= size
        except OSError:
            pass

    def file(self, rel: str | None) -> Path | None:
        """Absolute path of a stored image if it still exists (and lies inside the images folder)."""
        if not rel:
            return None
        p = (self.state_dir / rel).resolve()
        if self.folder.resolve() not in p.parents or not p.is_file():
            return None
        return p

    def _failed(self, kind: str, msg: str) -> None:
        """Note why a frame image was not saved; warn once per kind of failure, not once per field."""
        if kind != self._error_kind:
            log.warning(msg)
        self._error_kind = kind
        self.last_error = msg

    @staticmethod
    def sync(folders: list[Path]) -> None:
        """fsync each folder once (several images written to one folder need one fsync of it)."""
        for folder in dict.fromkeys(folders):
            fsync_dir(folder)

    def _write(self, db: sqlite3.Connection, jpeg: bytes, t: float, folders: list[Path] | None) -> str | None:
        """Write one JPEG durably (temp file, fsync, rename, then the directory fsync, here or by :meth:`sync`)."""
        try:
            free = shutil.disk_usage(self.state_dir).free
        except OSError:
            free = 0
        if free - len(jpeg) < self.reserve_bytes:
            self._failed("low-disk", f"{self.state_dir}: only {free >> 20} MB free (reserve "
                         f"{self.reserve_bytes >> 20} MB); frame images are no longer saved, records still are")
            return None
        self._prune(db, len(jpeg))
        if self.bytes + len(jpeg) > self.budget_bytes:
            return None  # one image larger than the whole budget
        day = time.strftime("%Y-%m-%d", time.gmtime(t))
        folder = self.folder / day
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
            written = [folder, self.folder] if new_folder else [folder]
            if folders is None:
                self.sync(written)
            else:
                folders += written
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            self._failed("write", f"{final}: cannot write the frame image ({exc.strerror}); records are "
                         "still saved; free disk space or check the SD card")
            return None
        if self.last_error:
            log.info("frame images are saved again")
        self.last_error = self._error_kind = ""
        self.bytes += len(jpeg)
        self.count += 1
        return final.relative_to(self.state_dir).as_posix()

    def _prune(self, db: sqlite3.Connection, incoming: int) -> None:
        """Delete the oldest JPEGs until ``incoming`` bytes fit the budget. Records stay; their image is NULL."""
        while self.bytes + incoming > self.budget_bytes and self.count > 0:
            rows = db.execute("SELECT id, image FROM fields WHERE image IS NOT NULL ORDER BY id LIMIT 32").fetchall()
            if not rows:
                self.bytes, self.count = 0, 0
                return
            excess = self.bytes + incoming - self.budget_bytes
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
                db.execute("BEGIN IMMEDIATE")
                db.executemany("UPDATE fields SET image = NULL, image_pruned = 1 WHERE id = ?",
                               [(v[0],) for v in victims])
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                rollback(db)
                raise store_error(self.state_dir / DB_NAME, "prune images", exc) from exc
            for _id, p, size in victims:  # after the commit: a crash here leaves only strays, removed at next open
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("cannot delete pruned image %s: %s", p, exc)
                self.bytes = max(0, self.bytes - size)
                self.count = max(0, self.count - 1)
            log.debug("pruned %d oldest frame image(s) to stay within the %d MB budget", len(victims),
                      self.budget_bytes >> 20)
