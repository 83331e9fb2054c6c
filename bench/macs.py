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

#: Public figures the CPU estimates are scaled from (see ESTIMATE_SOURCES).
PI4_NCNN_INT8 = (("ResNet50", 4.1e9, 0.197), ("VGG16", 15.5e9, 0.394))  # (model, MACs, seconds), 4 threads
PI5_OVER_PI4 = (2.0, 3.0)  # ASSUMPTION: a Pi 5 runs the same int8 CPU kernels 2-3x faster than a Pi 4
#: Edge TPU (Coral USB Accelerator / M.2): 4 TOPS peak = 2 TMAC/s; 8 MB of on-chip SRAM, which the compiler
#: uses to cache parameters; parameters that do not fit are streamed from the host on every inference.
EDGETPU_PEAK_MAC_S = 2.0e12
EDGETPU_SRAM_BYTES = 8 * 1024 * 1024
EDGETPU_UTILISATION = 0.25  # ASSUMPTION for the planning figure: a quarter of peak on 3x3 convs
USB3_BYTES_S = (400e6, 300e6)  # ASSUMPTION: effective USB 3 throughput to the Coral USB Accelerator, best..worst
ESTIMATE_SOURCES = (
    "Pi 4: ncnn int8 benchmark, 4 threads: ResNet50 197 ms (4.1 GMAC), VGG16 394 ms (15.5 GMAC); time = this "
    "model's MACs / the MAC rate those figures imply (different runtime: ncnn, not TFLite/XNNPACK; valid only for "
    "a graph whose time goes to its convolutions, as the per-op profile shows for the CPU graph). "
    "Pi 5: ASSUMED 2-3x a Pi 4. "
    "Coral Edge TPU: parameters beyond its 8 MB of on-chip SRAM stream from the host on every inference, "
    "at an ASSUMED 300-400 MB/s effective over USB 3 (edgetpu_compiler prints the exact off-chip bytes when it "
    "compiles the model: use that figure once it has run), plus the MACs at 2 TMAC/s (peak: the lower bound) "
    "or at an ASSUMED 25% of peak (planning figure). A planning ESTIMATE, not a measurement."
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


def edgetpu_estimate(macs: int, param_bytes: int) -> dict:
    """Edge TPU invoke = off-chip parameter streaming + compute, both ESTIMATED (see ESTIMATE_SOURCES)."""
    off_chip = max(0, int(param_bytes) - EDGETPU_SRAM_BYTES)
    stream = [off_chip / bw * 1000 for bw in USB3_BYTES_S]  # best, worst
    compute = [macs / EDGETPU_PEAK_MAC_S * 1000, macs / (EDGETPU_PEAK_MAC_S * EDGETPU_UTILISATION) * 1000]
    return {"param_bytes": int(param_bytes), "on_chip_bytes": min(int(param_bytes), EDGETPU_SRAM_BYTES),
            "off_chip_bytes": off_chip, "stream_ms": [round(x, 3) for x in stream],
            "compute_ms": [round(x, 3) for x in compute],
            "ms": [round(stream[0] + compute[0], 3), round(stream[1] + compute[1], 3)],
            "basis": f"{off_chip / 1e6:.1f} MB of {param_bytes / 1e6:.1f} MB parameters off-chip "
                     f"(8 MiB SRAM) at {USB3_BYTES_S[1] / 1e6:.0f}-{USB3_BYTES_S[0] / 1e6:.0f} MB/s (USB 3, "
                     f"ASSUMED) + {macs / 1e9:.2f} GMAC at 2 TMAC/s peak .. {EDGETPU_UTILISATION:.0%} of peak "
                     "(ASSUMED)"}


def estimates(macs: int, param_bytes: int | None = None) -> dict:
    """ESTIMATED invoke times (ms) on a Pi 4, Pi 5 and Coral Edge TPU for a graph of ``macs`` MACs.

    ``param_bytes`` (the graph's constant buffers, ``bench.ops.param_bytes``) is what the Edge TPU streams
    beyond its on-chip memory; without it there is no Edge TPU estimate.
    """
    rates = {name: m / s for name, m, s in PI4_NCNN_INT8}  # MAC/s implied by each public figure
    pi4 = sorted(macs / r * 1000 for r in rates.values())  # fastest, slowest (ms)
    pi5 = [pi4[0] / PI5_OVER_PI4[1], pi4[1] / PI5_OVER_PI4[0]]
    return {
        "label": "ESTIMATE (scaled from public figures and stated assumptions, not measured)",
        "pi4_ms": [round(pi4[0], 3), round(pi4[1], 3)],
        "pi4_rates_gmac_s": {k: round(v / 1e9, 1) for k, v in rates.items()},
        "pi4_basis": "this graph's MACs / the MAC rates of ncnn int8 ResNet50 and VGG16 on a Pi 4 (4 threads)",
        "pi5_ms": [round(pi5[0], 3), round(pi5[1], 3)],
        "pi5_assumption": f"Pi 5 = {PI5_OVER_PI4[0]:g}-{PI5_OVER_PI4[1]:g}x a Pi 4 (ASSUMPTION)",
        "edgetpu": edgetpu_estimate(macs, param_bytes) if param_bytes is not None else None,
        "sources": ESTIMATE_SOURCES,
    }
