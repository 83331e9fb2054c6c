"""Metrics for the report: the paper's Tables 2 and 3, and the held-out numbers."""

from __future__ import annotations

import logging

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
from device.classifier import decide
from device.head import Head, evaluate_many

log = logging.getLogger(__name__)


def per_class(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> list[dict]:
    """Table 3: per-class accuracy (one-vs-rest), F1, recall, precision."""
    labels = list(range(len(classes)))
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    rec = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    prec = precision_score(y, pred, labels=labels, average=None, zero_division=0)
    return [{"class": c, "accuracy": float(((y == i) == (pred == i)).mean()), "f1": float(f1[i]),
             "recall": float(rec[i]), "precision": float(prec[i]), "n": int((y == i).sum())}
            for i, c in enumerate(classes)]


def binary(y: np.ndarray, pred_all: np.ndarray, benign: int) -> dict:
    truth = y != benign
    tp, fn = int((truth & pred_all).sum()), int((truth & ~pred_all).sum())
    tn, fp = int((~truth & ~pred_all).sum()), int((~truth & pred_all).sum())
    return {"sensitivity": tp / max(tp + fn, 1), "specificity": tn / max(tn + fp, 1),
            "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def table2(x: np.ndarray, y: np.ndarray, ranking: np.ndarray, k: int, C: float, folds: int, seed: int) -> list[dict]:
    """10-fold CV accuracy of SVM, ANN, KNN, Naive Bayes on all vs mRMR-selected features (training split).

    As in the paper, the mRMR ranking used here was computed on the whole
    training split, so these CV figures are slightly optimistic; the held-out
    numbers are the honest ones.
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


def held_out(head: Head, feats: np.ndarray, y: np.ndarray, benign: int, th: Thresholds) -> dict:
    outs = evaluate_many(head, feats)
    pred = np.array([o.index for o in outs])
    verdicts = [decide(head, o, head.classes[benign], th) for o in outs]
    status = np.array([v.status for v in verdicts])
    ok = status == "ok"
    flagged_all = np.array([v.all for v in verdicts])
    return {
        "accuracy": float((pred == y).mean()),
        "confusion": confusion_matrix(y, pred, labels=list(range(len(head.classes)))).tolist(),
        "per_class": per_class(y, pred, list(head.classes)),
        "binary_argmax": binary(y, pred != benign, benign),
        "binary_alert": binary(y, flagged_all, benign),
        "ok_fraction": float(ok.mean()),
        "ok_accuracy": float((pred[ok] == y[ok]).mean()) if ok.any() else float("nan"),
        "refer": int((status == "refer").sum()),
        "ood": int(sum(o.distance > head.ood_threshold for o in outs)),
        "pred": pred.tolist(),
    }


def lsb_robustness(head: Head, feats: np.ndarray, out_scale: float, lsb: int, seed: int = 0) -> dict:
    """Decision flips when every int8 feature moves by up to +-``lsb`` steps (ARM vs x86 rounding)."""
    rng = np.random.default_rng(seed)
    base = np.array([o.index for o in evaluate_many(head, feats)])
    noisy = feats + rng.integers(-lsb, lsb + 1, feats.shape) * out_scale
    moved = np.array([o.index for o in evaluate_many(head, noisy)])
    return {"lsb": lsb, "flips": int((base != moved).sum()), "n": len(base)}
