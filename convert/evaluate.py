"""Metrics for the report: held-out results with Wilson intervals, the shift suite, calibration, the
out-of-distribution sets, simulated slides and the paper's Table 2."""

from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from convert.fit import svm
from device.bundle import Thresholds
from device.classifier import Verdict, decide
from device.head import Head, evaluate_many, standardise
from device.quality import OK as QUALITY_OK
from device.slides import ALL, BENIGN, REFER, SlideRules, aggregate_tally
from device.status import Status

log = logging.getLogger(__name__)


def gate_codes(z, part: str) -> np.ndarray:
    """The quality gate's codes of a split's images in a features file (files made before they were kept: all
    passed)."""
    return z[f"{part}_q"] if f"{part}_q" in z.files else np.array([QUALITY_OK] * len(z[part]))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of k successes in n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": int(k), "n": int(n), "rate": k / n if n else float("nan"), "lo": lo, "hi": hi}


def per_class(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> list[dict]:
    """Table 3: per-class accuracy (one-vs-rest), F1, recall, precision."""
    labels = list(range(len(classes)))
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    rec = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    prec = precision_score(y, pred, labels=labels, average=None, zero_division=0)
    return [{"class": c, "accuracy": float(((y == i) == (pred == i)).mean()), "f1": float(f1[i]),
             "recall": float(rec[i]), "precision": float(prec[i]), "n": int((y == i).sum())}
            for i, c in enumerate(classes)]


def errors_by_block(y: np.ndarray, pred: np.ndarray, names: list[str],
                    block_of: dict[str, tuple[str, int, int, int]]) -> list[dict]:
    """Top-class errors per split block (about one patient): whether a miss is spread or one patient's.

    A rate over images hides that images of one patient are not independent: 18 errors in one block
    and 18 spread over twelve say different things about the next patient.
    """
    rows: dict[tuple[str, int], dict] = {}
    for yi, pi, name in zip(y, pred, names):
        label, b, first, last = block_of[name]
        r = rows.setdefault((label, b), {"class": label, "block": b, "first": first, "last": last, "n": 0,
                                         "wrong": 0})
        r["n"] += 1
        r["wrong"] += int(yi != pi)
    return [rows[k] for k in sorted(rows)]


def verdicts(head: Head, feats: np.ndarray, th: Thresholds, benign: int) -> tuple[list, list[Verdict]]:
    outs = evaluate_many(head, feats) if len(feats) else []
    return outs, [decide(head, o, head.classes[benign], th) for o in outs]


def field_outcomes(head: Head, feats: np.ndarray, y: np.ndarray, th: Thresholds, benign: int,
                   quality: np.ndarray | None = None) -> dict:
    """What the device answers on these fields: accuracy, confident misses, false alerts, refer/retake."""
    outs, vs = verdicts(head, feats, th, benign)
    n = len(y)
    pred = np.array([o.index for o in outs]) if outs else np.zeros(0, int)
    retake = (quality != QUALITY_OK) if quality is not None else np.zeros(n, bool)
    status = np.where(retake, Status.RETAKE, np.array([v.status for v in vs]) if vs else np.zeros(0, str))
    label_ok = np.array([v.status == Status.OK for v in vs]) & ~retake
    called_benign = label_ok & np.array([v.label == head.classes[benign] for v in vs])
    alert = ~retake & np.array([v.all for v in vs])
    is_all = y != benign
    return {
        "n": n,
        "accuracy": rate(int((pred == y).sum()), n),
        "all_called_benign_confident": int((is_all & called_benign).sum()),
        "benign_called_all": int((~is_all & alert).sum()),
        "all_fields": int(is_all.sum()), "benign_fields": int((~is_all).sum()),
        "referred": int((status == Status.REFER).sum()), "retake": int(retake.sum()),
        "ok_accuracy": rate(int((label_ok & (pred == y)).sum()), int(label_ok.sum())),
        "sensitivity_alert": rate(int((is_all & alert).sum()), int(is_all.sum())),
        "specificity_alert": rate(int((~is_all & ~alert).sum()), int((~is_all).sum())),
        "pred": pred.tolist(), "status": status.tolist(), "alert": alert.tolist(),
    }


def held_out(head: Head, feats: np.ndarray, y: np.ndarray, benign: int, th: Thresholds,
             quality: np.ndarray | None = None) -> dict:
    r = field_outcomes(head, feats, y, th, benign, quality)
    pred = np.array(r["pred"])
    r["confusion"] = confusion_matrix(y, pred, labels=list(range(len(head.classes)))).tolist()
    r["per_class"] = per_class(y, pred, list(head.classes))
    tp = int(((y != benign) & (pred != benign)).sum())
    tn = int(((y == benign) & (pred == benign)).sum())
    r["sensitivity"] = rate(tp, int((y != benign).sum()))
    r["specificity"] = rate(tn, int((y == benign).sum()))
    r["calibration"] = calibration(head, feats, y)
    return r


def calibration(head: Head, feats: np.ndarray, y: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error of the top-class confidence and the reliability diagram's bins."""
    outs = evaluate_many(head, feats)
    conf = np.array([o.confidence for o in outs])
    hit = np.array([o.index for o in outs]) == y
    edges = np.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - hit[m].mean())
            rows.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "confidence": float(conf[m].mean()),
                         "accuracy": float(hit[m].mean())})
    return {"ece": float(ece), "bins": rows}


