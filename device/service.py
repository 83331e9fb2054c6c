"""The screening loop: frame source -> change detection -> quality gate -> classifier -> durable record -> LEDs.

A three-stage pipeline, so that a field costs little more than its invoke:
the *frames* thread captures the next frame, detects change, runs the
quality gate and prepares the model input (:meth:`Service._stage`) while the
*screening* thread invokes the model on the current one, and the *recorder*
thread commits the previous result and only then shows it (LEDs, page).
Only the screening thread touches the interpreter (it is not thread-safe);
only one thread at a time touches the camera (the frames thread reads the
next frame only when asked, after the last one was handed over). Results are
committed and shown in the order they were captured; the recorder may lag
the model by ``MAX_UNCOMMITTED`` results before the model waits for it. The
web page's uploads, the button and slide commands are queued to the
screening thread.

The loop survives its hardware: a camera that raises,
hangs (every read has a timeout) or sends garbage becomes a *fault* (LED
fault pattern, on the page, in ``systemctl status``) and is reopened with
exponential back-off until it works again; a store that cannot write is a
fault too, and classification goes on. A result is shown (LEDs, page) only
after :meth:`~device.store.ResultStore.record` has committed it.

The systemd watchdog is pinged from this loop, only after a pass that did
its job (a frame classified or skipped as unchanged, a queued job done, or
an idle wait in button mode), so a wedged loop or a camera that stays dead
gets the process restarted.
"""

from __future__ import annotations

import logging
import queue
import shutil
import statistics
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from device.bundle import Bundle
from device.classifier import Classifier
from device.config import Config
from device.errors import CameraError, ScreenError, StoreError
from device.install import Installed
from device.leds import V_ALL, V_BENIGN, V_REFER, V_RETAKE, AlertInputs, LedDriver, Pattern, alert_state
from device.notify import Notifier
from device.preprocess import Prepared, load_image
from device.quality import Quality, gate, validate_frame
from device.slides import (
    Deduplicator,
    FieldKey,
    SlideRules,
    SlideVerdict,
    aggregate,
    aggregate_tally,
    field_key,
)
from device.sources import Frame, FrameSource, SourceExhausted
from device.store import ResultStore
from device.store.records import FieldResult

log = logging.getLogger(__name__)

CPU_TEMP = Path("/sys/class/thermal/thermal_zone0/temp")
THUMB = 32


class ServiceAPI(Protocol):
    """What the web page (``device/web``) may use. Everything is thread-safe."""

    store: ResultStore
    token: str
    bundle: Bundle
    classifier: Classifier

    def status(self) -> dict[str, Any]:
        """JSON-able snapshot: ready, faults, model, timings, fps, uptime, disk, last result, slide, seq."""
        ...

    def classify_upload(self, data: bytes, name: str) -> FieldResult:
        """Classify an uploaded image (bench use; never touches the camera). Raises ImageError."""
        ...

    def start_slide(self) -> str:
        ...

    def end_slide(self) -> str | None:
        ...

    def acknowledge(self) -> None:
        ...

    def wait_for_change(self, after_seq: int, timeout: float) -> int:
        """Block until ``seq`` differs from ``after_seq`` (or timeout); returns the current seq."""
        ...

    def slide_verdict(self, slide_id: str) -> SlideVerdict | None:
        """The aggregated verdict of any recorded slide (None if unknown)."""
        ...


class CameraTimeout(CameraError):
    """A read did not return within ``[camera] read_timeout_s``."""


def call_with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; raise :class:`CameraTimeout` if it has not returned in ``timeout`` s.

    A hung driver call cannot be cancelled, only abandoned: the thread is a
    daemon so it cannot keep the process alive, and the loop opens a new source.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"camera-{what}", daemon=True).start()
    if not done.wait(timeout):
        raise CameraTimeout(f"camera {what} did not return within {timeout:g} s; the camera or its driver hung "
                            "(check the cable); reconnecting")
    if "error" in box:
        raise box["error"]
    return box["value"]


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """Grey 32x32 float32 thumbnail for change detection."""
    img = Image.fromarray(frame, "RGB").convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def frame_changed(prev: np.ndarray | None, cur: np.ndarray, threshold: float) -> bool:
    """Pure: has the field changed enough (mean absolute grey difference) to classify again?"""
    return prev is None or float(np.abs(cur - prev).mean()) >= threshold


