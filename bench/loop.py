"""The screening loop, timed: the real ``device.service.Service``, idle and under loopback page load.

The Service is assembled by ``device.app.build`` (the composition root of
``python -m device run``), with two measuring subclasses injected through its
factories: a :class:`ResultStore` that times ``record`` and a
:class:`LedDriver` (on gpiozero's ``MockFactory``) that times ``show``. The
rest of each field's stages come from the timings the Service itself records
(capture, quality, preprocess, invoke, head). Time per field is the interval
between consecutive frame captures (``Frame.t``).

The loop is a pipeline (``device.service``, ``device.loop``): capture, quality and
preprocessing of the next frame (frames thread) and the record of the last
one (recorder thread) run while the screening thread invokes the model. So
a field's period is the screening thread's inference + head + whatever the
hand-offs and the other threads' competition for the cores add ("other");
the overlapped stages are listed with their own medians.

Sources: the replay of ``device/samples`` (224 px JPEGs decoded on every
read, as ``make run`` does); an in-memory camera stand-in that hands out
pre-made 1014x760 frames (the default camera size) the way a camera driver
hands out buffers, so crop/resize, the quality gate and the JPEG kept per
field cost what they will cost with the eyepiece camera; and the same with a
model-size second stream per frame, as picamera2's low-resolution stream
gives it on the Pi (scaled by the ISP there; made in advance here, untimed).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.stats import summary
from device import config as config_mod
from device.app import App, build, make_leds
from device.bundle import Bundle
from device.classifier import Classifier, decide
from device.errors import StoreError
from device.head import evaluate
from device.leds import LedDriver
from device.notify import Notifier
from device.pi_camera import lores_size, main_rgb, yuv420_to_rgb
from device.preprocess import frame_to_rgb, load_image, quantize_input
from device.priority import pinned
from device.quality import assess
from device.sources import Frame, ReplaySource, list_images
from device.store import ResultStore
from device.store.records import FieldResult

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "device" / "samples"
CAMERA_SIZE = config_mod.CameraConfig().size  # (1014, 760): what the eyepiece camera streams
#: On the screening thread, one after another: their shares of the period add up to 1.
SERIAL = ("inference", "head", "other")
#: On the frames and recorder threads, overlapping the next invoke (medians; not shares of the period).
OVERLAPPED = ("capture", "quality", "preprocess", "record", "leds")
STAGES = SERIAL + OVERLAPPED
PUBLISHING_THREADS = frozenset({"screening", "recorder"})


# -- measuring subclasses ----------------------------------------------------------------------------------------


@dataclass
class Rec:
    frame_t: float
    status: str
    timings: dict
    record_ms: float
    leds_total_ms: float  # the LED driver's running total when this field was recorded


class TimedStore(ResultStore):
    """A real ResultStore whose commits (JPEGs + one SQLite commit per batch) are timed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recs: list[Rec] = []
        self.leds: TimedLeds | None = None  # whose running total each record notes
        self._recs_lock = threading.Lock()

    def record_batch(self, items: Sequence[tuple[FieldResult, bytes | np.ndarray | None]]
                     ) -> list[FieldResult | StoreError]:
        """The loop's commits; each result of a batch is charged an equal share of the batch's time."""
        t0 = time.perf_counter()
        out = super().record_batch(items)
        ms = (time.perf_counter() - t0) * 1000 / max(len(items), 1)
        with self._recs_lock:
            for result, _image in items:
                self.recs.append(Rec(result.time, str(result.status), dict(result.timings), ms,
                                     self.leds.total_ms if self.leds is not None else 0.0))
        return out

    def snapshot(self) -> list[Rec]:
        with self._recs_lock:
            return list(self.recs)


class TimedLeds(LedDriver):
    """A real LedDriver (MockFactory pins) whose ``show`` is timed when the loop (not the ticker) calls it."""

    total_ms = 0.0

    def show(self, pattern: Any) -> None:
        t0 = time.perf_counter()
        super().show(pattern)
        if threading.current_thread().name in PUBLISHING_THREADS:
            self.total_ms += (time.perf_counter() - t0) * 1000


