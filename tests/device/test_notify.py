"""sd_notify over a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import uuid

from device.notify import Notifier


def test_ready_status_watchdog_stopping_arrive_as_datagrams(notify_socket) -> None:
    n = Notifier(address=str(notify_socket.path), watchdog_usec="", watchdog_pid="")
    assert n.enabled
    assert n.ready("screening")
    assert n.status("2 fields\nmore")
    assert n.watchdog()
    assert n.stopping()
    assert notify_socket.wait_for("STOPPING=1")
    lines = notify_socket.lines()
    assert "READY=1" in lines and "STATUS=screening" in lines and f"MAINPID={os.getpid()}" in lines
    assert "STATUS=2 fields more" in lines and "WATCHDOG=1" in lines
    n.close()


def test_abstract_socket_names() -> None:
    name = f"leuko-test-{uuid.uuid4().hex[:8]}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(5)
    try:
        assert Notifier(address="@" + name).ready()
        assert s.recv(1024).split(b"\n")[0] == b"READY=1"
    finally:
        s.close()


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()


def test_a_vanished_socket_is_logged_not_raised(short_tmp, caplog) -> None:
    n = Notifier(address=str(short_tmp / "gone"))
    assert not n.watchdog()
    assert not n.watchdog()
    assert sum("sd_notify" in r.message for r in caplog.records) == 1  # warned once


def test_watchdog_period_and_pid(notify_socket) -> None:
    n = Notifier(address=str(notify_socket.path), watchdog_usec="20000000", watchdog_pid=str(os.getpid()))
    assert n.watchdog_s == 20.0
    assert n.watchdog()
    assert not n.watchdog()  # rate-limited to a quarter period
    other = Notifier(address=str(notify_socket.path), watchdog_usec="20000000", watchdog_pid="1")
    assert other.watchdog_s is None  # the watchdog is meant for another process
