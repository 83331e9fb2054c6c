"""Small statistics helpers (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def summary(values: Sequence[float]) -> dict:
    """n, median, p95, mean, min of ``values`` (rounded; None figures when empty)."""
    if len(values) == 0:
        return {"n": 0, "median": None, "p95": None, "mean": None, "min": None}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "median": round(float(np.median(a)), 4), "p95": round(float(np.percentile(a, 95)), 4),
            "mean": round(float(a.mean()), 4), "min": round(float(a.min()), 4)}
