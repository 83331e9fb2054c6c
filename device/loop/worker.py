"""A daemon thread running submitted calls in order: the loop's *frames* and *recorder* threads.

``submit`` and ``drain`` are called from the screening thread (and ``stop()``); the calls run on the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from device.priority import lower_this_thread

log = logging.getLogger(__name__)


class Worker:
    """One daemon thread running submitted calls in order (the frames stage, the recorder)."""

    def __init__(self, name: str):
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        with self._idle:
            self._pending += 1
        self._q.put(fn)

    def _loop(self) -> None:
        lower_this_thread()  # the screening thread (the interpreter) goes first when the cores are short
        while True:
            fn = self._q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # the submitted calls handle their own errors; this is a bug
                log.exception("%s thread: a stage failed", self._thread.name)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until everything submitted has run; False on time-out."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._q.put(None)
