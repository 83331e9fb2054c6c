"""Installing a bundle from a USB stick, and going back: ``install-bundle`` and ``rollback``.

Layout of the bundles folder ([model] bundles_dir, default ``<state_dir>/bundles``)::

    bundles/
      darknet19-all-int8-2026-11-23-1a2b3c4d/   one complete, verified bundle per folder (<name>-<sha8>)
      darknet19-all-int8-2026-12-01-9f8e7d6c/
      active   -> darknet19-all-int8-2026-12-01-9f8e7d6c     (symlink: what the service runs)
      previous -> darknet19-all-int8-2026-11-23-1a2b3c4d     (symlink: what ``rollback`` returns to)

No ``active`` link: the service runs the factory bundle ([model] dir, ``models/`` in the checkout).

Why a power cut at any moment leaves one complete bundle active: a new bundle is copied into a hidden
``.incoming-*`` folder, every file fsynced, verified there (signature, sha256, schema, model/head, the
bundle's own reference images on this box's runtime), and only then renamed to its final name. A pointer
is switched by creating a new symlink beside it and ``rename(2)``-ing it over the old one (atomic), then
fsyncing the folder. ``previous`` is moved before ``active``, so every intermediate state has ``active``
naming a complete folder. Folders that are neither active nor previous are renamed to ``.trash-*`` (so a
half-deleted folder never looks like a bundle) and removed; leftovers are cleared by the next install.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.bundle import MANIFEST, Bundle, bundle_id, load_bundle, read_manifest
from device.errors import BundleError, RuntimeUnavailableError, StoreError

log = logging.getLogger(__name__)

ACTIVE, PREVIOUS = "active", "previous"
INCOMING, TRASH, LOCK = ".incoming-", ".trash-", ".lock"
UNIT = "leukoscreen.service"


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


@dataclass(frozen=True)
class Installed:
    """What the operator panel and ``python -m device bundles`` show."""

    active: str  # bundle id (<name>-<sha8>)
    active_dir: Path
    factory: bool  # True: no bundle installed, the factory bundle ([model] dir) runs
    previous: str | None
    previous_dir: Path | None

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "active_dir": str(self.active_dir), "factory": self.factory,
                "previous": self.previous, "previous_dir": str(self.previous_dir) if self.previous_dir else None}


def _id_of(folder: Path) -> str:
    try:
        return bundle_id(read_manifest(folder), folder.name)
    except BundleError:
        return f"{folder.name} (unreadable manifest)"


def installed(bundles_dir: Path, factory_dir: Path) -> Installed:
    act = active_bundle(bundles_dir)
    prev = previous_bundle(bundles_dir)
    folder = act or factory_dir
    return Installed(_id_of(folder), folder, act is None, _id_of(prev) if prev else None, prev)


# -- verification ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """A bundle that passed every check, opened and ready to run."""

    bundle: Bundle
    classifier: Any  # device.classifier.Classifier
    signed: Any  # device.signing.Signed | None (None: signature not required and absent)
    references: str  # the reference check's summary


def verify_bundle(folder: Path, keys_dir: Path, *, require_signature: bool = True, threads: int = 1,
                  use_edgetpu: bool = False, references: bool = True, rbc_diameter_px: float = 0.0) -> Verified:
    """Everything a bundle must pass before this box runs it; the first failure raises, naming what and why.

    Order: signature (who made it: nothing untrusted is parsed further), sha256 of every file + schema +
    head/manifest consistency (``load_bundle``), the model opened on this box's runtime and matched to the
    manifest, then the bundle's own reference images must give the decisions recorded in it.
    """
    from device.classifier import Classifier
    from device.signing import SignatureError, verify_signature

    signed = None
    manifest = read_manifest(folder)  # a missing or broken manifest is reported as such, not as a bad signature
    try:
        signed = verify_signature(folder, keys_dir, manifest)
    except (SignatureError, RuntimeUnavailableError) as exc:
        if require_signature:
            raise
        log.warning("%s: running WITHOUT a verified signature ([model] require_signature = false): %s", folder, exc)
    bundle = load_bundle(folder)
    clf = Classifier.open(bundle, num_threads=threads, use_edgetpu=use_edgetpu, rbc_diameter_px=rbc_diameter_px)
    summary = check_references(bundle, clf) if references else "reference images: not checked"
    return Verified(bundle, clf, signed, summary)


def check_references(bundle: Bundle, classifier: Any) -> str:
    """The bundle's own reference images through this box's runtime must give the decisions recorded in it.

    A bundle without reference images is refused: nothing would show that it behaves on this box.
    """
    from device.reference import check_references as run_check

    result = run_check(bundle, classifier)
    if not result.ok:
        raise BundleError(f"{bundle.root}: the bundle's reference images do not give the same results on this box "
                          f"({result.summary}); it does not behave here as where it was built: keep the current "
                          "bundle and report this to the release engineer")
    return str(result.summary)


# -- file operations -------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
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


def _copy_bundle(src: Path, dst: Path, manifest: dict) -> None:
    """The manifest, its signature and every file it pins (nothing else), each fsynced, then the folders."""
    from device.signing import SIGNATURE

    rels = [MANIFEST, *pinned_files(manifest, src / MANIFEST)]
    if (src / SIGNATURE).is_file():
        rels.append(SIGNATURE)
    dst.mkdir(mode=0o755)
    for rel in rels:
        if not (src / rel).is_file():
            from device.errors import BundleMissingError

            raise BundleMissingError(f"{src / rel}: named by {src / MANIFEST} but missing on the stick; "
                                     "copy the whole bundle folder again")
        _copy_file(src / rel, dst / rel)
    for d in sorted({(dst / r).parent for r in rels}, key=lambda p: len(p.parts), reverse=True):
        os.chmod(d, 0o755)
        _fsync_dir(d)


def _switch(bundles_dir: Path, name: str, target: str) -> None:
    """Point ``bundles_dir/name`` at ``target`` atomically (new symlink, rename over, fsync the folder)."""
    tmp = bundles_dir / f".{name}-{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    os.replace(tmp, bundles_dir / name)
    _fsync_dir(bundles_dir)


def _link_target(bundles_dir: Path, folder: Path) -> str:
    """Relative for folders inside the bundles dir (the dir can move), absolute for the factory bundle."""
    return folder.name if folder.parent.resolve() == bundles_dir.resolve() else str(folder.resolve())


def _discard(folder: Path) -> None:
    trash = folder.with_name(f"{TRASH}{folder.name}-{secrets.token_hex(4)}")
    os.replace(folder, trash)
    _fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _tidy(bundles_dir: Path) -> None:
    """Remove leftovers of interrupted installs and bundles that are neither active nor previous."""
    keep = {p.resolve() for p in (active_bundle(bundles_dir), previous_bundle(bundles_dir)) if p is not None}
    for p in bundles_dir.iterdir():
        if p.name.startswith((INCOMING, TRASH)) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{ACTIVE}-") or p.name.startswith(f".{PREVIOUS}-"):
            p.unlink(missing_ok=True)
        elif p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.resolve() not in keep:
            log.info("removing %s (neither active nor previous)", p.name)
            _discard(p)


@contextlib.contextmanager
def _locked(bundles_dir: Path) -> Iterator[None]:
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


# -- the two commands ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Switched:
    """The result of an install or a rollback."""

    active: str
    active_dir: Path
    previous: str | None
    checks: tuple[str, ...]  # what was verified, one line each


@dataclass(frozen=True)
class Verifier:
    """:func:`verify_bundle` with a signature always required and this box's keys and runtime settings."""

    keys_dir: Path
    threads: int = 1
    use_edgetpu: bool = False
    references: bool = True

    def __call__(self, folder: Path) -> Verified:
        return verify_bundle(folder, self.keys_dir, require_signature=True, threads=self.threads,
                             use_edgetpu=self.use_edgetpu, references=self.references)