class MemoryCamera:
    """A ``FrameSource`` handing out pre-made frames in turn the way ``Picamera2Source.read`` does.

    The buffers are what libcamera fills: the main stream as ``BGR888`` (R,G,B in memory) and, with ``small``,
    the model-size lores stream as planar YUV420 (scaled by the ISP on the Pi; made in advance here). Each read
    copies them (picamera2's ``make_array``) and converts them with the Pi adapter's own functions.
    """

    kind = "memory-camera"

    def __init__(self, frames: list[np.ndarray], small: list[np.ndarray] | None = None):
        self.main = frames
        self.yuv = [yuv420_from_rgb(s) for s in small] if small is not None else None
        self.i = 0

    def read(self) -> Frame:
        k = self.i % len(self.main)
        rgb = main_rgb(self.main[k].copy())
        small = None
        if self.yuv is not None:
            buf, size = self.yuv[k]
            small = yuv420_to_rgb(buf.copy(), size)
        self.i += 1
        return Frame(rgb, f"camera-{self.i:06d}", time.time(), small=small)

    def close(self) -> None:
        pass


def camera_frames(n: int = 12, size: tuple[int, int] = CAMERA_SIZE) -> list[np.ndarray]:
    """The committed samples scaled up to the camera's stream size (made once, not timed)."""
    paths = list_images(SAMPLES)[:n]
    return [np.asarray(load_image(p).resize(size, Image.Resampling.BICUBIC), dtype=np.uint8) for p in paths]


def yuv420_from_rgb(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """An even-sized RGB image as a planar full-range (sYCC) YUV420 buffer, (h * 3/2, w) as ``make_array`` gives
    it, and its (w, h): the inverse of :func:`device.pi_camera.yuv420_to_rgb`, chroma averaged over 2x2."""
    h, w = rgb.shape[:2]
    f = rgb.astype(np.float64)
    y = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    cb, cr = (f[..., 2] - y) / 1.772 + 128.0, (f[..., 0] - y) / 1.402 + 128.0

    def half(p: np.ndarray) -> np.ndarray:
        return p.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8).reshape(-1) for p in (y, half(cb), half(cr))]
    return np.concatenate(planes).reshape(h * 3 // 2, w), (w, h)


def lores_frames(frames: list[np.ndarray], model_size: int) -> list[np.ndarray]:
    """The model-size stream of each frame, as the ISP would scale it (same aspect; made once, not timed)."""
    h, w = frames[0].shape[:2]
    size = lores_size((w, h), model_size)
    return [np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8) for f in frames]


# -- assembling the service ----------------------------------------------------------------------------------------


def bench_config(bundle_dir: Path, threads: int, state_dir: Path, *, web_port: int = 0) -> config_mod.Config:
    """The shipped defaults, except: this bundle and thread count, replay at full speed, mock GPIO, temp state."""
    doc = {
        "model": {"dir": str(bundle_dir), "threads": threads},
        "camera": {"source": "replay", "replay_dir": str(SAMPLES), "interval_ms": 0},
        "trigger": {"mode": "continuous", "interval_ms": 0},
        "gpio": {"mock": "yes"},
        "store": {"state_dir": str(state_dir)},
        "web": {"host": "127.0.0.1", "port": web_port, "token": "bench"},
    }
    return config_mod.parse(doc, "<bench>")


def timed_store(state_dir: Path, s: config_mod.StoreConfig) -> TimedStore:
    """``device.store.open_store``, timing its records."""
    return TimedStore(state_dir, image_budget_bytes=int(s.image_budget_mb) << 20,
                      reserve_bytes=int(s.reserve_mb) << 20, jpeg_quality=s.jpeg_quality, save_images=s.save_images)


def make_service(cfg: config_mod.Config, classifier: Classifier, source_factory: Callable[[], Any],
                 kind: str) -> tuple[App, TimedStore, TimedLeds]:
    """The service as ``python -m device run`` builds it (mock GPIO, no page), with the timing store and LEDs;
    not started yet, so the store can read the LEDs' total from the first field."""
    app = build(cfg, classifier=classifier, store=timed_store, source=(source_factory, kind),
                leds=partial(make_leds, driver=TimedLeds), notifier=Notifier(address=""), web=None, start=False)
    assert isinstance(app.store, TimedStore) and isinstance(app.leds, TimedLeds)
    app.store.leds = app.leds
    return app, app.store, app.leds


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# -- analysis (pure) -------------------------------------------------------------------------------------------------


