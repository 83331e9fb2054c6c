"""LEDs: the pure alert state, and the gpiozero driver on gpiozero's own MockFactory."""

from __future__ import annotations

import pytest

from device.leds import (
    ALT,
    BLINK,
    FAST,
    OFF,
    ON,
    V_ALL,
    V_BENIGN,
    V_REFER,
    V_RETAKE,
    AlertInputs,
    LedDriver,
    Pattern,
    alert_state,
    level,
)

GREEN, AMBER, RED, BUTTON, BUZZER = 17, 27, 22, 23, 24


@pytest.mark.parametrize("inputs, expected", [
    (AlertInputs(ready=False), Pattern(green=BLINK)),
    (AlertInputs(ready=True), Pattern(green=ON)),
    (AlertInputs(ready=True, verdict=V_BENIGN), Pattern(green=ON)),
    (AlertInputs(ready=True, verdict=V_RETAKE), Pattern(amber=BLINK)),
    (AlertInputs(ready=True, verdict=V_REFER), Pattern(amber=ON)),
    (AlertInputs(ready=True, verdict=V_ALL), Pattern(red=ON)),  # acknowledged ALL: steady red
    (AlertInputs(ready=True, working=True, verdict=V_BENIGN), Pattern(amber=ON)),
    (AlertInputs(ready=True, working=True, verdict=V_ALL), Pattern(amber=ON, red=ON)),
    (AlertInputs(ready=True, verdict=V_ALL, alarm=True), Pattern(red=FAST, buzzer=BLINK)),
    (AlertInputs(ready=True, verdict=V_BENIGN, alarm=True, buzzer=False), Pattern(red=FAST)),
    (AlertInputs(ready=True, fault=True, verdict=V_BENIGN), Pattern(amber=BLINK, red=ALT)),
    (AlertInputs(ready=False, fault=True), Pattern(amber=BLINK, red=ALT)),
    (AlertInputs(ready=True, fault=True, alarm=True), Pattern(red=FAST, amber=ALT, buzzer=BLINK)),
])
def test_alert_state(inputs: AlertInputs, expected: Pattern) -> None:
    assert alert_state(inputs) == expected


def test_the_all_alarm_outlasts_later_benign_fields_until_acknowledged() -> None:
    assert alert_state(AlertInputs(ready=True, verdict=V_BENIGN, alarm=True)).red == FAST
    assert alert_state(AlertInputs(ready=True, verdict=V_BENIGN, alarm=False)).red == OFF


def test_fault_pattern_is_distinct_from_every_other_pattern() -> None:
    fault = alert_state(AlertInputs(ready=True, fault=True))
    others = {alert_state(AlertInputs(ready=r, working=w, verdict=v))
              for r in (True, False) for w in (True, False) for v in (None, V_BENIGN, V_ALL, V_RETAKE, V_REFER)}
    assert fault not in others


def test_blink_levels() -> None:
    b = 0.5
    ts = [i * 0.125 for i in range(16)]
    assert all(level(ON, t, b) and not level(OFF, t, b) for t in ts)
    assert all(level(BLINK, t, b) != level(ALT, t, b) for t in ts)  # alternating lights never share a phase
    assert [level(BLINK, t, b) for t in (0, 0.49, 0.5, 0.99, 1.0)] == [True, True, False, False, True]
    assert [level(FAST, t, b) for t in (0, 0.24, 0.25, 0.5)] == [True, True, False, True]


@pytest.fixture
def driver(mock_factory):
    t = [0.0]
    presses: list[str] = []
    d = LedDriver(green=GREEN, amber=AMBER, red=RED, button=BUTTON, buzzer=BUZZER, pin_factory=mock_factory,
                  blink_s=0.5, long_press_s=2.0, clock=lambda: t[0], autostart=False,
                  on_short=lambda: presses.append("short"), on_long=lambda: presses.append("long"))
    d.t, d.presses = t, presses
    yield d
    d.close()


