"""The bundle's optional graphs: the Edge-TPU-friendly graph is verified like every file but never runs on the
CPU; bundles without it (every bundle before issue 13) still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from device.bundle import MANIFEST, load_bundle, sha256_file
from device.classifier import Classifier
from device.errors import BundleError, BundleMissingError


def with_friendly_graph(src: Path, dst: Path, *, corrupt: bool = False) -> Path:
    """A copy of ``src`` whose manifest names an Edge-TPU-friendly graph (here: a copy of the CPU graph)."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / MANIFEST).read_text())
    friendly = dst / "darknet19_int8_edgetpu_friendly.tflite"
    friendly.unlink(missing_ok=True)
    shutil.copyfile(dst / doc["files"]["model"]["path"], friendly)
    doc["files"]["model_edgetpu_friendly"] = {"path": friendly.name, "sha256": sha256_file(friendly),
                                              "bytes": friendly.stat().st_size}
    (dst / MANIFEST).write_text(json.dumps(doc, indent=1))
    if corrupt:
        with open(friendly, "r+b") as f:
            f.seek(100)
            f.write(b"\x00\x01\x02\x03")
    return dst


def test_a_bundle_without_the_second_graph_loads(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "cpu-only"
    shutil.copytree(tiny_bundle_dir, dst)
    doc = json.loads((dst / MANIFEST).read_text())
    (dst / doc["files"].pop("model_edgetpu_friendly")["path"]).unlink()
    (dst / MANIFEST).write_text(json.dumps(doc, indent=1))
    b = load_bundle(dst)
    assert b.edgetpu_friendly_path is None and b.edgetpu_path is None


def test_the_friendly_graph_is_verified_but_the_cpu_runs_the_cpu_graph(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    b = load_bundle(with_friendly_graph(tiny_bundle_dir, tmp_path / "b"))
    assert b.edgetpu_friendly_path == tmp_path / "b" / "darknet19_int8_edgetpu_friendly.tflite"
    clf = Classifier.open(b, num_threads=1, use_edgetpu=True)  # no Edge TPU here, and no compiled graph
    assert clf.model.delegate == "cpu" and clf.model.path == b.model_path
    assert clf.classify(np.full((300, 400, 3), 180, np.uint8)).verdict.status in ("ok", "refer")


def test_a_corrupt_or_missing_friendly_graph_is_refused_naming_the_entry(tiny_bundle_dir: Path,
                                                                          tmp_path: Path) -> None:
    bad = with_friendly_graph(tiny_bundle_dir, tmp_path / "bad", corrupt=True)
    with pytest.raises(BundleError, match=r"files\.model_edgetpu_friendly\.sha256"):
        load_bundle(bad)
    (bad / "darknet19_int8_edgetpu_friendly.tflite").unlink()
    with pytest.raises(BundleMissingError, match=r"files\.model_edgetpu_friendly"):
        load_bundle(bad)


@pytest.mark.parametrize("low", [None, 0.004])
def test_the_slide_rates_lower_false_alert_end_is_optional(tiny_bundle_dir: Path, tmp_path: Path, low) -> None:
    """Bundles made before the interval's lower end was measured carry one rate; newer ones carry both."""
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle_dir, dst)
    doc = json.loads((dst / MANIFEST).read_text())
    doc["slide"].pop("field_false_alert_low", None)
    if low is not None:
        doc["slide"]["field_false_alert_low"] = low
    (dst / MANIFEST).write_text(json.dumps(doc, indent=1))
    assert load_bundle(dst).slide.field_false_alert_low == low
