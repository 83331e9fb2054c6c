"""The numpy head must decide exactly as scikit-learn does."""

import numpy as np
import pytest

from convert.fit import fit_head
from device.head import evaluate, evaluate_many, load_head, save_head

CLASSES = ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(1)
    n, f = 400, 60
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, f)) + np.eye(4)[y] @ rng.normal(size=(4, f)) * 0.8
    idx = np.array([5, 1, 7, 30, 2, 44, 13, 20])
    head, cal, scaler = fit_head(x, y, CLASSES, idx, C=0.1)
    xt = rng.normal(size=(300, f)) + np.eye(4)[rng.integers(0, 4, 300)] @ rng.normal(size=(4, f))
    return head, cal, scaler, x, xt, idx


def test_numpy_head_matches_sklearn_decisions_and_probabilities(fitted):
    head, cal, scaler, _, xt, idx = fitted
    z = scaler.transform(xt[:, idx])
    ref_pred, ref_p = cal.predict(z), cal.predict_proba(z)
    outs = [evaluate(head, row) for row in xt]
    np.testing.assert_array_equal([o.index for o in outs], ref_pred)
    np.testing.assert_allclose(np.stack([o.probs for o in outs]), ref_p, atol=1e-9)
    batch = evaluate_many(head, xt)
    assert [o.index for o in batch] == [o.index for o in outs]


def test_ood_threshold_flags_far_fields_not_training_ones(fitted):
    head, _, _, x, _, _ = fitted
    d_train = np.array([evaluate(head, row).distance for row in x])
    assert (d_train > head.ood_threshold).mean() < 0.01
    far = x[0] + 25.0
    assert evaluate(head, far).distance > head.ood_threshold


def test_save_load_round_trip(fitted, tmp_path):
    head = fitted[0]
    save_head(tmp_path / "h.npz", head)
    back = load_head(tmp_path / "h.npz")
    row = fitted[4][0]
    assert back.classes == head.classes and back.k == head.k
    np.testing.assert_allclose(evaluate(back, row).probs, evaluate(head, row).probs)