def field_stages(*blocks: list[Rec]) -> dict:
    """Per-field periods and stage times from consecutive records of each block (runs of one Service).

    Period k runs from the capture of field k to the capture of field k+1.
    The screening thread spends it on field k's inference and head, and
    "other" (hand-offs, waiting for the next frame, losing the cores to the
    other threads); the other stages of the period ran on other threads at
    the same time and are given as medians (and their summed time as a
    fraction of the summed period: above 0 but not part of the period).
    """
    periods, stages = [], {s: [] for s in STAGES}
    pairs = [(recs[k], recs[k + 1]) for recs in blocks for k in range(len(recs) - 1)]
    for a, b in pairs:
        period = (b.frame_t - a.frame_t) * 1000
        if period <= 0:
            continue
        t = a.timings
        st = {"capture": float(b.timings.get("capture", 0.0)), "quality": float(t.get("quality", 0.0)),
              "preprocess": float(t.get("preprocess", 0.0)), "inference": float(t.get("invoke", 0.0)),
              "head": float(t.get("head", 0.0)), "record": a.record_ms, "leds": b.leds_total_ms - a.leds_total_ms}
        st["other"] = period - st["inference"] - st["head"]
        periods.append(period)
        for s in STAGES:
            stages[s].append(st[s])
    total = float(np.sum(periods)) if periods else 0.0
    per_stage = {s: {"median_ms": summary(v)["median"], "share": round(float(np.sum(v)) / total, 4) if total else None,
                     "overlapped": s in OVERLAPPED}
                 for s, v in stages.items()}
    return {"periods": periods, "stages": per_stage}


def bare_invoke(model: Any, rgb: np.ndarray, seconds: float, min_runs: int = 10) -> list[float]:
    """The loop's own TFLiteModel, called directly: set input, invoke, read output; on the cores the loop's
    screening thread keeps to (``model.cores``, as ``[model] pin_cores`` makes them), so that both figures of a
    ratio run on the same cores."""
    x = quantize_input(rgb, model.input_spec)
    with pinned(model.cores.interpreter if model.cores else None):
        model.invoke(x)
        out, t_end = [], time.perf_counter() + seconds
        while len(out) < min_runs or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            model.invoke(x)
            out.append((time.perf_counter() - t0) * 1000)
    return out


# -- the loop run ---------------------------------------------------------------------------------------------------


LOOP_SOURCES = ("replay", "camera", "camera-lores")


def loop_source(source: str, model_size: int) -> tuple[Callable[[], Any], str]:
    """A factory for one of LOOP_SOURCES, and its label."""
    if source == "replay":
        return (lambda: ReplaySource(SAMPLES, loop=True)), "replay of device/samples (224 px JPEGs)"
    frames = camera_frames()
    label = f"camera-size frames ({CAMERA_SIZE[0]}x{CAMERA_SIZE[1]} BGR888 buffers, in memory)"
    if source == "camera":
        cam = MemoryCamera(frames)  # its buffers are made once, untimed; every Service reads the same camera
        return (lambda: cam), label
    if source == "camera-lores":
        small = lores_frames(frames, model_size)
        h, w = small[0].shape[:2]
        cam = MemoryCamera(frames, small)
        return (lambda: cam), f"{label} + {w}x{h} YUV420 lores stream (the picamera2 path)"
    raise ValueError(f"unknown loop source {source!r}; choose from {', '.join(LOOP_SOURCES)}")


