"""What the page shows, made from what the store and the loop hold: results, slides and the status as JSON,
the live snapshot, result thumbnails and the slide report's view. No request handling here."""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from device.bundle import Bundle, Thresholds
from device.errors import StoreError
from device.preprocess import prepare
from device.slides import SlideVerdict
from device.store.export import UNKNOWN_BUNDLE, iso
from device.store.records import FieldResult, SlideRow
from device.web.protocol import ServiceAPI

log = logging.getLogger(__name__)

#: Recent results sent with each live snapshot.
RECENT = 12
THUMB_SIZE = 192
THUMB_CACHE = 256
VERDICT_TEXT = {"ALL": "ALL detected", "benign": "No ALL seen (benign)", "refer": "Refer to a haematologist",
                "pending": "Incomplete: more fields needed"}


def report_url(slide_id: str) -> str:
    return f"/api/slides/{slide_id}/report"


def result_json(r: FieldResult | None) -> dict[str, Any] | None:
    """A result as the API shows it: its time in ISO, and its image path (inside the state dir) as URLs."""
    if r is None:
        return None
    d = r.to_dict()
    d["time_iso"] = iso(d["time"])
    rel = d.pop("image", None)
    rid = d.get("id")
    has_image = bool(rel) and rid is not None
    d["has_image"] = has_image
    d["url"] = f"/api/results/{rid}" if rid is not None else None
    d["image_url"] = f"/api/results/{rid}/image" if has_image else None
    d["thumb_url"] = f"/api/results/{rid}/thumb" if has_image else None
    return d


def slide_json(row: SlideRow) -> dict[str, Any]:
    d = dataclasses.asdict(row)
    d["started_iso"] = iso(row.started)
    d["ended_iso"] = iso(row.ended) if row.ended is not None else None
    return d


def verdict_json(v: SlideVerdict | None) -> dict[str, Any] | None:
    return v.to_dict() if v is not None else None


def status_json(service: ServiceAPI) -> dict[str, Any]:
    """The service's status as the page's JSON. The one reader of ``service.status()``: every route that needs
    a figure of it (health, the open slide, the alarm) takes it from here."""
    status = service.status()
    st = status.to_json()
    st["last"] = result_json(status.last)
    slide = st.get("slide")
    if slide and slide.get("id"):
        slide = dict(slide)
        slide["report_url"] = report_url(slide["id"])
        slide["started_iso"] = iso(slide["started"]) if slide.get("started") else None
        st["slide"] = slide
    return st


class RecentCache:
    """The newest results as the page shows them, kept for one ``seq`` of the status.

    The loop bumps ``seq`` after every result it records or fails to record (and the store's rows change in no
    other way while it runs), so the polls between two fields share one query. The list was read after its
    ``seq``, so it is never older than that status; a failed read is not kept.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq: int | None = None
        self._recent: list[dict[str, Any] | None] = []

    def get(self, seq: int | None, read: Callable[[], list[dict[str, Any] | None]]) -> list[dict[str, Any] | None]:
        with self._lock:
            if seq is not None and seq == self._seq:
                return self._recent
        recent = read()
        with self._lock:
            self._seq, self._recent = seq, recent
        return recent


def snapshot(service: ServiceAPI, cache: RecentCache | None = None) -> dict[str, Any]:
    """What the page shows: status plus the newest results (shared between polls of one ``seq`` via ``cache``)."""
    st = status_json(service)

    def read() -> list[dict[str, Any] | None]:
        return [result_json(r) for r in service.store.query(limit=RECENT)]

    try:
        recent = cache.get(st.get("seq"), read) if cache is not None else read()
    except StoreError as exc:
        log.warning("recent results unavailable: %s", exc)
        recent = []
    return {"status": st, "recent": recent}


# -- thumbnails ------------------------------------------------------------------------------------------------


def thumbnail(path: Path, size: int = THUMB_SIZE) -> bytes:
    """A stored frame as the model's square: :func:`device.preprocess.prepare`'s crop around the lit field (its
    ``raw``: the frame's own colours), small. JPEG draft mode keeps decoding cheap on a Pi."""
    with Image.open(path) as img:
        img.draft("RGB", (size * 2, size * 2))
        frame = np.asarray(img.convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(prepare(frame, size).raw, "RGB").save(buf, "JPEG", quality=80)
    return buf.getvalue()


class ThumbCache:
    """The most recently shown thumbnails (a results page asks for the same ones every few seconds)."""

    def __init__(self, capacity: int = THUMB_CACHE):
        self.capacity = capacity
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int, make: Callable[[], bytes]) -> bytes:
        """The cached thumbnail for ``key``, else ``make()`` (outside the lock), kept."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data
        data = make()
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return data


# -- the slide report --------------------------------------------------------------------------------------------


def local_time(t: float | None) -> str:
    if t is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


@dataclass(frozen=True)
class SlideReport:
    """What ``report.html`` shows of one slide: its fields and verdict, and the model(s) that judged them."""

    slide: SlideRow
    fields: list[FieldResult]
    verdict: SlideVerdict | None
    verdict_text: str
    classes: tuple[str, ...]
    benign: str
    model_name: str
    model_sha256: str
    other_models: list[str]  # models other than the installed one that judged some of the fields
    bundle_id: str
    field_bundles: list[tuple[str, int]]  # (bundle id, fields) of the fields
    thresholds: Thresholds
    generated: float
    hostname: str
    is_open: bool

    @classmethod
    def build(cls, row: SlideRow, fields: list[FieldResult], verdict: SlideVerdict | None, bundle: Bundle, *,
              generated: float, hostname: str) -> SlideReport:
        models = sorted({f.model_sha256 for f in fields})
        per_bundle: dict[str, int] = {}
        for f in fields:
            per_bundle[f.bundle or UNKNOWN_BUNDLE] = per_bundle.get(f.bundle or UNKNOWN_BUNDLE, 0) + 1
        return cls(slide=row, fields=fields, verdict=verdict,
                   verdict_text=VERDICT_TEXT.get(verdict.verdict, verdict.verdict) if verdict else "—",
                   classes=bundle.classes, benign=bundle.benign, model_name=bundle.name,
                   model_sha256=bundle.model_sha256, other_models=[m for m in models if m != bundle.model_sha256],
                   bundle_id=bundle.id, field_bundles=sorted(per_bundle.items()), thresholds=bundle.thresholds,
                   generated=generated, hostname=hostname, is_open=row.ended is None)

    def context(self) -> dict[str, Any]:
        """The template's variables: these fields (as they are, not copied into dicts) and the time formatter."""
        return {**vars(self), "local": local_time}
