"""The helper threads (frames, recorder, camera calls, page requests) run below the screening thread's priority."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from device.loop.worker import Worker
from device.priority import HELPER_NICE, lower_this_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux schedules threads one by one")


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_worker_thread_is_niced_relative_to_the_thread_that_runs_the_model() -> None:
    seen: list[int] = []
    w = Worker("frames")
    try:
        w.submit(lambda: seen.append(niceness()))
        assert w.drain(10)
    finally:
        w.close()
    assert seen == [min(19, niceness() + HELPER_NICE)]


def test_lowering_is_relative_and_never_past_19() -> None:
    seen: list[int] = []

    def run() -> None:
        lower_this_thread(3)
        seen.append(niceness())
        lower_this_thread(40)
        seen.append(niceness())

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert seen == [min(19, niceness() + 3), 19]
    assert niceness() == os.getpriority(os.PRIO_PROCESS, 0)  # the calling thread keeps its own
