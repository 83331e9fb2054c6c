"""The bundles folder on disk: the ``active``/``previous`` pointers, read and switched atomically.

Layout ([model] bundles_dir, default ``<state_dir>/bundles``)::

    bundles/
      darknet19-all-int8-2026-11-23-1a2b3c4d/   one complete, verified bundle per folder (<name>-<sha8>)
      darknet19-all-int8-2026-12-01-9f8e7d6c/
      active   -> darknet19-all-int8-2026-12-01-9f8e7d6c     (symlink: what the service runs)
      previous -> darknet19-all-int8-2026-11-23-1a2b3c4d     (symlink: what ``rollback`` returns to)

No ``active`` link: the service runs the factory bundle ([model] dir, ``models/`` in the checkout).

Why a power cut at any moment leaves one complete bundle active: a new bundle is copied into a hidden
``.incoming-*`` folder, every file fsynced, verified there, and only then renamed to its final name
(:mod:`device.install` does the verifying). A pointer is switched by creating a new symlink beside it
and ``rename(2)``-ing it over the old one (atomic), then fsyncing the folder. ``previous`` is moved
before ``active``, so every intermediate state has ``active`` naming a complete folder. Folders that
are neither active nor previous are renamed to ``.trash-*`` (so a half-deleted folder never looks like
a bundle) and removed; leftovers are cleared by the next install.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from device.bundle import MANIFEST
from device.errors import BundleError, BundleMissingError, StoreError

log = logging.getLogger(__name__)

ACTIVE, PREVIOUS = "active", "previous"
INCOMING, TRASH, LOCK = ".incoming-", ".trash-", ".lock"


# -- reading the pointers (config.resolve uses this on every start) -------------------------------------------


def _pointer(bundles_dir: Path, name: str) -> Path | None:
    link = bundles_dir / name
    try:
        target = Path(os.readlink(link))
    except OSError:  # no link (nothing installed yet), or not a link
        return None
    path = target if target.is_absolute() else bundles_dir / target
    if not (path / MANIFEST).is_file():
        log.warning("%s points to %s, which holds no bundle; ignoring it", link, path)
        return None
    return path


def active_bundle(bundles_dir: Path) -> Path | None:
    """The installed bundle the service runs, or None (then it runs the factory bundle)."""
    return _pointer(bundles_dir, ACTIVE)


def previous_bundle(bundles_dir: Path) -> Path | None:
    return _pointer(bundles_dir, PREVIOUS)


# -- changing the folder ---------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pinned_files(manifest: dict, where: Path) -> list[str]:
    """Every path the manifest pins with a sha256 (``files.*``, and any other ``{path, sha256}`` entry)."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("path"), str) and isinstance(node.get("sha256"), str):
                out.append(node["path"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(manifest)
    for rel in out:
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise BundleError(f"{where}: file path {rel!r} leaves the bundle folder; the bundle is malformed")
    return sorted(set(out))


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    os.chmod(dst, 0o644)


def copy_bundle(src: Path, dst: Path, manifest: dict) -> None:
    """The manifest, its signature and every file it pins (nothing else), each fsynced, then the folders."""
    from device.signing import SIGNATURE

    rels = [MANIFEST, *pinned_files(manifest, src / MANIFEST)]
    if (src / SIGNATURE).is_file():
        rels.append(SIGNATURE)
    dst.mkdir(mode=0o755)
    for rel in rels:
        if not (src / rel).is_file():
            raise BundleMissingError(f"{src / rel}: named by {src / MANIFEST} but missing on the stick; "
                                     "copy the whole bundle folder again")
        _copy_file(src / rel, dst / rel)
    for d in sorted({(dst / r).parent for r in rels}, key=lambda p: len(p.parts), reverse=True):
        os.chmod(d, 0o755)
        fsync_dir(d)


def switch(bundles_dir: Path, name: str, target: str) -> None:
    """Point ``bundles_dir/name`` at ``target`` atomically (new symlink, rename over, fsync the folder)."""
    tmp = bundles_dir / f".{name}-{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    os.replace(tmp, bundles_dir / name)
    fsync_dir(bundles_dir)


def link_target(bundles_dir: Path, folder: Path) -> str:
    """Relative for folders inside the bundles dir (the dir can move), absolute for the factory bundle."""
    return folder.name if folder.parent.resolve() == bundles_dir.resolve() else str(folder.resolve())


def discard(folder: Path) -> None:
    """Remove a bundle folder; renamed to ``.trash-*`` first, so a half-removed one never looks like a bundle."""
    trash = folder.with_name(f"{TRASH}{folder.name}-{secrets.token_hex(4)}")
    os.replace(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def tidy(bundles_dir: Path) -> None:
    """Remove leftovers of interrupted installs and bundles that are neither active nor previous."""
    keep = {p.resolve() for p in (active_bundle(bundles_dir), previous_bundle(bundles_dir)) if p is not None}
    for p in bundles_dir.iterdir():
        if p.name.startswith((INCOMING, TRASH)) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{ACTIVE}-") or p.name.startswith(f".{PREVIOUS}-"):
            p.unlink(missing_ok=True)
        elif p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.resolve() not in keep:
            log.info("removing %s (neither active nor previous)", p.name)
            discard(p)


@contextlib.contextmanager
def locked(bundles_dir: Path) -> Iterator[None]:
    """One install or rollback at a time (``flock`` on ``.lock``; a second one is refused, not queued)."""
    try:
        bundles_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(bundles_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"{bundles_dir}: cannot use the bundles folder ({exc.strerror}); run the command as root "
                         "(sudo) or as the service user, and check [model] bundles_dir") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StoreError(f"{bundles_dir}: another install or rollback is running; wait for it to finish") \
                from exc
        yield
    finally:
        os.close(fd)