def lsb_robustness(head: Head, feats: np.ndarray, out_scale: float, lsb: int, seed: int = 0) -> dict:
    """Decision flips when every int8 feature moves by up to +-``lsb`` steps (ARM vs x86 rounding)."""
    rng = np.random.default_rng(seed)
    base = np.array([o.index for o in evaluate_many(head, feats)])
    noisy = feats + rng.integers(-lsb, lsb + 1, feats.shape) * out_scale
    moved = np.array([o.index for o in evaluate_many(head, noisy)])
    return {"lsb": lsb, "flips": int((base != moved).sum()), "n": len(base)}


def shift_table(head: Head, th: Thresholds, benign: int, y: np.ndarray, zs, suite) -> list[dict]:
    rows = []
    for key in zs.files:
        parts = key.split("|")
        if len(parts) != 3:
            continue
        i, strength, mode = int(parts[0]), parts[1], parts[2]
        sh = suite[i]
        r = field_outcomes(head, zs[key], y, th, benign, zs[key + "|q"])
        rows.append({"family": sh.family, "variant": sh.variant, "strength": strength, "mode": mode,
                     "param": sh.params[strength], "side_px": float(zs[key + "|side"]),
                     **{k: v for k, v in r.items() if k not in ("pred", "status", "alert")}})
    return rows


def caught(head: Head, th: Thresholds, benign: int, feats: np.ndarray, quality: np.ndarray) -> dict:
    """Share of frames that get no confident label: retake (gate) or refer (OOD or low confidence)."""
    _, vs = verdicts(head, feats, th, benign)
    ok = np.array([v.status == Status.OK for v in vs]) & (quality == QUALITY_OK)
    ood = np.array([v.status == Status.REFER and "unlike" in v.reason for v in vs]) & (quality == QUALITY_OK)
    labels = [v.label for v, o in zip(vs, ok) if o]
    return {"n": len(vs), "caught": rate(int((~ok).sum()), len(vs)), "retake": int((quality != QUALITY_OK).sum()),
            "referred_ood": int(ood.sum()), "confident": int(ok.sum()),
            "confident_labels": {c: labels.count(c) for c in sorted(set(labels))}}


def simulate_slides(status: list[str], alert: list[bool], label_all: list[bool], y: np.ndarray, benign: int,
                    rules: SlideRules, fractions=(0.0, 0.05, 0.1, 0.25, 1.0), fields: int = 100,
                    slides: int = 2000, seed: int = 0) -> list[dict]:
    """Slides of ``fields`` distinct fields drawn from held-out field outcomes, a share of them blast fields.

    Each field of a simulated slide is one held-out image's actual device outcome, drawn with replacement
    from the benign or the ALL images; fields are independent draws (a real slide's fields are correlated
    through its patient, which these draws cannot show).
    """
    rng = np.random.default_rng(seed)
    st, al, ok_all = np.array(status), np.array(alert), np.array(label_all)
    ben_idx, all_idx = np.flatnonzero(y == benign), np.flatnonzero(y != benign)
    rows = []
    for frac in fractions:
        calls = {ALL: 0, BENIGN: 0, REFER: 0}
        for _ in range(slides):
            n_blast = rng.binomial(fields, frac)
            idx = np.concatenate([rng.choice(all_idx, n_blast), rng.choice(ben_idx, fields - n_blast)])
            t: dict = {}
            for i in idx:
                key = (st[i], "ALL-subtype" if (st[i] == Status.OK and ok_all[i]) else ("Benign" if st[i] == Status.OK
                                                                                     else None), bool(al[i]))
                t[key] = t.get(key, 0) + 1
            v = aggregate_tally(t, "Benign", rules, closed=True)
            calls[v.verdict] = calls.get(v.verdict, 0) + 1
        rows.append({"blast_fraction": frac, "fields": fields, "slides": slides,
                     **{k: rate(v, slides) for k, v in calls.items()}})
    return rows


