"""The Raspberry Pi camera on the eyepiece, through picamera2: the hardware adapter behind ``FrameSource``.

picamera2 is imported lazily, inside :class:`Picamera2Source`, and only here: it exists only on the Pi.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from device.errors import CameraError
from device.sources import Frame

log = logging.getLogger(__name__)


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


def main_rgb(arr: np.ndarray) -> np.ndarray:
    """The main stream's buffer as contiguous HxWx3 RGB.

    The stream is libcamera's ``BGR888``, which is R,G,B in memory (its ``RGB888`` is B,G,R): no channel swap,
    which numpy does element by element (~7 ms for a 1014x760 frame on x86, several times that on a Pi's cores).
    ``make_array`` has already copied the buffer; only a row stride wider than the image costs a second copy.
    """
    return np.ascontiguousarray(arr[..., :3])


class Picamera2Source:
    """The Raspberry Pi camera on the eyepiece, through picamera2 (imported here, lazily).

    A fixed-size ``BGR888`` stream (libcamera's BGR888 is R,G,B in memory, so
    the buffer is the RGB frame as it is). Auto exposure and white balance run for ``lock_after_s``
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
            streams: dict[str, Any] = {"main": {"size": self.size, "format": "BGR888"}}  # R,G,B bytes
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
            raise CameraError(f"picamera2 source: frame has shape {arr.shape}; expected HxWx3 from BGR888")
        rgb = main_rgb(arr)
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
