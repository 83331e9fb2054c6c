"""The screening loop, end to end with real parts: replay source, the tiny bundle's real TFLite model,
SQLite store, gpiozero MockFactory LEDs and button, a real AF_UNIX notify socket. Faults are injected at
the frame-source boundary (raising, hanging, garbage) and at the store (locked/read-only database)."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import sys
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.app import build as build_app
from device.app import make_leds
from device.errors import CameraError, ImageError
from device.leds import ALT, BLINK, FAST, ON, Pattern, make_pin_factory
from device.loop.alerts import Alerts
from device.loop.board import Board
from device.loop.camera import Backoff, Camera
from device.loop.field import MAX_UNCOMMITTED
from device.loop.frames import frame_changed, thumbnail
from device.notify import Notifier
from device.service import Service
from device.sources import Frame, ReplaySource
from device.store import ResultStore
from tests.device.conftest import wait_until

GREEN, AMBER, RED, BUTTON = 17, 27, 22, 23


@pytest.fixture
def build(make_config, decisive_classifier, notify_socket, tmp_path):
    """build(source_factory, **config sections) -> started Service; everything is stopped afterwards."""
    made: list = []

    def make(factory, kind: str = "replay", start: bool = True, store_cls=ResultStore, **sections) -> Service:
        from gpiozero.pins.mock import MockFactory

        cfg = make_config(store={"state_dir": str(tmp_path / f"state{len(made)}"), "reserve_mb": 0},
                          web={"token": "t0k3n"}, **sections)
        pins = MockFactory()  # each service its own board
        app = build_app(cfg, classifier=decisive_classifier, source=(factory, kind),
                        store=lambda path, _: store_cls(path, reserve_bytes=0, busy_timeout_s=0.2),
                        pin_factory=pins, leds=partial(make_leds, autostart=False),
                        notifier=Notifier(address=str(notify_socket.path)), web=None, start=start)
        app.service.pins = pins
        made.append(app)
        return app.service

    yield make
    for app in made:
        app.close()


def only(*paths: Path, tmp: Path, repeat: int = 1, loop: bool = True):
    d = tmp / f"replay-{len(list(tmp.glob('replay-*')))}"
    d.mkdir()
    for i, p in enumerate(paths):
        shutil.copy(p, d / f"{i:02d}-{p.name}")
    return lambda: ReplaySource(d, repeat=repeat, loop=loop)


def lit(factory) -> dict[str, bool]:
    return {name: bool(factory.pin(pin).state) for name, pin in (("green", GREEN), ("amber", AMBER), ("red", RED))}


def shows(svc: Service, pattern: Pattern) -> bool:
    """The state says ``pattern`` and the LED driver has been given it (the recorder thread calls show() just after
    it changes the state, so waiting on the state alone can read the pins before they change)."""
    return svc.pattern() == pattern and svc.leds.pattern == pattern


def test_loop_records_every_field_durably_and_pings_the_watchdog(build, sample_paths, notify_socket, tmp_path,
                                                                 wait) -> None:
    svc = build(only(*sample_paths[:4], tmp=tmp_path))
    assert wait(lambda: svc.store.count() >= 8)
    svc.stop()
    rows = svc.store.query(limit=100, newest_first=False)
    assert [r.name[3:] for r in rows[:4]] == [p.name for p in sample_paths[:4]]
    for i, r in enumerate(rows):
        assert r.model_sha256 == svc.bundle.model_sha256 and r.source == "replay"
        # the replay comes round again: the same four fields are recorded but add no evidence to the slide
        assert bool(r.slide_id) == (i < 4) and ("not counted again" in r.reason) == (i >= 4)
        assert r.status in ("ok", "retake", "refer") and r.quality.ok
        image = svc.store.image_file(r)
        assert image is not None
        assert image.read_bytes() == sample_paths[i % 4].read_bytes()  # a replayed JPEG is kept as it is
        assert {"capture", "quality", "preprocess", "invoke", "head", "store"} <= set(r.timings)
    with sqlite3.connect(svc.store.path) as db:  # what a fresh process would read
        assert db.execute("SELECT count(*) FROM fields").fetchone()[0] == len(rows)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert notify_socket.wait_for("WATCHDOG=1")
    st = svc.status()
    assert st.counts["fields"] == len(rows) and st.inference_ms.p50 > 0


def test_unchanged_frames_are_skipped(build, sample_paths, tmp_path, wait) -> None:
    svc = build(only(*sample_paths[:3], tmp=tmp_path, repeat=4))  # each field stays in view for 4 frames
    assert wait(lambda: svc.status().counts["frames"] >= 12)
    svc.stop()
    c = svc.status().counts
    assert c["fields"] == svc.store.count()
    # every 4-frame run is one field: at most one field per distinct run started
    assert c["fields"] <= -(-c["frames"] // 4) and c["skipped"] >= c["frames"] - c["fields"]
    assert frame_changed(None, thumbnail(np.zeros((8, 8, 3), np.uint8)), 3.0)


def test_leds_follow_verdicts_and_the_all_alarm_waits_for_the_button(build, benign_and_all, tmp_path,
                                                                   wait) -> None:
    benign, all_ = benign_and_all
    svc = build(only(benign, tmp=tmp_path), trigger={"mode": "button"})
    assert lit(svc.pins) == {"green": True, "amber": False, "red": False}  # ready
    button = svc.pins.pin(BUTTON)
    button.drive_low()
    button.drive_high()  # short press: classify now
    assert wait(lambda: svc.store.count() == 1)
    assert wait(lambda: shows(svc, Pattern(green=ON)))
    assert lit(svc.pins) == {"green": True, "amber": False, "red": False}
    assert svc.store.query()[0].label == svc.bundle.benign

    svc2 = build(only(all_, benign, tmp=tmp_path), trigger={"mode": "button"})
    svc2.press()
    assert wait(lambda: svc2.store.count() == 1)
    assert wait(lambda: shows(svc2, Pattern(red=FAST, buzzer=BLINK)))  # alarm, capture finished
    # render() returns what the pins read inside the same lock: a late show() cannot render between
    assert svc2.leds.render(0.0)[:3] == (False, False, True)
    assert svc2.leds.render(svc2.config.alerts.blink_s * 0.75)[2] is False  # blinking
    r = svc2.store.query()[0]
    assert r.all and svc2.status().alarm is True
    svc2.press()  # the alarm is up: a press acknowledges, it does not classify
    assert wait(lambda: shows(svc2, Pattern(red=ON)))
    assert lit(svc2.pins) == {"green": False, "amber": False, "red": True}
    assert svc2.store.count() == 1
    svc2.press()  # now a press classifies the next (benign) field; red goes out
    assert wait(lambda: svc2.store.count() == 2)
    assert wait(lambda: svc2.pattern() == Pattern(green=ON))


def test_an_unacknowledged_alarm_survives_a_later_benign_field(build, benign_and_all, tmp_path, wait) -> None:
    benign, all_ = benign_and_all
    # Not looping: a looped ALL field could raise the alarm again between acknowledge() and the checks below.
    # (The same benign image twice in a row would be one field: the frames stage skips an unchanged frame.)
    svc = build(only(all_, benign, tmp=tmp_path, loop=False))
    assert wait(lambda: svc.store.count() == 2 and svc.status().last is not None and svc.status().last.id == 2)
    assert svc.status().last.label == svc.bundle.benign  # the last field shown was benign ...
    assert svc.pattern().red == FAST and svc.status().alarm  # ... and the alarm is still up
    svc.acknowledge()
    assert svc.pattern().red != FAST and not svc.status().alarm


def test_long_press_ends_the_slide_and_the_next_field_starts_another(build, sample_paths, tmp_path, wait) -> None:
    svc = build(only(*sample_paths[:2], tmp=tmp_path), trigger={"mode": "button"}, gpio={"long_press_s": 0.2})
    svc.press()
    assert wait(lambda: svc.store.count() == 1)
    first = svc.status().slide.id
    assert svc.slide_verdict(first).fields == 1
    svc.acknowledge()  # the tiny model may have called that field ALL: a short press would then only silence it
    button = svc.pins.pin(BUTTON)
    t = [0.0]
    svc.leds.clock = lambda: t[0]
    button.drive_low()
    t[0] = 5.0  # held 5 s: a long press
    button.drive_high()
    assert wait(lambda: svc.status().slide is None)
    assert svc.store.slide(first).ended is not None
    svc.press()
    assert wait(lambda: svc.store.count() == 2)
    second = svc.store.query()[0].slide_id
    assert second != first and svc.status().slide.id == second
    assert svc.end_slide() == second and svc.end_slide() is None
    new = svc.start_slide()
    assert svc.status().slide.id == new and svc.slide_verdict("nope") is None


class FlakySource:
    """Fails in the ways cameras fail; each instance is one "open" of the camera."""

    opens = 0

    def __init__(self, mode: str, sample: Path, bad_opens: int, release: threading.Event | None = None):
        FlakySource.opens += 1
        self.n = FlakySource.opens
        self.mode, self.bad = mode, self.n <= bad_opens
        self.release = release
        self.frame = np.asarray(Image.open(sample).convert("RGB"))
        if self.bad and mode == "open":
            raise CameraError("camera 0 not detected")

    def read(self) -> Frame:
        if self.bad and self.mode == "raise":
            raise OSError("VIDIOC_DQBUF: No such device")
        if self.bad and self.mode == "hang":
            self.release.wait(30)
        if self.bad and self.mode == "garbage":
            return Frame(np.full((10, 10), np.nan), "garbage")
        return Frame(self.frame, f"ok-{self.n}")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["open", "raise", "hang", "garbage"])
def test_camera_faults_show_the_fault_pattern_and_recover_by_themselves(build, sample_paths, mode, wait,
                                                                        notify_socket) -> None:
    FlakySource.opens = 0
    release = threading.Event()
    seen = []
    svc = build(lambda: FlakySource(mode, sample_paths[0], bad_opens=2, release=release),
                camera={"read_timeout_s": 0.3}, start=False)
    orig = svc.leds.show
    svc.leds.show = lambda p: (seen.append(p), orig(p))[1]
    svc.start()
    try:
        assert wait(lambda: svc.store.count() >= 1)
    finally:
        release.set()
    st = svc.status()
    assert st.faults == () and st.counts["camera_errors"] == 2
    assert Pattern(amber=BLINK, red=ALT) in seen  # the fault was shown on the LEDs
    assert svc.store.query()[0].name == "ok-3"  # the third open worked
    assert any(line.startswith("STATUS=FAULT camera") for line in notify_socket.lines())


def test_no_watchdog_while_the_camera_stays_dead(build, notify_socket, wait) -> None:
    def dead():
        raise CameraError("camera 0 not detected")

    svc = build(dead, trigger={"mode": "continuous"})
    assert wait(lambda: svc.status().counts["camera_errors"] >= 4)
    st = svc.status()
    assert st.faults[0].kind == "camera" and "not detected" in st.faults[0].message
    assert st.leds == Pattern(amber=BLINK, red=ALT)
    assert "WATCHDOG=1" not in notify_socket.lines()


def test_storage_faults_do_not_stop_classification(build, sample_paths, tmp_path, wait) -> None:
    svc = build(only(*sample_paths[:3], tmp=tmp_path))
    assert wait(lambda: svc.store.count() >= 1)
    blocker = sqlite3.connect(svc.store.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database
    try:
        base = svc.status().counts["fields"]
        assert wait(lambda: svc.status().counts["store_errors"] >= 2)
        st = svc.status()
        assert st.faults[0].kind == "storage" and "another process" in st.faults[0].message
        assert st.counts["fields"] > base  # still classifying (and showing) fields
        assert st.last.id is None  # ... that could not be recorded
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert wait(lambda: svc.status().faults == ())
    n = svc.store.count()
    assert wait(lambda: svc.store.count() > n)


def test_upload_is_classified_recorded_and_leaves_the_leds_alone(build, sample_paths, tmp_path, wait) -> None:
    svc = build(only(sample_paths[0], tmp=tmp_path), trigger={"mode": "button"})
    before = svc.pattern()
    r = svc.classify_upload(sample_paths[5].read_bytes(), "bench.jpg")
    assert r.id is not None and r.source == "upload" and r.slide_id is None and r.name == "bench.jpg"
    assert svc.store.get(r.id) == r and svc.pattern() == before
    assert svc.status().counts["uploads"] == 1 and svc.status().counts["frames"] == 0  # camera untouched
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), "white").save(buf, "PNG")
    blank = svc.classify_upload(buf.getvalue(), "white.png")
    assert blank.status == "retake" and "over-exposed" in blank.reason
    with pytest.raises(ImageError, match="bad.jpg"):
        svc.classify_upload(b"not an image", "bad.jpg")


def test_status_is_json_and_wait_for_change_wakes_on_new_results(build, sample_paths, tmp_path, wait) -> None:
    svc = build(only(*sample_paths[:2], tmp=tmp_path), trigger={"mode": "button"})
    st = json.loads(json.dumps(svc.status().to_json()))
    for key in ("ready", "faults", "model", "runtime", "delegate", "inference_ms", "fps", "uptime_s",
                "cpu_temp_c", "disk_free_bytes", "db_bytes", "fields", "slide", "last", "seq"):
        assert key in st, key
    assert st["ready"] is True and st["model"]["sha256"] == svc.bundle.model_sha256
    seq = st["seq"]
    assert svc.wait_for_change(seq, 0.05) == seq  # nothing happened
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(svc.wait_for_change(seq, 30)))
    t.start()
    svc.press()
    t.join(30)
    assert got and got[0] > seq
    assert wait(lambda: svc.status().last is not None)
    assert svc.status().last.slide_id == svc.status().slide.id


def test_make_leds_uses_the_configured_pins(make_config, mock_factory) -> None:
    cfg = make_config(gpio={"green": 5, "amber": 6, "red": 13, "button": 19, "buzzer": 26})
    leds = make_leds(cfg, make_pin_factory(True))
    try:
        leds.show(Pattern(green=ON, buzzer=ON))
        pf = leds.green.pin_factory
        assert bool(pf.pin(5).state) and bool(pf.pin(26).state) and not bool(pf.pin(13).state)
    finally:
        leds.close()


class GatedStore(ResultStore):
    """The real store, whose commits wait until the test opens the gate (a slow SD card, held still)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def record_batch(self, items):
        self.entered.set()
        self.gate.wait(30)
        self.batches.append(len(items))
        return super().record_batch(items)


