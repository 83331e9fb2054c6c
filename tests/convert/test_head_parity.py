"""The numpy head must compute what scikit-learn fitted: SVM scores, Platt probabilities, OOD scores."""

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from convert.fit import choose_k, choose_thresholds, fit_head
from device.head import OOD_METHODS, evaluate, evaluate_many, load_head, save_head, standardise

CLASSES = ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]


def data(rng, n, f=60, spread=0.8):
    y = rng.integers(0, 4, n)
    return rng.normal(size=(n, f)) + np.eye(4)[y] @ np.random.default_rng(7).normal(size=(4, f)) * spread, y


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(1)
    return data(rng, 400), data(rng, 200), data(rng, 300)


IDX = np.array([5, 1, 7, 30, 2, 44, 13, 20])


@pytest.mark.parametrize("method", OOD_METHODS)
def test_numpy_head_matches_sklearn_scores_and_probabilities(sets, method):
    (x, y), (xv, yv), (xt, _) = sets
    head = fit_head(x, y, xv, yv, CLASSES, IDX, C=0.1, ood_method=method)
    scaler = StandardScaler().fit(x[:, IDX])
    ref = LinearSVC(C=0.1, max_iter=20000, random_state=0).fit(scaler.transform(x[:, IDX]), y)
    outs = evaluate_many(head, xt)
    np.testing.assert_allclose(np.stack([o.scores for o in outs]), ref.decision_function(scaler.transform(xt[:, IDX])),
                               atol=1e-9)
    p = np.stack([o.probs for o in outs])
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert [evaluate(head, row).index for row in xt[:20]] == [o.index for o in outs[:20]]


def test_knn_distance_is_the_brute_force_mean_of_the_five_nearest(sets):
    (x, y), (xv, yv), (xt, _) = sets
    head = fit_head(x, y, xv, yv, CLASSES, IDX, C=0.1, ood_method="knn")
    z, zt = standardise(head, x), standardise(head, xt[:5])
    for row, o in zip(zt, evaluate_many(head, xt[:5])):
        d = np.sort(np.sqrt(((z - row) ** 2).mean(1)))[:5].mean()
        assert o.distance == pytest.approx(d, rel=1e-4)


@pytest.mark.parametrize("method", ("knn", "mahalanobis"))
def test_ood_threshold_is_set_on_validation_and_far_fields_are_out(sets, method):
    (x, y), (xv, yv), _ = sets
    head = fit_head(x, y, xv, yv, CLASSES, IDX, C=0.1, ood_method=method)
    d_val = np.array([o.distance for o in evaluate_many(head, xv)])
    assert 0.005 <= (d_val > head.ood_threshold).mean() <= 0.03  # the validation 98th percentile
    assert evaluate(head, x[0] + 25.0).distance > head.ood_threshold


def test_k_is_the_smallest_within_one_standard_error(sets):
    (x, y), (xv, yv), _ = sets
    sel = choose_k(x, y, xv, yv, ks=(2, 5, 10, 60), cs=(0.1,))
    best = max(r["val_accuracy"] for r in sel.table)
    assert sel.k == min(r["k"] for r in sel.table if r["val_accuracy"] >= best - sel.se)
    assert len(sel.ranking) == x.shape[1]


def test_thresholds_keep_validation_all_fields_from_being_called_benign(sets):
    (x, y), (xv, yv), _ = sets
    head = fit_head(x, y, xv, yv, CLASSES, IDX, C=0.1)
    th, _ = choose_thresholds(head, xv, yv, 0)
    assert 0.5 <= th.confidence <= th.benign_confidence <= 0.99
    for o, truth in zip(evaluate_many(head, xv), yv):
        if truth != 0 and o.index == 0 and o.distance <= head.ood_threshold and th.benign_confidence < 0.99:
            assert o.confidence < th.benign_confidence


@pytest.mark.parametrize("method", OOD_METHODS)
def test_save_load_round_trip(sets, tmp_path, method):
    (x, y), (xv, yv), (xt, _) = sets
    head = fit_head(x, y, xv, yv, CLASSES, IDX, C=0.1, ood_method=method)
    save_head(tmp_path / "h.npz", head)
    back = load_head(tmp_path / "h.npz")
    assert back.classes == head.classes and back.k == head.k and back.ood_method == method
    a, b = evaluate(back, xt[0]), evaluate(head, xt[0])
    np.testing.assert_allclose(a.probs, b.probs)
    assert a.distance == pytest.approx(b.distance, rel=1e-5)
