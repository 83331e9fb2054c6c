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
manifest and REPORT.md then say where the network came from. Reading and checking the file is
:mod:`convert.onnx_layout`; rebuilding, the command and the layout's writer are here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np

from convert import data, steps
from convert.bundle import write_bundle
from convert.darknet import FEATURES
from convert.onnx_layout import ForeignNet, ImportError_, read_darknet19
from convert.options import REPORT_FILE, paths
from device.bundle import MANIFEST, load_bundle

log = logging.getLogger(__name__)

#: How closely the rebuilt network must reproduce the foreign file's features (relative to their range).
MAX_REL_DIFF = 1e-3
CHECK_IMAGES = 8


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


# -- the command -----------------------------------------------------------------------------------------------


def import_onnx(o, path: Path, classes: list[str] | None = None) -> Path:
    """Read, check, rebuild, then run the chain export -> quantize -> features -> head -> bundle."""
    import torch

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
    pp = paths(o)
    split_classes, parts, doc = data.read_split(pp.split)
    t = to_torch(net, split_classes)
    # the rebuilt network must compute what the foreign file computes, on real images of the data set
    x = data.load_rgb(Path(doc["data_root"]), parts["test"][:CHECK_IMAGES], net.size)
    with torch.no_grad():
        ours = t.features(to_tensor(x)).numpy()
    theirs = _foreign_features(path, net.feature_output, x.transpose(0, 3, 1, 2).astype(np.float32))
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
    pp.weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": t.state_dict(), "classes": split_classes, "width": net.width,
                "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, "seconds": 0.0,
                "imported": info}, pp.weights)
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
    report = out / REPORT_FILE
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
