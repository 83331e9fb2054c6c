"""The frames stage: the next field is captured and gated while the current one is inferred.

:class:`FrameStage` waits until a capture is due (the trigger interval, the camera's back-off), reads a
frame (:class:`~device.loop.camera.Camera`), skips it when the field has not changed since the last one
classified, and runs the interpreter-free half of the field pipeline (:func:`~device.loop.field.stage`).

Threads: :meth:`FrameStage.request` is called by the screening thread and runs the capture on the
*frames* thread (a :class:`~device.loop.worker.Worker`), which answers through ``deliver``; a button
capture runs :meth:`FrameStage.capture` on the screening thread, only while the frames thread is idle.
So one thread at a time reads the camera.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from device.classifier import Classifier
from device.config import Config
from device.loop.alerts import Alerts
from device.loop.board import Board
from device.loop.camera import Camera
from device.loop.field import Staged, stage
from device.loop.worker import Worker

log = logging.getLogger(__name__)

THUMB = 32
SKIPPED = "skipped"  # the frames stage's answer for an unchanged field


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """Grey 32x32 float32 thumbnail for change detection.

    Sampled every ``step`` pixels down to about 4x the thumbnail first (a strided view, no copy of the full
    frame), then box-averaged: a camera-size frame costs ~0.3 ms instead of ~2.4 ms for a filtered resize of
    every pixel, and the mean difference between two thumbnails still tracks a changed field.
    """
    step = max(1, min(frame.shape[:2]) // (4 * THUMB))
    small = np.ascontiguousarray(frame[::step, ::step])
    img = Image.fromarray(small, "RGB").convert("L").resize((THUMB, THUMB), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32)


def frame_changed(prev: np.ndarray | None, cur: np.ndarray, threshold: float) -> bool:
    """Pure: has the field changed enough (mean absolute grey difference) to classify again?"""
    return prev is None or float(np.abs(cur - prev).mean()) >= threshold


class FrameStage:
    def __init__(self, camera: Camera, classifier: Classifier, config: Config, *, board: Board, alerts: Alerts,
                 source_kind: str, stop: threading.Event, clock: Callable[[], float] = time.monotonic):
        self.camera, self.classifier, self.config = camera, classifier, config
        self.board, self.alerts, self.source_kind, self.stop, self.clock = board, alerts, source_kind, stop, clock
        self.force_next = False  # a button press in continuous mode: classify the next frame even if unchanged
        self._next_capture = 0.0
        self._last_thumb: np.ndarray | None = None
        self._worker: Worker | None = None

    def start(self) -> None:
        self._next_capture = self.clock()
        self._worker = Worker("frames")

    def request(self, deliver: Callable[[Any], None]) -> None:
        """Screening thread: capture the next field on the frames thread; ``deliver`` gets a :class:`Staged`,
        :data:`SKIPPED` (unchanged field) or None (nothing read)."""
        assert self._worker is not None
        due = self.camera.due(self._next_capture)
        self._worker.submit(lambda: deliver(self._acquire(due)))

    def _acquire(self, due: float) -> Staged | str | None:
        """Frames thread: wait until the capture is due (interval, camera back-off), then capture and stage."""
        wait = due - self.clock()
        if wait > 0 and self.stop.wait(wait):
            return None
        self._next_capture = self.clock() + self.config.trigger.interval_ms / 1000.0
        force, self.force_next = self.force_next, False
        try:
            return self.capture(force=force)
        except Exception as exc:  # a bug in a stage: a fault on the page, no watchdog ping, try the next frame
            log.exception("the frames stage failed")
            self.alerts.fault("inference", f"internal error preparing a frame ({type(exc).__name__}: {exc}); "
                              "see the journal")
            self.stop.wait(0.5)
            return None

    def capture(self, *, force: bool) -> Staged | str | None:
        """Read a frame; :data:`SKIPPED` when the field has not changed, None when nothing was read."""
        got = self.camera.read()
        if got is None:
            return None
        frame, capture_ms = got
        self.board.count("frames")
        thumb = thumbnail(frame.analysis)
        if not force and not frame_changed(self._last_thumb, thumb, self.config.trigger.change_threshold):
            self.board.count("skipped")
            return SKIPPED
        self._last_thumb = thumb
        return stage(self.classifier, frame, self.config.quality, source=self.source_kind, capture_ms=capture_ms)

    def finish(self, timeout: float) -> None:
        """Wait for a capture in progress (abandoned after ``timeout``), then end the frames thread."""
        if self._worker is None:
            return
        if not self._worker.drain(timeout):
            log.warning("the frames thread did not finish its capture; abandoning it")
        self._worker.close()