def table2(x: np.ndarray, y: np.ndarray, ranking: np.ndarray, k: int, C: float, folds: int, seed: int) -> list[dict]:
    """10-fold CV accuracy of SVM, ANN, KNN, Naive Bayes on all vs mRMR-selected features (training split).

    As in the paper, the mRMR ranking used here was computed on the whole training split, so these CV
    figures are optimistic; the test-split numbers are the ones to quote.
    """
    models = {
        "SVM (linear)": lambda: make_pipeline(StandardScaler(), svm(C, seed)),
        "ANN (MLP 100)": lambda: make_pipeline(StandardScaler(),
                                               MLPClassifier((100,), max_iter=500, random_state=seed)),
        "KNN (k=5)": lambda: make_pipeline(StandardScaler(), KNeighborsClassifier(5)),
        "Naive Bayes": lambda: GaussianNB(),
    }
    n_splits = max(2, min(folds, int(np.bincount(y).min())))
    cv = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    rows = []
    for name, make in models.items():
        row = {"classifier": name}
        for tag, cols in (("all", slice(None)), ("selected", ranking[:k])):
            pred = cross_val_predict(make(), x[:, cols], y, cv=cv)
            row[tag] = float((pred == y).mean())
        rows.append(row)
        log.info("table 2: %s done", name)
    return rows


def fingerprint(head: Head, feats: np.ndarray) -> np.ndarray:
    """What the slide's de-duplication compares: the standardised selected features."""
    return standardise(head, feats.astype(np.float64))


#: Distinct fields of one block more alike than this share of them are merged as "the same field".
DUPLICATE_QUANTILE = 0.995


def _unit_fingerprints(head: Head, feats: np.ndarray) -> np.ndarray:
    a = fingerprint(head, feats)
    return a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-9)


def _distinct_pair_similarities(base: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of different fields within one group (a block of the split)."""
    sims = [(m @ m.T)[np.triu_indices(len(m), 1)] for m in (base[groups == g] for g in np.unique(groups))]
    return np.concatenate(sims) if sims else np.zeros(0)


def duplicate_threshold(head: Head, feats: np.ndarray, groups: np.ndarray) -> dict:
    """The cosine threshold between 'the same field again' and 'another field of the same patient block'.

    A choice, so made on validation: pairs of different images of one block (about one patient) are distinct
    fields, and the threshold is their ``DUPLICATE_QUANTILE`` quantile, so about 0.5% of distinct fields merge.
    """
    sims = _distinct_pair_similarities(_unit_fingerprints(head, feats), groups)
    return {"threshold": float(np.quantile(sims, DUPLICATE_QUANTILE)) if len(sims) else 0.99,
            "distinct_pairs": len(sims)}


def duplicate_check(head: Head, feats: np.ndarray, groups: np.ndarray, recaptures: list[np.ndarray],
                    threshold: float) -> dict:
    """How a chosen threshold does on held-out fields: the share of distinct pairs of one block it merges, and
    the share of re-captures (the same image refocused, re-compressed, noisier) it recognises as duplicates."""
    base = _unit_fingerprints(head, feats)
    sims = _distinct_pair_similarities(base, groups)
    return {"distinct_pairs": len(sims), "distinct_merged": float(np.mean(sims >= threshold)) if len(sims) else 0.0,
            "recaptures_recognised": [float(np.mean((base * _unit_fingerprints(head, r)).sum(1) >= threshold))
                                      for r in recaptures]}
