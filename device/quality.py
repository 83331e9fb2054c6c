"""The quality gate: is this frame worth classifying?

A frame that is out of focus, badly exposed or shows no stained cells is
answered "retake" with the reason, never classified: the network would still
produce a confident-looking label for it. Pure functions, numpy only.

Every figure is computed on the frame as :func:`device.preprocess.prepare` makes it
for the network: the lit field at :data:`ANALYSIS_SIZE` px and, once the camera is
calibrated, at the training scale. So the thresholds, which were set on the real
images, mean the same thing whatever the camera's resolution or magnification
(see ``tests/device/test_quality.py`` and the figures in :class:`QualityThresholds`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import numpy as np

from device.preprocess import Prepared, luma, prepare

#: Side of the square the figures are computed on (the data set's native size).
ANALYSIS_SIZE = 224
MIN_FRAME_SIDE = 32

OK = "ok"
INVALID, DARK, BRIGHT, CLIPPED, BLUR, SCALE, NO_CELLS = ("invalid", "dark", "bright", "clipped", "blur", "scale",
                                                         "no_cells")
#: Longest autocorrelation lag (px at :data:`ANALYSIS_SIZE`) :func:`texture_px` looks at: 3x the real images' 99.5th
#: percentile; a field whose texture is coarser than that (a blank, a gradient, a photo) reads as this many.
TEXTURE_LIMIT = 32


@dataclass(frozen=True)
class QualityThresholds:
    """``[quality]`` in the config. Defaults set on the real development images (figures below: all 2,767
    through :func:`device.preprocess.prepare`; a Gaussian blur of radius 2 gives sharpness 11.4 at most)."""

    #: Variance of the 4-neighbour Laplacian of the prepared grey image (0..255 scale). Real images: >= 55.9.
    min_sharpness: float = field(default=20.0, metadata={"min": 0.0, "max": 100000.0})
    #: Mean grey level of the uncorrected pixels. Real images: 169..245.
    min_brightness: float = field(default=120.0, metadata={"min": 0.0, "max": 255.0})
    max_brightness: float = field(default=250.0, metadata={"min": 0.0, "max": 255.0})
    #: Fraction of pixels saturated white (all channels >= 250) or black (all <= 5). Real images: <= 0.54.
    max_clipped: float = field(default=0.7, metadata={"min": 0.0, "max": 1.0})
    #: Fraction of pixels in solid stained (purple/violet/blue) nucleus blobs. Real images: >= 0.0038.
    min_stained: float = field(default=0.0015, metadata={"min": 0.0, "max": 1.0})
    #: Texture scale (:func:`texture_px`, px at the analysis size): the field's magnification as the cells show it;
    #: it grows ~linearly with magnification (x1.24 at x1.25, x1.89 at x2). Set on the 432 validation images (never
    #: trained on; median 6.49): finer than the 0.25th percentile is a retake. A field is "coarser" only when its
    #: texture and that of its unstained part (red cells and plasma; median 4.86) both exceed 1.448x their medians,
    #: which 1% of the validation images do: a cluster of large blasts alone coarsens the first, not the second.
    #: Real smears always show red cells: an unstained part finer than 1.5 px (every one of the 2,767 development
    #: images is above it: minimum 1.66) is no smear (flat colour with noise, a pattern of stain-coloured blocks).
    min_texture_px: float = field(default=4.2, metadata={"min": 0.0, "max": float(TEXTURE_LIMIT)})
    min_unstained_texture_px: float = field(default=1.5, metadata={"min": 0.0, "max": float(TEXTURE_LIMIT)})
    max_texture_px: float = field(default=9.4, metadata={"min": 0.0, "max": float(TEXTURE_LIMIT)})
    max_unstained_texture_px: float = field(default=7.0, metadata={"min": 0.0, "max": float(TEXTURE_LIMIT)})

    def __post_init__(self) -> None:
        for lo, hi in (("min_brightness", "max_brightness"), ("min_texture_px", "max_texture_px"),
                       ("min_unstained_texture_px", "max_unstained_texture_px")):
            if getattr(self, lo) >= getattr(self, hi):
                raise ValueError(f"quality.{lo} = {getattr(self, lo)} must be below quality.{hi} = {getattr(self, hi)}")


#: The figures :func:`figures` returns, in its order: the float fields of :class:`Quality`.
FIGURES = ("sharpness", "brightness", "clipped", "stained", "texture", "unstained_texture")


@dataclass(frozen=True)
class Quality:
    """The figures and the gate's decision for one frame."""

    ok: bool
    code: str  # "ok" | "invalid" | "dark" | "bright" | "clipped" | "blur" | "scale" | "no_cells"
    reason: str  # why retake; "" when ok
    sharpness: float = 0.0
    brightness: float = 0.0
    clipped: float = 0.0
    stained: float = 0.0
    texture: float = 0.0  # records made before the scale check read 0.0 for both
    unstained_texture: float = 0.0

    def figures(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in FIGURES}

    def to_dict(self) -> dict:
        """``dataclasses.asdict`` (every field is a plain value), without its recursive copy."""
        return {"ok": self.ok, "code": self.code, "reason": self.reason, **self.figures()}

    @classmethod
    def from_dict(cls, d: dict) -> Quality:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def validate_frame(frame: object) -> str:
    """'' when ``frame`` is a usable HxWx3 uint8 RGB array, else what is wrong with it."""
    if not isinstance(frame, np.ndarray):
        return f"frame is a {type(frame).__name__}, not an image array"
    if frame.dtype != np.uint8:
        if np.issubdtype(frame.dtype, np.floating) and frame.size and not np.all(np.isfinite(frame)):
            return f"frame holds NaN or infinite values (dtype {frame.dtype}); the camera sent garbage"
        return f"frame has dtype {frame.dtype}; expected uint8 RGB"
    if frame.ndim != 3 or frame.shape[2] != 3:
        return f"frame has shape {frame.shape}; expected height x width x 3 (RGB)"
    if min(frame.shape[0], frame.shape[1]) < MIN_FRAME_SIDE:
        return f"frame is {frame.shape[1]}x{frame.shape[0]}; too small to judge (< {MIN_FRAME_SIDE} px)"
    return ""


