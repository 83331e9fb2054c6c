"""A confident label needs the network's own classifier to agree (``device.classifier.decide``): its arrays travel
in ``head.npz`` beside the SVM, are checked like the head's own, and a bundle without them keeps the old rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from device.bundle import Bundle, Thresholds
from device.classifier import NETWORK_DISAGREES, decide
from device.errors import BundleError
from device.head import Head, evaluate, load_head, save_head
from device.status import Status


def with_network(head: Head, top: int) -> Head:
    """The head with a network classifier whose top class is ``top`` for every field (its bias alone decides)."""
    c = len(head.classes)
    return dataclasses.replace(head, network_coef=np.zeros((c, head.n_features)),
                               network_intercept=np.eye(c)[top] * 10.0)


@pytest.fixture
def field(decisive_bundle: Bundle) -> np.ndarray:
    return np.random.default_rng(3).normal(1.0, 0.5, decisive_bundle.head.n_features).astype(np.float32)


def test_a_label_the_network_agrees_with_stands_and_one_it_does_not_is_referred(decisive_bundle: Bundle,
                                                                                field: np.ndarray) -> None:
    b = decisive_bundle
    plain = evaluate(b.head, field)
    assert plain.network_index == -1  # a head without the arrays: the old rule
    assert decide(b.head, plain, b.benign, b.thresholds).status == Status.OK
    top = plain.index
    agree = evaluate(with_network(b.head, top), field)
    v = decide(b.head, agree, b.benign, b.thresholds)
    assert agree.network_index == top and v.status == Status.OK and v.label == b.head.classes[top]
    other = (top + 1) % len(b.head.classes)
    out = evaluate(with_network(b.head, other), field)
    v = decide(b.head, out, b.benign, b.thresholds)
    assert out.network_index == other and v.status == Status.REFER and v.label is None
    assert NETWORK_DISAGREES in v.reason and "unlike the training images" in v.reason
    assert b.head.classes[top] in v.reason and b.head.classes[other] in v.reason
    assert v.all is False  # P(ALL) under this bundle's alert threshold (1.1): no alert
    alert = decide(b.head, out, b.benign, dataclasses.replace(b.thresholds, all_probability=0.0))
    assert alert.status == Status.REFER and alert.all is True  # ALL likely: the referred field still alerts


def test_an_unconfident_field_is_referred_for_its_confidence_whatever_the_network_says(decisive_bundle: Bundle,
                                                                                       field: np.ndarray) -> None:
    b = decisive_bundle
    out = evaluate(with_network(b.head, (evaluate(b.head, field).index + 1) % len(b.head.classes)), field)
    v = decide(b.head, out, b.benign, Thresholds(confidence=1.01, all_probability=1.1, benign_confidence=1.01))
    assert v.status == Status.REFER and NETWORK_DISAGREES not in v.reason and "low confidence" in v.reason


def test_the_network_arrays_survive_head_npz_and_a_half_pair_or_a_wrong_shape_is_refused(
        decisive_bundle: Bundle, field: np.ndarray, tmp_path: Path) -> None:
    head = with_network(decisive_bundle.head, 2)
    save_head(tmp_path / "head.npz", head)
    back = load_head(tmp_path / "head.npz")
    np.testing.assert_array_equal(back.network_coef, head.network_coef)
    np.testing.assert_array_equal(back.network_intercept, head.network_intercept)
    assert evaluate(back, field).network_index == 2
    with np.load(tmp_path / "head.npz") as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(tmp_path / "half.npz", **{k: v for k, v in arrays.items() if k != "network_intercept"})
    with pytest.raises(BundleError, match="network_coef without network_intercept"):
        load_head(tmp_path / "half.npz")
    np.savez(tmp_path / "shape.npz", **{**arrays, "network_coef": arrays["network_coef"][:, :-1]})
    with pytest.raises(BundleError, match="'network_coef' has shape"):
        load_head(tmp_path / "shape.npz")
    np.savez(tmp_path / "nan.npz", **{**arrays, "network_intercept": np.full(len(head.classes), np.nan)})
    with pytest.raises(BundleError, match="'network_intercept' holds NaN"):
        load_head(tmp_path / "nan.npz")
