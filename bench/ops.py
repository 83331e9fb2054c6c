"""Per-op profile of a TFLite graph: every op cut out into a one-op model and timed alone.

The Python LiteRT wheel has no op profiler (``benchmark_model
--enable_op_profiling`` is a C++ tool it does not ship), so each operator is
copied with its own tensors and constant buffers into a model of its own and
invoked by the same runtime, with the same thread count and the default
XNNPACK delegate, as the whole graph. The per-op sum leaves out what the
graph gains from running ops back to back (warm caches, no per-invoke
overhead per op); ``whole_ms`` next to it says how far that goes.

Also here: the bytes of a graph's parameters (its constant buffers), which the
Edge TPU estimate needs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class OpTime:
    index: int
    op: str
    output_shape: tuple[int, ...]
    median_ms: float


def _read(model_path: Path):
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model(str(model_path))


def _op_name(model, opcode_index: int) -> str:
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    code = flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[opcode_index])
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    return names.get(code, str(code))


def _has_data(model, tensor) -> bool:
    buf = model.buffers[tensor.buffer] if 0 <= tensor.buffer < len(model.buffers) else None
    return buf is not None and buf.data is not None and len(buf.data) > 0


def param_bytes(model_path: Path) -> int:
    """Bytes of the graph's constant tensors (weights, biases, quantization tables): what an accelerator loads."""
    model = _read(model_path)
    used = {t.buffer for sg in model.subgraphs for t in sg.tensors if _has_data(model, t)}
    return int(sum(len(model.buffers[b].data) for b in used))


def single_op_models(model_path: Path) -> Iterator[tuple[int, str, tuple[int, ...], bytes]]:
    """(index, op name, output shape, a one-op .tflite) for every op of the first subgraph, in graph order."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    model = _read(model_path)
    sg = model.subgraphs[0]
    for index, op in enumerate(sg.operators):
        old_ids = list(dict.fromkeys([t for t in op.inputs if t >= 0] + list(op.outputs)))
        new_id = {old: new for new, old in enumerate(old_ids)}
        buffers = [fb.BufferT()]  # buffer 0: the empty sentinel every model has
        tensors = []
        for old in old_ids:
            t = copy.copy(sg.tensors[old])
            if _has_data(model, t):
                buffers.append(model.buffers[t.buffer])
                t.buffer = len(buffers) - 1
            else:
                t.buffer = 0
            tensors.append(t)
        one = copy.copy(op)
        one.opcodeIndex = 0
        one.inputs = [new_id[t] if t >= 0 else -1 for t in op.inputs]
        one.outputs = [new_id[t] for t in op.outputs]
        sub = fb.SubGraphT()
        sub.tensors, sub.operators, sub.name = tensors, [one], f"op{index}"
        sub.inputs = [new_id[t] for t in op.inputs if t >= 0 and not _has_data(model, sg.tensors[t])]
        sub.outputs = [new_id[t] for t in op.outputs]
        m = fb.ModelT()
        m.version, m.description = model.version, f"op {index} of {Path(model_path).name}"
        m.operatorCodes, m.subgraphs, m.buffers = [model.operatorCodes[op.opcodeIndex]], [sub], buffers
        out_shape = tuple(int(s) for s in sg.tensors[op.outputs[0]].shape)
        yield index, _op_name(model, op.opcodeIndex), out_shape, bytes(flatbuffer_utils.convert_object_to_bytearray(m))


def _time_invoke(interp, runs: int) -> float:
    interp.invoke()  # warm-up: XNNPACK packs weights on the first run
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        interp.invoke()
        out.append((time.perf_counter() - t0) * 1000)
    return float(np.median(out))


def _filled(interp, rng: np.random.Generator):
    interp.allocate_tensors()
    for d in interp.get_input_details():
        dt = np.dtype(d["dtype"])
        if dt.kind in "iu":
            info = np.iinfo(dt)
            x = rng.integers(info.min, info.max, size=d["shape"], endpoint=True).astype(dt)
        else:
            x = rng.standard_normal(d["shape"]).astype(dt)
        interp.set_tensor(d["index"], x)
    return interp


def profile(model_path: Path, threads: int, runs: int = 20, seed: int = 0) -> tuple[list[OpTime], float]:
    """Median ms of every op alone, and of the whole graph (same runtime, threads and input kind)."""
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(seed)
    rows = []
    for index, name, shape, content in single_op_models(model_path):
        interp = _filled(Interpreter(model_content=content, num_threads=threads), rng)
        rows.append(OpTime(index, name, shape, round(_time_invoke(interp, runs), 4)))
    whole = _time_invoke(_filled(Interpreter(model_path=str(model_path), num_threads=threads), rng), runs)
    return rows, round(whole, 4)


def by_type(rows: list[OpTime]) -> dict[str, dict]:
    """Per op type: count, summed ms and share of the per-op sum, largest first."""
    total = sum(r.median_ms for r in rows) or 1.0
    out: dict[str, dict] = {}
    for r in rows:
        d = out.setdefault(r.op, {"count": 0, "ms": 0.0})
        d["count"] += 1
        d["ms"] += r.median_ms
    return {k: {"count": v["count"], "ms": round(v["ms"], 3), "share": round(v["ms"] / total, 4)}
            for k, v in sorted(out.items(), key=lambda kv: -kv[1]["ms"])}


def graph_profile(model_path: Path, threads: int, runs: int = 20) -> dict:
    """The bench section's record for one graph."""
    rows, whole = profile(model_path, threads, runs)
    return {"model": Path(model_path).name, "threads": threads, "runs_per_op": runs, "ops": len(rows),
            "whole_ms": whole, "sum_of_ops_ms": round(sum(r.median_ms for r in rows), 3),
            "by_type": by_type(rows),
            "slowest": [{"index": r.index, "op": r.op, "output": list(r.output_shape), "ms": r.median_ms}
                        for r in sorted(rows, key=lambda r: -r.median_ms)[:5]]}
