"""The appliance's settings: TOML (stdlib ``tomllib``) into frozen dataclasses.

Every key is declared here with its type, default and allowed values, so a
typo or an out-of-range number is refused at start-up with the dotted key,
the bad value and what is allowed, instead of being silently ignored on a
machine with no screen (the checking is :mod:`device.typedtoml`). ``python -m device check-config``
prints the result.

Relative paths in a config file are resolved against the LeukoScreen
checkout (the folder holding ``device/``), so ``make run``, the systemd unit
and the tests see the same files whatever the working directory is.

``"auto"`` (camera source, GPIO mock) means: picamera2 and real GPIO on a
Raspberry Pi (detected from ``/proc/device-tree/model``), the sample replay
and gpiozero's ``MockFactory`` everywhere else.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.bundles_dir import active_bundle
from device.errors import ConfigError
from device.quality import QualityThresholds
from device.slides import SlideRules
from device.typedtoml import choices, dump, read_table, value_range

log = logging.getLogger(__name__)

#: The checkout: the folder that holds ``device/`` (and ``models/``).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = PACKAGE_DIR / "config" / "default.toml"
PI_MODEL_FILE = Path("/proc/device-tree/model")

CAMERA_SOURCES = ("auto", "picamera2", "replay", "files", "synthetic")
TRIGGER_MODES = ("continuous", "button")
MOCK_CHOICES = ("auto", "yes", "no")


def _pin(default: int, *, none: bool = False) -> Any:
    """A BCM pin from 2 to 27 (0 and 1 are the HAT EEPROM bus); ``none``: 0 means not wired."""
    return field(default=default, metadata=value_range(0 if none else 2, 27))


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: which bundle to load and how to run it."""

    #: The factory bundle: used until ``python -m device install-bundle`` has installed one.
    dir: Path = Path("models")
    #: TFLite CPU threads; 0 = the cores but one, 1 to 4 (``device.inference.interpreter_threads``).
    threads: int = field(default=0, metadata=value_range(0, 16))
    #: With a core left over, keep the interpreter's threads and the helpers on cores of their own
    #: (``device.priority``).
    pin_cores: bool = True
    use_edgetpu: bool = True
    #: Installed bundles and the ``active``/``previous`` pointers. "" = ``bundles`` in the state dir.
    bundles_dir: Path | None = None
    #: Trusted public keys (``*.pub``). "" = ``$CONFIGURATION_DIRECTORY/keys`` under systemd
    #: (/etc/leukoscreen/keys), else ``device/config/keys`` in the checkout.
    keys_dir: Path | None = None
    #: Refuse to start on a bundle without a valid signature from a trusted key. ``install-bundle`` always
    #: requires one; false is for development only.
    require_signature: bool = True


@dataclass(frozen=True)
class CameraConfig:
    """``[camera]``: where frames come from."""

    source: str = field(default="auto", metadata=choices(*CAMERA_SOURCES))
    replay_dir: Path = Path("device/samples")
    files: tuple[Path, ...] = ()
    #: Replay/files: start again after the last image (false: stop capturing, uploads still work).
    loop: bool = True
    #: Camera stream size (width, height); the lit field in it (the eyepiece disc) is what is classified.
    size: tuple[int, int] = field(default=(1014, 760), metadata=value_range(64, 8192))
    #: Replay/files/synthetic only: how long each image stays "in view" (a still field that the loop's change
    #: detection skips) before the next one, like a technician moving the slide. A camera paces itself.
    interval_ms: int = field(default=3000, metadata=value_range(0, 600_000))
    #: Auto exposure / white balance run this long after start, then are locked.
    lock_after_s: float = field(default=2.0, metadata=value_range(0.0, 60.0))
    #: A read that takes longer than this is a hung camera (fault, retry).
    read_timeout_s: float = field(default=5.0, metadata=value_range(0.1, 120.0))
    #: Back-off between reconnect attempts after a camera fault: starts here, doubles, capped.
    retry_min_s: float = field(default=1.0, metadata=value_range(0.01, 600.0))
    retry_max_s: float = field(default=30.0, metadata=value_range(0.01, 3600.0))
    #: Red-cell diameter in camera pixels (from the fields' texture scale), by ``python -m device calibrate``;
    #: 0 = uncalibrated (the lit field's bounding square is taken as the training field of view).
    rbc_diameter_px: float = field(default=0.0, metadata=value_range(0.0, 10000.0))
    #: Synthetic source only: the seed of its deterministic frames.
    seed: int = field(default=0, metadata=value_range(0, None))


@dataclass(frozen=True)
class TriggerConfig:
    """``[trigger]``: when a field is classified."""

    mode: str = field(default="continuous", metadata=choices(*TRIGGER_MODES))
    #: Continuous mode: a field is classified at most this often.
    interval_ms: int = field(default=1000, metadata=value_range(0, 600_000))
    #: Continuous mode: mean absolute change (0..255, grey 32x32 thumbnail) below which a frame
    #: counts as the same field and is skipped.
    change_threshold: float = field(default=3.0, metadata=value_range(0.0, 255.0))


