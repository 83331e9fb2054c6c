"""Slide aggregation: from many field verdicts to one slide verdict (pure).

One field can be misread; a slide is many fields. The rule is a pair of binomial tests on the number of
distinct fields that show ALL evidence (a confident ALL label, or "ALL likely" with the subtype unsure),
using the per-field error rates the toolchain measured on held-out images (``manifest.json``
``slide``):

* **ALL** when that number is more than a benign slide produces: P(X >= k | n, f_hi) < ``false_alarm_risk``,
  f_hi = the rate at which benign fields raise ALL evidence, at the upper end of its 95% interval, and
  k >= ``all_fields``.
* **benign** when it is fewer than a slide with ``min_blast_fraction`` of blast fields would produce:
  P(X <= k | n, q) < ``missed_risk``, q = b * s_lo + (1 - b) * f_lo with the blast-field sensitivity and the
  false-alert rate at the lower ends of their intervals, and n >= ``benign_fields``.

Each test takes the end of the interval that guards its own error: the rates are measured on about a
hundred held-out fields of a few patients, and a point estimate used as if exact lets a new patient's
slightly higher false-alert rate call ALL on a benign slide (REPORT.md, "Slide verdict").
* **refer** when too many fields were uncertain, or when the slide is closed before either test decides.
* **pending** otherwise: scan more fields.

n counts distinct fields only: the caller drops near-duplicate frames of one area (see
:class:`Deduplicator`), so refocusing or re-panning adds no evidence.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

PENDING, BENIGN, ALL, REFER = "pending", "benign", "ALL", "refer"


class FieldLike(Protocol):
    """What aggregation needs from a field result (``device.store.records.FieldResult`` has it)."""

    status: str  # "ok" | "retake" | "refer"
    label: str | None
    all: bool


@dataclass(frozen=True)
class SlideRules:
    """``[alerts]`` in the config, plus the per-field rates measured by the toolchain (from the bundle).

    The defaults of the first four are ``[alerts]``'s (``device.config.AlertsConfig`` takes them from here).
    """

    all_fields: int = 2  # ALL is never called on fewer fields with ALL evidence
    benign_fields: int = 10  # benign is never called on fewer distinct classified fields
    subtype_agreement: float = 0.6
    refer_fraction: float = 0.5
    field_false_alert: float = 0.02  # P(ALL evidence | benign field), upper bound; the bundle's replaces it
    field_sensitivity: float = 0.9  # P(ALL evidence | blast field), lower bound; likewise
    #: P(ALL evidence | benign field), lower bound, for the benign test; None: ``field_false_alert`` (bundles
    #: made before the two ends were measured carry one rate).
    field_false_alert_low: float | None = None
    min_blast_fraction: float = 0.05  # a slide with this share of blast fields must not be called benign
    false_alarm_risk: float = 0.001
    missed_risk: float = 0.005


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
    #: How sure the call is: 1 - the test's p-value for ALL or benign; None while pending or referred.
    certainty: float | None = None

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "subtype": self.subtype, "reason": self.reason, "fields": self.fields,
                "counts": dict(self.counts), "statuses": dict(self.statuses), "all_fields": self.all_fields,
                "all_likely": self.all_likely, "certainty": self.certainty}


def _log_pmf(i: int, n: int, p: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    p = min(max(p, 1e-12), 1 - 1e-12)
    return min(1.0, sum(math.exp(_log_pmf(i, n, p)) for i in range(k, n + 1)))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return 1.0 - binom_sf(k + 1, n, p)


class Deduplicator:
    """Is this field new? Cosine similarity of feature fingerprints against the slide's recent fields.

    Refocusing, re-panning a little or a still camera give fingerprints above ``threshold`` (the toolchain
    measures the value); a new area of the smear falls below it. Bounded memory: the last ``keep`` fields.
    """

    def __init__(self, threshold: float, keep: int = 64):
        self.threshold = threshold
        self._recent: deque[np.ndarray] = deque(maxlen=keep)

    def reset(self) -> None:
        self._recent.clear()

    def is_new(self, fingerprint: np.ndarray) -> bool:
        v = np.asarray(fingerprint, np.float64).ravel()
        v = v / (np.linalg.norm(v) or 1.0)
        if any(float(v @ r) >= self.threshold for r in self._recent):
            return False
        self._recent.append(v)
        return True


#: What aggregation keeps of a field: (status, label, all). A slide's fields reduce to a few counts of these, so a
#: slide open for days costs the running appliance a handful of integers, not a list of every result.
FieldKey = tuple[str, str | None, bool]


def field_key(f: FieldLike) -> FieldKey:
    return (f.status, f.label, bool(f.all))


def tally(fields: Iterable[FieldLike]) -> Counter[FieldKey]:
    """Fields reduced to counts per :data:`FieldKey` (add one more with ``t[field_key(f)] += 1``)."""
    return Counter(field_key(f) for f in fields)


def aggregate(fields: Iterable[FieldLike], benign: str, rules: SlideRules = SlideRules(),
              classes: Iterable[str] = (), *, closed: bool = False) -> SlideVerdict:
    """The slide verdict of ``fields`` (in any order). ``classes`` pre-fills zero counts."""
    return aggregate_tally(tally(fields), benign, rules, classes, closed=closed)


def aggregate_tally(t: Mapping[FieldKey, int], benign: str, rules: SlideRules = SlideRules(),
                    classes: Iterable[str] = (), *, closed: bool = False) -> SlideVerdict:
    """:func:`aggregate` from a :func:`tally` (O(distinct keys) plus the binomial sums).

    ``closed``: the technician ended the slide, so an undecided slide is referred rather than pending.
    """
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
    classified = statuses["ok"] + statuses["refer"]
    evidence = all_seen + all_likely
    common = dict(fields=n, counts=dict(counts), statuses=dict(statuses), all_fields=all_seen,
                  all_likely=all_likely)
    f = rules.field_false_alert
    p_all = binom_sf(evidence, classified, f)
    if evidence >= rules.all_fields and p_all < rules.false_alarm_risk:
        why = (f"ALL evidence in {evidence} of {classified} fields; a benign slide shows that many with "
               f"p = {p_all:.1g}")
        top_n = max(all_labels.values(), default=0)
        tops = [k for k, v in all_labels.items() if v == top_n]
        if all_seen and len(tops) == 1 and top_n / all_seen >= rules.subtype_agreement:
            return SlideVerdict(ALL, tops[0], f"{why}; subtype {tops[0]} in {top_n} of {all_seen} confident fields",
                                certainty=1 - p_all, **common)
        split = ", ".join(f"{k} {v}" for k, v in sorted(all_labels.items())) or "none confident"
        return SlideVerdict(ALL, None, f"{why}; the subtypes disagree ({split}): refer for subtyping",
                            certainty=1 - p_all, **common)
    if classified >= rules.benign_fields and statuses["refer"] / classified >= rules.refer_fraction:
        return SlideVerdict(REFER, None, f"{statuses['refer']} of {classified} fields were uncertain; "
                            "send to a haematologist", **common)
    b = rules.min_blast_fraction
    f_low = f if rules.field_false_alert_low is None else rules.field_false_alert_low
    q = b * rules.field_sensitivity + (1 - b) * f_low
    p_missed = binom_cdf(evidence, classified, q)
    if classified >= rules.benign_fields and p_missed < rules.missed_risk:
        return SlideVerdict(BENIGN, None, f"ALL evidence in {evidence} of {classified} fields; a slide with "
                            f"{b:.0%} blast fields shows that few with p = {p_missed:.1g}",
                            certainty=1 - p_missed, **common)
    need = max(rules.benign_fields - classified, 0)
    more = f"{need} more fields at least" if need else "more fields"
    if closed:
        return SlideVerdict(REFER, None, f"undecided after {classified} classified fields (ALL evidence in "
                            f"{evidence}); send to a haematologist", **common)
    return SlideVerdict(PENDING, None, f"ALL evidence in {evidence} of {classified} fields: too few to call ALL, "
                        f"too many or too few fields to call benign; scan {more}", **common)
