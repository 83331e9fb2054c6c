"""``models/REPORT.md``: how the model was made and how good it is, with intervals and figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from convert import figures
from convert.augment import describe_augmentation
from convert.options import CURVES_FILE, FIGURES_DIR, HISTORY_FILE, REPORT_FILE, Options, kept_epoch, paths


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def _ci(r: dict) -> str:
    """A rate with its Wilson 95% interval and counts."""
    return f"{_pct(r['rate'])} [{_pct(r['lo'])}, {_pct(r['hi'])}] ({r['k']}/{r['n']})"


def _figures(o: Options, fig: Path, manifest: dict, m: dict) -> None:
    classes = manifest["classes"]
    figures.confusion(m["test"]["confusion"], classes, "int8 + mRMR + SVM, new-patient test",
                      fig / "confusion_int8_svm.png")
    figures.confusion(m["cnn_softmax"]["confusion"], classes, "float DarkNet19 softmax, new-patient test",
                      fig / "confusion_cnn.png")
    sel = m["selection"]
    figures.mrmr_k(sel["table"], sel["C"], sel["k"], sel["best_val_accuracy"], sel["one_se"], fig / "mrmr_k.png")
    figures.reliability(m["test"]["calibration"]["bins"], m["test"]["calibration"]["ece"], fig / "reliability.png")
    figures.shifts(m["shifts"], m["test"]["accuracy"]["rate"], fig / "shifts.png")
    curves = paths(o).train_dir / CURVES_FILE
    if curves.exists():
        shutil.copyfile(curves, fig / "training_curves.png")


def training_history(o: Options) -> tuple[list[dict], bool]:
    """(the per-epoch history of the weights this build ships, whether the build reused committed weights).

    A build that trained has it in its work folder. A build that reused the committed weights takes the history
    saved inside them (weights saved before 2026-12-08 carry none: then it is [])."""
    pp = paths(o)
    stamp = pp.stamps / "train.json"
    reused = stamp.exists() and bool(json.loads(stamp.read_text()).get("reused"))
    history = pp.train_dir / HISTORY_FILE
    if history.exists() and not reused:
        return json.loads(history.read_text()), False
    if not pp.weights.exists():
        return [], reused
    import torch

    return list(torch.load(pp.weights, map_location="cpu", weights_only=False).get("history", [])), reused


def _range_text(r: dict | str) -> str:
    """How the activations' int8 ranges were set (``quantize --range-percentile``), for the method's step 3."""
    if not isinstance(r, dict):
        return " (each activation's int8 range: the minimum to maximum seen)"
    return (f" (each activation's int8 range: its {100 - r['percentile']:g}th to {r['percentile']:g}th percentile on "
            f"{r['images']} of them, the rare larger values clipped: `--range-percentile {r['percentile']:g}`)")


def training_text(c: dict, hist: list[dict], *, reused: bool = False) -> str:
    """The recipe as the report states it: configuration ``c`` and the epochs of the run that trained the shipped
    weights (``hist``): this build's, or, when it ``reused`` the committed weights, the run that saved them."""
    txt = (f"**DarkNet19** (19 conv, 5 max-pool, BN, LeakyReLU 0.1; 1000-d global-pooled features), trained from "
           f"scratch on the CPU: SGD momentum {c['momentum']:g}, L2 {c['weight_decay']:g}, batch {c['batch']}; "
           f"first cycle: cosine LR from {c['lr']:g}, {c['low_epochs']} epochs at {c['low_size']} px then "
           f"{c['high_epochs']} at {c['size']} px")
    tune = c.get("tune_epochs", 0)
    if tune:
        txt += (f"; tune stage: {tune} epochs at {c['size']} px with a class-balanced cross-entropy (class weights "
                f"n / (K n_class): every class weighs as much as if the classes were balanced), cosine LR from "
                f"{c['tune_lr']:g} after a one-epoch warm-up")
    given = [h for h in hist if h.get("given")]
    if reused and hist:
        txt += (". This build reused the committed weights (`models/source/`)" +
                ("; the run that trained them" if given else ", trained by this recipe"))
    elif given:
        txt += ". This build"
    if given:
        txt += (f" took the first cycle from the committed weights of the recipe before the tune stage "
                f"(`models/source/` then; validation accuracy {_pct(given[0]['val_acc'])}, balanced "
                f"{_pct(given[0]['val_bacc'])}; their optimizer momentum was not kept) and ran the tune stage")
    kept = kept_epoch(hist, c["size"])
    if kept is not None:
        h = next(h for h in hist if h["epoch"] == kept)
        return (txt + f"; kept epoch {kept} by validation balanced accuracy (mean per-class recall) "
                f"{_pct(h.get('val_bacc', h['val_acc']))}, accuracy {_pct(h['val_acc'])}" +
                (" (the given first cycle: no tune epoch did better)." if h.get("given") else "."))
    if not reused:
        return txt + (". The per-epoch history of this build's training is neither in its work folder nor in "
                      "the weights.")
    return (txt + ". This build reused the committed weights (`models/source/`), which were saved without their "
            "per-epoch history (weights saved before 2026-12-08 carry none); the training curves below are those "
            "of the run that trained them.")


def write(o: Options, out: Path, manifest: dict, m: dict, seconds: dict[str, float]) -> None:
    _figures(o, out / FIGURES_DIR, manifest, m)
    hist, reused = training_history(o)
    q, t, sel, s = manifest["quantization"], m["test"], m["selection"], manifest["split"]
    th = m["thresholds"]
    L: list[str] = []
    a = L.append
    a("# The shipped model: how it was made and how good it is\n")
    a(f"Bundle `{manifest['name']}`, built {manifest['created']} from commit `{manifest['source_commit']}` by "
      "the steps of `python -m convert` (`make convert`) timed at the end of this report. Every number below comes "
      "from that build and `metrics.json` holds them all. Rates carry Wilson 95% intervals and counts.\n")
    a("**This is a screening aid. Every result is confirmed by a haematologist.**\n")
    a("## Data and protocol\n")
    a("- Source: the ALL image dataset of Aria et al. (2021), Taleqani Hospital, Tehran (development share, "
      "`../shared/data/all-aria`), de-duplicated by content hash before splitting. The scale-bar label in the "
      "bottom-right corner is covered in every image the toolchain reads (mirrored texture from just above it), so "
      "the network never sees it.")
    a(f"- Split by blocks of {s['block']} consecutive acquisition numbers (about one patient: 89 patients, ~36 images "
      f"each; no patient IDs exist, so a block boundary can still fall inside one patient): **test** = the newest "
      f"blocks of each class ({s['test']} images, the new-patient test), **validation** = random whole blocks of "
      f"the rest ({s['val']}), **train** = the remaining blocks ({s['train']}). Split hash `{s['hash'][:16]}`.")
    a("- The validation split makes every choice: the epoch kept, mRMR's k, the SVM's C, the calibration, the "
      "out-of-distribution method and threshold, the decision thresholds, the slide rule's per-field rates and "
      "its near-duplicate threshold. "
      "The test split is read once, by the evaluation that writes this report.\n")
    a("## Method\n")
    c = m["training"]["config"]
    a("1. " + training_text(c, hist, reused=reused))
    tune = (f"; the tune stage at {c['tune_shift_strength']:g}x: {describe_augmentation(c['tune_shift_strength'])}"
            if c.get("tune_epochs") else "")
    a(f"2. **Augmentation** covering the shift families below: flips, rotations, shear, defocus, JPEG 30-90, the "
      f"eyepiece's dark surround, and at the first cycle's strength {c['shift_strength']:g}: "
      f"{describe_augmentation(c['shift_strength'])}{tune}. Then every image goes through "
      "`device.preprocess.prepare`, the same code "
      "as the Pi: find the lit field (eyepiece disc or whole frame), fill outside it with the background colour, "
      "normalise colour so the slide background is neutral grey.")
    a(f"3. **ONNX** export (BN folded; max |ONNX - PyTorch| {q['onnx_vs_torch_max_abs_diff']:.3g}), then full-integer "
      f"**int8 TFLite** with onnx2tf, calibrated on {q['calibration_images']} prepared training images"
      f"{_range_text(q.get('activation_range', 'min/max'))}. The CPU "
      "graph (what the Pi runs, and what the head is fitted on) keeps native `LEAKY_RELU`: " +
      ", ".join(f"`{k}` x{v}" for k, v in q["op_types"].items()) + "." +
      (" A second, Edge-TPU-friendly graph (LeakyReLU rewritten, same calibration images) ships for "
       "`edgetpu_compiler`; it runs only with the Edge TPU delegate." if q.get("edgetpu_friendly") else ""))
    a(f"4. **Features** of every image through the int8 model with `device/`'s code; **mRMR** ({sel['criterion']}) "
      f"ranking on train; k and C by validation accuracy with the one-standard-error rule (the smallest k within "
      f"one SE of the best): **k = {sel['k']}** of 1000, C = {sel['C']} (best validation accuracy "
      f"{_pct(sel['best_val_accuracy'])}, SE {_pct(sel['one_se'])}; the paper keeps 521). `figures/mrmr_k.png`.")
    a(f"5. **Head**: standardisation + linear SVM on train; per-class Platt sigmoids fitted on validation scores; "
      f"out-of-distribution score **{m['ood_method']}** (chosen below), threshold at the validation split's "
      f"{100 * (1 - m.get('ood_val_refer', 0.02)):g}th percentile.")
    a(f"6. **Decision rule** (thresholds chosen on validation): OOD -> refer; an ALL subtype needs confidence >= "
      f"{th['confidence']}; **Benign needs >= {th['benign_confidence']}** (above every validation ALL field the "
      f"head called benign); otherwise P(ALL) >= {th['all_probability']} raises the ALL alert with the subtype "
      "referred; otherwise refer."
      + (" A confident label also needs the network's own classifier (the linear layer DarkNet19 was trained "
         "with, on all 1000 features of the same int8 output) to have the same top class; where the two differ "
         "the field is referred as unlike the training images (with the ALL alert when P(ALL) reaches the "
         "threshold above). Fields this check referred: "
         + ", ".join(f"{k} {v}" for k, v in m["network_check"].items()) + "." if m.get("network_check") else "")
      + "\n")
    a("## New-patient test split\n")
    a(f"On {m['test_images']} test images (newest acquisition numbers):\n")
    a("| measure | value |")
    a("|---|---|")
    a(f"| 4-class accuracy, int8 + mRMR + SVM (shipped) | **{_ci(t['accuracy'])}** |")
    a(f"| ALL sensitivity (top class is an ALL subtype) | {_ci(t['sensitivity'])} |")
    a(f"| benign specificity (top class Benign) | {_ci(t['specificity'])} |")
    a(f"| ALL fields confidently called Benign | **{t['all_called_benign_confident']} of {t['all_fields']}** |")
    a(f"| benign fields raising the ALL alert | {t['benign_called_all']} of {t['benign_fields']} |")
    a(f"| fields referred | {t['referred']} of {t['n']} |")
    a(f"| accuracy of the fields given a label | {_ci(t['ok_accuracy'])} |")
    a(f"| float DarkNet19 softmax | {_ci(m['cnn_softmax']['accuracy'])} |")
    a(f"| float features + same head | {_ci(m['float_svm']['accuracy'])} |")
    a(f"| int8 vs float: same top class | {_ci(m['int8_float_agreement'])} |")
    a(f"| int8 vs float: same device decision | {_ci(m['int8_float_decision_agreement'])} |")
    a(f"| expected calibration error (10 bins) | {_pct(t['calibration']['ece'])} |")
    if m.get("graph_agreement"):
        g = m["graph_agreement"]
        a(f"| CPU graph vs Edge-TPU-friendly graph: same device decision | {_pct(g['decision_agreement'])} "
          f"({g['decisions_agree']}/{g['images']}; worst feature cosine {g['worst_feature_cosine']}) |")
    a("")
    v = m["validation"]
    a(f"Validation split (where the choices were made), for comparison: accuracy {_ci(v['accuracy'])}.\n")
    lsb = "; ".join(f"+-{r['lsb']} LSB: {r['flips']}/{r['n']} top classes change" for r in m["lsb"])
    a(f"ARM vs x86 int8 rounding, simulated on the test features: {lsb}.\n")
    a("![int8 confusion](figures/confusion_int8_svm.png) ![CNN confusion](figures/confusion_cnn.png) "
      "![reliability](figures/reliability.png)\n")
    a("| class | n | accuracy (one-vs-rest) | F1 | recall | precision |")
    a("|---|---|---|---|---|---|")
    for r in t["per_class"]:
        a(f"| {r['class']} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['f1'])} | {_pct(r['recall'])} | "
          f"{_pct(r['precision'])} |")
    a("")
    if m.get("test_blocks"):  # bundles made before this table have no per-block counts
        a("Top-class errors per block of the split (consecutive acquisition numbers, about one patient): whether a "
          "miss is spread over patients or one patient's.\n")
        a("| class | block (acquisition numbers) | wrong |")
        a("|---|---|---|")
        for r in m["test_blocks"]:
            a(f"| {r['class']} | {r['first']}-{r['last']} | {r['wrong']} of {r['n']} |")
        a("")
    _shift_section(a, m)
    _ood_section(a, m)
    _slide_section(a, m)
    a(f"## Paper Table 2: {o.folds}-fold CV on the training split (int8 features)\n")
    a(f"| classifier | all 1000 features | mRMR {sel['k']} features |")
    a("|---|---|---|")
    for r in m["table2"]:
        a(f"| {r['classifier']} | {_pct(r['all'])} | {_pct(r['selected'])} |")
    a("\nThe mRMR ranking was computed on the whole training split (as in the paper) and the CNN was trained on "
      "these images, so these CV figures are optimistic; the test-split figures above are the ones to quote.\n")
    a("## Training curves\n\n![training curves](figures/training_curves.png)\n")
    a("## Files, step times, tools\n")
    for key, f in manifest["files"].items():
        a(f"- `{f['path']}` ({key}): {f['bytes'] / 1e6:.2f} MB, sha256 `{f['sha256'][:16]}...`")
    a("\nThe steps the work folder ran for this build (a step absent from the table did not run there: its "
      "output was already in the folder, e.g. graphs quantized by an earlier build of the same weights; `train` "
      "takes about a second when it reuses the committed weights):")
    a("\n| step | seconds |\n|---|---|")
    for k, sec in seconds.items():
        a(f"| {k} | {sec:.0f} |")
    a("\n" + ", ".join(f"{k} {ver}" for k, ver in manifest["versions"].items()) + "\n")
    (out / REPORT_FILE).write_text("\n".join(L) + "\n")


