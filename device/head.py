"""The classification head in plain numpy: mRMR mask, scaler, linear SVM,
calibrated probabilities, the out-of-distribution score, and the network's own classifier as a second opinion.

Fitted by ``convert/`` with scikit-learn, exported as arrays, and evaluated
here with the same arithmetic (tests assert identical decisions on every
test image). Pure functions: no I/O beyond :func:`load_head`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.errors import BundleError

HEAD_ARRAYS = ("indices", "mean", "scale", "coef", "intercept", "platt_a", "platt_b", "ood_threshold")
#: The out-of-distribution scores this head can carry; the toolchain compares them and ships one.
OOD_METHODS = ("knn", "mahalanobis", "energy")
OOD_ARRAYS = {"knn": ("bank",), "mahalanobis": ("class_means", "precision"), "energy": ()}
#: Neighbours averaged by the k-nearest-neighbour distance.
KNN_K = 5
#: The linear layer DarkNet19 was trained with (classes x all features), shipped beside the SVM: where its top
#: class differs from the head's confident label, the field is referred (``device.classifier.decide``).
NETWORK_ARRAYS = ("network_coef", "network_intercept")


@dataclass(frozen=True, eq=False)
class Head:
    classes: tuple[str, ...]
    indices: np.ndarray  # (K,) int: the mRMR-selected feature indices, in selection order
    mean: np.ndarray  # (K,) standardisation
    scale: np.ndarray  # (K,)
    coef: np.ndarray  # (C, K) one-vs-rest linear SVM
    intercept: np.ndarray  # (C,)
    platt_a: np.ndarray  # (C,) sigmoid calibration: p_c = 1 / (1 + exp(a_c * f_c + b_c)), fitted out of sample
    platt_b: np.ndarray  # (C,)
    ood_method: str  # one of OOD_METHODS
    ood_threshold: float  # scores above this are "unlike anything trained on"
    n_features: int  # length of the model's feature vector
    bank: np.ndarray | None = None  # knn: (N, K) float32 standardised training features
    class_means: np.ndarray | None = None  # mahalanobis: (C, K)
    precision: np.ndarray | None = None  # mahalanobis: (K, K) inverse of the shared shrunk covariance
    network_coef: np.ndarray | None = None  # (C, F): the network's own classifier on every feature; None: no check
    network_intercept: np.ndarray | None = None  # (C,)

    @property
    def k(self) -> int:
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class HeadOutput:
    scores: np.ndarray  # (C,) SVM decision values
    probs: np.ndarray  # (C,) calibrated, sum to 1
    index: int  # argmax of probs
    confidence: float  # probs[index]
    distance: float  # out-of-distribution score (higher = less like the training images)
    network_index: int = -1  # the network's own classifier's top class; -1 when the head carries none


def standardise(head: Head, features: np.ndarray) -> np.ndarray:
    """Select the mRMR features and standardise; works on (N, F) or (F,)."""
    return (features[..., head.indices] - head.mean) / head.scale


def evaluate(head: Head, features: np.ndarray) -> HeadOutput:
    """Score one dequantized feature vector (F,)."""
    if features.shape != (head.n_features,):
        raise ValueError(f"feature vector has shape {features.shape}; the head expects ({head.n_features},)")
    return evaluate_many(head, features[None])[0]


def evaluate_many(head: Head, features: np.ndarray) -> list[HeadOutput]:
    """Score (N, F) feature vectors: the one implementation of the head's arithmetic.

    The device scores one field at a time through :func:`evaluate`; ``convert/`` scores whole test
    sets here, so both run exactly the same code.
    """
    if features.ndim != 2 or features.shape[1] != head.n_features:
        raise ValueError(f"features have shape {features.shape}; the head expects (N, {head.n_features})")
    z = standardise(head, features.astype(np.float64))
    scores = z @ head.coef.T + head.intercept
    probs = calibrate(head, scores)
    idx = probs.argmax(axis=1)
    d = ood_score(head, z, scores)
    if head.network_coef is not None and head.network_intercept is not None:  # C x F multiply-adds: ~4,000
        net = (features.astype(np.float64) @ head.network_coef.T + head.network_intercept).argmax(axis=1)
    else:
        net = np.full(len(features), -1)
    return [HeadOutput(s, p, int(i), float(p[i]), float(di), int(ni))
            for s, p, i, di, ni in zip(scores, probs, idx, d, net)]


def calibrate(head: Head, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest Platt sigmoids, normalised to sum to one (scikit-learn's rule)."""
    with np.errstate(over="ignore"):
        p = 1.0 / (1.0 + np.exp(head.platt_a * scores + head.platt_b))
    total = p.sum(axis=-1, keepdims=True)
    n = scores.shape[-1]
    return np.where(total > 0, p / np.where(total > 0, total, 1), 1.0 / n)


