"""Slide aggregation: from many field verdicts to one slide verdict (pure).

One field can be misread; a slide is many fields. The slide is called ALL
only when ALL is *confidently* seen in several fields, benign only after
enough confident benign fields with no ALL evidence at all, and referred to
a haematologist when its fields disagree (some ALL evidence but not enough,
or too many uncertain fields). Anything else is "pending": keep scanning.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

PENDING, BENIGN, ALL, REFER = "pending", "benign", "ALL", "refer"


class FieldLike(Protocol):
    """What aggregation needs from a field result (``device.store.FieldResult`` has it)."""

    status: str  # "ok" | "retake" | "refer"
    label: str | None
    all: bool


@dataclass(frozen=True)
class SlideRules:
    """``[alerts]`` in the config."""

    all_fields: int = 2
    benign_fields: int = 10
    subtype_agreement: float = 0.6
    refer_fraction: float = 0.5


@dataclass(frozen=True)
class SlideVerdict:
    verdict: str  # "pending" | "benign" | "ALL" | "refer"
    subtype: str | None  # the ALL subtype when the ALL fields agree on one
    reason: str
    fields: int  # all fields of the slide, retakes included
    counts: dict[str, int] = field(default_factory=dict)  # confident ("ok") fields per class
    statuses: dict[str, int] = field(default_factory=dict)  # fields per status
    all_fields: int = 0  # fields where ALL was confidently seen
    all_likely: int = 0  # referred fields where ALL was likely but the subtype unsure

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "subtype": self.subtype, "reason": self.reason, "fields": self.fields,
                "counts": dict(self.counts), "statuses": dict(self.statuses), "all_fields": self.all_fields,
                "all_likely": self.all_likely}


#: What aggregation keeps of a field: (status, label, all). A slide's fields reduce to a few counts of these, so a
#: slide open for days costs the running appliance a handful of integers, not a list of every result.
FieldKey = tuple[str, str | None, bool]


def field_key(f: FieldLike) -> FieldKey:
    return (f.status, f.label, bool(f.all))


def tally(fields: Iterable[FieldLike]) -> Counter[FieldKey]:
    """Fields reduced to counts per :data:`FieldKey` (add one more with ``t[field_key(f)] += 1``)."""
    return Counter(field_key(f) for f in fields)


def aggregate(fields: Iterable[FieldLike], benign: str, rules: SlideRules = SlideRules(),
              classes: Iterable[str] = ()) -> SlideVerdict:
    """The slide verdict of ``fields`` (in any order). ``classes`` pre-fills zero counts."""
    return aggregate_tally(tally(fields), benign, rules, classes)


def aggregate_tally(t: Mapping[FieldKey, int], benign: str, rules: SlideRules = SlideRules(),
                    classes: Iterable[str] = ()) -> SlideVerdict:
    """:func:`aggregate` from a :func:`tally` (O(distinct keys), whatever the number of fields)."""
    counts: Counter[str] = Counter({c: 0 for c in classes})
    statuses: Counter[str] = Counter({"ok": 0, "retake": 0, "refer": 0})
    n = all_seen = all_likely = 0
    all_labels: Counter[str] = Counter()
    for (status, label, is_all), k in t.items():
        if k <= 0:
            continue
        n += k
        statuses[status] += k
        if status == "ok" and label is not None:
            counts[label] += k
            if is_all and label != benign:
                all_seen += k
                all_labels[label] += k
        elif status == "refer" and is_all:
            all_likely += k
    benign_n = counts.get(benign, 0)
    classified = statuses["ok"] + statuses["refer"]
    common = dict(fields=n, counts=dict(counts), statuses=dict(statuses), all_fields=all_seen,
                  all_likely=all_likely)

    if all_seen >= rules.all_fields:
        top, top_n = all_labels.most_common(1)[0]
        tied = sum(1 for v in all_labels.values() if v == top_n) > 1
        if not tied and top_n / all_seen >= rules.subtype_agreement:
            return SlideVerdict(ALL, top, f"ALL seen in {all_seen} fields; subtype {top} in {top_n} of them",
                                **common)
        split = ", ".join(f"{k} {v}" for k, v in sorted(all_labels.items()))
        return SlideVerdict(ALL, None, f"ALL seen in {all_seen} fields but the subtypes disagree ({split}); "
                            "refer for subtyping", **common)
    evidence = all_seen + all_likely
    if evidence and benign_n >= rules.benign_fields:
        return SlideVerdict(REFER, None, f"fields disagree: ALL evidence in {evidence} field(s) "
                            f"(fewer than {rules.all_fields} confident) but {benign_n} benign; "
                            "send to a haematologist", **common)
    if evidence:
        return SlideVerdict(PENDING, None, f"ALL evidence in {evidence} field(s); "
                            f"scan more fields ({rules.all_fields} confident ALL fields make the call)", **common)
    if classified and statuses["refer"] / classified >= rules.refer_fraction and classified >= rules.benign_fields:
        return SlideVerdict(REFER, None, f"{statuses['refer']} of {classified} fields were uncertain; "
                            "send to a haematologist", **common)
    if benign_n >= rules.benign_fields:
        return SlideVerdict(BENIGN, None, f"{benign_n} confident benign fields and no ALL", **common)
    return SlideVerdict(PENDING, None, f"{benign_n} of {rules.benign_fields} benign fields needed; "
                        "keep scanning", **common)
