"""Image decoding and the model's input preparation.

This module is the single definition of what the network sees. ``convert/``
imports it to build training tensors, calibration data and the features the
head is fitted on, so the Pi and the workstation cannot drift apart (the
failure that took an earlier open ALL classifier from 20/20 on a desktop to
11/20 on its board).
"""

from __future__ import annotations

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


def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size`` with PIL's bilinear filter.

    Returns a contiguous ``(size, size, 3)`` uint8 array. The eyepiece image is
    a circle inside a wider frame, so the centre square is the useful field.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    if (w, h) != (side, side):
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def frame_to_rgb(frame: np.ndarray, size: int) -> np.ndarray:
    """Camera frames (HxWx3 uint8 RGB arrays) to the model's square RGB."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ImageError(f"frame has shape {frame.shape} dtype {frame.dtype}; expected HxWx3 uint8 RGB")
    if frame.shape[0] == size and frame.shape[1] == size:
        return np.ascontiguousarray(frame)
    return fit_square(Image.fromarray(frame, "RGB"), size)


def quantize_input(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 RGB (HxWx3) to the model's int8 NHWC tensor.

    q = round(x / scale) + zero_point, clipped to int8. Done in float64/int64 so
    no intermediate overflows, whatever scale the converter chose. With the
    usual scale 1.0 / zero point -128 this is exactly ``x - 128``.
    """
    if rgb.shape != (spec.size, spec.size, 3):
        raise ImageError(f"input has shape {rgb.shape}; expected ({spec.size}, {spec.size}, 3)")
    if spec.scale == 1.0:
        q = rgb.astype(np.int64) + int(spec.zero_point)
    else:
        q = np.rint(rgb.astype(np.float64) / spec.scale).astype(np.int64) + int(spec.zero_point)
    lo, hi = (-128, 127) if spec.dtype == "int8" else (0, 255)
    return np.clip(q, lo, hi).astype(np.int8 if spec.dtype == "int8" else np.uint8)[None]
