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
