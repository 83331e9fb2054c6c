"""Field classification: preprocessing -> int8 features -> numpy head -> verdict.

:func:`decide` is the pure decision rule; :class:`Classifier` binds a bundle
to a loaded model. The field pipeline is :func:`screen_field`: the quality gate
(``device.quality``), then the classifier. Its two halves, :func:`gate_field`
(pure, any thread) and :func:`infer_field` (the thread that owns the
interpreter), are what the screening loop runs on its two threads; ``classify``
and ``selftest`` run them back to back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from device.bundle import Bundle, Thresholds, check_model_matches, side_px
from device.head import Head, HeadOutput, evaluate, standardise
from device.inference import TFLiteModel
from device.preprocess import Prepared, prepare, quantize_input
from device.quality import Quality, QualityThresholds, gate
from device.status import Status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    status: Status
    label: str | None  # class name when status is OK
    all: bool  # ALL detected (may be True with status REFER when only the subtype is unsure)
    confidence: float  # calibrated probability of the reported label (or of the top class)
    scores: dict[str, float]  # calibrated probability per class
    reason: str  # why retake/refer; empty when ok
    distance: float | None  # to the training features (OOD figure); None for a retake (never classified)
    p_all: float | None  # summed probability of the ALL classes; None for a retake


def retake(quality: Quality) -> Verdict:
    """The verdict of a field the quality gate refused: never classified, the gate's reason says what to fix."""
    return Verdict(Status.RETAKE, None, False, 0.0, {}, quality.reason, None, None)


#: In the reason of a field referred because the network's own classifier and the head disagree.
NETWORK_DISAGREES = "the network's own classifier"


def decide(head: Head, out: HeadOutput, benign: str, th: Thresholds) -> Verdict:
    """The decision rule, pure: OOD -> refer; confident label -> label; ALL likely -> alert; else refer.

    "Benign" needs ``th.benign_confidence`` (stricter than ``th.confidence``): calling a blast field
    benign is the one error a screening aid must not make, so an unsure benign field is referred.
    A confident label also needs the network's own classifier (when the head carries it) to agree: the SVM sees
    the k mRMR-selected features, the network's classifier all of them, and where they part the field is unlike
    what both were fitted on (another lab's smears: models/REPORT.md, "Refer what it does not know").
    """
    classes = head.classes
    scores = {c: float(p) for c, p in zip(classes, out.probs)}
    p_all = float(sum(p for c, p in scores.items() if c != benign))
    top = classes[out.index]
    if out.distance > head.ood_threshold:
        return Verdict(Status.REFER, None, False, out.confidence, scores,
                       f"field unlike the training images (out-of-distribution score {out.distance:.2f} > "
                       f"{head.ood_threshold:.2f}); check slide, stain and magnification, or send to a haematologist",
                       out.distance, p_all)
    need = th.benign_confidence if top == benign else th.confidence
    if out.confidence >= need:
        if 0 <= out.network_index != out.index:  # the network's own classifier reads another class
            return Verdict(Status.REFER, None, p_all >= th.all_probability, out.confidence, scores,
                           f"field unlike the training images (the head reads {top} {out.confidence:.2f}, "
                           f"{NETWORK_DISAGREES} {classes[out.network_index]}); check slide, stain and magnification, "
                           "or send to a haematologist", out.distance, p_all)
        return Verdict(Status.OK, top, top != benign, out.confidence, scores, "", out.distance, p_all)
    if p_all >= th.all_probability:
        return Verdict(Status.REFER, None, True, out.confidence, scores,
                       f"ALL likely (p={p_all:.2f}) but subtype uncertain (best {top} {out.confidence:.2f}); "
                       "send to a haematologist", out.distance, p_all)
    return Verdict(Status.REFER, None, False, out.confidence, scores,
                   f"low confidence (best {top} {out.confidence:.2f} < {need:.2f}); "
                   "send to a haematologist", out.distance, p_all)


def model_features(model: TFLiteModel, rgb: np.ndarray) -> np.ndarray:
    """Dequantized feature vector of a square model-size RGB image.

    The one code path from pixels to features: the device classifies with it
    and ``convert/`` fits the head on its output.
    """
    return model.dequantize(model_output(model, rgb))


def model_output(model: TFLiteModel, rgb: np.ndarray) -> np.ndarray:
    """The raw quantized output of :func:`model_features` (what the reference-image check compares)."""
    return model.invoke(quantize_input(rgb, model.input_spec))


@dataclass(frozen=True)
class Timed:
    verdict: Verdict
    preprocess_ms: float
    invoke_ms: float
    head_ms: float
    #: The field's fingerprint (standardised selected features): near-duplicate fields of a slide are found by it.
    fingerprint: np.ndarray | None = None
    #: The model's raw quantized output (what the reference-image check compares across machines).
    output: np.ndarray | None = None


@dataclass(frozen=True)
class Gated:
    """A field after the half of the pipeline that needs no interpreter: prepared once and judged."""

    quality: Quality
    prepared: Prepared | None  # None when the gate asks for a retake
    timings: dict[str, float]  # ms of "preprocess" and "quality"