def _shift_section(a, m: dict) -> None:
    a("## Shift suite: the test images as another lab, microscope or camera shows them\n")
    a("`python -m convert evaluate --shifts` prints this table. Each family at three strengths; *moderate* is the "
      "strength the appliance must take. Geometric families are also run after `device.calibrate` on the "
      "first 24 shifted test images (in split order: benign ones), as a technician calibrates a box once (the "
      "scale read from the fields' texture, README: calibration). Retakes include the quality gate's scale check "
      "(a field too fine or too coarse for the training magnification). Columns: 4-class "
      "accuracy of the top class with its interval; ALL fields confidently called Benign; benign fields raising "
      "the ALL alert; fields referred or sent to retake.\n")
    a("![shift suite](figures/shifts.png)\n")
    a("| family | variant | strength | calibrated | accuracy | ALL called Benign | benign called ALL | refer+retake |")
    a("|---|---|---|---|---|---|---|---|")
    for r in m["shifts"]:
        a(f"| {r['family']} | {r['variant']} | {r['strength']} ({r['param']:g}) | "
          f"{'yes' if r['mode'] == 'calibrated' else 'no'} | {_ci(r['accuracy'])} | "
          f"{r['all_called_benign_confident']} | {r['benign_called_all']} | {r['referred'] + r['retake']} |")
    a("")


