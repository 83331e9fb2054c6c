"""Frame sources: replay order and looping, hold/repeat (a still field), failures as CameraError, and the
picamera2 adapter's contract (AE/AWB locked, RGB order, buffers released, camera always closed)."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.config import is_raspberry_pi
from device.errors import CameraError
from device.pi_camera import Picamera2Source, lores_size, yuv420_to_rgb
from device.quality import assess
from device.sources import (
    FileSource,
    Frame,
    FrameSource,
    ReplaySource,
    SourceExhausted,
    SyntheticSource,
    synthetic_field,
)


@pytest.fixture
def replay_dir(tmp_path: Path, sample_paths: list[Path]) -> Path:
    d = tmp_path / "replay"
    d.mkdir()
    for p in sample_paths[:3]:
        shutil.copy(p, d / p.name)
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.jpg").write_bytes(b"")
    return d


def test_replay_loops_over_the_images_sorted(replay_dir: Path) -> None:
    src = ReplaySource(replay_dir)
    assert isinstance(src, FrameSource)
    names = [src.read().name for _ in range(7)]
    expected = sorted(p.name for p in replay_dir.glob("*.jpg") if not p.name.startswith("."))
    assert names == expected * 2 + expected[:1]
    f = src.read()
    assert isinstance(f, Frame) and f.array.dtype == np.uint8 and f.array.shape == (224, 224, 3)
    src.close()


def test_repeat_and_hold_make_a_still_field(replay_dir: Path) -> None:
    src = ReplaySource(replay_dir, repeat=3)
    names = [src.read().name for _ in range(6)]
    assert names[:3] == [names[0]] * 3 and names[3:] == [names[3]] * 3 and names[0] != names[3]
    t = [0.0]
    held = ReplaySource(replay_dir, hold_s=2.0, clock=lambda: t[0])
    first = held.read().name
    t[0] = 1.0
    assert held.read().name == first
    t[0] = 2.5
    assert held.read().name != first


def test_files_without_loop_end_with_source_exhausted(sample_paths: list[Path]) -> None:
    src = FileSource(sample_paths[:2], loop=False)
    assert [src.read().name, src.read().name] == [p.name for p in sample_paths[:2]]
    with pytest.raises(SourceExhausted):
        src.read()


@pytest.mark.parametrize("make", [
    lambda tmp: ReplaySource(tmp / "missing"),
    lambda tmp: ReplaySource(tmp),  # empty folder
    lambda tmp: FileSource([tmp / "nope.jpg"]),
    lambda tmp: FileSource([]),
])
def test_unusable_sources_are_camera_errors_with_a_fix(tmp_path: Path, make) -> None:
    with pytest.raises(CameraError) as err:
        make(tmp_path)
    assert "source" in str(err.value)


def test_a_corrupt_image_is_a_camera_error_and_replay_moves_on(replay_dir: Path) -> None:
    (replay_dir / "0000-corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    src = ReplaySource(replay_dir)
    with pytest.raises(CameraError, match="0000-corrupt.jpg"):
        src.read()
    assert src.read().name != "0000-corrupt.jpg"


def test_a_replayed_plain_jpeg_is_kept_as_its_own_bytes_other_files_are_not(tmp_path: Path,
                                                                            sample_paths: list[Path]) -> None:
    """The store keeps a replayed JPEG's file as it is (no second encoding), only when it is exactly the pixels
    the loop classified: RGB and upright. A PNG, or a JPEG with an EXIF rotation, is encoded from the pixels."""
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(sample_paths[0], d / "a.jpg")
    img = Image.open(sample_paths[1])
    img.save(d / "b.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    img.crop((0, 0, 224, 200)).save(d / "c.jpg", exif=exif)
    src = ReplaySource(d)
    frames = [src.read() for _ in range(3)]
    assert frames[0].jpeg == (d / "a.jpg").read_bytes()
    assert np.array_equal(np.asarray(Image.open(d / "a.jpg")), frames[0].array)
    assert frames[1].jpeg is None and frames[2].jpeg is None
    assert frames[2].array.shape[:2] == (224, 200)  # upright: the rotation was applied to the pixels


def test_synthetic_frames_are_deterministic_and_pass_or_fail_the_gate_as_built() -> None:
    a, b = SyntheticSource(seed=5), SyntheticSource(seed=5)
    fa, fb = a.read(), b.read()
    assert np.array_equal(fa.array, fb.array) and fa.name == "synthetic-5"
    assert not np.array_equal(a.read().array, fa.array)
    assert assess(synthetic_field(1)).ok
    assert assess(synthetic_field(1, (1014, 760))).ok
    assert assess(synthetic_field(1, cells=False)).code == "no_cells"
    with pytest.raises(SourceExhausted):
        src = SyntheticSource(count=1)
        src.read()
        src.read()


# -- picamera2 adapter, against a stand-in for the picamera2 module (no camera off the Pi) --------------------


class _Request:
    def __init__(self, cam: _FakePicamera2):
        self.cam = cam
        self.released = False
        cam.requests.append(self)

    def make_array(self, name: str) -> np.ndarray:
        assert name in self.cam.config
        if self.cam.fail_array:
            raise RuntimeError("dma buffer gone")
        if name == "lores":  # planar YUV420 of the same red-dominant view, padded to a 64-byte stride
            w, h = self.cam.config["lores"]["size"]
            stride = -(-w // 64) * 64
            yuv = np.asarray(Image.new("RGB", (w, h), (200, 0, 10)).convert("YCbCr"))
            buf = np.zeros((h * 3 // 2, stride), np.uint8)
            flat = buf.reshape(-1)
            flat[:h * stride] = np.pad(yuv[..., 0], ((0, 0), (0, stride - w))).reshape(-1)
            n = (h // 2) * (stride // 2)
            for k, plane in enumerate((yuv[::2, ::2, 1], yuv[::2, ::2, 2])):
                flat[h * stride + k * n:h * stride + (k + 1) * n] = np.pad(
                    plane, ((0, 0), (0, stride // 2 - w // 2))).reshape(-1)
            return buf
        w, h = self.cam.config["main"]["size"]
        assert self.cam.config["main"]["format"] == "BGR888"  # R,G,B in memory (libcamera's RGB888 is B,G,R)
        stride = -(-w * 3 // 64) * 64  # rows padded as the ISP pads them; make_array slices the padding off
        arr = np.zeros((h, stride), np.uint8)[:, :w * 3].reshape(h, w, 3)
        arr[..., 0] = 200
        arr[..., 2] = 10
        return arr

    def get_metadata(self) -> dict:
        return {"ExposureTime": 12345, "AnalogueGain": 2.5, "ColourGains": (1.8, 1.4), "Lux": 300.0}

    def release(self) -> None:
        self.released = True


class _FakePicamera2:
    instances: list[_FakePicamera2] = []

    def __init__(self, camera_num: int = 0):
        self.calls: list[str] = []
        self.requests: list[_Request] = []
        self.controls: list[dict] = []
        self.fail_array = False
        self.fail_start = False
        _FakePicamera2.instances.append(self)

    def create_video_configuration(self, main: dict, buffer_count: int = 4, lores: dict | None = None) -> dict:
        config = {"main": dict(main), "buffer_count": buffer_count, "colour_space": "<libcamera.ColorSpace 'sYCC'>"}
        if lores is not None:
            config["lores"] = dict(lores)
        return config

    def configure(self, config: dict) -> None:
        self.config = config

    def start(self) -> None:
        self.calls.append("start")
        if self.fail_start or _FakePicamera2.fail_next_start:
            raise RuntimeError("Camera __init__ sequence did not complete")

    def capture_request(self, wait=None):
        assert wait is False  # asynchronous, so that a stalled camera cannot block without a timeout
        return ("job", _Request(self))

    def wait(self, job, timeout=None) -> _Request:
        assert job[0] == "job" and timeout is not None and timeout > 0
        return job[1]

    def set_controls(self, controls: dict) -> None:
        self.controls.append(dict(controls))

    def stop(self) -> None:
        self.calls.append("stop")
        raise RuntimeError("camera not running")  # stop failing must not prevent close

    def close(self) -> None:
        self.calls.append("close")

    fail_next_start = False


@pytest.fixture
def fake_picamera2(monkeypatch: pytest.MonkeyPatch) -> type[_FakePicamera2]:
    _FakePicamera2.instances = []
    _FakePicamera2.fail_next_start = False
    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=_FakePicamera2))
    return _FakePicamera2


def test_picamera2_locks_exposure_and_white_balance_and_delivers_rgb(fake_picamera2) -> None:
    src = Picamera2Source((640, 480), lock_after_s=0.0, timeout_s=1.0)
    cam = fake_picamera2.instances[0]
    assert cam.config["main"] == {"size": (640, 480), "format": "BGR888"}
    assert cam.controls == [{"AeEnable": False, "AwbEnable": False, "ExposureTime": 12345, "AnalogueGain": 2.5,
                             "ColourGains": (1.8, 1.4)}]
    frame = src.read()
    assert frame.array.shape == (480, 640, 3) and frame.array.flags.c_contiguous
    assert frame.array[0, 0].tolist() == [200, 0, 10]  # R, G, B
    assert all(r.released for r in cam.requests)
    src.close()
    src.close()
    assert cam.calls.count("close") == 1 and "stop" in cam.calls


def test_picamera2_capture_failure_releases_the_buffer_and_is_a_camera_error(fake_picamera2) -> None:
    src = Picamera2Source((320, 240), lock_after_s=0.0)
    cam = fake_picamera2.instances[0]
    cam.fail_array = True
    with pytest.raises(CameraError, match="capture failed"):
        src.read()
    assert cam.requests and all(r.released for r in cam.requests)
    src.close()


def test_picamera2_open_failure_closes_the_camera(fake_picamera2) -> None:
    fake_picamera2.fail_next_start = True
    with pytest.raises(CameraError, match="ribbon cable"):
        Picamera2Source((320, 240), lock_after_s=0.0)
    assert fake_picamera2.instances[0].calls[-1] == "close"


def test_missing_picamera2_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import fails
    with pytest.raises(CameraError, match="python3-picamera2"):
        Picamera2Source((320, 240))


@pytest.mark.hardware
@pytest.mark.skipif(not is_raspberry_pi(), reason="needs a Raspberry Pi with a camera")
def test_real_camera_delivers_locked_rgb_frames() -> None:
    src = Picamera2Source((1014, 760), lock_after_s=2.0)
    try:
        frames = [src.read() for _ in range(3)]
    finally:
        src.close()
    assert all(f.array.shape == (760, 1014, 3) for f in frames)
    assert src.locked["AeEnable"] is False and src.locked["AwbEnable"] is False


def test_picamera2_streams_the_view_at_the_model_size_beside_the_stored_frame(fake_picamera2) -> None:
    src = Picamera2Source((1014, 760), lock_after_s=0.0, timeout_s=1.0, lores=224)
    cam = fake_picamera2.instances[0]
    assert cam.config["lores"] == {"size": (298, 224), "format": "YUV420"}  # same aspect, short side 224
    frame = src.read()
    assert frame.array.shape == (760, 1014, 3)  # the main stream is what gets stored
    assert frame.small is not None and frame.small.shape == (224, 298, 3) and frame.analysis is frame.small
    assert np.abs(frame.small.astype(int) - [200, 0, 10]).max() <= 2  # the same colours as the main stream
    assert all(r.released for r in cam.requests)
    src.close()
    plain = Picamera2Source((640, 480), lock_after_s=0.0)
    assert "lores" not in fake_picamera2.instances[1].config and plain.read().small is None
    plain.close()


def test_lores_size_keeps_the_aspect_ratio_with_the_short_side_at_the_model_size() -> None:
    assert lores_size((1014, 760), 224) == (298, 224)
    assert lores_size((760, 1014), 224) == (224, 298)
    assert lores_size((640, 640), 96) == (96, 96)


@pytest.mark.parametrize("space", ["sYCC", "SMPTE170M", "Rec709"])
def test_yuv420_to_rgb_inverts_the_stream_encodings(space: str) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(20, 236, (8, 12, 3)).repeat(2, 0).repeat(2, 1).astype(np.float64)  # 2x2 blocks: no
    kr, kb = (0.2126, 0.0722) if space == "Rec709" else (0.299, 0.114)         # chroma detail is lost
    y = kr * rgb[..., 0] + (1 - kr - kb) * rgb[..., 1] + kb * rgb[..., 2]
    cb, cr = (rgb[..., 2] - y) / (2 * (1 - kb)), (rgb[..., 0] - y) / (2 * (1 - kr))
    if space == "sYCC":
        planes = (y, cb + 128, cr + 128)
    else:
        planes = (16 + y * 219 / 255, 128 + cb * 224 / 255, 128 + cr * 224 / 255)
    y8, u8, v8 = (np.rint(p).astype(np.uint8) for p in planes)
    buf = np.concatenate([y8.reshape(-1), u8[::2, ::2].reshape(-1), v8[::2, ::2].reshape(-1)])
    out = yuv420_to_rgb(buf.reshape(24, 24), (24, 16), space)  # (h * 3/2, stride) as make_array gives
    assert out.shape == (16, 24, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 2
