"""Frame sources: a directory replay, given files, synthetic frames; the eyepiece camera is
``device.pi_camera`` (the hardware adapter).

All behind one small protocol, so the screening loop, the tests and the
benchmarks run the same code with or without a camera. Every driver failure
becomes a :class:`~device.errors.CameraError` naming the source and the fix;
the loop turns it into a fault and retries with back-off.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

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
    ``jpeg`` is the file ``array`` was decoded from when that file is a plain
    JPEG of exactly these pixels (a replayed image): the store keeps those
    bytes as they are instead of encoding the pixels again.
    """

    array: np.ndarray
    name: str
    t: float = field(default_factory=time.time)
    small: np.ndarray | None = None
    jpeg: bytes | None = None

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


def _decode(path: Path, kind: str) -> tuple[np.ndarray, bytes | None]:
    """The image's pixels, and the file's bytes when they are a plain JPEG of those pixels (see :class:`Frame`)."""
    try:
        data = path.read_bytes()
    except OSError:
        data = b""  # load_image reads the path itself and says what is wrong with it
    try:
        img = load_image(data or path, name=str(path))
    except ImageError as exc:
        raise CameraError(f"{kind} source: {exc}") from exc
    return np.asarray(img, dtype=np.uint8), (data if _plain_jpeg(data) else None)


def _plain_jpeg(data: bytes) -> bool:
    """A JPEG whose decoded pixels are what ``load_image`` gives: RGB, and no EXIF rotation to apply."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only
            return img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1
    except (OSError, SyntaxError, ValueError):
        return False


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
        self._cache: tuple[int, np.ndarray, bytes | None] | None = None

    def read(self) -> Frame:
        idx = self._hold.next()
        if idx >= len(self.paths):
            if not self.loop:
                raise SourceExhausted(f"{self.kind} source: all {len(self.paths)} images read")
            idx = self._hold.restart()
        path = self.paths[idx]
        if self._cache is None or self._cache[0] != idx:
            self._cache = None
            self._cache = (idx, *_decode(path, self.kind))
        return Frame(self._cache[1], path.name, time.time(), jpeg=self._cache[2])

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
    for _ in range(int(60 * (w * h) / (224 * 224) / (s * s))):  # 60 red cells per 224 px field at any size
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