def install_bundle(src: Path, bundles_dir: Path, factory_dir: Path, verify: Verifier,
                   *, progress: Callable[[str], None] = log.info) -> Switched:
    """Copy, verify and switch to the bundle in ``src``; the one running now becomes ``previous``.

    ``verify`` runs on the copy on this box, so the bytes checked are the bytes that will run.
    """
    from device.signing import verify_signature

    src = Path(src)
    if not (src / MANIFEST).is_file():
        raise BundleError(f"{src / MANIFEST}: no manifest: {src} is not a bundle folder; point at the folder on "
                          "the stick that holds manifest.json and manifest.sig")
    manifest = read_manifest(src)
    new_id = bundle_id(manifest, src.name)
    with _locked(bundles_dir):
        _tidy(bundles_dir)
        current = active_bundle(bundles_dir) or factory_dir
        progress(f"installing {new_id} from {src} (running now: {_id_of(current)})")
        final = bundles_dir / new_id
        if current.resolve() == final.resolve():
            raise BundleError(f"{new_id} is already the active bundle; nothing to do")
        # who made it, before anything is copied or parsed further (the same check runs on the copy below)
        verify_signature(src, verify.keys_dir, manifest)
        incoming = bundles_dir / f"{INCOMING}{new_id}-{secrets.token_hex(4)}"
        try:
            _copy_bundle(src, incoming, manifest)
            _fsync_dir(bundles_dir)
            progress("copied; verifying the copy on this box")
            v = verify(incoming)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        if final.exists():  # the same bundle installed before (now previous, or a leftover): replace it
            _discard(final)
        os.replace(incoming, final)
        _fsync_dir(bundles_dir)
        _switch(bundles_dir, PREVIOUS, _link_target(bundles_dir, current))
        _switch(bundles_dir, ACTIVE, final.name)
        _tidy(bundles_dir)
        checks = (v.signed.describe() if v.signed else "unsigned", "every file's sha256 matches the manifest",
                  f"schema, model and head agree ({len(v.bundle.classes)} classes, input {v.bundle.input.size} px)",
                  v.references)
        return Switched(new_id, final, _id_of(current), checks)


