"""Updating a box: signed bundles, ``install-bundle``, ``rollback``, and kill -9 during an install.

Every case runs the real commands (``device.cli.main`` in-process, or ``python -m device`` as a real process
for the kills) on copies of the tiny fixture bundle, signed with throwaway Ed25519 keys made here.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device.bundle import SCHEMA, load_bundle, sha256_file
from device.bundles_dir import ACTIVE, PREVIOUS, active_bundle, pinned_files, previous_bundle
from device.cli import main
from device.install import installed, verify_bundle
from device.reference import EXPECTED_FILE
from device.signing import SIGNATURE, SignatureError, new_private_key, sign_bundle, verify_signature
from tests.conftest import TEST_KEYS
from tests.device.conftest import SAMPLES, TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def box(tmp_path: Path) -> dict:
    """A box: trusted keys (a throwaway release key + the TEST key the factory bundle is signed with), a config."""
    keys = tmp_path / "keys"
    keys.mkdir()
    release = tmp_path / "release" / "signing-key.pem"
    pub = new_private_key(release)
    shutil.copy(pub, keys / "release.pub")
    shutil.copy(TEST_KEYS / "TEST-ONLY-signing-key.pub", keys / "factory-test.pub")
    state = tmp_path / "state"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[model]
dir = "{TINY}"
threads = 1
use_edgetpu = false
keys_dir = "{keys}"
[camera]
source = "replay"
replay_dir = "{SAMPLES}"
interval_ms = 0
[gpio]
mock = "yes"
[store]
state_dir = "{state}"
reserve_mb = 0
[web]
port = 0
""")
    return {"keys": keys, "key": release, "cfg": cfg, "bundles": state / "bundles", "tmp": tmp_path}


def make_bundle(box: dict, name: str, *, sign: bool = True, key: Path | None = None, edit=None) -> Path:
    """A copy of the tiny bundle called ``name`` (so its id differs), optionally edited, then signed."""
    dst = box["tmp"] / "stick" / name
    shutil.copytree(TINY, dst)
    (dst / SIGNATURE).unlink()
    doc = json.loads((dst / "manifest.json").read_text())
    doc["name"] = name
    if edit is not None:
        edit(dst, doc)
    (dst / "manifest.json").write_text(json.dumps(doc, indent=1))
    if sign:
        sign_bundle(dst, key or box["key"])
    return dst


def install(box: dict, path: Path, capsys) -> tuple[int, str]:
    code = main(["install-bundle", str(path), "--config", str(box["cfg"]), "--no-restart"])
    out = capsys.readouterr()
    return code, out.out + out.err


def active_id(box: dict) -> str:
    return installed(box["bundles"], TINY).active


def assert_refused(box: dict, path: Path, capsys, *words: str) -> None:
    before = active_id(box)
    code, out = install(box, path, capsys)
    assert code == 1, out
    for w in words:
        assert w in out, (w, out)
    assert "Traceback" not in out
    assert active_id(box) == before  # nothing switched
    leftovers = [p.name for p in box["bundles"].iterdir() if p.name.startswith(".incoming")] \
        if box["bundles"].is_dir() else []
    assert leftovers == []


# -- signatures ------------------------------------------------------------------------------------------------


def test_sign_then_verify_names_the_key_and_every_refusal_says_which_key_and_why(box, tmp_path) -> None:
    b = make_bundle(box, "tiny-a")
    signed = verify_signature(b, box["keys"])
    assert signed.key_path.name == "release.pub" and len(signed.key_id) == 16
    sig = json.loads((b / SIGNATURE).read_text())
    assert sig["algorithm"] == "Ed25519" and sig["key_id"] == signed.key_id

    # the manifest edited after signing (e.g. re-bundled): a stale signature, said so
    doc = json.loads((b / "manifest.json").read_text())
    doc["thresholds"]["confidence"] = 0.1
    (b / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="signature does not match manifest.*python -m convert sign"):
        verify_signature(b, box["keys"])

    # a forged signature over the right digest
    sign_bundle(b, box["key"])
    sig = json.loads((b / SIGNATURE).read_text())
    sig["signature"] = base64.b64encode(bytes(64)).decode()
    (b / SIGNATURE).write_text(json.dumps(sig))
    with pytest.raises(SignatureError, match=f"signature by key {sig['key_id']}.*not valid.*forged or damaged"):
        verify_signature(b, box["keys"])

    # re-indenting the manifest does not break the signature (canonical bytes are signed)
    sign_bundle(b, box["key"])
    (b / "manifest.json").write_text(json.dumps(json.loads((b / "manifest.json").read_text()), indent=4))
    verify_signature(b, box["keys"])

    # no trusted keys at all
    with pytest.raises(SignatureError, match="no trusted public keys"):
        verify_signature(b, tmp_path / "empty")


def test_unsigned_bundle_is_refused(box, capsys) -> None:
    assert_refused(box, make_bundle(box, "tiny-unsigned", sign=False), capsys,
                   SIGNATURE, "missing", "unsigned", "python -m convert sign")