def run_loop(bundle: Bundle, classifier: Classifier, threads: int, *, source: str, fields: int, warm: int,
             bare_s: float, timeout: float, blocks: int = 5) -> dict:
    """Bare invoke and the loop, interleaved: bare, loop block, bare, ..., loop block, bare.

    Each loop block is a fresh Service on the same state folder running
    ``warm`` untimed fields and then ``fields / blocks`` timed ones; the bare
    segments share ``bare_s``. Interleaving spreads drift on a shared machine
    over both figures of the ratio alike.
    """
    rgb = np.asarray(load_image(list_images(SAMPLES)[0]).resize((bundle.input.size,) * 2), dtype=np.uint8)
    per_block = -(-fields // blocks)
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        state = Path(tmp) / "state"
        cfg = bench_config(bundle.root, threads, state)
        factory, label = loop_source(source, bundle.input.size)
        bare_ms = bare_invoke(classifier.model, rgb, bare_s / (blocks + 1))
        timed: list[list[Rec]] = []
        for _ in range(blocks):
            app, store, _ = make_service(cfg, classifier, factory, source)
            app.service.start()
            try:
                ok = wait_for(lambda store=store: len(store.recs) >= warm + per_block + 1,
                              max(1.0, deadline - time.monotonic()))
            finally:
                app.close()
            recs = store.snapshot()
            if not ok:
                return {"label": label, "error": f"a loop block recorded only {len(recs)} of {warm + per_block + 1} "
                        f"fields within the {timeout:.0f} s time-out"}
            timed.append(recs[warm:warm + per_block + 1])
            bare_ms += bare_invoke(classifier.model, rgb, bare_s / (blocks + 1))
        fs = field_stages(*timed)
        period = summary(fs["periods"])
        bare = summary(bare_ms)
        statuses: dict[str, int] = {}
        for block in timed:
            for r in block[:-1]:
                statuses[r.status] = statuses.get(r.status, 0) + 1
        return {
            "label": label, "fields": len(fs["periods"]), "warm_fields": warm, "blocks": blocks,
            "period_median_ms": period["median"], "period_mean_ms": period["mean"], "period_p95_ms": period["p95"],
            "bare_invoke_median_ms": bare["median"], "bare_invoke_p95_ms": bare["p95"], "bare_runs": bare["n"],
            "ratio": round(period["median"] / bare["median"], 4) if bare["median"] else None,
            "ratio_mean": round(period["mean"] / bare["mean"], 4) if bare["mean"] else None,
            "stages": fs["stages"], "statuses": statuses,
        }


# -- preprocessing / quality / head micro-timings ----------------------------------------------------------------------


def micro(classifier: Classifier, frames: list[np.ndarray], label: str, seconds: float) -> dict:
    """Median ms per frame of the pure per-field steps around the model, on ``frames``."""
    m, head, b = classifier.model, classifier.bundle.head, classifier.bundle
    size = m.input_spec.size
    thresholds = config_mod.Config().quality  # the shipped [quality] defaults
    outs = [m.invoke(quantize_input(frame_to_rgb(f, size), m.input_spec)) for f in frames]
    pre, hd, qual = [], [], []
    t_end = time.perf_counter() + seconds
    i = 0
    while i < 3 * len(frames) or time.perf_counter() < t_end:
        f, q = frames[i % len(frames)], outs[i % len(frames)]
        t0 = time.perf_counter()
        quantize_input(frame_to_rgb(f, size), m.input_spec)
        t1 = time.perf_counter()
        decide(head, evaluate(head, m.dequantize(q)), b.benign, b.thresholds)
        t2 = time.perf_counter()
        assess(f, thresholds)
        t3 = time.perf_counter()
        pre.append((t1 - t0) * 1000)
        hd.append((t2 - t1) * 1000)
        qual.append((t3 - t2) * 1000)
        i += 1
    h, w = frames[0].shape[:2]
    return {"label": f"{label} ({w}x{h})", "preprocess_ms": summary(pre)["median"], "head_ms": summary(hd)["median"],
            "quality_ms": summary(qual)["median"], "preprocess_p95_ms": summary(pre)["p95"],
            "head_p95_ms": summary(hd)["p95"], "n": i}


# -- page load --------------------------------------------------------------------------------------------------------


def _under_page(bundle: Bundle, classifier: Classifier, threads: int, *, warm: int, timeout: float, pairs: int,
                idle_s: float, load: Callable[[str], tuple[dict, float, float]], idle_last: bool = False
                ) -> tuple[list[tuple[str, float, float]], list[dict], list] | dict:
    """The replay loop with the real web page on 127.0.0.1, ``pairs`` x (idle, load) phases (and an idle one last).

    ``load(url)`` runs one load phase and returns (its stats, start, end in epoch s). Returns the phases, the
    load stats and the loop's records, or ``{"error": ...}``.
    """
    from device import web

    with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp:
        state = Path(tmp) / "state"
        cfg = bench_config(bundle.root, threads, state)
        app, store, _ = make_service(cfg, classifier, lambda: ReplaySource(SAMPLES, loop=True), "replay")
        app.service.start()
        server = web.serve(app.service, "127.0.0.1", 0)
        phases: list[tuple[str, float, float]] = []
        stats: list[dict] = []
        try:
            if not wait_for(lambda: len(store.recs) >= warm, timeout):
                return {"error": f"the loop recorded only {len(store.recs)} fields in {timeout:.0f} s"}
            url = f"http://127.0.0.1:{server.port}"
            for name in ("idle", "load") * pairs + (("idle",) if idle_last else ()):
                if name == "idle":
                    t0 = time.time()
                    time.sleep(idle_s)
                    phases.append((name, t0, time.time()))
                else:
                    st, t0, t1 = load(url)
                    stats.append(st)
                    phases.append((name, t0, t1))
        finally:
            server.close()
            app.close()
        return phases, stats, store.snapshot()


def _period(phases: list[tuple[str, float, float]], recs: list, kind: str) -> tuple[float | None, int]:
    """Mean time per field (ms) over the phases of ``kind``: capture-time spans / intervals, and the intervals."""
    spans, n = 0.0, 0
    for name, t0, t1 in phases:
        if name != kind:
            continue
        ts = [r.frame_t for r in recs if t0 <= r.frame_t <= t1]
        if len(ts) >= 2:
            spans += ts[-1] - ts[0]
            n += len(ts) - 1
    return (spans / n * 1000 if n else None), n


def run_page_load(bundle: Bundle, classifier: Classifier, threads: int, *, clients: int, interval_s: float,
                  phase_s: float, paths: tuple[str, ...], warm: int, timeout: float, pairs: int = 3) -> dict:
    """Polling clients: ``pairs`` x (idle, load) phases of ``phase_s`` each."""
    got = _under_page(bundle, classifier, threads, warm=warm, timeout=timeout, pairs=pairs, idle_s=phase_s,
                      load=lambda url: _clients(url, clients, interval_s, phase_s, paths))
    if isinstance(got, dict):
        return got
    phases, client_stats, recs = got
    idle, n_idle = _period(phases, recs, "idle")
    load, n_load = _period(phases, recs, "load")
    lat = [x for s in client_stats for x in s.get("latencies_ms", [])]
    reqs = sum(s.get("requests", 0) for s in client_stats)
    secs = sum(s.get("seconds", 0.0) for s in client_stats)
    if any(s.get("error") for s in client_stats):
        return {"error": "; ".join(s["error"] for s in client_stats if s.get("error"))}
    return {
        "clients": clients, "interval_s": interval_s, "paths": list(paths), "seconds_per_phase": phase_s,
        "phases": [p[0] for p in phases], "idle_fields": n_idle, "load_fields": n_load,
        "idle_period_ms": round(idle, 3) if idle else None, "load_period_ms": round(load, 3) if load else None,
        "ratio": round(load / idle, 4) if idle and load else None,
        "requests": reqs, "req_per_s": round(reqs / secs, 1) if secs else None,
        "errors": sum(s.get("errors", 0) for s in client_stats),
        "latency_ms": {k: summary(lat)[k] for k in ("median", "p95")},
        "client_cpu_s": round(sum(s.get("cpu_s", 0.0) for s in client_stats), 2),
    }


def run_page_burst(bundle: Bundle, classifier: Classifier, threads: int, *, size: int, bursts: int, idle_s: float,
                   warm: int, timeout: float) -> dict:
    """``bursts`` x (idle, burst of ``size`` concurrent GET /api/status), then idle: the loop's slow-down.

    The reliability suite checks that every such request is answered and the loop goes on; how much slower it
    goes is this figure (target 1.10), machine-dependent and so measured here rather than asserted in a test.
    """
    def burst(url: str) -> tuple[dict, float, float]:
        port = url.rsplit(":", 1)[1]
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "bench.burst", port, str(size)], cwd=ROOT, capture_output=True,
                           text=True, timeout=timeout)
        t1 = time.time()
        if r.returncode != 0 or not r.stdout:
            return {"error": f"burst client failed (exit {r.returncode}): {r.stderr.strip()[-300:]}"}, t0, t1
        return json.loads(r.stdout), t0, t1

    got = _under_page(bundle, classifier, threads, warm=warm, timeout=timeout, pairs=bursts, idle_s=idle_s,
                      load=burst, idle_last=True)
    if isinstance(got, dict):
        return got
    phases, stats, recs = got
    if any(s.get("error") for s in stats):
        return {"error": "; ".join(s["error"] for s in stats if s.get("error"))}
    idle, n_idle = _period(phases, recs, "idle")
    load, n_load = _period(phases, recs, "load")
    return {"size": size, "bursts": bursts, "idle_s": idle_s, "idle_fields": n_idle, "burst_fields": n_load,
            "idle_period_ms": round(idle, 3) if idle else None, "burst_period_ms": round(load, 3) if load else None,
            "ratio": round(load / idle, 4) if idle and load else None,
            "answered_200": sum(s.get("codes", {}).get("200", 0) for s in stats), "requests": size * bursts,
            "burst_seconds": [s.get("seconds") for s in stats], "slowest_s": max(s.get("slowest", 0) for s in stats)}


def _clients(url: str, clients: int, interval_s: float, seconds: float, paths: tuple[str, ...]
             ) -> tuple[dict, float, float]:
    """Run the client process (``python -m bench.clients``); returns its stats and the load window (epoch s)."""
    cmd = [sys.executable, "-m", "bench.clients", "--url", url, "--clients", str(clients), "--interval",
           str(interval_s), "--seconds", str(seconds), "--paths", ",".join(paths)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        return {"error": "the page-load clients did not finish"}, 0.0, 0.0
    if proc.returncode != 0:
        return {"error": f"page-load clients failed (exit {proc.returncode}): {err.strip()[-300:]}"}, 0.0, 0.0
    stats = json.loads(out.strip().splitlines()[-1])
    return stats, float(stats["t_start"]), float(stats["t_end"])

