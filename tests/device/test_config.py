"""Config: TOML into frozen dataclasses; every bad key or value is refused with the key and what is allowed."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from device import config as c
from device.errors import ConfigError


def parse(text: str) -> c.Config:
    return c.parse(tomllib.loads(text), "test.toml")


def test_shipped_default_toml_is_exactly_the_builtin_defaults() -> None:
    cfg = c.load(c.DEFAULT_CONFIG)
    assert dataclasses.replace(cfg, path=None) == c.Config()
    assert cfg.path == c.DEFAULT_CONFIG


def test_every_key_is_documented_in_default_toml() -> None:
    doc = tomllib.loads(c.DEFAULT_CONFIG.read_text())
    for name, cls in c.SECTIONS.items():
        assert set(doc[name]) == {f.name for f in dataclasses.fields(cls)}, name


def test_laptop_toml_parses() -> None:
    cfg = c.load(c.PACKAGE_DIR / "config" / "laptop.toml")
    assert cfg.camera.source == "replay" and cfg.gpio.mock == "yes"


def test_effective_toml_round_trips() -> None:
    cfg = parse('[camera]\nsource = "files"\nfiles = ["a.jpg", "b.png"]\nsize = [640, 480]\n[store]\nstate_dir = "/x"')
    assert c.parse(tomllib.loads(c.to_toml(cfg))) == cfg


def test_interpreter_threads_default_to_the_cores_but_one() -> None:
    """``[model] threads = 0`` (the default) leaves a core to the loop's other stages and the page (issue 13)."""
    from device.inference import interpreter_threads

    assert c.Config().model.threads == 0
    assert [interpreter_threads(0, cores=n) for n in (1, 2, 3, 4, 8)] == [1, 1, 2, 3, 4]
    assert interpreter_threads(2, cores=2) == 2 and interpreter_threads(6, cores=4) == 6  # as configured
    assert 1 <= interpreter_threads() <= 4
    assert parse("[model]\nthreads = 3").model.threads == 3
    with pytest.raises(ConfigError, match="model.threads = -1"):
        parse("[model]\nthreads = -1")


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.Config().model.threads = 3  # type: ignore[misc]


