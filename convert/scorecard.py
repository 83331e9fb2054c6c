"""Every number of the report and the manifest, computed from one work folder.

The test split (the newest acquisition numbers: new patients, as near as this set allows) is read here
and only here, once the head and thresholds were fixed on the validation split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from convert import data, shifts
from convert.evaluate import (
    caught,
    duplicate_check,
    errors_by_block,
    field_outcomes,
    gate_codes,
    held_out,
    lsb_robustness,
    rate,
    shift_table,
    simulate_slides,
    table2,
    verdicts,
    wilson,
)
from convert.fit import OOD_VAL_REFER
from convert.options import Options, load_part, paths
from convert.quantize import decisions_agreement
from device.bundle import Thresholds
from device.classifier import NETWORK_DISAGREES
from device.head import Head, load_head
from device.quality import OK as QUALITY_OK
from device.slides import SlideRules
from device.status import Status

log = logging.getLogger(__name__)


def slide_rules(val: dict) -> SlideRules:
    """Per-field rates for the slide rule, measured on the validation split, as the ends of their Wilson 95%
    intervals that guard each test's error (see ``device.slides``): the false-alert rate's upper end for the
    ALL test, its lower end and the sensitivity's lower end for the benign test."""
    if not val["benign_fields"] or not val["all_fields"]:  # a toy split: the rule's own defaults
        return SlideRules()
    f_lo, f_hi = wilson(val["benign_called_all"], val["benign_fields"])
    return SlideRules(field_false_alert=f_hi, field_false_alert_low=f_lo,
                      field_sensitivity=val["sensitivity_alert"]["lo"])


def new_patient_blocks(split_path: Path, y: np.ndarray, pred: np.ndarray, class_names: list[str]) -> list[dict]:
    """The test split's top-class errors per block of the split (about one patient): see ``errors_by_block``.

    ``class_names``: the head's names, in the split's class order (the split knows the data's folder names).
    """
    folders, parts, _ = data.read_split(split_path)
    block_of = {path: (class_names[folders.index(label)], *rest)
                for path, (label, *rest) in data.split_blocks(split_path).items()}
    return errors_by_block(y, pred, [s.path for s in parts["test"]], block_of)


def evaluate_all(o: Options) -> dict:
    """All metrics for the report and manifest."""
    import torch

    from convert.export import load_trained
    from convert.train import predict

    pp = paths(o)
    z, zs, zo = np.load(pp.features), np.load(pp.shifts), np.load(pp.ood)
    head = load_head(pp.head)
    sel = json.loads(pp.selection.read_text())
    th = Thresholds(**sel["thresholds"])
    classes = list(head.classes)
    benign = classes.index("Benign") if "Benign" in classes else 0
    y, yv = z["y_test"], z["y_val"]
    net, state = load_trained(pp.weights)
    size = int(state["config"]["size"])
    torch.set_num_threads(2)
    _, x_te, _, _ = load_part(o, "test", size)
    cnn_pred = predict(net, x_te, size).argmax(1)
    test = held_out(head, z["test"], y, benign, th, quality=gate_codes(z, "test"))
    val = field_outcomes(head, z["val"], yv, th, benign, quality=gate_codes(z, "val"))
    flt = field_outcomes(head, z["test_float"], y, th, benign)
    rules = slide_rules(val)
    suite = shifts.suite()
    ok_all = [s == Status.OK and a for s, a in zip(test["status"], test["alert"])]
    test_blocks = data.block_groups(data.split_blocks(pp.split), z["test_names"])
    recapture_keys = [k for k in zs.files if k.count("|") == 2 and k.split("|")[1] == "mild"
                      and suite[int(k.split("|")[0])].family in ("defocus", "JPEG", "sensor noise")]
    m = {
        "test_images": int(len(y)), "val_images": int(len(yv)), "train_images": int(len(z["y_train"])),
        "training": {"config": state["config"], "seconds": state.get("seconds")},
        "test": {k: v for k, v in test.items() if k not in ("status", "alert")},
        "test_blocks": new_patient_blocks(pp.split, y, np.array(test["pred"]), classes),
        "validation": {k: v for k, v in val.items() if k not in ("pred", "status", "alert")},
        "cnn_softmax": {"accuracy": rate(int((cnn_pred == y).sum()), len(y)),
                        "confusion": _confusion(y, cnn_pred, len(classes))},
        "float_svm": {"accuracy": flt["accuracy"]},
        "int8_float_agreement": rate(int((np.array(test["pred"]) == np.array(flt["pred"])).sum()), len(y)),
        # the device's decision (status, label, ALL alert), as for the two graphs below: one definition
        "int8_float_decision_agreement": rate(decisions_agreement(head, classes[benign], th, z["test"],
                                                                  z["test_float"])["decisions_agree"], len(y)),
        "cnn_int8_agreement": rate(int((np.array(test["pred"]) == cnn_pred).sum()), len(y)),
        "shifts": shift_table(head, th, benign, y, zs, suite),
        "ood": _ood(head, th, benign, zo, zs, suite, z),
        "ood_comparison": sel["ood_comparison"], "ood_method": sel["ood_method"], "ood_val_refer": OOD_VAL_REFER,
        "network_check": network_refers(head, th, benign, {
            "validation": (z["val"], gate_codes(z, "val")), "new-patient test": (z["test"], gate_codes(z, "test")),
            **({"ood-bccd (calibrated)": (zo["bccd|calibrated"], zo["bccd|calibrated|q"])}
               if "bccd|calibrated" in zo.files else {})}),
        "lsb": [lsb_robustness(head, z["test"], float(z["out_scale"]), k) for k in (1, 3)],
        "selection": {"criterion": sel["criterion"], "k": sel["k"], "C": sel["C"], "paper_k": 521,
                      "table": sel["table"], "best_val_accuracy": sel["best_val_accuracy"], "one_se": sel["one_se"]},
        "thresholds": asdict(th), "thresholds_info": sel["thresholds_info"],
        "slide_rules": asdict(rules),
        "slides": simulate_slides(test["status"], test["alert"], ok_all, y, benign, rules, seed=o.seed),
        "duplicates": {"threshold": sel["duplicate_similarity"], "val_distinct_pairs": sel["duplicate_val_pairs"],
                       **duplicate_check(head, z["test"], test_blocks, [zs[k] for k in recapture_keys],
                                         sel["duplicate_similarity"])},
        "table2": table2(z["train"], z["y_train"], np.array(sel["ranking"]), sel["k"], sel["C"], o.folds, o.seed),
        "geometry": {"field_px": float(z["field_px"]), "rbc_diameter_px": float(z["rbc_diameter_px"])},
    }
    if pp.edgetpu_friendly.exists():
        from convert.quantize import graph_agreement

        m["graph_agreement"] = graph_agreement(pp.tflite, pp.edgetpu_friendly, x_te, head, "Benign", th)
    m["duplicates"]["recapture_sets"] = [suite[int(k.split("|")[0])].name for k in recapture_keys]
    return m


