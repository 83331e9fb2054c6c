"""Reference images: the bundle's guard against this machine's int8 arithmetic differing from the build machine's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from device.bundle import load_bundle, sha256_file
from device.classifier import Classifier
from device.cli import main
from device.errors import BundleError
from device.preprocess import load_image
from device.reference import EXPECTED_FILE, MAX_LSB, check_references
from tests.conftest import resign
from tests.device.test_cli import write_config

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "models"


def _copy(tiny_bundle, tmp: Path) -> Path:
    dst = tmp / "bundle"
    shutil.copytree(tiny_bundle.root, dst)
    return dst


def _rehash(root: Path, rel: str) -> None:
    """Make the manifest agree with an edited file, and sign it (what a careless rebuild would do)."""
    doc = json.loads((root / "manifest.json").read_text())
    sec = doc["references"]
    for e in [sec["expected"], *sec["images"]]:
        if e["path"] == rel:
            e["sha256"] = sha256_file(root / rel)
    (root / "manifest.json").write_text(json.dumps(doc, indent=1))
    resign(root)


def _tamper(root: Path, *, lsb: int = 0, status: str | None = None) -> None:
    with np.load(root / EXPECTED_FILE) as z:
        arr = {k: z[k] for k in z.files}
    arr["features_q"] = arr["features_q"].copy()
    arr["features_q"][0, 7] = np.int8(int(arr["features_q"][0, 7]) + (lsb if arr["features_q"][0, 7] < 0 else -lsb))
    if status is not None:
        arr["status"] = np.array([str(s) if i != 1 else status for i, s in enumerate(arr["status"])])
    with open(root / EXPECTED_FILE, "wb") as f:
        np.savez(f, **arr)
    _rehash(root, EXPECTED_FILE)


def test_the_fixture_bundle_carries_references_that_this_machine_reproduces(tiny_bundle, tiny_classifier):
    refs = tiny_bundle.references
    assert refs is not None and len(refs) == 8
    assert sorted(set(refs.classes)) == sorted(tiny_bundle.classes)  # two per class
    assert refs.features_q.dtype == np.int8 and refs.features_q.shape == (8, tiny_bundle.n_features)
    result = check_references(tiny_bundle, tiny_classifier)
    assert result.ok and result.n == 8 and not result.mismatches and result.max_lsb == MAX_LSB
    assert result.max_lsb_diff <= 1  # x86 built them; another x86 runtime may round one step differently
    assert result.summary.startswith("reference images: 8, decisions identical, max |LSB| ")


@pytest.mark.skipif(not (REAL / "manifest.json").is_file(), reason="the real bundle is not in models/")
def test_the_shipped_bundle_carries_references_of_every_class():
    bundle = load_bundle(REAL)
    assert bundle.references is not None and len(bundle.references) >= 8
    assert set(bundle.references.classes) == set(bundle.classes)
    assert all(d.startswith("ok ") for d in bundle.references.decisions)  # chosen clear of the threshold


def test_features_past_the_bound_fail_the_check_and_selftest(tmp_path, tiny_bundle, capsys):
    root = _copy(tiny_bundle, tmp_path)
    _tamper(root, lsb=MAX_LSB + 2)
    bundle = load_bundle(root)
    result = check_references(bundle, Classifier.open(bundle, num_threads=1, use_edgetpu=False))
    assert not result.ok and not result.mismatches
    assert result.max_lsb_diff >= MAX_LSB + 2 and result.worst_image.endswith("benign-1.png")
    assert "past the bound" in result.summary
    assert main(["selftest", "--config", str(write_config(tmp_path, model=root)), "--min-accuracy", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAIL references: reference images: 8" in out and "selftest FAILED: references" in out
    # a looser bound, asked for explicitly, passes
    assert main(["selftest", "--config", str(write_config(tmp_path, model=root)), "--min-accuracy", "0",
                 "--max-lsb", str(MAX_LSB + 10)]) == 0


def test_a_different_decision_fails_and_names_the_image(tmp_path, tiny_bundle):
    root = _copy(tiny_bundle, tmp_path)
    _tamper(root, status="retake")
    bundle = load_bundle(root)
    result = check_references(bundle, Classifier.open(bundle, num_threads=1, use_edgetpu=False))
    assert not result.ok and len(result.mismatches) == 1
    image, want, got = result.mismatches[0]
    assert image.endswith("benign-2.png") and want.startswith("retake") and got != want
    assert "1 decision(s) differ: benign-2.png expected retake" in result.summary


def test_an_edited_reference_image_is_refused_at_load(tmp_path, tiny_bundle):
    root = _copy(tiny_bundle, tmp_path)
    img = root / "references" / "pro-b-1.png"
    img.write_bytes(img.read_bytes() + b"\0")
    with pytest.raises(BundleError, match=r"pro-b-1.png: sha256 is .*references.images\[6\]"):
        load_bundle(root)


def test_references_from_another_model_are_refused_at_load(tmp_path, tiny_bundle):
    root = _copy(tiny_bundle, tmp_path)
    with np.load(root / EXPECTED_FILE) as z:
        arr = {k: z[k] for k in z.files}
    arr["features_q"] = arr["features_q"][:, :500]
    with open(root / EXPECTED_FILE, "wb") as f:
        np.savez(f, **arr)
    _rehash(root, EXPECTED_FILE)
    bundle = load_bundle(root)  # the feature length is the model's business: checked against it, not at load
    with pytest.raises(BundleError, match=r"500 values, the model gives 1000.*another build.*convert references"):
        check_references(bundle, Classifier.open(bundle, num_threads=1, use_edgetpu=False))


def test_an_older_bundle_without_references_loads_and_selftest_says_so(tmp_path, tiny_bundle, capsys):
    root = _copy(tiny_bundle, tmp_path)
    doc = json.loads((root / "manifest.json").read_text())
    del doc["references"]
    (root / "manifest.json").write_text(json.dumps(doc))
    resign(root)
    shutil.rmtree(root / "references")
    bundle = load_bundle(root)
    assert bundle.references is None
    with pytest.raises(BundleError, match="no reference images in this bundle"):
        check_references(bundle, Classifier.open(bundle, num_threads=1, use_edgetpu=False))
    assert main(["selftest", "--config", str(write_config(tmp_path, model=root)), "--min-accuracy", "0"]) == 0
    assert "ok   references: no reference images in this bundle" in capsys.readouterr().out


def test_screen_gives_the_raw_int8_output_behind_the_verdict(tiny_bundle, tiny_classifier):
    frame = np.asarray(load_image(tiny_bundle.references.images[0]))
    q, timed = tiny_classifier.screen(frame)
    assert q.dtype == np.int8 and q.shape == (tiny_bundle.n_features,)
    assert timed.verdict == tiny_classifier.classify(frame).verdict
    np.testing.assert_array_equal(tiny_classifier.model.dequantize(q), tiny_classifier.features(frame))
