"""The open slide: which slide the camera's fields belong to, its tally and its near-duplicate filter.

A slide opens with the first camera field after the last one ended (or on the page's or the button's
command) and ends on command or when the service stops. Its verdict while open comes from the tally of
distinct fields kept here (:func:`device.slides.aggregate_tally`); a closed slide's from the store.

Threads: the screening thread opens one for a camera field (:meth:`SlideTracker.ensure`) and asks whether a
field is new (:meth:`SlideTracker.is_new`); the recorder counts committed fields (:meth:`SlideTracker.count`);
the page and the button start and end slides. State is guarded by the board's lock; the store is called
without it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from device.bundle import Bundle
from device.errors import StoreError
from device.loop.alerts import Alerts
from device.loop.board import Board
from device.slides import Deduplicator, FieldKey, SlideRules, SlideVerdict, aggregate, aggregate_tally, field_key
from device.store import ResultStore
from device.store.records import FieldResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenSlide:
    """The open slide as ``status()`` reports it: its verdict so far."""

    id: str
    started: float  # epoch s
    verdict: SlideVerdict  # from the tally of its distinct fields so far

    def to_dict(self) -> dict:
        return {"id": self.id, "started": self.started, **self.verdict.to_dict()}


class SlideTracker:
    def __init__(self, board: Board, store: ResultStore, alerts: Alerts, bundle: Bundle, rules: SlideRules):
        self.board, self.store, self.alerts, self.bundle, self.rules = board, store, alerts, bundle, rules
        self._id: str | None = None
        self._started: float | None = None
        self._tally: Counter[FieldKey] = Counter()  # the open slide's fields, as counts
        self._dedupe = Deduplicator(bundle.slide.duplicate_similarity)  # the open slide's recent fingerprints

    @property
    def open_id(self) -> str | None:
        with self.board.lock:
            return self._id

    def current(self) -> OpenSlide | None:
        with self.board.lock:
            if self._id is None:
                return None
            assert self._started is not None
            return OpenSlide(self._id, self._started, self._aggregate_open())

    def _aggregate_open(self) -> SlideVerdict:
        return aggregate_tally(self._tally, self.bundle.benign, self.rules, self.bundle.classes)

    def _open(self, sid: str) -> str:
        with self.board.lock:
            self._id, self._started, self._tally = sid, time.time(), Counter()
            self._dedupe.reset()
            self.board.bump()
        log.info("slide %s started", sid)
        return sid

    def ensure(self) -> str | None:
        """The open slide, opened now if there is none; None when the store cannot open one (a fault)."""
        sid = self.open_id
        if sid is not None:
            return sid
        try:
            return self._open(self.store.start_slide())
        except StoreError as exc:
            self.alerts.fault("storage", str(exc))
            return None

    def start(self) -> str:
        """End the current slide (if any) and start a new one; the next fields belong to it."""
        self.end()
        return self._open(self.store.start_slide())

    def end(self) -> str | None:
        """End the current slide; the next camera field starts a new one. Returns the ended id."""
        with self.board.lock:
            sid, self._id = self._id, None
            fields, self._tally = self._tally, Counter()
            self.board.bump()
        if sid is None:
            return None
        try:
            self.store.end_slide(sid)
        except StoreError as exc:
            self.alerts.fault("storage", str(exc))
        v = aggregate_tally(fields, self.bundle.benign, self.rules, self.bundle.classes, closed=True)
        log.info("slide %s ended: %s%s (%s)", sid, v.verdict, f" {v.subtype}" if v.subtype else "", v.reason)
        return sid

    def toggle(self) -> None:
        """The button's long press: end the open slide, or start one when none is open."""
        if self.open_id is not None:
            self.end()
        else:
            self.start()

    def is_new(self, fingerprint: np.ndarray) -> bool:
        """Screening thread: is this field of the open slide unlike its recent ones (new evidence)?"""
        with self.board.lock:
            return self._dedupe.is_new(fingerprint)

    def count(self, r: FieldResult) -> None:
        """Recorder thread, lock held: a committed camera field adds to its slide's tally if that is still open."""
        if r.slide_id is not None and r.slide_id == self._id:
            self._tally[field_key(r)] += 1

    def verdict(self, slide_id: str) -> SlideVerdict | None:
        """The aggregated verdict of any recorded slide (None if unknown)."""
        with self.board.lock:
            if slide_id == self._id:
                return self._aggregate_open()
        slide = self.store.slide(slide_id)
        if slide is None:
            return None
        return aggregate(self.store.slide_fields(slide_id), self.bundle.benign, self.rules, self.bundle.classes,
                         closed=slide.ended is not None)
