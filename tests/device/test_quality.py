"""The quality gate. Thresholds were set on the real images: every one must pass (``data`` test), while
blurred, dark, over-exposed, blank-slide and garbage frames fail with the right reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from device.preprocess import load_image
from device.quality import (
    BLUR,
    BRIGHT,
    CLIPPED,
    DARK,
    INVALID,
    NO_CELLS,
    Quality,
    QualityThresholds,
    assess,
)
from device.sources import synthetic_field

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "device" / "samples").glob("*.jpg")) + sorted((ROOT / "tests" / "fixtures" / "smear")
                                                                         .glob("*/*.jpg"))


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(load_image(path), dtype=np.uint8)


def blurred(a: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius)))


def over_exposed(a: np.ndarray) -> np.ndarray:
    return np.clip(a.astype(np.int32) * 2 + 40, 0, 255).astype(np.uint8)


def under_exposed(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32) * 0.4).astype(np.uint8)


def test_committed_real_images_pass() -> None:
    assert len(COMMITTED) >= 12
    failed = [(p.name, q.reason) for p in COMMITTED if not (q := assess(_rgb(p))).ok]
    assert failed == []


@pytest.mark.parametrize("path", COMMITTED[::6], ids=lambda p: p.name)
def test_spoiled_real_images_fail_with_the_right_reason(path: Path) -> None:
    a = _rgb(path)
    assert assess(blurred(a, 4)).code == BLUR
    assert assess(blurred(a, 2)).code == BLUR
    assert assess(under_exposed(a)).code == DARK
    assert assess(over_exposed(a)).code in (BRIGHT, CLIPPED)


@pytest.mark.data
def test_every_real_image_in_the_data_set_passes(real_data: Path) -> None:
    paths = sorted(real_data.glob("*/*.jpg"))
    assert len(paths) > 2000, f"expected the full set in {real_data}"
    worst = {"sharpness": np.inf, "stained": np.inf, "brightness_min": np.inf, "brightness_max": 0.0,
             "clipped": 0.0}
    failed = []
    for p in paths:
        q = assess(np.asarray(Image.open(p).convert("RGB")))
        if not q.ok:
            failed.append((p.name, q.reason))
        worst["sharpness"] = min(worst["sharpness"], q.sharpness)
        worst["stained"] = min(worst["stained"], q.stained)
        worst["brightness_min"] = min(worst["brightness_min"], q.brightness)
        worst["brightness_max"] = max(worst["brightness_max"], q.brightness)
        worst["clipped"] = max(worst["clipped"], q.clipped)
    assert failed == [], f"{len(failed)} real images fail the gate, e.g. {failed[:3]}; worst figures {worst}"
    th = QualityThresholds()
    # a margin, not a knife edge: the thresholds sit well inside the real images' range
    assert worst["sharpness"] > 2 * th.min_sharpness
    assert worst["stained"] > 2 * th.min_stained
    assert worst["brightness_min"] > th.min_brightness + 20 and worst["brightness_max"] < th.max_brightness


@pytest.mark.data
def test_blurred_real_images_fail(real_data: Path) -> None:
    paths = sorted(real_data.glob("*/*.jpg"))[::40]
    codes = [assess(blurred(np.asarray(Image.open(p).convert("RGB")), 4)).code for p in paths]
    assert set(codes) == {BLUR}


@pytest.mark.parametrize("frame, code", [
    (np.zeros((480, 640, 3), np.uint8), DARK),
    (np.full((480, 640, 3), 255, np.uint8), BRIGHT),
    (np.full((480, 640, 3), 200, np.uint8), BLUR),  # nothing in focus on an even field
    (synthetic_field(3, cells=False), NO_CELLS),  # red cells only: blank slide
    (blurred(synthetic_field(3), 4), BLUR),
    (synthetic_field(3), "ok"),
], ids=["black", "white", "uniform", "blank-slide", "blurred", "good"])
def test_synthetic_frames(frame: np.ndarray, code: str) -> None:
    q = assess(frame)
    assert q.code == code and q.ok == (code == "ok")
    assert (q.reason == "") == q.ok


def test_reasons_tell_the_technician_what_to_do() -> None:
    assert "refocus" in assess(blurred(synthetic_field(1), 4)).reason
    assert "lamp" in assess(np.zeros((100, 100, 3), np.uint8)).reason
    assert "white cells" in assess(synthetic_field(1, cells=False)).reason


@pytest.mark.parametrize("frame, words", [
    (np.zeros((224, 224), np.uint8), "shape"),
    (np.zeros((224, 224, 4), np.uint8), "shape"),
    (np.full((224, 224, 3), np.nan, np.float32), "NaN"),
    (np.zeros((224, 224, 3), np.int16), "dtype int16"),
    (np.zeros((8, 8, 3), np.uint8), "too small"),
    (None, "NoneType"),
    ([[1, 2, 3]], "list"),
])
def test_garbage_frames_are_invalid_with_a_reason(frame: object, words: str) -> None:
    q = assess(frame)
    assert not q.ok and q.code == INVALID and words in q.reason


def test_figures_do_not_depend_on_the_camera_resolution() -> None:
    small, large = synthetic_field(7, (224, 224)), synthetic_field(7, (1014, 760))
    assert assess(small).ok and assess(large).ok


def test_thresholds_are_validated_and_quality_round_trips() -> None:
    with pytest.raises(ValueError, match="min_brightness"):
        QualityThresholds(min_brightness=200, max_brightness=100)
    q = assess(synthetic_field(2))
    assert Quality.from_dict(q.to_dict()) == q
    strict = QualityThresholds(min_sharpness=1e6)
    assert assess(synthetic_field(2), strict).code == BLUR
