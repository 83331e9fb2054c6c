"""Evaluate the chain's outputs and write the shipped bundle into ``models/``.

Everything in ``models/REPORT.md`` and ``manifest.json`` is computed here from
the work folder of the same run, so the numbers always describe the files.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

from convert import data, report
from convert.options import (
    EDGETPU_FILE,
    EDGETPU_FRIENDLY_FILE,
    FIGURES_DIR,
    HEAD_FILE,
    METRICS_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    Options,
    paths,
)
from convert.scorecard import evaluate_all
from convert.steps import edgetpu, step_seconds
from device.bundle import MANIFEST, SCHEMA, load_bundle, sha256_file
from device.head import load_head
from device.status import Status

log = logging.getLogger(__name__)

TOOLS = ("torch", "onnx", "onnxruntime", "onnx2tf", "tensorflow", "ai-edge-litert", "scikit-learn", "numpy", "pillow")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()} {platform.system()}"}
    for t in TOOLS:
        try:
            out[t] = metadata.version(t)
        except metadata.PackageNotFoundError:
            out[t] = "absent"
    return out


def source_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "convert", "device"], capture_output=True,
                               text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_bundle(o: Options) -> Path:
    """Evaluate, then write models/: model, head, weights, figures, manifest, report."""
    pp = paths(o)
    out = Path(o.models)
    (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS_FILE).parent.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_all(o)
    shutil.copyfile(pp.tflite, out / MODEL_FILE)
    shutil.copyfile(pp.head, out / HEAD_FILE)
    shutil.copyfile(pp.weights, out / WEIGHTS_FILE)
    etpu = edgetpu(o)
    if etpu is not None:
        shutil.copyfile(etpu, out / EDGETPU_FILE)
    else:
        (out / EDGETPU_FILE).unlink(missing_ok=True)
    if pp.edgetpu_friendly.exists():  # the second graph of convert.quantize.to_int8_graphs, if made
        shutil.copyfile(pp.edgetpu_friendly, out / EDGETPU_FRIENDLY_FILE)
    else:
        (out / EDGETPU_FRIENDLY_FILE).unlink(missing_ok=True)
    from device.inference import TFLiteModel

    model = TFLiteModel(out / MODEL_FILE, num_threads=2)
    head = load_head(out / HEAD_FILE)
    quant = json.loads(pp.quant.read_text())
    exp = json.loads(pp.export.read_text())
    _, _, split_doc = data.read_split(pp.split)
    files = {"model": _entry(out, MODEL_FILE), "head": _entry(out, HEAD_FILE), "weights": _entry(out, WEIGHTS_FILE)}
    if etpu is not None:
        files["edgetpu_model"] = _entry(out, EDGETPU_FILE)
    if (out / EDGETPU_FRIENDLY_FILE).exists():
        files["model_edgetpu_friendly"] = _entry(out, EDGETPU_FRIENDLY_FILE)
    i, oo = model.input_spec, model.output_spec
    t, geo = metrics["test"], metrics["geometry"]
    manifest = {
        "schema": SCHEMA,
        "name": f"darknet19-all-int8-{dt.date.today().isoformat()}",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source_commit": source_commit(),
        "classes": list(head.classes),
        "benign_class": "Benign",
        "files": files,
        "input": {"size": i.size, "layout": "NHWC", "colour": "RGB", "dtype": i.dtype, "scale": i.scale,
                  "zero_point": i.zero_point, "field_px": geo["field_px"], "rbc_diameter_px": geo["rbc_diameter_px"],
                  "preprocessing": "device.preprocess.prepare: EXIF-upright RGB; the lit field (eyepiece disc or whole "
                                   "frame); a square of field_px source pixels (scaled by the camera's calibrated "
                                   "red-cell diameter) around it, outside the field filled with background; PIL "
                                   "bilinear resize to size; colour normalised so the background is grey 240; "
                                   "q = round(x/scale) + zero_point; normalisation is in the graph"},
        "output": {"features": oo.size, "dtype": oo.dtype, "scale": oo.scale, "zero_point": oo.zero_point},
        "quantization": {"tool": "onnx2tf full-integer", "weights": "int8 per-channel", "activations": "int8",
                         "calibration_images": quant["calibration_images"],
                         "activation_range": quant.get("activation_range", "min/max"),
                         "edgetpu_friendly": quant["edgetpu_friendly"], "op_types": quant["op_types"],
                         "edgetpu_friendly_op_types": quant.get("edgetpu_friendly_op_types"),
                         "onnx_vs_torch_max_abs_diff": exp["max_abs_diff"]},
        "head": {"k": head.k, "criterion": metrics["selection"]["criterion"], "svm_C": metrics["selection"]["C"],
                 "calibration": "Platt sigmoid per class (one-vs-rest) fitted on the validation split, normalised",
                 "ood_method": head.ood_method, "ood_threshold": head.ood_threshold},
        "thresholds": metrics["thresholds"],
        "slide": {"field_false_alert": metrics["slide_rules"]["field_false_alert"],
                  "field_false_alert_low": metrics["slide_rules"]["field_false_alert_low"],
                  "field_sensitivity": metrics["slide_rules"]["field_sensitivity"],
                  "duplicate_similarity": metrics["duplicates"]["threshold"]},
        "metrics": {
            "test": "newest acquisition numbers of each class (new-patient split)",
            "test_images": metrics["test_images"],
            "accuracy": t["accuracy"]["rate"],
            "accuracy_interval": [t["accuracy"]["lo"], t["accuracy"]["hi"]],
            "all_sensitivity": t["sensitivity"]["rate"],
            "benign_specificity": t["specificity"]["rate"],
            "all_called_benign_confident": t["all_called_benign_confident"],
            "int8_float_agreement": metrics["int8_float_agreement"]["rate"],
            "expected_calibration_error": t["calibration"]["ece"],
            "accuracy_cnn_softmax": metrics["cnn_softmax"]["accuracy"]["rate"],
        },
        "split": {"hash": split_doc["hash"], "train": metrics["train_images"], "val": metrics["val_images"],
                  "test": metrics["test_images"], **split_doc["params"]},
        "versions": versions(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    load_bundle(out)  # the device must accept what we ship
    manifest["references"] = add_references(out, held_out_candidates(o))
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    report.write(o, out, manifest, metrics, step_seconds(o))
    print(f"bundle -> {out}: int8 + SVM accuracy {manifest['metrics']['accuracy']:.4f} on {metrics['test_images']} "
          f"new-patient test images; ALL sensitivity {manifest['metrics']['all_sensitivity']:.4f}")
    return out


def _entry(root: Path, rel: str) -> dict:
    p = root / rel
    return {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size}


# --------------------------------------------------------------------------- reference images
REFERENCES_PER_CLASS = 2
#: Reference images are chosen well inside their decision, so a legitimate 1-LSB difference cannot flip them
#: and a flip means real trouble: confidence at least this far above the bundle's threshold where possible.
REFERENCE_MARGIN = 0.1
#: Candidates examined per class (in a fixed pseudo-random order) before settling for less decisive ones.
REFERENCE_CANDIDATES = 12


def held_out_candidates(o: Options) -> list[tuple[Path, str]]:
    """The held-out images of the run's split, with their class names as the bundle spells them."""
    _, parts, doc = data.read_split(paths(o).split)
    root = Path(doc["data_root"])
    return [(root / s.path, data.DISPLAY_NAMES.get(s.label, s.label)) for s in sorted(parts["test"],
                                                                                       key=lambda s: s.sha256)]