def _ood_section(a, m: dict) -> None:
    a("## Refer what it does not know\n")
    pct = 100 * (1 - m.get("ood_val_refer", 0.02))
    a(f"Out-of-distribution methods compared (each with its threshold at the validation split's {pct:g}th "
      "percentile; share of each set referred or sent to retake; the quality gate runs first on the device, and "
      "its scale check retakes fields at another magnification: the texture scale of the field and of its "
      "unstained part over 1.448x the validation medians, or finer than the validation "
      "0.25th percentile):\n")
    names = [k for k in m["ood_comparison"][0] if k not in ("method", "threshold", "mean_caught")]
    a("| method | threshold | " + " | ".join(names) + " | mean caught |")
    a("|---" * (len(names) + 3) + "|")
    for r in m["ood_comparison"]:
        a(f"| {r['method']} | {r['threshold']:.3g} | " + " | ".join(_pct(r[n]) for n in names) +
          f" | {_pct(r['mean_caught'])} |")
    a(f"\nShipped: **{m['ood_method']}**. What the device answers (retake, refer, or a confident label):\n")
    a("| set | frames | refer or retake | retake | referred as OOD | confident labels |")
    a("|---|---|---|---|---|---|")
    for name, r in m["ood"].items():
        labels = ", ".join(f"{k} {v}" for k, v in r["confident_labels"].items()) or "-"
        a(f"| {name} | {r['n']} | {_ci(r['caught'])} | {r['retake']} | {r['referred_ood']} | {labels} |")
    a("")