def led_verdict(r: FieldResult) -> str:
    if r.status == "retake":
        return V_RETAKE
    if r.all:
        return V_ALL
    if r.status == "refer":
        return V_REFER
    return V_BENIGN


@dataclass
class Fault:
    kind: str  # "camera" | "storage" | "inference"
    message: str
    since: float
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "since": self.since, "count": self.count}


@dataclass
class _Job:
    kind: str  # "upload" | "capture" | "frame" (the frames thread's next frame) | "stop"
    frame: np.ndarray | None = None
    name: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    result: FieldResult | None = None
    error: BaseException | None = None
    staged: Any = None  # "frame": a _Staged, SKIPPED (unchanged field) or None (nothing read)


@dataclass(frozen=True)
class _Staged:
    """A field after the stages that need no interpreter: capture, quality gate, model input."""

    frame: Frame
    source: str
    quality: Quality
    prepared: Prepared | None  # None when the quality gate says retake
    timings: dict[str, float]
    t0: float  # perf_counter() when its capture began (for the capture-to-shown latency)


SKIPPED = "skipped"  # the frames thread's answer for an unchanged field
#: Results classified but not yet committed: the recorder may lag the model by this many before the loop waits.
MAX_UNCOMMITTED = 2
#: The loop's three threads (and the page's) pass the GIL around several times per field; at Python's default
#: 5 ms a busy thread can keep the screening thread waiting that long after an invoke returns.
SWITCH_INTERVAL_S = 0.001


class _Worker:
    """One daemon thread running submitted calls in order (the frames stage, the recorder)."""

    def __init__(self, name: str):
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        with self._idle:
            self._pending += 1
        self._q.put(fn)

    def _loop(self) -> None:
        while True:
            fn = self._q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # the submitted calls handle their own errors; this is a bug
                log.exception("%s thread: a stage failed", self._thread.name)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until everything submitted has run; False on time-out."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._q.put(None)


