"""The shift suite: the held-out images as another lab, microscope or camera would show them.

Each family changes a source image (224x224 uint8 RGB, scale bar painted over) the way the world does,
at three strengths; "moderate" is the strength the appliance must take in its stride (issue 10). The
geometric families (magnification, eyepiece) are run twice: uncalibrated, and after ``calibrate`` on the
shifted images themselves, as a technician does once when the box is installed (``python -m device
calibrate``). Pure numpy/PIL, deterministic.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

STRENGTHS = ("mild", "moderate", "strong")
#: The eyepiece camera frame of the shift suite (the Pi HQ camera's 2x2-binned stream is 2028x1520; half that).
FRAME = (1014, 760)


@dataclass(frozen=True)
class Shift:
    family: str
    variant: str  # direction or form within the family
    params: dict[str, float]  # strength -> parameter
    fn: Callable[[np.ndarray, float], np.ndarray]
    geometric: bool = False  # changes the scale: also run with calibration

    @property
    def name(self) -> str:
        return f"{self.family} {self.variant}".strip()


def _od(img: np.ndarray) -> np.ndarray:
    return -np.log((img.astype(np.float64) + 1) / 256)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(256 * np.exp(-od) - 1 + 0.5, 0, 255).astype(np.uint8)


def stain(scale: tuple[float, float, float]) -> Callable[[np.ndarray, float], np.ndarray]:
    """Stain amount per channel in optical-density space (Beer-Lambert): OD_c *= 1 + s * scale_c."""
    def fn(img: np.ndarray, s: float) -> np.ndarray:
        return _from_od(_od(img) * (1 + s * np.asarray(scale)))
    return fn


def gains(direction: tuple[float, float, float]) -> Callable[[np.ndarray, float], np.ndarray]:
    """White balance / lamp colour as RGB gains: channel *= 1 + s * direction_c."""
    def fn(img: np.ndarray, s: float) -> np.ndarray:
        return np.clip(img * (1 + s * np.asarray(direction)) + 0.5, 0, 255).astype(np.uint8)
    return fn


def hue_matrix(radians: float) -> np.ndarray:
    """3x3 rotation of RGB about the grey axis (a hue rotation that keeps grey grey)."""
    c, s, k = math.cos(radians), math.sin(radians), 1 / 3
    r = math.sqrt(k)
    return np.array([[c + k * (1 - c), k * (1 - c) - r * s, k * (1 - c) + r * s],
                     [k * (1 - c) + r * s, c + k * (1 - c), k * (1 - c) - r * s],
                     [k * (1 - c) - r * s, k * (1 - c) + r * s, c + k * (1 - c)]])


def hue(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate colours about the grey axis by ``degrees``."""
    return np.clip(img.astype(np.float64) @ hue_matrix(math.radians(degrees)).T + 0.5, 0, 255).astype(np.uint8)


def saturation(img: np.ndarray, factor: float) -> np.ndarray:
    f = img.astype(np.float64)
    g = f.mean(axis=2, keepdims=True)
    return np.clip(g + factor * (f - g) + 0.5, 0, 255).astype(np.uint8)


def gamma(img: np.ndarray, g: float) -> np.ndarray:
    return np.clip(255 * (img / 255.0) ** g + 0.5, 0, 255).astype(np.uint8)


def defocus(img: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)))


def jpeg(img: np.ndarray, quality: float) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(buf).convert("RGB"))


def magnify(img: np.ndarray, factor: float) -> np.ndarray:
    """The same field at ``factor`` x the magnification: cells ``factor`` x larger, the centre kept.

    Zooming out shows the field at the smaller size only (the source holds no wider field of view).
    """
    s = img.shape[0]
    n = max(16, round(s * factor))
    big = np.asarray(Image.fromarray(img).resize((n, n), Image.Resampling.BILINEAR))
    if n <= s:
        return big
    o = (n - s) // 2
    return np.ascontiguousarray(big[o:o + s, o:o + s])


