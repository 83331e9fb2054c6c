"""Frame sources: the eyepiece camera, a directory replay, given files, synthetic frames.

All behind one small protocol, so the screening loop, the tests and the
benchmarks run the same code with or without a camera. Every driver failure
becomes a :class:`~device.errors.CameraError` naming the source and the fix;
the loop turns it into a fault and retries with back-off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from device.errors import CameraError, ImageError
from device.preprocess import load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True, eq=False)
class Frame:
    """One captured frame: HxWx3 uint8 RGB, a name for the record, and the capture time (epoch s).

    ``small`` is the same view at about the model's size when the camera
    delivers one for free (picamera2's low-resolution stream, scaled by the
    ISP): the loop then gates and classifies it, and stores ``array``.
    """

    array: np.ndarray
    name: str
    t: float = field(default_factory=time.time)
    small: np.ndarray | None = None

    @property
    def analysis(self) -> np.ndarray:
        """What the quality gate and the classifier look at: ``small`` if there is one, else ``array``."""
        return self.small if self.small is not None else self.array


class SourceExhausted(Exception):
    """A finite source (files, loop=False) has no more frames; not a fault."""


@runtime_checkable
class FrameSource(Protocol):
    def read(self) -> Frame:
        """The next frame. Raises CameraError on a driver failure, SourceExhausted at the end."""
        ...

    def close(self) -> None:
        """Release the device; safe to call twice."""
        ...


class _Hold:
    """Which image a finite source shows: each one for ``repeat`` reads and at least ``hold_s`` seconds.

    Holding an image looks like a still microscope field, which the loop's
    change detection must skip; advancing looks like the technician moving on.
    """

    def __init__(self, repeat: int, hold_s: float, clock: Callable[[], float]):
        self.repeat, self.hold_s, self.clock = max(1, int(repeat)), float(hold_s), clock
        self.index, self.reads, self.since = -1, 0, 0.0

    def next(self) -> int:
        now = self.clock()
        if self.index < 0 or (self.reads >= self.repeat and now - self.since >= self.hold_s):
            self.index, self.reads, self.since = self.index + 1, 0, now
        self.reads += 1
        return self.index

    def restart(self) -> int:
        self.index, self.reads, self.since = 0, 1, self.clock()
        return 0


def list_images(directory: Path) -> list[Path]:
    """Image files in ``directory`` (not recursive), sorted by name, hidden files skipped."""
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _decode(path: Path, kind: str) -> np.ndarray:
    try:
        return np.asarray(load_image(path), dtype=np.uint8)
    except ImageError as exc:
        raise CameraError(f"{kind} source: {exc}") from exc


class FileSource:
    """The given image files, in the given order; loops by default.

    ``repeat`` returns each image that many times in a row, which looks like a
    still field to the loop's change detection.
    """

    kind = "files"

    def __init__(self, paths: Sequence[str | Path], *, loop: bool = True, repeat: int = 1, hold_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise CameraError(f"{self.kind} source: no images given; list some in [camera] files")
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise CameraError(f"{self.kind} source: {', '.join(missing[:3])} not found; check the paths")
        self.loop = loop
        self._hold = _Hold(repeat, hold_s, clock)
        self._cache: tuple[int, np.ndarray] | None = None

    def read(self) -> Frame:
        idx = self._hold.next()
        if idx >= len(self.paths):
            if not self.loop:
                raise SourceExhausted(f"{self.kind} source: all {len(self.paths)} images read")
            idx = self._hold.restart()
        path = self.paths[idx]
        if self._cache is None or self._cache[0] != idx:
            self._cache = None
            self._cache = (idx, _decode(path, self.kind))
        return Frame(self._cache[1], path.name, time.time())

    def close(self) -> None:
        self._cache = None


class ReplaySource(FileSource):
    """Loops over the images of a directory, sorted by name (the default source off the Pi)."""

    kind = "replay"

    def __init__(self, directory: str | Path, *, loop: bool = True, repeat: int = 1, hold_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CameraError(f"replay source: {self.directory} is not a directory; set [camera] replay_dir "
                              "to a folder of smear images")
        paths = list_images(self.directory)
        if not paths:
            raise CameraError(f"replay source: no images (.jpg, .png...) in {self.directory}; "
                              "set [camera] replay_dir to a folder of smear images")
        super().__init__(paths, loop=loop, repeat=repeat, hold_s=hold_s, clock=clock)


def synthetic_field(seed: int, size: tuple[int, int] = (224, 224), *, cells: bool = True) -> np.ndarray:
    """A deterministic smear-like frame: pale background, red-cell rings, and (if ``cells``) violet nuclei.

    Not a medical image: a stand-in with the right colours and texture for
    the quality gate, the loop, tests and benchmarks (``cells=False`` is a
    blank-slide field that must fail the gate).
    """
    w, h = size
    rng = np.random.default_rng(seed)
    s = min(w, h) / 224.0
    img = Image.new("RGB", (w, h), (228, 222, 236))
    draw = ImageDraw.Draw(img)
    for _ in range(int(60 * (w * h) / (224 * 224))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(9, 13) * s
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(205, 190, 215), outline=(170, 150, 190),
                     width=max(1, int(3 * s)))
    if cells:
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
            r = rng.uniform(12, 18) * s
            draw.ellipse((x - r * 1.3, y - r * 1.3, x + r * 1.3, y + r * 1.3), fill=(190, 175, 220))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(110, 60, 170))
    img = img.filter(ImageFilter.GaussianBlur(0.7 * s))
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-4, 5, size=(h, w, 1), dtype=np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


class SyntheticSource:
    """Deterministic generated frames (see :func:`synthetic_field`); frame i uses seed + i."""

    kind = "synthetic"

    def __init__(self, size: tuple[int, int] = (224, 224), *, seed: int = 0, cells: bool = True, repeat: int = 1,
                 hold_s: float = 0.0, count: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.size, self.seed, self.cells, self.count = size, seed, cells, count
        self._hold = _Hold(repeat, hold_s, clock)

    def read(self) -> Frame:
        idx = self._hold.next()
        if self.count is not None and idx >= self.count:
            raise SourceExhausted(f"synthetic source: all {self.count} frames read")
        return Frame(synthetic_field(self.seed + idx, self.size, cells=self.cells), f"synthetic-{self.seed + idx}",
                     time.time())

    def close(self) -> None:
        pass


def lores_size(main: tuple[int, int], short_side: int) -> tuple[int, int]:
    """The low-resolution stream's (w, h): the main stream's aspect ratio (the ISP scales, it does not crop),
    the short side at the model's input size, both even (YUV420 halves them)."""
    w, h = main
    long_side = 2 * round(short_side * max(w, h) / min(w, h) / 2)
    short = 2 * round(short_side / 2)
    return (long_side, short) if w >= h else (short, long_side)


