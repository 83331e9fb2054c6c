"""The CSV export of results: one line per field, oldest first, safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from device.store.records import FieldResult

#: What a result recorded before results named their bundle shows for it.
UNKNOWN_BUNDLE = "unknown"
TIMING_STAGES = ("capture", "quality", "preprocess", "invoke", "head", "store")


def iso(t: float) -> str:
    """Epoch seconds as UTC ISO 8601 with milliseconds and a ``Z`` (the CSV's and the page's time format)."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def header(classes: tuple[str, ...]) -> list[str]:
    return ["id", "time", "slide_id", "source", "name", "status", "label", "all", "confidence", "reason",
            *[f"p_{c}" for c in classes], "distance", "p_all", "sharpness", "brightness", "clipped",
            "stained", "texture", "unstained_texture", *[f"{k}_ms" for k in TIMING_STAGES], "model_sha256", "bundle",
            "image"]


def cells(r: FieldResult, classes: tuple[str, ...]) -> list[Any]:
    q, t = r.quality, r.timings
    return [r.id, iso(r.time), r.slide_id or "", r.source, r.name, r.status, r.label or "",
            int(r.all), f"{r.confidence:.4f}", r.reason,
            *[f"{r.scores.get(c, 0.0):.4f}" for c in classes],
            "" if r.distance is None else f"{r.distance:.3f}",
            "" if r.p_all is None else f"{r.p_all:.4f}", f"{q.sharpness:.2f}",
            f"{q.brightness:.2f}", f"{q.clipped:.4f}", f"{q.stained:.4f}", f"{q.texture:.2f}",
            f"{q.unstained_texture:.2f}",
            *[f"{t[k]:.2f}" if k in t else "" for k in TIMING_STAGES],
            r.model_sha256, r.bundle or UNKNOWN_BUNDLE, r.image or ""]


def csv_lines(results: Iterable[FieldResult], classes: tuple[str, ...] = ()) -> Iterator[str]:
    """``results`` as CSV text lines, header first, for streaming exports.

    Text cells that a spreadsheet would run as a formula are prefixed with ``'``.
    """
    yield csv_line(header(classes))
    for r in results:
        yield csv_line(cells(r, classes))


def csv_line(row: list[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([safe_cell(c) for c in row])
    return buf.getvalue()


def safe_cell(c: Any) -> Any:
    if isinstance(c, str) and c[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + c
    return c
