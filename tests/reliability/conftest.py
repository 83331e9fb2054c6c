"""The reliability suite's shared parts: the results table (``docs/reliability.md``), the real-process
helper, configs, corruptible bundle copies and a size-capped file system.

The table: every test records its cases with the ``table`` fixture (area, case, expected, observed, the
row's own check, numbers); at the end of a session that ran reliability tests the rows are merged with the
committed ``docs/reliability.md`` (a row whose test failed is marked failed whatever it said) and written to
``build/reliability.md``, so ``make test`` leaves the checkout as it found it. ``make reliability-report`` and
``make soak`` set ``LEUKO_RELIABILITY_DOC=docs/reliability.md`` to update the committed table (then commit
it). Rows are keyed by (area, case): a reduced run replaces the reduced rows and keeps the last full-mode
numbers (``make soak``), and a skipped case never overwrites a recorded result. The data sits in a comment
at the end of the file, so the merge needs nothing else.

Modes: ``LEUKO_SOAK=full`` runs the long variants (10,000 soak fields, 50 kills); otherwise they are
skipped with a message and the reduced variants (always run) keep CI within its budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.device.conftest import (  # noqa: F401 - fixtures shared with the device tests
    SAMPLES,
    TINY,
    NotifyListener,
    decisive_bundle,
    decisive_classifier,
    notify_socket,
    sample_paths,
    short_tmp,
    tiny_bundle,
    wait_until,
)
from tests.device.proc import PAGE, SHOWN, DeviceProc, device_env  # noqa: F401 - re-exported

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "reliability.md"  # the merge's base: the last recorded results
_DOC_ENV = os.environ.get("LEUKO_RELIABILITY_DOC", "")
DOC = ROOT / _DOC_ENV if _DOC_ENV not in ("", "0") else ROOT / "build" / "reliability.md"  # where a run writes
HERE = Path(__file__).resolve().parent
FULL = os.environ.get("LEUKO_SOAK", "").lower() == "full"
MODE = "full" if FULL else "reduced"

AREAS = {
    "1 model/config": "Model and config faults: `python -m device run` refuses to start, exits non-zero, names "
                      "the file or key and the fix; the LEDs show the fault pattern",
    "2 camera": "Camera faults mid-run: fault shown (status API, LEDs), back-off retries, recovery without a "
                "restart; a hung loop stops pinging the watchdog",
    "3 storage": "Storage faults: disk full (a real size-capped tmpfs), database locked or read-only",
    "4 power loss": "kill -9 of the running process at random moments; every shown result survives",
    "5 bad images": "Bad images through `classify --json` and the upload endpoint",
    "6 web": "Web: tokens, body size, path traversal, 200 concurrent status requests vs the loop's time per field",
    "7 soak": "Soak: replayed fields vs RSS, file descriptors and database size",
}


def full_only(what: str) -> pytest.MarkDecorator:
    """Skip (with a message) unless LEUKO_SOAK=full; used with ``pytest.mark.slow``."""
    return pytest.mark.skipif(not FULL, reason=f"{what}: full mode only (LEUKO_SOAK=full, `make soak`); "
                                                "the reduced variant runs in every suite")


# -- the table ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    area: str
    case: str
    expected: str
    observed: str
    ok: bool
    numbers: str = ""
    nodeid: str = ""
    outcome: str = ""  # "passed" | "failed" | "skipped", from the test's report
    run: str = ""

    @property
    def key(self) -> str:
        return f"{self.area}|{self.case}"

    @property
    def result(self) -> str:
        if self.outcome == "skipped":
            return "skipped"
        return "pass" if self.ok and self.outcome == "passed" else "FAIL"


_ROWS: list[Row] = []
_OUTCOMES: dict[str, tuple[str, str]] = {}
_RAN: list[str] = []
_STARTED = time.time()


def _short(value: Any, limit: int = 160) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@pytest.fixture
def table(request: pytest.FixtureRequest) -> Callable[..., Row]:
    """``table(area, case, expected, observed, ok, numbers="")`` adds a row for this test and returns it."""

    def add(area: str, case: str, expected: str, observed: Any, ok: bool, numbers: str = "") -> Row:
        assert area in AREAS, area
        row = Row(area, case, expected, _short(observed), bool(ok), numbers, request.node.nodeid)
        _ROWS.append(row)
        return row

    return add


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if not str(item.path).startswith(str(HERE)):
        return
    if rep.skipped and rep.when in ("setup", "call"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        _OUTCOMES[item.nodeid] = ("skipped", reason.replace("Skipped: ", ""))
        _RAN.append(item.nodeid)
    elif rep.when == "call" or (rep.when == "setup" and rep.failed):
        _OUTCOMES[item.nodeid] = (rep.outcome, "")
        _RAN.append(item.nodeid)
    elif rep.when == "teardown" and rep.failed:
        _OUTCOMES[item.nodeid] = ("failed", "teardown failed")


def _skip_rows() -> list[Row]:
    """A row for every skipped reliability test (the full-mode variants in CI)."""
    rows = []
    for nodeid, (outcome, reason) in _OUTCOMES.items():
        if outcome == "skipped" and not any(r.nodeid == nodeid for r in _ROWS):
            area = _SKIP_AREAS.get(nodeid.split("::")[0].rsplit("/", 1)[-1], "7 soak")
            rows.append(Row(area, nodeid.split("::")[-1], "(full mode)", reason, True, "", nodeid, "skipped"))
    return rows


_SKIP_AREAS = {"test_model_config_faults.py": "1 model/config", "test_camera_faults.py": "2 camera",
               "test_storage_faults.py": "3 storage", "test_power_loss.py": "4 power loss",
               "test_bad_images.py": "5 bad images", "test_web.py": "6 web", "test_soak.py": "7 soak"}

_DATA = re.compile(r"<!-- reliability-data\n(.*?)\n-->", re.S)


def _load_previous() -> dict[str, dict]:
    try:
        m = _DATA.search(COMMITTED.read_text(encoding="utf-8"))
        return {r["key"]: r for r in json.loads(m.group(1))} if m else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _test_exists(nodeid: str) -> bool:
    """Is the test function of ``nodeid`` still in its file?"""
    path, _, rest = nodeid.partition("::")
    func = rest.split("[", 1)[0]
    try:
        return bool(func) and f"def {func}(" in (ROOT / path).read_text(encoding="utf-8")
    except OSError:
        return False


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_table() -> Path:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    run = f"{stamp}, {MODE}"
    rows = list(_ROWS)
    for r in rows:
        r.outcome, _ = _OUTCOMES.get(r.nodeid, ("failed", "no report"))
        r.run = run
    rows += [dataclasses.replace(r, run=run) for r in _skip_rows()]
    merged = _load_previous()
    ran = {r.nodeid for r in rows if r.outcome != "skipped"}  # a skipped test says nothing about its old rows
    keys = {r.key for r in rows}
    for key in [k for k, d in merged.items() if (d.get("nodeid") in ran and k not in keys)
                or not _test_exists(d.get("nodeid", ""))]:
        del merged[key]  # a case renamed or removed since that run
    real = {r.nodeid for r in rows if r.outcome != "skipped"}
    for key in [k for k, d in merged.items() if d.get("outcome") == "skipped" and d.get("nodeid") in real]:
        del merged[key]  # a case that ran replaces its "skipped" placeholder
    for r in rows:
        old = merged.get(r.key)
        if r.outcome == "skipped" and (
                (old is not None and old.get("outcome") != "skipped")
                or any(d.get("nodeid") == r.nodeid and d.get("outcome") != "skipped" for d in merged.values())):
            continue  # keep the last real result of a full-mode case
        merged[r.key] = {**dataclasses.asdict(r), "key": r.key, "result": r.result}
    ordered = sorted(merged.values(), key=lambda d: (list(AREAS).index(d["area"]) if d["area"] in AREAS else 99))
    counts = {k: sum(1 for d in ordered if d["result"] == k) for k in ("pass", "FAIL", "skipped")}
    lines = [
        "# Reliability and fault-injection results",
        "",
        "Generated by the test suite (`tests/reliability/`, the table plugin in `tests/reliability/conftest.py`);",
        "do not edit by hand. `make reliability-report` refreshes the reduced rows (what `make test` runs; it writes",
        "its copy to `build/reliability.md`); `make soak` (`LEUKO_SOAK=full`) the full ones: 10,000 soak fields and",
        "50 kills. Each row keeps the run that produced it.",
        "",
        f"Last written {stamp} by a {MODE} run on {platform.machine()} Linux, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU(s). Rows: {counts['pass']} pass, {counts['FAIL']} fail, {counts['skipped']} "
        "skipped (a skipped row is a full-mode case that has never run on this checkout).",
        "",
    ]
    for area, title in AREAS.items():
        section = [d for d in ordered if d["area"] == area]
        if not section:
            continue
        lines += [f"## {area[0]}. {title}", "", "| Case | Expected | Observed | Result | Numbers | Run |",
                  "|---|---|---|---|---|---|"]
        for d in section:
            lines.append("| " + " | ".join(_cell(x) for x in (d["case"], d["expected"], d["observed"],
                                                                 "**FAIL**" if d["result"] == "FAIL" else d["result"],
                                                                 d["numbers"], d["run"])) + " |")
        lines.append("")
    lines += ["<!-- reliability-data", json.dumps(ordered, indent=0, sort_keys=True), "-->", ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, DOC)
    return DOC


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _RAN or os.environ.get("LEUKO_RELIABILITY_DOC", "1") == "0":
        return
    path = write_table()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        reporter.write_line(f"reliability table: {where} ({len(_ROWS)} rows this run)")


# -- configs, bundles, processes ---------------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def config_text(state: Path, model: Path = TINY, **sections: dict) -> str:
    """A complete run config (tiny bundle, replay, mock GPIO, free port) with ``sections`` merged in."""
    doc: dict[str, dict] = {
        # the bundle checks here run on copies corrupted without re-signing (signatures: tests/device/test_install.py)
        "model": {"dir": str(model), "threads": 1, "use_edgetpu": False, "require_signature": False},
        "camera": {"source": "replay", "replay_dir": str(SAMPLES), "interval_ms": 0, "read_timeout_s": 5.0},
        "trigger": {"mode": "continuous", "interval_ms": 0, "change_threshold": 0.0},
        "gpio": {"mock": "yes", "bounce_ms": 0},
        "store": {"state_dir": str(state), "reserve_mb": 0},
        "web": {"port": 0},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return "\n".join(f"[{name}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in table.items()) + "\n"
                     for name, table in doc.items())


def write_config(path: Path, state: Path, model: Path = TINY, **sections: dict) -> Path:
    path.write_text(config_text(state, model, **sections))
    return path


def run_device(*args: str, timeout: float = 120, notify: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m device ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "device", *args], cwd=ROOT, env=device_env(notify),
                          capture_output=True, text=True, timeout=timeout)


def copy_bundle(dst: Path) -> Path:
    """A private copy of the tiny bundle to corrupt."""
    shutil.copytree(TINY, dst)
    return dst


def rehash(bundle: Path) -> None:
    """Update the manifest's sha256/bytes to the files as they are (a bundle built from damaged files)."""
    m = json.loads((bundle / "manifest.json").read_text())
    for entry in m["files"].values():
        p = bundle / entry["path"]
        if p.is_file():
            entry["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
            entry["bytes"] = p.stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(m, indent=1))