def rollback(bundles_dir: Path, factory_dir: Path, verify: Verifier,
             *, progress: Callable[[str], None] = log.info) -> Switched:
    """Swap ``active`` and ``previous`` (after verifying the previous bundle again)."""
    with _locked(bundles_dir):
        prev = previous_bundle(bundles_dir)
        if prev is None:
            raise BundleError(f"{bundles_dir}: there is no previous bundle to return to (nothing was installed "
                              "with install-bundle yet, or it was already rolled back and pruned)")
        current = active_bundle(bundles_dir) or factory_dir
        progress(f"rolling back from {_id_of(current)} to {_id_of(prev)}")
        v = verify(prev)
        # active first: a cut between the two leaves active = previous = the bundle we return to
        _switch(bundles_dir, ACTIVE, _link_target(bundles_dir, prev))
        _switch(bundles_dir, PREVIOUS, _link_target(bundles_dir, current))
        checks = (v.signed.describe() if v.signed else "unsigned", "every file's sha256 matches the manifest",
                  v.references)
        return Switched(_id_of(prev), prev, _id_of(current), checks)


def restart_service(unit: str = UNIT) -> str:
    """Restart the systemd service so it loads the new bundle; a message saying what happened.

    Only as root on a systemd machine, and only if the unit is running (``try-restart``); elsewhere (a
    laptop, tests) the message says to restart by hand.
    """
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return "no systemd here: restart `python -m device run` (or `make run`) to use it"
    if os.geteuid() != 0:
        return f"not root: run `sudo systemctl restart {unit}` to use it"
    r = subprocess.run(["systemctl", "try-restart", unit], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return f"`systemctl try-restart {unit}` failed ({r.stderr.strip()}); restart it by hand"
    return f"{unit} restarted (if it was running); watch the LEDs turn green"