def test_a_result_is_shown_only_after_its_commit_while_the_next_fields_are_classified(build, sample_paths,
                                                                                     tmp_path, wait) -> None:
    svc = build(only(*sample_paths[:6], tmp=tmp_path), store_cls=GatedStore)
    ready = svc.pattern()
    try:
        assert wait(lambda: svc.store.entered.is_set())
        # the first commit is held: the loop classifies the next fields meanwhile, up to MAX_UNCOMMITTED waiting
        assert wait(lambda: svc.status().inference_ms.n == MAX_UNCOMMITTED + 1)
        st = svc.status()
        assert st.last is None and st.counts["fields"] == 0 and svc.pattern() == ready  # nothing shown
        assert st.inference_ms.n == MAX_UNCOMMITTED + 1  # and no further: the model waits for the store
        assert st.counts["frames"] <= MAX_UNCOMMITTED + 2  # at most one more frame captured and prepared
    finally:
        svc.store.gate.set()
    assert wait(lambda: svc.store.count() >= 8)
    svc.stop()
    rows = svc.store.query(limit=100, newest_first=False)
    assert [r.name[3:] for r in rows[:6]] == [p.name for p in sample_paths[:6]]  # committed in capture order
    # the results that waited while the first commit was held (all the slots it left) went into the next one
    held, after = svc.store.batches[:2]  # the held batch has those handed over before the recorder woke: 1 or more
    assert after >= MAX_UNCOMMITTED - held and max(held, after) >= 2
    assert [r.time for r in rows] == sorted(r.time for r in rows)
    assert svc.status().last.id == rows[-1].id  # the page shows the last one committed


