"""The helper threads (frames, recorder, camera calls, page requests) run below the screening thread's priority,
and, with a core left over, on cores of their own (:mod:`device.priority`)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from device.app import build
from device.classifier import Classifier
from device.loop.worker import Worker
from device.notify import Notifier
from device.priority import HELPER_NICE, CoreSplit, allowed_cores, lower_this_thread, pinned, split_cores
from tests.device.conftest import wait_until

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


def affinity(native_id: int = 0) -> frozenset[int]:
    return frozenset(os.sched_getaffinity(native_id))


def test_the_interpreter_takes_the_lowest_cores_and_the_helpers_the_rest_when_one_is_left_over() -> None:
    assert split_cores(1, {0, 1}) == CoreSplit(frozenset({0}), frozenset({1}))
    assert split_cores(3, {0, 1, 2, 3}) == CoreSplit(frozenset({0, 1, 2}), frozenset({3}))
    assert split_cores(1, {7, 2, 5}) == CoreSplit(frozenset({2}), frozenset({5, 7}))
    assert split_cores(2, {0, 1}) is None  # every core runs the interpreter: nothing to keep apart
    assert split_cores(4, {0, 1}) is None
    assert split_cores(1, {0}) is None
    assert split_cores(1, ()) is None
    assert split_cores(1, {0, 1}).describe() == "interpreter on cores 0, capture/record/page on 1"


def test_threads_started_inside_pinned_keep_its_cores_and_the_caller_gets_its_own_back() -> None:
    before = affinity()
    one = frozenset({max(before)})
    seen: list[frozenset[int]] = []
    with pinned(one):
        inside = affinity()
        t = threading.Thread(target=lambda: seen.append(affinity()))  # as XNNPACK's pool starts with the model
        t.start()
        t.join(10)
    assert inside == one and seen == [one]
    assert affinity() == before == allowed_cores()
    with pinned(None):
        assert affinity() == before


def test_the_service_keeps_the_model_and_its_helpers_apart_and_stops_pinning_when_closed(
        make_config, decisive_bundle, sample_paths, tmp_path) -> None:
    cores = sorted(allowed_cores())
    split = CoreSplit(frozenset(cores[:1]), frozenset(cores[-1:]))  # one core: both sides on it, still set
    clf = Classifier.open(decisive_bundle, num_threads=1, use_edgetpu=False, pin_cores=True)
    assert clf.model.cores == split_cores(1)  # what `[model] pin_cores = true` gives with 1 thread here
    clf.model.cores = split
    cfg = make_config(store={"state_dir": str(tmp_path / "state"), "reserve_mb": 0},
                      web={"token": "t0k3n", "host": "127.0.0.1", "port": 0},
                      camera={"source": "replay", "replay_dir": str(sample_paths[0].parent)})
    app = build(cfg, classifier=clf, notifier=Notifier(address=""))
    try:
        assert wait_until(lambda: app.store.stats().fields >= 3)
        by_name = {t.name: t.native_id for t in threading.enumerate()}
        assert affinity(by_name["screening"]) == split.interpreter
        assert app.web is not None
        page = [n for n in by_name if n.startswith("waitress")]
        assert page, sorted(by_name)
        for helper in ("frames", "recorder", "camera", "web-server", *page):
            assert affinity(by_name[helper]) == split.helpers, helper
    finally:
        app.close()
    seen: list[frozenset[int]] = []
    w = Worker("after")  # a helper started after the service closed is not pinned
    try:
        w.submit(lambda: seen.append(affinity()))
        assert w.drain(10)
    finally:
        w.close()
    assert seen == [allowed_cores()]
