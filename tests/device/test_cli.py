"""``python -m device``: classify, check-config, selftest, and run as a real process (SIGTERM, SIGKILL)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from device.cli import main
from device.commands.selftest import sample_label
from tests.conftest import TEST_KEYS
from tests.device.proc import DeviceProc

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "device" / "samples"
TINY = ROOT / "tests" / "fixtures" / "bundle"
REAL = ROOT / "models"




def write_config(tmp: Path, model: Path = TINY, **extra: str) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(f"""
[model]
dir = "{model}"
keys_dir = "{TEST_KEYS}"
threads = 1
use_edgetpu = false
[camera]
source = "replay"
interval_ms = 0
[trigger]
interval_ms = 0
[gpio]
mock = "yes"
[store]
state_dir = "{tmp / 'state'}"
reserve_mb = 0
[web]
port = 0
""" + "\n".join(extra.values()))
    return cfg


def test_classify_json_prints_one_object_per_image_and_fails_on_unreadable_files(tmp_path, capsys,
                                                                                 tiny_bundle) -> None:
    junk = tmp_path / "notes.jpg"
    junk.write_text("not a photo")
    images = sorted(SAMPLES.glob("*.jpg"))[:3]
    code = main(["classify", "--config", str(write_config(tmp_path)), "--json", *map(str, images), str(junk)])
    assert code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["file"] for r in recs] == [*map(str, images), str(junk)]
    for r in recs[:3]:
        assert r["status"] in ("ok", "refer") and set(r["scores"]) == set(tiny_bundle.classes)
        assert (r["label"] in tiny_bundle.classes) if r["status"] == "ok" else r["label"] is None
        assert isinstance(r["all"], bool) and 0 <= r["confidence"] <= 1 and isinstance(r["reason"], str)
    assert recs[3]["status"] == "error" and "notes.jpg" in recs[3]["reason"]
    assert main(["classify", "--config", str(write_config(tmp_path)), *map(str, images)]) == 0


@pytest.mark.skipif(not (REAL / "manifest.json").is_file(), reason="the real bundle is not in models/ yet")
def test_the_shipped_bundle_never_misses_an_all_sample_and_false_alarms_at_most_once(capsys) -> None:
    """The 12 samples (new-patient test images picked by position): every ALL sample is labelled with its own
    subtype and raises ALL; no benign sample is missed the other way round either, but the bundle raises a
    false ALL alarm on new-patient benign fields at a measured rate (13 of 104 in REPORT.md), and one of the
    three benign samples, Benign-411, is such a field: at most one benign sample may be a false alarm, and every
    other benign sample is labelled Benign or referred."""
    images = sorted(SAMPLES.glob("*.jpg"))
    assert main(["classify", "--json", *map(str, images)]) == 0
    from device.bundle import load_bundle

    bundle = load_bundle(REAL)
    recs = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    truth = {r["file"]: sample_label(Path(r["file"]), bundle.classes) for r in recs}
    blasts = [r for r in recs if truth[r["file"]] != bundle.benign]
    assert len(blasts) == 9 and all(r["status"] == "ok" and r["label"] == truth[r["file"]] and r["all"]
                                    for r in blasts)
    benign = [r for r in recs if truth[r["file"]] == bundle.benign]
    alarms = [r for r in benign if r["all"]]
    assert len(alarms) <= 1
    assert all(r["label"] == bundle.benign or r["status"] == "refer" for r in benign if not r["all"])
    assert all(r["status"] in ("ok", "refer") for r in recs)


def test_sample_names_give_their_class() -> None:
    classes = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
    assert sample_label(Path("Early-Pre-B__WBC-Malignant-Early-187.jpg"), classes) == "Early Pre-B"
    assert sample_label(Path("Pre-B__x.jpg"), classes) == "Pre-B"
    assert sample_label(Path("x.jpg"), classes) is None
    labels = {sample_label(p, classes) for p in SAMPLES.glob("*.jpg")}
    assert labels == set(classes) and len(list(SAMPLES.glob("*.jpg"))) == 12
    assert (SAMPLES / "ATTRIBUTION.md").is_file()


def test_check_config(tmp_path, capsys) -> None:
    assert main(["check-config", "--config", str(write_config(tmp_path))]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[camera]\nsource = \"webcam\"\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "camera.source = 'webcam'" in err and "'replay'" in err and "Traceback" not in err


def test_selftest_passes_with_a_good_bundle_and_fails_without_one(tmp_path, capsys, tiny_bundle) -> None:
    cfg = write_config(tmp_path)
    assert main(["selftest", "--config", str(cfg), "--min-accuracy", "0"]) == 0
    out = capsys.readouterr().out
    assert "selftest PASSED" in out and "ok   samples: 12 images" in out and "ok   leds" in out
    assert "frame JPEGs by simplejpeg" in out  # a device dependency: the recorder encodes without the GIL
    assert "network check off (a bundle from before 2026-12-08)" in out  # the tiny fixture bundle has none
    broken = write_config(tmp_path, model=tmp_path / "nowhere")
    assert main(["selftest", "--config", str(broken)]) == 1
    assert "FAIL bundle" in capsys.readouterr().out


def test_device_never_imports_the_toolchain() -> None:
    code = ("import sys, device.cli, device.app, device.service, device.sources, device.store, device.leds, "
            "device.config, device.quality, device.slides, device.notify; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorflow', 'sklearn', 'convert', "
            "'picamera2', 'onnx', 'cv2'}); print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_usage_errors_exit_2() -> None:
    assert main([]) == 2
    assert main(["frobnicate"]) == 2


# -- the real process -----------------------------------------------------------------------------------------


def test_sigterm_stops_cleanly_after_ready(tmp_path, short_tmp, notify_socket, wait, tiny_bundle) -> None:
    proc = DeviceProc(write_config(tmp_path), notify_socket.path)
    try:
        assert notify_socket.wait_for("READY=1", 60), "\n".join(proc.lines)
        assert wait(lambda: len(proc.shown_ids()) >= 2, 60)
        assert notify_socket.wait_for("WATCHDOG=1", 30)
        proc.p.send_signal(signal.SIGTERM)
        assert proc.finish() == 0, "\n".join(proc.lines[-20:])
    finally:
        if proc.p.poll() is None:
            proc.p.kill()
    assert notify_socket.wait_for("STOPPING=1", 5)
    with sqlite3.connect(tmp_path / "state" / "results.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM slides WHERE ended IS NULL").fetchone()[0] == 0
    assert (tmp_path / "state" / "token").stat().st_mode & 0o077 == 0


def test_sigkill_mid_run_loses_no_shown_result(tmp_path, notify_socket, wait, tiny_bundle) -> None:
    proc = DeviceProc(write_config(tmp_path), notify_socket.path)
    try:
        assert notify_socket.wait_for("READY=1", 60), "\n".join(proc.lines)
        assert wait(lambda: len(proc.shown_ids()) >= 8, 60), "\n".join(proc.lines[-20:])
    finally:
        proc.p.send_signal(signal.SIGKILL)  # no chance to flush or close anything
        proc.finish()
    shown = proc.shown_ids()
    assert len(shown) >= 8
    db = sqlite3.connect(tmp_path / "state" / "results.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {r[0] for r in db.execute("SELECT id FROM fields")}
        assert set(shown) <= stored, f"shown but lost: {sorted(set(shown) - stored)}"
        marks = ",".join("?" * len(shown))
        images = [r[0] for r in db.execute(f"SELECT image FROM fields WHERE id IN ({marks}) AND image IS NOT NULL",
                                           shown)]
        assert len(images) == len(shown)
        assert all((tmp_path / "state" / i).is_file() for i in images)
    finally:
        db.close()
    # and the next start tidies up after the crash: the open slide is closed, strays removed, loop runs
    from device.store import ResultStore

    s = ResultStore(tmp_path / "state")
    try:
        assert s.close_open_slides()
        assert s.count() >= len(shown)
    finally:
        s.close()
