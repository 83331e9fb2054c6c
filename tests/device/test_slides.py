"""Slide aggregation: binomial tests on the distinct fields with ALL evidence, using the per-field rates the
toolchain measured; subtype by agreement; refer when uncertain or closed undecided; near-duplicates add nothing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from device.slides import (
    ALL,
    BENIGN,
    PENDING,
    REFER,
    Deduplicator,
    SlideRules,
    aggregate,
    binom_cdf,
    binom_sf,
)

CLASSES = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
RULES = SlideRules(all_fields=2, benign_fields=20, subtype_agreement=0.6, refer_fraction=0.5,
                   field_false_alert=0.01, field_sensitivity=0.95, min_blast_fraction=0.2,
                   false_alarm_risk=0.001, missed_risk=0.005)


@dataclass(frozen=True)
class F:
    status: str
    label: str | None = None
    all: bool = False


def ok(label: str) -> F:
    return F("ok", label, label != "Benign")


BEN, RETAKE, REF, REF_ALL = ok("Benign"), F("retake"), F("refer"), F("refer", None, True)


def verdict(*fields: F, closed: bool = False):
    return aggregate(fields, "Benign", RULES, CLASSES, closed=closed)


def test_binomial_tails_match_direct_sums() -> None:
    from math import comb

    n, p = 30, 0.07
    direct = sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(4, n + 1))
    assert binom_sf(4, n, p) == pytest.approx(direct, rel=1e-9)
    assert binom_cdf(3, n, p) == pytest.approx(1 - direct, rel=1e-9)
    assert binom_sf(0, 5, 0.3) == 1.0 and binom_sf(6, 5, 0.3) == 0.0


def test_empty_slide_is_pending_with_zero_counts() -> None:
    v = verdict()
    assert v.verdict == PENDING and v.fields == 0 and v.certainty is None
    assert v.counts == dict.fromkeys(CLASSES, 0) and v.statuses == {"ok": 0, "retake": 0, "refer": 0}


def test_all_needs_more_evidence_than_a_benign_slide_gives() -> None:
    assert verdict(ok("Pre-B")).verdict == PENDING  # one field is never enough
    v = verdict(ok("Pre-B"), BEN, ok("Pre-B"))  # 2 of 3 at a 1% false-alert rate: p = 3e-4
    assert (v.verdict, v.subtype, v.all_fields) == (ALL, "Pre-B", 2)
    assert v.certainty > 0.999 and "p = " in v.reason
    # the same 2 ALL fields among 60 benign ones is what a benign slide produces: not ALL
    assert verdict(ok("Pre-B"), ok("Pre-B"), *[BEN] * 60).verdict != ALL


def test_subtype_by_majority_and_none_when_the_subtypes_disagree() -> None:
    assert verdict(ok("Pro-B"), ok("Pro-B"), ok("Pro-B"), ok("Pre-B")).subtype == "Pro-B"
    split = verdict(ok("Pro-B"), ok("Pre-B"))
    assert split.verdict == ALL and split.subtype is None and "disagree" in split.reason
    weak = verdict(ok("Pro-B"), ok("Pro-B"), ok("Pre-B"), ok("Early Pre-B"))  # 2/4 < 0.6
    assert weak.verdict == ALL and weak.subtype is None


def test_benign_needs_enough_distinct_fields_and_too_little_all_evidence() -> None:
    assert verdict(*[BEN] * 19).verdict == PENDING  # fewer than benign_fields
    v = verdict(*[BEN] * 25, RETAKE, RETAKE)
    assert v.verdict == BENIGN and v.certainty > 0.995
    # a slide with 20% blast fields shows about 4 of 20: 1 in 25 does not rule that out
    assert verdict(*[BEN] * 24, REF_ALL).verdict == PENDING
    assert verdict(*[BEN] * 60, ok("Pro-B")).verdict == BENIGN


def test_closed_undecided_slides_are_referred() -> None:
    v = verdict(*[BEN] * 10, closed=True)
    assert v.verdict == REFER and "undecided" in v.reason


def test_too_many_uncertain_fields_refer_the_slide() -> None:
    v = verdict(*[REF] * 12, *[BEN] * 12)
    assert v.verdict == REFER and v.statuses["refer"] == 12


def test_retakes_count_as_fields_but_never_decide() -> None:
    v = verdict(*[RETAKE] * 40)
    assert v.verdict == PENDING and v.fields == 40 and v.statuses["retake"] == 40


def test_a_benign_slide_is_rarely_called_all_and_a_5_percent_slide_rarely_benign() -> None:
    rules = SlideRules(field_false_alert=0.02, field_sensitivity=0.9, benign_fields=30)
    rng = np.random.default_rng(0)

    def slide(frac: float):
        blast = rng.random(100) < frac
        alert = np.where(blast, rng.random(100) < 0.9, rng.random(100) < 0.02)
        return aggregate([ok("Pre-B") if a else BEN for a in alert], "Benign", rules, CLASSES, closed=True).verdict

    benign = [slide(0.0) for _ in range(300)]
    five = [slide(0.05) for _ in range(300)]
    assert benign.count(ALL) <= 3  # <= 1%
    assert five.count(BENIGN) <= 3  # called ALL or referred >= 99%


def test_near_duplicate_fields_are_not_new() -> None:
    d = Deduplicator(0.95, keep=3)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert d.is_new(a) and not d.is_new(a + rng.normal(scale=0.05, size=50)) and d.is_new(b)
    for _ in range(3):
        d.is_new(rng.normal(size=50))
    assert d.is_new(a)  # forgotten after `keep` other fields: bounded memory
    d.reset()
    assert d.is_new(b)


@pytest.mark.parametrize("order", [0, 1])
def test_order_does_not_matter(order: int) -> None:
    fields = [ok("Pro-B"), BEN, ok("Pro-B"), REF, RETAKE]
    assert verdict(*(fields if order == 0 else fields[::-1])) == verdict(*fields)


def test_to_dict_is_json_ready() -> None:
    import json

    d = verdict(ok("Pro-B"), ok("Pro-B")).to_dict()
    assert json.loads(json.dumps(d))["verdict"] == "ALL"


def test_each_test_takes_the_end_of_the_interval_that_guards_its_error():
    """ALL uses the false-alert rate's upper end; benign uses its lower end, so an uncertain rate makes the box
    refer rather than call either verdict too easily."""
    one = SlideRules(benign_fields=20, field_false_alert=0.10, field_sensitivity=0.95, min_blast_fraction=0.05)
    two = SlideRules(benign_fields=20, field_false_alert=0.10, field_false_alert_low=0.01, field_sensitivity=0.95,
                     min_blast_fraction=0.05)
    # 100 fields, 4 with ALL evidence: fewer than a 5%-blast slide shows at f = 10%, not at f = 1%.
    fields = [ok("Pre-B")] * 4 + [BEN] * 96
    assert aggregate(fields, "Benign", one, CLASSES, closed=True).verdict == BENIGN
    assert aggregate(fields, "Benign", two, CLASSES, closed=True).verdict == REFER
    # The ALL test is the same under both: 25 of 100 is more than a benign slide shows at f = 10%.
    many = [ok("Pre-B")] * 25 + [BEN] * 75
    assert aggregate(many, "Benign", one, CLASSES).verdict == aggregate(many, "Benign", two, CLASSES).verdict == ALL
