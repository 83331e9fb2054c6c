"""CPU priority and cores of the appliance's threads: when the CPU is short, the screening thread runs first.

Linux schedules each thread on its own, so a thread can lower its own priority (raise its niceness) and choose
its own cores without privileges. The request threads of the page and the loop's frames, recorder and camera
threads do both; the screening thread, which runs the interpreter, keeps the process's priority.

Niceness: measured on the 2-core development machine (camera-size frames with the model-size stream,
1 interpreter thread, 3 runs each), the time an invoke spent waiting for a core fell from 0.9-1.0 ms to
0.35-0.4 ms a field with the helpers at +5.

Cores (:class:`CoreSplit`): with a core left over for the helpers (``[model] threads`` below the cores), the
interpreter's threads keep to their own cores and the helpers to the rest, so the scheduler never puts the
screening thread and a helper on one core while the other has less to do. Measured on the 2-core development
VM, 1 interpreter thread, 4 alternating rounds of the bench's loop section (loop time per field / bare invoke,
medians): replay 1.136x unpinned, 1.081x pinned; camera-size frames with the lores stream 1.154x, 1.139x.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Niceness the helper threads add to the process's own (nice 0 weighs ~3x nice 5 in Linux's scheduler).
HELPER_NICE = 5


@dataclass(frozen=True)
class CoreSplit:
    """The cores the interpreter's threads keep to, and the cores left to every other thread of the service."""

    interpreter: frozenset[int]
    helpers: frozenset[int]

    def describe(self) -> str:
        return f"interpreter on cores {_cores(self.interpreter)}, capture/record/page on {_cores(self.helpers)}"


def _cores(cores: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def allowed_cores() -> frozenset[int]:
    """The cores this process may run on (a systemd ``CPUAffinity=`` or a container narrows them); empty where
    the platform cannot say."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset()


def split_cores(threads: int, allowed: Iterable[int] | None = None) -> CoreSplit | None:
    """Pure: the interpreter's ``threads`` cores and the helpers' rest, or None when no core is left over.

    The interpreter takes the lowest-numbered cores. Chosen by measurement on the 2-core development VM, whose
    core 0 takes the disk and network interrupts: loop / bare invoke with the interpreter on core 0 and the helpers
    on core 1, against the other way round, 3 alternating rounds (replay; camera-size frames with the lores
    stream): 1.095x vs 1.135x and 1.112x vs 1.183x (medians). Not measured on a Pi, which also routes its
    interrupts to core 0.
    """
    cores = sorted(allowed_cores() if allowed is None else set(allowed))
    if threads < 1 or len(cores) < 2 or threads >= len(cores):
        return None
    return CoreSplit(frozenset(cores[:threads]), frozenset(cores[threads:]))


def _pin_this_thread(cores: frozenset[int]) -> bool:
    try:
        os.sched_setaffinity(threading.get_native_id(), cores)
        return True
    except (AttributeError, OSError) as exc:  # not Linux, or cores taken away since (CPU hot-unplug, cgroup)
        log.debug("thread %s keeps its cores: %s", threading.current_thread().name, exc)
        return False


@contextmanager
def pinned(cores: frozenset[int] | None) -> Iterator[None]:
    """Run the body on ``cores`` (None: as it is), then restore the thread's own cores. Threads started in the
    body keep ``cores``: how the interpreter's own worker threads (XNNPACK's pool, created with the interpreter)
    get them."""
    before = allowed_cores() if cores else frozenset()
    changed = bool(cores) and bool(before) and _pin_this_thread(frozenset(cores))
    try:
        yield
    finally:
        if changed:
            _pin_this_thread(before)


#: The split of the running service (:func:`use_split`); None: no thread is pinned.
_split: CoreSplit | None = None


def use_split(split: CoreSplit | None) -> None:
    """The composition root's choice (``device.app.build``: the classifier's split): the helper threads started
    from now on keep to ``split.helpers``; None ends pinning for threads started later."""
    global _split
    _split = split
    if split is not None:
        log.info("cores: %s", split.describe())


def pin_interpreter_thread() -> None:
    """The screening thread: keep to the interpreter's cores (a no-op without a split)."""
    if _split is not None:
        _pin_this_thread(_split.interpreter)


def lower_this_thread(by: int = HELPER_NICE) -> None:
    """A helper thread: add ``by`` to its niceness and keep it to the helpers' cores (when a split is in use).

    Relative niceness: an absolute value would *raise* the helpers of a service started niced. A no-op where
    threads cannot be reniced or pinned (not Linux, or not permitted).
    """
    if _split is not None:
        _pin_this_thread(_split.helpers)
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except (OSError, AttributeError) as exc:
        log.debug("thread %s keeps its priority: %s", threading.current_thread().name, exc)
