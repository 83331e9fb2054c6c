"""The one adapter around the TFLite runtimes.

ai-edge-litert (Google's current wheel) is preferred; tflite-runtime is the
fallback on images that only ship that. Both are imported lazily, here and
nowhere else, so the rest of ``device/`` (and its tests) never needs them.
The Edge TPU delegate is used only when ``libedgetpu.so.1`` loads *and* the
bundle has an Edge-TPU-compiled model; otherwise the CPU (XNNPACK) runs the
bundle's CPU graph (native LEAKY_RELU). The bundle's uncompiled
Edge-TPU-friendly graph (LeakyReLU rewritten as MUL/MINIMUM/RELU/ADD) is the
compiler's input only: on a CPU the rewrite is several times slower.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from device.errors import BundleError, RuntimeUnavailableError
from device.preprocess import InputSpec
from device.priority import CoreSplit, pinned, split_cores
from device.tflite_check import check_tflite

log = logging.getLogger(__name__)

EDGETPU_LIB = "libedgetpu.so.1"


def _import_runtime():
    """Return (Interpreter, load_delegate, runtime description)."""
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate  # type: ignore

        return Interpreter, load_delegate, f"ai-edge-litert {runtime_version('ai-edge-litert')}"
    except ImportError as first:
        try:
            from tflite_runtime.interpreter import Interpreter, load_delegate  # type: ignore

            return Interpreter, load_delegate, f"tflite-runtime {runtime_version('tflite-runtime')}"
        except ImportError as exc:
            raise RuntimeUnavailableError(
                "no TFLite runtime: install ai-edge-litert (`pip install ai-edge-litert`) "
                "or, on older Raspberry Pi OS images, tflite-runtime"
            ) from (exc or first)


#: The most interpreter threads the default gives (the Pi 4/5 have 4 cores; XNNPACK gains little beyond).
MAX_DEFAULT_THREADS = 4


def interpreter_threads(configured: int = 0, cores: int | None = None) -> int:
    """``[model] threads``: the configured count, or for 0 (the default) the cores this process may use but one,
    at least 1 and at most :data:`MAX_DEFAULT_THREADS`.

    The core left over runs what the loop does besides the invoke (capture, change detection, quality gate and
    preparation of the next frame; JPEG, SQLite commit and LEDs of the last one) and the page. Measured on a
    2-core x86 box (issue 13): with 1 thread the loop runs at 1.07x its bare invoke and a page under load slows it
    by 2%; with 2 threads each field's ~6 ms of other work takes the interpreter's cores (1.6-2.2x its bare invoke,
    10-13% slower under page load), though the idle loop is up to ~20% faster.
    """
    if configured:
        return int(configured)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DEFAULT_THREADS, cores - 1))


def runtime_version(dist: str) -> str:
    """The installed version of a runtime's distribution (``ai-edge-litert``, ...), or "unknown"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class OutputSpec:
    size: int
    scale: float
    zero_point: int
    dtype: str


class TFLiteModel:
    """A loaded int8 feature extractor: int8 NHWC in, int8 feature vector out.

    ``num_threads`` 0 is ``[model] threads = 0``: :func:`interpreter_threads` picks the count. ``pin_cores``
    (the service's ``[model] pin_cores``): when a core is left over, ``cores`` is the split
    (:func:`device.priority.split_cores`) and the interpreter's own worker threads are made on its cores.
    """

    def __init__(self, path: Path, *, num_threads: int = 4, edgetpu_path: Path | None = None,
                 use_edgetpu: bool = True, pin_cores: bool = False):
        Interpreter, load_delegate, self.runtime = _import_runtime()
        self.delegate = "cpu"
        self.path = Path(path)
        check_tflite(self.path)  # a damaged file crashes the runtime (segfault) instead of raising
        interp = None
        if edgetpu_path is not None and use_edgetpu:
            try:
                check_tflite(edgetpu_path)
                delegate = load_delegate(EDGETPU_LIB)
                interp = Interpreter(model_path=str(edgetpu_path), experimental_delegates=[delegate])
                self.delegate, self.path = "edgetpu", Path(edgetpu_path)
            except (ValueError, OSError, RuntimeError) as exc:
                log.info("Edge TPU not used (%s); running on the CPU", exc)
        self.threads = interpreter_threads(num_threads)
        self.cores: CoreSplit | None = None
        if interp is None:
            self.cores = split_cores(self.threads) if pin_cores else None
            try:
                with pinned(self.cores.interpreter if self.cores else None):  # XNNPACK's pool threads start here
                    interp = Interpreter(model_path=str(path), num_threads=self.threads)
            except (ValueError, RuntimeError) as exc:
                raise BundleError(f"{path}: the TFLite runtime cannot load this model ({exc}); "
                                  "rebuild the bundle with `make convert`") from exc
        interp.allocate_tensors()
        self._interp = interp
        inp, out = interp.get_input_details(), interp.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise BundleError(f"{path}: model has {len(inp)} inputs and {len(out)} outputs; expected 1 and 1")
        self._in, self._out = inp[0], out[0]
        shape = tuple(int(s) for s in self._in["shape"])
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or shape[1] != shape[2]:
            raise BundleError(f"{path}: input shape {shape}; expected (1, S, S, 3) NHWC RGB")
        in_scale, in_zp = self._in["quantization"]
        out_scale, out_zp = self._out["quantization"]
        self.input_spec = InputSpec(size=shape[1], scale=float(in_scale) or 1.0, zero_point=int(in_zp),
                                    dtype=np.dtype(self._in["dtype"]).name)
        self.output_spec = OutputSpec(size=int(np.prod(self._out["shape"])), scale=float(out_scale),
                                      zero_point=int(out_zp), dtype=np.dtype(self._out["dtype"]).name)
        if self.input_spec.dtype not in ("int8", "uint8"):
            raise BundleError(f"{path}: input dtype {self.input_spec.dtype}; the appliance ships full-integer models")

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one quantized input; returns the raw quantized output vector."""
        self._interp.set_tensor(self._in["index"], x)
        self._interp.invoke()
        return self._interp.get_tensor(self._out["index"]).reshape(-1).copy()

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """real = scale * (q - zero_point), in float32 (int32 first: int8 - zp overflows int8)."""
        o = self.output_spec
        if o.scale == 0.0:  # float output
            return q.astype(np.float32)
        return ((q.astype(np.int32) - o.zero_point) * o.scale).astype(np.float32)