def knn_distance(bank: np.ndarray, z: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Mean RMS distance (per standardised feature) to the ``k`` nearest training images.

    ||a-b||^2 = |a|^2 + |b|^2 - 2ab in float32: one (N, M) matrix product, ~1 ms for 1,700 x 500 on a Pi.
    """
    b = bank.astype(np.float32)
    zz = z.astype(np.float32)
    d2 = (zz * zz).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * zz @ b.T
    k = min(k, b.shape[0])
    near = np.partition(np.maximum(d2, 0), k - 1, axis=1)[:, :k]
    return np.sqrt(near / z.shape[1]).mean(axis=1).astype(np.float64)


def mahalanobis(class_means: np.ndarray, precision: np.ndarray, z: np.ndarray) -> np.ndarray:
    """RMS Mahalanobis distance to the nearest class mean under one shared (shrunk) covariance."""
    d = z[:, None, :] - class_means[None]  # (N, C, K)
    m = np.einsum("nck,kj,ncj->nc", d, precision, d)
    return np.sqrt(np.maximum(m, 0) / z.shape[1]).min(axis=1)


def energy(scores: np.ndarray) -> np.ndarray:
    """Negative log-sum-exp of the SVM scores: low when some class claims the field strongly."""
    m = scores.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(scores - m).sum(axis=1)))


def ood_score(head: Head, z: np.ndarray, scores: np.ndarray) -> np.ndarray:
    if head.ood_method == "knn":
        return knn_distance(head.bank, z)
    if head.ood_method == "mahalanobis":
        return mahalanobis(head.class_means, head.precision, z)
    return energy(scores)


def save_head(path: Path, head: Head) -> None:
    extra = {n: np.asarray(getattr(head, n)) for n in OOD_ARRAYS[head.ood_method]}
    if head.network_coef is not None:
        extra |= {n: np.asarray(getattr(head, n)) for n in NETWORK_ARRAYS}
    np.savez(path, classes=np.array(head.classes), n_features=np.array(head.n_features),
             ood_method=np.array(head.ood_method), **{name: np.asarray(getattr(head, name)) for name in HEAD_ARRAYS},
             **extra)


def load_head(path: Path) -> Head:
    try:
        with np.load(path, allow_pickle=False) as z:
            method = str(z["ood_method"]) if "ood_method" in z.files else ""
            if method not in OOD_METHODS:
                raise BundleError(f"{path}: head has no known out-of-distribution method ({method or 'none'}; "
                                  f"expected one of {', '.join(OOD_METHODS)}); an older bundle: rebuild it with "
                                  "`make convert`")
            missing = [n for n in (*HEAD_ARRAYS, *OOD_ARRAYS[method], "classes", "n_features") if n not in z.files]
            if missing:
                raise BundleError(f"{path}: head lacks arrays {', '.join(missing)}; rebuild it with `make convert`")
            arrays = {n: z[n] for n in HEAD_ARRAYS}
            extra = {n: z[n].astype(np.float32 if n == "bank" else np.float64) for n in OOD_ARRAYS[method]}
            net = [n for n in NETWORK_ARRAYS if n in z.files]  # optional: bundles before 2026-12-08 have none
            if net and len(net) != len(NETWORK_ARRAYS):
                raise BundleError(f"{path}: head has {net[0]} without {set(NETWORK_ARRAYS).difference(net).pop()}; "
                                  "rebuild it with `make convert`")
            extra |= {n: z[n].astype(np.float64) for n in net}
            classes = tuple(str(c) for c in z["classes"])
            n_features = int(z["n_features"])
    except BundleError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # a damaged .npz is a bad zip
        raise BundleError(f"{path}: head file is unreadable ({exc}); rebuild it with `make convert`") from exc
    head = Head(classes=classes, n_features=n_features, ood_method=method,
                ood_threshold=float(arrays.pop("ood_threshold")), **extra,
                **{k: v.astype(np.int64 if k == "indices" else np.float64) for k, v in arrays.items()})
    check_head(head, path)
    return head


def check_head(head: Head, where: Path | str) -> None:
    """Shapes must agree; a head for another model is refused, not half-used."""
    c, k = len(head.classes), head.k
    expect = {"mean": (k,), "scale": (k,), "coef": (c, k), "intercept": (c,), "platt_a": (c,), "platt_b": (c,)}
    if head.ood_method == "mahalanobis":
        expect |= {"class_means": (c, k), "precision": (k, k)}
    network = NETWORK_ARRAYS if head.network_coef is not None else ()
    if network:
        expect |= {"network_coef": (c, head.n_features), "network_intercept": (c,)}
    for name, shape in expect.items():
        got = getattr(head, name).shape
        if got != shape:
            raise BundleError(f"{where}: head array '{name}' has shape {got}, expected {shape} "
                              f"({c} classes, {k} selected features)")
    if head.ood_method == "knn" and (head.bank.ndim != 2 or head.bank.shape[1] != k or len(head.bank) == 0):
        raise BundleError(f"{where}: head array 'bank' has shape {head.bank.shape}, expected (N, {k})")
    if k == 0 or head.indices.min() < 0 or head.indices.max() >= head.n_features:
        raise BundleError(f"{where}: mRMR indices fall outside 0..{head.n_features - 1}")
    for name in ("mean", "scale", "coef", "intercept", "platt_a", "platt_b", *OOD_ARRAYS[head.ood_method], *network):
        if not np.all(np.isfinite(getattr(head, name))):
            raise BundleError(f"{where}: head array '{name}' holds NaN or infinity; rebuild it with `make convert`")
    if np.any(head.scale <= 0):
        raise BundleError(f"{where}: head scale must be positive")
