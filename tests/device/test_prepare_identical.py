"""The model's input and every quality figure are bit-identical to the implementation before the issue-13
speed-ups (kept below, verbatim, as the reference): same frame in, same bytes and same floats out.

The fast paths (an integer-offset crop instead of PIL's identity resample, a lookup table for the colour gain,
masks skipped when every pixel is valid, clipping counted per channel) must never change a number the network
or the gate sees; these frames cover each path: the sample images, camera-size frames, the lores stream,
eyepiece discs, calibrated scales (shrinking, enlarging, the 4x box prefilter), odd offsets and tints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert.shifts import eyepiece
from device.preprocess import LUMA, Field, InputSpec, Prepared, find_field, load_image, prepare, quantize_input
from device.quality import QualityThresholds, gate
from device.sources import synthetic_field

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "device" / "samples").glob("*.jpg"))

# -- the reference: device.preprocess / device.quality as they were (commit 86cea80) -------------------------------
BACKGROUND_TARGET, BACKGROUND_QUANTILE, GAIN_RANGE = 240.0, 0.85, (0.5, 3.0)


def ref_estimate_background(rgb: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    px = rgb.reshape(-1, 3) if valid is None else rgb[valid]
    if len(px) == 0:
        return np.full(3, BACKGROUND_TARGET)
    g = px.astype(np.float32) @ LUMA
    cut = np.partition(g, int(BACKGROUND_QUANTILE * (len(g) - 1)))[int(BACKGROUND_QUANTILE * (len(g) - 1))]
    return np.median(px[g >= cut], axis=0).astype(np.float64)


def ref_find_field(frame: np.ndarray) -> Field:
    h, w = frame.shape[:2]
    step = max(1, max(h, w) // 256)
    g = frame[::step, ::step].astype(np.float32) @ LUMA
    lit = g > max(16.0, 0.25 * float(np.percentile(g, 98)))
    n = int(lit.sum())
    if n > (1 - 0.03) * lit.size or n < 0.05 * lit.size:
        return Field(w / 2, h / 2, min(h, w) / 2, False)
    ys, xs = np.nonzero(lit)
    iy, ix = int(round(ys.mean())), int(round(xs.mean()))
    r = max(float(np.sqrt(n / np.pi)), lit[iy].sum() / 2, lit[:, ix].sum() / 2) * step
    return Field((ix + 0.5) * step, (iy + 0.5) * step, r, True)


def ref_normalise_colour(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    gain = np.clip(BACKGROUND_TARGET / np.maximum(background, 1.0), *GAIN_RANGE).astype(np.float32)
    return np.clip(rgb.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)


def ref_field_side(field, frame_shape, size_px):
    if size_px:
        return float(size_px)
    return 2 * field.radius if field.disc else float(min(frame_shape[:2]))


def ref_prepare(frame: np.ndarray, size: int, *, side_px: float | None = None) -> Prepared:
    h, w = frame.shape[:2]
    field = ref_find_field(frame)
    side = ref_field_side(field, frame.shape, side_px)
    x0, y0 = field.cx - side / 2, field.cy - side / 2
    k = size / side
    img = Image.fromarray(np.ascontiguousarray(frame), "RGB")
    f = int(1 / k / 2)
    if f >= 2:
        img = img.reduce(f)
    box = (x0 / f, y0 / f, (x0 + side) / f, (y0 + side) / f) if f >= 2 else (x0, y0, x0 + side, y0 + side)
    raw = np.asarray(img.transform((size, size), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR)).copy()
    u = x0 + (np.arange(size) + 0.5) / k
    v = y0 + (np.arange(size) + 0.5) / k
    valid = ((v >= 0) & (v < h))[:, None] & ((u >= 0) & (u < w))[None, :]
    if field.disc:
        yy, xx = np.ogrid[:size, :size]
        cx, cy, r = (field.cx - x0) * k, (field.cy - y0) * k, field.radius * k * 0.98
        valid &= (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    bg = ref_estimate_background(raw, valid)
    if not valid.all():
        raw[~valid] = np.rint(bg).astype(np.uint8)
    return Prepared(ref_normalise_colour(raw, bg), raw, valid, (float(bg[0]), float(bg[1]), float(bg[2])), field,
                    side)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ LUMA


def sharpness(g: np.ndarray, valid: np.ndarray | None = None) -> float:
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    if valid is not None:
        inner = valid[1:-1, 1:-1] & valid[1:-1, :-2] & valid[1:-1, 2:] & valid[:-2, 1:-1] & valid[2:, 1:-1]
        lap = lap[inner]
    return float(lap.astype(np.float64).var()) if lap.size else 0.0


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    h, w = mask.shape
    padded = np.pad(mask, radius, constant_values=False)
    out = mask.copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


def stained_fraction(rgb: np.ndarray, valid: np.ndarray | None = None) -> float:
    c = rgb.astype(np.int16)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    blobs = erode(((b - g) >= 35) & ((r - g) >= -15), 2)
    return float(blobs[valid].mean() if valid is not None and valid.any() else blobs.mean())


def ref_figures(prep: Prepared) -> tuple[float, float, float, float]:
    v = prep.valid if not prep.valid.all() else None
    raw = prep.raw[prep.valid] if v is not None else prep.raw.reshape(-1, 3)
    clipped = float(((raw >= 250).all(axis=-1) | (raw <= 5).all(axis=-1)).mean()) if len(raw) else 1.0
    bright = float(luma(raw).mean()) if len(raw) else 0.0
    return sharpness(luma(prep.rgb), v), bright, clipped, stained_fraction(prep.rgb, v)


def ref_quantize(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    if spec.scale == 1.0:
        q = rgb.astype(np.int64) + int(spec.zero_point)
    else:
        q = np.rint(rgb.astype(np.float64) / spec.scale).astype(np.int64) + int(spec.zero_point)
    lo, hi = (-128, 127) if spec.dtype == "int8" else (0, 255)
    return np.clip(q, lo, hi).astype(np.int8 if spec.dtype == "int8" else np.uint8)[None]


# -- the frames ---------------------------------------------------------------------------------------------------


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(load_image(path), dtype=np.uint8)


def _frames() -> list[tuple[str, np.ndarray, float | None]]:
    out: list[tuple[str, np.ndarray, float | None]] = []
    samples = [_rgb(p) for p in SAMPLES]
    for p, a in zip(SAMPLES, samples):
        out.append((p.name, a, None))
    for i, a in enumerate(samples[::3]):
        cam = np.asarray(Image.fromarray(a).resize((1014, 760), Image.Resampling.BICUBIC), dtype=np.uint8)
        out.append((f"camera-{i}", cam, None))
        out.append((f"camera-{i}-calibrated", cam, 700.0 + 37.3 * i))
        lores = np.asarray(Image.fromarray(cam).resize((298, 224), Image.Resampling.BILINEAR), dtype=np.uint8)
        out.append((f"lores-{i}", lores, None))
        out.append((f"lores-{i}-calibrated", lores, 206.4 + 3.1 * i))
        out.append((f"eyepiece-{i}", eyepiece(a, 640 + 40 * i), None))
        out.append((f"eyepiece-{i}-cut", eyepiece(a, 900), None))
    out.append(("sample-shrunk-4x", samples[1], 224.0 * 4.6))  # the box prefilter (reduce) path, partly outside
    out.append(("sample-enlarged", samples[2], 150.0))
    out.append(("sample-offset", samples[4], 223.0))
    out.append(("sample-tinted", np.clip(samples[6] * np.array([0.8, 1.0, 0.9]), 0, 255).astype(np.uint8), None))
    out.append(("sample-dark", (samples[7] // 3).astype(np.uint8), None))
    out.append(("odd-size", np.ascontiguousarray(samples[8][:, :221]), None))
    for seed, size in ((1, (1014, 760)), (2, (224, 224)), (3, (298, 224)), (4, (301, 227))):
        out.append((f"synthetic-{seed}", synthetic_field(seed, size), None))
        out.append((f"synthetic-{seed}-blank", synthetic_field(seed, size, cells=False), None))
    rng = np.random.default_rng(13)
    out.append(("noise", rng.integers(0, 256, (240, 250, 3), dtype=np.uint8), None))
    out.append(("clipped", np.full((224, 224, 3), 255, np.uint8), None))
    return out


FRAMES = _frames()
SPECS = (InputSpec(), InputSpec(scale=1.0, zero_point=0, dtype="uint8"), InputSpec(scale=0.987, zero_point=-127))


@pytest.mark.parametrize("name,frame,side_px", FRAMES, ids=[f[0] for f in FRAMES])
@pytest.mark.parametrize("size", [224, 64])
def test_prepare_quantize_and_quality_are_bit_identical(name: str, frame: np.ndarray, side_px: float | None,
                                                        size: int) -> None:
    if side_px is not None:
        side_px = side_px * size / 224  # a calibration means the same field of view at the other size
    new, old = prepare(frame, size, side_px=side_px), ref_prepare(frame, size, side_px=side_px)
    for attr in ("rgb", "raw", "valid"):
        a, b = getattr(new, attr), getattr(old, attr)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f"{name}: {attr} differs"
    assert new.background == old.background and new.field == old.field and new.side == old.side
    for spec in SPECS:
        s = InputSpec(size, spec.scale, spec.zero_point, spec.dtype)
        qa, qb = quantize_input(new.rgb, s), ref_quantize(old.rgb, s)
        assert qa.dtype == qb.dtype and np.array_equal(qa, qb)
    prep, q = gate(frame, size, QualityThresholds(), side_px=side_px)
    assert prep is not None and np.array_equal(prep.rgb, old.rgb)
    judged = old if size == 224 else ref_prepare(frame, 224, side_px=side_px)
    figs = ref_figures(judged)
    assert (q.sharpness, q.brightness, q.clipped, q.stained) == figs, f"{name}: quality figures differ"


def test_erosion_by_rows_then_columns_is_the_square_erosion() -> None:
    from device.quality import erode as new_erode

    rng = np.random.default_rng(5)
    for shape, p in (((224, 224), 0.9), ((50, 70), 0.7), ((5, 3), 0.95), ((224, 224), 0.99)):
        m = rng.random(shape) < p
        for radius in (1, 2, 3):
            assert np.array_equal(new_erode(m, radius), erode(m, radius))


def test_quantize_input_of_other_dtypes_keeps_the_formula() -> None:
    rng = np.random.default_rng(7)
    for dtype in (np.float64, np.int64, np.uint16):
        x = rng.integers(0, 300, (64, 64, 3)).astype(dtype)
        for spec in SPECS:
            s = InputSpec(64, spec.scale, spec.zero_point, spec.dtype)
            assert np.array_equal(quantize_input(x, s), ref_quantize(x, s))


def test_find_field_takes_its_shortcut_only_where_the_percentile_would_agree() -> None:
    rng = np.random.default_rng(11)
    frames = [f for _name, f, _side in FRAMES]
    for dark_share in (0.0, 0.02, 0.029, 0.03, 0.031, 0.05, 0.5, 0.96, 0.999):  # around the surround's 3%
        f = np.full((120, 160, 3), 230, np.uint8)
        dark = rng.random(f.shape[:2]) < dark_share
        f[dark] = rng.integers(0, 60, (int(dark.sum()), 3), dtype=np.uint8)
        frames.append(f)
    frames.append(np.zeros((64, 64, 3), np.uint8))  # black: hardly lit
    frames.append(np.full((64, 64, 3), 10, np.uint8))  # every pixel under the floor of 16
    for f in frames:
        assert find_field(f) == ref_find_field(f)


def test_background_median_from_the_histogram_is_numpys() -> None:
    from device.preprocess import _median_u8

    rng = np.random.default_rng(12)
    for n in (1, 2, 3, 4, 7, 100, 101, 7_531):
        for hi in (2, 256):
            v = rng.integers(0, hi, n, dtype=np.uint8)
            assert _median_u8(v) == np.median(v)