def states(factory) -> tuple[bool, bool, bool, bool]:
    return tuple(bool(factory.pin(p).state) for p in (GREEN, AMBER, RED, BUZZER))


def test_driver_shows_steady_and_blinking_patterns_on_the_pins(driver, mock_factory) -> None:
    driver.show(Pattern(green=ON))
    assert states(mock_factory) == (True, False, False, False)
    driver.show(Pattern(red=FAST, buzzer=BLINK))
    driver.render(0.0)
    assert states(mock_factory) == (False, False, True, True)
    driver.render(0.3)
    assert states(mock_factory) == (False, False, False, True)
    driver.show(Pattern(amber=BLINK, red=ALT))
    for t in (0.0, 0.6, 1.1):
        driver.render(t)
        s = states(mock_factory)
        assert s[1] != s[2]  # fault: amber and red alternate


def test_render_reads_back_its_own_levels_while_other_threads_render(driver) -> None:
    """The recorder thread renders at the wall clock after every field; a reader that renders at ``t`` must get
    the levels at ``t``, not a mix with the other thread's (the race that made a reliability check flaky)."""
    import threading

    fault = Pattern(amber=BLINK, red=ALT)
    driver.show(fault)
    driver.t[0] = 0.6  # the other thread's time: amber off, red on
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            driver.show(fault)

    th = threading.Thread(target=hammer, daemon=True)
    th.start()
    try:
        reads = [driver.render(0.1) for _ in range(2000)]  # amber on, red off
    finally:
        stop.set()
        th.join(5)
    assert set(reads) == {(False, True, False, False)}


def test_button_short_and_long_presses(driver, mock_factory) -> None:
    pin = mock_factory.pin(BUTTON)
    pin.drive_low()
    driver.t[0] += 0.2
    pin.drive_high()
    pin.drive_low()
    driver.t[0] += 2.5
    pin.drive_high()
    assert driver.presses == ["short", "long"]


def test_a_failing_callback_does_not_break_the_button(mock_factory) -> None:
    def boom() -> None:
        raise RuntimeError("bug")

    d = LedDriver(green=GREEN, amber=AMBER, red=RED, button=BUTTON, pin_factory=mock_factory, on_short=boom,
                  autostart=False)
    pin = mock_factory.pin(BUTTON)
    pin.drive_low()
    pin.drive_high()  # logged, not raised
    d.close()


def test_close_releases_the_pins(driver, mock_factory) -> None:
    driver.close()
    from gpiozero import LED

    LED(GREEN, pin_factory=mock_factory).close()  # would raise GPIOPinInUse if still held


def test_ticker_thread_blinks_without_help(mock_factory, wait) -> None:
    d = LedDriver(green=GREEN, amber=AMBER, red=RED, button=None, pin_factory=mock_factory, blink_s=0.05)
    try:
        d.show(Pattern(red=FAST))
        seen: set[bool] = set()
        assert wait(lambda: seen.add(bool(mock_factory.pin(RED).state)) or len(seen) == 2, timeout=10)
    finally:
        d.close()


def test_the_appliances_mock_pins_keep_a_bounded_history() -> None:
    """A laptop run's mock GPIO blinks for days: gpiozero's MockPin would keep every change; ours keeps the last few."""
    from gpiozero import LED

    from device.leds import MOCK_PIN_HISTORY, make_pin_factory

    factory = make_pin_factory(True)
    led = LED(17, pin_factory=factory)
    try:
        for i in range(3 * MOCK_PIN_HISTORY):
            led.value = i % 2
        pin = factory.pin(17)
        assert len(pin.states) == MOCK_PIN_HISTORY
        assert [s.state for s in pin.states][-2:] == [False, True]  # the newest changes are the ones kept
        pin.assert_states([s.state for s in pin.states])  # gpiozero's own check still reads it
    finally:
        led.close()
        factory.close()
