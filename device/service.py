"""The screening loop: frame source -> change detection -> quality gate -> classifier -> durable record -> LEDs.

:class:`Service` is what the composition root (``device.app.build``) starts and what the page and the
button talk to; the parts it puts together live in ``device.loop`` (threads and lock described there).

A three-stage pipeline, so that a field costs little more than its invoke: the *frames* thread captures
the next frame, detects change and gates it while the *screening* thread invokes the model on the
current one, and the *recorder* thread commits the previous result and only then shows it (LEDs, page).
Only the screening thread touches the interpreter (it is not thread-safe); only one thread at a time
touches the camera. The page's uploads and the button's captures are queued to the screening thread.

The loop survives its hardware: a camera that raises, hangs (every call has a time limit) or sends
garbage becomes a *fault* (LED fault pattern, on the page, in ``systemctl status``) and is reopened with
exponential back-off until it works again; a store that cannot write is a fault too, and classification
goes on. A result is shown (LEDs, page) only after the store has committed it.

Threads: every public method may be called from any thread (the page's request threads, gpiozero's button
thread, the main thread); ``start`` and ``stop`` from the one that owns the service.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import numpy as np

from device.classifier import Classifier
from device.config import Config
from device.errors import ScreenError, StoreError
from device.install import Installed
from device.leds import LedDriver, Pattern, alert_state
from device.loop.alerts import Alerts
from device.loop.board import Board
from device.loop.camera import Camera
from device.loop.field import FieldPipeline
from device.loop.frames import FrameStage
from device.loop.screening import Screening
from device.loop.slide import SlideTracker
from device.loop.status import ServiceStatus, Timing, cpu_temp, disk_free, rate
from device.notify import Notifier
from device.preprocess import load_image
from device.slides import SlideRules, SlideVerdict
from device.sources import FrameSource
from device.store import ResultStore
from device.store.records import FieldResult

log = logging.getLogger(__name__)

#: The loop's three threads (and the page's) pass the GIL around several times per field; at Python's default
#: 5 ms a busy thread can keep the screening thread waiting that long after an invoke returns (the invoke itself
#: releases the GIL). Measured here, a 1-thread invoke beside a thread running pure Python took 1.67x its bare
#: time at 5 ms, 1.18x at 1 ms, 1.08x at 0.5 ms and 1.04x at 0.1 ms.
SWITCH_INTERVAL_S = 0.0002


class Service:
    """The running appliance. Build it with ``device.app.build``; ``start()``, then ``stop()``.

    ``source_factory`` opens the frame source (again after every camera fault); None: uploads only.
    ``installed``: the operator panel's active and previous bundle (None: the classifier's, as the factory one).
    """

    def __init__(self, config: Config, *, classifier: Classifier, store: ResultStore,
                 source_factory: Callable[[], FrameSource] | None, source_kind: str = "camera",
                 leds: LedDriver | None = None, notifier: Notifier | None = None, token: str = "",
                 state_dir: Path | None = None, clock: Callable[[], float] = time.monotonic,
                 installed: Installed | None = None):
        self.config, self.classifier, self.store = config, classifier, store
        self.bundle = bundle = classifier.bundle
        self.installed = installed or Installed(bundle.id, bundle.root, True, None, None)
        self.token, self.source_kind, self.leds = token, source_kind, leds
        self.notifier = notifier or Notifier(address="")
        self.state_dir = Path(state_dir) if state_dir is not None else store.state_dir
        self.clock = clock
        a, m = config.alerts, bundle.slide
        rules = SlideRules(a.all_fields, a.benign_fields, a.subtype_agreement, a.refer_fraction,
                           field_false_alert=m.field_false_alert, field_sensitivity=m.field_sensitivity,
                           field_false_alert_low=m.field_false_alert_low)
        self._started_at, self._started_mono = time.time(), clock()
        self._stop = threading.Event()
        self.board = Board()
        self.alerts = Alerts(self.board, leds=leds, notifier=self.notifier, buzzer=a.buzzer, summary=self._summary)
        self.slides = SlideTracker(self.board, store, self.alerts, bundle, rules)
        self.camera: Camera | None = None
        frames: FrameStage | None = None
        if source_factory is not None:
            self.camera = Camera(source_factory, config.camera, board=self.board, alerts=self.alerts, clock=clock)
            frames = FrameStage(self.camera, classifier, config, board=self.board, alerts=self.alerts,
                                source_kind=source_kind, stop=self._stop, clock=clock)
        pipeline = FieldPipeline(classifier, bundle, store, board=self.board, alerts=self.alerts, slides=self.slides,
                                 show=self._show)
        self.screening = Screening(config, camera=self.camera, frames=frames, pipeline=pipeline, board=self.board,
                                   alerts=self.alerts, notifier=self.notifier, stop=self._stop)
        self.alerts.show()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            closed = self.store.close_open_slides()
            if closed:
                log.info("closed %d slide(s) left open by the last run: %s", len(closed), ", ".join(closed))
        except StoreError as exc:
            self.alerts.fault("storage", str(exc))
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.screening.start()
        self.alerts.set_ready(True)
        self.alerts.show()
        log.info("screening loop started (%s trigger, %s source)", self.config.trigger.mode, self.source_kind)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (every field already read is recorded first), close the camera, end the slide."""
        self.screening.stop(timeout)
        if self.camera is not None:
            self.camera.close()
        try:
            self.end_slide()
        except ScreenError as exc:
            log.warning("could not end the slide: %s", exc)
        self.alerts.set_ready(False)

    @property
    def running(self) -> bool:
        return self.screening.running

    @property
    def thread(self) -> threading.Thread | None:
        """The screening thread (a fault is recovered by the same thread, never by a new one)."""
        return self.screening.thread

    # -- the page and the button ---------------------------------------------------------------------------

    def classify_upload(self, data: bytes, name: str) -> FieldResult:
        """Classify an uploaded image (bench use; never touches the camera). Raises ImageError."""
        frame = np.asarray(load_image(data, name=name), dtype=np.uint8)  # ImageError for bad uploads
        return self.screening.upload(frame, name)

    def start_slide(self) -> str:
        """End the current slide (if any) and start a new one; the next fields belong to it."""
        return self.slides.start()

    def end_slide(self) -> str | None:
        """End the current slide; the next camera field starts a new one. Returns the ended id."""
        return self.slides.end()

    def slide_verdict(self, slide_id: str) -> SlideVerdict | None:
        """The aggregated verdict of any recorded slide (None if unknown)."""
        return self.slides.verdict(slide_id)

    def acknowledge(self) -> None:
        self.alerts.acknowledge()

    def press(self) -> None:
        """Short button press: acknowledge an ALL alarm, else classify the current field now."""
        with self.board.lock:
            alarm = self.alerts.alarm
        if alarm:
            self.acknowledge()
        elif self.camera is not None:
            self.screening.capture()

    def long_press(self) -> None:
        """Long button press: end the current slide, or start one when none is open."""
        try:
            self.slides.toggle()
        except ScreenError as exc:
            log.error("slide command failed: %s", exc)

    def report_fault(self, kind: str, message: str) -> None:
        """Show a fault found outside the loop (e.g. the web page could not start)."""
        self.alerts.fault(kind, message)

    def wait_for_change(self, after_seq: int, timeout: float) -> int:
        """Block until the status changes (its ``seq`` differs from ``after_seq``) or ``timeout``; returns seq."""
        return self.board.wait_for_change(after_seq, timeout, self._stop.is_set)

    def pattern(self) -> Pattern:
        return self.alerts.pattern()

    # -- what is shown -------------------------------------------------------------------------------------

    def _show(self, r: FieldResult, total_ms: float, camera: bool) -> None:
        """Recorder thread, after the commit: the page (and, for a camera field, the LEDs) show ``r``."""
        with self.board.lock:
            self.board.shown(r, total_ms, self.clock(), camera=camera)
            if camera:
                self.alerts.field_shown(r)
                self.slides.count(r)
            self.board.bump()
        if camera:
            self.alerts.show()
        log.info("field %s %s: %s%s%s", r.id if r.id is not None else "(unrecorded)", r.name, r.status,
                 f" {r.label}" if r.label else "", " ALL" if r.all else "")

    def _summary(self) -> str:
        """systemd's status line while no fault is up (board lock held)."""
        sid = self.slides.open_id
        return f"screening: {self.board.counts['fields']} fields" + (f", slide {sid}" if sid else "")

    def status(self) -> ServiceStatus:
        try:
            stats, stats_error = self.store.stats(), ""
        except StoreError as exc:
            stats, stats_error = None, str(exc)
        free = disk_free(self.state_dir)
        model = self.classifier.model
        b = self.board
        with b.lock:
            return ServiceStatus(
                ready=self.alerts.ready and self.running, faults=self.alerts.faults(), bundle=self.bundle,
                installed=self.installed, runtime=getattr(model, "runtime", None),
                delegate=getattr(model, "delegate", None), inference_ms=Timing.of(list(b.invoke_ms)),
                field_ms=Timing.of(list(b.field_ms)), fps=rate(list(b.field_times)),
                uptime_s=round(self.clock() - self._started_mono, 1), started=self._started_at,
                cpu_temp_c=cpu_temp(), disk_free_bytes=free, store=stats, store_error=stats_error,
                counts=MappingProxyType(dict(b.counts)), trigger=self.config.trigger.mode, source=self.source_kind,
                slide=self.slides.current(), last=b.last, alarm=self.alerts.alarm,
                leds=alert_state(self.alerts.inputs()), seq=b.seq)
