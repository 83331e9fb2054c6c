"""Minimum-redundancy maximum-relevance feature selection (Peng, Long & Ding, 2005).

Criterion: MIQ (relevance / mean redundancy), the one MATLAB's ``fscmrmr``
uses and so the one the paper's MATLAB pipeline ran; MID (relevance - mean
redundancy) is available too. Mutual information is estimated by plug-in
(histogram) estimates after equal-frequency discretisation of every feature
into ``bins`` levels (10 by default), which is robust to the heavy-tailed
CNN activations and needs no bandwidth choice.
"""

from __future__ import annotations

import numpy as np


def discretise(x: np.ndarray, bins: int = 10) -> np.ndarray:
    """Equal-frequency bin index per column: (N, F) float -> (N, F) int in [0, bins)."""
    qs = np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1], axis=0)  # (bins-1, F)
    out = np.empty(x.shape, np.int64)
    for j in range(x.shape[1]):
        out[:, j] = np.searchsorted(qs[:, j], x[:, j], side="right")
    return out


def _entropy_counts(counts: np.ndarray, n: int) -> np.ndarray:
    p = counts / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


def column_entropies(B: np.ndarray, nb: int) -> np.ndarray:
    n, f = B.shape
    counts = np.bincount((np.arange(f) * nb + B).ravel(), minlength=f * nb).reshape(f, nb)
    return _entropy_counts(counts, n)


def mutual_info_many(a: np.ndarray, B: np.ndarray, na: int, nb: int, h_b: np.ndarray | None = None) -> np.ndarray:
    """I(a; B[:, j]) = H(a) + H(B_j) - H(a, B_j) for every column j, in nats.

    ``a`` (N,) ints < na, ``B`` (N, F) ints < nb; ``h_b`` caches H(B_j).
    """
    n, f = B.shape
    joint = np.bincount((np.arange(f) * (na * nb) + a[:, None] * nb + B).ravel(), minlength=f * na * nb)
    h_a = _entropy_counts(np.bincount(a, minlength=na)[None], n)
    h_b = column_entropies(B, nb) if h_b is None else h_b
    return h_a + h_b - _entropy_counts(joint.reshape(f, na * nb), n)


def mrmr(x: np.ndarray, y: np.ndarray, k: int | None = None, *, criterion: str = "MIQ", bins: int = 10) -> np.ndarray:
    """Rank features greedily; returns the first ``k`` (all if None) feature indices in selection order."""
    if criterion not in ("MIQ", "MID"):
        raise ValueError(f"criterion must be 'MIQ' or 'MID', not {criterion!r}")
    n, f = x.shape
    k = f if k is None else min(k, f)
    xb = discretise(x, bins)
    classes, yi = np.unique(y, return_inverse=True)
    h_b = column_entropies(xb, bins)
    relevance = mutual_info_many(yi, xb, len(classes), bins, h_b)
    selected = [int(np.argmax(relevance))]
    redundancy_sum = np.zeros(f)
    remaining = np.ones(f, bool)
    remaining[selected[0]] = False
    while len(selected) < k:
        last = selected[-1]
        redundancy_sum += mutual_info_many(xb[:, last], xb, bins, bins, h_b)
        red = redundancy_sum / len(selected)
        score = relevance - red if criterion == "MID" else relevance / np.maximum(red, 1e-12)
        score = np.where(remaining, score, -np.inf)
        nxt = int(np.argmax(score))
        selected.append(nxt)
        remaining[nxt] = False
    return np.array(selected, dtype=np.int64)