class Service:
    """The running appliance. Build it in ``device.app``; ``start()``, then ``stop()``."""

    def __init__(self, config: Config, *, bundle: Bundle, classifier: Classifier, store: ResultStore,
                 source_factory: Callable[[], FrameSource] | None, source_kind: str = "camera",
                 leds: LedDriver | None = None, notifier: Notifier | None = None, token: str = "",
                 state_dir: Path | None = None, clock: Callable[[], float] = time.monotonic,
                 installed: Installed | None = None):
        self.config = config
        self.bundle, self.classifier, self.store = bundle, classifier, store
        #: What the operator panel shows: the installed (active) and previous bundle.
        self.installed = installed
        self.token = token
        self.source_factory, self.source_kind = source_factory, source_kind
        self.leds, self.notifier = leds, notifier or Notifier(address="")
        self.state_dir = Path(state_dir) if state_dir is not None else store.state_dir
        self.clock = clock
        a, m = config.alerts, bundle.slide
        self.rules = SlideRules(a.all_fields, a.benign_fields, a.subtype_agreement, a.refer_fraction,
                                field_false_alert=m.field_false_alert, field_sensitivity=m.field_sensitivity)

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._ready = False
        self._faults: dict[str, Fault] = {}
        self._alarm = False
        self._working = False
        self._led_verdict: str | None = None
        self._last: FieldResult | None = None
        self._slide_id: str | None = None
        self._slide_started: float | None = None
        self._slide_tally: Counter[FieldKey] = Counter()  # the open slide's fields, as counts
        self._dedupe = Deduplicator(bundle.slide.duplicate_similarity)  # the open slide's recent fingerprints
        self._invoke_ms: deque[float] = deque(maxlen=200)
        self._field_ms: deque[float] = deque(maxlen=200)
        self._field_times: deque[float] = deque(maxlen=30)
        self._counts = {"frames": 0, "skipped": 0, "fields": 0, "uploads": 0, "camera_errors": 0,
                        "store_errors": 0, "watchdog": 0}
        self._started_at = time.time()
        self._started_mono = clock()
        # camera state, owned by the worker
        self._source: FrameSource | None = None
        self._retry_at = 0.0
        self._backoff = config.camera.retry_min_s
        self._exhausted = False
        self._last_thumb: np.ndarray | None = None
        self._next_capture = 0.0
        # pipeline state, owned by the screening thread
        self._in_flight = False  # the frames thread is capturing the next frame
        self._force_next = False  # a button press in continuous mode: classify the next frame even if unchanged
        self._frames: _Worker | None = None
        self._recorder: _Worker | None = None
        self._commit_slots = threading.BoundedSemaphore(MAX_UNCOMMITTED)
        self._update_leds()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            closed = self.store.close_open_slides()
            if closed:
                log.info("closed %d slide(s) left open by the last run: %s", len(closed), ", ".join(closed))
        except StoreError as exc:
            self._set_fault("storage", str(exc))
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._frames, self._recorder = _Worker("frames"), _Worker("recorder")
        self._thread = threading.Thread(target=self._run, name="screening", daemon=True)
        self._thread.start()
        with self._lock:
            self._ready = True
            self._bump()
        self._update_leds()
        log.info("screening loop started (%s trigger, %s source)", self.config.trigger.mode, self.source_kind)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._jobs.put(_Job("stop"))
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_source()
        try:
            self.end_slide()
        except ScreenError as exc:
            log.warning("could not end the slide: %s", exc)
        with self._lock:
            self._ready = False
            self._bump()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        continuous = self.config.trigger.mode == "continuous" and self.source_factory is not None
        if self.source_factory is not None:
            self._open_source()  # at once, also in button mode: the camera's exposure settles before a press
        self._next_capture = self.clock()
        if continuous:
            self._request_frame()
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                job = None
            if self._stop.is_set():
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
                    self._set_fault("inference", f"internal error in the screening loop ({type(exc).__name__}: "
                                    f"{exc}); see the journal")
                except Exception:
                    log.exception("cannot report the fault")
                ok = False
                self._stop.wait(0.5)  # no hot spin if the error repeats
            if ok and not self._stop.is_set():
                self._ping()
        self._finish()
        log.info("screening loop stopped")

    def _finish(self) -> None:
        """Every frame read is classified (or skipped) and every result recorded and shown before the loop ends.

        A capture still in progress is abandoned after its read time-out; queued uploads and presses fail.
        """
        assert self._frames is not None and self._recorder is not None
        if not self._frames.drain(self.config.camera.read_timeout_s + 2.0):
            log.warning("the frames thread did not finish its capture; abandoning it")
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job.kind == "frame" and isinstance(job.staged, _Staged):
                try:
                    self._classify_and_commit(job.staged)
                except Exception:
                    log.exception("the last frame could not be classified")
                continue
            job.error = ScreenError("the appliance is stopping; try again when it is back")
            job.done.set()
        if not self._recorder.drain(30.0):
            log.error("the recorder did not finish within 30 s; results still queued were NOT recorded")
        self._frames.close()
        self._recorder.close()

    def _ping(self) -> None:
        if self.notifier.watchdog():
            self._counts["watchdog"] += 1

    def _run_job(self, job: _Job) -> bool:
        if job.kind == "stop":
            return False
        if job.kind == "frame":
            self._in_flight = False
            got = job.staged
            if not self._exhausted and not self._stop.is_set():
                self._request_frame()  # the next frame is captured and prepared while this one is inferred
            if got is None:
                return self._exhausted  # nothing read: a fault (no ping) unless the source simply ended
            if got is not SKIPPED:
                self._classify_and_commit(got)
            return True
        if job.kind == "capture":
            if self._in_flight:  # continuous mode: the frame being captured is classified even if unchanged
                self._force_next = True
                return True
            with self._lock:
                self._working = True
            self._update_leds()
            try:
                got = self._capture_stage(force=True)
                if got is None or got is SKIPPED:
                    return self._exhausted
                self._classify_and_commit(got, wait=True)
                return True
            finally:
                with self._lock:
                    self._working = False
                self._update_leds()
        if job.kind == "upload":
            try:
                assert job.frame is not None
                staged = self._stage(Frame(job.frame, job.name, time.time()), source="upload", capture_ms=0.0)
                job.result = self._classify_and_commit(staged, wait=True)
            except BaseException as exc:
                job.error = exc
            finally:
                job.done.set()
            return job.error is None
        raise ValueError(f"unknown job {job.kind}")

    # -- the frames stage (frames thread) ---------------------------------------------------------------------

    def _request_frame(self) -> None:
        """Ask the frames thread for the next field; it answers with a "frame" job. Screening thread only."""
        assert self._frames is not None
        due = self._next_capture if self._source is not None else max(self._next_capture, self._retry_at)
        self._in_flight = True
        self._frames.submit(lambda: self._jobs.put(_Job("frame", staged=self._acquire(due))))

    def _acquire(self, due: float) -> Any:
        """Frames thread: wait until the capture is due (interval, camera back-off), then capture and stage."""
        wait = due - self.clock()
        if wait > 0 and self._stop.wait(wait):
            return None
        self._next_capture = self.clock() + self.config.trigger.interval_ms / 1000.0
        force, self._force_next = self._force_next, False
        try:
            return self._capture_stage(force=force)
        except Exception as exc:  # a bug in a stage: a fault on the page, no watchdog ping, try the next frame
            log.exception("the frames stage failed")
            self._set_fault("inference", f"internal error preparing a frame ({type(exc).__name__}: {exc}); "
                            "see the journal")
            self._stop.wait(0.5)
            return None

    # -- camera --------------------------------------------------------------------------------------------

    def _open_source(self) -> FrameSource | None:
        now = self.clock()
        if now < self._retry_at:
            return None
        assert self.source_factory is not None
        timeout = self.config.camera.lock_after_s + 2 * self.config.camera.read_timeout_s
        try:
            src = call_with_timeout(self.source_factory, timeout, "open")
        except (CameraError, OSError, RuntimeError, ValueError) as exc:
            self._camera_failed(exc)
            return None
        self._source = src
        return src

    def _close_source(self) -> None:
        src, self._source = self._source, None
        if src is not None:
            try:
                call_with_timeout(src.close, 5.0, "close")
            except Exception as exc:
                log.warning("closing the frame source: %s", exc)

    def _camera_failed(self, exc: BaseException) -> None:
        self._counts["camera_errors"] += 1
        self._close_source()
        delay = self._backoff
        self._retry_at = self.clock() + delay
        self._backoff = min(self._backoff * 2, self.config.camera.retry_max_s)
        msg = str(exc) if isinstance(exc, ScreenError) else f"{type(exc).__name__}: {exc}"
        self._set_fault("camera", f"{msg} (retrying in {delay:g} s)")
        log.warning("camera fault: %s; retrying in %g s", msg, delay)

    def _read_frame(self) -> tuple[Frame, float] | None:
        src = self._source or self._open_source()
        if src is None:
            return None
        t0 = time.perf_counter()
        try:
            frame = call_with_timeout(src.read, self.config.camera.read_timeout_s, "read")
        except SourceExhausted as exc:
            log.info("%s; waiting for uploads and button presses", exc)
            self._exhausted = True
            self._close_source()
            return None
        except Exception as exc:  # CameraError, CameraTimeout, or whatever a driver raises
            self._camera_failed(exc)
            return None
        capture_ms = (time.perf_counter() - t0) * 1000
        arr = getattr(frame, "array", None)
        problem = validate_frame(arr)
        if not problem and not arr.any():  # a real field, even a dark one, has sensor noise
            problem = ("every pixel is 0 (an empty buffer): check the camera cable, the lamp and that the eyepiece "
                       "is not covered")
        if problem:
            self._camera_failed(CameraError(f"camera sent a garbage frame: {problem}"))
            return None
        self._backoff = self.config.camera.retry_min_s
        self._clear_fault("camera")
        return frame, capture_ms

    def _capture_stage(self, *, force: bool) -> _Staged | str | None:
        """Read a frame; SKIPPED when the field has not changed, None when nothing was read."""
        got = self._read_frame()
        if got is None:
            return None
        frame, capture_ms = got
        with self._lock:
            self._counts["frames"] += 1
        thumb = thumbnail(frame.analysis)
        if not force and not frame_changed(self._last_thumb, thumb, self.config.trigger.change_threshold):
            with self._lock:
                self._counts["skipped"] += 1
            return SKIPPED
        self._last_thumb = thumb
        return self._stage(frame, source=self.source_kind, capture_ms=capture_ms)

    # -- one field -----------------------------------------------------------------------------------------

    def _stage(self, frame: Frame, *, source: str, capture_ms: float) -> _Staged:
        """Quality gate and model input: everything before the interpreter (any thread).

        Both run on ``frame.analysis``: the camera's model-size stream when it has one, else the frame.
        """
        t0 = time.perf_counter()
        img = frame.analysis
        side = self.classifier.side_px  # calibrated in main-stream pixels; the analysis image may be smaller
        if side is not None and img is not frame.array:
            side *= img.shape[1] / frame.array.shape[1]
        timings = {"capture": round(capture_ms, 3)}
        prepared, q = gate(img, self.classifier.model.input_spec.size, self.config.quality, side_px=side,
                           timings=timings)
        return _Staged(frame, source, q, prepared if q.ok else None, timings, t0 - capture_ms / 1000.0)

    def _classify_and_commit(self, staged: _Staged, *, wait: bool = False) -> FieldResult | None:
        """Infer here (screening thread), then hand the result to the recorder; ``wait`` for its commit."""
        result = self._infer(staged)
        self._commit_slots.acquire()  # the recorder may lag by MAX_UNCOMMITTED results, no more
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
                self._commit_slots.release()
                done.set()

        assert self._recorder is not None
        self._recorder.submit(commit)
        if not wait:
            return None
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _infer(self, staged: _Staged) -> FieldResult:
        """The interpreter's part (screening thread only): invoke, head, decision; the result is not recorded."""
        q, timings = staged.quality, dict(staged.timings)
        fingerprint = None
        if staged.prepared is None:
            status, label, is_all, conf, scores, reason = "retake", None, False, 0.0, {}, q.reason
            dist = p_all = None
        else:
            try:
                timed = self.classifier.infer(staged.prepared)
            except Exception as exc:
                self._set_fault("inference", f"classification failed: {type(exc).__name__}: {exc}")
                raise
            self._clear_fault("inference")
            v = timed.verdict
            status, label, is_all, conf, scores, reason = v.status, v.label, v.all, v.confidence, v.scores, v.reason
            dist, p_all, fingerprint = v.distance, v.p_all, timed.fingerprint
            timings.update(invoke=round(timed.invoke_ms, 3), head=round(timed.head_ms, 3))
            with self._lock:
                self._invoke_ms.append(timed.invoke_ms)
        is_camera = staged.source != "upload"
        slide_id = self._ensure_slide() if is_camera else None
        if slide_id is not None and fingerprint is not None and not self._dedupe.is_new(fingerprint):
            # Refocusing or re-panning over one area: recorded, but no new evidence for the slide verdict.
            slide_id = None
            reason = (reason + "; " if reason else "") + "same area as an earlier field of the slide: not counted again"
        frame = staged.frame
        return FieldResult(time=frame.t, status=status, label=label, all=bool(is_all), confidence=float(conf),
                           scores=scores, reason=reason, quality=q, timings=timings,
                           model_sha256=self.bundle.model_sha256, bundle=self.bundle.id, source=staged.source,
                           name=frame.name,
                           slide_id=slide_id, distance=dist, p_all=p_all)

    def _commit(self, result: FieldResult, staged: _Staged) -> FieldResult:
        """Recorder thread: durable record, then publish (LEDs, page). Returns the recorded result."""
        try:
            result = self.store.record(result, staged.frame.array)  # durable before anything is shown
            self._clear_fault("storage")
            if self.store.last_image_error:
                log.debug("image not kept: %s", self.store.last_image_error)
        except StoreError as exc:
            with self._lock:
                self._counts["store_errors"] += 1
            self._set_fault("storage", str(exc))
            log.error("result NOT recorded: %s", exc)
        self._publish(result, (time.perf_counter() - staged.t0) * 1000, staged.source != "upload")
        return result

    def _publish(self, r: FieldResult, total_ms: float, is_camera: bool) -> None:
        with self._lock:
            self._last = r
            self._field_ms.append(total_ms)
            self._field_times.append(self.clock())
            self._counts["uploads" if not is_camera else "fields"] += 1
            if is_camera:
                self._led_verdict = led_verdict(r)
                if r.all:
                    self._alarm = True
                if r.slide_id is not None and r.slide_id == self._slide_id:
                    self._slide_tally[field_key(r)] += 1
            self._bump()
        if is_camera:
            self._update_leds()
        log.info("field %s %s: %s%s%s", r.id if r.id is not None else "(unrecorded)", r.name, r.status,
                 f" {r.label}" if r.label else "", " ALL" if r.all else "")

    # -- slides --------------------------------------------------------------------------------------------

    def _ensure_slide(self) -> str | None:
        with self._lock:
            if self._slide_id is not None:
                return self._slide_id
        try:
            sid = self.store.start_slide()
        except StoreError as exc:
            self._set_fault("storage", str(exc))
            return None
        with self._lock:
            self._slide_id, self._slide_started, self._slide_tally = sid, time.time(), Counter()
            self._dedupe.reset()
            self._bump()
        log.info("slide %s started", sid)
        return sid

    def start_slide(self) -> str:
        """End the current slide (if any) and start a new one; the next fields belong to it."""
        self.end_slide()
        sid = self.store.start_slide()
        with self._lock:
            self._slide_id, self._slide_started, self._slide_tally = sid, time.time(), Counter()
            self._dedupe.reset()
            self._bump()
        log.info("slide %s started", sid)
        return sid

    def end_slide(self) -> str | None:
        """End the current slide; the next camera field starts a new one. Returns the ended id."""
        with self._lock:
            sid, self._slide_id = self._slide_id, None
            fields, self._slide_tally = self._slide_tally, Counter()
            self._bump()
        if sid is None:
            return None
        try:
            self.store.end_slide(sid)
        except StoreError as exc:
            self._set_fault("storage", str(exc))
        v = aggregate_tally(fields, self.bundle.benign, self.rules, self.bundle.classes, closed=True)
        log.info("slide %s ended: %s%s (%s)", sid, v.verdict, f" {v.subtype}" if v.subtype else "", v.reason)
        return sid

    def _toggle_slide(self) -> None:
        with self._lock:
            open_ = self._slide_id is not None
        if open_:
            self.end_slide()
        else:
            self.start_slide()

    def slide_verdict(self, slide_id: str) -> SlideVerdict | None:
        with self._lock:
            if slide_id == self._slide_id:
                return aggregate_tally(self._slide_tally, self.bundle.benign, self.rules, self.bundle.classes)
        slide = self.store.slide(slide_id)
        if slide is None:
            return None
        return aggregate(self.store.slide_fields(slide_id), self.bundle.benign, self.rules, self.bundle.classes,
                         closed=slide.ended is not None)

    # -- commands --------------------------------------------------------------------------------------------

    def acknowledge(self) -> None:
        with self._lock:
            was, self._alarm = self._alarm, False
            if was:
                self._bump()
        if was:
            log.info("ALL alarm acknowledged")
            self._update_leds()

    def press(self) -> None:
        """Short button press: acknowledge an ALL alarm, else classify the current field now."""
        with self._lock:
            alarm = self._alarm
        if alarm:
            self.acknowledge()
        elif self.source_factory is not None:
            self._jobs.put(_Job("capture"))

    def long_press(self) -> None:
        """Long button press: end the current slide, or start one when none is open."""
        try:
            self._toggle_slide()
        except ScreenError as exc:
            log.error("slide command failed: %s", exc)

    def classify_upload(self, data: bytes, name: str) -> FieldResult:
        frame = np.asarray(load_image(data, name=name), dtype=np.uint8)  # ImageError for bad uploads
        job = _Job("upload", frame=frame, name=name)
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

    # -- faults, LEDs, change notification ---------------------------------------------------------------

    def report_fault(self, kind: str, message: str) -> None:
        """Show a fault found outside the loop (e.g. the web page could not start)."""
        self._set_fault(kind, message)

    def _bump(self) -> None:
        """Caller holds the lock."""
        self._seq += 1
        self._cond.notify_all()

    def _set_fault(self, kind: str, message: str) -> None:
        with self._lock:
            f = self._faults.get(kind)
            new = f is None
            if new:
                self._faults[kind] = Fault(kind, message, time.time())
            else:
                f.message, f.count = message, f.count + 1
            self._bump()
        if new:
            self.notifier.status(f"FAULT {kind}: {message}")
            self._update_leds()

    def _clear_fault(self, kind: str) -> None:
        with self._lock:
            f = self._faults.pop(kind, None)
            if f is not None:
                self._bump()
        if f is not None:
            log.info("%s fault cleared after %d error(s)", kind, f.count)
            self.notifier.status(self._status_line())
            self._update_leds()

    def _status_line(self) -> str:
        with self._lock:
            if self._faults:
                return "FAULT " + "; ".join(f"{f.kind}: {f.message}" for f in self._faults.values())
            return f"screening: {self._counts['fields']} fields" + (f", slide {self._slide_id}" if self._slide_id
                                                                    else "")

    def alert_inputs(self) -> AlertInputs:
        with self._lock:
            return AlertInputs(ready=self._ready, working=self._working, verdict=self._led_verdict,
                               alarm=self._alarm, fault=bool(self._faults), buzzer=self.config.alerts.buzzer)

    def pattern(self) -> Pattern:
        return alert_state(self.alert_inputs())

    def _update_leds(self) -> None:
        if self.leds is None:
            return
        try:
            self.leds.show(self.pattern())
        except Exception:  # a GPIO failure must not take the loop down; the page still shows everything
            log.exception("cannot update the LEDs")

    def wait_for_change(self, after_seq: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._seq != after_seq or self._stop.is_set(), timeout=max(0.0, timeout))
            return self._seq

    @property
    def seq(self) -> int:
        with self._lock:
            return self._seq

    # -- status --------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        try:
            st = self.store.stats()
            db_bytes, fields_total, images = st.db_bytes, st.fields, {"bytes": st.image_bytes,
                                                                       "count": st.image_count,
                                                                       "enabled": st.images_enabled,
                                                                       "error": st.last_image_error}
        except StoreError as exc:
            db_bytes, fields_total, images = None, None, {"error": str(exc)}
        try:
            disk_free = shutil.disk_usage(self.state_dir).free
        except OSError:
            disk_free = None
        model = self.classifier.model
        with self._lock:
            inv = list(self._invoke_ms)
            tot = list(self._field_ms)
            times = list(self._field_times)
            slide = None
            if self._slide_id is not None:
                v = aggregate_tally(self._slide_tally, self.bundle.benign, self.rules, self.bundle.classes)
                slide = {"id": self._slide_id, "started": self._slide_started, **v.to_dict()}
            return {
                "ready": self._ready and self.running,
                "faults": [f.to_dict() for f in self._faults.values()],
                "model": {"name": self.bundle.name, "sha256": self.bundle.model_sha256,
                          "classes": list(self.bundle.classes), "benign": self.bundle.benign,
                          "input_size": self.bundle.input.size, "bundle": self.bundle.id},
                "bundles": (self.installed.to_dict() if self.installed is not None
                            else {"active": self.bundle.id, "active_dir": str(self.bundle.root), "factory": True,
                                  "previous": None, "previous_dir": None}),
                "runtime": getattr(model, "runtime", None),
                "delegate": getattr(model, "delegate", None),
                "inference_ms": {"p50": _pct(inv, 50), "p95": _pct(inv, 95), "n": len(inv)},
                "field_ms": {"p50": _pct(tot, 50), "p95": _pct(tot, 95), "n": len(tot)},
                "fps": _rate(times),
                "uptime_s": round(self.clock() - self._started_mono, 1),
                "started": self._started_at,
                "cpu_temp_c": cpu_temp(),
                "disk_free_bytes": disk_free,
                "db_bytes": db_bytes,
                "fields": fields_total,
                "images": images,
                "counts": dict(self._counts),
                "trigger": self.config.trigger.mode,
                "source": self.source_kind,
                "slide": slide,
                "last": self._last.to_dict() if self._last is not None else None,
                "alarm": self._alarm,
                "leds": alert_state(AlertInputs(ready=self._ready, working=self._working, verdict=self._led_verdict,
                                                alarm=self._alarm, fault=bool(self._faults),
                                                buzzer=self.config.alerts.buzzer)).to_dict(),
                "seq": self._seq,
            }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    if q == 50:
        return round(statistics.median(values), 2)
    return round(float(np.percentile(np.asarray(values), q)), 2)


def _rate(times: list[float]) -> float | None:
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return round((len(times) - 1) / (times[-1] - times[0]), 3)


def cpu_temp(path: Path = CPU_TEMP) -> float | None:
    try:
        return round(int(path.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None

