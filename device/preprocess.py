"""Image decoding and the model's input preparation.

This module is the single definition of what the network sees. ``convert/``
imports it to build training tensors, calibration data and the features the
head is fitted on, so the Pi and the workstation cannot drift apart (the
failure that took an earlier open ALL classifier from 20/20 on a desktop to
11/20 on its board).
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from device.errors import ImageError

log = logging.getLogger(__name__)

#: Formats a microscope camera or a clinic's PC plausibly produces. Anything else
#: (GIF animations, PSD, ICO...) is refused rather than guessed at.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "MPO"})
#: 40 MP is larger than any eyepiece camera (the Pi HQ camera is 12.3 MP) and
#: small enough that decoding cannot exhaust a Pi's memory.
MAX_PIXELS = 40_000_000
MIN_SIDE = 64


@dataclass(frozen=True)
class InputSpec:
    """How a frame becomes the model's input tensor (from the manifest).

    ``scale``/``zero_point`` are the int8 input quantization of the TFLite model:
    real = scale * (q - zero_point). The network takes RGB pixel values 0..255
    (normalisation is inside the graph), so a calibrated model usually has
    scale == 1.0 and zero_point == -128 and quantization is an exact shift.
    """

    size: int = 224
    scale: float = 1.0
    zero_point: int = -128
    dtype: str = "int8"


def load_image(source: str | Path | bytes, *, name: str | None = None) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) to an upright 8-bit RGB image.

    Raises :class:`ImageError` naming the file and what to do, for every input
    that is not a colour photograph we can trust: unknown format, truncated
    data, greyscale, absurd size, decompression bombs.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(f"{label}: cannot read file ({exc.strerror}); check the path") from exc
    if not data:
        raise ImageError(f"{label}: file is empty (0 bytes); supply a JPEG or PNG photograph")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in ACCEPTED_FORMATS:
                raise ImageError(
                    f"{label}: format {fmt or 'unknown'} is not accepted; "
                    f"use one of {', '.join(sorted(ACCEPTED_FORMATS))}"
                )
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(
                    f"{label}: {w}x{h} pixels is over the {MAX_PIXELS // 1_000_000} MP limit; "
                    "resize the photograph before classifying it"
                )
            if min(w, h) < MIN_SIDE:
                raise ImageError(
                    f"{label}: {w}x{h} pixels is too small (shorter side < {MIN_SIDE}); "
                    "capture the field at full resolution"
                )
            if getattr(img, "n_frames", 1) > 1:
                raise ImageError(f"{label}: image has {img.n_frames} frames; supply a single still photograph")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports corrupt data with these
        raise ImageError(f"{label}: not a decodable image ({exc}); re-save or re-capture it") from exc
    return _to_rgb8(ImageOps.exif_transpose(img), label)


def _to_rgb8(img: Image.Image, label: str) -> Image.Image:
    mode = img.mode
    if mode in ("L", "1", "I", "F", "I;16", "I;16B", "I;16L", "LA", "La"):
        raise ImageError(
            f"{label}: greyscale image (mode {mode}); the classifier needs the stain colours, "
            "so supply a colour (RGB) photograph"
        )
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent areas become white, the colour of an empty slide.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode in ("RGB;16", "RGB;16B", "RGB;16L", "I;16N"):
        arr = np.asarray(img).astype(np.uint16) >> 8
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


# --------------------------------------------------------------------------- the field and its colour
#: Every field's background (plasma and glass, the brightest part of any smear, near white in every lab)
#: is mapped to this neutral grey level: one per-channel gain (a von Kries / white-patch correction) that
#: removes lamp colour temperature, camera white balance and a lab's overall tint. 240 leaves headroom for
#: the development images, whose background is close to clipping (mean R, G, B = 249, 255, 249).
BACKGROUND_TARGET = 240.0
#: The background is the median colour of the brightest 15% of the field's pixels.
BACKGROUND_QUANTILE = 0.85
#: Gains are bounded so that a dark or tinted frame is not amplified into something it is not; such a
#: frame is refused by the quality gate, which reads the uncorrected pixels.
GAIN_RANGE = (0.5, 3.0)
#: A frame with more than this share of dark pixels has a dark surround: the lit disc of an eyepiece.
DISC_MIN_DARK = 0.03
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class Field:
    """Where the lit field is in a camera frame (pixels of that frame)."""

    cx: float
    cy: float
    radius: float  # of the lit disc; half the shorter side when there is no dark surround
    disc: bool  # True: a lit disc inside a dark surround (an eyepiece image)


@dataclass(frozen=True, eq=False)
class Prepared:
    """A frame made ready for the network, and what the quality gate needs from it."""

    rgb: np.ndarray  # (S, S, 3) uint8, colour-normalised: exactly what the network sees
    raw: np.ndarray  # (S, S, 3) uint8, same geometry before colour normalisation (exposure checks)
    valid: np.ndarray  # (S, S) bool: pixels inside the lit field (not surround, not outside the frame)
    background: tuple[float, float, float]  # estimated background colour of ``raw``
    field: Field
    side: float  # side of the square taken from the frame, in frame pixels


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma as float32."""
    return rgb.astype(np.float32) @ LUMA


