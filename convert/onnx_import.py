"""``python -m convert import-onnx FILE.onnx``: a DarkNet19 trained elsewhere (MATLAB, as in the paper) into a bundle.

The layout accepted is the one MATLAB's ``exportONNXNetwork`` writes for a DarkNet19 classifier, which
:func:`export_matlab_layout` also writes (for the tests, and as the reference of the layout):

    input  (N, 3, S, S) float, pixels 0..255                       NCHW
    Sub / Div / Mul / Add by per-channel constants                the network's own normalisation
    19 x Conv (+ BatchNormalization, or folded into a conv bias)  3x3 and 1x1, as in darknet19.cfg
       LeakyRelu(0.1) after the first 18, 5 x MaxPool 2x2/2
    Conv 1x1 -> 1000 channels (linear), GlobalAveragePool          the 1000-d feature layer
    Flatten/Reshape, Gemm (or MatMul + Add) -> classes, Softmax   the classification layer (its own class order)

Why rebuild rather than convert the graph: the weights are read into the toolchain's own PyTorch DarkNet19
(BN kept as BN, the foreign normalisation as its ``mean``/``std``, the classification layer re-ordered to
the split's classes), checked against onnxruntime on the foreign file, and written as the ``train`` step's
checkpoint. From there the unchanged chain runs: ``export`` (pixels in NHWC order through the same
preprocessing, features out), ``quantize``, ``features``, ``head`` (mRMR + SVM) and ``bundle``; the
manifest and REPORT.md then say where the network came from.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert import data
from convert.darknet import DARKNET19, FEATURES
from device.bundle import MANIFEST, load_bundle, sha256_file
from device.errors import ScreenError

log = logging.getLogger(__name__)

#: How closely the rebuilt network must reproduce the foreign file's features (relative to their range).
MAX_REL_DIFF = 1e-3
CHECK_IMAGES = 8


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


# -- reading the graph -----------------------------------------------------------------------------------------


def _bad(path: Path, what: str) -> ImportError_:
    return ImportError_(f"{path}: {what}; import-onnx reads a DarkNet19 classifier as MATLAB's exportONNXNetwork "
                        "writes it (NCHW input, normalisation, 19 conv, 5 max-pool, 1000-channel conv + global "
                        "average pool, classification layer); see convert/onnx_import.py")


def read_darknet19(path: Path) -> ForeignNet:
    """Check the topology and read every weight; :class:`ImportError_` says what differs from DarkNet19."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises its own exception types
        raise _bad(path, f"not a valid ONNX model ({exc})") from exc
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:  # Constant nodes count as initializers
        if n.op_type == "Constant":
            inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise _bad(path, f"{len(inputs)} graph inputs, expected one image input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] is None or dims[2] != dims[3]:
        raise _bad(path, f"input '{inputs[0].name}' has shape {dims}, expected NCHW (N, 3, S, S)")
    size = int(dims[2])
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def attr(n, name, default=None):
        for a in n.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    chain = []
    cur = inputs[0].name
    while True:
        nxt = [n for n in consumers.get(cur, []) if n.op_type != "Constant"]
        if not nxt:
            break
        if len(nxt) != 1:
            raise _bad(path, f"tensor '{cur}' feeds {len(nxt)} nodes ({', '.join(n.op_type for n in nxt)}); "
                             "DarkNet19 is a plain chain")
        chain.append(nxt[0])
        cur = nxt[0].output[0]

    def const(n) -> np.ndarray:
        others = [i for i in n.input[1:] if i] if n.input[0] not in inits else [n.input[0]]
        if len(others) != 1 or others[0] not in inits:
            raise _bad(path, f"{n.op_type} node '{n.name}' is not by a constant")
        return np.asarray(inits[others[0]], np.float64)

    # normalisation: y = a * x + b per channel
    a, b = np.ones(3), np.zeros(3)
    i = 0
    while i < len(chain) and chain[i].op_type in ("Sub", "Div", "Mul", "Add"):
        n = chain[i]
        c = const(n)
        if c.size not in (1, 3):
            if c.ndim >= 3 and c.shape[-3] == 3 and np.allclose(c, c.mean(axis=(-1, -2), keepdims=True)):
                c = c.mean(axis=(-1, -2))  # a mean image that is constant per channel
            else:
                raise _bad(path, f"{n.op_type} '{n.name}' uses a per-pixel constant of shape {list(c.shape)}; only "
                                 "per-channel normalisation (Normalization 'zerocenter'/'zscore' with one value per "
                                 "channel) can be imported")
        c = np.broadcast_to(c.reshape(-1), (3,)).astype(np.float64)
        if n.op_type == "Sub" and n.input[0] in inits:
            raise _bad(path, f"Sub '{n.name}' subtracts the image from a constant")
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
        raise _bad(path, "the normalisation multiplies a channel by 0")
    std, mean = 1.0 / a, -b / a

    convs: list[ConvLayer] = []
    pools = 0
    feature_layer = None
    while i < len(chain):
        n = chain[i]
        if n.op_type == "Conv":
            w = np.asarray(inits.get(n.input[1]), np.float32) if n.input[1] in inits else None
            if w is None or w.ndim != 4:
                raise _bad(path, f"Conv '{n.name}' has no constant 4-d weight")
            k = w.shape[-1]
            if (attr(n, "group", 1) != 1 or list(attr(n, "strides", [1, 1])) != [1, 1]
                    or list(attr(n, "dilations", [1, 1])) != [1, 1]
                    or list(attr(n, "pads", [0, 0, 0, 0])) != [k // 2] * 4 and attr(n, "auto_pad", b"") not in
                    (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER")):
                raise _bad(path, f"Conv '{n.name}' is not a stride-1, 'same'-padded, ungrouped convolution")
            bias = np.asarray(inits[n.input[2]], np.float32) if len(n.input) > 2 and n.input[2] else None
            layer = ConvLayer(n.name, w, bias, None, None)
            i += 1
            if i < len(chain) and chain[i].op_type == "BatchNormalization":
                bn = chain[i]
                layer.bn = tuple(np.asarray(inits[x], np.float32) for x in bn.input[1:5]) + (
                    float(attr(bn, "epsilon", 1e-5)),)
                i += 1
            if i < len(chain) and chain[i].op_type == "LeakyRelu":
                layer.leaky = float(attr(chain[i], "alpha", 0.01))
                i += 1
            convs.append(layer)
        elif n.op_type == "MaxPool":
            if list(attr(n, "kernel_shape")) != [2, 2] or list(attr(n, "strides", [1, 1])) != [2, 2]:
                raise _bad(path, f"MaxPool '{n.name}' is not 2x2 with stride 2")
            pools += 1
            i += 1
        elif n.op_type in ("GlobalAveragePool", "ReduceMean"):
            feature_layer = n.name or n.output[0]
            i += 1
            break
        else:
            raise _bad(path, f"unexpected {n.op_type} node '{n.name}' inside the convolutional part")
    if len(convs) != 19 or pools != 5 or feature_layer is None:
        raise _bad(path, f"found {len(convs)} convolutions, {pools} max-pools and "
                         f"{'a' if feature_layer else 'no'} global average pool; DarkNet19 has 19, 5 and one")
    plan = [item for item in DARKNET19 if item != "M"]
    width = convs[-2].weight.shape[0] / plan[-1][0]
    for j, (layer, (filters, k)) in enumerate(zip(convs[:-1], plan)):
        want = max(8, int(filters * width))
        if layer.weight.shape[0] != want or layer.weight.shape[-1] != k:
            raise _bad(path, f"convolution {j + 1} ('{layer.name}') is {layer.weight.shape[-1]}x"
                             f"{layer.weight.shape[-1]} with {layer.weight.shape[0]} filters; DarkNet19 at width "
                             f"{width:g} has {k}x{k} with {want}")
        if layer.leaky is None or abs(layer.leaky - 0.1) > 1e-6:
            raise _bad(path, f"convolution {j + 1} ('{layer.name}') is followed by LeakyRelu alpha "
                             f"{layer.leaky}, DarkNet19 uses 0.1")
    last = convs[-1]
    if last.weight.shape[0] != FEATURES or last.weight.shape[-1] != 1 or last.leaky is not None or last.bn is not None:
        raise _bad(path, f"the last convolution ('{last.name}') must be 1x1, {FEATURES} filters, linear "
                         f"(it is {last.weight.shape[-1]}x{last.weight.shape[-1]}, {last.weight.shape[0]} filters)")

    fc_w = fc_b = None
    rest = chain[i:]
    for j, n in enumerate(rest):
        if n.op_type in ("Flatten", "Reshape", "Squeeze"):
            continue
        if n.op_type == "Gemm":
            w = np.asarray(inits[n.input[1]], np.float32)
            fc_w = w.T if not attr(n, "transB", 0) else w
            fc_b = np.asarray(inits[n.input[2]], np.float32) if len(n.input) > 2 else np.zeros(len(fc_w), np.float32)
        elif n.op_type == "MatMul":
            fc_w = np.asarray(inits[n.input[1]], np.float32).T
            fc_b = np.zeros(len(fc_w), np.float32)
            if j + 1 < len(rest) and rest[j + 1].op_type == "Add":
                fc_b = const(rest[j + 1]).astype(np.float32).reshape(-1)
        elif n.op_type in ("Add", "Softmax"):
            continue
        else:
            raise _bad(path, f"unexpected {n.op_type} node '{n.name}' after the feature layer")
    if fc_w is not None and fc_w.shape[1] != FEATURES:
        raise _bad(path, f"the classification layer takes {fc_w.shape[1]} inputs, not the {FEATURES} features")
    if fc_w is None:
        log.warning("%s: no classification layer after the features; the report's CNN-softmax figures will be "
                    "those of an untrained layer", path)
    meta = {p.key: p.value for p in model.metadata_props}
    classes = None
    if "classes" in meta:
        try:
            classes = [str(c) for c in json.loads(meta["classes"])]
        except ValueError:
            classes = [c.strip() for c in meta["classes"].split(",")]
    return ForeignNet(path, size, float(width), mean, std, convs, feature_layer, fc_w, fc_b, classes)


# -- into the toolchain's network ------------------------------------------------------------------------------


def _key(name: str) -> str:
    """A class name compared loosely: the data set's folder names ("Early") and display names ("Early Pre-B")
    are the same class, whatever the case and punctuation."""
    name = data.DISPLAY_NAMES.get(name, name)
    return "".join(ch for ch in name.lower() if ch.isalnum())


def class_order(foreign: list[str] | None, split_classes: list[str], n_out: int, where: Path) -> list[int]:
    """For each of the split's classes, its row in the foreign classification layer."""
    if foreign is None:
        log.warning("%s: no class order given (--classes or metadata 'classes'); assuming the split's order %s",
                    where, split_classes)
        foreign = list(split_classes)
    if len(foreign) != n_out:
        raise ImportError_(f"{where}: {len(foreign)} class names {foreign} for a classification layer with "
                           f"{n_out} outputs; pass --classes with one name per output, in the file's order")
    keys = {_key(c): j for j, c in enumerate(foreign)}
    order = []
    for c in split_classes:
        hit = [keys[k] for k in (_key(c),) if k in keys]
        if not hit:
            raise ImportError_(f"{where}: class {data.DISPLAY_NAMES.get(c, c)!r} of the data set is not among the "
                               f"network's classes {foreign}; pass --classes with the data set's names in the "
                               "network's output order")
        order.append(hit[0])
    return order


def to_torch(net: ForeignNet, split_classes: list[str]):
    """The toolchain's DarkNet19 holding the foreign weights, normalisation and (re-ordered) classifier."""
    import torch
    from torch import nn

    from convert.darknet import DarkNet19

    t = DarkNet19(len(split_classes), width=net.width)
    t.eval()
    t.set_normalisation(net.mean, net.std)
    convs = [m for m in t.backbone if isinstance(m, nn.Conv2d)]
    bns = [m for m in t.backbone if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for layer, conv, bn in zip(net.convs[:-1], convs[:-1], bns):
            conv.weight.copy_(torch.from_numpy(np.array(layer.weight)))
            c = layer.weight.shape[0]
            bias = layer.bias if layer.bias is not None else np.zeros(c, np.float32)
            if layer.bn is not None:
                scale, beta, mean, var, eps = layer.bn
                # the conv bias moves into the BN mean; eps is kept exactly by adjusting var to torch's eps
                mean, var = mean - bias, var + eps - bn.eps
            else:  # folded: BN is the identity plus the conv's bias
                scale, beta, mean, var = np.ones(c), bias, np.zeros(c), np.full(c, 1.0 - bn.eps)
            for p, v in ((bn.weight, scale), (bn.bias, beta), (bn.running_mean, mean), (bn.running_var, var)):
                p.copy_(torch.as_tensor(np.array(v, np.float32)))
        last = net.convs[-1]
        convs[-1].weight.copy_(torch.from_numpy(np.array(last.weight)))
        convs[-1].bias.copy_(torch.from_numpy(np.array(last.bias) if last.bias is not None
                                              else np.zeros(FEATURES, np.float32)))
        if net.fc_weight is not None:
            order = class_order(net.classes, split_classes, len(net.fc_weight), net.path)
            t.classifier.weight.copy_(torch.from_numpy(np.array(net.fc_weight[order])))
            t.classifier.bias.copy_(torch.from_numpy(np.array(net.fc_bias[order])))
    return t


def _foreign_features(path: Path, feature_layer_output: str, x_nchw: np.ndarray) -> np.ndarray:
    """The foreign file's own feature-layer output, through onnxruntime (the graph with that tensor exposed)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    m.graph.output.append(onnx.helper.make_tensor_value_info(feature_layer_output, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = [sess.run([feature_layer_output], {name: x_nchw[i:i + 1]})[0].reshape(1, -1) for i in range(len(x_nchw))]
    return np.concatenate(out)


def _feature_output(path: Path) -> str:
    import onnx

    for n in onnx.load(str(path)).graph.node:
        if n.op_type in ("GlobalAveragePool", "ReduceMean"):
            return n.output[0]
    raise _bad(path, "no feature layer")


# -- the command -----------------------------------------------------------------------------------------------


def import_onnx(o, path: Path, classes: list[str] | None = None) -> Path:
    """Read, check, rebuild, then run the chain export -> quantize -> features -> head -> bundle."""
    import torch

    from convert import steps
    from convert.bundle import write_bundle
    from convert.train import TrainConfig, to_tensor

    path = Path(path).resolve()
    net = read_darknet19(path)
    if classes is not None:
        net.classes = classes
    print(f"import-onnx: {path.name}: DarkNet19 width {net.width:g}, input {net.size} px NCHW, "
          f"normalisation mean {np.round(net.mean, 3).tolist()} std {np.round(net.std, 3).tolist()}, "
          f"BN {'separate' if net.convs[0].bn is not None else 'folded'}, feature layer '{net.feature_layer}', "
          f"classes {net.classes}")
    steps.split(o)
    pp = steps.paths(o)
    split_classes, parts, doc = data.read_split(pp["split"])
    t = to_torch(net, split_classes)
    # the rebuilt network must compute what the foreign file computes, on real images of the data set
    x = data.load_rgb(Path(doc["data_root"]), parts["test"][:CHECK_IMAGES], net.size)
    with torch.no_grad():
        ours = t.features(to_tensor(x)).numpy()
    theirs = _foreign_features(path, _feature_output(path), x.transpose(0, 3, 1, 2).astype(np.float32))
    diff = float(np.abs(ours - theirs).max())
    rel = diff / max(float(np.abs(theirs).max()), 1e-12)
    print(f"import-onnx: rebuilt network vs {path.name} (onnxruntime) on {len(x)} real images: max |feature diff| "
          f"{diff:.3g} ({rel:.2g} of the largest feature)")
    if rel > MAX_REL_DIFF:
        raise ImportError_(f"{path}: the rebuilt network differs from the file by {rel:.2g} of the largest feature "
                           f"(> {MAX_REL_DIFF:g}); a layer was read wrongly or the file holds something else")
    cfg = dataclasses.replace(TrainConfig(), size=net.size, width=net.width, low_size=net.size, low_epochs=0,
                              high_epochs=0)
    info = {**net.summary(), "check": {"images": len(x), "max_abs_diff": diff, "max_rel_diff": rel},
            "imported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    pp["weights"].parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": t.state_dict(), "classes": split_classes, "width": net.width,
                "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, "seconds": 0.0,
                "imported": info}, pp["weights"])
    steps.export(o)
    steps.quantize(o)
    steps.features(o)
    steps.head(o)
    out = write_bundle(o)
    _record_origin(out, info)
    print(f"import-onnx: bundle -> {out}; sign it with `python -m convert sign {out}` before installing it")
    return out


def _record_origin(out: Path, info: dict) -> None:
    """The manifest and REPORT.md say the network came from elsewhere (the bundle step knows only the chain)."""
    m = out / MANIFEST
    doc = json.loads(m.read_text())
    doc["imported_network"] = info
    m.write_text(json.dumps(doc, indent=1) + "\n")
    load_bundle(out)
    report = out / "REPORT.md"
    if report.is_file():
        with open(report, "a") as f:
            f.write("\n## Imported network\n\n"
                    f"The DarkNet19 in this bundle was **not trained by this toolchain**: it was imported from "
                    f"`{info['file']}` (sha256 `{info['sha256'][:16]}…`) with `python -m convert import-onnx`. "
                    "Statements above about how the CNN was trained do not apply to it; the int8 quantization, "
                    "features, mRMR + SVM head and every figure were computed here.\n\n"
                    f"- Input: {info['input']}; normalisation mean {info['mean']}, std {info['std']} (moved into "
                    "the graph); BN " + info["bn"] + f"; feature layer `{info['feature_layer']}`.\n"
                    f"- The network's class order: {info['classes']} (re-ordered to the data set's).\n"
                    f"- Rebuilt network vs the file (onnxruntime) on {info['check']['images']} real images: "
                    f"max feature difference {info['check']['max_abs_diff']:.3g} "
                    f"({info['check']['max_rel_diff']:.2g} of the largest feature).\n"
                    "- Its training data are unknown here: held-out images of this split may have been in its "
                    "training set, so the held-out figures may be optimistic.\n")


# -- the layout, written (tests; and what a MATLAB export looks like) ------------------------------------------


def export_matlab_layout(net, net_classes: list[str], path: Path, size: int, classes: list[str],
                         std: tuple[float, float, float] | None = None, fold_bn: bool = False) -> None:
    """Write ``net`` (the toolchain's DarkNet19) the way MATLAB's ``exportONNXNetwork`` writes a DarkNet19 classifier.

    NCHW float input, a Sub/Div normalisation node pair, Conv + BatchNormalization + LeakyRelu (BN folded with
    ``fold_bn``), GlobalAveragePool, Flatten, Gemm, Softmax, and the class order in the metadata: the
    classification layer's rows are re-ordered from ``net_classes`` (the network's order) to ``classes`` (the
    file's). ``std``
    re-expresses the network with that per-channel std (the first convolution absorbs the change, so the
    function is the same) to give the file a normalisation of its own.
    """
    import onnx
    import torch
    from torch import nn

    class Matlab(nn.Module):
        def __init__(self, src):
            super().__init__()
            self.body = src.backbone
            self.fc = src.classifier
            rows = class_order(net_classes, classes, src.classifier.out_features, path)
            with torch.no_grad():
                self.fc.weight.copy_(self.fc.weight[rows].clone())
                self.fc.bias.copy_(self.fc.bias[rows].clone())
            mean = src.mean.clone()
            sd = src.std.clone() if std is None else torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
            if std is not None:
                first = next(m for m in self.body if isinstance(m, nn.Conv2d))
                with torch.no_grad():
                    first.weight.mul_((sd / src.std).view(1, 3, 1, 1))
            self.register_buffer("mean", mean)
            self.register_buffer("sd", sd)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            x = (x - self.mean) / self.sd
            return torch.softmax(self.fc(torch.flatten(self.pool(self.body(x)), 1)), 1)

    import copy

    m = Matlab(copy.deepcopy(net)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(m, (torch.full((1, 3, size, size), 128.0),), str(path), input_names=["data"],
                      output_names=["prob"], opset_version=13, dynamo=False, do_constant_folding=fold_bn,
                      training=torch.onnx.TrainingMode.EVAL)
    model = onnx.load(str(path))
    p = model.metadata_props.add()
    p.key, p.value = "classes", json.dumps(classes)
    model.producer_name = "leukoscreen export_matlab_layout (MATLAB exportONNXNetwork layout)"
    onnx.save(model, str(path))
