"""What the loop shows on the page, and the one lock of the loop.

:class:`Board` holds the lock that guards every piece of state more than one thread touches (its own
fields, and those of :class:`~device.loop.alerts.Alerts` and :class:`~device.loop.slide.SlideTracker`,
which are handed the board), and ``seq``, the change counter the page's live events wait on.

Who writes what: the recorder thread the last result and the field times; the screening thread the invoke
times and watchdog count; the frames thread the frame counts and camera errors; callers read it all
through ``Service.status()``. Every method takes the lock; :meth:`bump` expects it held.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from device.store.records import FieldResult

#: The counters ``status()`` reports, in the order it reports them.
COUNTS = ("frames", "skipped", "fields", "uploads", "camera_errors", "store_errors", "watchdog")


class Board:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self.seq = 0
        self.last: FieldResult | None = None
        self.counts: dict[str, int] = dict.fromkeys(COUNTS, 0)
        self.invoke_ms: deque[float] = deque(maxlen=200)
        self.field_ms: deque[float] = deque(maxlen=200)
        self.field_times: deque[float] = deque(maxlen=30)

    def bump(self) -> None:
        """A change the page should see: the caller holds the lock."""
        self.seq += 1
        self._changed.notify_all()

    def wait_for_change(self, after_seq: int, timeout: float, stopped: Callable[[], bool]) -> int:
        """Block until ``seq`` differs from ``after_seq``, ``stopped()`` or ``timeout``; returns the current seq."""
        with self._changed:
            self._changed.wait_for(lambda: self.seq != after_seq or stopped(), timeout=max(0.0, timeout))
            return self.seq

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def invoked(self, ms: float) -> None:
        """Screening thread: one more invoke time for the percentiles."""
        with self.lock:
            self.invoke_ms.append(ms)

    def shown(self, r: FieldResult, total_ms: float, now: float, *, camera: bool) -> None:
        """Recorder thread: ``r`` (committed, or not recordable) is what the page shows now; no bump here,
        the caller bumps once it has also counted the field to its slide."""
        with self.lock:
            self.last = r
            self.field_ms.append(total_ms)
            self.field_times.append(now)
            self.counts["fields" if camera else "uploads"] += 1