def find_field(frame: np.ndarray) -> Field:
    """Locate the lit eyepiece disc, or the whole frame when there is no dark surround.

    Works on a subsampled grey image (long side ~256 px), so it costs well under a millisecond
    whatever the sensor size. The radius is the largest of the area-equivalent radius and the lit
    half-widths through the centroid, so a disc cut by the frame edges is still measured right.
    """
    h, w = frame.shape[:2]
    step = max(1, max(h, w) // 256)
    g = luma(frame[::step, ::step])
    # The lit threshold below is at most max(16, max(g) / 4), as the 98th percentile is at most the maximum. When
    # fewer pixels than a surround needs lie at or under that bound, the frame has no surround whatever the
    # percentile is: the same answer, without sorting for the percentile (~0.4 ms a model-size frame).
    if g.size - int(np.count_nonzero(g <= max(16.0, 0.25 * float(g.max())))) > (1 - DISC_MIN_DARK) * g.size:
        return Field(w / 2, h / 2, min(h, w) / 2, False)
    lit = g > max(16.0, 0.25 * float(np.percentile(g, 98)))
    n = int(lit.sum())
    if n > (1 - DISC_MIN_DARK) * lit.size or n < 0.05 * lit.size:  # no surround, or hardly lit: whole frame
        return Field(w / 2, h / 2, min(h, w) / 2, False)
    ys, xs = np.nonzero(lit)
    iy, ix = int(round(ys.mean())), int(round(xs.mean()))
    r = max(float(np.sqrt(n / np.pi)), lit[iy].sum() / 2, lit[:, ix].sum() / 2) * step
    return Field((ix + 0.5) * step, (iy + 0.5) * step, r, True)


def field_side(field: Field, frame_shape: tuple[int, ...], size_px: float | None) -> float:
    """Side of the square taken from the frame.

    ``size_px`` is the calibrated side (in frame pixels) that covers the model's training field of view;
    uncalibrated, it is the disc's bounding square, or the frame's shorter side.
    """
    if size_px:
        return float(size_px)
    return 2 * field.radius if field.disc else float(min(frame_shape[:2]))


def estimate_background(rgb: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Background colour: the per-channel median of the brightest pixels (``BACKGROUND_QUANTILE``)."""
    px = rgb.reshape(-1, 3) if valid is None or valid.all() else rgb[valid]  # same pixels, same order
    if len(px) == 0:
        return np.full(3, BACKGROUND_TARGET)
    g = px.astype(np.float32) @ LUMA
    cut = np.partition(g, int(BACKGROUND_QUANTILE * (len(g) - 1)))[int(BACKGROUND_QUANTILE * (len(g) - 1))]
    bright = px[g >= cut]
    return np.array([_median_u8(bright[:, c]) for c in range(3)], np.float64)


def _median_u8(v: np.ndarray) -> float:
    """``np.median`` of uint8 values from their histogram: the mean of the two middle order statistics (the
    middle one when the count is odd), the same float, without sorting."""
    ranks = np.bincount(v, minlength=256).cumsum()
    lo, hi = np.searchsorted(ranks, [(len(v) - 1) // 2, len(v) // 2], side="right")
    return (int(lo) + int(hi)) / 2


def normalise_colour(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Scale each channel so the background becomes ``BACKGROUND_TARGET`` grey (uint8 in, uint8 out).

    Per pixel value: ``uint8(clip(float32(v) * gain + 0.5, 0, 255))``, worked out once for the 256 values of each
    channel and applied as a lookup table (the same float32 operations on the same values: the same bytes).
    """
    gain = np.clip(BACKGROUND_TARGET / np.maximum(background, 1.0), *GAIN_RANGE).astype(np.float32)
    lut = np.clip(np.arange(256, dtype=np.float32)[:, None] * gain + 0.5, 0, 255).astype(np.uint8)  # (256, 3)
    if rgb.ndim == 3:
        return np.array(Image.fromarray(np.ascontiguousarray(rgb), "RGB").point(lut.T.ravel().tolist()))
    return lut[rgb, np.arange(3)]


def _square(frame: np.ndarray, x0: float, y0: float, side: float, size: int, k: float) -> np.ndarray:
    """The square (x0, y0, side) of ``frame`` resized to ``size``: PIL bilinear, box-filtered first when shrinking
    4x or more (below 4x, no prefilter).

    At scale 1 with a whole-pixel offset inside the frame, PIL's bilinear samples every source pixel exactly at
    its centre (weights 0 and 1), so the result is that crop of the frame: taken directly, it is the same bytes
    (``tests/device/test_prepare_identical.py``) without a resample (the replay's 224 px images, the lores stream).
    """
    h, w = frame.shape[:2]
    whole = float(x0).is_integer() and float(y0).is_integer()
    if side == size and whole and 0 <= x0 <= w - size and 0 <= y0 <= h - size:
        return frame[int(y0):int(y0) + size, int(x0):int(x0) + size].copy()
    img = Image.fromarray(np.ascontiguousarray(frame), "RGB")
    f = int(1 / k / 2)
    if f >= 2:
        img = img.reduce(f)
    box = (x0 / f, y0 / f, (x0 + side) / f, (y0 + side) / f) if f >= 2 else (x0, y0, x0 + side, y0 + side)
    return np.asarray(img.transform((size, size), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR)).copy()


def prepare(frame: np.ndarray, size: int, *, side_px: float | None = None) -> Prepared:
    """A camera frame or an image (HxWx3 uint8 RGB) to the network's input: the one code path.

    1. find the lit field (:func:`find_field`); 2. take the square of side :func:`field_side` centred on it
    and resize it to ``size`` (PIL bilinear; box-filtered first when shrinking 4x or more); pixels outside
    the lit disc or outside the frame become the background colour; 3. normalise colour from the background.
    Training, int8 calibration, the head's features and the Pi all call this.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ImageError(f"frame has shape {frame.shape} dtype {frame.dtype}; expected HxWx3 uint8 RGB")
    h, w = frame.shape[:2]
    field = find_field(frame)
    side = field_side(field, frame.shape, side_px)
    x0, y0 = field.cx - side / 2, field.cy - side / 2
    k = size / side  # output pixels per frame pixel
    raw = _square(frame, x0, y0, side, size, k)
    # Output pixel centres that fall inside the frame.
    u = x0 + (np.arange(size) + 0.5) / k
    v = y0 + (np.arange(size) + 0.5) / k
    valid = ((v >= 0) & (v < h))[:, None] & ((u >= 0) & (u < w))[None, :]
    if field.disc:
        yy, xx = np.ogrid[:size, :size]
        cx, cy, r = (field.cx - x0) * k, (field.cy - y0) * k, field.radius * k * 0.98  # 2% rim: lens vignette
        valid &= (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    bg = estimate_background(raw, valid)
    if not valid.all():
        raw[~valid] = np.rint(bg).astype(np.uint8)
    return Prepared(normalise_colour(raw, bg), raw, valid, (float(bg[0]), float(bg[1]), float(bg[2])), field, side)


def frame_to_rgb(frame: np.ndarray, size: int, *, side_px: float | None = None) -> np.ndarray:
    """Camera frames (HxWx3 uint8 RGB arrays) to the model's input RGB (see :func:`prepare`)."""
    return prepare(frame, size, side_px=side_px).rgb


def quantize_input(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 RGB (HxWx3) to the model's int8 NHWC tensor.

    q = round(x / scale) + zero_point, clipped to int8. Done in float64/int64 so
    no intermediate overflows, whatever scale the converter chose. With the
    usual scale 1.0 / zero point -128 this is exactly ``x - 128``. A uint8 image
    goes through a table of the formula's 256 values (the same numbers, cheaper).
    """
    if rgb.shape != (spec.size, spec.size, 3):
        raise ImageError(f"input has shape {rgb.shape}; expected ({spec.size}, {spec.size}, 3)")
    if rgb.dtype == np.uint8:
        if spec.scale == 1.0 and spec.zero_point == -128 and spec.dtype == "int8":
            # q = x - 128 (every calibrated model here) is x with its top bit flipped, read as int8: one pass of
            # a bitwise op, ~20x cheaper than the table lookup on the screening thread.
            return np.bitwise_xor(rgb, np.uint8(0x80)).view(np.int8)[None]
        return np.take(_quantize_table(spec.scale, spec.zero_point, spec.dtype), rgb)[None]
    return _quantize(rgb, spec.scale, spec.zero_point, spec.dtype)[None]


def _quantize(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    if scale == 1.0:
        q = x.astype(np.int64) + int(zero_point)
    else:
        q = np.rint(x.astype(np.float64) / scale).astype(np.int64) + int(zero_point)
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
    return np.clip(q, lo, hi).astype(np.int8 if dtype == "int8" else np.uint8)


@functools.lru_cache(maxsize=8)
def _quantize_table(scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """:func:`_quantize` of each of the 256 uint8 values, read-only (shared by every caller)."""
    table = _quantize(np.arange(256, dtype=np.uint8), scale, zero_point, dtype)
    table.flags.writeable = False
    return table
