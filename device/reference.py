"""Reference images: a guard against the int8 arithmetic of this machine differing from the build machine's.

The bundle carries a few held-out images (PNG at the model's input size, so
nothing is re-encoded or resized on the way) with the raw int8 feature
vectors and decisions the toolchain computed for them on x86. ARM kernels
may round requantization differently: on arm64 (ai-edge-litert 2.1.0) about
12% of the feature values of the shipped model differ by 1 LSB and every
decision is the same. :func:`check_references` measures that margin on this
machine through the public classification path, so ``selftest`` can report it
and refuse a runtime whose differences are larger than the bundle's report
showed to be harmless.

The expected file's format is defined here only: ``convert/`` writes it with
:func:`write_expected`, :func:`read_references` (called by
``device.bundle.load_bundle``) reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device.errors import BundleError, ImageError

if TYPE_CHECKING:  # only for hints: bundle.py imports this module
    from device.bundle import Bundle
    from device.classifier import Classifier, Verdict

log = logging.getLogger(__name__)

FOLDER = "references"
EXPECTED_FILE = f"{FOLDER}/expected.npz"
#: Largest |int8 difference| of any feature value accepted on this machine. The bundle's REPORT.md measures how
#: many held-out decisions change when every feature moves by a random +-1 or +-3 LSB (for the 2026-11-23
#: bundle: 1 and 3 of 828); 3 is the largest perturbation whose effect is known. arm64 (ai-edge-litert 2.1.0)
#: measured 1, so 3 leaves room for other kernels without letting a broken runtime through.
MAX_LSB = 3
_ARRAYS = ("names", "sources", "classes", "features_q", "probs", "status", "label")


@dataclass(frozen=True, eq=False)
class References:
    """The bundle's reference images and what the build machine computed for them."""

    images: tuple[Path, ...]  # PNG files at the model's input size, verified against the manifest
    sources: tuple[str, ...]  # the held-out image each one was cut from (for the record)
    classes: tuple[str, ...]  # its true class
    features_q: np.ndarray  # (N, F) int8: the model's raw quantized output on the build machine
    probs: np.ndarray  # (N, C) float: calibrated class probabilities there
    decisions: tuple[str, ...]  # "ok Benign", "refer -", ... there
    made_on: str  # machine and runtime that computed the expected values

    def __len__(self) -> int:
        return len(self.images)


def decision(status: str, label: str | None) -> str:
    """A verdict as compared across machines: its status and label."""
    return f"{status} {label or '-'}"


def write_expected(path: Path, *, names: list[str], sources: list[str], classes: list[str],
                   features_q: np.ndarray, probs: np.ndarray, verdicts: list[Verdict]) -> None:
    """The expected values, as ``convert/`` records them on the build machine."""
    if features_q.dtype != np.int8:
        raise ValueError(f"reference features must be the raw int8 output, got {features_q.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez on a path appends ".npz" to names without it; a file object does not
        np.savez(f, names=np.array(names), sources=np.array(sources), classes=np.array(classes),
                 features_q=features_q, probs=np.asarray(probs, np.float64),
                 status=np.array([v.status for v in verdicts]), label=np.array([v.label or "" for v in verdicts]))


def read_references(root: Path, images: list[Path], expected: Path, *, n_classes: int, made_on: str,
                    where: Path) -> References:
    """Read ``expected`` (already sha256-verified) and match it to the verified image files.

    The feature length is checked against the loaded model in :func:`check_references`, so a bundle whose
    model and manifest disagree is still refused with the model's own message, when the model is opened.
    """
    try:
        with np.load(expected, allow_pickle=False) as z:
            arr = {k: z[k] for k in _ARRAYS}
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{expected}: not a reference file with arrays {', '.join(_ARRAYS)} ({exc}); "
                          "rebuild the references with `python -m convert references`") from exc
    n = len(images)
    names = [str(s) for s in arr["names"]]
    if names != [p.relative_to(root).as_posix() for p in images]:
        raise BundleError(f"{expected}: names {names} differ from the images {where} (references.images) lists; "
                          "rebuild the references with `python -m convert references`")
    fq, probs = arr["features_q"], arr["probs"]
    if fq.dtype != np.int8 or fq.ndim != 2 or fq.shape[0] != n or probs.shape != (n, n_classes):
        raise BundleError(f"{expected}: features {fq.dtype}{fq.shape} / probabilities {probs.shape}, expected "
                          f"int8({n}, F) / ({n}, {n_classes}) for this bundle; the references come from another "
                          "build: rebuild them with `python -m convert references`")
    return References(images=tuple(images), sources=tuple(str(s) for s in arr["sources"]),
                      classes=tuple(str(s) for s in arr["classes"]), features_q=fq, probs=probs,
                      decisions=tuple(decision(str(s), str(lb) or None) for s, lb in zip(arr["status"], arr["label"])),
                      made_on=made_on)


