"""The bare interpreter: the shipped int8 TFLite beside float32 TFLite and onnxruntime float32.

When the bundle also holds the Edge-TPU-friendly int8 graph, it is timed on
the CPU too (it never runs there on the device: this row shows why), and the
two int8 graphs' features and decisions are compared on the same images.

The peers are built once from the bundle's trained weights (``source/...pt``,
named in the manifest) and cached under ``build/bench/<sha256>-<size>/``, so
re-runs start at once. All three models are timed in the same run, round
robin (so drift on a shared machine hits each alike), on the same input,
with the same thread count; one call is what an application makes: set the
input, run, read the output.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.stats import summary
from device.bundle import Bundle, sha256_file
from device.inference import TFLiteModel
from device.preprocess import quantize_input

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 480


@dataclass(frozen=True)
class Peers:
    onnx: Path
    tflite_f32: Path
    cached: bool
    build_s: float


def weights_path(bundle: Bundle) -> Path | None:
    entry = (bundle.manifest.get("files") or {}).get("weights")
    if not entry:
        return None
    p = bundle.root / entry["path"]
    return p if p.is_file() else None


def ensure_peers(bundle: Bundle, build_root: Path) -> Peers:
    """Float peers of the bundle's weights, from the cache or built now (subprocess, torch + onnx2tf)."""
    w = weights_path(bundle)
    if w is None:
        raise FileNotFoundError(f"{bundle.root / 'manifest.json'} names no trained weights (files.weights) or the "
                                "file is missing; the float peers cannot be built")
    key = f"{sha256_file(w)[:24]}-{bundle.input.size}"
    final = build_root / key
    onnx, f32 = final / "darknet19.onnx", final / "darknet19_float32.tflite"
    if onnx.is_file() and f32.is_file():
        return Peers(onnx, f32, True, 0.0)
    tmp = build_root / f".{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    logf = build_root / f"{key}.log"
    t0 = time.perf_counter()
    log.info("building the float peers of %s (once; cached in %s)", w, final)
    with open(logf, "w") as lf:
        try:
            rc = subprocess.run([sys.executable, "-m", "bench.build_peers", "--weights", str(w), "--size",
                                 str(bundle.input.size), "--out", str(tmp)], cwd=ROOT, stdout=lf,
                                stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    if rc != 0:
        tail = logf.read_text(errors="replace")[-600:]
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"building the float peers failed (exit {rc}); log {logf}: ...{tail}")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return Peers(onnx, f32, False, round(time.perf_counter() - t0, 1))


# -- runners ------------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    name: str
    runtime: str
    path: Path
    call: Callable[[], np.ndarray]  # one inference on the fixed input
    features: Callable[[np.ndarray], np.ndarray]  # uint8 SxSx3 RGB -> float 1000-d


INT8_NAME = "int8 TFLite (shipped CPU graph)"
FRIENDLY_NAME = "int8 TFLite, Edge-TPU-friendly graph, on the CPU"
F32_NAME = "float32 TFLite (onnx2tf)"


def int8_runner(path: Path, threads: int, rgb: np.ndarray, name: str = INT8_NAME) -> tuple[Runner, TFLiteModel]:
    m = TFLiteModel(path, num_threads=threads, use_edgetpu=False)
    x = quantize_input(rgb, m.input_spec)
    return (Runner(name, m.runtime, path, lambda: m.invoke(x),
                   lambda im: m.dequantize(m.invoke(quantize_input(im, m.input_spec)))), m)


def tflite_f32_runner(path: Path, threads: int, rgb: np.ndarray) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    from device.inference import runtime_version

    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    nchw = tuple(inp["shape"])[1] == 3 and tuple(inp["shape"])[3] != 3

    def prep(im: np.ndarray) -> np.ndarray:
        x = im.astype(np.float32)[None]
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if nchw else x

    x0 = prep(rgb)

    def run(x: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out["index"]).reshape(-1).copy()

    return Runner(F32_NAME, f"ai-edge-litert {runtime_version('ai-edge-litert')}", path,
                  lambda: run(x0), lambda im: run(prep(im)))


