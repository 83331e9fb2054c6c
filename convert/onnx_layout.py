"""Reading a DarkNet19 in MATLAB's ``exportONNXNetwork`` layout: its topology checked, every weight read.

The layout itself is described in :mod:`convert.onnx_import` (the command that uses this). Reading is
separate from rebuilding so that what is detected (the normalisation, each convolution with its
batch norm and activation, the feature layer, the classification layer, the class order) can be
tested and reported before any network is built from it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.darknet import DARKNET19, FEATURES
from device.bundle import sha256_file
from device.errors import ScreenError

log = logging.getLogger(__name__)

#: What onnx calls a 'same'-padded convolution when it does not give the pads.
SAME_PADDING = (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER")
#: Nodes that pool the last convolution's output into the feature vector.
FEATURE_POOLS = ("GlobalAveragePool", "ReduceMean")


class ImportError_(ScreenError, ValueError):
    """The ONNX file is not a DarkNet19 in the layout this tool reads."""


@dataclass
class ConvLayer:
    name: str
    weight: np.ndarray  # (out, in, k, k)
    bias: np.ndarray | None
    bn: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float] | None  # scale, bias, mean, var, eps
    leaky: float | None  # LeakyRelu alpha; None for the linear last conv


@dataclass
class ForeignNet:
    """What was read from the ONNX file."""

    path: Path
    size: int
    width: float
    mean: np.ndarray  # (3,) per-channel, in pixel units
    std: np.ndarray  # (3,)
    convs: list[ConvLayer]
    feature_layer: str  # the node whose output is the 1000-d feature vector
    feature_output: str  # that node's output tensor
    fc_weight: np.ndarray | None  # (classes, 1000)
    fc_bias: np.ndarray | None
    classes: list[str] | None  # the file's class order (metadata 'classes'), if it says

    def summary(self) -> dict:
        return {"file": self.path.name, "sha256": sha256_file(self.path), "input": f"NCHW float (1, 3, {self.size}, "
                f"{self.size})", "width": self.width, "mean": [round(float(v), 4) for v in self.mean],
                "std": [round(float(v), 4) for v in self.std], "feature_layer": self.feature_layer,
                "bn": "separate" if self.convs[0].bn is not None else "folded into the convolutions",
                "classes": self.classes,
                "classification_layer": None if self.fc_weight is None else list(self.fc_weight.shape)}


def layout_error(path: Path, what: str) -> ImportError_:
    return ImportError_(f"{path}: {what}; import-onnx reads a DarkNet19 classifier as MATLAB's exportONNXNetwork "
                        "writes it (NCHW input, normalisation, 19 conv, 5 max-pool, 1000-channel conv + global "
                        "average pool, classification layer); see convert/onnx_import.py")


@dataclass(frozen=True)
class Graph:
    """The ONNX graph as a plain chain of nodes from the image input, with its constants."""

    path: Path
    model: Any  # onnx.ModelProto
    inits: dict[str, np.ndarray]  # initializers and Constant nodes
    chain: list[Any]  # onnx.NodeProto, input to output
    size: int  # the square input's side

    @staticmethod
    def attr(n: Any, name: str, default: Any = None) -> Any:
        import onnx

        for a in n.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def const(self, n: Any) -> np.ndarray:
        """The constant operand of an elementwise node (the other one is the chain's tensor)."""
        others = [i for i in n.input[1:] if i] if n.input[0] not in self.inits else [n.input[0]]
        if len(others) != 1 or others[0] not in self.inits:
            raise layout_error(self.path, f"{n.op_type} node '{n.name}' is not by a constant")
        return np.asarray(self.inits[others[0]], np.float64)


def read_graph(path: Path) -> Graph:
    """Load and check the file; the chain of nodes from its one image input (N, 3, S, S)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises its own exception types
        raise layout_error(path, f"not a valid ONNX model ({exc})") from exc
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:  # Constant nodes count as initializers
        if n.op_type == "Constant":
            inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise layout_error(path, f"{len(inputs)} graph inputs, expected one image input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] is None or dims[2] != dims[3]:
        raise layout_error(path, f"input '{inputs[0].name}' has shape {dims}, expected NCHW (N, 3, S, S)")
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    chain = []
    cur = inputs[0].name
    while True:
        nxt = [n for n in consumers.get(cur, []) if n.op_type != "Constant"]
        if not nxt:
            break
        if len(nxt) != 1:
            raise layout_error(path, f"tensor '{cur}' feeds {len(nxt)} nodes ({', '.join(n.op_type for n in nxt)}); "
                                     "DarkNet19 is a plain chain")
        chain.append(nxt[0])
        cur = nxt[0].output[0]
    return Graph(path, model, inits, chain, int(dims[2]))


def read_darknet19(path: Path) -> ForeignNet:
    """Check the topology and read every weight; :class:`ImportError_` says what differs from DarkNet19."""
    path = Path(path)
    g = read_graph(path)
    mean, std, i = _normalisation(g)
    convs, pools, pool, i = _convolutions(g, i)
    width = _check_darknet19(path, convs, pools, pool)
    fc_w, fc_b = _classifier(g, g.chain[i:])
    return ForeignNet(path, g.size, float(width), mean, std, convs, feature_layer=pool.name or pool.output[0],
                      feature_output=pool.output[0], fc_weight=fc_w, fc_bias=fc_b, classes=_classes(g.model))


def _normalisation(g: Graph) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, std, index of the first node after them) of the leading Sub/Div/Mul/Add: y = a * x + b per channel."""
    a, b = np.ones(3), np.zeros(3)
    i = 0
    while i < len(g.chain) and g.chain[i].op_type in ("Sub", "Div", "Mul", "Add"):
        n = g.chain[i]
        c = g.const(n)
        if c.size not in (1, 3):
            if c.ndim >= 3 and c.shape[-3] == 3 and np.allclose(c, c.mean(axis=(-1, -2), keepdims=True)):
                c = c.mean(axis=(-1, -2))  # a mean image that is constant per channel
            else:
                raise layout_error(g.path, f"{n.op_type} '{n.name}' uses a per-pixel constant of shape "
                                           f"{list(c.shape)}; only per-channel normalisation (Normalization "
                                           "'zerocenter'/'zscore' with one value per channel) can be imported")
        c = np.broadcast_to(c.reshape(-1), (3,)).astype(np.float64)
        if n.op_type == "Sub" and n.input[0] in g.inits:
            raise layout_error(g.path, f"Sub '{n.name}' subtracts the image from a constant")
        if n.op_type == "Sub":
            b = b - c
        elif n.op_type == "Add":
            b = b + c
        elif n.op_type == "Mul":
            a, b = a * c, b * c
        else:
            a, b = a / c, b / c
        i += 1
    if np.any(a == 0):
        raise layout_error(g.path, "the normalisation multiplies a channel by 0")
    return -b / a, 1.0 / a, i


def _convolutions(g: Graph, i: int) -> tuple[list[ConvLayer], int, Any, int]:
    """(convolutions, max-pools, the feature pooling node or None, index after it) from node ``i`` on."""
    convs: list[ConvLayer] = []
    pools = 0
    chain, attr = g.chain, g.attr
    while i < len(chain):
        n = chain[i]
        if n.op_type == "Conv":
            w = np.asarray(g.inits.get(n.input[1]), np.float32) if n.input[1] in g.inits else None
            if w is None or w.ndim != 4:
                raise layout_error(g.path, f"Conv '{n.name}' has no constant 4-d weight")
            k = w.shape[-1]
            if (attr(n, "group", 1) != 1 or list(attr(n, "strides", [1, 1])) != [1, 1]
                    or list(attr(n, "dilations", [1, 1])) != [1, 1]
                    or list(attr(n, "pads", [0, 0, 0, 0])) != [k // 2] * 4 and attr(n, "auto_pad", b"") not in
                    SAME_PADDING):
                raise layout_error(g.path, f"Conv '{n.name}' is not a stride-1, 'same'-padded, ungrouped convolution")
            bias = np.asarray(g.inits[n.input[2]], np.float32) if len(n.input) > 2 and n.input[2] else None
            layer = ConvLayer(n.name, w, bias, None, None)
            i += 1
            if i < len(chain) and chain[i].op_type == "BatchNormalization":
                bn = chain[i]
                layer.bn = tuple(np.asarray(g.inits[x], np.float32) for x in bn.input[1:5]) + (
                    float(attr(bn, "epsilon", 1e-5)),)
                i += 1
            if i < len(chain) and chain[i].op_type == "LeakyRelu":
                layer.leaky = float(attr(chain[i], "alpha", 0.01))
                i += 1
            convs.append(layer)
        elif n.op_type == "MaxPool":
            if list(attr(n, "kernel_shape")) != [2, 2] or list(attr(n, "strides", [1, 1])) != [2, 2]:
                raise layout_error(g.path, f"MaxPool '{n.name}' is not 2x2 with stride 2")
            pools += 1
            i += 1
        elif n.op_type in FEATURE_POOLS:
            return convs, pools, n, i + 1
        else:
            raise layout_error(g.path, f"unexpected {n.op_type} node '{n.name}' inside the convolutional part")
    return convs, pools, None, i


def _check_darknet19(path: Path, convs: list[ConvLayer], pools: int, pool: Any) -> float:
    """DarkNet19's plan at some width (returned): every layer's size, kernel and activation."""
    if len(convs) != 19 or pools != 5 or pool is None:
        raise layout_error(path, f"found {len(convs)} convolutions, {pools} max-pools and "
                                 f"{'a' if pool is not None else 'no'} global average pool; DarkNet19 has 19, 5 "
                                 "and one")
    plan = [item for item in DARKNET19 if item != "M"]
    width = convs[-2].weight.shape[0] / plan[-1][0]
    for j, (layer, (filters, k)) in enumerate(zip(convs[:-1], plan)):
        want = max(8, int(filters * width))
        if layer.weight.shape[0] != want or layer.weight.shape[-1] != k:
            raise layout_error(path, f"convolution {j + 1} ('{layer.name}') is {layer.weight.shape[-1]}x"
                                     f"{layer.weight.shape[-1]} with {layer.weight.shape[0]} filters; DarkNet19 at "
                                     f"width {width:g} has {k}x{k} with {want}")
        if layer.leaky is None or abs(layer.leaky - 0.1) > 1e-6:
            raise layout_error(path, f"convolution {j + 1} ('{layer.name}') is followed by LeakyRelu alpha "
                                     f"{layer.leaky}, DarkNet19 uses 0.1")
    last = convs[-1]
    if last.weight.shape[0] != FEATURES or last.weight.shape[-1] != 1 or last.leaky is not None or last.bn is not None:
        raise layout_error(path, f"the last convolution ('{last.name}') must be 1x1, {FEATURES} filters, linear "
                                 f"(it is {last.weight.shape[-1]}x{last.weight.shape[-1]}, {last.weight.shape[0]} "
                                 "filters)")
    return width


def _classifier(g: Graph, rest: list[Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(weight (classes, 1000), bias) of the classification layer after the features, or (None, None)."""
    fc_w = fc_b = None
    for j, n in enumerate(rest):
        if n.op_type in ("Flatten", "Reshape", "Squeeze"):
            continue
        if n.op_type == "Gemm":
            w = np.asarray(g.inits[n.input[1]], np.float32)
            fc_w = w.T if not g.attr(n, "transB", 0) else w
            fc_b = np.asarray(g.inits[n.input[2]], np.float32) if len(n.input) > 2 else np.zeros(len(fc_w), np.float32)
        elif n.op_type == "MatMul":
            fc_w = np.asarray(g.inits[n.input[1]], np.float32).T
            fc_b = np.zeros(len(fc_w), np.float32)
            if j + 1 < len(rest) and rest[j + 1].op_type == "Add":
                fc_b = g.const(rest[j + 1]).astype(np.float32).reshape(-1)
        elif n.op_type in ("Add", "Softmax"):
            continue
        else:
            raise layout_error(g.path, f"unexpected {n.op_type} node '{n.name}' after the feature layer")
    if fc_w is not None and fc_w.shape[1] != FEATURES:
        raise layout_error(g.path, f"the classification layer takes {fc_w.shape[1]} inputs, not the {FEATURES} "
                                   "features")
    if fc_w is None:
        log.warning("%s: no classification layer after the features; the report's CNN-softmax figures will be "
                    "those of an untrained layer", g.path)
    return fc_w, fc_b


def _classes(model: Any) -> list[str] | None:
    """The class order in the file's metadata ('classes': a JSON list or comma-separated), if any."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "classes" not in meta:
        return None
    try:
        return [str(c) for c in json.loads(meta["classes"])]
    except ValueError:
        return [c.strip() for c in meta["classes"].split(",")]
