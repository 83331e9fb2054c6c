"""The head: mRMR selection, standardisation, linear SVM, Platt calibration, OOD statistics.

Fitted with scikit-learn on the int8 model's features (as computed by
``device/``), then exported as plain arrays into :class:`device.head.Head`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from convert.mrmr import mrmr
from device.head import Head, distance, standardise

log = logging.getLogger(__name__)

K_GRID = (25, 50, 100, 200, 300, 400, 521, 700, 1000)
C_GRID = (0.01, 0.1, 1.0)
#: OOD threshold = margin x the 99.5th percentile of training distances.
OOD_QUANTILE, OOD_MARGIN = 0.995, 1.5
SPREAD_FLOOR = 0.05


@dataclass
class Selection:
    k: int
    C: float
    ranking: np.ndarray  # full mRMR ranking on the whole training split
    cv: list[dict] = field(default_factory=list)  # per (k, C): mean/std CV accuracy


def svm(C: float, seed: int = 0) -> LinearSVC:
    return LinearSVC(C=C, max_iter=20000, random_state=seed)


def choose_k(x: np.ndarray, y: np.ndarray, *, ks=K_GRID, cs=C_GRID, folds: int = 5, criterion: str = "MIQ",
             seed: int = 0) -> Selection:
    """Pick k (and C) by stratified CV on the training split.

    mRMR is re-run inside every fold, so the CV estimate is not flattered by
    a ranking that has seen the validation images.
    """
    ks = sorted({min(k, x.shape[1]) for k in ks})
    kmax = max(ks)
    acc = {(k, c): [] for k in ks for c in cs}
    n_splits = max(2, min(folds, int(np.bincount(y).min())))
    for f, (tr, va) in enumerate(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x, y)):
        rank = mrmr(x[tr], y[tr], kmax, criterion=criterion)
        for k in ks:
            for c in cs:
                model = make_pipeline(StandardScaler(), svm(c, seed)).fit(x[tr][:, rank[:k]], y[tr])
                acc[(k, c)].append(float((model.predict(x[va][:, rank[:k]]) == y[va]).mean()))
        log.info("mRMR/SVM CV fold %d/%d done", f + 1, n_splits)
    table = [{"k": k, "C": c, "mean": float(np.mean(v)), "std": float(np.std(v))} for (k, c), v in acc.items()]
    best = max(table, key=lambda r: (round(r["mean"], 4), -r["k"], -r["C"]))  # ties: fewer features, stronger L2
    ranking = mrmr(x, y, None if x.shape[1] <= 1000 else kmax, criterion=criterion)
    log.info("chosen k=%d C=%g (CV accuracy %.4f)", best["k"], best["C"], best["mean"])
    return Selection(best["k"], best["C"], ranking, table)


def fit_head(x: np.ndarray, y: np.ndarray, classes: list[str], indices: np.ndarray, C: float,
             seed: int = 0) -> tuple[Head, CalibratedClassifierCV, StandardScaler]:
    """Fit scaler + calibrated linear SVM on ``x[:, indices]``; return the numpy head and the sklearn parts."""
    if len(classes) < 3:
        raise ValueError("the head needs at least 3 classes (one-vs-rest calibration)")
    indices = np.asarray(indices, np.int64)
    scaler = StandardScaler().fit(x[:, indices])
    z = scaler.transform(x[:, indices])
    n_cv = max(2, min(5, int(np.bincount(y).min())))
    cal = CalibratedClassifierCV(svm(C, seed), method="sigmoid", cv=n_cv, ensemble=False).fit(z, y)
    inner = cal.calibrated_classifiers_[0]
    est = inner.estimator
    a = np.array([c.a_ for c in inner.calibrators], np.float64)
    b = np.array([c.b_ for c in inner.calibrators], np.float64)
    cent = np.stack([z[y == i].mean(0) for i in range(len(classes))])
    spread = np.stack([np.maximum(z[y == i].std(0), SPREAD_FLOOR) for i in range(len(classes))])
    head = Head(classes=tuple(classes), indices=indices, mean=scaler.mean_.astype(np.float64),
                scale=scaler.scale_.astype(np.float64), coef=est.coef_.astype(np.float64),
                intercept=est.intercept_.astype(np.float64), platt_a=a, platt_b=b, centroids=cent,
                spread=spread, ood_threshold=0.0, n_features=x.shape[1])
    d = distance(head, standardise(head, x))
    thr = float(OOD_MARGIN * np.quantile(d, OOD_QUANTILE))
    head = Head(**{**head.__dict__, "ood_threshold": thr})
    return head, cal, scaler
