"""Feature sets for the evaluation: the shift suite on the test split and the out-of-distribution sets.

Every frame goes through the device's own field code (``screen``: prepare, quality gate, int8 features),
so what is reported is what the Pi would answer. Calibrated runs use ``device.calibrate`` on the first
:data:`CALIBRATION_FIELDS` frames of that set, as a technician does once per box.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from convert import ood, shifts
from device.calibrate import calibrate
from device.preprocess import load_image
from device.quality import OK as QUALITY_OK

log = logging.getLogger(__name__)

Screen = Callable[[np.ndarray, "float | None"], "tuple[np.ndarray, str]"]
CALIBRATION_FIELDS = 24
#: The other lab's smear fields, beside the development set (``../shared/data/ood-bccd``).
BCCD_FOLDER = "ood-bccd"


def side_for(frames: list[np.ndarray], geometry: tuple[float, float]) -> float:
    """The calibrated square side for frames like these: field_px * camera RBC diameter / training diameter."""
    field_px, train_d = geometry
    return field_px * calibrate(frames[:CALIBRATION_FIELDS]).rbc_diameter_px / train_d


def _run(frames: list[np.ndarray], one: Screen, side: float | None) -> tuple[np.ndarray, np.ndarray]:
    res = [one(f, side) for f in frames]
    return np.stack([r[0] for r in res]).astype(np.float32), np.array([r[1] for r in res])


def shift_sets(sources: list[np.ndarray], geometry: tuple[float, float], one: Screen) -> dict[str, np.ndarray]:
    """Keys ``{i}|{strength}|{cal}`` -> features, ``...|q`` -> quality codes, ``...|side`` -> calibrated side."""
    out: dict[str, np.ndarray] = {}
    for i, sh in enumerate(shifts.suite()):
        for strength, param in sh.params.items():
            frames = [sh.fn(im, param) for im in sources]
            modes = ("none", "calibrated") if sh.geometric else ("none",)
            for mode in modes:
                side = side_for(frames, geometry) if mode == "calibrated" else None
                f, q = _run(frames, one, side)
                key = f"{i}|{strength}|{mode}"
                out[key], out[key + "|q"] = f, q
                out[key + "|side"] = np.float64(side or 0.0)
                log.info("shift %s %s (%s): %d frames, %d passed the gate", sh.name, strength, mode, len(f),
                         int((q == QUALITY_OK).sum()))
    return out


def bccd_frames(folder: Path) -> list[np.ndarray]:
    paths = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    return [np.asarray(load_image(p)) for p in paths]


def ood_sets(geometry: tuple[float, float], one: Screen, seed: int, bccd: Path) -> dict[str, np.ndarray]:
    """``bccd|none``, ``bccd|calibrated`` (another lab's smears in ``bccd``) and ``synthetic`` (non-smear frames)."""
    out: dict[str, np.ndarray] = {}
    frames = bccd_frames(bccd)
    if frames:
        for mode in ("none", "calibrated"):
            side = side_for(frames, geometry) if mode == "calibrated" else None
            out[f"bccd|{mode}"], out[f"bccd|{mode}|q"] = _run(frames, one, side)
            out[f"bccd|{mode}|side"] = np.float64(side or 0.0)
    else:
        log.warning("%s is absent: the other-lab set is left out of the report", bccd)
    synth = ood.frames(seed=seed)
    out["synthetic"], out["synthetic|q"] = _run([f for _, f in synth], one, None)
    out["synthetic|kind"] = np.array([k for k, _ in synth])
    return out
