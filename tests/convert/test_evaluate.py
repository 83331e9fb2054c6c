import numpy as np

from convert.evaluate import errors_by_block, wilson


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
