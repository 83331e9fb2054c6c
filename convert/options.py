"""The toolchain's options, where each step's files live, and the image loader the steps share.

A leaf of ``convert/``: it imports only :mod:`convert.data` (and ``device/``), so the steps, the
scorecard, the report, the bundle writer and the command line all take their options and file names
from here without importing each other. Every option default is written here once (the command
line's flags take theirs from :class:`Options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert import data
from convert.data import BLOCK, TEST_FRACTION, VAL_FRACTION, Sample

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "all-aria"

# -- the bundle's files (``models/``) ---------------------------------------------------------------------------
MODEL_FILE = "darknet19_int8.tflite"
EDGETPU_FILE = "darknet19_int8_edgetpu.tflite"
EDGETPU_FRIENDLY_FILE = "darknet19_int8_edgetpu_friendly.tflite"  # uncompiled; input of edgetpu_compiler
HEAD_FILE = "head.npz"
WEIGHTS_FILE = "source/darknet19-fp16.pt"
METRICS_FILE = "metrics.json"
REPORT_FILE = "REPORT.md"
FIGURES_DIR = "figures"

# -- what training writes beside its checkpoints ----------------------------------------------------------------
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"


@dataclass(frozen=True)
class Options:
    """What ``python -m convert`` was told; the defaults are the command line's."""

    data: Path = DEFAULT_DATA
    work: Path = ROOT / "build" / "convert"
    models: Path = ROOT / "models"
    test_fraction: float = TEST_FRACTION
    val_fraction: float = VAL_FRACTION
    block: int = BLOCK
    seed: int = 0
    calib: int = 256
    #: None: each activation's int8 range is its calibration min/max (what ships); P: its (100-P)..P percentile.
    range_percentile: float | None = None
    edgetpu_friendly: bool = True
    criterion: str = "MIQ"
    folds: int = 10
    force: bool = False


@dataclass(frozen=True)
class WorkFiles:
    """Every file and folder the steps write into the work folder."""

    split: Path
    weights: Path
    onnx: Path
    export: Path
    tflite: Path
    quant: Path
    edgetpu: Path
    edgetpu_friendly: Path
    features: Path
    shifts: Path
    ood: Path
    head: Path
    selection: Path
    stamps: Path  # one JSON per step: what it was run on, how long it took
    train_dir: Path  # checkpoints, HISTORY_FILE, CURVES_FILE
    onnx2tf_dir: Path
    edgetpu_dir: Path


def paths(o: Options) -> WorkFiles:
    w = o.work
    return WorkFiles(split=w / "split.json", weights=w / "darknet19.pt", onnx=w / "darknet19.onnx",
                     export=w / "export.json", tflite=w / MODEL_FILE, quant=w / "quantize.json",
                     edgetpu=w / EDGETPU_FILE, edgetpu_friendly=w / EDGETPU_FRIENDLY_FILE,
                     features=w / "features.npz", shifts=w / "shifts.npz", ood=w / "ood.npz", head=w / HEAD_FILE,
                     selection=w / "selection.json", stamps=w / "stamps", train_dir=w / "train",
                     onnx2tf_dir=w / "onnx2tf", edgetpu_dir=w / "edgetpu")


def load_part(o: Options, part: str, size: int,
              samples: list[Sample] | None = None) -> tuple[list[str], np.ndarray, np.ndarray, list[Sample]]:
    """(classes, images through ``device.preprocess.prepare`` at ``size``, labels, samples) of one split part
    (or of ``samples`` from it)."""
    classes, parts, doc = data.read_split(paths(o).split)
    items = parts[part] if samples is None else samples
    x = data.load_rgb(Path(doc["data_root"]), items, size)
    y = np.array([classes.index(s.label) for s in items])
    return classes, x, y, items


def kept_epoch(history: list[dict], size: int) -> int | None:
    """The epoch kept: best validation balanced accuracy among the epochs at the shipped ``size`` (ties: later).

    Histories written before balanced accuracy was recorded fall back to accuracy.
    """
    at_size = [h for h in history if h["size"] == size]
    if not at_size:
        return None
    return max(at_size, key=lambda h: (h.get("val_bacc", h["val_acc"]), h["epoch"]))["epoch"]
