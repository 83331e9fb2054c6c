"""PyTorch -> ONNX, checked against onnxruntime on real images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from convert.darknet import DarkNet19, FeatureNet

log = logging.getLogger(__name__)

INPUT_NAME = "pixels"
OUTPUT_NAME = "features"


def load_trained(path: Path) -> tuple[DarkNet19, dict]:
    """A checkpoint written by ``python -m convert train`` (float32 or float16 weights)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    net = DarkNet19(len(state["classes"]), width=state["width"])
    net.load_state_dict({k: v.float() for k, v in state["model"].items()})
    net.eval()
    return net, state


def export_onnx(net: DarkNet19, path: Path, size: int) -> None:
    """Feature graph: (1,3,S,S) float pixels 0..255 -> (1,1000). BN is folded into the convs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.full((1, 3, size, size), 128.0)
    torch.onnx.export(FeatureNet(net).eval(), (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      opset_version=13, dynamo=False, do_constant_folding=True)


def float_features_torch(net: DarkNet19, rgb: np.ndarray, batch: int = 32) -> np.ndarray:
    from convert.train import to_tensor

    out = []
    with torch.no_grad():
        for i in range(0, len(rgb), batch):
            out.append(net.features(to_tensor(rgb[i:i + batch])).numpy())
    return np.concatenate(out)


def float_features_onnx(path: Path, rgb: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {INPUT_NAME: rgb[i:i + 1].transpose(0, 3, 1, 2).astype(np.float32)})[0]
                           for i in range(len(rgb))])
