"""What the page uses of the running appliance: the whole of it, so the web layer is typed by this and nothing else.

``device.service.Service`` is one; a test may pass anything with these members. Every method is
thread-safe: request threads call them while the loop runs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from device.bundle import Bundle
from device.config import Config
from device.loop.status import ServiceStatus
from device.slides import SlideVerdict
from device.store import ResultStore
from device.store.records import FieldResult


@runtime_checkable
class ServiceAPI(Protocol):
    store: ResultStore  # read by request threads: results, slides, images, CSV
    bundle: Bundle  # the model the page names, its classes (filters, CSV columns) and thresholds (report)
    token: str  # what POST requests must carry
    config: Config  # the page reads its own section, [web] (max_upload_mb, allowed_hosts), when it is made

    def status(self) -> ServiceStatus:
        """A snapshot (ready, faults, model, timings, slide, last result, alarm, seq, ...); the page turns it into
        JSON in one place, ``device.web.presenters.status_json``."""
        ...

    def wait_for_change(self, after_seq: int, timeout: float) -> int:
        """Block until ``seq`` differs from ``after_seq`` (or ``timeout`` s pass); returns the current seq."""
        ...

    def classify_upload(self, data: bytes, name: str) -> FieldResult:
        """Classify an uploaded image on the loop's thread (never the camera). Raises ImageError, ScreenError."""
        ...

    def start_slide(self) -> str:
        ...

    def end_slide(self) -> str | None:
        ...

    def slide_verdict(self, slide_id: str) -> SlideVerdict | None:
        ...

    def acknowledge(self) -> None:
        ...
