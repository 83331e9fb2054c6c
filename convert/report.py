"""``models/REPORT.md``: how the model was made and how good it is, with figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from convert.steps import Options


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def _confusion_png(cm: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.array(cm)
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    ax.imshow(a, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title, fontsize=10)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(a[i, j]), ha="center", va="center", color="white" if a[i, j] > a.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _k_png(cv: list[dict], C: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in cv if r["C"] == C), key=lambda r: r["k"])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.errorbar([r["k"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows], marker="o")
    ax.axvline(521, color="grey", ls="--", label="paper: 521")
    ax.set_xlabel("features kept by mRMR"), ax.set_ylabel("CV accuracy (train split)"), ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(o: Options, out: Path, manifest: dict, m: dict, seconds: dict[str, float]) -> None:
    fig = out / "figures"
    classes = manifest["classes"]
    _confusion_png(m["int8_svm"]["confusion"], classes, "int8 DarkNet19 + mRMR + SVM (held-out)",
                   fig / "confusion_int8_svm.png")
    _confusion_png(m["cnn_softmax"]["confusion"], classes, "float DarkNet19 softmax (held-out)",
                   fig / "confusion_cnn.png")
    _k_png(m["selection"]["cv"], m["selection"]["C"], fig / "mrmr_k.png")
    curves = o.work / "train" / "curves.png"
    if curves.exists():
        shutil.copyfile(curves, fig / "training_curves.png")
    history = o.work / "train" / "history.json"
    hist = json.loads(history.read_text()) if history.exists() else []
    q, i8 = manifest["quantization"], m["int8_svm"]
    sel = m["selection"]
    L = []
    a = L.append
    a("# The shipped model: how it was made and how good it is\n")
    a(f"Bundle `{manifest['name']}`, built {manifest['created']} from commit `{manifest['source_commit']}` by "
      "`python -m convert all` (`make convert`). Every number below comes from that run; "
      "`metrics.json` holds them all.\n")
    a("**This is a screening aid. Every result is confirmed by a haematologist.**\n")
    a("## Data\n")
    s = manifest["split"]
    a("- Source: the ALL image dataset of Aria et al. (2021), Taleqani Hospital, Tehran (development share, "
      "`../shared/data/all-aria`). Images de-duplicated by content hash (byte-identical pairs dropped) "
      "before splitting.")
    a(f"- Split: {s['train']} train / {s['test']} held-out test ({int(100 * s['test_fraction'])}%, stratified). "
      f"Within each class, images are kept in blocks of {s['block']} consecutive acquisition numbers, so "
      "neighbouring frames (often the same patient or the same field) never straddle train and test. "
      f"Split hash `{s['hash'][:16]}`.")
    a("- There are no patient IDs: held-out figures are still optimistic relative to new patients and other labs. "
      "The images kept aside by the project are the independent check.\n")
    a("## Method\n")
    a("1. **DarkNet19** as in YOLO9000: 19 convolutions, 5 max-pools, batch norm, LeakyReLU(0.1); the last 1x1 "
      "convolution (1000 filters) + global average pooling is the 1000-d feature vector; a training-only linear "
      "layer maps it to the 4 classes. Trained from scratch (no ImageNet weights are available offline).")
    if hist:
        a(f"2. **Training** (paper Table 1): SGD momentum 0.9, LR 0.01 dropped x0.1 twice, L2 1e-4, batch 32, "
          f"{len(hist)} epochs; progressive resizing ({sum(h['size'] != 224 for h in hist)} epochs at "
          f"{hist[0]['size']} px, {sum(h['size'] == 224 for h in hist)} at 224 px). Augmentation: flips, 90-degree "
          "rotations, shift +-10%, zoom +-10%, shear, brightness +-10%, and the scale-bar corner painted over in half "
          f"of the images. Last epoch: held-out accuracy {_pct(hist[-1]['test_acc'])}.")
    a("3. **ONNX** export (BN folded), max |ONNX - PyTorch| on real test images: "
      f"{q['onnx_vs_torch_max_abs_diff']:.3g}.")
    a(f"4. **int8 TFLite** with onnx2tf: {q['weights']}, int8 activations, int8 input and output, calibrated on "
      f"{q['calibration_images']} real training images prepared by `device/preprocess.py`. Input quantization "
      f"scale {manifest['input']['scale']:g}, zero point {manifest['input']['zero_point']} (raw pixels; exact). "
      f"LeakyReLU {'rewritten as max/min for the Edge TPU' if q['edgetpu_friendly'] else 'kept as LEAKY_RELU'}.")
    a("   Op types in the final graph: " + ", ".join(f"`{k}` x{v}" for k, v in q["op_types"].items()) + ".")
    a("5. **Features**: every train and test image through the int8 model with `device/`'s own preprocessing and "
      "inference code, so the head is fitted on exactly what the Pi computes.")
    k_cv = max(r["mean"] for r in sel["cv"] if r["k"] == sel["k"])
    a(f"6. **mRMR** ({sel['criterion']}: relevance / mean redundancy, as MATLAB's `fscmrmr`); mutual information by "
      "plug-in estimates on 10 equal-frequency bins per feature. k chosen by 5-fold CV on the training split with mRMR "
      f"re-run inside each fold: **k = {sel['k']}** (CV {_pct(k_cv)}); "
      f"the paper's k = 521 scores {_pct(sel['paper_k_cv'])} in the same CV. See `figures/mrmr_k.png`.")
    a(f"7. **Head**: standardisation + linear SVM (one-vs-rest, C = {sel['C']}), Platt-calibrated probabilities, and "
      f"an out-of-distribution distance (RMS distance to the nearest class centroid in training-spread units; "
      f"threshold {manifest['head']['ood_threshold']:.2f} = 1.5 x the 99.5th percentile on training images). "
      f"Device rule: OOD -> refer; top probability >= {manifest['thresholds']['confidence']} -> label; else "
      f"P(ALL) >= {manifest['thresholds']['all_probability']} -> ALL alert with subtype referred; else refer.\n")
    a("## Held-out results (the honest numbers)\n")
    a(f"On {m['test_images']} held-out images:\n")
    a("| pipeline | 4-class accuracy | ALL sensitivity | specificity (Benign) |")
    a("|---|---|---|---|")
    cb = m["cnn_softmax"]["binary"]
    a(f"| float DarkNet19 softmax (PyTorch) | {_pct(m['cnn_softmax']['accuracy'])} | {_pct(cb['sensitivity'])} | "
      f"{_pct(cb['specificity'])} |")
    a(f"| float features + SVM head (onnxruntime) | {_pct(m['float_svm']['accuracy'])} | | |")
    b = i8["binary_argmax"]
    a(f"| **int8 TFLite + mRMR + SVM (shipped)** | **{_pct(i8['accuracy'])}** | **{_pct(b['sensitivity'])}** "
      f"({b['tp']}/{b['tp'] + b['fn']}) | **{_pct(b['specificity'])}** ({b['tn']}/{b['tn'] + b['fp']}) |")
    a("")
    a(f"- int8 vs float agreement (same head): **{_pct(m['int8_float_agreement'])}**; "
      f"CNN softmax vs int8 + SVM: {_pct(m['cnn_int8_agreement'])}.")
    ba = i8["binary_alert"]
    a(f"- Device rule on the held-out set: {_pct(i8['ok_fraction'])} of fields get a label (accuracy among them "
      f"{_pct(i8['ok_accuracy'])}), {i8['refer']} referred ({i8['ood']} as out-of-distribution); the ALL alert fires "
      f"on {ba['tp']}/{ba['tp'] + ba['fn']} ALL fields and {ba['fp']}/{ba['tn'] + ba['fp']} benign fields.")
    if m.get("ood_probes"):
        hit = sum(p["referred"] for p in m["ood_probes"])
        a(f"- Fields unlike any smear (out-of-distribution check): {hit}/{len(m['ood_probes'])} referred — " +
          ", ".join(f"{p['probe']} {p['distance']:.1f}{' (referred)' if p['referred'] else ' (NOT referred)'}"
                    for p in m["ood_probes"]) + f" (threshold {manifest['head']['ood_threshold']:.2f}).")
    lsb = "; ".join(f"+-{r['lsb']} LSB: {r['flips']}/{r['n']} decisions change" for r in m["lsb"])
    a(f"- ARM vs x86 int8 rounding (a few LSB): {lsb}.")
    a(f"- **What the model looks at**: with the '10 um' scale-bar corner painted over (camera frames have no such "
      f"label), int8 + SVM accuracy is {_pct(m['corner_masked']['accuracy'])} (decisions unchanged on "
      f"{_pct(m['corner_masked']['agreement_with_unmasked'])}); CNN softmax "
      f"{_pct(m['cnn_softmax']['accuracy_corner_masked'])}. Background colour and stain still differ between "
      "classes in this set; a model can use them, which a new lab's stain would expose.\n")
    a("![int8 confusion](figures/confusion_int8_svm.png) ![CNN confusion](figures/confusion_cnn.png)\n")
    a("### Paper Table 3 — per class, held-out set (int8 + SVM)\n")
    a("| class | n | accuracy | F1 | recall | precision |")
    a("|---|---|---|---|---|---|")
    for r in m["table3_test"]:
        a(f"| {r['class']} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['f1'])} | {_pct(r['recall'])} | "
          f"{_pct(r['precision'])} |")
    a("")
    a(f"### Paper Table 2 — {o.folds}-fold CV accuracy on the training split (int8 features)\n")
    a(f"| classifier | all 1000 features | mRMR {sel['k']} features |")
    a("|---|---|---|")
    for r in m["table2"]:
        a(f"| {r['classifier']} | {_pct(r['all'])} | {_pct(r['selected'])} |")
    a("")
    a("The mRMR ranking here was computed once on the whole training split (as in the paper), so these CV numbers "
      "are slightly optimistic; the paper reports 99.80% (CNN, 70/30) and 99.94% (SVM, 10-fold CV on all images).\n")
    a("## Training curves\n")
    a("![training curves](figures/training_curves.png)\n")
    a("## Model\n")
    for key, f in manifest["files"].items():
        a(f"- `{f['path']}` ({key}): {f['bytes'] / 1e6:.2f} MB, sha256 `{f['sha256'][:16]}...`")
    a("")
    a("## Time of each step (this machine)\n")
    a("| step | seconds |")
    a("|---|---|")
    for k, v in seconds.items():
        a(f"| {k} | {v:.0f} |")
    a("")
    a("## Tool versions\n")
    a(", ".join(f"{k} {v}" for k, v in manifest["versions"].items()) + "\n")
    (out / "REPORT.md").write_text("\n".join(L) + "\n")
