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
from device.preprocess import load_image, prepare

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


PARTS = ("train", "val", "test")
#: The split's defaults (``python -m convert --test-fraction --val-fraction --block``): about one patient a block.
TEST_FRACTION, VAL_FRACTION, BLOCK = 0.2, 0.15, 36
#: Where the "10 um" scale-bar label sits in the 224x224 source images (rows, cols). Camera frames have
#: no such label, and its colour differs between classes, so every image the toolchain reads has that
#: corner replaced by the mirror image of the strip just above it: the network never sees the label,
#: and sees smear texture there rather than a flat patch that camera frames would not have either.
SCALE_BAR_BOX = (slice(196, 224), slice(180, 224))


def split(samples: list[Sample], test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION,
          block: int = BLOCK, seed: int = 0) -> dict[str, list[Sample]]:
    """Deterministic split by blocks of consecutive acquisition numbers, about one patient each.

    The set has no patient IDs; numbers follow acquisition order, and 3,256 images of 89 patients make
    about 36 per patient, so within each class the images are sorted by number and cut into blocks of
    ``block``. **test**: the newest blocks of each class (the highest numbers), about ``test_fraction``
    of it: the closest this set offers to new patients. **val**: randomly drawn whole blocks of the rest,
    about ``val_fraction``; it decides every choice (epoch, k, C, calibration, thresholds). **train**: the
    remaining blocks. A block boundary need not fall between two patients, so one patient's images can
    still sit on both sides of a boundary: the split is grouped, not patient-exact.
    """
    rng = random.Random(seed)
    out: dict[str, list[Sample]] = {p: [] for p in PARTS}
    for blocks in _class_blocks(samples, block).values():
        items = sum(len(b) for b in blocks)
        n_test, n_val = round(items * test_fraction), round(items * val_fraction)
        taken = 0
        while blocks and taken + len(blocks[-1]) / 2 <= n_test:  # whole blocks, nearest to the target
            blk = blocks.pop()  # newest first
            out["test"][:0] = blk
            taken += len(blk)
        order = list(range(len(blocks)))
        rng.shuffle(order)
        val_blocks, taken = set(), 0
        for b in order:
            if taken + len(blocks[b]) / 2 > n_val:
                break
            val_blocks.add(b)
            taken += len(blocks[b])
        for i, blk in enumerate(blocks):
            out["val" if i in val_blocks else "train"].extend(blk)
    return out


def blocks(samples: list[Sample], block: int = BLOCK) -> dict[str, tuple[str, int, int, int]]:
    """Each sample's block as :func:`split` cuts them: path -> (class, block index, first and last number).

    ``samples`` must be the whole set (all parts): blocks are counted from each class's oldest image,
    so a part on its own would cut them elsewhere.
    """
    out: dict[str, tuple[str, int, int, int]] = {}
    for label, class_blocks in _class_blocks(samples, block).items():
        for b, blk in enumerate(class_blocks):
            out.update({s.path: (label, b, blk[0].number, blk[-1].number) for s in blk})
    return out


def split_blocks(path: Path) -> dict[str, tuple[str, int, int, int]]:
    """:func:`blocks` of the split file at ``path``, cut at that split's own block size."""
    _, parts, doc = read_split(path)
    return blocks([s for part in PARTS for s in parts[part]], doc["params"].get("block", BLOCK))


def block_groups(block_of: dict[str, tuple[str, int, int, int]], paths) -> np.ndarray:
    """One group label ("class:block") per path, for grouping fields by patient-sized block."""
    return np.array([f"{block_of[p][0]}:{block_of[p][1]}" for p in paths])


def _class_blocks(samples: list[Sample], block: int) -> dict[str, list[list[Sample]]]:
    """Per class (sorted by name), its images by acquisition number cut into blocks of ``block``, oldest first."""
    out: dict[str, list[list[Sample]]] = {}
    for label in sorted({s.label for s in samples}):
        items = sorted((s for s in samples if s.label == label), key=lambda s: (s.number, s.path))
        out[label] = [items[i:i + block] for i in range(0, len(items), block)]
    return out


def split_hash(parts: dict[str, list[Sample]]) -> str:
    h = hashlib.sha256()
    for part in PARTS:
        for s in sorted(parts.get(part, []), key=lambda s: s.sha256):
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
        **{part: [asdict(s) for s in parts[part]] for part in PARTS},
    }
    path.write_text(json.dumps(doc, indent=1))


def read_split(path: Path) -> tuple[list[str], dict[str, list[Sample]], dict]:
    if not path.exists():
        raise DatasetError(f"split file {path} does not exist; run `python -m convert split` first")
    doc = json.loads(path.read_text())
    if any(part not in doc for part in PARTS):
        raise DatasetError(f"split file {path} has no {'/'.join(PARTS)} parts (an older layout); "
                           "run `python -m convert split --force`")
    parts = {part: [Sample(**d) for d in doc[part]] for part in PARTS}
    return doc["classes"], parts, doc


def mask_scale_bar(rgb: np.ndarray) -> np.ndarray:
    """Cover the scale-bar corner of a 224x224 source image with the mirrored strip above it."""
    if rgb.shape[:2] != (224, 224):
        return rgb
    rows, cols = SCALE_BAR_BOX
    h = rows.stop - rows.start
    out = rgb.copy()
    out[rows, cols] = rgb[rows.start - 1:rows.start - 1 - h:-1, cols]
    return out


def load_sources(root: Path, samples: list[Sample]) -> list[np.ndarray]:
    """The source images as the camera would show them: decoded, upright RGB, scale bar painted over."""
    return [mask_scale_bar(np.asarray(load_image(root / s.path))) for s in samples]


def load_rgb(root: Path, samples: list[Sample], size: int) -> np.ndarray:
    """``samples`` through the device's own :func:`device.preprocess.prepare`: (N, size, size, 3) uint8."""
    out = np.empty((len(samples), size, size, 3), np.uint8)
    for i, src in enumerate(load_sources(root, samples)):
        out[i] = prepare(src, size).rgb
    return out
