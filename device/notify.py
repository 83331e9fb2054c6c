"""systemd's sd_notify protocol, without libsystemd: one datagram per message.

``Type=notify`` units get ``$NOTIFY_SOCKET`` (a path, or an abstract socket
written with a leading ``@``). We send ``READY=1`` once the model is warm,
``WATCHDOG=1`` from the work loop after each successful pass (never from a
timer, which would hide a hung loop), ``STATUS=...`` for ``systemctl status``
and ``STOPPING=1`` on shutdown. Without the variable every call is a no-op,
so the same code runs on a laptop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None, *, watchdog_usec: str | None = None,
                 watchdog_pid: str | None = None):
        env = os.environ
        address = env.get("NOTIFY_SOCKET") if address is None else address
        self.address: str | bytes | None = None
        if address:
            if address.startswith("@"):
                self.address = b"\0" + address[1:].encode()
            elif address.startswith("/"):
                self.address = address
            else:
                log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract name; not notifying", address)
        usec = env.get("WATCHDOG_USEC") if watchdog_usec is None else watchdog_usec
        pid = env.get("WATCHDOG_PID") if watchdog_pid is None else watchdog_pid
        self.watchdog_s: float | None = None
        if usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_s = int(usec) / 1e6 or None
            except ValueError:
                log.warning("WATCHDOG_USEC %r is not a number; watchdog not used", usec)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._last_ping = 0.0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False (logged once) if it could not be sent."""
        if self.address is None:
            return False
        msg = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(msg, self.address)
                self._warned = False
                return True
            except OSError as exc:
                if not self._warned:
                    log.warning("sd_notify to %r failed: %s", self.address, exc)
                    self._warned = True
                self._close_locked()
                return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []), f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send("STATUS=" + text.replace("\n", " "))

    def watchdog(self) -> bool:
        """Ping; rate-limited to a few per watchdog period so a fast loop does not flood systemd."""
        now = time.monotonic()
        min_gap = (self.watchdog_s / 4) if self.watchdog_s else 0.0
        if now - self._last_ping < min_gap:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()
