"""The screening thread: the loop's jobs, one at a time, and the only thread that touches the interpreter.

Its jobs: the next camera field, delivered by the frames stage (continuous mode: it asks for the one after
before inferring this one, so capture and gate overlap the invoke); a button capture; an upload from the
page; stop. The callers (button, page, ``stop()``) only put jobs on the queue and wait on them.

The systemd watchdog is pinged from this loop, only after a pass that did its job (a frame classified or
skipped as unchanged, a queued job done, or an idle wait in button mode), so a wedged loop or a camera that
stays dead gets the process restarted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device.config import Config
from device.errors import ScreenError
from device.loop.alerts import Alerts
from device.loop.board import Board
from device.loop.camera import Camera
from device.loop.field import UPLOAD, FieldPipeline, Staged, stage
from device.loop.frames import SKIPPED, FrameStage
from device.notify import Notifier
from device.priority import pin_interpreter_thread
from device.sources import Frame
from device.store.records import FieldResult

log = logging.getLogger(__name__)


@dataclass
class Job:
    kind: str  # "upload" | "capture" | "frame" (the frames stage's next frame) | "stop"
    frame: np.ndarray | None = None
    name: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    result: FieldResult | None = None
    error: BaseException | None = None
    staged: Any = None  # "frame": a Staged, SKIPPED (unchanged field) or None (nothing read)


class Screening:
    """``camera`` and ``frames`` are None when the service has no frame source (uploads only)."""

    def __init__(self, config: Config, *, camera: Camera | None, frames: FrameStage | None,
                 pipeline: FieldPipeline, board: Board, alerts: Alerts, notifier: Notifier, stop: threading.Event):
        self.config, self.camera, self.frames, self.pipeline = config, camera, frames, pipeline
        self.board, self.alerts, self.notifier, self.stopping = board, alerts, notifier, stop
        self.thread: threading.Thread | None = None
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._in_flight = False  # the frames thread is capturing the next frame

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        self.pipeline.start()
        self.thread = threading.Thread(target=self._run, name="screening", daemon=True)
        self.thread.start()

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        self._jobs.put(Job("stop"))
        if self.thread is not None:
            self.thread.join(timeout)

    # -- what callers queue ----------------------------------------------------------------------------------

    def capture(self) -> None:
        """The button: classify the current field now."""
        self._jobs.put(Job("capture"))

    def upload(self, frame: np.ndarray, name: str) -> FieldResult:
        """Classify and record an uploaded image; never touches the camera. Waits for the result."""
        job = Job("upload", frame=frame, name=name)
        if not self.running:
            raise ScreenError("the screening loop is not running; restart the service")
        self._jobs.put(job)
        limit = 60.0 + self.config.camera.read_timeout_s
        if not job.done.wait(limit):
            raise ScreenError(f"the classifier did not answer within {limit:g} s; the appliance is overloaded "
                              "or stuck, see the status page")
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    # -- the thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        pin_interpreter_thread()  # the thread that invokes the model stays on the interpreter's cores
        if self.camera is not None and self.frames is not None:
            self.camera.open()  # at once, also in button mode: the camera's exposure settles before a press
            self.frames.start()
            if self.config.trigger.mode == "continuous":
                self._request_frame()
        while not self.stopping.is_set():
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                job = None
            if self.stopping.is_set():
                if job is not None:
                    self._jobs.put(job)  # _finish classifies a frame already read and fails the rest
                break
            try:
                # no job for a second: idle in button mode or after the source ended (alive), or waiting for a
                # capture that is late (no ping)
                ok = self._run_job(job) if job is not None else not self._in_flight
            except Exception as exc:  # a bug must not end the loop; no watchdog ping for this pass
                log.exception("screening loop pass failed")
                try:
                    self.alerts.fault("inference", f"internal error in the screening loop ({type(exc).__name__}: "
                                      f"{exc}); see the journal")
                except Exception:
                    log.exception("cannot report the fault")
                ok = False
                self.stopping.wait(0.5)  # no hot spin if the error repeats
            if ok and not self.stopping.is_set():
                self._ping()
        self._finish()
        log.info("screening loop stopped")

    def _finish(self) -> None:
        """Every frame read is classified (or skipped) and every result recorded and shown before the loop ends.

        A capture still in progress is abandoned after its read time-out; queued uploads and presses fail.
        """
        if self.frames is not None:
            self.frames.finish(self.config.camera.read_timeout_s + 2.0)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job.kind == "frame" and isinstance(job.staged, Staged):
                try:
                    self.pipeline.run(job.staged)
                except Exception:
                    log.exception("the last frame could not be classified")
                continue
            job.error = ScreenError("the appliance is stopping; try again when it is back")
            job.done.set()
        self.pipeline.finish(30.0)

    def _ping(self) -> None:
        if self.notifier.watchdog():
            self.board.count("watchdog")

    def _request_frame(self) -> None:
        """Ask the frames thread for the next field; it answers with a "frame" job."""
        assert self.frames is not None
        self._in_flight = True
        self.frames.request(lambda staged: self._jobs.put(Job("frame", staged=staged)))

    def _run_job(self, job: Job) -> bool:
        """Run one job; True when it did its job (the watchdog may be pinged)."""
        if job.kind == "stop":
            return False
        if job.kind == "frame":
            self._in_flight = False
            exhausted = self.camera is not None and self.camera.exhausted
            if not exhausted and not self.stopping.is_set():
                self._request_frame()  # the next frame is captured and prepared while this one is inferred
            if job.staged is None:
                return exhausted  # nothing read: a fault (no ping) unless the source simply ended
            if job.staged is not SKIPPED:
                self.pipeline.run(job.staged)
            return True
        if job.kind == "capture":
            return self._capture()
        if job.kind == "upload":
            try:
                assert job.frame is not None
                staged = stage(self.pipeline.classifier, Frame(job.frame, job.name, time.time()),
                               self.config.quality, source=UPLOAD, capture_ms=0.0)
                job.result = self.pipeline.run(staged, wait=True)
            except BaseException as exc:
                job.error = exc
            finally:
                job.done.set()
            return job.error is None
        raise ValueError(f"unknown job {job.kind}")

    def _capture(self) -> bool:
        assert self.frames is not None and self.camera is not None
        if self._in_flight:  # continuous mode: the frame being captured is classified even if unchanged
            self.frames.force_next = True
            return True
        self.alerts.set_working(True)
        try:
            got = self.frames.capture(force=True)
            if got is None or got is SKIPPED:
                return self.camera.exhausted
            self.pipeline.run(got, wait=True)
            return True
        finally:
            self.alerts.set_working(False)
