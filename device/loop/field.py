"""One field through the loop: staged (gate), inferred, committed, then shown.

The two halves of :func:`device.classifier.screen_field` run on two threads: :func:`stage` (capture
timing, quality gate, model input) on the frames thread, or the screening thread for an upload;
:meth:`FieldPipeline.run` (the interpreter's half, then the hand-off) on the screening thread. The
*recorder* thread then commits each result durably and only then hands it to ``show`` (LEDs, page):
nothing is shown before its commit, and results are committed in the order they were inferred. The
recorder may lag the model by :data:`MAX_UNCOMMITTED` results before the screening thread waits for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device.bundle import Bundle
from device.classifier import Classifier, Gated, gate_field, infer_field
from device.errors import StoreError
from device.loop.alerts import Alerts
from device.loop.board import Board
from device.loop.slide import SlideTracker
from device.loop.worker import Worker
from device.quality import QualityThresholds
from device.sources import Frame
from device.store import ResultStore
from device.store.records import FieldResult

log = logging.getLogger(__name__)

#: Results classified but not yet committed: the recorder may lag the model by this many before the loop waits.
MAX_UNCOMMITTED = 2
UPLOAD = "upload"  # the source of a field the page sent (never part of a slide; leaves the LEDs alone)


@dataclass(frozen=True)
class Staged:
    """A field after the stages that need no interpreter: capture, quality gate, model input."""

    frame: Frame
    source: str
    gated: Gated
    capture_ms: float
    t0: float  # perf_counter() when its capture began (for the capture-to-shown latency)


def stage(clf: Classifier, frame: Frame, th: QualityThresholds, *, source: str, capture_ms: float) -> Staged:
    """The gate's half of the field pipeline (any thread), on ``frame.analysis``: the camera's model-size
    stream when it has one (the calibration is in main-stream pixels, hence the scale), else the frame."""
    t0 = time.perf_counter()
    img = frame.analysis
    scale = img.shape[1] / frame.array.shape[1] if img is not frame.array else 1.0
    return Staged(frame, source, gate_field(clf, img, th, scale=scale), capture_ms, t0 - capture_ms / 1000.0)


class FieldPipeline:
    """``show(result, total_ms, camera)`` is called on the recorder thread after each commit (or failed commit)."""

    def __init__(self, classifier: Classifier, bundle: Bundle, store: ResultStore, *, board: Board, alerts: Alerts,
                 slides: SlideTracker, show: Callable[[FieldResult, float, bool], None]):
        self.classifier, self.bundle, self.store = classifier, bundle, store
        self.board, self.alerts, self.slides, self.show = board, alerts, slides, show
        self._slots = threading.BoundedSemaphore(MAX_UNCOMMITTED)
        self._recorder: Worker | None = None

    def start(self) -> None:
        self._recorder = Worker("recorder")

    def run(self, staged: Staged, *, wait: bool = False) -> FieldResult | None:
        """Screening thread: infer, then hand the result to the recorder; ``wait`` for its commit and return it."""
        result = self._infer(staged)
        self._slots.acquire()  # the recorder may lag by MAX_UNCOMMITTED results, no more
        done = threading.Event()
        box: dict[str, Any] = {}

        def commit() -> None:
            try:
                box["result"] = self._commit(result, staged)
            except BaseException as exc:
                box["error"] = exc
                if not wait:
                    log.error("recording field %s failed: %s", result.name, exc)
            finally:
                self._slots.release()
                done.set()

        assert self._recorder is not None
        self._recorder.submit(commit)
        if not wait:
            return None
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _infer(self, staged: Staged) -> FieldResult:
        """The interpreter's half (screening thread only): invoke, head, decision; the result is not recorded."""
        try:
            screened = infer_field(self.classifier, staged.gated)
        except Exception as exc:
            self.alerts.fault("inference", f"classification failed: {type(exc).__name__}: {exc}")
            raise
        if screened.timed is not None:
            self.alerts.clear("inference")
            self.board.invoked(screened.timed.invoke_ms)
        v = screened.verdict
        reason = v.reason
        is_camera = staged.source != UPLOAD
        slide_id = self.slides.ensure() if is_camera else None
        fingerprint = screened.timed.fingerprint if screened.timed is not None else None
        if slide_id is not None and fingerprint is not None and not self.slides.is_new(fingerprint):
            # Refocusing or re-panning over one area: recorded, but no new evidence for the slide verdict.
            slide_id = None
            reason = (reason + "; " if reason else "") + "same area as an earlier field of the slide: not counted again"
        frame = staged.frame
        return FieldResult(time=frame.t, status=v.status, label=v.label, all=bool(v.all),
                           confidence=float(v.confidence), scores=v.scores, reason=reason, quality=screened.quality,
                           timings={"capture": round(staged.capture_ms, 3), **screened.timings},
                           model_sha256=self.bundle.model_sha256, bundle=self.bundle.id, source=staged.source,
                           name=frame.name, slide_id=slide_id, distance=v.distance, p_all=v.p_all)

    def _commit(self, result: FieldResult, staged: Staged) -> FieldResult:
        """Recorder thread: durable record, then show (LEDs, page). Returns the recorded result."""
        try:
            frame = staged.frame
            image = frame.jpeg if frame.jpeg is not None else frame.array  # a replayed JPEG is kept as it is
            result = self.store.record(result, image)  # durable before anything is shown
            self.alerts.clear("storage")
            if self.store.last_image_error:
                log.debug("image not kept: %s", self.store.last_image_error)
        except StoreError as exc:
            self.board.count("store_errors")
            self.alerts.fault("storage", str(exc))
            log.error("result NOT recorded: %s", exc)
        self.show(result, (time.perf_counter() - staged.t0) * 1000, staged.source != UPLOAD)
        return result

    def finish(self, timeout: float) -> None:
        """Record and show every result handed over (or give up after ``timeout``), then end the recorder."""
        if self._recorder is None:
            return
        if not self._recorder.drain(timeout):
            log.error("the recorder did not finish within %g s; results still queued were NOT recorded", timeout)
        self._recorder.close()
