"""Slide aggregation: ALL only when confidently seen in enough fields, subtype by agreement, refer when the
fields disagree, benign only after enough benign fields and no ALL evidence."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from device.slides import ALL, BENIGN, PENDING, REFER, SlideRules, aggregate

CLASSES = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
RULES = SlideRules(all_fields=2, benign_fields=5, subtype_agreement=0.6, refer_fraction=0.5)


@dataclass(frozen=True)
class F:
    status: str
    label: str | None = None
    all: bool = False


def ok(label: str) -> F:
    return F("ok", label, label != "Benign")


BEN, RETAKE, REF, REF_ALL = ok("Benign"), F("retake"), F("refer"), F("refer", None, True)


def verdict(*fields: F):
    return aggregate(fields, "Benign", RULES, CLASSES)


def test_empty_slide_is_pending_with_zero_counts() -> None:
    v = verdict()
    assert v.verdict == PENDING and v.fields == 0
    assert v.counts == dict.fromkeys(CLASSES, 0) and v.statuses == {"ok": 0, "retake": 0, "refer": 0}


def test_all_needs_enough_confident_fields() -> None:
    assert verdict(ok("Pre-B")).verdict == PENDING
    v = verdict(ok("Pre-B"), BEN, ok("Pre-B"))
    assert (v.verdict, v.subtype, v.all_fields) == (ALL, "Pre-B", 2)
    assert v.counts["Pre-B"] == 2 and v.counts["Benign"] == 1


def test_subtype_by_majority_and_none_when_the_subtypes_disagree() -> None:
    assert verdict(ok("Pro-B"), ok("Pro-B"), ok("Pro-B"), ok("Pre-B")).subtype == "Pro-B"
    split = verdict(ok("Pro-B"), ok("Pre-B"))
    assert split.verdict == ALL and split.subtype is None and "disagree" in split.reason
    weak = verdict(ok("Pro-B"), ok("Pro-B"), ok("Pre-B"), ok("Early Pre-B"))  # 2/4 < 0.6
    assert weak.verdict == ALL and weak.subtype is None


def test_benign_only_after_enough_benign_fields_and_no_all_evidence() -> None:
    assert verdict(*[BEN] * 4).verdict == PENDING
    assert verdict(*[BEN] * 5, RETAKE, RETAKE).verdict == BENIGN
    # one field with ALL evidence among many benign ones: the fields disagree -> refer
    for evidence in (ok("Pro-B"), REF_ALL):
        v = verdict(*[BEN] * 6, evidence)
        assert v.verdict == REFER and "disagree" in v.reason


def test_too_many_uncertain_fields_refer_the_slide() -> None:
    v = verdict(*[REF] * 3, *[BEN] * 3)
    assert v.verdict == REFER and v.statuses["refer"] == 3
    assert verdict(*[REF] * 2, *[BEN] * 5).verdict == BENIGN


def test_retakes_count_as_fields_but_never_decide() -> None:
    v = verdict(*[RETAKE] * 20)
    assert v.verdict == PENDING and v.fields == 20 and v.statuses["retake"] == 20


@pytest.mark.parametrize("order", [0, 1])
def test_order_does_not_matter(order: int) -> None:
    fields = [ok("Pro-B"), BEN, ok("Pro-B"), REF, RETAKE]
    assert verdict(*(fields if order == 0 else fields[::-1])) == verdict(*fields)


def test_to_dict_is_json_ready() -> None:
    import json

    d = verdict(ok("Pro-B"), ok("Pro-B")).to_dict()
    assert json.loads(json.dumps(d))["verdict"] == "ALL"