@dataclass(frozen=True)
class GpioConfig:
    """``[gpio]``: BCM pin numbers 2..27 (0 and 1 are the HAT EEPROM bus); buzzer 0 = none."""

    green: int = _pin(17)
    amber: int = _pin(27)
    red: int = _pin(22)
    button: int = _pin(23)
    buzzer: int = _pin(0, none=True)
    #: "auto": real pins on a Pi, gpiozero's MockFactory elsewhere; "yes": always mock; "no": never.
    mock: str = field(default="auto", metadata=choices(*MOCK_CHOICES))
    #: Holding the button this long (then releasing) starts/ends a slide.
    long_press_s: float = field(default=2.0, metadata=value_range(0.2, 30.0))
    #: Button debounce.
    bounce_ms: int = field(default=30, metadata=value_range(0, 1000))


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where results are kept."""

    #: "" = $STATE_DIRECTORY under systemd, else ./state in the checkout.
    state_dir: Path | None = None
    #: Frame JPEGs are pruned, oldest first, to stay under this; records are never pruned.
    image_budget_mb: int = field(default=2048, metadata=value_range(0, 1_000_000))
    #: Below this much free disk no more JPEGs are written (records still are).
    reserve_mb: int = field(default=200, metadata=value_range(0, 1_000_000))
    jpeg_quality: int = field(default=90, metadata=value_range(30, 100))
    save_images: bool = True


@dataclass(frozen=True)
class WebConfig:
    """``[web]``: the local status page."""

    host: str = "127.0.0.1"
    #: 0 picks a free port (tests).
    port: int = field(default=8080, metadata=value_range(0, 65535))
    #: "" = generate one on first start and keep it in the state dir (file ``token``).
    token: str = ""
    max_upload_mb: int = field(default=10, metadata=value_range(1, 200))
    enabled: bool = True
    #: Extra host names the page may be reached by (e.g. "leukoscreen.clinic.lan"). IP addresses, localhost
    #: and this machine's own name (plain or .local) always work; any other Host header is refused
    #: (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class AlertsConfig:
    """``[alerts]``: slide verdict rules (defaults: :class:`device.slides.SlideRules`) and the alarm."""

    #: A slide is called ALL once ALL is confidently seen in this many fields.
    all_fields: int = field(default=SlideRules.all_fields, metadata=value_range(1, 1000))
    #: A slide is called benign after this many confident benign fields and no ALL.
    benign_fields: int = field(default=SlideRules.benign_fields, metadata=value_range(1, 10000))
    #: The ALL subtype is reported when this share of the ALL fields agree on it.
    subtype_agreement: float = field(default=SlideRules.subtype_agreement, metadata=value_range(0.0, 1.0))
    #: The slide is referred when this share of its classified fields were referred.
    refer_fraction: float = field(default=SlideRules.refer_fraction, metadata=value_range(0.0, 1.0))
    #: Sound the buzzer (when wired) while an ALL alarm is unacknowledged.
    buzzer: bool = True
    #: Half-period of the blinking patterns.
    blink_s: float = field(default=0.4, metadata=value_range(0.05, 5.0))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    camera: CameraConfig = CameraConfig()
    trigger: TriggerConfig = TriggerConfig()
    quality: QualityThresholds = QualityThresholds()
    gpio: GpioConfig = GpioConfig()
    store: StoreConfig = StoreConfig()
    web: WebConfig = WebConfig()
    alerts: AlertsConfig = AlertsConfig()
    #: The file it came from (None: built-in defaults).
    path: Path | None = field(default=None, compare=False)


SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(Config).items() if name != "path"}


# -- parsing ---------------------------------------------------------------------------------------------


def parse(doc: dict, where: str = "<config>") -> Config:
    """A parsed TOML document into a :class:`Config`; every problem is a :class:`ConfigError`."""
    sections = {}
    for name, table in doc.items():
        if name not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{name}]; sections are "
                              f"{', '.join('[' + s + ']' for s in SECTIONS)}")
        sections[name] = read_table(where, name, SECTIONS[name], table)
    cfg = Config(**sections)
    _cross_checks(cfg, where)
    return cfg


def _cross_checks(cfg: Config, where: str) -> None:
    g = cfg.gpio
    if g.buzzer == 1:
        raise ConfigError(f"{where}: gpio.buzzer = 1 is not allowed; use 0 (no buzzer) or a BCM pin from 2 to 27 "
                          "(0 and 1 are the HAT EEPROM bus)")
    pins = {"gpio.green": g.green, "gpio.amber": g.amber, "gpio.red": g.red, "gpio.button": g.button}
    if g.buzzer:
        pins["gpio.buzzer"] = g.buzzer
    seen: dict[int, str] = {}
    for key, pin in pins.items():
        if pin in seen:
            raise ConfigError(f"{where}: {key} = {pin} is already used by {seen[pin]}; give each device its own pin")
        seen[pin] = key
    if cfg.camera.retry_max_s < cfg.camera.retry_min_s:
        raise ConfigError(f"{where}: camera.retry_max_s = {cfg.camera.retry_max_s} is below camera.retry_min_s = "
                          f"{cfg.camera.retry_min_s}; use a value >= {cfg.camera.retry_min_s}")
    if cfg.camera.source == "files" and not cfg.camera.files:
        raise ConfigError(f"{where}: camera.source = 'files' needs camera.files = [\"a.jpg\", ...]; "
                          "list the images to classify")


def load(path: str | Path | None = None) -> Config:
    """Read a TOML file (``None``: the built-in defaults, no file)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found; check --config or copy "
                          f"{DEFAULT_CONFIG.relative_to(PROJECT_ROOT)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax") from exc
    return dataclasses.replace(parse(doc, str(path)), path=path)


