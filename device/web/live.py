"""Routes of the live page: the page itself, the status, a liveness figure for monitors, and the live snapshot
(polled, or pushed as server-sent events)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, jsonify, render_template

from device.errors import ScreenError
from device.web.context import error_response, page_state, service
from device.web.presenters import RecentCache, snapshot, status_json
from device.web.protocol import ServiceAPI

log = logging.getLogger(__name__)

bp = Blueprint("live", __name__)

#: A live event stream ends after this long (the browser reconnects), so a forgotten tab cannot hold
#: a request thread for ever; a snapshot is pushed at least this often even when nothing changed.
STREAM_MAX_S = 300.0
STREAM_REFRESH_S = 5.0
STREAM_WAIT_S = 1.0


@bp.get("/")
def index():
    b = service().bundle
    return render_template("index.html", model_name=b.name, model_sha256=b.model_sha256, classes=b.classes,
                           benign=b.benign)


@bp.get("/favicon.ico")
def favicon():
    return current_app.send_static_file("favicon.svg")


@bp.get("/api/status")
def status():
    return jsonify(status_json(service()))


@bp.get("/api/health")
def health():
    """Tiny liveness figure for monitors: 200 when ready with no faults, else 503."""
    st = status_json(service())
    ok = bool(st.get("ready")) and not st.get("faults")
    resp = jsonify(ready=bool(st.get("ready")), faults=[f.get("kind") for f in st.get("faults") or []],
                   seq=st.get("seq"))
    resp.status_code = 200 if ok else 503
    return resp


@bp.get("/api/live")
def live():
    st = page_state()
    return jsonify(snapshot(st.service, st.recent))


class EventStream:
    """A server-sent-event body holding one stream slot, released however the response ends."""

    def __init__(self, service: ServiceAPI, slots: threading.BoundedSemaphore, stop: threading.Event,
                 recent: RecentCache | None = None):
        self.service, self.slots, self.stop, self.recent = service, slots, stop, recent
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
                snap = snapshot(self.service, self.recent)
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
    st = page_state()
    if not st.streams.acquire(blocking=False):
        return error_response(503, "too many live pages open; this one polls /api/live instead",
                              headers={"Retry-After": "30"})
    resp = Response(EventStream(st.service, st.streams, st.stop, st.recent), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp
