"""What a page poll costs was cut without changing what it answers: ``FieldResult.to_dict`` and
``Quality.to_dict`` (made by hand) give exactly what ``dataclasses.asdict`` gave (same keys in the same order,
same values, same JSON), and the live snapshot's newest results are read once per status ``seq``."""

from __future__ import annotations

import dataclasses
import json

from device.quality import Quality
from device.status import Status
from device.store.records import FieldResult


def test_to_dict_is_asdict() -> None:
    q = Quality(False, "blur", "out of focus", 11.25, 201.5, 0.125, 0.0031)
    for r in (FieldResult(1.5, Status.OK, "Pre-B", True, 0.91, {"Benign": 0.09, "Pre-B": 0.91}, "", q,
                          {"capture": 1.0, "invoke": 9.5}, "abc", "b-1234", "replay", "n.jpg", "S1", 0.3, 0.8,
                          "images/x.jpg", 7),
              FieldResult(2.0, Status.RETAKE, None, False, 0.0, {}, "why", q, {}, "abc")):
        got, want = r.to_dict(), dataclasses.asdict(r)
        assert got == want and list(got) == list(want) and list(got["quality"]) == list(want["quality"])
        assert json.dumps(got) == json.dumps(want)
        assert got["scores"] is not r.scores and got["timings"] is not r.timings  # copies, as asdict made
    assert q.to_dict() == dataclasses.asdict(q) and list(q.to_dict()) == list(dataclasses.asdict(q))


def test_the_live_snapshot_reads_the_newest_results_once_per_seq() -> None:
    from device.web.presenters import RecentCache

    cache, reads = RecentCache(), []

    def read() -> list:
        reads.append(1)
        return [{"n": len(reads)}]

    assert cache.get(1, read) == [{"n": 1}] and cache.get(1, read) == [{"n": 1}] and len(reads) == 1
    assert cache.get(2, read) == [{"n": 2}] and len(reads) == 2  # a new field recorded: read again
    assert cache.get(None, read) == [{"n": 3}] and cache.get(None, read) == [{"n": 4}]  # no seq: never shared


def test_status_percentiles_are_numpys_linear_percentiles() -> None:
    import numpy as np

    from device.loop.status import Timing, percentile

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 100, 299):
        values = list(rng.gamma(2.0, 5.0, n))
        for q in (0, 50, 95, 99, 100):
            assert percentile(values, q) == round(float(np.percentile(values, q)), 2), (n, q)
    assert percentile([], 95) is None
    assert Timing.of([4.0, 1.0, 3.0, 2.0]) == Timing(2.5, 3.85, 4)  # unsorted input
