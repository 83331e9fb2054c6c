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

from convert import data
from convert.evaluate import binary, held_out, lsb_robustness, per_class, table2
from convert.steps import Options, _load, paths, step_seconds
from device.bundle import MANIFEST, SCHEMA, Thresholds, load_bundle, sha256_file
from device.head import evaluate_many, load_head

log = logging.getLogger(__name__)

MODEL_FILE = "darknet19_int8.tflite"
EDGETPU_FILE = "darknet19_int8_edgetpu.tflite"
HEAD_FILE = "head.npz"
WEIGHTS_FILE = "source/darknet19-fp16.pt"
THRESHOLDS = Thresholds(confidence=0.6, all_probability=0.6)
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


def evaluate_all(o: Options) -> dict:
    """All metrics for the report and manifest."""
    import torch

    from convert.export import load_trained
    from convert.train import predict

    pp = paths(o)
    z = np.load(pp["features"])
    head = load_head(pp["head"])
    sel = json.loads(pp["selection"].read_text())
    classes = list(head.classes)
    benign = classes.index("Benign") if "Benign" in classes else 0
    y = z["y_test"]
    net, state = load_trained(pp["weights"])
    size = int(state["config"]["size"])
    torch.set_num_threads(2)
    _, x_te, _, _ = _load(o, "test", size)
    cnn = predict(net, x_te, size)
    cnn_masked = predict(net, x_te, size, masked=size == 224)
    cnn_pred = cnn.argmax(1)
    int8 = held_out(head, z["test"], y, benign, THRESHOLDS)
    flt = held_out(head, z["test_float"], y, benign, THRESHOLDS)
    masked = held_out(head, z["test_masked"], y, benign, THRESHOLDS)
    m = {
        "test_images": int(len(y)),
        "train_images": int(len(z["y_train"])),
        "cnn_softmax": {"accuracy": float((cnn_pred == y).mean()), "per_class": per_class(y, cnn_pred, classes),
                        "binary": binary(y, cnn_pred != benign, benign),
                        "confusion": _confusion(y, cnn_pred, len(classes)),
                        "accuracy_corner_masked": float((cnn_masked.argmax(1) == y).mean())},
        "int8_svm": int8,
        "float_svm": {"accuracy": flt["accuracy"]},
        "int8_float_agreement": float((np.array(int8["pred"]) == np.array(flt["pred"])).mean()),
        "cnn_int8_agreement": float((np.array(int8["pred"]) == cnn_pred).mean()),
        "corner_masked": {
            "accuracy": masked["accuracy"],
            "agreement_with_unmasked": float((np.array(masked["pred"]) == np.array(int8["pred"])).mean()),
        },
        "ood_probes": _probes(head, z),
        "lsb": [lsb_robustness(head, z["test"], float(z["out_scale"]), k) for k in (1, 3)],
        "selection": {"criterion": sel["criterion"], "k": sel["k"], "C": sel["C"], "paper_k": 521,
                      "cv": sel["cv"]},
        "table2": table2(z["train"], z["y_train"], np.array(sel["ranking"]), sel["k"], sel["C"], o.folds, o.seed),
        "table3_test": int8["per_class"],
    }
    paper = next((r for r in sel["cv"] if r["k"] == 521 and r["C"] == sel["C"]), None)
    m["selection"]["paper_k_cv"] = paper["mean"] if paper else None
    return m


def _probes(head, z) -> list[dict]:
    from convert.steps import PROBES

    if "probe" not in z.files:
        return []
    return [{"probe": name, "distance": o.distance, "referred": bool(o.distance > head.ood_threshold)}
            for name, o in zip(PROBES, evaluate_many(head, z["probe"]))]


def _confusion(y, pred, n):
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y, pred, labels=list(range(n))).tolist()


