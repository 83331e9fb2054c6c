"""Field scale, so another objective or camera is rescaled to the training scale.

The scale is read from the field's texture (:func:`device.quality.texture_px`: the lag at which the
grey image's autocorrelation falls to one half), which the cells set and which follows the
magnification (in frame pixels x0.86 at x0.8, x1.24 at x1.25, x1.89 at x2: medians over 144 training
images), with class medians of the training images within 5.6-7.0 px. It is expressed as a red-cell
diameter in frame pixels: the texture scale times :data:`RBC_PER_TEXTURE`, the ratio of the training
images' median red-cell diameter (31.2 px, by the isoperimetric estimate this module used before) to their
median texture scale (6.4 px). Only the ratio of the camera's figure to the training images' enters the
crop, so the constant cancels.

(The isoperimetric red-cell estimate 4A/P it replaces varied with smear density, 11.5-46 px between
classes of the development set, and mis-scaled the calibrated runs of the shift suite.)

``python -m device calibrate`` measures a few fields and writes ``[camera] rbc_diameter_px`` into the
config; the toolchain measures the training images the same way (``manifest.json`` ``input.rbc_diameter_px``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.errors import ConfigError, ImageError
from device.preprocess import luma, prepare
from device.quality import ANALYSIS_SIZE, TEXTURE_LIMIT, texture_px

log = logging.getLogger(__name__)

#: Red-cell diameter per texture pixel on the development images (31.2 px / 6.4 px): see the module docstring.
RBC_PER_TEXTURE = 4.86
#: Texture scales outside this range (px at the analysis size) are no smear to measure: noise or text below,
#: a blank or evenly lit field at :data:`device.quality.TEXTURE_LIMIT`.
MIN_TEXTURE = 2.0
#: At least this share of the analysis square must be lit field.
MIN_LIT = 0.25


@dataclass(frozen=True)
class Calibration:
    rbc_diameter_px: float  # median over fields, in frame pixels
    fields: int  # fields that could be measured
    per_field: tuple[float, ...]


def rbc_diameter(frame: np.ndarray) -> float | None:
    """Red-cell diameter estimate (frame pixels) for one field from its texture scale, or None when the field
    shows nothing to measure (blank, too little of it lit, or no cell-sized texture)."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ImageError(f"frame has shape {frame.shape} dtype {frame.dtype}; expected HxWx3 uint8 RGB")
    prep = prepare(frame, ANALYSIS_SIZE)  # uncalibrated: the disc's square, or the frame's shorter side
    if prep.valid.mean() < MIN_LIT:
        return None
    t = texture_px(luma(prep.rgb), None if prep.valid.all() else prep.valid)
    if not MIN_TEXTURE <= t < TEXTURE_LIMIT:
        return None
    return RBC_PER_TEXTURE * t * prep.side / ANALYSIS_SIZE


def calibrate(frames: list[np.ndarray]) -> Calibration:
    """Median of :func:`rbc_diameter` over ``frames``; raises when too few fields show cells."""
    d = [x for f in frames if (x := rbc_diameter(f)) is not None]
    if len(d) < max(1, len(frames) // 2):
        raise ImageError(f"only {len(d)} of {len(frames)} fields showed enough red cells to measure; "
                         "move to a part of the smear with a single layer of red cells, focus, and try again")
    return Calibration(float(np.median(d)), len(d), tuple(d))


def write_to_config(path: Path, value: float) -> None:
    """Set ``[camera] rbc_diameter_px`` in a TOML config file, keeping every other line and comment."""
    try:
        text = path.read_text() if path.exists() else ""
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror}); run as a user who may") from exc
    line = f"rbc_diameter_px = {value:.2f}"
    section = re.search(r"(?m)^\[camera\]\s*$", text)
    if section is None:
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"[camera]\n{line}\n"
    else:
        nxt = re.search(r"(?m)^\[", text[section.end():])
        end = section.end() + (nxt.start() if nxt else len(text) - section.end())
        body = text[section.end():end]
        if re.search(r"(?m)^rbc_diameter_px\s*=.*$", body):
            body = re.sub(r"(?m)^rbc_diameter_px\s*=.*$", line, body)
        else:
            body = "\n" + line + body
        text = text[:section.end()] + body + text[end:]
    try:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the config ({exc.strerror}); run with sudo or add "
                          f"'{line}' under [camera] by hand") from exc
