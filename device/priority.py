"""CPU priority of the appliance's helper threads: when the CPU is short, the screening thread runs first.

Linux schedules each thread on its own, so a thread can lower its own priority (raise its niceness) without
privileges. The request threads of the page and the loop's frames, recorder and camera threads do; the
screening thread, which runs the interpreter, keeps the process's own. Measured on the 2-core development
machine (camera-size frames with the model-size stream, 1 interpreter thread, 3 runs each): the time an invoke
spent waiting for a core fell from 0.9-1.0 ms to 0.35-0.4 ms a field with the helpers at +5.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

#: Niceness the helper threads add to the process's own (nice 0 weighs ~3x nice 5 in Linux's scheduler).
HELPER_NICE = 5


def lower_this_thread(by: int = HELPER_NICE) -> None:
    """Add ``by`` to the calling thread's niceness (relative: an absolute value would *raise* the helpers of a
    service started niced); a no-op where threads cannot be reniced (not Linux, or not permitted)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except (OSError, AttributeError) as exc:
        log.debug("thread %s keeps its priority: %s", threading.current_thread().name, exc)
