"""The composition root: the one place that chooses real or fake hardware.

config -> bundle -> classifier (warm) -> store -> LEDs/button -> frame source
-> screening loop -> web page (``device.web``, when flask is installed) -> ``READY=1``;
SIGTERM/SIGINT stop it in the reverse order, and so does a failure on the way.

:func:`build` takes the parts as injectable factories, so the bench and the tests assemble the service
the way ``python -m device run`` does, with their own classifier, store, frame source or pins.

Threads: ``build``, ``App.close``, ``run`` and ``show_start_fault`` run on the main thread (``run`` and
``show_start_fault`` take SIGTERM/SIGINT there); the button's callbacks, wired here to ``Service.press`` and
``Service.long_press``, arrive on gpiozero's thread.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device import config as config_mod
from device.classifier import Classifier
from device.config import Config, GpioConfig, Resolved, StoreConfig, resolve
from device.errors import StoreError
from device.install import Verified, installed, verify_bundle
from device.leds import AlertInputs, LedDriver, Pattern, alert_state, make_pin_factory
from device.notify import Notifier
from device.pi_camera import Picamera2Source
from device.priority import use_split
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
#: What the page needs besides ``device.web`` itself; without them the loop and the LEDs run, with no page.
WEB_LIBRARIES = ("flask", "waitress")


def configured_source(res: Resolved, model_size: int | None = None) -> tuple[Callable[[], FrameSource], str]:
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


def open_bundle(cfg: Config, res: Resolved) -> Verified:
    """The configured bundle, verified (signature, hashes, model) and opened: what ``run`` and ``classify`` use.

    The signature is checked in a child process, so the service never holds ``cryptography`` in memory.
    """
    return verify_bundle(res.model_dir, res.keys_dir, require_signature=cfg.model.require_signature,
                         threads=cfg.model.threads, use_edgetpu=cfg.model.use_edgetpu,
                         references=False, rbc_diameter_px=cfg.camera.rbc_diameter_px, signature_apart=True,
                         pin_cores=cfg.model.pin_cores)


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


def make_leds(cfg: Config, pin_factory: Any, *, driver: type[LedDriver] = LedDriver,
              autostart: bool = True) -> LedDriver:
    """The configured LEDs, buzzer and button on ``pin_factory`` (what :func:`build` passes: MockFactory or real)."""
    g = cfg.gpio
    return driver(green=g.green, amber=g.amber, red=g.red, button=g.button, buzzer=g.buzzer or None,
                  pin_factory=pin_factory, blink_s=cfg.alerts.blink_s, long_press_s=g.long_press_s,
                  bounce_s=g.bounce_ms / 1000.0 or None, autostart=autostart)


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
    mock = resolve(Config(gpio=gpio), on_pi=on_pi).mock_gpio  # the choice build() makes, from [gpio] alone
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
    """``device.web``, or None when the libraries it needs are not installed (the page is optional)."""
    for name in WEB_LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("no %s: the web page cannot run", name)
            return None
    return importlib.import_module("device.web")


@dataclass
class App:
    """The running appliance's parts; :meth:`close` stops them in the reverse order of :func:`build`."""

    service: Service
    store: ResultStore
    leds: LedDriver | None
    notifier: Notifier
    web: Any = None  # the page's server (``device.web.serve``), with ``close()``

    def close(self) -> None:
        self.notifier.stopping("stopping")
        with ExitStack() as stack:  # each one closes even if one before it fails
            stack.callback(use_split, None)
            stack.callback(self.notifier.close)
            stack.callback(self.store.close)
            if self.leds is not None:
                stack.callback(self.leds.close)
            stack.callback(self.service.stop)
            if self.web is not None:
                stack.callback(self._close_web)

    def _close_web(self) -> None:
        try:
            self.web.close()
        except Exception as exc:
            log.warning("stopping the web page: %s", exc)


StoreFactory = Callable[[Path, StoreConfig], ResultStore]
#: A function that opens the frame source (None: no camera, uploads only) and the source's kind.
Source = tuple[Callable[[], FrameSource] | None, str]
LedFactory = Callable[[Config, Any], LedDriver | None]


