"""One field through the loop: staged (gate), inferred, committed, then shown.

The two halves of :func:`device.classifier.screen_field` run on two threads: :func:`stage` (capture
timing, quality gate, model input) on the frames thread, or the screening thread for an upload;
:meth:`FieldPipeline.run` (the interpreter's half, then the hand-off) on the screening thread. The
*recorder* thread then commits each result durably and only then hands it to ``show`` (LEDs, page):
nothing is shown before its commit, and results are committed in the order they were inferred. The
recorder may lag the model by :data:`MAX_UNCOMMITTED` results before the screening thread waits for it;
the results waiting when it comes round are committed together (one database commit, fewer fsyncs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field

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
#: While the recorder commits one batch, up to this many less its size wait, and become the next batch: at 2 it
#: would commit one result at a time whenever it is the slower stage, the case batching is for.
MAX_UNCOMMITTED = 4
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


@dataclass(eq=False)
class _Uncommitted:
    """A result handed to the recorder: committed, then shown; ``done`` is set after both (or a failure)."""

    result: FieldResult
    staged: Staged
    wait: bool
    done: threading.Event = dataclass_field(default_factory=threading.Event)
    error: BaseException | None = None


class FieldPipeline:
    """``show(result, total_ms, camera)`` is called on the recorder thread after each commit (or failed commit)."""

    def __init__(self, classifier: Classifier, bundle: Bundle, store: ResultStore, *, board: Board, alerts: Alerts,
                 slides: SlideTracker, show: Callable[[FieldResult, float, bool], None]):
        self.classifier, self.bundle, self.store = classifier, bundle, store
        self.board, self.alerts, self.slides, self.show = board, alerts, slides, show
        self._slots = threading.BoundedSemaphore(MAX_UNCOMMITTED)
        self._recorder: Worker | None = None
        self._waiting: list[_Uncommitted] = []  # handed over, not yet taken by the recorder (in inference order)
        self._waiting_lock = threading.Lock()

    def start(self) -> None:
        self._recorder = Worker("recorder")

    def run(self, staged: Staged, *, wait: bool = False) -> FieldResult | None:
        """Screening thread: infer, then hand the result to the recorder; ``wait`` for its commit and return it."""
        result = self._infer(staged)
        self._slots.acquire()  # the recorder may lag by MAX_UNCOMMITTED results, no more
        item = _Uncommitted(result, staged, wait)
        with self._waiting_lock:
            self._waiting.append(item)
        assert self._recorder is not None
        self._recorder.submit(self._record_waiting)
        if not wait:
            return None
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

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

    def _record_waiting(self) -> None:
        """Recorder thread: commit every result waiting (one database commit for all), then show each in turn.

        Nothing is shown before its commit, and results are committed and shown in the order they were inferred.
        A result whose commit failed is shown all the same (unrecorded: no id), with a storage fault.
        """
        with self._waiting_lock:
            batch, self._waiting = self._waiting, []
        if not batch:
            return  # an earlier call took them
        try:
            outcomes = self._commit(batch)
        except BaseException as exc:  # a bug below the store: nothing is shown, the callers hear of it
            for item in batch:
                self._failed(item, exc, "recording")
            return
        for item, result in zip(batch, outcomes, strict=True):
            item.result = result
            try:
                self.show(result, (time.perf_counter() - item.staged.t0) * 1000, item.staged.source != UPLOAD)
            except BaseException as exc:
                self._failed(item, exc, "showing")
                continue
            self._slots.release()
            item.done.set()

    def _failed(self, item: _Uncommitted, exc: BaseException, doing: str) -> None:
        """``item`` is done, with ``exc`` for a caller that waits for it (an upload), or logged for the loop's own."""
        item.error = exc
        if not item.wait:
            log.error("%s field %s failed: %s", doing, item.result.name, exc)
        self._slots.release()
        item.done.set()

    def _commit(self, batch: list[_Uncommitted]) -> list[FieldResult]:
        """Durable records of ``batch``: each result as recorded, or as it was when its commit failed."""
        # a replayed JPEG is kept as it is; a camera frame is encoded by the store
        items = [(i.result, i.staged.frame.jpeg if i.staged.frame.jpeg is not None else i.staged.frame.array)
                 for i in batch]
        outcomes = self.store.record_batch(items)
        failed = [o for o in outcomes if isinstance(o, StoreError)]
        for _ in failed:
            self.board.count("store_errors")
        if failed:
            self.alerts.fault("storage", str(failed[-1]))
            log.error("%d result(s) NOT recorded: %s", len(failed), failed[-1])
        else:
            self.alerts.clear("storage")
        if self.store.last_image_error:
            log.debug("image not kept: %s", self.store.last_image_error)
        return [item.result if isinstance(o, StoreError) else o for item, o in zip(batch, outcomes, strict=True)]

    def finish(self, timeout: float) -> None:
        """Record and show every result handed over (or give up after ``timeout``), then end the recorder."""
        if self._recorder is None:
            return
        if not self._recorder.drain(timeout):
            log.error("the recorder did not finish within %g s; results still queued were NOT recorded", timeout)
        self._recorder.close()