class BrokenOnceStore(ResultStore):
    """The real store with one bug armed: the next batch raises as a programming error would."""

    armed = False

    def record_batch(self, items):
        if self.armed:
            self.armed = False
            raise RuntimeError("a bug in the store")
        return super().record_batch(items)


def test_a_bug_in_the_store_fails_its_batch_and_the_uploader_hears_of_it(build, sample_paths, tmp_path) -> None:
    svc = build(only(sample_paths[0], tmp=tmp_path), trigger={"mode": "button"}, store_cls=BrokenOnceStore)
    svc.store.armed = True
    with pytest.raises(RuntimeError, match="a bug in the store"):
        svc.classify_upload(sample_paths[1].read_bytes(), "first.jpg")
    r = svc.classify_upload(sample_paths[2].read_bytes(), "second.jpg")  # the recorder goes on
    assert r.id is not None and [x.name for x in svc.store.query()] == ["second.jpg"]
    assert svc.running


def test_stopping_records_and_shows_every_field_already_classified(build, sample_paths, tmp_path, wait) -> None:
    svc = build(only(*sample_paths[:4], tmp=tmp_path), store_cls=GatedStore)
    assert wait(lambda: svc.status().inference_ms.n == MAX_UNCOMMITTED + 1)
    stopper = threading.Thread(target=svc.stop)
    stopper.start()
    svc.store.gate.set()
    stopper.join(30)
    assert not stopper.is_alive()
    st = svc.status()
    n = svc.store.count()
    assert n == st.counts["fields"] == st.inference_ms.n >= MAX_UNCOMMITTED + 1  # none lost
    assert st.counts["frames"] == n + st.counts["skipped"]  # every frame read was classified or skipped


