"""What the store keeps and answers with: one field's result, a slide's row, the store's figures, the query filters,
and how a result maps to and from its row in ``fields`` (the one place that lists the columns)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from device.quality import Quality


@dataclass(frozen=True)
class FieldResult:
    """One classified (or rejected) field, as recorded. ``id`` and ``image`` are set by the store."""

    time: float  # epoch seconds of the capture
    status: str  # a device.status.Status value: "ok" | "retake" | "refer"
    label: str | None
    all: bool
    confidence: float
    scores: dict[str, float]
    reason: str
    quality: Quality
    timings: dict[str, float]  # ms per stage: capture, quality, preprocess, invoke, head, store
    model_sha256: str
    bundle: str | None = None  # <name>-<sha8> of the bundle that produced it; None: recorded before bundles were named
    source: str = "camera"  # "camera" | "replay" | "files" | "synthetic" | "upload"
    name: str = ""  # frame or file name
    slide_id: str | None = None
    distance: float | None = None
    p_all: float | None = None
    image: str | None = None  # JPEG path relative to the state dir; None when not kept or pruned
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON-able values (its fields; the quality as a dict), nothing added. The page's
        form of a result, with its time in ISO and its URLs, is made from this by ``device.web.presenters``.

        What ``dataclasses.asdict`` gives, made directly: the page asks for a dozen results per poll, and asdict's
        recursive deep copy was most of a poll's cost."""
        d = {name: getattr(self, name) for name in _RESULT_FIELDS}
        d["scores"], d["timings"], d["quality"] = dict(self.scores), dict(self.timings), self.quality.to_dict()
        return d


_RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(FieldResult))


@dataclass(frozen=True)
class SlideRow:
    id: str
    started: float
    ended: float | None
    fields: int = 0
    all_fields: int = 0


@dataclass(frozen=True)
class StoreStats:
    fields: int
    slides: int
    db_bytes: int
    image_bytes: int
    image_count: int
    images_enabled: bool
    last_image_error: str = ""


@dataclass(frozen=True)
class Filters:
    """Query filters; every one is optional."""

    since: float | None = None
    until: float | None = None
    slide_id: str | None = None
    label: str | None = None
    status: str | None = None
    all: bool | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for col, op, val in (("time", ">=", self.since), ("time", "<", self.until), ("slide_id", "=", self.slide_id),
                             ("label", "=", self.label), ("status", "=", self.status), ("source", "=", self.source)):
            if val is not None:
                clauses.append(f"{col} {op} ?")
                args.append(val)
        if self.all is not None:
            clauses.append("is_all = ?")
            args.append(int(bool(self.all)))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


#: Every result (the default of the store's queries).
NO_FILTERS = Filters()


#: The columns a result is read back from, in :func:`from_row`'s order.
COLUMNS = ("id, time, slide_id, source, name, status, label, is_all, confidence, scores, reason, quality, timings,"
           " model_sha256, distance, p_all, image, bundle")
INSERT = ("INSERT INTO fields (time, slide_id, source, name, status, label, is_all, confidence, scores, reason,"
          " quality, timings, model_sha256, distance, p_all, image, bundle)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
#: A slide with its field counts; the caller adds the WHERE/ORDER of its query.
SLIDE_ROWS = ("SELECT s.id, s.started, s.ended, count(f.id), coalesce(sum(f.status = 'ok' AND f.is_all), 0)"
              " FROM slides s LEFT JOIN fields f ON f.slide_id = s.id")


def to_row(result: FieldResult, timings: dict[str, float], image: str | None) -> tuple:
    """The values of :data:`INSERT` for ``result`` with its final timings and image path."""
    return (result.time, result.slide_id, result.source, result.name, result.status, result.label,
            int(bool(result.all)), float(result.confidence), json.dumps(result.scores), result.reason,
            json.dumps(result.quality.to_dict()), json.dumps(timings), result.model_sha256,
            result.distance, result.p_all, image, result.bundle)


def from_row(r: tuple) -> FieldResult:
    """A result from a row of ``SELECT {COLUMNS}``."""
    (id_, t, slide_id, source, name, status, label, is_all, confidence, scores, reason, quality, timings,
     sha, distance, p_all, image, bundle) = r
    return FieldResult(time=t, status=status, label=label, all=bool(is_all), confidence=confidence,
                       scores=json.loads(scores), reason=reason, quality=Quality.from_dict(json.loads(quality)),
                       timings=json.loads(timings), model_sha256=sha, bundle=bundle, source=source, name=name,
                       slide_id=slide_id, distance=distance, p_all=p_all, image=image, id=id_)
