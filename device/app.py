"""The composition root: the one place that chooses real or fake hardware.

config -> bundle -> classifier (warm) -> frame source -> store -> LEDs/button
-> screening loop -> web page (``device.web``, when present) -> ``READY=1``;
SIGTERM/SIGINT stop it in the reverse order.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import secrets
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device import config as config_mod
from device.config import Config, GpioConfig, Resolved, resolve
from device.errors import StoreError
from device.install import installed, verify_bundle
from device.leds import AlertInputs, LedDriver, Pattern, alert_state, make_pin_factory
from device.notify import Notifier
from device.pi_camera import Picamera2Source
from device.service import Service
from device.sources import FileSource, FrameSource, ReplaySource, SyntheticSource
from device.store import ResultStore, open_store

log = logging.getLogger(__name__)

TOKEN_FILE = "token"
#: On real GPIO, a service that cannot start shows the fault pattern this long, then exits non-zero; systemd
#: restarts it RestartSec later. Below the unit's TimeoutStartSec (180 s), and long enough that 5 attempts
#: do not hit its start limit (5 in 600 s), so the box retries for ever with the fault lit most of the time.
START_FAULT_HOLD_S = 120.0
#: The same with mock GPIO (a laptop, tests): nobody sees mock LEDs, so exit at once.
MOCK_FAULT_HOLD_S = 0.0


def source_factory(res: Resolved, model_size: int | None = None) -> tuple[Callable[[], FrameSource], str]:
    """A function that opens the configured frame source (called again after every camera fault).

    ``model_size``: the camera also streams the view at the model's input size (picamera2's lores stream),
    which the loop classifies while it stores the main stream.
    """
    cam = res.config.camera
    hold = cam.interval_ms / 1000.0
    if res.source == "picamera2":
        return (lambda: Picamera2Source(cam.size, lock_after_s=cam.lock_after_s, timeout_s=cam.read_timeout_s,
                                        lores=model_size), "camera")
    if res.source == "replay":
        return lambda: ReplaySource(res.replay_dir, loop=cam.loop, hold_s=hold), "replay"
    if res.source == "files":
        return lambda: FileSource(res.files, loop=cam.loop, hold_s=hold), "files"
    if res.source == "synthetic":
        return lambda: SyntheticSource(cam.size, seed=cam.seed, hold_s=hold), "synthetic"
    raise ValueError(f"unknown source {res.source}")


def ensure_token(state_dir: Path, configured: str) -> str:
    """The page's access token: the configured one, else one generated once and kept in the state dir."""
    if configured:
        return configured
    path = state_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the page token ({exc.strerror}); check the state folder") from exc
    token = secrets.token_urlsafe(24)
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"{path}: cannot save the page token ({exc.strerror}); check the state folder") from exc
    log.info("generated a new page token in %s", path)
    return token


def make_leds(cfg: Config, mock: bool) -> LedDriver:
    g = cfg.gpio
    return LedDriver(green=g.green, amber=g.amber, red=g.red, button=g.button, buzzer=g.buzzer or None,
                     pin_factory=make_pin_factory(mock), blink_s=cfg.alerts.blink_s, long_press_s=g.long_press_s,
                     bounce_s=g.bounce_ms / 1000.0 or None)


def fault_pattern() -> Pattern:
    """What the LEDs show for a fault (the same pattern as a camera or storage fault while running)."""
    return alert_state(AlertInputs(ready=False, fault=True))


def show_start_fault(config_path: str | Path | None, exc: BaseException, *, on_pi: bool | None = None,
                     hold_s: float | None = None, pin_factory: Any = None, stop: threading.Event | None = None,
                     notifier: Notifier | None = None) -> Pattern | None:
    """The service cannot start (``exc``): light the fault pattern, tell systemd, wait, then return.

    The pins come from the config's ``[gpio]`` (even when another section is refused); a file that is
    not TOML, or a bad ``[gpio]``, leaves the LEDs dark rather than drive guessed pins. ``hold_s`` (default
    :data:`START_FAULT_HOLD_S` on real GPIO, :data:`MOCK_FAULT_HOLD_S` with mock GPIO) ends early on
    SIGTERM/SIGINT. Returns the pattern shown, or None.
    """
    notifier = notifier or Notifier()
    notifier.status(f"FAULT: cannot start: {exc}")
    gpio: GpioConfig | None
    try:
        cfg = config_mod.load(config_path)
        gpio, blink_s = cfg.gpio, cfg.alerts.blink_s
    except Exception:
        gpio, blink_s = config_mod.load_gpio(config_path), config_mod.AlertsConfig().blink_s
    if gpio is None:
        log.warning("the LEDs cannot show the fault: the pins are unknown until %s is fixed", config_path)
        return None
    on_pi = config_mod.is_raspberry_pi() if on_pi is None else on_pi
    mock = {"auto": not on_pi, "yes": True, "no": False}[gpio.mock]
    if hold_s is None:
        hold_s = MOCK_FAULT_HOLD_S if mock else START_FAULT_HOLD_S
    if hold_s <= 0:
        return None
    try:
        leds = LedDriver(green=gpio.green, amber=gpio.amber, red=gpio.red, button=None,
                         buzzer=gpio.buzzer or None, blink_s=blink_s,
                         pin_factory=pin_factory if pin_factory is not None else make_pin_factory(mock))
    except Exception as led_exc:  # GPIO busy or missing: the message and the exit code still tell
        log.warning("the LEDs cannot show the fault: %s", led_exc)
        return None
    pattern = fault_pattern()
    stop = stop or threading.Event()
    old: dict = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        leds.show(pattern)
        log.error("cannot start; the LEDs show the fault pattern (amber blinking, red alternating) for %g s, "
                  "then the service exits and systemd retries", hold_s)
        stop.wait(hold_s)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        leds.close()
    return pattern