def write_bundle(o: Options) -> Path:
    """Evaluate, then write models/: model, head, weights, figures, manifest, report."""
    from convert import report
    from convert.steps import edgetpu

    pp = paths(o)
    out = Path(o.models)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "source").mkdir(parents=True, exist_ok=True)
    metrics = evaluate_all(o)
    shutil.copyfile(pp["tflite"], out / MODEL_FILE)
    shutil.copyfile(pp["head"], out / HEAD_FILE)
    shutil.copyfile(pp["weights"], out / WEIGHTS_FILE)
    etpu = edgetpu(o)
    if etpu is not None:
        shutil.copyfile(etpu, out / EDGETPU_FILE)
    else:
        (out / EDGETPU_FILE).unlink(missing_ok=True)
    from device.inference import TFLiteModel

    model = TFLiteModel(out / MODEL_FILE, num_threads=2)
    head = load_head(out / HEAD_FILE)
    quant = json.loads(pp["quant"].read_text())
    exp = json.loads(pp["export"].read_text())
    _, _, split_doc = data.read_split(pp["split"])
    files = {"model": _entry(out, MODEL_FILE), "head": _entry(out, HEAD_FILE), "weights": _entry(out, WEIGHTS_FILE)}
    if etpu is not None:
        files["edgetpu_model"] = _entry(out, EDGETPU_FILE)
    i, oo = model.input_spec, model.output_spec
    manifest = {
        "schema": SCHEMA,
        "name": f"darknet19-all-int8-{dt.date.today().isoformat()}",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source_commit": source_commit(),
        "classes": list(head.classes),
        "benign_class": "Benign",
        "files": files,
        "input": {"size": i.size, "layout": "NHWC", "colour": "RGB", "dtype": i.dtype, "scale": i.scale,
                  "zero_point": i.zero_point,
                  "preprocessing": "device.preprocess: EXIF-upright RGB, centre square crop, PIL bilinear resize to "
                                   "size, pixels 0..255; q = round(x/scale) + zero_point; "
                                   "normalisation is in the graph"},
        "output": {"features": oo.size, "dtype": oo.dtype, "scale": oo.scale, "zero_point": oo.zero_point},
        "quantization": {"tool": "onnx2tf full-integer", "weights": "int8 per-channel", "activations": "int8",
                         "calibration_images": quant["calibration_images"],
                         "edgetpu_friendly": quant["edgetpu_friendly"], "op_types": quant["op_types"],
                         "onnx_vs_torch_max_abs_diff": exp["max_abs_diff"]},
        "head": {"k": head.k, "criterion": metrics["selection"]["criterion"], "svm_C": metrics["selection"]["C"],
                 "calibration": "Platt sigmoid per class (one-vs-rest), normalised",
                 "ood_threshold": head.ood_threshold},
        "thresholds": {"confidence": THRESHOLDS.confidence, "all_probability": THRESHOLDS.all_probability},
        "metrics": {
            "test_images": metrics["test_images"],
            "accuracy_int8_svm": metrics["int8_svm"]["accuracy"],
            "accuracy_cnn_softmax": metrics["cnn_softmax"]["accuracy"],
            "int8_float_agreement": metrics["int8_float_agreement"],
            "all_sensitivity": metrics["int8_svm"]["binary_argmax"]["sensitivity"],
            "all_specificity": metrics["int8_svm"]["binary_argmax"]["specificity"],
            "accuracy_corner_masked": metrics["corner_masked"]["accuracy"],
            "ok_fraction": metrics["int8_svm"]["ok_fraction"],
            "ok_accuracy": metrics["int8_svm"]["ok_accuracy"],
        },
        "split": {"hash": split_doc["hash"], "train": metrics["train_images"], "test": metrics["test_images"],
                  **split_doc["params"]},
        "versions": versions(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    load_bundle(out)  # the device must accept what we ship
    manifest["references"] = add_references(out, held_out_candidates(o))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    report.write(o, out, manifest, metrics, step_seconds(o))
    print(f"bundle -> {out}: int8 + SVM accuracy {metrics['int8_svm']['accuracy']:.4f} on {metrics['test_images']} "
          f"held-out images; ALL sensitivity {manifest['metrics']['all_sensitivity']:.4f}")
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
    _, parts, doc = data.read_split(paths(o)["split"])
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
            clear = v.status == "ok" and v.label == cls and v.confidence >= bundle.thresholds.confidence + \
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
