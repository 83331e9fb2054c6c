"""Request parameters, checked before they reach the store: ids, paging, times and result filters. A bad one is a
400 (or 404 for an id in the path) whose message says what is allowed."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import PurePath

from flask import abort, request

from device.status import STATUSES
from device.store import ResultStore
from device.store.records import FieldResult, Filters, SlideRow
from device.web.context import bad_request

#: Results per page: default and the most one request may ask for.
PAGE_DEFAULT, PAGE_MAX = 50, 500

RESULT_ID = re.compile(r"[0-9]{1,18}")
SLIDE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESULT_PARAMS = frozenset({"since", "until", "slide", "label", "status", "all", "source", "limit", "offset"})
CSV_PARAMS = RESULT_PARAMS - {"limit", "offset"}
PAGING_PARAMS = frozenset({"limit", "offset"})


def result_or_404(store: ResultStore, id_text: str) -> FieldResult:
    if not RESULT_ID.fullmatch(id_text):
        abort(404, description=f"no result with id '{id_text[:40]}'; result ids are whole numbers")
    r = store.get(int(id_text))
    if r is None:
        abort(404, description=f"no result with id {id_text}")
    return r


def valid_slide_id(slide_id: str) -> bool:
    return bool(SLIDE_ID.fullmatch(slide_id)) and ".." not in slide_id


def slide_or_404(store: ResultStore, slide_id: str) -> SlideRow:
    if not valid_slide_id(slide_id):
        abort(404, description=f"no slide with id '{slide_id[:40]}'")
    row = store.slide(slide_id)
    if row is None:
        abort(404, description=f"no slide with id {slide_id}")
    return row


def check_known(allowed: frozenset[str]) -> None:
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        bad_request(f"unknown parameter(s) {', '.join(unknown)}; use {', '.join(sorted(allowed))}")


def paging() -> tuple[int, int]:
    """(limit, offset) of a listing."""
    return int_arg("limit", PAGE_DEFAULT, 1, PAGE_MAX), int_arg("offset", 0, 0, 10**9)


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        bad_request(f"{name} must be a whole number from {lo} to {hi} (got '{raw[:40]}')")
    return value


def time_arg(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        t = float(raw)
        if t != t or t in (float("inf"), float("-inf")):
            raise ValueError
        return t
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(raw).timestamp()  # naive = the device's local time
    except (ValueError, OverflowError, OSError):
        bad_request(f"{name} must be epoch seconds or an ISO 8601 time such as 2025-01-31T09:30:00Z "
                    f"(got '{raw[:40]}')")


def filters(allowed: frozenset[str], classes: tuple[str, ...]) -> Filters:
    """The result filters of this request (``allowed``: the parameters the route takes; ``classes``: the labels)."""
    check_known(allowed)
    label = request.args.get("label") or None
    if label is not None and label not in classes:
        bad_request(f"label '{label[:40]}' is not a class of this model; use one of {', '.join(classes)}")
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        bad_request(f"status '{status[:40]}' is not allowed; use one of {', '.join(STATUSES)}")
    slide = request.args.get("slide") or None
    if slide is not None and not valid_slide_id(slide):
        bad_request(f"slide '{slide[:40]}' is not a slide id (letters, digits, '-', '_', '.')")
    all_raw = request.args.get("all")
    all_ = None
    if all_raw not in (None, ""):
        if all_raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            bad_request(f"all must be true or false (got '{all_raw[:40]}')")
        all_ = all_raw.lower() in ("1", "true", "yes")
    source = request.args.get("source") or None
    if source is not None and not re.fullmatch(r"[a-z0-9]{1,20}", source):
        bad_request(f"source '{source[:40]}' is not a source name (camera, replay, files, synthetic, upload)")
    since, until = time_arg("since"), time_arg("until")
    if since is not None and until is not None and until < since:
        bad_request("until is before since")
    return Filters(since=since, until=until, slide_id=slide, label=label, status=status, all=all_, source=source)


def safe_name(raw: str | None) -> str:
    """A display name for an upload: base name only, printable, short."""
    name = PurePath((raw or "").replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable())[:120].strip()
    return name or "upload"
