"""The head: mRMR selection, standardisation, linear SVM, calibration, OOD score and decision thresholds.

The SVM is fitted on the training split's int8 features (as computed by ``device/``). Every *choice*
is made on the validation split, whose images the CNN never trained on: k (one-standard-error rule),
C, the Platt calibration, the out-of-distribution method and threshold, and the decision thresholds.
The test split is not read here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from convert.mrmr import mrmr
from device.bundle import Thresholds
from device.classifier import decide
from device.head import OOD_METHODS, Head, evaluate_many, standardise
from device.quality import OK as QUALITY_OK
from device.status import Status

log = logging.getLogger(__name__)

K_GRID = (25, 50, 100, 200, 300, 400, 521, 700, 1000)
C_GRID = (0.01, 0.1, 1.0)
#: The OOD threshold refers this share of the validation images (new-patient-like images must pass). 1%: the
#: quality gate's scale check (``device.quality``) already asks for about 1.25% of them again and now carries
#: the other-magnification fields the feature-space scores were weakest at; the two together stay near 2%.
OOD_VAL_REFER = 0.01
#: Selective accuracy the label threshold must reach on validation.
TARGET_OK_ACCURACY = 0.99
#: Share of validation benign fields that may raise the ALL alert.
MAX_BENIGN_ALERT = 0.02


@dataclass
class Selection:
    k: int
    C: float
    ranking: np.ndarray  # full mRMR ranking on the training split
    table: list[dict] = field(default_factory=list)  # per (k, C): validation accuracy and its standard error
    best: float = 0.0
    se: float = 0.0


def svm(C: float, seed: int = 0) -> LinearSVC:
    return LinearSVC(C=C, max_iter=20000, random_state=seed)


def choose_k(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, *, ks=K_GRID, cs=C_GRID,
             criterion: str = "MIQ", seed: int = 0) -> Selection:
    """mRMR ranking on train; (k, C) by validation accuracy with the one-standard-error rule.

    The smallest k whose best validation accuracy is within one binomial standard error of the best (k, C):
    fewer features for the same evidence, as the paper's selection intends.
    """
    ks = sorted({min(k, xtr.shape[1]) for k in ks})
    ranking = mrmr(xtr, ytr, None, criterion=criterion)
    table = []
    for k in ks:
        for c in cs:
            model = make_pipeline(StandardScaler(), svm(c, seed)).fit(xtr[:, ranking[:k]], ytr)
            table.append({"k": k, "C": c, "val_accuracy": float((model.predict(xva[:, ranking[:k]]) == yva).mean())})
    best = max(r["val_accuracy"] for r in table)
    se = float(np.sqrt(best * (1 - best) / len(yva))) if len(yva) else 0.0
    for r in table:
        r["se"] = float(np.sqrt(r["val_accuracy"] * (1 - r["val_accuracy"]) / max(len(yva), 1)))
    k = min(r["k"] for r in table if r["val_accuracy"] >= best - se)
    c = max((r for r in table if r["k"] == k), key=lambda r: (r["val_accuracy"], -r["C"]))["C"]
    log.info("mRMR k=%d C=%g (validation accuracy best %.4f, one SE %.4f)", k, c, best, se)
    return Selection(k, c, ranking, table, best, se)


def platt(scores: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sigmoid p_c = 1 / (1 + exp(a_c s_c + b_c)) fitted on out-of-sample SVM scores."""
    a, b = np.zeros(n_classes), np.zeros(n_classes)
    for c in range(n_classes):
        lr = LogisticRegression(C=1e4, max_iter=1000).fit(scores[:, [c]], (y == c).astype(int))
        a[c], b[c] = -lr.coef_[0, 0], -lr.intercept_[0]
    return a, b


def ood_params(method: str, z_train: np.ndarray, y_train: np.ndarray, n_classes: int) -> dict:
    """The arrays the device needs for ``method`` (see ``device.head.OOD_ARRAYS``)."""
    if method == "knn":
        return {"bank": z_train.astype(np.float32)}
    if method == "mahalanobis":
        means = np.stack([z_train[y_train == c].mean(0) for c in range(n_classes)])
        lw = LedoitWolf().fit(z_train - means[y_train])
        return {"class_means": means, "precision": lw.precision_}
    return {}


def fit_head(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, classes: list[str],
             indices: np.ndarray, C: float, ood_method: str = "knn", seed: int = 0) -> Head:
    """Scaler + linear SVM on train; Platt calibration and the OOD threshold on validation."""
    if len(classes) < 3:
        raise ValueError("the head needs at least 3 classes (one-vs-rest calibration)")
    indices = np.asarray(indices, np.int64)
    scaler = StandardScaler().fit(xtr[:, indices])
    est = svm(C, seed).fit(scaler.transform(xtr[:, indices]), ytr)
    n = len(classes)
    head = Head(classes=tuple(classes), indices=indices, mean=scaler.mean_.astype(np.float64),
                scale=scaler.scale_.astype(np.float64), coef=est.coef_.astype(np.float64),
                intercept=est.intercept_.astype(np.float64), platt_a=np.zeros(n), platt_b=np.zeros(n),
                ood_method=ood_method, ood_threshold=np.inf, n_features=xtr.shape[1],
                **ood_params(ood_method, standardise_arrays(scaler, xtr[:, indices]), ytr, n))
    scores_va = standardise(head, xva) @ head.coef.T + head.intercept
    a, b = platt(scores_va, yva, n)
    head = replace(head, platt_a=a, platt_b=b)
    d_va = np.array([o.distance for o in evaluate_many(head, xva)])
    return replace(head, ood_threshold=float(np.quantile(d_va, 1 - OOD_VAL_REFER)))


def standardise_arrays(scaler: StandardScaler, x: np.ndarray) -> np.ndarray:
    return (x - scaler.mean_) / scaler.scale_


def choose_thresholds(head: Head, xva: np.ndarray, yva: np.ndarray, benign: int) -> tuple[Thresholds, dict]:
    """Decision thresholds on validation: label confidence, the stricter benign one, the ALL alert."""
    outs = evaluate_many(head, xva)
    probs = np.stack([o.probs for o in outs])
    pred = probs.argmax(1)
    conf = probs.max(1)
    p_all = 1 - probs[:, benign]
    inside = np.array([o.distance <= head.ood_threshold for o in outs])
    grid = np.round(np.arange(0.5, 0.991, 0.01), 2)
    t_conf = next((t for t in grid if _sel_acc(pred, yva, inside & (conf >= t) & (pred != benign))
                   >= TARGET_OK_ACCURACY), grid[-1])
    # Benign needs more than any validation ALL field that was called benign: no confident missed ALL.
    missed = conf[inside & (pred == benign) & (yva != benign)]
    t_benign = float(min(0.99, max(t_conf, np.round(missed.max() + 0.01, 2) if len(missed) else t_conf)))
    benign_fields = inside & (yva == benign)
    t_all = next((t for t in grid if benign_fields.any()
                  and (p_all[benign_fields] >= t).mean() <= MAX_BENIGN_ALERT), grid[-1])
    th = Thresholds(confidence=float(t_conf), all_probability=float(t_all), benign_confidence=t_benign)
    verdicts = [decide(head, o, head.classes[benign], th) for o in outs]
    info = {"validation_images": len(yva), "missed_all_called_benign_max_confidence":
            float(missed.max()) if len(missed) else None,
            "validation_ok_fraction": float(np.mean([v.status == Status.OK for v in verdicts]))}
    return th, info


def _sel_acc(pred: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    return float((pred[mask] == y[mask]).mean()) if mask.any() else 0.0


def compare_ood(xtr, ytr, xva, yva, classes, indices, C, seed, sets: dict[str, tuple[np.ndarray, np.ndarray]]
                ) -> tuple[Head, list[dict]]:
    """Fit every OOD method; for each, the share of each set referred or sent to retake.

    ``sets`` maps a name to (features, quality codes); names starting with "in:" must pass (the validation
    images), the others should be caught. The method chosen catches the most on average (retake counts:
    the gate runs first on the device); every method's threshold refers ``OOD_VAL_REFER`` of validation.
    Returns the chosen method's fitted head (not fitted again) and the table.
    """
    rows, heads = [], {}
    for method in OOD_METHODS:
        head = heads[method] = fit_head(xtr, ytr, xva, yva, classes, indices, C, method, seed)
        row = {"method": method, "threshold": head.ood_threshold}
        for name, (f, q) in sets.items():
            d = np.array([o.distance for o in evaluate_many(head, f)]) if len(f) else np.zeros(0)
            caught = (q != QUALITY_OK) | (d > head.ood_threshold)
            row[name] = float(caught.mean()) if len(caught) else float("nan")
        out_names = [n for n in sets if not n.startswith("in:")]
        row["mean_caught"] = float(np.nanmean([row[n] for n in out_names])) if out_names else 0.0
        rows.append(row)
    best = max(rows, key=lambda r: r["mean_caught"])["method"]
    log.info("OOD methods: %s -> %s", [(r["method"], round(r["mean_caught"], 3)) for r in rows], best)
    return heads[best], rows
