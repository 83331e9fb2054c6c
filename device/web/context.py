"""What every route shares: the app's state (the service and the limits on request threads) and the one way an
error is answered."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn

from flask import Response, abort, current_app, jsonify, request
from werkzeug.http import HTTP_STATUS_CODES

from device.web.presenters import RecentCache, ThumbCache
from device.web.protocol import ServiceAPI

#: Where an app keeps its :class:`PageState` (``app.extensions``).
EXTENSION = "leukoscreen"


@dataclass(frozen=True)
class PageState:
    """One app's shared state. Request threads only read the service's store and call its thread-safe methods."""

    service: ServiceAPI
    streams: threading.BoundedSemaphore  # live event streams open at once (each holds a request thread)
    stop: threading.Event = field(default_factory=threading.Event)  # set when the server closes: streams end
    uploads: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))
    thumbs: ThumbCache = field(default_factory=ThumbCache)
    recent: RecentCache = field(default_factory=RecentCache)  # the live snapshot's newest results, per seq


def page_state() -> PageState:
    return current_app.extensions[EXTENSION]


def service() -> ServiceAPI:
    return page_state().service


def error_response(code: int, message: str, *, headers: Mapping[str, str] | None = None) -> Response:
    """The one error answer: JSON ``{error, status, message}`` under /api (and for clients asking for JSON),
    plain text for the page's own URLs."""
    name = HTTP_STATUS_CODES.get(code, "Unknown Error")
    if request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json":
        resp = jsonify(error=name, status=code, message=message)
    else:
        resp = Response(f"{code} {name}: {message}\n", mimetype="text/plain")
    resp.status_code = code
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def bad_request(message: str) -> NoReturn:
    abort(400, description=message)
