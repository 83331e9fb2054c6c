"""Who made a bundle: an Ed25519 signature over the manifest, checked against the box's trusted keys.

The manifest pins every file of the bundle by sha256, so a signature over the
manifest's canonical bytes (:func:`device.bundle.canonical_manifest`) signs the
whole bundle. The signature lives next to it in ``manifest.sig`` (JSON: key id,
the signed manifest's sha256, the signature in base64, when). A key id is the
first 16 hex digits of the sha256 of the raw 32-byte public key.

Trusted public keys are PEM files ``*.pub`` in one folder ([model] keys_dir:
``/etc/leukoscreen/keys`` on a box, ``device/config/keys`` in a checkout).
``cryptography`` is imported lazily: Raspberry Pi OS ships it (python3-cryptography). The long-running
appliance checks the signature in a child process (:func:`verify_signature_apart`), so the resident
memory ``cryptography`` maps is never part of the service (peak RSS of `python -m device run` 145 -> 135 MB
on x86), and the untrusted signature file is parsed outside it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device.bundle import MANIFEST, canonical_manifest, read_manifest
from device.errors import BundleError, RuntimeUnavailableError

log = logging.getLogger(__name__)

SIGNATURE = "manifest.sig"
ALGORITHM = "Ed25519"
#: Where ``python -m convert sign`` looks for the private key unless told otherwise.
DEFAULT_PRIVATE_KEY = Path("~/.config/leukoscreen/signing-key.pem")
SIGN_HINT = "sign it with `python -m convert sign BUNDLE_DIR` (the release engineer holds the key)"


class SignatureError(BundleError):
    """The bundle is unsigned, signed by an untrusted key, or its signature does not verify."""


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    path: Path
    key: Any = None  # cryptography's Ed25519PublicKey


@dataclass(frozen=True)
class Signed:
    """A verified signature: which trusted key, over which manifest."""

    key_id: str
    key_path: Path
    manifest_sha256: str
    signed: str

    def describe(self) -> str:
        return f"signed by key {self.key_id} ({self.key_path.name})"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise RuntimeUnavailableError("the 'cryptography' package is missing, so bundle signatures cannot be "
                                      "checked; on Raspberry Pi OS: sudo apt install python3-cryptography "
                                      "(or pip install cryptography)") from exc
    return serialization, ed25519, InvalidSignature


def key_id(public_key: Any) -> str:
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> TrustedKey:
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{path}: not a readable PEM public key ({exc}); replace it with the .pub file "
                             "`python -m convert sign --new-key` wrote") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 public key; bundles are signed "
                             "with Ed25519 keys made by `python -m convert sign --new-key`")
    return TrustedKey(key_id(key), path, key)


def trusted_keys(folder: Path) -> dict[str, TrustedKey]:
    """Every ``*.pub`` in ``folder`` by key id (a broken key file is an error, not skipped)."""
    if not folder.is_dir():
        return {}
    keys = {}
    for p in sorted(folder.glob("*.pub")):
        k = load_public_key(p)
        keys[k.key_id] = k
    return keys


def read_signature(bundle_dir: Path) -> dict:
    sig_path = bundle_dir / SIGNATURE
    if not sig_path.is_file():
        raise SignatureError(f"{sig_path}: missing: the bundle is unsigned, and this box only runs bundles signed "
                             f"by a trusted key; {SIGN_HINT}")
    try:
        doc = json.loads(sig_path.read_text())
        for k in ("key_id", "signature", "manifest_sha256"):
            if not isinstance(doc.get(k), str):
                raise ValueError(f"field {k!r} missing")
        if doc.get("algorithm", ALGORITHM) != ALGORITHM:
            raise ValueError(f"algorithm {doc['algorithm']!r}, not {ALGORITHM}")
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{sig_path}: not a valid signature file ({exc}); {SIGN_HINT}") from exc
    return doc


def verify_signature(bundle_dir: str | Path, keys_dir: Path, manifest: dict | None = None) -> Signed:
    """Check ``manifest.sig`` against the trusted keys in ``keys_dir``; :class:`SignatureError` says which and why.

    ``manifest`` is the parsed ``manifest.json`` (read here when not given). File hashes are
    :func:`device.bundle.load_bundle`'s job; together the two prove every file came from the signer.
    """
    _, _, InvalidSignature = _crypto()
    bundle_dir = Path(bundle_dir)
    where = bundle_dir / MANIFEST
    sig_path = bundle_dir / SIGNATURE
    if manifest is None:
        manifest = read_manifest(bundle_dir)
    doc = read_signature(bundle_dir)
    kid = doc["key_id"]
    keys = trusted_keys(keys_dir)
    if not keys:
        raise SignatureError(f"{keys_dir}: no trusted public keys (*.pub) on this box, so no bundle can be "
                             "accepted; copy the release key's .pub file there (README: Updating a box)")
    if kid not in keys:
        raise SignatureError(f"{sig_path}: signed by key {kid}, which this box does not trust (trusted: "
                             f"{', '.join(f'{k} ({v.path.name})' for k, v in keys.items())} in {keys_dir}); "
                             "get a bundle signed with a trusted key, or add the signer's .pub file to "
                             f"{keys_dir} if your organisation trusts it")
    data = canonical_manifest(manifest)
    digest = hashlib.sha256(data).hexdigest()
    try:
        raw = base64.b64decode(doc["signature"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{sig_path}: the signature is not base64 ({exc}); {SIGN_HINT}") from exc
    try:
        keys[kid].key.verify(raw, data)
    except InvalidSignature as exc:
        if doc["manifest_sha256"] != digest:
            raise SignatureError(
                f"{sig_path}: signature does not match manifest: key {kid} signed a manifest with sha256 "
                f"{doc['manifest_sha256'][:16]}..., {where} is now {digest[:16]}... (changed after signing, e.g. "
                f"re-bundled or edited); {SIGN_HINT} again") from exc
        raise SignatureError(f"{sig_path}: the signature by key {kid} ({keys[kid].path.name}) is not valid for "
                             f"{where}: the signature file is forged or damaged; get the bundle again from the "
                             "release engineer") from exc
    return Signed(kid, keys[kid].path, digest, str(doc.get("signed", "")))


#: What the child of :func:`verify_signature_apart` may raise, by name, so the parent raises the same class.
_APART_ERRORS = {e.__name__: e for e in (SignatureError, BundleError, RuntimeUnavailableError)}


def verify_signature_apart(bundle_dir: str | Path, keys_dir: Path, timeout_s: float = 60.0) -> Signed:
    """:func:`verify_signature` in a child Python process; the same result, or the same error class and message.

    A child costs about 0.2 s once at start-up; the service then never maps ``cryptography``.
    """
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "device.signing", str(bundle_dir), str(keys_dir)]
    stderr = ""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        stderr = out.stderr.strip()[-400:]
        doc = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        raise SignatureError(f"{bundle_dir}: the signature check's child process gave no answer ({exc}; {stderr}); "
                             f"run `python -m device.signing {bundle_dir} {keys_dir}` to see why") from exc
    if "error" in doc:
        raise _APART_ERRORS.get(doc["error"], SignatureError)(doc["message"])
    return Signed(doc["key_id"], Path(doc["key_path"]), doc["manifest_sha256"], doc["signed"])


def _verify_main(argv: list[str]) -> int:
    """``python -m device.signing BUNDLE_DIR KEYS_DIR``: one JSON line, the signature or the error."""
    if len(argv) != 2:
        print("usage: python -m device.signing BUNDLE_DIR KEYS_DIR", file=sys.stderr)
        return 2
    try:
        signed = verify_signature(argv[0], Path(argv[1]))
    except tuple(_APART_ERRORS.values()) as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return 1
    print(json.dumps({k: str(v) for k, v in asdict(signed).items()}))
    return 0


# -- signing (the host side; here so device tests and the toolchain share one implementation) --------------------


def new_private_key(path: Path) -> Path:
    """Generate an Ed25519 key pair: ``path`` (PEM, mode 0600) and ``path.pub``-style ``<stem>.pub`` next to it."""
    serialization, ed25519, _ = _crypto()
    path = path.expanduser()
    if path.exists():
        raise SignatureError(f"{path}: already exists; refusing to overwrite a signing key (drop --new-key to use it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = public_key_path(path)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


def public_key_path(private_key: Path) -> Path:
    return private_key.expanduser().with_suffix(".pub")


def load_private_key(path: Path) -> Any:
    serialization, ed25519, _ = _crypto()
    path = path.expanduser()
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise SignatureError(f"{path}: no private key; make one with `python -m convert sign --new-key --key "
                             f"{path}` (then give its .pub file to every box), or pass --key") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def sign_bundle(bundle_dir: str | Path, private_key: Path) -> Signed:
    """Write ``manifest.sig`` for the manifest as it is now (atomically: temp file, fsync, rename)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    key = load_private_key(private_key)
    data = canonical_manifest(manifest)
    kid = key_id(key.public_key())
    signed = datetime.now(UTC).isoformat(timespec="seconds")
    doc = {"algorithm": ALGORITHM, "key_id": kid, "manifest_sha256": hashlib.sha256(data).hexdigest(),
           "signed": signed, "signature": base64.b64encode(key.sign(data)).decode()}
    sig = bundle_dir / SIGNATURE
    tmp = sig.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, sig)
    return Signed(kid, public_key_path(private_key), doc["manifest_sha256"], signed)


if __name__ == "__main__":
    sys.exit(_verify_main(sys.argv[1:]))