# Y'CbCr -> R'G'B' for the colour spaces libcamera gives a YUV stream: (Kr, Kb, full range?)
_YUV_SPACES = {"sycc": (0.299, 0.114, True), "jpeg": (0.299, 0.114, True),
               "smpte170m": (0.299, 0.114, False), "rec709": (0.2126, 0.0722, False)}


def yuv420_to_rgb(buf: np.ndarray, size: tuple[int, int], colour_space: str = "sYCC") -> np.ndarray:
    """Planar YUV420 as picamera2's ``make_array`` returns it ((h*3/2, stride) bytes) to HxWx3 uint8 RGB.

    Chroma is repeated 2x2 (the model's own resize smooths more than that).
    ``colour_space`` is libcamera's name for the stream's space; picamera2
    gives sYCC (full-range BT.601, as JPEG) when the main stream is RGB.
    """
    w, h = size
    key = colour_space.lower().replace("-", "").replace(" ", "")
    kr, kb, full = next((v for k, v in _YUV_SPACES.items() if k in key), _YUV_SPACES["sycc"])
    flat = np.ascontiguousarray(buf).reshape(-1)
    stride = buf.shape[1] if buf.ndim == 2 else w
    cs, ch = stride // 2, h // 2
    y = flat[:h * stride].reshape(h, stride)[:, :w].astype(np.float32)
    u = flat[h * stride:h * stride + ch * cs].reshape(ch, cs)[:, :w // 2].astype(np.float32) - 128.0
    v = flat[h * stride + ch * cs:h * stride + 2 * ch * cs].reshape(ch, cs)[:, :w // 2].astype(np.float32) - 128.0
    if not full:  # studio range: Y' 16..235, Cb/Cr 16..240
        y, u, v = (y - 16.0) * (255.0 / 219.0), u * (255.0 / 224.0), v * (255.0 / 224.0)
    u = u.repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
    v = v.repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
    kg = 1.0 - kr - kb
    r = y + 2.0 * (1.0 - kr) * v
    b = y + 2.0 * (1.0 - kb) * u
    g = (y - kr * r - kb * b) / kg
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


class Picamera2Source:
    """The Raspberry Pi camera on the eyepiece, through picamera2 (imported here, lazily).

    A fixed-size ``RGB888`` stream (libcamera's RGB888 is B,G,R in memory; we
    flip it to RGB). Auto exposure and white balance run for ``lock_after_s``
    and are then locked to the values they settled on, so the colours the
    features depend on do not drift from field to field. Every request is
    released in a ``finally``, and ``close`` always stops and closes the
    camera, so a fault cannot leak buffers or keep the device busy.

    With ``lores`` (the model's input size) a second, low-resolution YUV420
    stream of the same view, scaled by the ISP at no CPU cost, comes with
    every frame as ``Frame.small``: the loop gates and classifies that and
    stores the main stream. (A Pi 4's ISP gives a low-resolution stream only
    in YUV420; converting about 300x224 of it takes a few milliseconds, on the frames thread.)
    """

    kind = "picamera2"

    def __init__(self, size: tuple[int, int] = (1014, 760), *, lock_after_s: float = 2.0, timeout_s: float = 5.0,
                 camera_num: int = 0, buffer_count: int = 4, lores: int | None = None):
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError as exc:
            raise CameraError("picamera2 is not installed: on Raspberry Pi OS run `sudo apt install "
                              "python3-picamera2` and make the venv with --system-site-packages; "
                              "off the Pi set [camera] source = \"replay\"") from exc
        self.size, self.timeout_s = (int(size[0]), int(size[1])), float(timeout_s)
        self.locked: dict[str, Any] = {}
        self._seq = 0
        self._cam: Any = None
        self.lores: tuple[int, int] | None = None
        self._colour_space = "sYCC"
        try:
            self._cam = Picamera2(camera_num)
            streams: dict[str, Any] = {"main": {"size": self.size, "format": "RGB888"}}
            if lores:
                streams["lores"] = {"size": lores_size(self.size, lores), "format": "YUV420"}
            config = self._cam.create_video_configuration(**streams, buffer_count=buffer_count)
            self._cam.configure(config)
            if lores:
                final = getattr(self._cam, "camera_config", None) or config  # sizes as libcamera validated them
                self.lores = tuple(int(v) for v in final["lores"]["size"])
                self._colour_space = str(final.get("colour_space") or "sYCC")
            self._cam.start()
            self._settle_and_lock(lock_after_s)
        except CameraError:
            self.close()
            raise
        except Exception as exc:  # libcamera raises RuntimeError, OSError, IndexError (no camera)...
            self.close()
            raise CameraError(f"picamera2 source: cannot open camera {camera_num} ({type(exc).__name__}: {exc}); "
                              "check the ribbon cable, `rpicam-hello --list-cameras`, and that no other "
                              "program holds the camera") from exc

    def _settle_and_lock(self, lock_after_s: float) -> None:
        deadline = time.monotonic() + lock_after_s
        metadata: dict = {}
        while True:  # keep frames flowing while AE/AWB converge
            metadata = self._capture()[1]
            if time.monotonic() >= deadline:
                break
        missing = [k for k in ("ExposureTime", "AnalogueGain", "ColourGains") if k not in metadata]
        if missing:
            raise CameraError(f"picamera2 source: the camera reports no {', '.join(missing)}; "
                              "cannot lock exposure and white balance on this sensor")
        self.locked = {"AeEnable": False, "AwbEnable": False, "ExposureTime": int(metadata["ExposureTime"]),
                       "AnalogueGain": float(metadata["AnalogueGain"]),
                       "ColourGains": tuple(float(g) for g in metadata["ColourGains"])}
        self._cam.set_controls(self.locked)
        for _ in range(3):  # controls take effect a few frames later
            self._capture()
        log.info("camera locked: exposure %d us, gain %.2f, colour gains %s", self.locked["ExposureTime"],
                 self.locked["AnalogueGain"], self.locked["ColourGains"])

    def _capture(self) -> tuple[np.ndarray, dict, np.ndarray | None]:
        # Asynchronous request + bounded wait: a camera that stops delivering raises instead of blocking
        # forever (the loop also bounds every read). A request that never completed dies with the camera,
        # which the loop closes and reopens after any failure.
        job = self._cam.capture_request(wait=False)
        try:
            request = self._cam.wait(job, timeout=self.timeout_s)
        except TypeError:  # picamera2 before 0.3.13: wait() has no timeout
            request = self._cam.wait(job)
        try:
            arr = request.make_array("main")
            small = request.make_array("lores") if self.lores is not None else None
            metadata = request.get_metadata()
        finally:
            request.release()
        return arr, metadata, small

    def read(self) -> Frame:
        if self._cam is None:
            raise CameraError("picamera2 source: camera is closed; the loop reopens it")
        try:
            arr, _, small = self._capture()
        except Exception as exc:
            raise CameraError(f"picamera2 source: capture failed ({type(exc).__name__}: {exc}); "
                              "check the cable and the camera's power") from exc
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise CameraError(f"picamera2 source: frame has shape {arr.shape}; expected HxWx3 from RGB888")
        rgb = np.ascontiguousarray(arr[..., 2::-1])  # B,G,R(,X) in memory -> R,G,B
        self._seq += 1
        if small is not None and self.lores is not None:
            small = yuv420_to_rgb(small, self.lores, self._colour_space)
        return Frame(rgb, f"camera-{self._seq:06d}", time.time(), small=small)

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is None:
            return
        try:
            cam.stop()
        except Exception as exc:  # already stopped or driver gone: closing must still happen
            log.debug("camera stop: %s", exc)
        try:
            cam.close()
        except Exception as exc:
            log.warning("camera close failed: %s", exc)
