"""Waitress in a daemon thread: the production server for the status page.

A small, fixed pool of worker threads (niced, so the OS prefers the screening
loop and the TFLite threads when the CPU is short) serves every request; open
connections are capped and the request body is limited, so no amount of page
traffic can take memory or CPU the loop needs. Niceness alone is not enough:
the page and the loop are threads of one Python process and share its
interpreter lock, so every millisecond a request handler runs is a millisecond
the loop may wait. :class:`CpuGovernor` therefore caps the share of time the
request handlers may use when requests pile up (a flood of requests is served
more slowly; the loop's time per field does not change). Flask's debug server
is never used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from waitress import trigger, wasyncore
from waitress.server import create_server
from waitress.task import ThreadedTaskDispatcher

from device.errors import ConfigError
from device.priority import HELPER_NICE, lower_this_thread

log = logging.getLogger(__name__)

#: Niceness added to the request threads (Linux threads are scheduled separately).
WORKER_NICE = HELPER_NICE
#: Share of the time the request handlers may use, on average, once their burst allowance is spent.
CPU_SHARE = 0.03
#: CPU seconds of request handling allowed at once before the share applies (a page polling its status
#: uses a few ms a second and never waits).
CPU_BURST_S = 0.05
#: waitress's own work per request (accept, parse, write) that the handler's CPU clock does not see.
REQUEST_OVERHEAD_S = 0.0005
#: The cap applies while more requests than this wait for a worker: a flood (a script, a stuck client, many
#: tabs), not a browser loading the page (at most ~6 requests at a time) or a few pages polling.
FLOOD_QUEUE = 8
#: Debt is forgotten beyond this (CPU seconds), so a long export cannot hold later floods back for minutes.
MAX_DEBT_S = 1.0


class CpuGovernor:
    """A token bucket of interpreter time for the request handlers.

    It refills at ``share`` seconds per second up to ``burst_s``; every request
    pays for the CPU time its handler used. While requests pile up (``pending()``,
    the requests waiting for a worker, is at least ``flood``; always when
    ``pending`` is None) a request waits, in its worker thread and holding
    nothing, until the bucket is out of debt, so a flood is served at ``share``
    of the time. Streaming bodies (event stream, CSV export) are paid for only
    up to the start of the stream: they are bounded by stream slots and user
    action, not by request count.
    """

    def __init__(self, share: float = CPU_SHARE, burst_s: float = CPU_BURST_S, *,
                 overhead_s: float = REQUEST_OVERHEAD_S, stop: threading.Event | None = None,
                 pending: Callable[[], int] | None = None, flood: int = FLOOD_QUEUE,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share, self.burst_s, self.overhead_s = float(share), float(burst_s), float(overhead_s)
        self.stop = stop or threading.Event()
        self.pending, self.flood = pending, int(flood)
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens = self.burst_s
        self._t = clock()
        self.requests = 0
        self.waited_s = 0.0

    def _refill(self) -> float:
        now = self.clock()
        self._tokens = min(self.burst_s, self._tokens + (now - self._t) * self.share)
        self._t = now
        return self._tokens

    def flooded(self) -> bool:
        if self.pending is None:
            return True
        try:
            return self.pending() >= self.flood
        except Exception:  # a server internal changed: govern rather than not
            return True

    def wait(self) -> float:
        """Block while the bucket is in debt during a flood (or until stopped); returns the seconds waited."""
        waited = 0.0
        while self.flooded():
            with self._lock:
                tokens = self._refill()
            if tokens >= 0 or self.stop.is_set():
                break
            delay = min(1.0, -tokens / self.share)
            t0 = self.clock()
            if self.stop.wait(delay):
                break
            waited += self.clock() - t0
        with self._lock:
            self.requests += 1
            self.waited_s += waited
        return waited

    def charge(self, cpu_s: float) -> None:
        with self._lock:
            self._refill()
            self._tokens = max(-MAX_DEBT_S, self._tokens - max(0.0, cpu_s) - self.overhead_s)

    def wrap(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        """``app`` (a WSGI callable) with every call waited for and paid for."""

        def governed(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
            self.wait()
            t0 = time.thread_time()
            try:
                return app(environ, start_response)
            finally:
                self.charge(time.thread_time() - t0)

        return governed


class _NiceDispatcher(ThreadedTaskDispatcher):
    """Waitress's worker pool, with each worker at a lower CPU priority than the loop."""

    def handler_thread(self, thread_no):  # noqa: D401 - waitress's name
        lower_this_thread(WORKER_NICE)
        return super().handler_thread(thread_no)


class WebServer:
    """A running waitress server; :meth:`close` stops it (idempotent)."""

    def __init__(self, app, host: str, port: int, *, threads: int, connection_limit: int,
                 max_request_body_size: int, stop_event: threading.Event, governor: CpuGovernor | None = None):
        self._map: dict = {}
        self._stop_event = stop_event
        self.governor = governor
        if governor is not None:
            app = governor.wrap(app)
        dispatcher = _NiceDispatcher()
        dispatcher.set_thread_count(threads)
        if governor is not None and governor.pending is None:
            governor.pending = lambda: len(dispatcher.queue)  # requests accepted, waiting for a worker
        try:
            self._server = create_server(
                app, map=self._map, _dispatcher=dispatcher, host=host, port=port, threads=threads,
                connection_limit=connection_limit, backlog=128, channel_timeout=30, cleanup_interval=10,
                max_request_body_size=max_request_body_size, max_request_header_size=64 * 1024,
                ident="LeukoScreen", clear_untrusted_proxy_headers=True, asyncore_use_poll=True,
                expose_tracebacks=False, log_untrusted_proxy_headers=False)
        except OSError as exc:
            dispatcher.shutdown(timeout=1)
            raise ConfigError(f"[web] cannot listen on {host}:{port} ({exc.strerror or exc}); another program "
                              "uses the port or the address is not on this machine: stop it or change [web] "
                              "host/port") from exc
        listen = getattr(self._server, "effective_listen", None)
        if listen:
            self.host, self.port = str(listen[0][0]), int(listen[0][1])
        else:
            self.host, self.port = str(self._server.effective_host), int(self._server.effective_port)
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="web-server", daemon=True)
        self._thread.start()
        log.info("status page on %s", self.url)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def _run(self) -> None:
        lower_this_thread(WORKER_NICE)  # the accept/read/write loop is the page's too: below the model, its cores
        try:
            self._server.run()
        except Exception:  # the page must never take the appliance down
            log.exception("web server stopped")

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, end event streams, let running requests finish (up to ``timeout``), close sockets."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop_event.set()
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout)
        if self._thread.is_alive():
            done = threading.Event()

            def _close_all() -> None:  # runs in the server's own loop thread
                wasyncore.close_all(self._map)
                done.set()

            trig = next((d for d in list(self._map.values()) if isinstance(d, trigger.trigger)), None)
            try:
                if trig is None:
                    raise OSError("no trigger")
                trig.pull_trigger(_close_all)
            except OSError:
                _close_all()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("web server thread did not stop within %.1f s", timeout)
        else:
            wasyncore.close_all(self._map)
        log.info("status page stopped")

    def __enter__(self) -> WebServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
