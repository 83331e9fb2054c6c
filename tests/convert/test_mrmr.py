import numpy as np
from sklearn.metrics import mutual_info_score

from convert.mrmr import discretise, mrmr, mutual_info_many


def _toy(n=600, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, 40))
    x[:, 3] += 2.0 * y  # strongly relevant
    x[:, 4] = x[:, 3] + 0.01 * rng.normal(size=n)  # redundant copy of 3
    x[:, 9] += 3.0 * (y == 2)  # relevant, different information
    return x, y


def test_mutual_information_matches_scikit_learn():
    x, y = _toy()
    xb = discretise(x, 10)
    ours = mutual_info_many(y, xb, 4, 10)
    ref = [mutual_info_score(y, xb[:, j]) for j in range(x.shape[1])]
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_discretise_is_equal_frequency():
    x, _ = _toy()
    counts = np.bincount(discretise(x, 10)[:, 0], minlength=10)
    assert counts.min() >= 55 and counts.max() <= 65


def test_mrmr_prefers_relevant_and_penalises_redundant():
    x, y = _toy()
    for criterion in ("MIQ", "MID"):
        rank = mrmr(x, y, 5, criterion=criterion)
        assert rank[0] in (3, 4)
        assert 9 in rank[:2], (criterion, rank)  # new information beats the redundant copy
        assert len(set(rank)) == 5


def test_full_ranking_is_a_permutation_and_deterministic():
    x, y = _toy(200)
    r1, r2 = mrmr(x, y), mrmr(x, y)
    assert sorted(r1.tolist()) == list(range(40))
    np.testing.assert_array_equal(r1, r2)
