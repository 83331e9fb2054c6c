"""Field scale: the median red-cell diameter, so another objective or camera is rescaled to the training scale.

Red cells are the one object every peripheral smear has in numbers and whose size barely varies (about
7.5 um). Their diameter in pixels is measured with the isoperimetric estimate d = 4A/P over all red-cell
pixels of the field (for a disc, 4 * (pi d^2 / 4) / (pi d) = d): no segmentation of single cells, no
connected components, numpy only. P is counted as horizontal plus vertical mask transitions times pi/4,
the mean projection factor of a boundary in random orientation. Touching cells and central pallor bias the
estimate, but by the same factor at every magnification, which is all a ratio of two scales needs.

``python -m device calibrate`` measures a few fields and writes ``[camera] rbc_diameter_px`` into the
config; the toolchain measures the training images the same way (``manifest.json`` ``input.rbc_diameter_px``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from device.errors import ConfigError, ImageError
from device.preprocess import estimate_background, find_field, luma, normalise_colour

log = logging.getLogger(__name__)

#: Fields are measured at most this many pixels across (cells stay well over 5 px wide at any sensible scale).
MEASURE_MAX = 512
#: A pixel belongs to a cell when it is this much darker than the background (relative luma).
CELL_CONTRAST = 0.9
MIN_CELL_FRACTION = 0.05
#: The second pass measures cells at this size (pixels across).
WORK_DIAMETER = 16.0


@dataclass(frozen=True)
class Calibration:
    rbc_diameter_px: float  # median over fields, in frame pixels
    fields: int  # fields that could be measured
    per_field: tuple[float, ...]


def _measure(sq: np.ndarray) -> float | None:
    """4A/P cell diameter (pixels of ``sq``), or None when too few cells are in view."""
    rgb = normalise_colour(sq, estimate_background(sq))
    g = luma(rgb)
    # 3x3 box smoothing before the threshold: sensor noise would otherwise add boundary.
    p = np.pad(g, 1, mode="edge")
    g = sum(p[dy:dy + g.shape[0], dx:dx + g.shape[1]] for dy in range(3) for dx in range(3)) / 9
    cells = g < CELL_CONTRAST * float(np.percentile(g, 90))
    if cells.mean() < MIN_CELL_FRACTION:
        return None
    transitions = float((cells[:, 1:] != cells[:, :-1]).sum() + (cells[1:] != cells[:-1]).sum())
    return 4 * float(cells.sum()) / (transitions * np.pi / 4) if transitions else None


def _resized(sq: np.ndarray, factor: float) -> np.ndarray:
    size = (max(16, round(sq.shape[1] / factor)), max(16, round(sq.shape[0] / factor)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(sq)).resize(size, Image.Resampling.BILINEAR))


def rbc_diameter(frame: np.ndarray) -> float | None:
    """Red-cell diameter estimate (frame pixels) for one field, or None when it shows too few cells.

    Two passes: a first estimate, then the field is resampled so cells are :data:`WORK_DIAMETER` px across
    and measured again. The smoothing and the pixel grid then act on cells of the same size whatever the
    magnification, which keeps the estimate proportional to the true scale.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ImageError(f"frame has shape {frame.shape} dtype {frame.dtype}; expected HxWx3 uint8 RGB")
    field = find_field(frame)
    half = field.radius / np.sqrt(2) if field.disc else min(frame.shape[:2]) / 2  # inscribed square
    x0, y0 = int(max(0, field.cx - half)), int(max(0, field.cy - half))
    sq = frame[y0:int(field.cy + half), x0:int(field.cx + half)]
    if min(sq.shape[:2]) < 16:
        return None
    factor = max(1.0, min(sq.shape[:2]) / MEASURE_MAX)
    first = _measure(_resized(sq, factor) if factor > 1 else sq)
    if first is None:
        return None
    factor *= first / WORK_DIAMETER
    second = _measure(_resized(sq, factor))
    return None if second is None else second * factor


def calibrate(frames: list[np.ndarray]) -> Calibration:
    """Median of :func:`rbc_diameter` over ``frames``; raises when too few fields show cells."""
    d = [x for f in frames if (x := rbc_diameter(f)) is not None]
    if len(d) < max(1, len(frames) // 2):
        raise ImageError(f"only {len(d)} of {len(frames)} fields showed enough red cells to measure; "
                         "move to a part of the smear with a single layer of red cells and try again")
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
