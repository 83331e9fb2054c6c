"""Field classification: preprocessing -> int8 features -> numpy head -> verdict.

:func:`decide` is the pure decision rule; :class:`Classifier` binds a bundle
to a loaded model. Quality gating happens before (``device.quality``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from device.bundle import Bundle, Thresholds, check_model_matches
from device.head import Head, HeadOutput, evaluate
from device.inference import TFLiteModel
from device.preprocess import frame_to_rgb, quantize_input

log = logging.getLogger(__name__)

OK, RETAKE, REFER = "ok", "retake", "refer"


@dataclass(frozen=True)
class Verdict:
    status: str  # "ok" | "retake" | "refer"
    label: str | None  # class name when status == "ok"
    all: bool  # ALL detected (may be True with status "refer" when only the subtype is unsure)
    confidence: float  # calibrated probability of the reported label (or of the top class)
    scores: dict[str, float]  # calibrated probability per class
    reason: str  # why retake/refer; empty when ok
    distance: float  # to the training features (OOD figure)
    p_all: float  # summed probability of the ALL classes


def decide(head: Head, out: HeadOutput, benign: str, th: Thresholds) -> Verdict:
    """The decision rule, pure: OOD -> refer; ALL likely -> alert; confident -> label."""
    classes = head.classes
    scores = {c: float(p) for c, p in zip(classes, out.probs)}
    p_all = float(sum(p for c, p in scores.items() if c != benign))
    top = classes[out.index]
    if out.distance > head.ood_threshold:
        return Verdict(REFER, None, False, out.confidence, scores,
                       f"field unlike the training images (distance {out.distance:.2f} > {head.ood_threshold:.2f}); "
                       "check slide, stain and magnification, or send to a haematologist",
                       out.distance, p_all)
    if out.confidence >= th.confidence:
        return Verdict(OK, top, top != benign, out.confidence, scores, "", out.distance, p_all)
    if p_all >= th.all_probability:
        return Verdict(REFER, None, True, out.confidence, scores,
                       f"ALL likely (p={p_all:.2f}) but subtype uncertain (best {top} {out.confidence:.2f}); "
                       "send to a haematologist", out.distance, p_all)
    return Verdict(REFER, None, False, out.confidence, scores,
                   f"low confidence (best {top} {out.confidence:.2f} < {th.confidence:.2f}); "
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


class Classifier:
    """A bundle and its loaded model; ``classify`` takes any HxWx3 uint8 RGB frame."""

    def __init__(self, bundle: Bundle, model: TFLiteModel):
        check_model_matches(bundle, model.input_spec, model.output_spec.size, model.path)
        self.bundle, self.model = bundle, model

    @classmethod
    def open(cls, bundle: Bundle, *, num_threads: int = 4, use_edgetpu: bool = True) -> Classifier:
        model = TFLiteModel(bundle.model_path, num_threads=num_threads, edgetpu_path=bundle.edgetpu_path,
                            use_edgetpu=use_edgetpu)
        clf = cls(bundle, model)
        clf.features(np.full((bundle.input.size, bundle.input.size, 3), 200, np.uint8))  # warm-up
        return clf

    def features(self, rgb: np.ndarray) -> np.ndarray:
        return model_features(self.model, rgb)

    def classify(self, frame: np.ndarray) -> Timed:
        return self.screen(frame)[1]

    def screen(self, frame: np.ndarray) -> tuple[np.ndarray, Timed]:
        """``classify``, also returning the model's raw int8 output (the reference-image check compares it)."""
        t0 = time.perf_counter()
        rgb = frame_to_rgb(frame, self.model.input_spec.size)
        t1 = time.perf_counter()
        q = model_output(self.model, rgb)
        feats = self.model.dequantize(q)
        t2 = time.perf_counter()
        out = evaluate(self.bundle.head, feats)
        verdict = decide(self.bundle.head, out, self.bundle.benign, self.bundle.thresholds)
        t3 = time.perf_counter()
        return q, Timed(verdict, (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000)
