"""Waitress in a daemon thread: the production server for the status page.

A small, fixed pool of worker threads (niced, so the OS prefers the screening
loop and the TFLite threads when the CPU is short) serves every request; open
connections are capped and the request body is limited, so no amount of page
traffic can take memory or CPU the loop needs. Flask's debug server is never
used.
"""

from __future__ import annotations

import logging
import os
import threading

from waitress import trigger, wasyncore
from waitress.server import create_server
from waitress.task import ThreadedTaskDispatcher

from device.errors import ConfigError

log = logging.getLogger(__name__)

#: Niceness added to the request threads (Linux threads are scheduled separately).
WORKER_NICE = 5


class _NiceDispatcher(ThreadedTaskDispatcher):
    """Waitress's worker pool, with each worker at a lower CPU priority than the loop."""

    def handler_thread(self, thread_no):  # noqa: D401 - waitress's name
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
        except (OSError, AttributeError):  # not Linux, or not permitted: serve anyway
            pass
        return super().handler_thread(thread_no)


class WebServer:
    """A running waitress server; :meth:`close` stops it (idempotent)."""

    def __init__(self, app, host: str, port: int, *, threads: int, connection_limit: int,
                 max_request_body_size: int, stop_event: threading.Event):
        self._map: dict = {}
        self._stop_event = stop_event
        dispatcher = _NiceDispatcher()
        dispatcher.set_thread_count(threads)
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
