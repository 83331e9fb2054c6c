"""Multiply-accumulates of a TFLite graph, walked from the model itself, and the Pi/Coral estimates.

Only the ops that do the arithmetic are counted (convolutions and fully
connected layers); element-wise ops, pooling and the mean are a rounding
error beside them and are conventionally left out of MAC figures (the public
ResNet-50 / VGG16 figures the estimates use count the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Public figures the estimates are scaled from (see ESTIMATE_SOURCES).
PI4_NCNN_INT8 = (("ResNet50", 4.1e9, 0.197), ("VGG16", 15.5e9, 0.394))  # (model, MACs, seconds), 4 threads
CORAL_USB_RESNET50 = (4.1e9, 0.049)  # MACs, seconds
PI5_OVER_PI4 = (2.0, 3.0)  # ASSUMPTION: a Pi 5 runs the same int8 CPU kernels 2-3x faster than a Pi 4
ESTIMATE_SOURCES = (
    "Pi 4: ncnn int8 benchmark, 4 threads: ResNet50 197 ms (4.1 GMAC), VGG16 394 ms (15.5 GMAC); "
    "Pi 5: ASSUMED 2-3x a Pi 4; Coral USB: ResNet-50 about 49 ms. Time = this model's MACs / the MAC rate "
    "those figures imply. Different runtime (ncnn vs TFLite/XNNPACK), memory traffic and op mix: a "
    "planning ESTIMATE, not a measurement."
)


@dataclass(frozen=True)
class OpMacs:
    index: int
    op: str
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    macs: int


def op_macs(op_name: str, output_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """MACs of one op from its output and weight shapes (TFLite layouts); 0 for ops that are not counted.

    CONV_2D: weights (Cout, kh, kw, Cin/groups), output (N, H, W, Cout): N*H*W*Cout*kh*kw*Cin.
    DEPTHWISE_CONV_2D: weights (1, kh, kw, Cout), each output takes kh*kw inputs.
    FULLY_CONNECTED: weights (units, in); output (..., units).
    """
    out = [int(s) for s in output_shape]
    w = [int(s) for s in weight_shape]
    if op_name == "CONV_2D" and len(out) == 4 and len(w) == 4:
        n, h, wd, c_out = out
        _, kh, kw, c_in = w
        return n * h * wd * c_out * kh * kw * c_in
    if op_name == "DEPTHWISE_CONV_2D" and len(out) == 4 and len(w) == 4:
        n, h, wd, c_out = out
        _, kh, kw, _ = w
        return n * h * wd * c_out * kh * kw
    if op_name == "FULLY_CONNECTED" and len(w) == 2 and out:
        rows = int(np.prod(out[:-1])) if len(out) > 1 else 1
        return rows * w[0] * w[1]
    return 0


COUNTED = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})


def graph_macs(model_path: Path) -> list[OpMacs]:
    """Per-op MACs of a .tflite model, from the interpreter's own op and tensor details."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model_path))
    tensors = {int(t["index"]): t for t in interp.get_tensor_details()}
    rows: list[OpMacs] = []
    for op in interp._get_ops_details():  # noqa: SLF001 - the public API has no op listing
        name = op["op_name"]
        if name not in COUNTED:
            continue
        inputs = [int(i) for i in op["inputs"] if int(i) >= 0]
        outputs = [int(i) for i in op["outputs"] if int(i) >= 0]
        if len(inputs) < 2 or not outputs:
            continue
        w_shape = tuple(int(s) for s in tensors[inputs[1]]["shape"])
        o_shape = tuple(int(s) for s in tensors[outputs[0]]["shape"])
        rows.append(OpMacs(int(op["index"]), name, o_shape, w_shape, op_macs(name, o_shape, w_shape)))
    return rows


def estimates(macs: int) -> dict:
    """ESTIMATED invoke times (ms) on a Pi 4, Pi 5 and Coral USB for a graph of ``macs`` MACs."""
    rates = {name: m / s for name, m, s in PI4_NCNN_INT8}  # MAC/s implied by each public figure
    pi4 = sorted(macs / r * 1000 for r in rates.values())  # fastest, slowest (ms)
    pi5 = [pi4[0] / PI5_OVER_PI4[1], pi4[1] / PI5_OVER_PI4[0]]
    coral_rate = CORAL_USB_RESNET50[0] / CORAL_USB_RESNET50[1]
    return {
        "label": "ESTIMATE (scaled from public figures, not measured)",
        "pi4_ms": [round(pi4[0], 3), round(pi4[1], 3)],
        "pi4_rates_gmac_s": {k: round(v / 1e9, 1) for k, v in rates.items()},
        "pi5_ms": [round(pi5[0], 3), round(pi5[1], 3)],
        "pi5_assumption": f"Pi 5 = {PI5_OVER_PI4[0]:g}-{PI5_OVER_PI4[1]:g}x a Pi 4 (ASSUMPTION)",
        "coral_usb_ms": round(macs / coral_rate * 1000, 3),
        "coral_rate_gmac_s": round(coral_rate / 1e9, 1),
        "sources": ESTIMATE_SOURCES,
    }
