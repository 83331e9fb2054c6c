"""Routes: the page, the JSON API, the live event stream, the slide report and the CSV export.

Request threads read the store and call the service's thread-safe methods;
nothing here touches the camera or the classifier (uploads are queued to the
loop's own thread by ``Service.classify_upload``).
"""

from __future__ import annotations

import functools
import hmac
import io
import json
import logging
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime
from pathlib import PurePath
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, render_template, request, send_file
from PIL import Image

from device.errors import ImageError, ScreenError, StoreError
from device.store import STATUSES, UNKNOWN_BUNDLE, FieldResult, Filters, iso

log = logging.getLogger(__name__)

bp = Blueprint("web", __name__)

#: Results per page: default and the most one request may ask for.
PAGE_DEFAULT, PAGE_MAX = 50, 500
#: Recent results sent with each live snapshot.
RECENT = 12
THUMB_SIZE = 192
THUMB_CACHE = 256
#: A live event stream ends after this long (the browser reconnects), so a forgotten tab cannot hold
#: a request thread for ever; a snapshot is pushed at least this often even when nothing changed.
STREAM_MAX_S = 300.0
STREAM_REFRESH_S = 5.0
STREAM_WAIT_S = 1.0

RESULT_ID = re.compile(r"[0-9]{1,18}")
SLIDE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESULT_PARAMS = frozenset({"since", "until", "slide", "label", "status", "all", "source", "limit", "offset"})
CSV_PARAMS = RESULT_PARAMS - {"limit", "offset"}


# -- helpers ---------------------------------------------------------------------------------------------------


def _state() -> dict[str, Any]:
    return current_app.extensions["leukoscreen"]


def _service() -> Any:
    return _state()["service"]


def bad_request(message: str) -> None:
    abort(400, description=message)


def public_result(r: FieldResult | dict | None) -> dict | None:
    """A result as the API shows it: image paths inside the state dir become URLs."""
    if r is None:
        return None
    d = r.to_dict() if isinstance(r, FieldResult) else dict(r)
    rel = d.pop("image", None)
    rid = d.get("id")
    has_image = bool(rel) and rid is not None
    d["has_image"] = has_image
    d["url"] = f"/api/results/{rid}" if rid is not None else None
    d["image_url"] = f"/api/results/{rid}/image" if has_image else None
    d["thumb_url"] = f"/api/results/{rid}/thumb" if has_image else None
    return d


def public_status(service: Any) -> dict:
    st = service.status().to_json()
    st["last"] = public_result(st.get("last"))
    slide = st.get("slide")
    if slide and slide.get("id"):
        slide = dict(slide)
        slide["report_url"] = f"/api/slides/{slide['id']}/report"
        slide["started_iso"] = iso(slide["started"]) if slide.get("started") else None
        st["slide"] = slide
    return st


def snapshot(service: Any) -> dict:
    """What the page shows: status plus the newest results."""
    st = public_status(service)
    try:
        recent = [public_result(r) for r in service.store.query(limit=RECENT)]
    except StoreError as exc:
        log.warning("recent results unavailable: %s", exc)
        recent = []
    return {"status": st, "recent": recent}


def _result_or_404(id_text: str) -> FieldResult:
    if not RESULT_ID.fullmatch(id_text):
        abort(404, description=f"no result with id '{id_text[:40]}'; result ids are whole numbers")
    r = _service().store.get(int(id_text))
    if r is None:
        abort(404, description=f"no result with id {id_text}")
    return r


def _slide_or_404(slide_id: str):
    if not SLIDE_ID.fullmatch(slide_id) or ".." in slide_id:
        abort(404, description=f"no slide with id '{slide_id[:40]}'")
    row = _service().store.slide(slide_id)
    if row is None:
        abort(404, description=f"no slide with id {slide_id}")
    return row


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
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


def _time_arg(name: str) -> float | None:
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
    return None  # unreachable