def _slide_section(a, m: dict) -> None:
    r, d = m["slide_rules"], m["duplicates"]
    a("## Slide verdict\n")
    a(f"Per-field rates for the slide rule, measured on validation (Wilson 95% interval ends): a benign field "
      f"raises ALL evidence at {_pct(r['field_false_alert_low'])} to {_pct(r['field_false_alert'])}, a blast field "
      f"at >= {_pct(r['field_sensitivity'])}. Each test takes the end that guards its own error. ALL when "
      f"P(X >= k | n, f_hi) < {r['false_alarm_risk']} (and k >= {r['all_fields']}); benign when "
      f"n >= {r['benign_fields']} and a slide with {_pct(r['min_blast_fraction'])} blast fields (sensitivity and "
      f"false-alert rate at their lower ends) would show that few with p < {r['missed_risk']}; a slide closed "
      "undecided is referred.")
    a(f"A field whose fingerprint has cosine >= {d['threshold']:.3f} with one of the slide's recent fields is taken "
      "for the same area again (refocused or re-captured) and adds no evidence. The threshold was chosen on "
      f"validation: the 99.5th percentile of {d['val_distinct_pairs']} pairs of distinct validation fields of one "
      f"block of the split. On the test split it merges {_pct(d['distinct_merged'])} of {d['distinct_pairs']} "
      "pairs of distinct fields of one block, and takes these re-captures of its images for the same field (the "
      "rest count as new fields): " +
      ", ".join(f"{n} {_pct(x)}" for n, x in zip(d["recapture_sets"], d["recaptures_recognised"])) + ".\n")
    a("Simulated 100-field slides (2,000 each) drawn from the test split's actual field outcomes; fields are "
      "independent draws, which real slides (fields of one patient) are not:\n")
    a("| blast fields | called ALL | called benign | referred |")
    a("|---|---|---|---|")
    for row in m["slides"]:
        a(f"| {_pct(row['blast_fraction'])} | {_ci(row['ALL'])} | {_ci(row['benign'])} | {_ci(row['refer'])} |")
    a("")