def build(cfg: Config, *, on_pi: bool | None = None, notifier: Notifier | None = None,
          classifier: Classifier | None = None, store: StoreFactory = open_store, source: Source | None = None,
          pin_factory: Any = None, leds: LedFactory = make_leds,
          web: Callable[[], Any | None] | None = web_module, clock: Callable[[], float] = time.monotonic,
          start: bool = True) -> App:
    """Assemble and start everything; raises ScreenError subclasses on anything that prevents a start.

    Every part can be given instead of made from the config: ``classifier`` (opened already: its bundle runs,
    shown as the factory one), ``store(state_dir, cfg.store)``, ``source`` (the function that opens the frame
    source, or None for uploads only; and its kind), ``pin_factory`` (default: gpiozero's MockFactory or the
    real pins, as ``[gpio] mock`` says on this machine) and ``leds(cfg, pin_factory)``, ``notifier``, ``web``
    (a function giving the page's module, or None for no page). ``start=False`` wires everything but leaves
    ``app.service.start()`` to the caller. On any failure whatever was made is closed again before the error
    goes up.
    """
    res = resolve(cfg, on_pi=on_pi)
    notifier = notifier or Notifier()
    with ExitStack() as undo:
        undo.callback(notifier.close)
        notifier.status("loading the model")
        panel = None
        if classifier is None:
            v = open_bundle(cfg, res)
            classifier, panel = v.classifier, installed(res.bundles_dir, res.factory_dir)
            log.info("bundle %s (%s) from %s, %s; model on %s, %s", v.bundle.id, v.bundle.name, res.model_dir,
                     v.signed.describe() if v.signed else "NOT signature-checked", classifier.model.delegate,
                     classifier.model.runtime)
        bundle = classifier.bundle
        use_split(classifier.model.cores)  # the helper threads started from here on keep off the model's cores
        undo.callback(use_split, None)
        app_store = store(res.state_dir, cfg.store)
        undo.callback(app_store.close)
        token = ensure_token(res.state_dir, cfg.web.token)
        app_leds = leds(cfg, pin_factory if pin_factory is not None else make_pin_factory(res.mock_gpio))
        if app_leds is not None:
            undo.callback(app_leds.close)
        source_factory, kind = source or configured_source(res, model_size=bundle.input.size)
        service = Service(cfg, classifier=classifier, store=app_store, source_factory=source_factory,
                          source_kind=kind, leds=app_leds, notifier=notifier, token=token, state_dir=res.state_dir,
                          clock=clock, installed=panel)
        undo.callback(service.stop)
        if app_leds is not None:
            app_leds.on_short, app_leds.on_long = service.press, service.long_press
        app = App(service, app_store, app_leds, notifier)
        if start:
            service.start()
        if web is not None and cfg.web.enabled:
            app.web = _serve_page(web, service, cfg, res)
        undo.pop_all()  # from here the App closes them
    if start:
        log.info("ready: %s source, %s trigger, state in %s, GPIO %s", kind, cfg.trigger.mode, res.state_dir,
                 "mock" if res.mock_gpio else "real")
        notifier.ready(f"screening ({kind} source, model {bundle.name})")
    return app


def _serve_page(web: Callable[[], Any | None], service: Service, cfg: Config, res: Resolved) -> Any:
    """The page's server, or None: not installed, or it could not start (a fault; the loop and LEDs go on)."""
    mod = web()
    if mod is None:
        log.info("no web page: device.web is not installed")
        return None
    try:
        handle = mod.serve(service, cfg.web.host, cfg.web.port)
    except Exception as exc:  # port in use, bad host: the loop and LEDs still work
        log.error("the web page could not start on %s:%d: %s", cfg.web.host, cfg.web.port, exc)
        service.report_fault("web", f"page could not start on {cfg.web.host}:{cfg.web.port}: {exc}")
        return None
    url = getattr(handle, "url", None) or f"http://{cfg.web.host}:{cfg.web.port}/"
    log.info("status page on %s (token in %s)", url, res.state_dir / TOKEN_FILE if not cfg.web.token else "the config")
    return handle


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
