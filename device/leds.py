"""The three LEDs, the optional buzzer and the button.

:func:`alert_state` is the whole decision, pure: from what the appliance
knows (ready, working, latest field, unacknowledged ALL alarm, fault) to what
each light does. :class:`LedDriver` only renders that pattern on gpiozero
devices built with an injected pin factory (gpiozero's ``MockFactory`` off
the Pi and in tests) and turns button presses into short/long callbacks.

What the technician sees:

=====================  =======================================================
green steady           ready / last field benign
amber steady           working (button capture) / last field referred
amber blinking         retake the field (focus, exposure, no cells)
red fast blinking      ALL seen: blinks (and beeps) until the button is pressed
red steady             ALL seen and acknowledged (until the next field)
amber/red alternating  fault (camera or storage): see the status page
green blinking         starting up
=====================  =======================================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

OFF, ON, BLINK, FAST, ALT = "off", "on", "blink", "fast", "alt"

#: Field verdicts as the lights know them.
V_BENIGN, V_ALL, V_RETAKE, V_REFER = "benign", "all", "retake", "refer"


@dataclass(frozen=True)
class AlertInputs:
    ready: bool = False  # model loaded, loop running
    working: bool = False  # a button-triggered capture/classification is in progress
    verdict: str | None = None  # latest camera field: "benign" | "all" | "retake" | "refer" | None
    alarm: bool = False  # ALL was seen and the button has not acknowledged it yet
    fault: bool = False  # camera or storage fault
    buzzer: bool = True  # sound the buzzer with the alarm ([alerts] buzzer)


@dataclass(frozen=True)
class Pattern:
    green: str = OFF
    amber: str = OFF
    red: str = OFF
    buzzer: str = OFF

    def to_dict(self) -> dict[str, str]:
        return {"green": self.green, "amber": self.amber, "red": self.red, "buzzer": self.buzzer}


def alert_state(i: AlertInputs) -> Pattern:
    """What each light does. The ALL alarm outranks everything, then a fault, then start-up."""
    if i.alarm:
        return Pattern(red=FAST, amber=ALT if i.fault else (ON if i.working else OFF),
                       buzzer=BLINK if i.buzzer else OFF)
    if i.fault:
        return Pattern(amber=BLINK, red=ALT)
    if not i.ready:
        return Pattern(green=BLINK)
    if i.working:
        return Pattern(amber=ON, red=ON if i.verdict == V_ALL else OFF)
    if i.verdict == V_ALL:
        return Pattern(red=ON)
    if i.verdict == V_RETAKE:
        return Pattern(amber=BLINK)
    if i.verdict == V_REFER:
        return Pattern(amber=ON)
    return Pattern(green=ON)  # ready, or the last field was benign


def level(light: str, t: float, blink_s: float) -> bool:
    """Is ``light`` lit at time ``t`` (seconds)? BLINK and ALT are in opposite phase; FAST is twice as fast."""
    if light == ON:
        return True
    if light == OFF:
        return False
    if light == FAST:
        return int(t // (blink_s / 2)) % 2 == 0
    phase = int(t // blink_s) % 2 == 0
    return phase if light == BLINK else not phase


class LedDriver:
    """gpiozero LEDs/buzzer/button on ``pin_factory`` (None: gpiozero's default, i.e. real pins).

    ``on_short``/``on_long`` are called (from gpiozero's thread) on release of
    a press shorter/longer than ``long_press_s``. A ticker thread renders
    blinking patterns; ``autostart=False`` leaves rendering to :meth:`render`.
    """

    def __init__(self, *, green: int, amber: int, red: int, button: int | None, buzzer: int | None = None,
                 pin_factory: Any = None, blink_s: float = 0.4, long_press_s: float = 2.0,
                 bounce_s: float | None = None,
                 on_short: Callable[[], None] | None = None, on_long: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, autostart: bool = True):
        from gpiozero import LED, Button, Buzzer  # lazy: the pure part needs no GPIO library

        self.blink_s, self.long_press_s, self.clock = blink_s, long_press_s, clock
        self.on_short, self.on_long = on_short, on_long
        self._pattern = Pattern()
        self._lock = threading.Lock()
        self._devices: list[Any] = []
        try:
            self.green = self._add(LED(green, pin_factory=pin_factory))
            self.amber = self._add(LED(amber, pin_factory=pin_factory))
            self.red = self._add(LED(red, pin_factory=pin_factory))
            self.buzzer = self._add(Buzzer(buzzer, pin_factory=pin_factory)) if buzzer else None
            self.button = None
            if button is not None:
                self.button = self._add(Button(button, pull_up=True, bounce_time=bounce_s or None,
                                               pin_factory=pin_factory))
                self._pressed_at: float | None = None
                self.button.when_pressed = self._pressed
                self.button.when_released = self._released
        except Exception:
            self.close()
            raise
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.render(self.clock())
        if autostart:
            self._thread = threading.Thread(target=self._tick, name="leds", daemon=True)
            self._thread.start()

    def _add(self, dev: Any) -> Any:
        self._devices.append(dev)
        return dev

    # -- output --------------------------------------------------------------------------------------------

    @property
    def pattern(self) -> Pattern:
        return self._pattern

    def show(self, pattern: Pattern) -> None:
        """Display ``pattern`` from now on (steady lights change at once)."""
        with self._lock:
            self._pattern = pattern
        self.render(self.clock())

    def render(self, t: float) -> tuple[bool, ...]:
        """Set the lights as they are at time ``t``; returns (green, amber, red[, buzzer]) as read back from
        the pins under the same lock, so another thread's render cannot slip between setting and reading."""
        with self._lock:
            p = self._pattern
            outs = [(self.green, p.green), (self.amber, p.amber), (self.red, p.red)]
            if self.buzzer is not None:
                outs.append((self.buzzer, p.buzzer))
            read: list[bool] = []
            for dev, light in outs:
                try:
                    want = level(light, t, self.blink_s)
                    if bool(dev.value) != want:
                        dev.value = want
                    read.append(bool(dev.value))
                except Exception as exc:  # a closed device during shutdown, a GPIO glitch
                    log.debug("led render: %s", exc)
                    read.append(False)
            return tuple(read)

    def _tick(self) -> None:
        step = self.blink_s / 4
        while not self._stop.wait(step):
            self.render(self.clock())

    def lamp_test(self, seconds: float = 0.3) -> None:
        """Each light (and the buzzer) on in turn: for ``selftest``."""
        saved = self._pattern
        for p in (Pattern(green=ON), Pattern(amber=ON), Pattern(red=ON), Pattern(buzzer=ON), Pattern()):
            if p.buzzer == ON and self.buzzer is None:
                continue
            self.show(p)
            time.sleep(seconds)
        self.show(saved)

    # -- input ---------------------------------------------------------------------------------------------

    def _pressed(self) -> None:
        self._pressed_at = self.clock()

    def _released(self) -> None:
        started, self._pressed_at = self._pressed_at, None
        if started is None:
            return
        held = self.clock() - started
        cb = self.on_long if held >= self.long_press_s else self.on_short
        if cb is not None:
            try:
                cb()
            except Exception:  # a callback bug must not kill gpiozero's event thread
                log.exception("button callback failed")

    def close(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout=2)
        for dev in reversed(self._devices):
            try:
                if hasattr(dev, "off"):
                    dev.off()
            except Exception:
                pass
            try:
                dev.close()
            except Exception as exc:
                log.debug("closing %s: %s", dev, exc)
        self._devices.clear()


#: State changes a mock pin of the running appliance remembers (gpiozero's ``MockPin.states``, kept for assertions).
MOCK_PIN_HISTORY = 256


def make_pin_factory(mock: bool) -> Any:
    """gpiozero's MockFactory when ``mock``, else None (gpiozero picks the Pi's real pin library).

    gpiozero's ``MockPin`` appends every state change to a list, about 96 bytes each here: a blinking alarm with a
    buzzer changes 7.5 times a second, about 60 MB a day for a laptop run left on. The appliance's mock pins keep
    the last :data:`MOCK_PIN_HISTORY` changes instead (tests build their own ``MockFactory``, which keeps them all).
    """
    if not mock:
        return None
    from collections import deque

    from gpiozero.pins.mock import MockFactory, MockPin

    class RecentMockPin(MockPin):
        def clear_states(self) -> None:
            super().clear_states()
            self.states = deque(self.states, maxlen=MOCK_PIN_HISTORY)

    return MockFactory(pin_class=RecentMockPin)
