"""What the technician is told outside the page: faults, the ALL alarm and the LEDs.

:class:`Alerts` keeps the inputs of :func:`device.leds.alert_state` (ready, working, the last camera
field's verdict, the unacknowledged alarm, any fault) and is the one place that turns them into the
LED pattern, for the LEDs and for ``status()`` alike. Faults also go to systemd's status line.

Any thread calls it (the camera's faults come from the frames thread, storage faults from the recorder,
inference faults from the screening thread, the alarm's acknowledgement from the button or the page).
Its state is guarded by the board's lock; the LEDs and the notifier are called after the lock is released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from device.leds import V_ALL, V_BENIGN, V_REFER, V_RETAKE, AlertInputs, LedDriver, Pattern, alert_state
from device.loop.board import Board
from device.notify import Notifier
from device.status import Status
from device.store.records import FieldResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    kind: str  # "camera" | "storage" | "inference" | "web"
    message: str
    since: float
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "since": self.since, "count": self.count}


def led_verdict(r: FieldResult) -> str:
    """A field's verdict as the lights know it: an ALL field is red even when its subtype was referred."""
    if r.status == Status.RETAKE:
        return V_RETAKE
    if r.all:
        return V_ALL
    if r.status == Status.REFER:
        return V_REFER
    return V_BENIGN


class Alerts:
    """``summary()`` is the systemd status line when no fault is left (the service's field and slide figures)."""

    def __init__(self, board: Board, *, leds: LedDriver | None, notifier: Notifier, buzzer: bool,
                 summary: Callable[[], str], clock: Callable[[], float] = time.time):
        self.board, self.leds, self.notifier = board, leds, notifier
        self.buzzer, self.summary, self.clock = buzzer, summary, clock
        self.ready = False
        self.working = False  # a button capture is being classified
        self.alarm = False  # ALL seen and not acknowledged
        self.verdict: str | None = None  # the last camera field, as the lights know it
        self._faults: dict[str, Fault] = {}
        # Threads call show() concurrently; computing and showing under one lock means the last show() to
        # finish lit the newest state, never a pattern computed earlier by a slower thread.
        self._show_lock = threading.Lock()

    # -- the LEDs --------------------------------------------------------------------------------------------

    def inputs(self) -> AlertInputs:
        with self.board.lock:
            return AlertInputs(ready=self.ready, working=self.working, verdict=self.verdict, alarm=self.alarm,
                               fault=bool(self._faults), buzzer=self.buzzer)

    def pattern(self) -> Pattern:
        return alert_state(self.inputs())

    def show(self) -> None:
        """Light the pattern of the current state (call without the lock)."""
        if self.leds is None:
            return
        try:
            with self._show_lock:
                self.leds.show(self.pattern())
        except Exception:  # a GPIO failure must not take the loop down; the page still shows everything
            log.exception("cannot update the LEDs")

    def set_ready(self, ready: bool) -> None:
        with self.board.lock:
            self.ready = ready
            self.board.bump()

    def set_working(self, working: bool) -> None:
        with self.board.lock:
            self.working = working
        self.show()

    def field_shown(self, r: FieldResult) -> None:
        """Recorder thread, board lock held: a camera field is what the lights show now."""
        self.verdict = led_verdict(r)
        if r.all:
            self.alarm = True

    def acknowledge(self) -> bool:
        """Silence the ALL alarm; False when none was up."""
        with self.board.lock:
            was, self.alarm = self.alarm, False
            if was:
                self.board.bump()
        if was:
            log.info("ALL alarm acknowledged")
            self.show()
        return was

    # -- faults ----------------------------------------------------------------------------------------------

    def faults(self) -> tuple[Fault, ...]:
        with self.board.lock:
            return tuple(self._faults.values())

    def fault(self, kind: str, message: str) -> None:
        """Raise (or repeat) a fault of ``kind``: on the page at once; LEDs and systemd when it is new."""
        with self.board.lock:
            f = self._faults.get(kind)
            self._faults[kind] = (Fault(kind, message, self.clock()) if f is None
                                  else replace(f, message=message, count=f.count + 1))
            self.board.bump()
        if f is None:
            self.notifier.status(f"FAULT {kind}: {message}")
            self.show()

    def clear(self, kind: str) -> None:
        """The thing that failed works again."""
        with self.board.lock:
            f = self._faults.pop(kind, None)
            if f is not None:
                self.board.bump()
        if f is not None:
            log.info("%s fault cleared after %d error(s)", kind, f.count)
            self.notifier.status(self.status_line())
            self.show()

    def status_line(self) -> str:
        with self.board.lock:
            if self._faults:
                return "FAULT " + "; ".join(f"{f.kind}: {f.message}" for f in self._faults.values())
            return self.summary()