@dataclass(frozen=True)
class ReferenceCheck:
    """How this machine's results on the reference images compare with the build machine's."""

    n: int  # reference images checked
    max_lsb_diff: int  # largest |int8 difference| over all feature values
    fraction_differing: float  # share of feature values that differ at all
    max_prob_diff: float  # largest |probability difference| over all images and classes
    mismatches: tuple[tuple[str, str, str], ...]  # (image, expected decision, decision here)
    max_lsb: int  # the tolerance applied
    made_on: str = ""  # where the expected values were computed
    worst_image: str = ""  # the image with the largest LSB difference
    per_image_lsb: tuple[int, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.max_lsb_diff <= self.max_lsb

    @property
    def summary(self) -> str:
        """One line for selftest, the log and the install tool."""
        same = "decisions identical" if not self.mismatches else \
            f"{len(self.mismatches)} decision(s) differ: " + "; ".join(
                f"{Path(img).name} expected {want}, got {got}" for img, want, got in self.mismatches)
        text = (f"reference images: {self.n}, {same}, max |LSB| {self.max_lsb_diff} (bound {self.max_lsb}), "
                f"{self.fraction_differing:.0%} of values differ, max prob diff {self.max_prob_diff:.3f}")
        if self.max_lsb_diff > self.max_lsb:
            text += f"; {Path(self.worst_image).name} is {self.max_lsb_diff} LSB off, past the bound"
        return text


def check_references(bundle: Bundle, classifier: Classifier, *, max_lsb: int = MAX_LSB) -> ReferenceCheck:
    """Classify the bundle's reference images here and compare with the build machine's values.

    Raises :class:`BundleError` when the bundle has no reference images (callers that accept old bundles test
    ``bundle.references`` first). Never raises for a difference: the result says whether it is within bounds.
    """
    from device.preprocess import load_image

    refs = bundle.references
    if refs is None or len(refs) == 0:
        raise BundleError(f"{bundle.root}: no reference images in this bundle; rebuild it with `make convert` "
                          "or add them with `python -m convert references`")
    n_out = classifier.model.output_spec.size
    if refs.features_q.shape[1] != n_out:
        raise BundleError(f"{bundle.root / EXPECTED_FILE}: reference features have "
                          f"{refs.features_q.shape[1]} values, the model gives {n_out}; the references come from "
                          "another build: rebuild them with `python -m convert references`")
    got_q, got_p, mismatches = [], [], []
    for i, path in enumerate(refs.images):
        try:
            frame = np.asarray(load_image(path), dtype=np.uint8)
        except ImageError as exc:
            raise BundleError(f"{path}: reference image unreadable ({exc}); restore the bundle") from exc
        q, timed = classifier.screen(frame)
        got_q.append(q)
        got_p.append([timed.verdict.scores[c] for c in bundle.classes])
        now = decision(timed.verdict.status, timed.verdict.label)
        if now != refs.decisions[i]:
            mismatches.append((str(path), refs.decisions[i], now))
    diff = np.abs(np.stack(got_q).astype(np.int32) - refs.features_q.astype(np.int32))
    per_image = diff.max(axis=1)
    worst = int(per_image.argmax())
    check = ReferenceCheck(n=len(refs), max_lsb_diff=int(diff.max()), fraction_differing=float((diff > 0).mean()),
                           max_prob_diff=float(np.abs(np.array(got_p) - refs.probs).max()),
                           mismatches=tuple(mismatches), max_lsb=max_lsb, made_on=refs.made_on,
                           worst_image=str(refs.images[worst]), per_image_lsb=tuple(int(v) for v in per_image))
    log.debug("%s", check.summary)
    return check
