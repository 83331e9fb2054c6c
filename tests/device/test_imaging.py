"""The one imaging path (``device.preprocess.prepare``) and the field-scale calibration: an eyepiece frame,
another white balance and another magnification must reach the network looking like the training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from convert.shifts import eyepiece, magnify
from device.calibrate import calibrate, rbc_diameter, write_to_config
from device.config import load
from device.errors import ImageError
from device.preprocess import BACKGROUND_TARGET, find_field, load_image, prepare
from device.quality import BLUR, assess

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "device" / "samples").glob("*.jpg"))


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(load_image(path), dtype=np.uint8)


def test_a_direct_image_is_the_whole_field() -> None:
    a = _rgb(SAMPLES[0])
    f = find_field(a)
    assert not f.disc and f.radius == a.shape[0] / 2
    p = prepare(a, 224)
    assert p.rgb.shape == (224, 224, 3) and p.valid.all()


def test_the_eyepiece_disc_is_found_and_its_surround_never_reaches_the_network() -> None:
    a = _rgb(SAMPLES[3])
    frame = eyepiece(a, 700)
    f = find_field(frame)
    assert f.disc and abs(f.cx - 507) < 4 and abs(f.cy - 380) < 4 and abs(f.radius - 350) < 6
    p, direct = prepare(frame, 224), prepare(a, 224)
    assert 0.7 < p.valid.mean() < 0.8  # the inscribed circle of the square
    assert p.rgb.min(axis=2).mean() > 100  # no dark surround left: filled with the background colour
    diff = np.abs(p.rgb.astype(int) - direct.rgb.astype(int))[p.valid].mean()
    assert diff < 6, f"inside the disc the eyepiece frame differs from the image by {diff:.1f} grey levels"


def test_a_disc_taller_than_the_frame_is_still_measured() -> None:
    f = find_field(eyepiece(_rgb(SAMPLES[5]), 900))
    assert f.disc and abs(f.radius - 450) < 12


def test_colour_balance_is_normalised_from_the_background() -> None:
    a = _rgb(SAMPLES[6]).astype(np.float64)
    tinted = np.clip(a * [0.8, 1.0, 0.9], 0, 255).astype(np.uint8)  # another lamp / white balance
    p, q = prepare(a.astype(np.uint8), 224), prepare(tinted, 224)
    assert np.allclose(q.background, (BACKGROUND_TARGET,) * 3, atol=1) is False  # raw background is tinted
    assert abs(q.rgb.reshape(-1, 3).mean(0) - p.rgb.reshape(-1, 3).mean(0)).max() < 4


def test_a_calibrated_scale_takes_a_square_of_that_side() -> None:
    a = _rgb(SAMPLES[1])
    p = prepare(magnify(a, 1.25), 224, side_px=280)  # cells 1.25x larger: take 280 px, outside filled
    assert p.side == 280 and 0.6 < p.valid.mean() < 0.7


@pytest.mark.parametrize("frame", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32)])
def test_garbage_frames_are_refused(frame: np.ndarray) -> None:
    with pytest.raises(ImageError, match="expected HxWx3 uint8"):
        prepare(frame, 64)


def test_red_cell_diameter_follows_the_magnification() -> None:
    frames = [_rgb(p) for p in SAMPLES]
    base = calibrate(frames).rbc_diameter_px
    for f in (0.8, 1.25):
        got = calibrate([magnify(a, f) for a in frames]).rbc_diameter_px / base
        assert abs(got / f - 1) < 0.12, f"x{f}: measured x{got:.2f}"
    assert 8 < base < 60


def test_blank_fields_cannot_be_calibrated() -> None:
    assert rbc_diameter(np.full((200, 200, 3), 240, np.uint8)) is None
    with pytest.raises(ImageError, match="red cells"):
        calibrate([np.full((200, 200, 3), 240, np.uint8)] * 3)


def test_quality_is_judged_at_the_training_scale() -> None:
    """A sharp field seen at 2x (another objective) is sharp once calibrated; the same field blurred is not."""
    a = _rgb(SAMPLES[2])
    big = np.asarray(Image.fromarray(a).resize((448, 448), Image.Resampling.BICUBIC))
    assert assess(big, side_px=448).ok
    soft = np.asarray(Image.fromarray(big).filter(ImageFilter.GaussianBlur(4)))
    assert assess(soft, side_px=448).code == BLUR


def test_calibration_is_written_into_the_config_keeping_comments(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("# site config\n[camera]\n# the stream\nsize = [1014, 760]\n\n[web]\nport = 0\n")
    write_to_config(cfg, 31.234)
    text = cfg.read_text()
    assert "# site config" in text and "# the stream" in text and "rbc_diameter_px = 31.23" in text
    assert load(cfg).camera.rbc_diameter_px == pytest.approx(31.23)
    write_to_config(cfg, 28.0)
    assert cfg.read_text().count("rbc_diameter_px") == 1 and load(cfg).camera.rbc_diameter_px == 28.0
    bare = tmp_path / "bare.toml"
    write_to_config(bare, 20.0)
    assert load(bare).camera.rbc_diameter_px == 20.0