# -- a small file system ---------------------------------------------------------------------------------------------


class SmallFS:
    """A real size-capped tmpfs (needs CAP_SYS_ADMIN, which CI has); ``remount(ro=True)`` too."""

    def __init__(self, path: Path, size_kb: int):
        self.path, self.size_kb = path, size_kb
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(f"mount tmpfs: {r.stderr.strip()}")

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def remount(self, ro: bool) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(self.path)],
                              capture_output=True, text=True)

    def close(self) -> None:
        for _ in range(20):
            r = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
            if r.returncode == 0 or "not mounted" in r.stderr:
                return
            time.sleep(0.2)
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_fs() -> Iterator[Callable[[int], SmallFS]]:
    """``small_fs(size_kb)``: a mounted tmpfs of that size, unmounted afterwards (skips if mounting is refused)."""
    made: list[SmallFS] = []
    base = Path(tempfile.mkdtemp(prefix="ls-fs-", dir="/tmp"))

    def make(size_kb: int) -> SmallFS:
        try:
            fs = SmallFS(base / f"fs{len(made)}", size_kb)
        except OSError as exc:
            pytest.skip(f"cannot mount a size-capped tmpfs here ({exc}); CI runs as root and can")
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()
    shutil.rmtree(base, ignore_errors=True)


