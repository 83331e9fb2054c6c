"""Area 2: the camera fails *mid-run* (after good fields) in every way a camera fails; the loop marks a fault,
keeps the page and the LEDs alive, retries with growing back-off (sleeping, not spinning), stops pinging
the watchdog while it cannot work, and recovers by itself when frames come back: same process, same
loop thread, no restart. A loop that hangs somewhere else (the classifier) stops pinging too.

``tests/device/test_service.py`` covers a camera that is bad from the first open; this file covers the
switch from good to bad to good, the back-off schedule, the watchdog gap and the status API.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from device.errors import CameraError
from device.leds import ALT, BLINK, Pattern
from device.sources import Frame
from tests.reliability.conftest import make_config, wait

AREA = "2 camera"
RETRY_MIN, RETRY_MAX, READ_TIMEOUT = 0.05, 0.4, 0.3


class Camera:
    """What the camera does now (switched by the test), shared by every "open" of it."""

    def __init__(self, frame: np.ndarray):
        self.frame = frame
        self.mode = "ok"
        self.opens: list[float] = []
        self.release = threading.Event()
        self.n = 0

    def open(self) -> CameraSource:
        self.opens.append(time.monotonic())
        if self.mode == "open fails":
            raise CameraError("camera 0 not detected")
        return CameraSource(self)


class CameraSource:
    def __init__(self, cam: Camera):
        self.cam = cam

    def read(self) -> Frame:
        cam = self.cam
        mode = cam.mode
        cam.n += 1
        if mode == "open fails":  # the cable is pulled: this read fails, and so does every reopen
            raise CameraError("picamera2 source: capture failed (camera disconnected)")
        if mode == "read raises OSError":
            raise OSError(5, "VIDIOC_DQBUF: Input/output error")
        if mode == "read raises CameraError":
            raise CameraError("picamera2 source: capture failed (timeout)")
        if mode == "read raises RuntimeError":
            raise RuntimeError("Camera frontend has timed out!")
        if mode == "read hangs":
            cam.release.wait(30)
        garbage = GARBAGE.get(mode)
        if garbage is not None:
            return Frame(garbage(cam.frame), f"garbage-{cam.n}")  # type: ignore[arg-type]
        return Frame(cam.frame, f"ok-{cam.n}")

    def close(self) -> None:
        pass


GARBAGE = {
    "frame is greyscale (HxW)": lambda f: f[..., 0].copy(),
    "frame has 4 channels": lambda f: np.dstack([f, f[..., :1]]),
    "frame is 8x8": lambda f: f[:8, :8].copy(),
    "frame is all black": lambda f: np.zeros_like(f),
    "frame is NaN (float)": lambda f: np.full(f.shape, np.nan, np.float32),
    "frame is float 0..255": lambda f: f.astype(np.float64),
    "frame is empty (0x0x3)": lambda f: np.zeros((0, 0, 3), np.uint8),
    "frame is None": lambda f: None,
    "frame is a list": lambda f: f.tolist()[:2],
}
MODES = ["read raises OSError", "read raises CameraError", "read raises RuntimeError", "open fails", "read hangs",
         *GARBAGE]


@pytest.fixture
def sample_frame(sample_paths) -> np.ndarray:
    return np.asarray(Image.open(sample_paths[0]).convert("RGB"))


def _backoff_ok(opens: list[float], extra: float) -> tuple[bool, list[float]]:
    """The gaps between reopen attempts during the fault: each at least the doubling back-off (capped)."""
    gaps = [round(b - a, 3) for a, b in zip(opens, opens[1:])]
    want = [min(RETRY_MIN * 2 ** (i + 1), RETRY_MAX) for i in range(len(gaps))]  # opens[0]: the first retry
    return all(g >= 0.9 * w + extra for g, w in zip(gaps, want)), gaps


@pytest.mark.parametrize("mode", MODES)
def test_a_camera_failing_mid_run_is_a_fault_then_recovers_by_itself(mode: str, harness, sample_frame, short_tmp,
                                                                     notify_socket, table) -> None:
    cam = Camera(sample_frame)
    calls = [0]

    def clock() -> float:
        calls[0] += 1
        return time.monotonic()

    cfg = make_config(short_tmp / "state", camera={"retry_min_s": RETRY_MIN, "retry_max_s": RETRY_MAX,
                                                   "read_timeout_s": READ_TIMEOUT},
                      alerts={"blink_s": 0.2})
    h = harness(cfg, cam.open, notify=notify_socket.path, watchdog_usec="100000", clock=clock)
    svc = h.svc
    thread = svc.thread
    assert wait(lambda: h.store.count() >= 3), svc.status()
    assert notify_socket.wait_for("WATCHDOG=1", 10)

    # -- the fault ------------------------------------------------------------------------------------------
    cam.mode = mode
    opens_before = len(cam.opens)
    assert wait(lambda: svc.status().counts["camera_errors"] >= 5, 30), svc.status()
    svc.acknowledge()  # an ALL verdict's alarm outranks the fault pattern; the fault is what is watched here
    t_fault = time.monotonic()
    fields_at_fault = h.store.count()
    pings_at_fault = notify_socket.lines().count("WATCHDOG=1")
    calls_at_fault = calls[0]
    time.sleep(0.6)  # a quiet window: 24 watchdog periods of 25 ms
    quiet_s = time.monotonic() - t_fault
    pings_in_fault = notify_socket.lines().count("WATCHDOG=1") - pings_at_fault
    clock_rate = (calls[0] - calls_at_fault) / quiet_s
    st = h.client.get("/api/status")
    health = h.client.get("/api/health")
    body = st.get_json()
    faults = body["faults"]
    fault_msg = faults[0]["message"] if faults else ""
    leds_fault = h.shows_fault_pattern() and svc.pattern() == Pattern(amber=BLINK, red=ALT)
    new_fields = h.store.count() - fields_at_fault
    fault_opens = cam.opens[opens_before:]
    backoff_ok, gaps = _backoff_ok(fault_opens[:5], READ_TIMEOUT if mode == "read hangs" else 0.0)

    # -- frames come back -------------------------------------------------------------------------------------
    cam.mode = "ok"
    cam.release.set()
    recovered = wait(lambda: svc.status().faults == () and h.store.count() >= fields_at_fault + 3, 30)
    pings_after = notify_socket.lines().count("WATCHDOG=1") - pings_at_fault - pings_in_fault
    after = svc.status()

    checks = {
        "fault on the page": st.status_code == 200 and bool(faults) and faults[0]["kind"] == "camera"
        and "retrying in" in fault_msg,
        "health 503": health.status_code == 503 and health.get_json()["faults"] == ["camera"],
        "fault LEDs": leds_fault,
        "nothing classified from garbage": new_fields == 0,
        "no watchdog ping while failing": pings_in_fault == 0,
        "back-off doubles": backoff_ok,
        "sleeps, no spin": clock_rate < 1000,
        "recovered, same loop": recovered and svc.thread is thread and thread.is_alive() and after.ready,
        "pings again": notify_socket.wait_for("WATCHDOG=1", 5) and wait(
            lambda: notify_socket.lines().count("WATCHDOG=1") - pings_at_fault - pings_in_fault > 0, 10),
        "LEDs back to a verdict": not h.shows_fault_pattern(),
    }
    bad = [k for k, v in checks.items() if not v]
    table(AREA, mode, "fault (page, LEDs), back-off, no watchdog, recovers without restart",
          f"fault: {fault_msg[:90]}; " + ("all checks hold" if not bad else f"FAILED: {bad}"), not bad,
          f"retry gaps {gaps} s; {pings_in_fault} pings in {quiet_s:.1f} s of fault; loop woke {clock_rate:.0f}/s; "
          f"{after.counts['camera_errors']} camera errors; pings after recovery {max(pings_after, 0)}")
    assert not bad, (bad, gaps, clock_rate, body, after)


class HangingClassifier:
    """The real classifier behind a gate the test closes: a wedged inference (driver, delegate, deadlock)."""

    def __init__(self, inner):
        self.inner, self.model, self.bundle = inner, inner.model, inner.bundle
        self.gate = threading.Event()
        self.gate.set()
        self.stuck = threading.Event()

    def __getattr__(self, name: str):  # everything but infer is the real classifier's
        return getattr(self.inner, name)

    def infer(self, prepared):  # the interpreter's part wedges, as a driver or delegate would
        if not self.gate.is_set():
            self.stuck.set()
            self.gate.wait(60)
        return self.inner.infer(prepared)


def test_a_hung_loop_stops_pinging_the_watchdog_while_the_page_answers(harness, decisive_classifier, sample_frame,
                                                                        short_tmp, notify_socket, table) -> None:
    cam = Camera(sample_frame)
    clf = HangingClassifier(decisive_classifier)
    cfg = make_config(short_tmp / "state")
    h = harness(cfg, cam.open, classifier=clf, notify=notify_socket.path, watchdog_usec="100000")
    assert wait(lambda: h.store.count() >= 3)
    assert notify_socket.wait_for("WATCHDOG=1", 10)
    clf.gate.clear()
    assert clf.stuck.wait(10)
    time.sleep(0.05)  # a ping already on its way
    pings0 = notify_socket.lines().count("WATCHDOG=1")
    t0 = time.monotonic()
    time.sleep(1.0)  # 40 watchdog periods (WATCHDOG_USEC=100 ms, pinged at most every 25 ms)
    pings_hung = notify_socket.lines().count("WATCHDOG=1") - pings0
    hung_s = time.monotonic() - t0
    page = h.client.get("/api/status")
    health = h.client.get("/api/health")
    clf.gate.set()
    resumed = wait(lambda: notify_socket.lines().count("WATCHDOG=1") > pings0 + pings_hung, 10)
    more = wait(lambda: h.store.count() >= 5, 30)
    ok = pings_hung == 0 and page.status_code == 200 and health.status_code == 200 and resumed and more
    table(AREA, "loop hangs (inference wedged)", "no watchdog ping while hung (systemd restarts it); page answers",
          f"{pings_hung} pings in {hung_s:.1f} s hung; page {page.status_code}; pings resume after: {resumed}", ok,
          f"watchdog period 100 ms; hung {hung_s:.1f} s")
    assert ok


def test_frames_that_are_merely_dark_are_a_retake_not_a_camera_fault(harness, sample_frame, short_tmp, table) -> None:
    """The all-black check must not catch a real dark field (lamp low): sensor noise means not every pixel is 0."""
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 6, sample_frame.shape, dtype=np.uint8)
    cam = Camera(dark)
    h = harness(make_config(short_tmp / "state"), cam.open)
    assert wait(lambda: h.store.count() >= 2)
    r = h.store.query(limit=1)[0]
    st = h.svc.status()
    ok = r.status == "retake" and r.quality.code == "dark" and st.faults == () and st.counts["camera_errors"] == 0
    table(AREA, "dark but real frame (noise 0..5)", "retake 'too dark', no camera fault",
          f"{r.status} ({r.quality.code}); faults {st.to_json()['faults']}", ok)
    assert ok
