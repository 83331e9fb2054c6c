"""Fixtures for the device runtime tests: the tiny bundle, a real classifier, a real notify socket,
gpiozero's MockFactory, configs pointing at temporary state folders."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from device import config as config_mod
from device.bundle import Bundle, Thresholds, load_bundle
from device.classifier import Classifier

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "device" / "samples"
TINY = ROOT / "tests" / "fixtures" / "bundle"


@pytest.fixture(scope="session")
def tiny_bundle() -> Bundle:
    if not (TINY / "manifest.json").is_file():
        pytest.skip(f"tiny bundle missing at {TINY}; build it with `bash tests/fixtures/make_bundle.sh`")
    return load_bundle(TINY)


@pytest.fixture(scope="session")
def decisive_bundle(tiny_bundle: Bundle) -> Bundle:
    """The tiny bundle with its refusal thresholds off, so every field is "ok" with the model's top class.

    The tiny model is too weak to be confident; the loop tests need both benign and ALL verdicts from a real
    model run, and this gets them without faking the classifier.
    """
    head = dataclasses.replace(tiny_bundle.head, ood_threshold=1e9)
    return dataclasses.replace(tiny_bundle, head=head, thresholds=Thresholds(confidence=0.0, all_probability=1.1,
                                                                                benign_confidence=0.0))


@pytest.fixture(scope="session")
def decisive_classifier(decisive_bundle: Bundle) -> Classifier:
    return Classifier.open(decisive_bundle, num_threads=1, use_edgetpu=False)


@pytest.fixture(scope="session")
def tiny_classifier(tiny_bundle: Bundle) -> Classifier:
    return Classifier.open(tiny_bundle, num_threads=1, use_edgetpu=False)


@pytest.fixture(scope="session")
def sample_paths() -> list[Path]:
    paths = sorted(p for p in SAMPLES.iterdir() if p.suffix == ".jpg")
    assert len(paths) >= 12, f"expected 3 samples per class in {SAMPLES}"
    return paths


@pytest.fixture(scope="session")
def sample_verdicts(decisive_classifier: Classifier, sample_paths: list[Path]) -> dict[Path, object]:
    """What the decisive classifier says about each sample (so tests pick benign/ALL frames by outcome)."""
    from device.preprocess import load_image

    return {p: decisive_classifier.classify(np.asarray(load_image(p))).verdict for p in sample_paths}


@pytest.fixture
def benign_and_all(sample_verdicts: dict) -> tuple[Path, Path]:
    benign = [p for p, v in sample_verdicts.items() if v.status == "ok" and not v.all]
    alls = [p for p, v in sample_verdicts.items() if v.status == "ok" and v.all]
    if not benign or not alls:
        pytest.skip("the tiny model calls no sample benign (or none ALL); rebuild the fixture bundle")
    return benign[0], alls[0]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short path (AF_UNIX socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ls-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode())

    def lines(self) -> list[str]:
        with self._lock:
            return [line for m in self.messages for line in m.split("\n")]

    def wait_for(self, line: str, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.lines():
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(short_tmp: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(short_tmp / "notify")
    yield listener
    listener.close()


@pytest.fixture
def mock_factory():
    from gpiozero.pins.mock import MockFactory

    factory = MockFactory()
    yield factory
    factory.close()


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., config_mod.Config]:
    """A Config for tests: tiny bundle, state in tmp_path, fast timings; override with section=dict(...)."""

    def make(**sections: dict) -> config_mod.Config:
        doc: dict = {
            "model": {"dir": str(TINY), "threads": 1, "use_edgetpu": False},
            "camera": {"source": "replay", "replay_dir": str(SAMPLES), "interval_ms": 0, "read_timeout_s": 2.0,
                       "retry_min_s": 0.01, "retry_max_s": 0.05, "lock_after_s": 0.0},
            "trigger": {"mode": "continuous", "interval_ms": 0},
            "gpio": {"mock": "yes", "bounce_ms": 0},
            "store": {"state_dir": str(tmp_path / "state"), "reserve_mb": 0},
            "web": {"port": 0},
        }
        for name, values in sections.items():
            doc.setdefault(name, {}).update(values)
        return config_mod.parse(doc, "<test>")

    return make


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, step: float = 0.01) -> bool:
    """Poll ``pred`` until true; the timeout is a safety net, never the thing under test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


@pytest.fixture
def wait() -> Callable[..., bool]:
    return wait_until
