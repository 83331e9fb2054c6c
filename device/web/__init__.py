"""The local status page and JSON API (Flask app factory + waitress).

What the technician and the clinic see: the live field and its verdict, the
slide's tally, recent results, device health, slide reports and CSV exports.
Request threads only read the store and call the service's thread-safe
methods; they never touch the camera or the loop's state directly.

Safety, by design rather than by deployment: the server binds 127.0.0.1 unless
the config opens it, every POST needs the device token, uploads are size-limited
and decoded by :func:`device.preprocess.load_image` (bombs, truncated or
renamed files are refused with a reason), ids are validated before they reach
the store, every response carries strict security headers, and requests whose
Host header is not this device are refused (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections import OrderedDict
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, InternalServerError

from device.errors import StoreError
from device.web.server import CpuGovernor, WebServer

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10 << 20
#: Largest in-memory (non-file) form field, and Werkzeug's multipart parse buffer; > its 64 KiB read size.
FORM_MEMORY_BYTES = 256 << 10
#: Request threads; event streams may hold at most half of them.
DEFAULT_THREADS = 4

CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), usb=(), payment=()",
}


def _service_max_upload(service: Any) -> int | None:
    """``[web] max_upload_mb`` when the service carries its config."""
    cfg = getattr(service, "config", None)
    web = getattr(cfg, "web", None)
    mb = getattr(web, "max_upload_mb", None)
    return int(mb) << 20 if isinstance(mb, int) else None


def _service_allowed_hosts(service: Any) -> tuple[str, ...]:
    """``[web] allowed_hosts`` when the config has that key (extra names the page is reached by)."""
    web = getattr(getattr(service, "config", None), "web", None)
    hosts = getattr(web, "allowed_hosts", ())
    return tuple(str(h) for h in hosts) if isinstance(hosts, list | tuple) else ()


def _host_allowed(host: str, extra: frozenset[str]) -> bool:
    """IP literals, localhost, this machine's name (plain or ``.local``) and configured names."""
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name in extra or name in ("localhost", "localhost.localdomain") or name.endswith(".localhost"):
        return True
    me = socket.gethostname().lower()
    return name in (me, me + ".local", me.split(".")[0], me.split(".")[0] + ".local")


def create_app(service: Any, *, max_upload_bytes: int | None = None, stream_slots: int | None = None,
               allowed_hosts: tuple[str, ...] = ()) -> Flask:
    """The Flask app serving ``service`` (a :class:`device.service.Service` or anything with its API).

    ``max_upload_bytes``: largest accepted request body (default ``[web] max_upload_mb`` of the service's
    config, else 10 MiB). ``stream_slots``: how many live event streams may be open at once (each holds a
    request thread; more clients poll instead). ``allowed_hosts``: extra Host names the page may be reached
    by, added to ``[web] allowed_hosts`` if the config has it (IP addresses, localhost and this machine's
    name, plain or ``.local``, always are).
    """
    from device.web.api import bp  # late: keeps ``import device.web`` light for the CLI

    app = Flask(__name__, static_folder="static", template_folder="templates")
    limit = max_upload_bytes or _service_max_upload(service) or DEFAULT_MAX_UPLOAD_BYTES
    app.config.update(
        MAX_CONTENT_LENGTH=int(limit),
        # Werkzeug also applies this to its parse buffer (one 64 KiB read plus any partial boundary left
        # from the last): at 64 KiB exactly, a file upload over 64 KiB was refused as 413 whenever a CR or
        # LF byte fell near the end of a read, i.e. at random for real camera JPEGs.
        MAX_FORM_MEMORY_SIZE=FORM_MEMORY_BYTES,
        MAX_FORM_PARTS=16,
        JSON_SORT_KEYS=False,
        SEND_FILE_MAX_AGE_DEFAULT=300,
        PROPAGATE_EXCEPTIONS=False,
        TRAP_HTTP_EXCEPTIONS=False,
    )
    app.json.sort_keys = False
    app.json.compact = True
    extra_hosts = frozenset(h.lower() for h in (*allowed_hosts, *_service_allowed_hosts(service)))
    slots = max(1, stream_slots if stream_slots is not None else DEFAULT_THREADS // 2)
    app.extensions["leukoscreen"] = {
        "service": service,
        "stop": threading.Event(),
        "streams": threading.BoundedSemaphore(slots),
        "uploads": threading.BoundedSemaphore(1),
        "thumbs": OrderedDict(),
        "thumbs_lock": threading.Lock(),
    }
    app.register_blueprint(bp)

    @app.before_request
    def _check_host() -> Response | None:
        if not _host_allowed(request.host, extra_hosts):
            return _error(400, "Bad Request", f"Host '{request.host[:80]}' is not this device; open the page by "
                          "its IP address, localhost, or the device's name")
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        if request.path.startswith("/api/") and "Cache-Control" not in resp.headers:
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 413:
            msg = (f"request body is larger than the {app.config['MAX_CONTENT_LENGTH'] >> 20} MiB limit "
                   "([web] max_upload_mb); resize or re-compress the image")
        else:
            msg = exc.description or exc.name
        resp = _error(exc.code or 500, exc.name, msg)
        if exc.code == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="LeukoScreen"'
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp

    @app.errorhandler(StoreError)
    def _store_error(exc: StoreError):
        log.error("store error while serving %s: %s", request.path, exc)
        return _error(503, "Service Unavailable", f"the result store is unavailable: {exc}")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _error(500, InternalServerError.name, "internal error; the screening loop is unaffected, "
                      "see the device log (journalctl -u leukoscreen)")

    return app


def _error(code: int, name: str, message: str) -> Response:
    """JSON under /api (and for API clients), plain text for the page's own URLs."""
    if request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json":
        resp = jsonify(error=name, status=code, message=message)
    else:
        resp = Response(f"{code} {name}: {message}\n", mimetype="text/plain")
    resp.status_code = code
    return resp


def serve(service: Any, host: str = "127.0.0.1", port: int = 8080, *, threads: int = DEFAULT_THREADS,
          max_upload_bytes: int | None = None, allowed_hosts: tuple[str, ...] = ()) -> WebServer:
    """Serve the page with waitress in a daemon thread; returns the server (``.close()``, ``.port``, ``.url``).

    ``port=0`` picks a free port (tests). Raises :class:`device.errors.ConfigError` when the address
    cannot be bound.
    """
    threads = max(2, int(threads))
    app = create_app(service, max_upload_bytes=max_upload_bytes, stream_slots=max(1, threads // 2),
                     allowed_hosts=allowed_hosts)
    state = app.extensions["leukoscreen"]
    # Waitress buffers bodies up to this (spilling to a temp file) and refuses bigger ones itself; Flask
    # answers the ones between MAX_CONTENT_LENGTH and this with its JSON 413.
    body_limit = 2 * app.config["MAX_CONTENT_LENGTH"] + (64 << 10)
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("status page open to the network on %s:%s; POST endpoints still need the token", host, port)
    return WebServer(app, host, port, threads=threads, connection_limit=100, max_request_body_size=body_limit,
                     stop_event=state["stop"], governor=CpuGovernor(stop=state["stop"]))


__all__ = ["create_app", "serve", "WebServer", "CpuGovernor"]
