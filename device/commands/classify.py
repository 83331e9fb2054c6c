"""``python -m device classify``: image files through the field pipeline (:func:`device.classifier.screen_field`)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device.commands import EXIT_FAIL, EXIT_OK, load_config
from device.errors import ImageError
from device.status import Status

if TYPE_CHECKING:
    from device.classifier import Classifier, Screened
    from device.quality import QualityThresholds

log = logging.getLogger(__name__)

ERROR = "error"  # the status of a file that could not be read as an image (not a field status)


@dataclass(frozen=True)
class Classified:
    """One image file: screened, or ``error`` saying why it could not be read."""

    file: Path
    screened: Screened | None
    error: str = ""

    @property
    def status(self) -> str:
        return ERROR if self.screened is None else self.screened.verdict.status

    def to_json(self) -> dict[str, Any]:
        """The ``classify --json`` line."""
        out: dict[str, Any] = {"file": str(self.file)}
        s = self.screened
        if s is None:
            return {**out, "status": ERROR, "label": None, "all": False, "confidence": 0.0, "scores": {},
                    "reason": self.error}
        v, q = s.verdict, s.quality
        if s.timed is None:
            return {**out, "status": v.status, "label": None, "all": False, "confidence": 0.0, "scores": {},
                    "reason": v.reason, "quality": q.figures()}
        t = s.timings
        return {**out, "status": v.status, "label": v.label, "all": v.all, "confidence": round(v.confidence, 4),
                "scores": {k: round(p, 4) for k, p in v.scores.items()}, "reason": v.reason,
                "distance": round(v.distance, 3), "p_all": round(v.p_all, 4), "quality": q.figures(),
                "ms": round(t["preprocess"] + t["invoke"] + t["head"], 2)}


def classify_file(clf: Classifier, path: Path, th: QualityThresholds) -> Classified:
    from device.classifier import screen_field
    from device.preprocess import load_image

    try:
        frame = np.asarray(load_image(path), dtype=np.uint8)
    except ImageError as exc:
        return Classified(path, None, str(exc))
    return Classified(path, screen_field(clf, frame, th))


def cmd_classify(args: argparse.Namespace) -> int:
    from device.app import open_bundle
    from device.config import resolve

    cfg = load_config(args.config)
    clf = open_bundle(cfg, resolve(cfg)).classifier
    failed = 0
    for name in args.images:
        c = classify_file(clf, Path(name), cfg.quality)
        rec = c.to_json()
        if c.status == ERROR:
            failed += 1
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            what = rec["label"] or "-"
            conf = f" {rec['confidence']:.2f}" if rec["status"] in (Status.OK, Status.REFER) else ""
            alert = "  ALL" if rec["all"] else ""
            why = f"  ({rec['reason']})" if rec["reason"] else ""
            print(f"{rec['file']}: {rec['status']} {what}{conf}{alert}{why}", flush=True)
    if failed:
        log.error("%d of %d image(s) could not be read", failed, len(args.images))
    return EXIT_FAIL if failed else EXIT_OK