def wait(pred: Callable[[], bool], timeout: float = 60.0, step: float = 0.01) -> bool:
    return wait_until(pred, timeout, step)


# -- an in-process service with mock LEDs, a real notify socket and the page's test client ----------------------


def make_config(state: Path, **sections: dict):
    """A parsed Config like :func:`config_text` (fast timings for the camera's back-off, the page's token)."""
    import tomllib

    from device import config as config_mod

    base = {"camera": {"retry_min_s": 0.05, "retry_max_s": 0.4, "lock_after_s": 0.0, "read_timeout_s": 2.0},
            "web": {"token": "tok-reliability"}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_mod.parse(tomllib.loads(config_text(state, **base)), "<reliability>")


class Harness:
    """A :class:`device.service.Service` built by ``device.app.build`` on real parts, with MockFactory LEDs
    (rendered on demand), an optional notify socket with a fast watchdog, and a Flask test client for its page."""

    def __init__(self, cfg, classifier, source_factory, *, notify: Path | None = None,
                 watchdog_usec: str | None = None, clock: Callable[[], float] | None = None, kind: str = "replay",
                 start: bool = True):
        from functools import partial

        from gpiozero.pins.mock import MockFactory

        from device.app import build, make_leds
        from device.notify import Notifier
        from device.web import create_app

        self.cfg = cfg
        self.state = Path(cfg.store.state_dir)
        self.pins = MockFactory()
        self.notifier = Notifier(address=str(notify) if notify else "", watchdog_usec=watchdog_usec,
                                 watchdog_pid="")
        kw = {"clock": clock} if clock is not None else {}
        self.app = build(cfg, classifier=classifier, source=(source_factory, kind),
                         pin_factory=self.pins, leds=partial(make_leds, autostart=False), notifier=self.notifier,
                         web=None, start=start, **kw)
        self.svc, self.store, self.leds = self.app.service, self.app.store, self.app.leds
        self.client = create_app(self.svc).test_client()

    def lit(self, t: float) -> tuple[bool, bool, bool]:
        """(green, amber, red) as the pins read at time ``t`` of their blink cycle. The recorder thread renders
        at the wall clock after every field, so the read-back comes from inside the same render (same lock)."""
        return self.leds.render(t)[:3]

    def shows_fault_pattern(self) -> bool:
        """The fault pattern on the pins: amber and red alternating (or, under an unacknowledged ALL alarm,
        which outranks it, red fast and amber alternating); green off."""
        from device.leds import ALT, BLINK, FAST, Pattern

        b = self.cfg.alerts.blink_s
        a, z = self.lit(0.25 * b), self.lit(1.25 * b)
        p = self.svc.pattern()
        if p == Pattern(amber=BLINK, red=ALT):
            return not a[0] and not z[0] and a[1] != a[2] and z[1] != z[2] and a != z
        return p.red == FAST and p.amber == ALT and not a[0] and a[1] != z[1]

    def close(self) -> None:
        self.app.close()
        self.pins.close()


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Iterator[Callable[..., Harness]]:
    """``harness(cfg, source_factory, **kw)``: a started :class:`Harness` (decisive classifier by default)."""
    made: list[Harness] = []

    def make(cfg, source_factory, **kw) -> Harness:
        if "classifier" not in kw:
            kw["classifier"] = request.getfixturevalue("decisive_classifier")
        h = Harness(cfg, kw.pop("classifier"), source_factory, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


# -- a disk that fills up: real when a tmpfs can be mounted, simulated otherwise -------------------------------------


class RealDisk:
    """A size-capped tmpfs filled by ballast files (the real thing: ENOSPC from the kernel, SQLITE_FULL)."""

    real = True

    def __init__(self, fs: SmallFS):
        self.fs, self.path = fs, fs.path
        self._ballast: list[Path] = []

    def free(self) -> int:
        return self.fs.free()

    def fill(self, leave: int) -> None:
        """Leave about ``leave`` bytes free (0: full)."""
        p = self.path / f"ballast{len(self._ballast)}"
        size = max(0, self.free() - leave)
        try:
            with open(p, "wb") as f:
                f.write(b"\0" * size)
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # the last bytes went to a racing write: full is full
            pass
        self._ballast.append(p)

    def clear(self) -> None:
        for p in self._ballast:
            p.unlink(missing_ok=True)
        self._ballast.clear()

    def attach(self, store) -> None:
        pass


class _FullDB:
    """A sqlite3 connection that answers writes with SQLite's own 'database or disk is full' while ``disk.full``."""

    WRITES = ("BEGIN", "INSERT", "UPDATE", "DELETE", "COMMIT")

    def __init__(self, db, disk: SimulatedDisk):
        self._db, self._disk = db, disk

    def _check(self, sql: str) -> None:
        import sqlite3

        if self._disk.full and sql.lstrip().split(None, 1)[0].upper() in self.WRITES:
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, *args: Any):
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args: Any):
        self._check(sql)
        return self._db.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class SimulatedDisk:
    """The fallback where mounting is refused: a plain folder; the store is told its free space (its
    ``shutil.disk_usage``, for paths inside the folder only) and, once full, its database refuses writes."""

    real = False

    def __init__(self, path: Path, size: int, monkeypatch: pytest.MonkeyPatch):
        import device.store.images as store_mod

        self.path, self.size, self.ballast, self.full = path, size, 0, False
        path.mkdir(parents=True, exist_ok=True)
        real_usage = shutil.disk_usage

        def usage(p: Any):
            if str(Path(p).resolve()).startswith(str(self.path.resolve())):
                return shutil._ntuple_diskusage(self.size, self.size - self.free(), self.free())  # type: ignore
            return real_usage(p)

        monkeypatch.setattr(store_mod.shutil, "disk_usage", usage)

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def free(self) -> int:
        return max(0, self.size - self.used() - self.ballast)

    def fill(self, leave: int) -> None:
        self.ballast += max(0, self.free() - leave)
        self.full = leave <= 0

    def clear(self) -> None:
        self.ballast, self.full = 0, False

    def attach(self, store) -> None:
        store._db = _FullDB(store._db, self)


@pytest.fixture
def small_disk(monkeypatch, tmp_path) -> Iterator[Callable[[int], RealDisk | SimulatedDisk]]:
    """``small_disk(size_kb)``: a real size-capped tmpfs, or (mounting refused) a simulated one."""
    made: list = []
    base = Path(tempfile.mkdtemp(prefix="ls-disk-", dir="/tmp"))

    def make(size_kb: int) -> RealDisk | SimulatedDisk:
        if os.environ.get("LEUKO_SIMULATE_DISK") != "1":
            try:
                fs = SmallFS(base / f"fs{len(made)}", size_kb)
                made.append(fs)
                return RealDisk(fs)
            except OSError:
                pass
        return SimulatedDisk(base / f"sim{len(made)}", size_kb << 10, monkeypatch)

    yield make
    for fs in made:
        fs.close()
    shutil.rmtree(base, ignore_errors=True)