class LoresSource:
    """A camera with a main stream (stored) and a model-size stream (classified), as picamera2 gives with lores."""

    kind = "lores"

    def __init__(self, main: np.ndarray, small: np.ndarray):
        self.main, self.small, self.i = main, small, 0

    def read(self) -> Frame:
        self.i += 1
        return Frame(self.main, f"f{self.i}", small=self.small)

    def close(self) -> None:
        pass


def test_the_small_stream_is_gated_and_classified_and_the_main_stream_stored(build, sample_paths, wait) -> None:
    main = np.asarray(Image.open(sample_paths[0]).convert("RGB").resize((640, 480)))
    blank = np.full((224, 224, 3), 252, np.uint8)  # an over-exposed small view of a good main frame
    svc = build(lambda: LoresSource(main, blank), trigger={"mode": "button"})
    svc.press()
    assert wait(lambda: svc.store.count() == 1)
    r = svc.store.query()[0]
    assert r.status == "retake" and "over-exposed" in r.reason  # the gate looked at the small stream
    with Image.open(svc.store.image_file(r)) as im:
        assert im.size == (640, 480)  # the record keeps the main stream


# -- the camera: back-off and the one thread per opened source ------------------------------------------------------


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    b = Backoff(first_s=0.5, max_s=5.0)
    assert [b.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.delay(10_000) == 5.0  # a camera dead for days: no overflow
    assert Backoff(first_s=3.0, max_s=3.0).delay(1) == 3.0


class ThreadedSource:
    """Notes the thread of every call, and hangs the reads while ``hang`` is set."""

    def __init__(self, frame: np.ndarray, log: list, hang: threading.Event, release: threading.Event):
        self.frame, self.log, self.hang, self.release = frame, log, hang, release
        log.append(("open", threading.current_thread()))

    def read(self) -> Frame:
        self.log.append(("read", threading.current_thread()))
        if self.hang.is_set():
            self.release.wait(30)
        return Frame(self.frame, "f")

    def close(self) -> None:
        self.log.append(("close", threading.current_thread()))


def test_camera_calls_run_on_one_thread_per_open_and_a_hung_read_is_abandoned(make_config, sample_paths) -> None:
    frame = np.asarray(Image.open(sample_paths[0]).convert("RGB"))
    calls: list = []
    hang, release = threading.Event(), threading.Event()
    cfg = make_config(camera={"read_timeout_s": 0.2, "retry_min_s": 0.01, "retry_max_s": 0.05})
    board = Board()
    alerts = Alerts(board, leds=None, notifier=Notifier(address=""), buzzer=False, summary=lambda: "ok")
    cam = Camera(lambda: ThreadedSource(frame, calls, hang, release), cfg.camera, board=board, alerts=alerts)
    try:
        assert all(cam.read() is not None for _ in range(5))
        first = {t for _, t in calls}
        assert len(first) == 1 and threading.current_thread() not in first  # open and reads: one camera thread
        hang.set()
        assert cam.read() is None  # timed out: a camera fault, the source closed on a fresh thread
        assert alerts.faults()[0].kind == "camera" and "did not return within 0.2 s" in alerts.faults()[0].message
        closer = calls[-1]
        assert closer[0] == "close" and closer[1] not in first
        hang.clear()
        assert wait_until(lambda: cam.read() is not None, 5)  # reopened after the back-off, on a new thread
        assert calls[-2][0] == "open" and calls[-2][1] not in first | {closer[1]}
        assert alerts.faults() == () and board.counts["camera_errors"] == 1
    finally:
        release.set()
        cam.close()


# -- the composition root: every failure closes what was made -------------------------------------------------------


class ClosingStore(ResultStore):
    closed = False

    def close(self) -> None:
        super().close()
        self.closed = True


class FailingStore(ClosingStore):
    def close_open_slides(self) -> list[str]:
        raise RuntimeError("the database vanished under the service")


def _parts(make_config, decisive_classifier, sample_paths, tmp_path, store_cls=ClosingStore, **sections):
    """build() arguments that keep hold of the store, LEDs and notifier it makes."""
    made: dict = {}

    def store(path, _cfg):
        made["store"] = store_cls(path, reserve_bytes=0)
        return made["store"]

    def leds(cfg, pins):
        made["leds"] = make_leds(cfg, pins, autostart=False)
        return made["leds"]

    cfg = make_config(trigger={"mode": "button"}, web={"token": "t0k3n"}, **sections)
    kw = dict(classifier=decisive_classifier, source=(only(sample_paths[0], tmp=tmp_path), "replay"), store=store,
              leds=leds, notifier=Notifier(address=""))
    return cfg, kw, made


def test_without_flask_the_loop_runs_without_a_page_and_closes_everything(make_config, decisive_classifier,
                                                                          sample_paths, tmp_path, monkeypatch) -> None:
    from device import app as app_mod

    monkeypatch.setitem(sys.modules, "flask", None)  # flask not installed: importing it fails
    assert app_mod.web_module() is None
    cfg, kw, made = _parts(make_config, decisive_classifier, sample_paths, tmp_path)
    app = build_app(cfg, **kw)
    try:
        assert app.web is None and app.service.running and app.service.status().ready
    finally:
        app.close()
    assert made["store"].closed and made["leds"].green.closed and not app.service.running


def test_a_page_module_that_fails_to_load_leaves_nothing_open(make_config, decisive_classifier, sample_paths,
                                                             tmp_path) -> None:
    def broken_web():
        raise ImportError("cannot import name 'create_app' from 'device.web' (a half-installed update)")

    cfg, kw, made = _parts(make_config, decisive_classifier, sample_paths, tmp_path)
    with pytest.raises(ImportError, match="half-installed"):
        build_app(cfg, web=broken_web, **kw)
    assert made["store"].closed and made["leds"].green.closed


def test_a_failure_during_start_closes_the_store_leds_and_notifier(make_config, decisive_classifier, sample_paths,
                                                                  tmp_path) -> None:
    cfg, kw, made = _parts(make_config, decisive_classifier, sample_paths, tmp_path, store_cls=FailingStore)
    closed: list[str] = []

    class Recording(Notifier):
        def close(self) -> None:
            closed.append("notifier")
            super().close()

    kw["notifier"] = Recording(address="")
    with pytest.raises(RuntimeError, match="vanished"):
        build_app(cfg, **kw)
    assert made["store"].closed and made["leds"].green.closed and closed == ["notifier"]
