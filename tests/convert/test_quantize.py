"""The comparison of a bundle's two int8 graphs (what REPORT.md and `make bench` say about them)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from convert.quantize import decisions_agreement, graph_agreement
from device.bundle import load_bundle
from device.preprocess import load_image


@pytest.fixture(scope="module")
def tiny_bundle(tiny_bundle_dir):
    return load_bundle(tiny_bundle_dir)


def test_one_graph_against_itself_agrees_everywhere(tiny_bundle, smear_dir) -> None:
    pytest.importorskip("ai_edge_litert")
    paths = sorted(p for p in smear_dir.rglob("*") if p.suffix.lower() in (".jpg", ".png", ".bmp"))[:6]
    size = tiny_bundle.input.size
    rgb = np.stack([np.asarray(load_image(p).resize((size, size))) for p in paths])
    a = graph_agreement(tiny_bundle.model_path, tiny_bundle.model_path, rgb, tiny_bundle.head, tiny_bundle.benign,
                        tiny_bundle.thresholds, threads=1)
    assert a["images"] == 6 and a["decisions_agree"] == 6 and a["decision_agreement"] == 1.0
    assert a["worst_feature_cosine"] == pytest.approx(1.0)


def test_decisions_that_differ_are_counted(tiny_bundle, smear_dir) -> None:
    pytest.importorskip("ai_edge_litert")
    from device.bundle import Thresholds
    from device.classifier import model_features
    from device.inference import TFLiteModel

    head = dataclasses.replace(tiny_bundle.head, ood_threshold=1e9)  # every field gets its top label
    decisive = Thresholds(confidence=0.0, all_probability=1.1, benign_confidence=0.0)
    model = TFLiteModel(tiny_bundle.model_path, num_threads=1, use_edgetpu=False)
    size = tiny_bundle.input.size
    paths = [sorted(d.iterdir())[0] for d in sorted(smear_dir.iterdir())]  # one image per class
    feats = np.stack([model_features(model, np.asarray(load_image(p).resize((size, size)))) for p in paths])
    rolled = np.roll(feats, 1, axis=0)  # "another graph" that sees each image as the next class's image
    same = decisions_agreement(head, tiny_bundle.benign, decisive, feats, feats.copy())
    other = decisions_agreement(head, tiny_bundle.benign, decisive, feats, rolled)
    assert same["decisions_agree"] == len(paths) and same["worst_feature_cosine"] == pytest.approx(1.0)
    assert other["worst_feature_cosine"] < 1.0
    labels = evaluate_labels(head, feats)
    expected = sum(a == b for a, b in zip(labels, np.roll(labels, 1)))
    assert other["decisions_agree"] == expected < len(paths)
    assert other["decision_agreement"] == pytest.approx(expected / len(paths))


def evaluate_labels(head, feats: np.ndarray) -> list[int]:
    from device.head import evaluate_many

    return [o.index for o in evaluate_many(head, feats)]


@pytest.fixture(scope="module")
def conv_saved_model(tmp_path_factory):
    """A one-convolution graph (conv, LeakyReLU, mean) saved as onnx2tf saves DarkNet19: a SavedModel."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(0, 0.2, (3, 3, 3, 8)).astype(np.float32))
    b = tf.constant(rng.normal(0, 0.1, 8).astype(np.float32))

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="image")])
        def serve(self, x):
            y = tf.nn.leaky_relu(tf.nn.conv2d(x / 255.0, w, 1, "SAME") + b, 0.1)
            return {"features": tf.reduce_mean(y, axis=[1, 2])}

    net = Net()
    path = tmp_path_factory.mktemp("saved") / "net"
    tf.saved_model.save(net, str(path), signatures={"serving_default": net.serve})
    images = rng.integers(0, 256, (24, 16, 16, 3)).astype(np.float32)
    images[3, 5, 5] = 255.0  # one bright pixel in one image: a rare large activation sets the max
    return path, images


def _ranges(model_bytes: bytes) -> tuple[dict[int, tuple[float, float]], set[int]]:
    from tensorflow.lite.tools import flatbuffer_utils

    sub = flatbuffer_utils.convert_bytearray_to_object(bytearray(model_bytes)).subgraphs[0]
    out = {i: (float(t.quantization.min[0]), float(t.quantization.max[0])) for i, t in enumerate(sub.tensors)
           if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1}
    return out, {int(i) for i in sub.inputs} | {int(i) for i in sub.outputs}


def test_ranges_only_narrow_keep_zero_and_leave_input_and_output(conv_saved_model) -> None:
    from convert.quantize import calibrate, narrow_ranges

    path, images = conv_saved_model
    calibrated = calibrate(path, images)
    before, io = _ranges(calibrated)
    after, _ = _ranges(narrow_ranges(calibrated, images, 99.0, images=len(images)))
    assert set(after) == set(before) and io <= set(before)
    for i, (lo, hi) in after.items():
        if i in io:
            assert (lo, hi) == before[i]
        else:
            assert before[i][0] <= lo <= 0.0 <= hi <= before[i][1]
    assert any(after[i][1] < before[i][1] for i in after if i not in io)  # the rare large values are clipped


def test_the_converter_in_two_halves_is_the_converter_and_ranges_change_it(conv_saved_model) -> None:
    """min/max ranges go through the converter in one call (the shipped graphs); a percentile goes through its
    two halves with the ranges set between them: the halves alone must give the one call's graph."""
    from ai_edge_litert.interpreter import Interpreter

    from convert.quantize import _full_integer, calibrate, quantize_calibrated

    path, images = conv_saved_model

    def outputs(model: bytes) -> np.ndarray:
        it = Interpreter(model_content=model)
        it.allocate_tensors()
        i, o = it.get_input_details()[0], it.get_output_details()[0]
        scale, zero = i["quantization"]
        res = []
        for im in images:
            it.set_tensor(i["index"], np.clip(np.round(im / scale + zero), -128, 127).astype(np.int8)[None])
            it.invoke()
            res.append(it.get_tensor(o["index"]).copy())
        return np.stack(res)

    one_call = outputs(_full_integer(path, images, None))
    assert np.array_equal(outputs(quantize_calibrated(calibrate(path, images))), one_call)
    narrowed = outputs(_full_integer(path, images, 99.0))
    assert narrowed.shape == one_call.shape and not np.array_equal(narrowed, one_call)


def test_a_range_percentile_that_is_not_one_is_refused(capsys) -> None:
    from convert import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--range-percentile", "100"])
    assert e.value.code == 2
    assert "'100' is not a percentile between 50 and 100" in capsys.readouterr().err