def add_references(out: Path, candidates: list[tuple[Path, str]], *, per_class: int = REFERENCES_PER_CLASS) -> dict:
    """Write ``references/`` into the bundle at ``out`` and its section into the manifest; returns the section.

    ``per_class`` images per class are taken from ``candidates`` (held-out images and their class), cut to the
    model's input size by the device's own preprocessing and saved as PNG, then read back and classified with
    :class:`device.classifier.Classifier` exactly as ``selftest`` will on the Pi; the raw int8 outputs and the
    decisions become the expected values. Images whose decision is correct and clear of the confidence threshold
    by :data:`REFERENCE_MARGIN` are preferred.
    """
    from PIL import Image

    from device.classifier import Classifier
    from device.preprocess import frame_to_rgb, load_image
    from device.reference import EXPECTED_FILE, FOLDER, write_expected

    doc = json.loads((out / MANIFEST).read_text())
    doc.pop("references", None)
    (out / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
    folder = out / FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    bundle = load_bundle(out)
    clf = Classifier.open(bundle, num_threads=2, use_edgetpu=False)
    size = bundle.input.size
    chosen: list[dict] = []
    for cls in bundle.classes:
        mine = [p for p, c in candidates if c == cls][:REFERENCE_CANDIDATES]
        if not mine:
            raise data.DatasetError(f"no held-out image of class {cls!r} to take reference images from")
        tried = []
        for src in mine:
            rgb = frame_to_rgb(np.asarray(load_image(src), dtype=np.uint8), size)
            v = clf.classify(rgb).verdict
            clear = v.status == Status.OK and v.label == cls and v.confidence >= bundle.thresholds.confidence + \
                REFERENCE_MARGIN
            margin = abs(v.confidence - bundle.thresholds.confidence)
            tried.append((not clear, -margin, len(tried), src, rgb))
        for _, _, _, src, rgb in sorted(tried, key=lambda t: t[:3])[:per_class]:
            name = f"{FOLDER}/{cls.lower().replace(' ', '-')}-{sum(c['class'] == cls for c in chosen) + 1}.png"
            Image.fromarray(rgb, "RGB").save(out / name, format="PNG")
            chosen.append({"name": name, "source": src.name, "class": cls})
    feats, probs, verdicts = [], [], []
    for c in chosen:  # read back: the device classifies the PNG file, not the array it was saved from
        q, timed = clf.screen(np.asarray(load_image(out / c["name"]), dtype=np.uint8))
        feats.append(q)
        probs.append([timed.verdict.scores[k] for k in bundle.classes])
        verdicts.append(timed.verdict)
    write_expected(out / EXPECTED_FILE, names=[c["name"] for c in chosen], sources=[c["source"] for c in chosen],
                   classes=[c["class"] for c in chosen], features_q=np.stack(feats).astype(np.int8),
                   probs=np.array(probs), verdicts=verdicts)
    section = {"expected": _entry(out, EXPECTED_FILE),
               "images": [_entry(out, c["name"]) for c in chosen],
               "made_on": f"{platform.machine()} {platform.system()}, {clf.model.runtime}, {clf.model.delegate}",
               "note": "raw int8 model outputs and decisions on the build machine; `python -m device selftest` "
                       "compares this machine's with them (device/reference.py)"}
    doc["references"] = section
    (out / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
    refs = load_bundle(out).references  # the device must accept them, and agree with itself
    print(f"references -> {folder}: {len(chosen)} images; "
          + ", ".join(f"{p.stem}: {d}" for p, d in zip(refs.images, refs.decisions)))
    return section
