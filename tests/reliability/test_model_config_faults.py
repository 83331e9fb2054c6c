"""Area 1: a broken model bundle or config stops ``python -m device run`` before it shows anything.

Each case corrupts a private copy of the tiny fixture bundle (or writes a bad config) and runs the real
process: it must exit non-zero (1 for a bundle/storage fault, 2 for a config fault), never by a signal
(a segfault in the TFLite runtime is the failure this guards against), without a traceback, with a
message naming the file or key and what to do. The fault LED pattern is checked in-process with gpiozero's
MockFactory (the subprocess uses mock GPIO, which nobody can see).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device import app as app_mod
from device.cli import main
from device.head import load_head, save_head
from device.leds import ALT, BLINK, OFF, Pattern
from tests.reliability.conftest import TINY, copy_bundle, rehash, run_device, write_config

AREA = "1 model/config"
MODEL, HEAD, MANIFEST = "darknet19_int8.tflite", "head.npz", "manifest.json"


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def f(b: Path) -> None:
        data = (b / name).read_bytes()
        (b / name).write_bytes(data[: int(len(data) * keep)])
    return f


def _flip(name: str, offset: int) -> Callable[[Path], None]:
    def f(b: Path) -> None:
        data = bytearray((b / name).read_bytes())
        data[offset % len(data)] ^= 0xFF
        (b / name).write_bytes(bytes(data))
    return f


def _then_rehash(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def f(b: Path) -> None:
        for s in steps:
            s(b)
        rehash(b)
    return f


def _manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def f(b: Path) -> None:
        m = json.loads((b / MANIFEST).read_text())
        edit(m)
        (b / MANIFEST).write_text(json.dumps(m))
    return f


def _head(edit: Callable[[object], object], manifest: Callable[[dict], None] | None = None) -> Callable[[Path], None]:
    def f(b: Path) -> None:
        head = edit(load_head(b / HEAD))
        (b / HEAD).unlink()
        save_head(b / HEAD, head)
        if manifest is not None:
            _manifest(manifest)(b)
        rehash(b)
    return f


def _narrow_head(n: int):
    """A head fitted to a model with ``n`` features (indices kept inside it)."""
    return lambda h: dataclasses.replace(h, n_features=n, indices=h.indices % n)


def _drop_class(h):
    keep = slice(0, len(h.classes) - 1)
    return dataclasses.replace(h, classes=h.classes[keep], coef=h.coef[keep], intercept=h.intercept[keep],
                               platt_a=h.platt_a[keep], platt_b=h.platt_b[keep],
                               class_means=None if h.class_means is None else h.class_means[keep])


def _set(path: str, value):
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        cur = m
        for p in parents:
            cur = cur[p]
        cur[last] = value
    return edit


def _nan_coef(h):
    coef = h.coef.copy()
    coef[0, 0] = np.nan
    return dataclasses.replace(h, coef=coef)


def _bad_coef_rows(h):
    return dataclasses.replace(h, coef=h.coef[:-1])


def _delete(name: str) -> Callable[[Path], None]:
    return lambda b: (b / name).unlink()


BUNDLE_CASES = {
    # case: (corruption, words the message must contain)
    "model file missing": (_delete(MODEL), [MODEL, "missing", "make convert"]),
    "head file missing": (_delete(HEAD), [HEAD, "missing", "make convert"]),
    "manifest missing": (_delete(MANIFEST), [MANIFEST, "make convert", "[model] dir"]),
    "manifest truncated (not JSON)": (_truncate(MANIFEST, 0.5), [MANIFEST, "not valid JSON", "make convert"]),
    "model truncated": (_truncate(MODEL, 0.5), [MODEL, "sha256", "corrupt", "make convert"]),
    "model truncated, manifest re-hashed": (_then_rehash(_truncate(MODEL, 0.5)),
                                            [MODEL, "truncated TFLite model", "make convert"]),
    "model cut to 100 bytes, re-hashed": (_then_rehash(_truncate(MODEL, 100 / 517632)),
                                          [MODEL, "truncated TFLite model", "make convert"]),
    "model bit-flipped (weights)": (_flip(MODEL, 300_000), [MODEL, "sha256", "corrupt"]),
    "model bit-flipped (header)": (_flip(MODEL, 20), [MODEL, "sha256", "corrupt"]),
    "model bit-flipped (header), re-hashed": (_then_rehash(_flip(MODEL, 20)), [MODEL, "make convert"]),
    "model is not a TFLite file, re-hashed": (_then_rehash(lambda b: (b / MODEL).write_bytes(b"\0" * 4096)),
                                              [MODEL, "not a TFLite model", "make convert"]),
    "head truncated": (_truncate(HEAD, 0.5), [HEAD, "sha256", "corrupt"]),
    "head truncated, re-hashed": (_then_rehash(_truncate(HEAD, 0.5)), [HEAD, "unreadable", "make convert"]),
    "head bit-flipped, re-hashed": (_then_rehash(_flip(HEAD, 5000)), [HEAD, "unreadable", "make convert"]),
    "manifest sha256 edited": (_manifest(_set("files.model.sha256", "0" * 64)), [MODEL, "sha256", MANIFEST]),
    "head for a model with 512 features": (_head(_narrow_head(512), _set("output.features", 512)),
                                           [MODEL, "output.features", "different builds", "make convert"]),
    "head features disagree with manifest": (_head(_narrow_head(512)), [HEAD, "512 features", "output.features"]),
    "head has 3 classes, manifest 4": (_head(_drop_class), [HEAD, "classes", "differ"]),
    "manifest has 5 classes, head 4": (_manifest(_set("classes", ["Benign", "Early Pre-B", "Pre-B", "Pro-B", "T"])),
                                       [HEAD, "classes", "differ"]),
    "head arrays disagree (coef rows)": (_head(_bad_coef_rows), [HEAD, "coef", "shape"]),
    "head holds NaN": (_head(_nan_coef), [HEAD, "NaN", "make convert"]),
    "benign class unknown": (_manifest(_set("benign_class", "Normal")), [MANIFEST, "benign_class", "Normal"]),
    "manifest schema 3 (from the future)": (_manifest(_set("schema", 3)),
                                            [MANIFEST, "schema", "update the device software"]),
}

CONFIG_CASES = {
    # case: (what is appended to a good config, or how the file is made; words the message must contain; exit)
    "unknown key": ("[alerts]\nblink = 1.0\n", ["alerts.blink", "accepts", "blink_s"], 2),
    "unknown section": ("[camerra]\nsource = \"replay\"\n", ["[camerra]", "[camera]"], 2),
    "malformed TOML": ("[camera\nsource = ", ["not valid TOML", "fix the syntax"], 2),
    "wrong type": ("[alerts]\nall_fields = \"two\"\n", ["alerts.all_fields = 'two'", "an integer"], 2),
    "out of range": ("[alerts]\nblink_s = 99.0\n", ["alerts.blink_s = 99.0", "from 0.05 to 5.0"], 2),
    "bad allowed_hosts": ("web.allowed_hosts", ["web.allowed_hosts", "no scheme, port or wildcard"], 2),
    "pin used twice": ("gpio", ["gpio.red = 17", "gpio.green", "own pin"], 2),
    "config file missing": ("absent", ["config file not found", "--config"], 2),
    "state folder is a file": ("state", ["cannot create the state folder", "state_dir"], 1),
}


def _config_for(case: str, tmp: Path) -> Path:
    cfg, state = tmp / "config.toml", tmp / "state"
    how = CONFIG_CASES[case][0]
    if how == "absent":
        return tmp / "absent.toml"
    if how == "gpio":
        return write_config(cfg, state, gpio={"mock": "yes", "red": 17, "green": 17})
    if how == "web.allowed_hosts":
        return write_config(cfg, state, web={"port": 0, "allowed_hosts": ["http://box.lan:8080"]})
    if how == "state":
        (tmp / "blocker").write_text("x")
        return write_config(cfg, tmp / "blocker" / "state")
    if case == "malformed TOML":
        cfg.write_text(how)
        return cfg
    write_config(cfg, state)
    cfg.write_text(cfg.read_text() + how)
    return cfg


def _check_refusal(r, words: list[str], code: int) -> tuple[bool, str]:
    err = r.stderr
    problems = []
    if r.returncode != code:
        problems.append(f"exit {r.returncode}, want {code}" + (" (killed by a signal)" if r.returncode < 0 else ""))
    if "Traceback" in err:
        problems.append("traceback printed")
    missing = [w for w in words if w not in err]
    if missing:
        problems.append(f"message lacks {missing}")
    if "ready:" in err or "screening loop started" in err:
        problems.append("it started")
    return not problems, "; ".join(problems)


def _message(err: str, tmp: Path) -> str:
    lines = [line for line in err.splitlines() if " ERROR " in line]
    msg = lines[0].split(": ", 1)[-1] if lines else err.strip()[-200:]
    return msg.replace(str(tmp) + "/", "")


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_a_broken_bundle_stops_the_service_with_a_message(case: str, tmp_path: Path, table) -> None:
    corrupt, words = BUNDLE_CASES[case]
    bundle = copy_bundle(tmp_path / "bundle")
    corrupt(bundle)
    r = run_device("run", "--config", str(write_config(tmp_path / "c.toml", tmp_path / "state", model=bundle)))
    ok, why = _check_refusal(r, [w.replace(MODEL, str(bundle / MODEL)) if w == MODEL else w for w in words], 1)
    msg = _message(r.stderr, tmp_path)
    table(AREA, f"bundle: {case}", "exit 1, names file + fix", f"exit {r.returncode}: {msg}", ok)
    assert ok, f"{why}\n{r.stderr[-2000:]}"


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_bad_config_stops_the_service_naming_the_key(case: str, tmp_path: Path, table) -> None:
    _, words, code = CONFIG_CASES[case]
    cfg = _config_for(case, tmp_path)
    r = run_device("run", "--config", str(cfg))
    ok, why = _check_refusal(r, [*words, str(cfg)] if code == 2 else words, code)
    msg = _message(r.stderr, tmp_path)
    table(AREA, f"config: {case}", f"exit {code}, names key/file + fix", f"exit {r.returncode}: {msg}", ok)
    assert ok, f"{why}\n{r.stderr[-2000:]}"


# -- the LEDs ------------------------------------------------------------------------------------------------------


GREEN, AMBER, RED = 17, 27, 22


@pytest.mark.parametrize("case", ["bundle: model truncated", "config: unknown key", "config: not TOML"])
def test_the_leds_show_the_fault_pattern_when_the_service_cannot_start(case: str, tmp_path: Path, monkeypatch,
                                                                       table) -> None:
    from gpiozero.pins.mock import MockFactory

    pins = MockFactory()
    monkeypatch.setattr(app_mod, "make_pin_factory", lambda mock: pins)
    monkeypatch.setattr(app_mod, "MOCK_FAULT_HOLD_S", 1.2)
    bundle = copy_bundle(tmp_path / "bundle")
    cfg = write_config(tmp_path / "c.toml", tmp_path / "state", model=bundle, alerts={"blink_s": 0.05})
    if case.startswith("bundle"):
        _truncate(MODEL, 0.5)(bundle)
        want_code = 1
    elif case == "config: unknown key":
        write_config(cfg, tmp_path / "state", model=bundle, alerts={"blink_s": 0.05},
                     store={"budget": 3})  # refused, but [gpio] is fine
        want_code = 2
    else:
        cfg.write_text("this is not TOML [")
        want_code = 2
    samples: list[tuple[bool, bool, bool]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            try:
                samples.append(tuple(bool(pins.pin(p).state) for p in (GREEN, AMBER, RED)))
            except Exception:  # pins not made yet
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = main(["run", "--config", str(cfg)])
    finally:
        done.set()
        sampler.join(2)
    lit = [s for s in samples if any(s)]
    if case == "config: not TOML":  # the pins are unknown: nothing may be driven
        ok = code == want_code and not lit
        observed = f"exit {code}; {len(lit)} of {len(samples)} samples lit (pins unknown, LEDs left dark)"
    else:
        amber = {s[1] for s in lit}
        red = {s[2] for s in lit}
        opposite = sum(1 for s in lit if s[1] != s[2]) / max(1, len(lit))
        ok = (code == want_code and not any(s[0] for s in samples) and amber == {True, False} and red == {True, False}
              and opposite >= 0.8 and app_mod.fault_pattern() == Pattern(green=OFF, amber=BLINK, red=ALT))
        observed = (f"exit {code}; green never lit, amber on/off {sorted(amber)}, red on/off {sorted(red)}, "
                    f"opposite phase in {opposite:.0%} of {len(lit)} samples")
    if samples:
        assert not any(bool(pins.pin(p).state) for p in (GREEN, AMBER, RED)), "LEDs left on after exit"
    table(AREA, f"fault LEDs, {case}", "amber blinking + red alternating while it holds, then exit non-zero"
          if case != "config: not TOML" else "LEDs dark (pins unknown), exit 2", observed, ok)
    assert ok, observed


def test_the_shipped_fixture_bundle_still_starts(tmp_path: Path, table) -> None:
    """The control: the same harness with an intact copy starts, shows fields and stops on SIGTERM."""
    from tests.reliability.conftest import DeviceProc, wait

    bundle = copy_bundle(tmp_path / "bundle")
    proc = DeviceProc(write_config(tmp_path / "c.toml", tmp_path / "state", model=bundle))
    try:
        started = wait(lambda: len(proc.shown_ids()) >= 3 or proc.p.poll() is not None, 90)
    finally:
        proc.p.terminate()
        code = proc.finish()
    ok = started and code == 0 and len(proc.shown_ids()) >= 3
    table(AREA, "control: intact bundle copy", "starts, shows fields, exit 0 on SIGTERM",
          f"{len(proc.shown_ids())} fields shown, exit {code}", ok)
    assert ok, proc.tail()
    assert TINY.is_dir()
