"""ONNX -> full-integer int8 TFLite with onnx2tf, calibrated on real images.

Quantization: per-channel int8 weights, int8 activations, int8 input and
output tensors. The graph's input is raw RGB pixels 0..255 (normalisation is
inside the network), so the calibrated input quantization is scale 1.0, zero
point -128: the device feeds ``pixel - 128`` with no rounding at all.

Activation ranges: the converter's calibrator records each tensor's min/max over the calibration images, and
the shipped graphs keep them. ``python -m convert quantize --range-percentile P`` sets them at a high
percentile instead (:func:`narrow_ranges`), so that a few rare large activations do not coarsen the rounding
of every other value; measured on validation and not adopted (README: the model).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# onnx2tf checks its output against this sample file and downloads it when it
# is missing, which crashes offline; we write it ourselves from real images.
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
#: Images whose activations set the percentile ranges of ``--range-percentile`` (evenly spaced through the
#: calibration set) ...
RANGE_IMAGES = 64
#: ... each tensor read at every 3rd value (per image, DarkNet19 at 224 px: about 535,000 values of the first
#: convolution's output, 16,000 of the last's).
RANGE_STRIDE = 3


@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def to_int8_tflite(onnx_path: Path, calib_rgb: np.ndarray, out_dir: Path, *, edgetpu_friendly: bool = True,
                   range_percentile: float | None = None) -> Path:
    """Convert and return the path of the full-integer model.

    ``calib_rgb`` is (N,S,S,3) uint8 produced by ``device.preprocess`` (the
    same code the Pi runs), fed to the calibrator as the pixels they are.

    ``edgetpu_friendly`` rewrites LeakyReLU as ``max(x, 0.1x)`` out of
    MUL/MINIMUM/RELU/ADD (the Edge TPU has no LEAKY_RELU kernel). On a CPU that
    rewrite costs ~4x the whole invoke (see ``bench/ops.py``), so the CPU
    graph keeps the native LEAKY_RELU: use :func:`to_int8_graphs` for both.
    """
    import onnx2tf
    from PIL import Image


    out_dir = Path(out_dir).resolve()
    onnx_path = Path(onnx_path).resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    calib = calib_rgb.astype(np.float32)
    sample = np.stack([np.asarray(Image.fromarray(im).resize((128, 128), Image.Resampling.BILINEAR))
                       for im in calib_rgb[:20]]).astype(np.float32) / 255.0
    np.save(out_dir / ONNX2TF_SAMPLE, sample)
    with _cwd(out_dir):
        # onnx2tf builds the TF graph (and its float32 TFLite); its own int8 path would calibrate four times
        # (integer, full-integer, and both again with int16 activations), so the one graph we ship is
        # calibrated here, once, with the converter settings onnx2tf uses for its full-integer model.
        onnx2tf.convert(
            input_onnx_file_path=str(onnx_path),
            output_folder_path=str(out_dir / "tf"),
            output_signaturedefs=True,
            # Edge TPU has no LEAKY_RELU kernel: rewrite as max(x, 0.1x) with supported ops.
            replace_to_pseudo_operators=["leakyrelu"] if edgetpu_friendly else [],
            non_verbose=True,
        )
    out = out_dir / "tf" / f"{onnx_path.stem}_full_integer_quant.tflite"
    out.write_bytes(_full_integer(out_dir / "tf", calib, range_percentile))
    return out


def _full_integer(saved_model: Path, calib: np.ndarray, range_percentile: float | None = None) -> bytes:
    """Per-channel int8 weights, int8 activations, int8 input and output, calibrated on ``calib`` (N,S,S,3).

    ``range_percentile=None``: the converter in one call (each activation's range is its min/max). Otherwise
    the same converter in its two halves, calibrate then quantize, with the ranges set between them
    (:func:`narrow_ranges`).
    """
    if range_percentile is None:
        return _converter(saved_model, calib).convert()
    return quantize_calibrated(narrow_ranges(calibrate(saved_model, calib), calib, range_percentile))


def _converter(saved_model: Path, calib: np.ndarray):
    import tensorflow as tf

    sig = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    (name,) = sig.structured_input_signature[1].keys()

    def samples():
        for i in range(len(calib)):
            yield {name: tf.convert_to_tensor(calib[i:i + 1], tf.float32)}

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter._experimental_disable_per_channel = False  # noqa: SLF001 (per-channel weights, as onnx2tf's default)
    converter.representative_dataset = samples
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter


def calibrate(saved_model: Path, calib: np.ndarray) -> bytes:
    """The float graph with each tensor's min/max over ``calib``: the converter's first half."""
    converter = _converter(saved_model, calib)
    converter._experimental_calibrate_only = True  # noqa: SLF001
    return converter.convert()


def quantize_calibrated(calibrated: bytes) -> bytes:
    """The converter's second half: what ``TFLiteConverter.convert()`` runs after calibrating (per-channel)."""
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize

    return mlir_quantize(calibrated, False, input_data_type=tf.int8, output_data_type=tf.int8)


def narrow_ranges(calibrated: bytes, calib: np.ndarray, percentile: float,
                  images: int = RANGE_IMAGES) -> bytes:
    """Each activation's recorded range narrowed to the ``percentile`` of its values on ``images`` of ``calib``.

    int8 spends its 256 steps on [min, max] of what the calibrator saw, and a handful of rare large activations
    set that max (here 1.3-1.9x the 99.99th percentile). A range at a high percentile rounds every value of
    the layer finer and clips only those few. Ranges only narrow, always keep 0 (LeakyReLU's and the zero
    point's), and the graph's input (raw pixels, scale 1) and output (the features) keep the calibrator's.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    sub = model.subgraphs[0]
    io = {int(i) for i in sub.inputs} | {int(i) for i in sub.outputs}
    ranged = [i for i, t in enumerate(sub.tensors) if i not in io and t.quantization is not None
              and t.quantization.min is not None and len(t.quantization.min) == 1]
    # Built-in float kernels: a delegate's intermediate tensors cannot be read.
    it = Interpreter(model_content=calibrated, num_threads=2, experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    inp = it.get_input_details()[0]["index"]
    values: dict[int, list[np.ndarray]] = {i: [] for i in ranged}
    for k in np.linspace(0, len(calib) - 1, min(images, len(calib))).round().astype(int):
        it.set_tensor(inp, calib[k:k + 1].astype(np.float32))
        it.invoke()
        for i in ranged:
            values[i].append(it.get_tensor(i).ravel()[::RANGE_STRIDE])
    for i in ranged:
        lo, hi = np.percentile(np.concatenate(values[i]), [100 - percentile, percentile])
        q = sub.tensors[i].quantization
        q.min = np.array([max(float(q.min[0]), min(float(lo), 0.0))], np.float32)
        q.max = np.array([min(float(q.max[0]), max(float(hi), 0.0))], np.float32)
    log.info("activation ranges: %d tensors set at the %g/%g percentiles of %d calibration images",
             len(ranged), 100 - percentile, percentile, min(images, len(calib)))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


@dataclass(frozen=True)
class Int8Graphs:
    """The two int8 graphs of one bundle, calibrated on the same images.

    ``cpu``: native LEAKY_RELU, what XNNPACK runs on every Pi. ``edgetpu_friendly``:
    LeakyReLU rewritten for the Edge TPU compiler, used only with the Edge TPU
    delegate (compile *this* one with :func:`compile_edgetpu`).
    """

    cpu: Path
    edgetpu_friendly: Path | None
    cpu_op_types: dict[str, int]
    edgetpu_friendly_op_types: dict[str, int] | None


def to_int8_graphs(onnx_path: Path, calib_rgb: np.ndarray, work_dir: Path, *, cpu_dest: Path,
                   edgetpu_friendly_dest: Path | None = None, range_percentile: float | None = None) -> Int8Graphs:
    """Convert twice from one calibration set; copy the graphs to their destinations.

    onnx2tf applies the LeakyReLU rewrite while building the TF graph, so one
    run cannot emit both; two runs on the same ``calib_rgb`` give the same
    activation ranges up to the rewrite itself. ``edgetpu_friendly_dest=None``
    skips the second conversion.
    """
    work_dir = Path(work_dir)
    cpu = to_int8_tflite(onnx_path, calib_rgb, work_dir / "cpu", edgetpu_friendly=False,
                         range_percentile=range_percentile)
    Path(cpu_dest).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cpu, cpu_dest)
    etpu = None
    if edgetpu_friendly_dest is not None:
        out = to_int8_tflite(onnx_path, calib_rgb, work_dir / "edgetpu", edgetpu_friendly=True,
                             range_percentile=range_percentile)
        Path(edgetpu_friendly_dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, edgetpu_friendly_dest)
        etpu = Path(edgetpu_friendly_dest)
    return Int8Graphs(Path(cpu_dest), etpu, op_types(cpu_dest), op_types(etpu) if etpu is not None else None)


def decisions_agreement(head, benign: str, thresholds, feats_a: np.ndarray, feats_b: np.ndarray) -> dict:
    """Two graphs' features of the same images (rows): worst cosine, and how often the decisions agree.

    A decision is the device's (status, label, ALL flag) from ``device.classifier.decide``: what the
    technician would be told.
    """
    from device.classifier import decide
    from device.head import evaluate_many

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)

    def decisions(f: np.ndarray) -> list[tuple]:
        return [(v.status, v.label, v.all) for v in
                (decide(head, o, benign, thresholds) for o in evaluate_many(head, f))]

    da, db = decisions(a), decisions(b)
    same = sum(x == y for x, y in zip(da, db))
    return {"images": len(a), "worst_feature_cosine": round(float(cos.min()), 5),
            "median_feature_cosine": round(float(np.median(cos)), 5), "decisions_agree": int(same),
            "decision_agreement": round(same / len(a), 5) if len(a) else None}


def graph_agreement(cpu_path: Path, friendly_path: Path, rgb: np.ndarray, head, benign: str, thresholds,
                    threads: int = 2) -> dict:
    """Both int8 graphs through the device's own feature code on ``rgb`` (N,S,S,3), compared (for REPORT.md)."""
    from device.classifier import model_features
    from device.inference import TFLiteModel

    feats = []
    for path in (cpu_path, friendly_path):
        model = TFLiteModel(path, num_threads=threads, use_edgetpu=False)
        feats.append(np.stack([model_features(model, im) for im in rgb]))
    return decisions_agreement(head, benign, thresholds, *feats)


def op_types(model_path: Path) -> dict[str, int]:
    """Op types of the final graph and their counts (from the interpreter itself)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model_path))
    counts: dict[str, int] = {}
    for op in interp._get_ops_details():  # noqa: SLF001 (the public API has no op listing)
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return dict(sorted(counts.items()))


def compile_edgetpu(model_path: Path, out_dir: Path) -> Path | None:
    """Run Coral's ``edgetpu_compiler`` when installed; otherwise say what to install."""
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        log.warning("edgetpu_compiler not found: the bundle ships without an Edge TPU model. Install it from "
                    "Coral's apt repository (x86-64 only): https://coral.ai/docs/edgetpu/compiler/ "
                    "(apt-get install edgetpu-compiler), then run `python -m convert edgetpu`")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-s", "-o", str(out_dir), str(model_path)], check=True)
    out = out_dir / (model_path.stem + "_edgetpu.tflite")
    return out if out.exists() else None
