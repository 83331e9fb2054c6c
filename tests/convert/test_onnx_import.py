"""``python -m convert import-onnx``: a DarkNet19 trained elsewhere, in MATLAB's exportONNXNetwork layout.

The "foreign" network is the fixture bundle's trained tiny DarkNet19 (width 0.125, 64 px) written by
:func:`convert.onnx_import.export_matlab_layout`: NCHW float input, its own per-channel normalisation
(Sub/Div nodes, a std the first convolution was re-scaled for), Conv + BatchNormalization + LeakyRelu,
GlobalAveragePool, Gemm + Softmax in a different class order (named in the metadata).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert.export import load_trained
from convert.onnx_import import export_matlab_layout, to_torch
from convert.onnx_layout import ImportError_, read_darknet19
from device.signing import new_private_key, sign_bundle
from tests.conftest import FIXTURES, ROOT

WEIGHTS = FIXTURES / "bundle" / "source" / "darknet19-fp16.pt"
FOREIGN_ORDER = ["Pro-B", "Pre-B", "Early Pre-B", "Benign"]  # not the data set's order
FOREIGN_STD = (50.0, 64.0, 80.0)


@pytest.fixture(scope="module")
def trained():
    return load_trained(WEIGHTS)


def _write(tmp: Path, trained, **kw) -> Path:
    net, state = trained
    path = tmp / "darknet19-matlab.onnx"
    export_matlab_layout(net, state["classes"], path, int(state["config"]["size"]), FOREIGN_ORDER, std=FOREIGN_STD,
                         **kw)
    return path


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn-separate", "bn-folded"])
def test_the_topology_is_read_and_the_rebuilt_network_computes_the_same(tmp_path, trained, fold_bn) -> None:
    import torch

    from convert.train import to_tensor

    path = _write(tmp_path, trained, fold_bn=fold_bn)
    f = read_darknet19(path)
    assert (f.size, f.width, len(f.convs), f.classes) == (64, 0.125, 19, FOREIGN_ORDER)
    assert np.allclose(f.std, FOREIGN_STD) and np.allclose(f.mean, trained[0].mean.view(-1).numpy())
    assert (f.convs[0].bn is None) == fold_bn and f.fc_weight.shape == (4, 1000)
    assert f.feature_layer.endswith("GlobalAveragePool")
    rebuilt = to_torch(f, trained[1]["classes"])
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        ours, orig = rebuilt.features(to_tensor(x)), trained[0].features(to_tensor(x))
        p_ours, p_orig = torch.softmax(rebuilt(to_tensor(x)), 1), torch.softmax(trained[0](to_tensor(x)), 1)
    assert float((ours - orig).abs().max()) < 1e-4 * float(orig.abs().max())
    assert float((p_ours - p_orig).abs().max()) < 1e-5  # the class order was mapped back to the data set's


def _edit(path: Path, fn) -> Path:
    import onnx

    m = onnx.load(str(path))
    fn(m)
    onnx.save(m, str(path))
    return path


def test_a_different_network_is_refused_saying_what_differs(tmp_path, trained) -> None:
    import onnx

    def alpha(m):
        relu = next(n for n in m.graph.node if n.op_type == "LeakyRelu")
        relu.attribute[0].f = 0.2

    with pytest.raises(ImportError_, match="LeakyRelu alpha 0.2.*DarkNet19 uses 0.1"):
        read_darknet19(_edit(_write(tmp_path, trained), alpha))

    def drop_pool(m):
        pool = next(n for n in m.graph.node if n.op_type == "MaxPool")
        for n in m.graph.node:
            n.input[:] = [pool.input[0] if i == pool.output[0] else i for i in n.input]
        m.graph.node.remove(pool)

    with pytest.raises(ImportError_, match="4 max-pools"):
        read_darknet19(_edit(_write(tmp_path, trained), drop_pool))

    def pixel_mean(m):
        sub = next(n for n in m.graph.node if n.op_type == "Sub")
        c = onnx.numpy_helper.from_array(np.random.default_rng(0).uniform(100, 200, (1, 3, 64, 64)).astype(np.float32),
                                         sub.input[1] + "_img")
        m.graph.initializer.append(c)
        sub.input[1] = c.name

    with pytest.raises(ImportError_, match="per-pixel constant.*per-channel"):
        read_darknet19(_edit(_write(tmp_path, trained), pixel_mean))

    f = read_darknet19(_write(tmp_path, trained))
    f.classes = ["Benign", "Lymphoma", "Pre-B", "Pro-B"]
    with pytest.raises(ImportError_, match="'Early Pre-B' of the data set is not among the network's classes"):
        to_torch(f, trained[1]["classes"])


@pytest.mark.slow
def test_an_imported_matlab_darknet19_becomes_a_bundle_that_selftest_accepts(tmp_path, trained) -> None:
    """The whole chain on the 32 committed smear images (onnx2tf quantization: a few minutes on a CPU)."""
    onnx_file = _write(tmp_path, trained)
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "convert", "import-onnx", str(onnx_file), "--data",
                        str(FIXTURES / "smear"), "--work", str(tmp_path / "work"), "--models", str(out),
                        "--block", "2", "--test-fraction", "0.25", "--val-fraction", "0.25", "--calib", "24",
                        "--folds", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rebuilt network vs darknet19-matlab.onnx (onnxruntime) on 8 real images" in r.stdout
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["imported_network"]["classes"] == FOREIGN_ORDER and doc["imported_network"]["std"] == list(FOREIGN_STD)
    assert doc["imported_network"]["check"]["max_rel_diff"] < 1e-3
    assert "## Imported network" in (out / "REPORT.md").read_text()
    assert doc["input"]["layout"] == "NHWC" and doc["output"]["features"] == 1000

    keys = tmp_path / "keys"
    keys.mkdir()
    key = tmp_path / "release" / "key.pem"
    new_private_key(key).rename(keys / "release.pub")
    sign_bundle(out, key)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\nthreads = 1\nuse_edgetpu = false\nkeys_dir = "{keys}"\n[camera]\nsource = "replay"\n'
                   f'[gpio]\nmock = "yes"\n[store]\nstate_dir = "{tmp_path / "state"}"\nreserve_mb = 0\n')
    r = subprocess.run([sys.executable, "-m", "device", "selftest", "--config", str(cfg), "--bundle", str(out),
                        "--min-accuracy", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "selftest PASSED" in r.stdout, r.stdout + r.stderr
    assert "ok   signature: signed by key" in r.stdout and "ok   references: reference images: 8" in r.stdout
