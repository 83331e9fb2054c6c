"""The frame source as the loop sees it: opened on demand, every call bounded in time, failures retried.

A camera that raises, hangs or sends garbage becomes a "camera" fault and is closed; the next open waits
for :class:`Backoff` (doubling, capped) and the fault clears with the first good frame.

Every call into a source (open, read, close) runs on that source's own *camera* thread (:class:`_Calls`),
so that the caller can give up waiting: a hung driver call cannot be cancelled, only abandoned with its
thread, and the next open starts a fresh one. So the loop makes one thread per open, not one per read.

Threads: :class:`Camera` belongs to one thread at a time: the frames thread, or the screening thread (the
first open; a button capture while the frames thread is idle); ``stop()`` closes it after the loop ends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device.config import CameraConfig
from device.errors import CameraError, ScreenError
from device.loop.alerts import Alerts
from device.loop.board import Board
from device.priority import lower_this_thread
from device.quality import validate_frame
from device.sources import Frame, FrameSource, SourceExhausted

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0


class CameraTimeout(CameraError):
    """A call into the camera did not return within its time limit (``[camera] read_timeout_s`` for a read)."""


@dataclass(frozen=True)
class Backoff:
    """When to try a failed camera again: ``first_s`` after the first failure in a row, twice as long after
    each further one, never longer than ``max_s``."""

    first_s: float
    max_s: float

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...)."""
        return min(self.first_s * 2.0 ** min(max(failures - 1, 0), 64), self.max_s)


class _Call:
    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.done = fn, threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc
        finally:
            self.done.set()


class _Calls:
    """One daemon thread making the calls into one source, in order; abandoned if a call hangs."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self.hung = False
        threading.Thread(target=self._serve, name="camera", daemon=True).start()

    def _serve(self) -> None:
        lower_this_thread()  # like the frames thread it serves: the screening thread goes first
        while (call := self._queue.get()) is not None:
            call.run()

    def call(self, fn: Callable[[], Any], timeout: float, what: str) -> Any:
        """``fn()`` on the camera thread; :class:`CameraTimeout` if it has not returned in ``timeout`` s."""
        c = _Call(fn)
        self._queue.put(c)
        if not c.done.wait(timeout):
            self.hung = True
            self.stop()  # the thread ends if the hung call ever returns
            raise CameraTimeout(f"camera {what} did not return within {timeout:g} s; the camera or its driver hung "
                                "(check the cable); reconnecting")
        if c.error is not None:
            raise c.error
        return c.value

    def stop(self) -> None:
        self._queue.put(None)


class Camera:
    def __init__(self, factory: Callable[[], FrameSource], cfg: CameraConfig, *, board: Board, alerts: Alerts,
                 clock: Callable[[], float] = time.monotonic):
        self.factory, self.cfg, self.board, self.alerts, self.clock = factory, cfg, board, alerts, clock
        self.backoff = Backoff(cfg.retry_min_s, cfg.retry_max_s)
        self.exhausted = False  # a finite source has ended: not a fault, no more reads
        self._source: FrameSource | None = None
        self._calls: _Calls | None = None
        self._failures = 0  # in a row, since the last good frame
        self._retry_at = 0.0

    def due(self, capture_at: float) -> float:
        """When the next read can start: at ``capture_at``, or later while a failed camera waits to reopen."""
        return capture_at if self._source is not None else max(capture_at, self._retry_at)

    def open(self) -> FrameSource | None:
        """Open the source unless its back-off has not passed; None (and a fault) when it fails."""
        if self.clock() < self._retry_at:
            return None
        calls = _Calls()
        try:
            src = calls.call(self.factory, self.cfg.lock_after_s + 2 * self.cfg.read_timeout_s, "open")
        except (CameraError, OSError, RuntimeError, ValueError) as exc:
            calls.stop()
            self._failed(exc)
            return None
        except BaseException:
            calls.stop()
            raise
        self._source, self._calls = src, calls
        return src

    def read(self) -> tuple[Frame, float] | None:
        """The next good frame and its capture time in ms; None when there is none (a fault, or the end)."""
        src = self._source or self.open()
        if src is None or self._calls is None:
            return None
        t0 = time.perf_counter()
        try:
            frame = self._calls.call(src.read, self.cfg.read_timeout_s, "read")
        except SourceExhausted as exc:
            log.info("%s; waiting for uploads and button presses", exc)
            self.exhausted = True
            self.close()
            return None
        except Exception as exc:  # CameraError, CameraTimeout, or whatever a driver raises
            self._failed(exc)
            return None
        capture_ms = (time.perf_counter() - t0) * 1000
        arr = getattr(frame, "array", None)
        problem = validate_frame(arr)
        if not problem and not arr.any():  # a real field, even a dark one, has sensor noise
            problem = ("every pixel is 0 (an empty buffer): check the camera cable, the lamp and that the eyepiece "
                       "is not covered")
        if problem:
            self._failed(CameraError(f"camera sent a garbage frame: {problem}"))
            return None
        self._failures = 0
        self.alerts.clear("camera")
        return frame, capture_ms

    def close(self) -> None:
        """Close the source (on its camera thread, or on a fresh one if that thread hung); safe to call twice."""
        src, self._source = self._source, None
        calls, self._calls = self._calls, None
        if src is None:
            return
        if calls is None or calls.hung:
            calls = _Calls()
        try:
            calls.call(src.close, CLOSE_TIMEOUT_S, "close")
        except Exception as exc:
            log.warning("closing the frame source: %s", exc)
        calls.stop()

    def _failed(self, exc: BaseException) -> None:
        self.board.count("camera_errors")
        self.close()
        self._failures += 1
        delay = self.backoff.delay(self._failures)
        self._retry_at = self.clock() + delay
        msg = str(exc) if isinstance(exc, ScreenError) else f"{type(exc).__name__}: {exc}"
        self.alerts.fault("camera", f"{msg} (retrying in {delay:g} s)")
        log.warning("camera fault: %s; retrying in %g s", msg, delay)
