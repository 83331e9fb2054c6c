"""The labelled smear set: scanning, de-duplication and the train/test split.

The split file written here (names + sha256) is the single source of truth
for every later step and for the report, so numbers are always computed on
the same held-out images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from device.errors import ImageError, ScreenError
from device.preprocess import fit_square, load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
#: Folder name -> class name shown to users. Folders not listed keep their name.
DISPLAY_NAMES = {"Benign": "Benign", "Early": "Early Pre-B", "Pre": "Pre-B", "Pro": "Pro-B"}
BENIGN = "Benign"


class DatasetError(ScreenError, ValueError):
    """The data folder is missing, empty, or a class has no usable image."""


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the data root
    label: str  # folder name
    sha256: str
    number: int  # acquisition number parsed from the name (-1 if none)


@dataclass
class Scan:
    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[str, str]]  # (path, reason)
    duplicates: list[tuple[str, str]]  # (dropped, kept)


def _number(name: str) -> int:
    m = re.findall(r"(\d+)", name)
    return int(m[-1]) if m else -1


def scan(root: str | Path) -> Scan:
    """List a class-per-folder image set, dropping corrupt files and byte duplicates."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"data folder {root} does not exist; pass --data with a folder holding one "
            "sub-folder of images per class (e.g. ../shared/data/all-aria)"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(f"data folder {root} has {len(classes)} class folders; need at least 2")
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    duplicates: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for label in classes:
        count = 0
        for path in sorted((root / label).iterdir()):
            rel = str(path.relative_to(root))
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((rel, "not an image file"))
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                duplicates.append((rel, seen[digest]))
                continue
            try:
                load_image(data, name=rel)
            except ImageError as exc:
                skipped.append((rel, str(exc)))
                continue
            seen[digest] = rel
            samples.append(Sample(rel, label, digest, _number(path.name)))
            count += 1
        if count == 0:
            raise DatasetError(f"class folder {root / label} has no usable image; add images or remove the folder")
    for rel, why in skipped:
        log.warning("skipped %s: %s", rel, why)
    log.info("%d images in %d classes, %d duplicates dropped, %d skipped",
             len(samples), len(classes), len(duplicates), len(skipped))
    return Scan(root, classes, samples, skipped, duplicates)


def split(samples: list[Sample], test_fraction: float = 0.3, block: int = 5, seed: int = 0) -> dict[str, list[Sample]]:
    """Deterministic stratified split that keeps acquisition neighbours together.

    The set has no patient IDs, but numbers follow acquisition order, so
    neighbouring images often show one patient (or the same field twice).
    Within each class, images are sorted by number and grouped in blocks of
    ``block``; whole blocks go to train or test. This is stricter than a random
    image-level split, which would flatter accuracy.
    """
    rng = random.Random(seed)
    out: dict[str, list[Sample]] = {"train": [], "test": []}
    for label in sorted({s.label for s in samples}):
        items = sorted((s for s in samples if s.label == label), key=lambda s: (s.number, s.path))
        blocks = [items[i:i + block] for i in range(0, len(items), block)]
        order = list(range(len(blocks)))
        rng.shuffle(order)
        n_test = round(len(items) * test_fraction)
        taken = 0
        test_blocks = set()
        for b in order:
            if taken >= n_test:
                break
            test_blocks.add(b)
            taken += len(blocks[b])
        for i, blk in enumerate(blocks):
            out["test" if i in test_blocks else "train"].extend(blk)
    return out


def split_hash(parts: dict[str, list[Sample]]) -> str:
    h = hashlib.sha256()
    for part in ("train", "test"):
        for s in sorted(parts[part], key=lambda s: s.sha256):
            h.update(f"{part}:{s.sha256}\n".encode())
    return h.hexdigest()


def write_split(path: Path, scan_: Scan, parts: dict[str, list[Sample]], **params) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "data_root": str(Path(scan_.root).resolve()),
        "classes": scan_.classes,
        "params": params,
        "hash": split_hash(parts),
        "duplicates": scan_.duplicates,
        "skipped": scan_.skipped,
        **{part: [asdict(s) for s in parts[part]] for part in ("train", "test")},
    }
    path.write_text(json.dumps(doc, indent=1))


def read_split(path: Path) -> tuple[list[str], dict[str, list[Sample]], dict]:
    if not path.exists():
        raise DatasetError(f"split file {path} does not exist; run `python -m convert split` first")
    doc = json.loads(path.read_text())
    parts = {part: [Sample(**d) for d in doc[part]] for part in ("train", "test")}
    return doc["classes"], parts, doc


def load_rgb(root: Path, samples: list[Sample], size: int) -> np.ndarray:
    """Decode ``samples`` through the device's own preprocessing: (N, size, size, 3) uint8."""
    out = np.empty((len(samples), size, size, 3), np.uint8)
    for i, s in enumerate(samples):
        out[i] = fit_square(load_image(root / s.path), size)
    return out