def load_gpio(path: str | Path | None) -> GpioConfig | None:
    """Only ``[gpio]`` of a config file that may be refused elsewhere: the pins to show a start-up fault on.

    None when the file cannot be read or is not TOML, or when ``[gpio]`` itself is bad: the pins are then
    unknown, and driving a guessed pin could fight whatever is wired to it.
    """
    if path is None:
        return GpioConfig()
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    try:
        gpio = read_table(str(path), "gpio", GpioConfig, doc.get("gpio", {}))
        _cross_checks(Config(gpio=gpio), str(path))
    except ConfigError:
        return None
    return gpio


# -- resolving "auto" and paths ---------------------------------------------------------------------------


def is_raspberry_pi(model_file: Path = PI_MODEL_FILE) -> bool:
    """True on a Raspberry Pi (the device tree names the board)."""
    try:
        return "raspberry pi" in model_file.read_bytes().decode("ascii", "ignore").lower()
    except OSError:
        return False


def resolve_path(p: Path, root: Path = PROJECT_ROOT) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else root / p


def default_state_dir(env: dict[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` (systemd's StateDirectory=, first entry) or ``./state`` in the checkout."""
    env = os.environ if env is None else env
    sd = env.get("STATE_DIRECTORY", "")
    if sd:
        return Path(sd.split(":")[0])
    return PROJECT_ROOT / "state"


def default_keys_dir(env: dict[str, str] | None = None) -> Path:
    """``$CONFIGURATION_DIRECTORY/keys`` (systemd's ConfigurationDirectory=: /etc/leukoscreen/keys), else the
    checkout's ``device/config/keys`` (the project's public signing key)."""
    env = os.environ if env is None else env
    cd = env.get("CONFIGURATION_DIRECTORY", "")
    if cd:
        return Path(cd.split(":")[0]) / "keys"
    return PACKAGE_DIR / "config" / "keys"


@dataclass(frozen=True)
class Resolved:
    """The concrete choices made from a config on this machine."""

    config: Config
    on_pi: bool
    source: str  # "picamera2" | "replay" | "files" | "synthetic"
    mock_gpio: bool
    model_dir: Path  # the bundle to run: the installed active one, else [model] dir
    factory_dir: Path  # [model] dir
    bundles_dir: Path
    keys_dir: Path
    replay_dir: Path
    files: tuple[Path, ...]
    state_dir: Path


def resolve(cfg: Config, *, on_pi: bool | None = None, env: dict[str, str] | None = None) -> Resolved:
    """Decide ``auto`` values and make every path absolute."""
    on_pi = is_raspberry_pi() if on_pi is None else on_pi
    source = cfg.camera.source
    if source == "auto":
        source = "picamera2" if on_pi else "replay"
    mock = {"auto": not on_pi, "yes": True, "no": False}[cfg.gpio.mock]
    state = resolve_path(cfg.store.state_dir) if cfg.store.state_dir is not None else default_state_dir(env)
    factory = resolve_path(cfg.model.dir)
    bundles = resolve_path(cfg.model.bundles_dir) if cfg.model.bundles_dir is not None else state / "bundles"
    keys = resolve_path(cfg.model.keys_dir) if cfg.model.keys_dir is not None else default_keys_dir(env)
    return Resolved(config=cfg, on_pi=on_pi, source=source, mock_gpio=mock,
                    model_dir=active_bundle(bundles) or factory, factory_dir=factory, bundles_dir=bundles,
                    keys_dir=keys, replay_dir=resolve_path(cfg.camera.replay_dir),
                    files=tuple(resolve_path(f) for f in cfg.camera.files), state_dir=state)


def to_toml(cfg: Config) -> str:
    """The effective config as TOML (what ``check-config`` prints)."""
    return dump({name: getattr(cfg, name) for name in SECTIONS})