@pytest.mark.parametrize("text, expected", [
    ("[camera]\nsorce = \"replay\"", ["camera.sorce", "accepts", "source", "replay_dir"]),
    ("[cameras]\nsource = \"replay\"", ["[cameras]", "[camera]", "[trigger]"]),
    ("[camera]\nsource = \"usb\"", ["camera.source = 'usb'", "'auto'", "'picamera2'", "'replay'", "'files'",
                                   "'synthetic'"]),
    ("[trigger]\nmode = \"sometimes\"", ["trigger.mode = 'sometimes'", "'continuous'", "'button'"]),
    ("[trigger]\ninterval_ms = \"100\"", ["trigger.interval_ms = '100'", "an integer from 0 to 600000"]),
    ("[trigger]\ninterval_ms = -5", ["trigger.interval_ms = -5", "from 0 to 600000"]),
    ("[model]\nthreads = 1.5", ["model.threads = 1.5", "an integer"]),
    ("[model]\nuse_edgetpu = \"yes\"", ["model.use_edgetpu = 'yes'", "true or false"]),
    ("[gpio]\ngreen = 99", ["gpio.green = 99", "an integer from 2 to 27"]),
    ("[gpio]\nbuzzer = 1", ["gpio.buzzer = 1", "0 (no buzzer)"]),
    ("[gpio]\nmock = true", ["gpio.mock = True", "'auto', 'yes', 'no'"]),
    ("[quality]\nmax_clipped = 2.0", ["quality.max_clipped = 2.0", "from 0.0 to 1.0"]),
    ("[quality]\nmin_brightness = 200.0\nmax_brightness = 100.0", ["min_brightness", "max_brightness"]),
    ("[camera]\nsize = [640]", ["camera.size = [640]", "a list of 2 integers"]),
    ("[camera]\nsize = [10, 480]", ["camera.size = [10, 480]", "from 64 to 8192"]),
    ("[web]\nport = 70000", ["web.port = 70000", "from 0 to 65535"]),
    ("[gpio]\ngreen = 22\nred = 22", ["gpio.red = 22", "gpio.green"]),
    ("[camera]\nsource = \"files\"", ["camera.files"]),
    ("[camera]\nretry_min_s = 5.0\nretry_max_s = 1.0", ["camera.retry_max_s = 1.0", "retry_min_s"]),
    ("camera = 3", ["'camera' must be a table"]),
    ("[web]\nallowed_hosts = \"box.lan\"", ["web.allowed_hosts = 'box.lan'", "a list of host names"]),
    ("[web]\nallowed_hosts = [\"http://box.lan\"]", ["web.allowed_hosts", "no scheme, port or wildcard"]),
    ("[web]\nallowed_hosts = [\"box.lan:8080\"]", ["web.allowed_hosts", "no scheme, port or wildcard"]),
    ("[web]\nallowed_hosts = [\"*.lan\"]", ["web.allowed_hosts", "a list of host names"]),
    ("[web]\nallowed_hosts = [\"\"]", ["web.allowed_hosts", "a list of host names"]),
    ("[web]\nallowed_hosts = [\"two words\"]", ["web.allowed_hosts", "a list of host names"]),
    ("[web]\nallowed_hosts = [8080]", ["web.allowed_hosts = [8080]", "a list of host names"]),
])
def test_bad_config_names_key_value_and_allowed(text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse(text)
    msg = str(err.value)
    assert msg.startswith("test.toml: ")
    for part in expected:
        assert part in msg, (part, msg)


def test_ints_are_accepted_for_floats_and_empty_state_dir_means_default() -> None:
    cfg = parse("[quality]\nmin_sharpness = 25\n[store]\nstate_dir = \"\"")
    assert cfg.quality.min_sharpness == 25.0 and isinstance(cfg.quality.min_sharpness, float)
    assert cfg.store.state_dir is None


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        c.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[camera\nsource = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        c.load(bad)


def test_auto_means_camera_and_real_gpio_on_a_pi_only() -> None:
    cfg = c.Config()
    pi = c.resolve(cfg, on_pi=True, env={})
    laptop = c.resolve(cfg, on_pi=False, env={})
    assert (pi.source, pi.mock_gpio) == ("picamera2", False)
    assert (laptop.source, laptop.mock_gpio) == ("replay", True)
    forced = c.resolve(parse("[camera]\nsource = \"synthetic\"\n[gpio]\nmock = \"yes\""), on_pi=True, env={})
    assert (forced.source, forced.mock_gpio) == ("synthetic", True)


def test_paths_resolve_against_the_checkout_and_state_dir_follows_systemd() -> None:
    res = c.resolve(c.Config(), on_pi=False, env={})
    assert res.model_dir == c.PROJECT_ROOT / "models"
    assert res.replay_dir == c.PROJECT_ROOT / "device" / "samples"
    assert res.state_dir == c.PROJECT_ROOT / "state"
    assert c.resolve(c.Config(), on_pi=True, env={"STATE_DIRECTORY": "/var/lib/leukoscreen:/x"}).state_dir == \
        Path("/var/lib/leukoscreen")
    explicit = c.resolve(parse("[store]\nstate_dir = \"/srv/ls\"\n[model]\ndir = \"/opt/m\""), on_pi=False,
                         env={"STATE_DIRECTORY": "/ignored"})
    assert (explicit.state_dir, explicit.model_dir) == (Path("/srv/ls"), Path("/opt/m"))


def test_raspberry_pi_detection(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert c.is_raspberry_pi(model)
    model.write_bytes(b"QEMU Virtual Machine\x00")
    assert not c.is_raspberry_pi(model)
    assert not c.is_raspberry_pi(tmp_path / "absent")


def test_allowed_hosts_default_empty_lowercased_and_used_by_the_page(tmp_path: Path) -> None:
    assert c.Config().web.allowed_hosts == ()
    cfg = parse('[web]\nallowed_hosts = ["LeukoScreen.Clinic.lan.", "box-2"]')
    assert cfg.web.allowed_hosts == ("leukoscreen.clinic.lan", "box-2")
    assert c.parse(tomllib.loads(c.to_toml(cfg))) == cfg

    from types import SimpleNamespace

    from device.web import create_app

    app = create_app(SimpleNamespace(config=cfg, token="t"))
    client = app.test_client()
    # the Host check runs before routing: a refused name is 400, an allowed one reaches the router (404 here)
    assert client.get("/nothing", headers={"Host": "leukoscreen.clinic.lan:8080"}).status_code == 404
    assert client.get("/nothing", headers={"Host": "box-2"}).status_code == 404
    assert client.get("/nothing", headers={"Host": "other.clinic.lan"}).status_code == 400
