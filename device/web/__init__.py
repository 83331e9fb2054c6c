"""The local status page and JSON API: the Flask app factory, and waitress serving it.

What the technician and the clinic see: the live field and its verdict, the
slide's tally, recent results, device health, slide reports and CSV exports.
Request threads only read the store and call the service's thread-safe
methods (:class:`~device.web.protocol.ServiceAPI`, all the page uses of it);
they never touch the camera or the loop's state directly.

The parts: routes by concern (:mod:`~device.web.live`: the page, status and
events; :mod:`~device.web.records`: results, slides, report, CSV;
:mod:`~device.web.control`: the token-guarded commands),
:mod:`~device.web.presenters` (what is shown, made from results, slides and
the status), :mod:`~device.web.params` (request parameters),
:mod:`~device.web.security` and :mod:`~device.web.server` (waitress).

Safety, by design rather than by deployment: the server binds 127.0.0.1 unless
the config opens it, every POST needs the device token, uploads are size-limited
and decoded by :func:`device.preprocess.load_image` (bombs, truncated or
renamed files are refused with a reason), ids are validated before they reach
the store, every response carries strict security headers, and requests whose
Host header is not this device are refused (DNS rebinding).
"""

from __future__ import annotations

import logging
import threading

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from device.errors import StoreError
from device.web import control, live, records
from device.web.context import EXTENSION, PageState, error_response
from device.web.protocol import ServiceAPI
from device.web.security import SECURITY_HEADERS, host_allowed
from device.web.server import CpuGovernor, WebServer

log = logging.getLogger(__name__)

#: Largest in-memory (non-file) form field, and Werkzeug's multipart parse buffer; > its 64 KiB read size.
FORM_MEMORY_BYTES = 256 << 10
#: Request threads; event streams may hold at most half of them.
DEFAULT_THREADS = 4


def create_app(service: ServiceAPI, *, max_upload_bytes: int | None = None, stream_slots: int | None = None,
               allowed_hosts: tuple[str, ...] = ()) -> Flask:
    """The Flask app serving ``service``.

    ``max_upload_bytes``: largest accepted request body (default ``[web] max_upload_mb`` of the service's
    config). ``stream_slots``: how many live event streams may be open at once (each holds a request thread;
    more clients poll instead). ``allowed_hosts``: extra Host names the page may be reached by, added to
    ``[web] allowed_hosts`` (IP addresses, localhost and this machine's name, plain or ``.local``, always are).
    """
    web = service.config.web
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.config.update(
        MAX_CONTENT_LENGTH=int(max_upload_bytes or web.max_upload_mb << 20),
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
    extra_hosts = frozenset(h.lower() for h in (*allowed_hosts, *web.allowed_hosts))
    slots = max(1, stream_slots if stream_slots is not None else DEFAULT_THREADS // 2)
    app.extensions[EXTENSION] = PageState(service, streams=threading.BoundedSemaphore(slots))
    for bp in (live.bp, records.bp, control.bp):
        app.register_blueprint(bp)

    @app.before_request
    def _check_host() -> Response | None:
        if not host_allowed(request.host, extra_hosts):
            return error_response(400, f"Host '{request.host[:80]}' is not this device; open the page by its IP "
                                  "address, localhost, or the device's name")
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        if request.path.startswith("/api/") and "Cache-Control" not in resp.headers:
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        headers: dict[str, str] = {}
        if exc.code == 413:
            msg = (f"request body is larger than the {app.config['MAX_CONTENT_LENGTH'] >> 20} MiB limit "
                   "([web] max_upload_mb); resize or re-compress the image")
        else:
            msg = exc.description or exc.name
        if exc.code == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="LeukoScreen"'
        allow = getattr(exc, "valid_methods", None)  # MethodNotAllowed's
        if exc.code == 405 and allow:
            headers["Allow"] = ", ".join(allow)
        return error_response(exc.code or 500, msg, headers=headers)

    @app.errorhandler(StoreError)
    def _store_error(exc: StoreError) -> Response:
        log.error("store error while serving %s: %s", request.path, exc)
        return error_response(503, f"the result store is unavailable: {exc}")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "internal error; the screening loop is unaffected, see the device log "
                              "(journalctl -u leukoscreen)")

    return app


def serve(service: ServiceAPI, host: str = "127.0.0.1", port: int = 8080, *, threads: int = DEFAULT_THREADS,
          max_upload_bytes: int | None = None, allowed_hosts: tuple[str, ...] = ()) -> WebServer:
    """Serve the page with waitress in a daemon thread; returns the server (``.close()``, ``.port``, ``.url``).

    ``port=0`` picks a free port (tests). Raises :class:`device.errors.ConfigError` when the address
    cannot be bound.
    """
    threads = max(2, int(threads))
    app = create_app(service, max_upload_bytes=max_upload_bytes, stream_slots=max(1, threads // 2),
                     allowed_hosts=allowed_hosts)
    stop = app.extensions[EXTENSION].stop
    # Waitress buffers bodies up to this (spilling to a temp file) and refuses bigger ones itself; Flask
    # answers the ones between MAX_CONTENT_LENGTH and this with its JSON 413.
    body_limit = 2 * app.config["MAX_CONTENT_LENGTH"] + (64 << 10)
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("status page open to the network on %s:%s; POST endpoints still need the token", host, port)
    return WebServer(app, host, port, threads=threads, connection_limit=100, max_request_body_size=body_limit,
                     stop_event=stop, governor=CpuGovernor(stop=stop))