def test_bundle_signed_by_an_untrusted_key_is_refused_naming_the_key(box, tmp_path, capsys) -> None:
    stranger = tmp_path / "stranger" / "key.pem"
    new_private_key(stranger)
    b = make_bundle(box, "tiny-stranger", key=stranger)
    kid = json.loads((b / SIGNATURE).read_text())["key_id"]
    assert_refused(box, b, capsys, f"signed by key {kid}", "does not trust", "release.pub", str(box["keys"]))


def test_tampered_file_is_refused(box, capsys) -> None:
    def flip(dst: Path, _doc: dict) -> None:
        data = bytearray((dst / "head.npz").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (dst / "head.npz").write_bytes(bytes(data))  # after signing nothing changes the manifest: the hash catches it

    assert_refused(box, make_bundle(box, "tiny-tampered", edit=flip), capsys, "head.npz", "sha256", "corrupt")


def test_tampered_manifest_is_refused(box, capsys) -> None:
    b = make_bundle(box, "tiny-edited")
    doc = json.loads((b / "manifest.json").read_text())
    doc["files"]["head"]["sha256"] = sha256_file(b / "head.npz")[::-1]
    (b / "manifest.json").write_text(json.dumps(doc))
    assert_refused(box, b, capsys, "signature does not match manifest")


def test_schema_from_the_future_is_refused(box, capsys) -> None:
    b = make_bundle(box, "tiny-future", edit=lambda _d, doc: doc.update(schema=SCHEMA + 1))
    assert_refused(box, b, capsys, f"schema is {SCHEMA + 1}", f"reads schema {SCHEMA}",
                   "update the device software")


def test_reference_images_that_disagree_are_refused(box, capsys) -> None:
    def disagree(dst: Path, doc: dict) -> None:
        with np.load(dst / EXPECTED_FILE) as z:
            arr = {k: z[k] for k in z.files}
        arr["status"] = np.array(["refer" if s == "ok" else "ok" for s in arr["status"]])  # every decision flipped
        with open(dst / EXPECTED_FILE, "wb") as f:
            np.savez(f, **arr)
        doc["references"]["expected"]["sha256"] = sha256_file(dst / EXPECTED_FILE)

    b = make_bundle(box, "tiny-disagree", edit=disagree)
    verify_signature(b, box["keys"])  # correctly signed: only running it here shows the problem
    assert_refused(box, b, capsys, "reference images do not give the same results on this box", "decision(s) differ",
                   "keep the current bundle")


def test_a_bundle_without_reference_images_is_refused(box, capsys) -> None:
    def strip(dst: Path, doc: dict) -> None:
        del doc["references"]
        shutil.rmtree(dst / "references")

    assert_refused(box, make_bundle(box, "tiny-norefs", edit=strip), capsys, "no reference images in this bundle")


def test_the_service_refuses_to_start_on_an_unsigned_bundle_unless_configured(box, tmp_path, capsys) -> None:
    b = make_bundle(box, "tiny-dev", sign=False)
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle(b, box["keys"], references=False)
    v = verify_bundle(b, box["keys"], require_signature=False, references=False)
    assert v.signed is None and v.bundle.name == "tiny-dev"
    cfg = box["cfg"].read_text().replace(f'dir = "{TINY}"', f'dir = "{b}"')
    box["cfg"].write_text(cfg)
    assert main(["classify", "--config", str(box["cfg"]), str(sorted(SAMPLES.glob("*.jpg"))[0])]) == 1
    assert "unsigned" in capsys.readouterr().err
    box["cfg"].write_text(cfg.replace("use_edgetpu = false", "use_edgetpu = false\nrequire_signature = false"))
    assert main(["classify", "--config", str(box["cfg"]), str(sorted(SAMPLES.glob("*.jpg"))[0])]) == 0


# -- install, switch, rollback ---------------------------------------------------------------------------------


def test_install_switches_keeps_the_previous_and_rollback_returns_to_it(box, capsys) -> None:
    factory = load_bundle(TINY).id
    assert active_id(box) == factory and installed(box["bundles"], TINY).factory

    a = make_bundle(box, "tiny-a")
    code, out = install(box, a, capsys)
    assert code == 0, out
    a_id = load_bundle(a).id
    assert f"active:   {a_id}" in out and f"previous: {factory}" in out and "reference images: 8" in out
    assert "signed by key" in out and "release.pub" in out
    assert active_bundle(box["bundles"]).name == a_id and (box["bundles"] / ACTIVE).is_symlink()
    assert previous_bundle(box["bundles"]) == TINY.resolve()  # the factory bundle is what rollback returns to
    # only the manifest, its signature and the files it pins were installed
    pinned = pinned_files(json.loads((a / "manifest.json").read_text()), a)
    got = {p.name for p in (box["bundles"] / a_id).iterdir()}
    assert got == {Path(p).parts[0] for p in pinned} | {"manifest.json", SIGNATURE}
    assert {"darknet19_int8.tflite", "head.npz", "references"} <= got and not {"REPORT.md", "figures"} & got
    assert all(sha256_file(box["bundles"] / a_id / p) == sha256_file(a / p) for p in pinned)

    b = make_bundle(box, "tiny-b")
    assert install(box, b, capsys)[0] == 0
    b_id = load_bundle(b).id
    st = installed(box["bundles"], TINY)
    assert (st.active, st.previous, st.factory) == (b_id, a_id, False)
    # the device now runs it: selftest and the resolved config follow the pointer
    assert main(["bundles", "--config", str(box["cfg"])]) == 0
    assert f"active:   {b_id}" in capsys.readouterr().out

    code, out = install(box, b, capsys)
    assert code == 1 and "already the active bundle" in out

    assert main(["rollback", "--config", str(box["cfg"]), "--no-restart"]) == 0
    out = capsys.readouterr().out
    assert f"active:   {a_id}" in out and f"previous: {b_id}" in out
    st = installed(box["bundles"], TINY)
    assert (st.active, st.previous) == (a_id, b_id)
    assert main(["rollback", "--config", str(box["cfg"]), "--no-restart"]) == 0  # and forward again
    assert installed(box["bundles"], TINY).active == b_id

    c = make_bundle(box, "tiny-c")  # a third install prunes the bundle that is neither active nor previous
    assert install(box, c, capsys)[0] == 0
    names = sorted(p.name for p in box["bundles"].iterdir() if not p.name.startswith("."))
    assert names == sorted([ACTIVE, PREVIOUS, b_id, load_bundle(c).id])


def test_rollback_without_a_previous_bundle_says_so(box, capsys) -> None:
    assert main(["rollback", "--config", str(box["cfg"]), "--no-restart"]) == 1
    assert "no previous bundle to return to" in capsys.readouterr().err


# -- kill -9 during an install ---------------------------------------------------------------------------------


def _install_proc(box: dict, path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "device", "install-bundle", str(path), "--config", str(box["cfg"]),
                             "--no-restart"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_9_at_20_random_moments_during_install_leaves_one_complete_bundle_active(box) -> None:
    a, b = make_bundle(box, "tiny-a"), make_bundle(box, "tiny-b")
    ids = {load_bundle(TINY).id: TINY, load_bundle(a).id: a, load_bundle(b).id: b}
    t0 = time.monotonic()
    p = _install_proc(box, a)
    out, _ = p.communicate(timeout=120)
    full = time.monotonic() - t0
    assert p.returncode == 0, out
    rng = random.Random(15)
    outcomes = []
    for i in range(20):
        current = active_id(box)
        target = b if current == load_bundle(a).id else a  # always install the one not running
        delay = rng.uniform(0.0, full * 1.1)
        p = _install_proc(box, target)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        act = active_bundle(box["bundles"])
        assert act is not None, f"kill {i} at {delay:.2f} s: no active bundle"
        v = verify_bundle(act, box["keys"], references=True)  # signature, every sha256, model, references
        assert v.bundle.id in ids and v.bundle.id in (current, load_bundle(target).id), (i, delay, v.bundle.id)
        outcomes.append(v.bundle.id == current)
    # the moments were spread over the install: some kills came before the switch, and some after
    assert any(outcomes), "every kill landed after the switch; the moments do not cover the install"
    # an interrupted install leaves nothing that blocks the next one
    p = _install_proc(box, b if active_id(box) != load_bundle(b).id else a)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert not [q for q in box["bundles"].iterdir() if q.name.startswith((".incoming", ".trash"))]


def test_the_service_checks_the_signature_in_a_child_with_the_same_answer(box) -> None:
    """``verify_signature_apart`` (what ``run`` uses) agrees with ``verify_signature`` on a good and a forged
    bundle, and the process that opened the bundle never imported ``cryptography`` (its resident memory)."""
    from device.signing import verify_signature_apart

    good = make_bundle(box, "tiny-apart")
    assert verify_signature_apart(good, box["keys"]) == verify_signature(good, box["keys"])
    forged = make_bundle(box, "tiny-forged")
    sig = json.loads((forged / SIGNATURE).read_text())
    sig["signature"] = base64.b64encode(bytes(64)).decode()
    (forged / SIGNATURE).write_text(json.dumps(sig))
    with pytest.raises(SignatureError) as here:
        verify_signature(forged, box["keys"])
    with pytest.raises(SignatureError) as apart:
        verify_signature_apart(forged, box["keys"])
    assert str(apart.value) == str(here.value) and "forged or damaged" in str(apart.value)

    cfg = box["cfg"].read_text().replace(f'dir = "{TINY}"', f'dir = "{good}"')
    box["cfg"].write_text(cfg)
    probe = ("import sys\nfrom device import config\nfrom device.app import open_bundle\n"
             f"c = config.load({str(box['cfg'])!r})\nv = open_bundle(c, config.resolve(c, on_pi=False))\n"
             "print(v.signed.key_id, 'cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [verify_signature(good, box["keys"]).key_id, "False"]