def network_refers(head: Head, th: Thresholds, benign: int, sets: dict[str, tuple[np.ndarray, np.ndarray]]
                   ) -> dict[str, int] | None:
    """Per set (features, gate codes): the fields passing the gate that the network-agreement check refers (the
    head's label confident, the network's own classifier's top class another); None for a head without it."""
    if head.network_coef is None:
        return None
    out = {}
    for name, (f, q) in sets.items():
        _, vs = verdicts(head, f, th, benign)
        out[name] = sum(1 for v, code in zip(vs, q, strict=True)
                        if code == QUALITY_OK and NETWORK_DISAGREES in v.reason)
    return out


def _ood(head, th, benign, zo, zs, suite, z) -> dict:
    out = {"new-patient test": caught(head, th, benign, z["test"], gate_codes(z, "test"))}
    for mode in ("calibrated", "none"):
        if f"bccd|{mode}" in zo.files:
            out[f"ood-bccd ({'calibrated' if mode == 'calibrated' else 'uncalibrated'})"] = caught(
                head, th, benign, zo[f"bccd|{mode}"], zo[f"bccd|{mode}|q"])
    kinds = zo["synthetic|kind"]
    for kind in dict.fromkeys(kinds.tolist()):
        m = kinds == kind
        out[f"synthetic: {kind}"] = caught(head, th, benign, zo["synthetic"][m], zo["synthetic|q"][m])
    for key in zs.files:
        parts = key.split("|")
        if len(parts) == 3 and parts[1] == "strong" and parts[2] == "none":
            out[f"strong shift: {suite[int(parts[0])].name}"] = caught(head, th, benign, zs[key], zs[key + "|q"])
    return out


def _confusion(y, pred, n):
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y, pred, labels=list(range(n))).tolist()


def print_summary(o: Options, with_shifts: bool) -> None:
    """``python -m convert evaluate [--shifts]``: the test split (and the shift suite) from the work folder."""
    pp = paths(o)
    z = np.load(pp.features)
    head = load_head(pp.head)
    th = Thresholds(**json.loads(pp.selection.read_text())["thresholds"])
    benign = list(head.classes).index("Benign") if "Benign" in head.classes else 0
    t = held_out(head, z["test"], z["y_test"], benign, th)

    def ci(r: dict) -> str:
        return f"{100 * r['rate']:6.2f}% [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}]"

    print(f"new-patient test: {t['n']} images, accuracy {ci(t['accuracy'])}, ALL confidently called Benign "
          f"{t['all_called_benign_confident']}, benign called ALL {t['benign_called_all']}, referred {t['referred']}, "
          f"ECE {100 * t['calibration']['ece']:.1f}%")
    rows = new_patient_blocks(pp.split, z["y_test"], np.array(t["pred"]), list(head.classes))
    print("top-class errors by block (consecutive acquisition numbers, about one patient each): "
          + "; ".join(f"{r['class']} {r['first']}-{r['last']} {r['wrong']}/{r['n']}" for r in rows))
    if not with_shifts:
        return
    print(f"{'shift':58s} {'strength':9s} {'cal':3s} {'accuracy':24s} {'ALL->Benign':>11s} {'Benign->ALL':>11s} "
          f"{'refer+retake':>12s}")
    for r in shift_table(head, th, benign, z["y_test"], np.load(pp.shifts), shifts.suite()):
        print(f"{(r['family'] + ' ' + r['variant']).strip():58s} {r['strength']:9s} "
              f"{'yes' if r['mode'] == 'calibrated' else 'no':3s} {ci(r['accuracy']):24s} "
              f"{r['all_called_benign_confident']:11d} {r['benign_called_all']:11d} {r['referred'] + r['retake']:12d}")