def web_module() -> Any | None:
    """``device.web`` if it is installed (the page is optional for the loop)."""
    if importlib.util.find_spec("device.web") is None:
        return None
    return importlib.import_module("device.web")


@dataclass
class App:
    service: Service
    store: ResultStore
    leds: LedDriver | None
    notifier: Notifier
    web_stop: Callable[[], None] | None = None
    web_url: str | None = None

    def close(self) -> None:
        self.notifier.stopping("stopping")
        if self.web_stop is not None:
            try:
                self.web_stop()
            except Exception as exc:
                log.warning("stopping the web page: %s", exc)
        self.service.stop()
        if self.leds is not None:
            self.leds.close()
        self.store.close()
        self.notifier.close()


def _stopper(handle: Any) -> Callable[[], None] | None:
    if handle is None:
        return None
    if callable(handle):
        return handle
    for name in ("stop", "shutdown", "close"):
        fn = getattr(handle, name, None)
        if callable(fn):
            return fn
    return None


def build(cfg: Config, *, on_pi: bool | None = None, notifier: Notifier | None = None, web: bool = True) -> App:
    """Assemble and start everything; raises ScreenError subclasses on anything that prevents a start."""
    res = resolve(cfg, on_pi=on_pi)
    notifier = notifier or Notifier()
    notifier.status("loading the model")
    v = verify_bundle(res.model_dir, res.keys_dir, require_signature=cfg.model.require_signature,
                      threads=cfg.model.threads, use_edgetpu=cfg.model.use_edgetpu, references=False,
                      rbc_diameter_px=cfg.camera.rbc_diameter_px)
    bundle, classifier = v.bundle, v.classifier
    log.info("bundle %s (%s) from %s, %s; model on %s, %s", bundle.id, bundle.name, res.model_dir,
             v.signed.describe() if v.signed else "NOT signature-checked", classifier.model.delegate,
             classifier.model.runtime)
    store = open_store(res.state_dir, cfg.store)
    leds = None
    try:
        token = ensure_token(res.state_dir, cfg.web.token)
        leds = make_leds(cfg, res.mock_gpio)
        factory, kind = source_factory(res, model_size=bundle.input.size)
        service = Service(cfg, bundle=bundle, classifier=classifier, store=store, source_factory=factory,
                          source_kind=kind, leds=leds, notifier=notifier, token=token, state_dir=res.state_dir,
                          installed=installed(res.bundles_dir, res.factory_dir))
        leds.on_short, leds.on_long = service.press, service.long_press
        service.start()
    except BaseException:
        if leds is not None:
            leds.close()
        store.close()
        raise
    app = App(service, store, leds, notifier)
    if web and cfg.web.enabled:
        mod = web_module()
        if mod is None:
            log.info("no web page: device.web is not installed")
        else:
            try:
                handle = mod.serve(service, cfg.web.host, cfg.web.port)
                app.web_stop = _stopper(handle)
                app.web_url = getattr(handle, "url", None) or f"http://{cfg.web.host}:{cfg.web.port}/"
                log.info("status page on %s (token in %s)", app.web_url,
                         res.state_dir / TOKEN_FILE if not cfg.web.token else "the config")
            except Exception as exc:  # port in use, bad host: the loop and LEDs still work
                log.error("the web page could not start on %s:%d: %s", cfg.web.host, cfg.web.port, exc)
                service.report_fault("web", f"page could not start on {cfg.web.host}:{cfg.web.port}: {exc}")
    log.info("ready: %s source, %s trigger, state in %s, GPIO %s", kind, cfg.trigger.mode, res.state_dir,
             "mock" if res.mock_gpio else "real")
    notifier.ready(f"screening ({kind} source, model {bundle.name})")
    return app


def run(cfg: Config, *, on_pi: bool | None = None) -> int:
    """``python -m device run``: start, then wait for SIGTERM/SIGINT."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        app = build(cfg, on_pi=on_pi)
        try:
            while not stop.wait(1.0):
                pass
        finally:
            app.close()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    log.info("stopped")
    return 0