def onnx_runner(path: Path, threads: int, rgb: np.ndarray) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def prep(im: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(im.astype(np.float32)[None].transpose(0, 3, 1, 2))

    x0 = prep(rgb)
    return Runner("float32 ONNX", f"onnxruntime {ort.__version__}", path,
                  lambda: sess.run(None, {name: x0})[0].reshape(-1),
                  lambda im: sess.run(None, {name: prep(im)})[0].reshape(-1))


def time_round_robin(runners: list[Runner], seconds: float, rounds: int = 3, warmup: int = 3,
                     min_runs: int = 10) -> dict[str, list[float]]:
    """Each runner for ``seconds / rounds`` per round (at least ``min_runs`` calls in total), ms per call."""
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for r in runners:
        for _ in range(warmup):
            r.call()
    per_round = seconds / rounds
    need = max(1, -(-min_runs // rounds))
    for _ in range(rounds):
        for r in runners:
            t_end = time.perf_counter() + per_round
            done = 0
            while done < need or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                r.call()
                times[r.name].append((time.perf_counter() - t0) * 1000)
                done += 1
    return times


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def measure(bundle: Bundle, threads: int, images: list[np.ndarray], build_root: Path, seconds: float) -> dict:
    """The bare section of results.json."""
    rgb = images[0]
    int8, _model = int8_runner(bundle.model_path, threads, rgb)
    runners = [int8]
    friendly = None
    if bundle.edgetpu_friendly_path is not None:
        friendly, _ = int8_runner(bundle.edgetpu_friendly_path, threads, rgb, FRIENDLY_NAME)
        runners.append(friendly)
    errors: list[str] = []
    peers_info: dict = {}
    try:
        peers = ensure_peers(bundle, build_root)
        peers_info = {"dir": str(peers.onnx.parent), "cached": peers.cached, "build_s": peers.build_s}
        try:
            runners.append(tflite_f32_runner(peers.tflite_f32, threads, rgb))
        except Exception as exc:  # a peer that cannot load is reported, the rest still runs
            errors.append(f"float32 TFLite: {type(exc).__name__}: {exc}")
        try:
            runners.append(onnx_runner(peers.onnx, threads, rgb))
        except Exception as exc:
            errors.append(f"onnxruntime: {type(exc).__name__}: {exc}")
    except Exception as exc:
        errors.append(f"peers: {exc}")
    times = time_round_robin(runners, seconds)
    base = summary(times[int8.name])["median"]
    models = []
    for r in runners:
        s = summary(times[r.name])
        models.append({"name": r.name, "runtime": r.runtime, "file": str(r.path), "bytes": r.path.stat().st_size,
                       "median_ms": s["median"], "p95_ms": s["p95"], "mean_ms": s["mean"], "n": s["n"],
                       "vs_int8": round(s["median"] / base, 3) if base else None})
    agreement = None
    by = {r.name: r for r in runners}
    onnx = next((r for r in runners if r.runtime.startswith("onnxruntime")), None)
    f32 = next((r for r in runners if r.name.startswith("float32 TFLite")), None)
    if onnx is not None:
        worst_i8, worst_f = 1.0, 1.0
        for im in images:
            ref = onnx.features(im)
            worst_i8 = min(worst_i8, cosine(by[int8.name].features(im), ref))
            if f32 is not None:
                worst_f = min(worst_f, cosine(f32.features(im), ref))
        agreement = {"images": len(images), "int8_vs_onnx": round(worst_i8, 5),
                     "f32_tflite_vs_onnx": round(worst_f, 7) if f32 is not None else None}
    f32_ms = next((m["median_ms"] for m in models if m["name"] == F32_NAME), None)
    return {"models": models, "agreement": agreement, "peers": peers_info, "errors": errors,
            "seconds_per_model": seconds, "threads": threads,
            "int8_vs_float32_tflite": round(base / f32_ms, 4) if base and f32_ms else None,
            "graphs": graph_agreement(bundle, int8, friendly, images) if friendly is not None else None}


def graph_agreement(bundle: Bundle, cpu: Runner, friendly: Runner, images: list[np.ndarray]) -> dict:
    """The two int8 graphs of one bundle on the same images: worst feature cosine, decisions (status, label, ALL)."""
    from convert.quantize import decisions_agreement

    feats = [np.stack([r.features(im) for im in images]) for r in (cpu, friendly)]
    return decisions_agreement(bundle.head, bundle.benign, bundle.thresholds, *feats)