def _filters(allowed: frozenset[str]) -> Filters:
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        bad_request(f"unknown parameter(s) {', '.join(unknown)}; use {', '.join(sorted(allowed))}")
    service = _service()
    label = request.args.get("label") or None
    if label is not None and label not in service.bundle.classes:
        bad_request(f"label '{label[:40]}' is not a class of this model; use one of "
                    f"{', '.join(service.bundle.classes)}")
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        bad_request(f"status '{status[:40]}' is not allowed; use one of {', '.join(STATUSES)}")
    slide = request.args.get("slide") or None
    if slide is not None and (not SLIDE_ID.fullmatch(slide) or ".." in slide):
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
    since, until = _time_arg("since"), _time_arg("until")
    if since is not None and until is not None and until < since:
        bad_request("until is before since")
    return Filters(since=since, until=until, slide_id=slide, label=label, status=status, all=all_, source=source)


def require_token(view):
    """POST endpoints: ``Authorization: Bearer <token>`` or ``X-Token``; missing 401, wrong 403."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        given = request.headers.get("X-Token")
        auth = request.headers.get("Authorization", "")
        if given is None and auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip()
        if not given:
            abort(401, description="this action needs the device token: send 'Authorization: Bearer <token>' "
                  "or 'X-Token: <token>' (the token is in the config or the state folder's 'token' file)")
        expected = str(getattr(_service(), "token", "") or "")
        if not expected or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
            log.warning("refused %s %s from %s: wrong token", request.method, request.path, request.remote_addr)
            abort(403, description="wrong device token")
        return view(*args, **kwargs)

    return wrapper


def _safe_name(raw: str | None) -> str:
    """A display name for an upload: base name only, printable, short."""
    name = PurePath((raw or "").replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable())[:120].strip()
    return name or "upload"


# -- page ----------------------------------------------------------------------------------------------------


@bp.get("/")
def index():
    b = _service().bundle
    return render_template("index.html", model_name=b.name, model_sha256=b.model_sha256, classes=b.classes,
                           benign=b.benign)


@bp.get("/favicon.ico")
def favicon():
    return current_app.send_static_file("favicon.svg")


# -- read API ----------------------------------------------------------------------------------------------------


@bp.get("/api/status")
def status():
    return jsonify(public_status(_service()))


@bp.get("/api/health")
def health():
    """Tiny liveness figure for monitors: 200 when ready with no faults, else 503."""
    st = _service().status().to_json()
    ok = bool(st.get("ready")) and not st.get("faults")
    resp = jsonify(ready=bool(st.get("ready")), faults=[f.get("kind") for f in st.get("faults") or []],
                   seq=st.get("seq"))
    resp.status_code = 200 if ok else 503
    return resp


@bp.get("/api/live")
def live():
    return jsonify(snapshot(_service()))


@bp.get("/api/results")
def results():
    filters = _filters(RESULT_PARAMS)
    limit = _int_arg("limit", PAGE_DEFAULT, 1, PAGE_MAX)
    offset = _int_arg("offset", 0, 0, 10**9)
    store = _service().store
    rows = store.query(filters, limit=limit, offset=offset)
    total = store.count(filters)
    nxt = offset + len(rows) if offset + len(rows) < total else None
    return jsonify(results=[public_result(r) for r in rows], total=total, limit=limit, offset=offset,
                   next_offset=nxt)


@bp.get("/api/results/<id_text>")
def result(id_text: str):
    return jsonify(public_result(_result_or_404(id_text)))


@bp.get("/api/results/<id_text>/image")
def result_image(id_text: str):
    r = _result_or_404(id_text)
    path = _service().store.image_file(r)
    if path is None:
        abort(404, description=f"result {r.id} has no stored image (not kept, or pruned to save space)")
    resp = send_file(path, mimetype="image/jpeg", max_age=3600, conditional=True,
                     download_name=f"field-{r.id}.jpg")
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp


@bp.get("/api/results/<id_text>/thumb")
def result_thumb(id_text: str):
    r = _result_or_404(id_text)
    st = _state()
    cache: OrderedDict[int, bytes] = st["thumbs"]
    with st["thumbs_lock"]:
        data = cache.get(r.id)
        if data is not None:
            cache.move_to_end(r.id)
    if data is None:
        path = _service().store.image_file(r)
        if path is None:
            abort(404, description=f"result {r.id} has no stored image (not kept, or pruned to save space)")
        data = _make_thumb(path)
        with st["thumbs_lock"]:
            cache[r.id] = data
            while len(cache) > THUMB_CACHE:
                cache.popitem(last=False)
    resp = Response(data, mimetype="image/jpeg")
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp


def _make_thumb(path) -> bytes:
    """Centre square (what the model sees), small JPEG; JPEG draft mode keeps decoding cheap on a Pi."""
    with Image.open(path) as img:
        img.draft("RGB", (THUMB_SIZE * 2, THUMB_SIZE * 2))
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        img = img.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return buf.getvalue()


@bp.get("/api/results.csv")
def results_csv():
    filters = _filters(CSV_PARAMS)
    service = _service()
    rows = service.store.csv_rows(filters, tuple(service.bundle.classes))

    def body() -> Iterator[str]:
        try:
            yield from rows
        except StoreError as exc:  # headers are gone: say so in the file rather than truncate silently
            log.error("CSV export interrupted: %s", exc)
            yield f"# EXPORT INCOMPLETE: {exc}\n"

    stamp = time.strftime("%Y%m%d-%H%M%S")
    resp = Response(body(), mimetype="text/csv")
    resp.headers["Content-Disposition"] = f'attachment; filename="leukoscreen-results-{stamp}.csv"'
    return resp


@bp.get("/api/slides")
def slides():
    unknown = sorted(set(request.args) - {"limit", "offset"})
    if unknown:
        bad_request(f"unknown parameter(s) {', '.join(unknown)}; use limit, offset")
    limit = _int_arg("limit", PAGE_DEFAULT, 1, PAGE_MAX)
    offset = _int_arg("offset", 0, 0, 10**9)
    service = _service()
    rows = service.store.slides(limit=limit, offset=offset)
    current = (service.status().to_json().get("slide") or {}).get("id")
    out = []
    for row in rows:
        d = row.to_dict()
        d["open"] = row.id == current
        d["report_url"] = f"/api/slides/{row.id}/report"
        out.append(d)
    return jsonify(slides=out, current=current, limit=limit, offset=offset)


@bp.get("/api/slides/<slide_id>")
def slide(slide_id: str):
    row = _slide_or_404(slide_id)
    service = _service()
    v = service.slide_verdict(row.id)
    d = row.to_dict()
    d["verdict"] = v.to_dict() if v is not None else None
    d["report_url"] = f"/api/slides/{row.id}/report"
    d["results_url"] = f"/api/results?slide={row.id}"
    return jsonify(d)


VERDICT_TEXT = {"ALL": "ALL detected", "benign": "No ALL seen (benign)", "refer": "Refer to a haematologist",
                "pending": "Incomplete: more fields needed"}


@bp.get("/api/slides/<slide_id>/report")
def slide_report(slide_id: str):
    row = _slide_or_404(slide_id)
    service = _service()
    fields = service.store.slide_fields(row.id)
    v = service.slide_verdict(row.id)
    bundle = service.bundle
    models = sorted({f.model_sha256 for f in fields})
    per_bundle: dict[str, int] = {}
    for f in fields:
        per_bundle[f.bundle or UNKNOWN_BUNDLE] = per_bundle.get(f.bundle or UNKNOWN_BUNDLE, 0) + 1
    html = render_template(
        "report.html", slide=row, fields=fields, verdict=v,
        verdict_text=VERDICT_TEXT.get(v.verdict, v.verdict) if v else "—",
        classes=bundle.classes, benign=bundle.benign, model_name=bundle.name, model_sha256=bundle.model_sha256,
        other_models=[m for m in models if m != bundle.model_sha256], local=_local_time, iso=iso,
        bundle_id=bundle.id, field_bundles=sorted(per_bundle.items()),
        generated=time.time(), hostname=socket.gethostname(), is_open=row.ended is None,
        thresholds=bundle.thresholds)
    resp = Response(html, mimetype="text/html")
    if request.args.get("download"):
        resp.headers["Content-Disposition"] = f'attachment; filename="leukoscreen-slide-{row.id}.html"'
    return resp


def _local_time(t: float | None) -> str:
    if t is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


# -- live events ---------------------------------------------------------------------------------------------------


class _EventStream:
    """A server-sent-event body holding one stream slot, released however the response ends."""

    def __init__(self, service: Any, slots, stop):
        self.service, self.slots, self.stop = service, slots, stop
        self._released = False

    def __iter__(self) -> Iterator[bytes]:
        seq = None
        last_sent = 0.0
        deadline = time.monotonic() + STREAM_MAX_S
        yield b"retry: 3000\n\n"
        while not self.stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            if seq is not None and now - last_sent < STREAM_REFRESH_S:
                new = self.service.wait_for_change(seq, STREAM_WAIT_S)
                if new == seq and time.monotonic() - last_sent < STREAM_REFRESH_S:
                    continue
            try:
                snap = snapshot(self.service)
            except ScreenError as exc:
                log.warning("live snapshot failed: %s", exc)
                yield b": snapshot unavailable\n\n"
                last_sent = time.monotonic()
                continue
            seq = snap["status"].get("seq", 0)
            data = json.dumps(snap, separators=(",", ":"), allow_nan=False, default=str)
            yield f"id: {seq}\nevent: snapshot\ndata: {data}\n\n".encode()
            last_sent = time.monotonic()

    def close(self) -> None:
        if not self._released:
            self._released = True
            self.slots.release()


@bp.get("/api/events")
def events():
    st = _state()
    if not st["streams"].acquire(blocking=False):
        resp = jsonify(error="Service Unavailable", status=503,
                       message="too many live pages open; this one polls /api/live instead")
        resp.status_code = 503
        resp.headers["Retry-After"] = "30"
        return resp
    stream = _EventStream(_service(), st["streams"], st["stop"])
    resp = Response(stream, mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


# -- commands (token) ----------------------------------------------------------------------------------------------


@bp.post("/api/classify")
@require_token
def classify():
    """Classify one uploaded image (multipart field ``file``, or the raw body with ``?name=``)."""
    if request.files:
        f = request.files.get("file") or request.files.get("image") or next(iter(request.files.values()))
        data, name = f.read(), _safe_name(f.filename)
    elif request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        bad_request("no image in the form; send the file in a field named 'file'")
    else:
        data, name = request.get_data(cache=False), _safe_name(request.args.get("name"))
    uploads = _state()["uploads"]
    if not uploads.acquire(blocking=False):
        resp = jsonify(error="Too Many Requests", status=429,
                       message="another upload is being classified; try again in a moment")
        resp.status_code = 429
        resp.headers["Retry-After"] = "1"
        return resp
    try:
        r = _service().classify_upload(data, name)
    except ImageError as exc:
        log.info("upload %s refused: %s", name, exc)
        resp = jsonify(error="Unprocessable Entity", status=422, message=str(exc))
        resp.status_code = 422
        return resp
    except StoreError:
        raise
    except ScreenError as exc:
        resp = jsonify(error="Service Unavailable", status=503, message=str(exc))
        resp.status_code = 503
        return resp
    finally:
        uploads.release()
    body = public_result(r)
    resp = jsonify(body)
    if r.id is not None:
        resp.status_code = 201
        resp.headers["Location"] = body["url"]
    return resp


@bp.post("/api/slides/start")
@require_token
def slide_start():
    sid = _service().start_slide()
    resp = jsonify(slide_id=sid, report_url=f"/api/slides/{sid}/report")
    resp.status_code = 201
    return resp


@bp.post("/api/slides/end")
@require_token
def slide_end():
    service = _service()
    sid = service.end_slide()
    v = service.slide_verdict(sid) if sid else None
    return jsonify(slide_id=sid, verdict=v.to_dict() if v else None,
                   report_url=f"/api/slides/{sid}/report" if sid else None)


@bp.post("/api/alert/acknowledge")
@require_token
def acknowledge():
    service = _service()
    service.acknowledge()
    return jsonify(acknowledged=True, alarm=bool(service.status().to_json().get("alarm")))
