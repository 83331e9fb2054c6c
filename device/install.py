"""Installing a bundle from a USB stick, and going back: ``install-bundle`` and ``rollback``.

Every bundle is verified before this box runs it (:func:`verify_bundle`: signature, sha256 of every
file, schema, model/head, the bundle's own reference images on this box's runtime); an install
verifies the copy on this box, so the bytes checked are the bytes that will run. Where bundles live
and how the ``active``/``previous`` pointers are switched so that a power cut at any moment leaves one
complete bundle active: :mod:`device.bundles_dir`.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.bundle import MANIFEST, Bundle, bundle_id, load_bundle, read_manifest
from device.bundles_dir import (
    ACTIVE,
    INCOMING,
    PREVIOUS,
    active_bundle,
    copy_bundle,
    discard,
    fsync_dir,
    link_target,
    locked,
    previous_bundle,
    switch,
    tidy,
)
from device.errors import BundleError, RuntimeUnavailableError

log = logging.getLogger(__name__)

UNIT = "leukoscreen.service"


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
                  use_edgetpu: bool = False, references: bool = True, rbc_diameter_px: float = 0.0,
                  signature_apart: bool = False, pin_cores: bool = False) -> Verified:
    """Everything a bundle must pass before this box runs it; the first failure raises, naming what and why.

    Order: signature (who made it: nothing untrusted is parsed further), sha256 of every file + schema +
    head/manifest consistency (``load_bundle``), the model opened on this box's runtime and matched to the
    manifest, then the bundle's own reference images must give the decisions recorded in it.
    ``signature_apart`` checks the signature in a child process and ``pin_cores`` splits the cores (the
    long-running service: see :func:`device.signing.verify_signature_apart`, :mod:`device.priority`).
    """
    from device.classifier import Classifier
    from device.signing import SignatureError, verify_signature, verify_signature_apart

    signed = None
    manifest = read_manifest(folder)  # a missing or broken manifest is reported as such, not as a bad signature
    try:
        signed = (verify_signature_apart(folder, keys_dir) if signature_apart
                  else verify_signature(folder, keys_dir, manifest))
    except (SignatureError, RuntimeUnavailableError) as exc:
        if require_signature:
            raise
        log.warning("%s: running WITHOUT a verified signature ([model] require_signature = false): %s", folder, exc)
    bundle = load_bundle(folder)
    # The reference images are model-size images, not camera frames: they are checked uncalibrated.
    clf = Classifier.open(bundle, num_threads=threads, use_edgetpu=use_edgetpu,
                          rbc_diameter_px=0.0 if references else rbc_diameter_px, pin_cores=pin_cores)
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
    with locked(bundles_dir):
        tidy(bundles_dir)
        current = active_bundle(bundles_dir) or factory_dir
        progress(f"installing {new_id} from {src} (running now: {_id_of(current)})")
        final = bundles_dir / new_id
        if current.resolve() == final.resolve():
            raise BundleError(f"{new_id} is already the active bundle; nothing to do")
        # who made it, before anything is copied or parsed further (the same check runs on the copy below)
        verify_signature(src, verify.keys_dir, manifest)
        incoming = bundles_dir / f"{INCOMING}{new_id}-{secrets.token_hex(4)}"
        try:
            copy_bundle(src, incoming, manifest)
            fsync_dir(bundles_dir)
            progress("copied; verifying the copy on this box")
            v = verify(incoming)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        if final.exists():  # the same bundle installed before (now previous, or a leftover): replace it
            discard(final)
        os.replace(incoming, final)
        fsync_dir(bundles_dir)
        switch(bundles_dir, PREVIOUS, link_target(bundles_dir, current))
        switch(bundles_dir, ACTIVE, final.name)
        tidy(bundles_dir)
        checks = (v.signed.describe() if v.signed else "unsigned", "every file's sha256 matches the manifest",
                  f"schema, model and head agree ({len(v.bundle.classes)} classes, input {v.bundle.input.size} px)",
                  v.references)
        return Switched(new_id, final, _id_of(current), checks)


def rollback(bundles_dir: Path, factory_dir: Path, verify: Verifier,
             *, progress: Callable[[str], None] = log.info) -> Switched:
    """Swap ``active`` and ``previous`` (after verifying the previous bundle again)."""
    with locked(bundles_dir):
        prev = previous_bundle(bundles_dir)
        if prev is None:
            raise BundleError(f"{bundles_dir}: there is no previous bundle to return to (nothing was installed "
                              "with install-bundle yet, or it was already rolled back and pruned)")
        current = active_bundle(bundles_dir) or factory_dir
        progress(f"rolling back from {_id_of(current)} to {_id_of(prev)}")
        v = verify(prev)
        # active first: a cut between the two leaves active = previous = the bundle we return to
        switch(bundles_dir, ACTIVE, link_target(bundles_dir, prev))
        switch(bundles_dir, PREVIOUS, link_target(bundles_dir, current))
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
