"""Frames that are not smears, for the "refer, don't guess" check.

Eight kinds, several instances each, drawn at a camera's frame size: blank slides (white, pink, tinted
glass), a black frame, grey levels, gradients, noise, text, colour blocks and simple drawn everyday
scenes (sky and ground, a room, a face, a chequered tablecloth). None may get a confident label: the
quality gate must ask for a retake or the out-of-distribution score must refer it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from convert.shifts import FRAME

KINDS = ("blank slide", "black frame", "grey level", "gradient", "noise", "text", "colour blocks", "everyday scene")


def _img(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0, 255).astype(np.uint8)


def blank(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = rng.choice([(250, 250, 250), (235, 200, 220), (225, 230, 240), (240, 235, 215), (210, 210, 210)])
    return _img(np.broadcast_to(np.array(base, float), (h, w, 3)) + rng.normal(0, 2, (h, w, 3)))


def black(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return _img(rng.normal(rng.uniform(0, 20), 2, (h, w, 3)))


def grey(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return _img(np.full((h, w, 3), rng.uniform(60, 230)) + rng.normal(0, 1.5, (h, w, 3)))


def gradient(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
    else:
        t = np.hypot(xx - rng.uniform(0.2, 0.8), yy - rng.uniform(0.2, 0.6))
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return _img(c0 + t[..., None] * (c1 - c0))


def noise(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    if rng.random() < 0.5:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def text(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(im)
    words = ["PATIENT", "Haematology", "lot 4471", "CBC", "result", "blood smear", "Giemsa", "12/03", "ward B"]
    for y in range(10, h - 20, int(rng.integers(18, 40))):
        line = " ".join(rng.choice(words, int(rng.integers(2, 6))))
        d.text((int(rng.integers(5, 60)), y), line, fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
               font_size=int(rng.integers(12, 30)))
    return np.asarray(im)


def blocks(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    n = int(rng.integers(2, 6))
    colours = rng.integers(0, 256, (n, n, 3))
    return np.asarray(Image.fromarray(colours.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST))


def scene(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A drawn everyday picture: landscape, room, face or tablecloth."""
    kind = int(rng.integers(0, 4))
    im = Image.new("RGB", (w, h), (135, 180, 235))
    d = ImageDraw.Draw(im)
    if kind == 0:  # sky, sun, hills, a tree
        d.rectangle((0, h * 0.6, w, h), fill=(70, 140, 60))
        d.ellipse((w * 0.7, h * 0.1, w * 0.85, h * 0.3), fill=(250, 220, 80))
        d.polygon([(0, h * 0.6), (w * 0.3, h * 0.35), (w * 0.6, h * 0.6)], fill=(90, 110, 80))
        d.rectangle((w * 0.2, h * 0.45, w * 0.23, h * 0.65), fill=(100, 70, 40))
        d.ellipse((w * 0.14, h * 0.3, w * 0.29, h * 0.5), fill=(40, 110, 40))
    elif kind == 1:  # a room: wall, floor, window, table
        d.rectangle((0, 0, w, h), fill=(220, 210, 190))
        d.rectangle((0, h * 0.7, w, h), fill=(150, 110, 80))
        d.rectangle((w * 0.6, h * 0.15, w * 0.85, h * 0.45), fill=(170, 210, 240), outline=(255, 255, 255), width=8)
        d.rectangle((w * 0.15, h * 0.55, w * 0.45, h * 0.6), fill=(110, 70, 40))
        d.rectangle((w * 0.17, h * 0.6, w * 0.19, h * 0.8), fill=(110, 70, 40))
        d.rectangle((w * 0.41, h * 0.6, w * 0.43, h * 0.8), fill=(110, 70, 40))
    elif kind == 2:  # a face
        d.rectangle((0, 0, w, h), fill=(90, 100, 120))
        d.ellipse((w * 0.3, h * 0.1, w * 0.7, h * 0.9), fill=(230, 190, 160))
        for x in (0.42, 0.58):
            d.ellipse((w * (x - 0.03), h * 0.35, w * (x + 0.03), h * 0.42), fill=(40, 40, 40))
        d.arc((w * 0.4, h * 0.5, w * 0.6, h * 0.7), 20, 160, fill=(150, 60, 60), width=6)
    else:  # a chequered tablecloth
        c = [tuple(int(v) for v in rng.integers(0, 256, 3)), (245, 245, 245)]
        step = int(rng.integers(20, 80))
        for y in range(0, h, step):
            for x in range(0, w, step):
                d.rectangle((x, y, x + step, y + step), fill=c[(x // step + y // step) % 2])
    a = np.asarray(im).astype(float) * rng.uniform(0.8, 1.1) + rng.normal(0, 3, (h, w, 3))
    return _img(a)


GENERATORS = dict(zip(KINDS, (blank, black, grey, gradient, noise, text, blocks, scene)))


def frames(per_kind: int = 12, seed: int = 0, size: tuple[int, int] = FRAME) -> list[tuple[str, np.ndarray]]:
    """``per_kind`` frames of every kind, as (kind, HxWx3 uint8)."""
    rng = np.random.default_rng(seed)
    w, h = size
    return [(kind, gen(rng, w, h)) for kind, gen in GENERATORS.items() for _ in range(per_kind)]