def sharpness(g: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Variance of the 4-neighbour Laplacian over the lit field: high for crisp cell edges, ~0 for blur."""
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    if valid is not None:
        inner = valid[1:-1, 1:-1] & valid[1:-1, :-2] & valid[1:-1, 2:] & valid[:-2, 1:-1] & valid[2:, 1:-1]
        lap = lap[inner]
    return float(lap.astype(np.float64).var()) if lap.size else 0.0


def texture_px(g: np.ndarray, valid: np.ndarray | None = None, limit: int = TEXTURE_LIMIT) -> float:
    """The field's texture scale: the lag (px) at which the grey image's autocorrelation falls to one half.

    Mean-removed over the lit field (the surround counts as 0), the horizontal and vertical autocorrelations
    are summed at lags 1, 2, ... until their mean drops below half the energy; the crossing is interpolated
    linearly. Cells set it: red cells and nuclei about 20-30 px across at the training magnification give
    4-11 px; the same cells at another objective or camera scale with it, sensor noise and text give ~1,
    blank or smooth frames run to ``limit``. Only lags up to the crossing are computed (~0.5 ms at 224 px).
    """
    h, w = g.shape
    # Each row padded with ``limit`` zeros: in the flat array a horizontal lag never pairs two rows and a vertical
    # lag is a whole number of padded rows, so every lag is one dot product of two contiguous views (no copies).
    x = np.zeros((h, w + limit), np.float32)
    lit = x[:, :w]
    if valid is None:
        lit[...] = g
        lit -= lit.mean(dtype=np.float32)
    elif valid.any():
        v = g[valid].astype(np.float32)
        lit[valid] = v - v.mean(dtype=np.float32)
    flat, row = x.ravel(), w + limit
    energy = float(np.dot(flat, flat))
    if energy <= 1e-6 * h * w:  # flat: no texture at any scale
        return float(limit)
    prev = 1.0
    for k in range(1, limit + 1):
        r = (float(np.dot(flat[:-k], flat[k:])) + float(np.dot(flat[:-k * row], flat[k * row:]))) / (2.0 * energy)
        if r < 0.5:
            return (k - 1) + (prev - 0.5) / (prev - r)
        prev = r
    return float(limit)


def stain_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels with the colour of Romanowsky-stained nuclei (blue to purple to violet).

    Blue well above green, and red not far below green (which excludes the
    cyan-grey background and pale red cells), on the camera's own colours.
    """
    c = rgb.astype(np.int16)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    return ((b - g) >= 35) & ((r - g) >= -15)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion with a (2r+1)^2 square: keeps solid blobs, drops thin rims and specks."""
    h, w = mask.shape
    rows = np.pad(mask, ((0, 0), (radius, radius)), constant_values=False)
    across = mask.copy()
    for dx in range(2 * radius + 1):  # a square is a row then a column: 2(2r+1) ANDs, not (2r+1)^2
        across &= rows[:, dx:dx + w]
    cols = np.pad(across, ((radius, radius), (0, 0)), constant_values=False)
    out = across.copy()
    for dy in range(2 * radius + 1):
        out &= cols[dy:dy + h]
    return out


def stained_fraction(rgb: np.ndarray, valid: np.ndarray | None = None, mask: np.ndarray | None = None) -> float:
    """Share of the field covered by solid stained blobs (nuclei), not by tinted red-cell rims (``mask``: the
    :func:`stain_mask` of ``rgb``, when the caller has it)."""
    blobs = erode(stain_mask(rgb) if mask is None else mask, 2)
    return float(blobs[valid].mean() if valid is not None and valid.any() else blobs.mean())


def clipped_fraction(px: np.ndarray) -> float:
    """Share of the pixels (N x 3) saturated white (every channel >= 250) or black (every channel <= 5)."""
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    white = (r >= 250) & (g >= 250) & (b >= 250)
    black = (r <= 5) & (g <= 5) & (b <= 5)
    return np.count_nonzero(white | black) / len(px)  # = the float64 mean of the mask: a count over a count


def figures(prep: Prepared) -> tuple[float, float, float, float, float, float]:
    """(sharpness, brightness, clipped, stained, texture, unstained texture) of a prepared frame.

    Exposure (brightness, clipping) is read from the uncorrected pixels; focus and stain from the
    colour-normalised image the network sees, at the analysis scale, so a sharp field from another camera
    is sharp here too and a blurred one is not rescued by its resolution.
    """
    v = prep.valid if not prep.valid.all() else None
    raw = prep.raw[prep.valid] if v is not None else prep.raw.reshape(-1, 3)
    clipped = clipped_fraction(raw) if len(raw) else 1.0
    bright = float(luma(raw).mean()) if len(raw) else 0.0
    g, stain = luma(prep.rgb), stain_mask(prep.rgb)
    unstained = prep.valid & ~stain
    return (sharpness(g, v), bright, clipped, stained_fraction(prep.rgb, v, stain), texture_px(g, v),
            texture_px(g, unstained) if unstained.any() else 0.0)


def assess(frame: object, th: QualityThresholds = QualityThresholds(), *, side_px: float | None = None) -> Quality:
    """The gate for a raw frame: prepares it at :data:`ANALYSIS_SIZE` (see :func:`assess_prepared`)."""
    return gate(frame, ANALYSIS_SIZE, th, side_px=side_px)[1]


def gate(frame: object, size: int, th: QualityThresholds = QualityThresholds(), *, side_px: float | None = None,
         timings: dict[str, float] | None = None) -> tuple[Prepared | None, Quality]:
    """Prepare ``frame`` for a ``size`` px network once and judge it: (prepared or None if invalid, quality).

    A network of another size (a reduced test model) is judged on its own :data:`ANALYSIS_SIZE` preparation.
    ``timings`` (if given) receives the milliseconds of "preprocess" and "quality".
    """
    t0 = time.perf_counter()
    problem = validate_frame(frame)
    if problem:
        return None, Quality(False, INVALID, problem + "; check the camera connection and settings")
    assert isinstance(frame, np.ndarray)
    prep = prepare(frame, size, side_px=side_px)
    t1 = time.perf_counter()
    judged = prep if size == ANALYSIS_SIZE else prepare(frame, ANALYSIS_SIZE, side_px=side_px)
    q = assess_prepared(judged, th)
    if timings is not None:
        timings.update(preprocess=round((t1 - t0) * 1000, 3), quality=round((time.perf_counter() - t1) * 1000, 3))
    return prep, q


def assess_prepared(prep: Prepared, th: QualityThresholds = QualityThresholds()) -> Quality:
    """The gate. Checks in the order a technician fixes them: exposure, focus, then the field."""
    values = figures(prep)
    sharp, bright, clipped, stained, texture, unstained = values
    figs = dict(zip(FIGURES, values, strict=True))
    if not all(math.isfinite(v) for v in figs.values()):  # pragma: no cover - uint8 input cannot do this
        return Quality(False, INVALID, "frame figures are not finite; the camera sent garbage", **figs)
    if bright < th.min_brightness:
        return Quality(False, DARK, f"too dark (mean brightness {bright:.0f} < {th.min_brightness:.0f}); "
                       "turn up the lamp or open the condenser diaphragm", **figs)
    if bright > th.max_brightness:
        return Quality(False, BRIGHT, f"over-exposed (mean brightness {bright:.0f} > {th.max_brightness:.0f}); "
                       "turn down the lamp", **figs)
    if clipped > th.max_clipped:
        return Quality(False, CLIPPED, f"{clipped:.0%} of the frame is clipped white or black "
                       f"(> {th.max_clipped:.0%}); adjust the lamp and check the light path", **figs)
    if sharp < th.min_sharpness:
        return Quality(False, BLUR, f"out of focus (sharpness {sharp:.1f} < {th.min_sharpness:.1f}); "
                       "refocus the microscope", **figs)
    fine = texture < th.min_texture_px or unstained < th.min_unstained_texture_px
    if fine or (texture > th.max_texture_px and unstained > th.max_unstained_texture_px):
        what = (f"finer than the training images' (texture scale {texture:.1f} px, minimum {th.min_texture_px:g}; "
                f"red cells and plasma {unstained:.1f} px, minimum {th.min_unstained_texture_px:g})" if fine
                else f"coarser than the training images' (texture scale {texture:.1f} px > {th.max_texture_px:g}, "
                f"red cells and plasma {unstained:.1f} px > {th.max_unstained_texture_px:g})")
        return Quality(False, SCALE, f"the field's texture is {what}: another magnification, or not a blood smear; "
                       "use the 100x oil objective, or run `python -m device calibrate --write` once for this "
                       "camera and adapter", **figs)
    if stained < th.min_stained:
        return Quality(False, NO_CELLS, f"no stained white cells in view (stained fraction {stained:.4f} < "
                       f"{th.min_stained:.4f}); move to a field with white cells, check the stain", **figs)
    return Quality(True, OK, "", **figs)