def eyepiece(img: np.ndarray, diameter: float, frame: tuple[int, int] = FRAME) -> np.ndarray:
    """The field as the lit disc of an eyepiece (the source's inscribed circle, ``diameter`` px) centred in a
    dark camera frame; a disc taller than the frame is cut at the top and bottom."""
    w, h = frame
    d = int(diameter)
    big = np.asarray(Image.fromarray(img).resize((d, d), Image.Resampling.BILINEAR))
    out = np.full((h, w, 3), 8, np.uint8)
    yy, xx = np.ogrid[:d, :d]
    inside = (xx + 0.5 - d / 2) ** 2 + (yy + 0.5 - d / 2) ** 2 <= (d / 2) ** 2
    y0, x0 = (h - d) // 2, (w - d) // 2
    sy0, sx0 = max(0, -y0), max(0, -x0)
    ty0, tx0 = max(0, y0), max(0, x0)
    hh, ww = min(d - sy0, h - ty0), min(d - sx0, w - tx0)
    target = out[ty0:ty0 + hh, tx0:tx0 + ww]
    m = inside[sy0:sy0 + hh, sx0:sx0 + ww]
    target[m] = big[sy0:sy0 + hh, sx0:sx0 + ww][m]
    return out


def noise(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + int(img[0, 0, 0]) * 7919 + int(img[-1, -1, 1]))
    return np.clip(img + rng.normal(0, sigma, img.shape) + 0.5, 0, 255).astype(np.uint8)


def suite() -> list[Shift]:
    """Every family, direction and strength (mild, moderate, strong)."""
    st = dict(zip(STRENGTHS, (0.15, 0.3, 0.5)))
    return [
        Shift("stain (optical density)", "heavier", st, stain((1, 1, 1))),
        Shift("stain (optical density)", "lighter", st, stain((-0.6, -0.6, -0.6))),
        Shift("stain (optical density)", "more eosin", st, stain((-0.5, 0.5, -0.2))),
        Shift("stain (optical density)", "more haematoxylin", st, stain((0.5, -0.3, 0.2))),
        Shift("colour balance (RGB gains)", "red down, blue up", dict(zip(STRENGTHS, (0.075, 0.15, 0.25))),
              gains((-1, 0, 2 / 3))),
        Shift("colour balance (RGB gains)", "red up, blue down", dict(zip(STRENGTHS, (0.075, 0.15, 0.25))),
              gains((2 / 3, 0, -1))),
        Shift("hue", "+", dict(zip(STRENGTHS, (7.5, 15, 25))), hue),
        Shift("hue", "-", dict(zip(STRENGTHS, (-7.5, -15, -25))), hue),
        Shift("saturation", "less", dict(zip(STRENGTHS, (0.85, 0.7, 0.5))), saturation),
        Shift("saturation", "more", dict(zip(STRENGTHS, (1.15, 1.3, 1.6))), saturation),
        Shift("brightness (gamma)", "darker", dict(zip(STRENGTHS, (1.18, 1.43, 1.8))), gamma),
        Shift("brightness (gamma)", "brighter", dict(zip(STRENGTHS, (0.85, 0.7, 0.55))), gamma),
        Shift("defocus", "", dict(zip(STRENGTHS, (0.6, 1.0, 1.6))), defocus),
        Shift("JPEG", "", dict(zip(STRENGTHS, (60, 40, 20))), jpeg),
        Shift("magnification", "x1.1 / x1.25 / x1.4", dict(zip(STRENGTHS, (1.1, 1.25, 1.4))), magnify, True),
        Shift("magnification", "x0.9 / x0.8 / x0.7", dict(zip(STRENGTHS, (0.9, 0.8, 0.7))), magnify, True),
        Shift("eyepiece frame", "disc 600 / 700 / 900 px in 1014x760", dict(zip(STRENGTHS, (600, 700, 900))),
              eyepiece, True),
        Shift("sensor noise", "", dict(zip(STRENGTHS, (4, 8, 16))), noise),
    ]
