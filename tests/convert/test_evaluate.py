import numpy as np
import pytest

from convert.evaluate import duplicate_check, duplicate_threshold, errors_by_block, wilson
from device.head import Head


def test_errors_by_block_counts_each_blocks_images_and_misses():
    block_of = {"B/1.jpg": ("Benign", 0, 1, 2), "B/2.jpg": ("Benign", 0, 1, 2), "B/3.jpg": ("Benign", 1, 3, 3),
                "E/7.jpg": ("Early", 4, 7, 7)}
    names = ["E/7.jpg", "B/3.jpg", "B/1.jpg", "B/2.jpg"]
    rows = errors_by_block(np.array([1, 0, 0, 0]), np.array([1, 1, 0, 1]), names, block_of)
    assert [(r["class"], r["block"], r["first"], r["last"], r["wrong"], r["n"]) for r in rows] == [
        ("Benign", 0, 1, 2, 1, 2), ("Benign", 1, 3, 3, 1, 1), ("Early", 4, 7, 7, 0, 1)]


def test_wilson_interval_brackets_the_rate_and_stays_in_0_1():
    lo, hi = wilson(86, 104)
    assert 0.74 < lo < 86 / 104 < hi < 0.89
    assert wilson(0, 12)[0] == 0.0 and wilson(12, 12)[1] == 1.0


def _identity_head(k: int) -> Head:
    """Fingerprints are then the features themselves (indices 0..k-1, mean 0, scale 1)."""
    z = np.zeros(1)
    return Head(("A",), np.arange(k), np.zeros(k), np.ones(k), np.zeros((1, k)), z, z, z, "energy", 0.0, k)


def test_duplicate_threshold_is_the_quantile_of_distinct_pairs_within_blocks_only():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 8))
    groups = np.repeat(["a:0", "a:1", "b:0", "b:1"], 10)
    head = _identity_head(8)
    out = duplicate_threshold(head, feats, groups)
    assert out["distinct_pairs"] == 4 * 45  # 10 fields a block: 45 pairs each, none across blocks
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    within = np.concatenate([(u @ u.T)[np.triu_indices(10, 1)] for u in np.split(unit, 4)])
    assert out["threshold"] == pytest.approx(np.quantile(within, 0.995))
    # a pair across blocks, made identical, changes nothing: it is not a pair of one block
    feats[10] = feats[0]
    assert duplicate_threshold(head, feats, groups)["threshold"] == pytest.approx(out["threshold"])


def test_duplicate_check_counts_merged_pairs_and_recognised_recaptures():
    head = _identity_head(3)
    feats = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    groups = np.array(["a:0", "a:0", "a:0", "b:0"])
    recapture = feats + np.array([[0, 0.01, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])  # the third is not the same field
    out = duplicate_check(head, feats, groups, [recapture], threshold=0.95)
    assert out["distinct_pairs"] == 3  # the 3 pairs of block a:0; b:0 has one field
    assert out["distinct_merged"] == pytest.approx(1 / 3)  # fields 0 and 1 (cosine 0.994)
    assert out["recaptures_recognised"] == [pytest.approx(3 / 4)]
