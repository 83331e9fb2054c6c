"""The classification head in plain numpy: mRMR mask, scaler, linear SVM,
calibrated probabilities and the out-of-distribution check.

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

HEAD_ARRAYS = ("indices", "mean", "scale", "coef", "intercept", "platt_a", "platt_b",
               "centroids", "spread", "ood_threshold")


@dataclass(frozen=True, eq=False)
class Head:
    classes: tuple[str, ...]
    indices: np.ndarray  # (K,) int: the mRMR-selected feature indices, in selection order
    mean: np.ndarray  # (K,) standardisation
    scale: np.ndarray  # (K,)
    coef: np.ndarray  # (C, K) one-vs-rest linear SVM
    intercept: np.ndarray  # (C,)
    platt_a: np.ndarray  # (C,) sigmoid calibration: p_c = 1 / (1 + exp(a_c * f_c + b_c))
    platt_b: np.ndarray  # (C,)
    centroids: np.ndarray  # (C, K) class means of standardised training features
    spread: np.ndarray  # (C, K) class std of standardised training features
    ood_threshold: float  # distances above this are "unlike anything trained on"
    n_features: int  # length of the model's feature vector

    @property
    def k(self) -> int:
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class HeadOutput:
    scores: np.ndarray  # (C,) SVM decision values
    probs: np.ndarray  # (C,) calibrated, sum to 1
    index: int  # argmax of probs
    confidence: float  # probs[index]
    distance: float  # to the nearest class centroid, in training-spread units


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

    The device scores one field at a time through :func:`evaluate`; ``convert/``
    scores whole test sets here, so both run exactly the same code.
    """
    if features.ndim != 2 or features.shape[1] != head.n_features:
        raise ValueError(f"features have shape {features.shape}; the head expects (N, {head.n_features})")
    z = standardise(head, features.astype(np.float64))
    scores = z @ head.coef.T + head.intercept
    probs = calibrate(head, scores)
    idx = probs.argmax(axis=1)
    d = distance(head, z)
    return [HeadOutput(s, p, int(i), float(p[i]), float(di)) for s, p, i, di in zip(scores, probs, idx, d)]


def calibrate(head: Head, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest Platt sigmoids, normalised to sum to one (scikit-learn's rule)."""
    with np.errstate(over="ignore"):
        p = 1.0 / (1.0 + np.exp(head.platt_a * scores + head.platt_b))
    total = p.sum(axis=-1, keepdims=True)
    n = scores.shape[-1]
    return np.where(total > 0, p / np.where(total > 0, total, 1), 1.0 / n)


def distance(head: Head, z: np.ndarray) -> np.ndarray:
    """RMS distance (in per-class training standard deviations) to the nearest class centroid.

    ~1 for a typical training image; a field with no cells, a different stain
    or a different magnification lands far away and is referred, not guessed.
    """
    d = (z[..., None, :] - head.centroids) / head.spread
    return np.sqrt((d ** 2).mean(axis=-1)).min(axis=-1)


def save_head(path: Path, head: Head) -> None:
    np.savez(path, classes=np.array(head.classes), n_features=np.array(head.n_features),
             **{name: np.asarray(getattr(head, name)) for name in HEAD_ARRAYS})


def load_head(path: Path) -> Head:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in (*HEAD_ARRAYS, "classes", "n_features") if n not in z.files]
            if missing:
                raise BundleError(f"{path}: head lacks arrays {', '.join(missing)}; rebuild it with `make convert`")
            arrays = {n: z[n] for n in HEAD_ARRAYS}
            classes = tuple(str(c) for c in z["classes"])
            n_features = int(z["n_features"])
    except BundleError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # a damaged .npz is a bad zip
        raise BundleError(f"{path}: head file is unreadable ({exc}); rebuild it with `make convert`") from exc
    head = Head(classes=classes, n_features=n_features, ood_threshold=float(arrays.pop("ood_threshold")),
                **{k: v.astype(np.int64 if k == "indices" else np.float64) for k, v in arrays.items()})
    check_head(head, path)
    return head


def check_head(head: Head, where: Path | str) -> None:
    """Shapes must agree; a head for another model is refused, not half-used."""
    c, k = len(head.classes), head.k
    expect = {"mean": (k,), "scale": (k,), "coef": (c, k), "intercept": (c,), "platt_a": (c,),
              "platt_b": (c,), "centroids": (c, k), "spread": (c, k)}
    for name, shape in expect.items():
        got = getattr(head, name).shape
        if got != shape:
            raise BundleError(f"{where}: head array '{name}' has shape {got}, expected {shape} "
                              f"({c} classes, {k} selected features)")
    if k == 0 or head.indices.min() < 0 or head.indices.max() >= head.n_features:
        raise BundleError(f"{where}: mRMR indices fall outside 0..{head.n_features - 1}")
    for name in ("mean", "scale", "coef", "intercept", "platt_a", "platt_b", "centroids", "spread"):
        if not np.all(np.isfinite(getattr(head, name))):
            raise BundleError(f"{where}: head array '{name}' holds NaN or infinity; rebuild it with `make convert`")
    if np.any(head.scale <= 0) or np.any(head.spread <= 0):
        raise BundleError(f"{where}: head scale/spread must be positive")