@dataclass(frozen=True)
class Screened:
    """One field through the whole device path: quality gate, then (if it passed) the classifier."""

    quality: Quality
    timed: Timed | None  # None when the gate asked for a retake
    timings: dict[str, float]  # ms of "preprocess" and "quality" (the gate); "invoke" and "head" when classified

    @property
    def verdict(self) -> Verdict:
        return self.timed.verdict if self.timed is not None else retake(self.quality)


def gate_field(clf: Classifier, frame: object, th: QualityThresholds, *, scale: float = 1.0) -> Gated:
    """The first half of :func:`screen_field`: prepare once and judge (pure; any thread).

    ``scale``: the frame's width over the width the camera was calibrated on (the camera's model-size stream
    is smaller than the main stream the red-cell diameter was measured on).
    """
    side = clf.side_px * scale if clf.side_px is not None else None
    timings: dict[str, float] = {}
    prep, q = gate(frame, clf.model.input_spec.size, th, side_px=side, timings=timings)
    return Gated(q, prep if q.ok else None, timings)


def infer_field(clf: Classifier, gated: Gated) -> Screened:
    """The second half of :func:`screen_field`: invoke, head, decision (only on the interpreter's thread)."""
    if gated.prepared is None:
        return Screened(gated.quality, None, dict(gated.timings))
    timed = clf.infer(gated.prepared)
    return Screened(gated.quality, timed, {**gated.timings, "invoke": round(timed.invoke_ms, 3),
                                            "head": round(timed.head_ms, 3)})


def screen_field(clf: Classifier, frame: object, th: QualityThresholds) -> Screened:
    """The field pipeline used by the loop, ``classify`` and ``selftest``: prepare once, gate, classify."""
    return infer_field(clf, gate_field(clf, frame, th))


class Classifier:
    """A bundle and its loaded model; ``classify`` takes any HxWx3 uint8 RGB frame.

    ``classify`` = ``infer(prepare(frame))``: the screening loop prepares the next frame on another thread
    while this one's ``infer`` holds the interpreter (which is not thread-safe; only ``infer`` touches it).

    ``rbc_diameter_px`` is the camera's calibration (``python -m device calibrate``): a red-cell diameter in
    frame pixels, read from the fields' texture scale. With it, every frame is rescaled to the training scale;
    without it (0), the lit field's bounding square is taken as the training field of view.
    """

    def __init__(self, bundle: Bundle, model: TFLiteModel, *, rbc_diameter_px: float = 0.0):
        check_model_matches(bundle, model.input_spec, model.output_spec.size, model.path)
        self.bundle, self.model = bundle, model
        self.side_px = side_px(bundle, rbc_diameter_px)

    @classmethod
    def open(cls, bundle: Bundle, *, num_threads: int = 4, use_edgetpu: bool = True,
             rbc_diameter_px: float = 0.0, pin_cores: bool = False) -> Classifier:
        model = TFLiteModel(bundle.model_path, num_threads=num_threads, edgetpu_path=bundle.edgetpu_path,
                            use_edgetpu=use_edgetpu, pin_cores=pin_cores)
        clf = cls(bundle, model, rbc_diameter_px=rbc_diameter_px)
        clf.features(np.full((bundle.input.size, bundle.input.size, 3), 200, np.uint8))  # warm-up
        return clf

    def features(self, rgb: np.ndarray) -> np.ndarray:
        return model_features(self.model, rgb)

    def prepare(self, frame: np.ndarray) -> Prepared:
        """The frame as the network will see it (and as the quality gate judges it): pure, thread-safe."""
        return prepare(frame, self.model.input_spec.size, side_px=self.side_px)

    def infer(self, prepared: Prepared) -> Timed:
        """Features (:func:`model_features`), head and decision rule: the only method touching the interpreter."""
        t1 = time.perf_counter()
        raw = model_output(self.model, prepared.rgb)
        feats = self.model.dequantize(raw)
        t2 = time.perf_counter()
        out = evaluate(self.bundle.head, feats)
        verdict = decide(self.bundle.head, out, self.bundle.benign, self.bundle.thresholds)
        t3 = time.perf_counter()
        return Timed(verdict, 0.0, (t2 - t1) * 1000, (t3 - t2) * 1000, standardise(self.bundle.head, feats), raw)

    def classify(self, frame: np.ndarray | Prepared) -> Timed:
        """Verdict for a frame, or for a frame already made ready by :meth:`prepare`."""
        t0 = time.perf_counter()
        prep = frame if isinstance(frame, Prepared) else self.prepare(frame)
        return replace(self.infer(prep), preprocess_ms=(time.perf_counter() - t0) * 1000)

    def screen(self, frame: np.ndarray) -> tuple[np.ndarray, Timed]:
        """``classify``, also returning the model's raw int8 output (the reference-image check compares it)."""
        t = self.classify(frame)
        assert t.output is not None
        return t.output, t
