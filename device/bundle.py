"""The model bundle: ``models/manifest.json`` and the files it names.

The manifest is the contract between ``convert/`` (which writes it) and the
device (which refuses to start on any disagreement, naming the file, the
field and both values).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from device.errors import BundleError, BundleMissingError
from device.head import Head, load_head
from device.preprocess import InputSpec
from device.reference import References, read_references

log = logging.getLogger(__name__)

#: 2: out-of-distribution method in the head, benign threshold, field scale (RBC diameter) in the input.
SCHEMA = 2
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Thresholds:
    """The decision thresholds, chosen by the toolchain on the validation split (see REPORT.md)."""

    confidence: float  # an ALL subtype below this is referred
    all_probability: float  # P(ALL) above this raises the ALL alert even if the subtype is unsure
    benign_confidence: float  # "Benign" needs this much: a missed ALL costs more than a referral


@dataclass(frozen=True)
class SlideModel:
    field_false_alert: float  # P(ALL evidence | benign field), measured on held-out images (upper bound)
    field_sensitivity: float  # P(ALL evidence | blast field) (lower bound)
    duplicate_similarity: float  # fingerprints at least this similar are the same field
    field_false_alert_low: float | None = None  # lower bound; absent from bundles made before it was measured


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """A verified bundle: every file the manifest names checked against its sha256 and against each other.

    Made only by :func:`load_bundle`; keyword-only, as no field of so many has a natural position.
    """

    root: Path
    name: str
    classes: tuple[str, ...]
    benign: str
    input: InputSpec
    n_features: int
    model_path: Path
    model_sha256: str
    edgetpu_path: Path | None  # compiled by edgetpu_compiler: used only with the Edge TPU delegate
    head: Head
    thresholds: Thresholds
    #: The training field of view: its side and the median red-cell diameter in it, in source pixels.
    #: A calibrated camera (``[camera] rbc_diameter_px``) takes ``field_px * camera_d / rbc_diameter_px``.
    field_px: float
    rbc_diameter_px: float
    #: Per-field rates for the slide rule and the near-duplicate similarity (``manifest.json`` ``slide``).
    slide: SlideModel
    manifest: dict = field(repr=False, compare=False)
    # The uncompiled Edge-TPU-friendly graph (LeakyReLU rewritten; same calibration images as ``model_path``):
    # the input of ``edgetpu_compiler``. Never run on the CPU, where the rewrite costs ~4x the whole invoke.
    edgetpu_friendly_path: Path | None = None
    references: References | None = field(default=None, repr=False, compare=False)  # None in older bundles

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the manifest's canonical bytes: what a signature covers, and so the whole bundle."""
        return manifest_digest(self.manifest)

    @functools.cached_property
    def id(self) -> str:
        """``<name>-<sha8>``: names the bundle in every stored result, the CSV, the report and the install folder."""
        return bundle_id(self.manifest, self.name)


def canonical_manifest(doc: dict) -> bytes:
    """The manifest as signed: sorted keys, no whitespace, UTF-8. Re-indenting the file does not change it."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_digest(doc: dict) -> str:
    return hashlib.sha256(canonical_manifest(doc)).hexdigest()


def bundle_id(doc: dict, fallback_name: str = "bundle") -> str:
    name = str(doc.get("name") or fallback_name)
    return f"{name}-{manifest_digest(doc)[:8]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _get(doc: dict, dotted: str, where: Path):
    cur = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise BundleError(f"{where}: field '{dotted}' is missing; rebuild the bundle with `make convert`")
        cur = cur[part]
    return cur


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)


def _verified(root: Path, entry: dict, key: str, where: Path) -> Path:
    """The file ``entry`` names, after checking its sha256; ``key`` is the entry's place in the manifest."""
    path = root / entry["path"]
    if not path.is_file():
        raise BundleMissingError(f"{path}: named by {where} ({key}) but missing; "
                                 "restore the models/ folder or rebuild it with `make convert`")
    got = sha256_file(path)
    if got != entry["sha256"]:
        raise BundleError(f"{path}: sha256 is {got[:16]}..., {where} ({key}.sha256) says "
                          f"{entry['sha256'][:16]}...; the file is corrupt or from another build: "
                          "restore it or rebuild with `make convert`")
    return path


def _references(root: Path, doc: dict, n_classes: int, where: Path) -> References | None:
    """The optional ``references`` section: every image and the expected values, sha256-verified."""
    sec = doc.get("references")
    if sec is None:
        return None
    try:
        images = [_verified(root, e, f"references.images[{i}]", where) for i, e in enumerate(sec["images"])]
        expected = _verified(root, sec["expected"], "references.expected", where)
        made_on = str(sec.get("made_on", "unknown"))
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{where}: section 'references' lacks {exc}; rebuild it with "
                          "`python -m convert references`") from exc
    return read_references(root, images, expected, n_classes=n_classes, made_on=made_on, where=where)


def read_manifest(root: str | Path) -> dict:
    """``manifest.json`` parsed (nothing checked yet)."""
    where = Path(root) / MANIFEST
    if not where.is_file():
        raise BundleMissingError(f"{where}: no manifest; build a bundle with `make convert` or point "
                                 "[model] dir in the config at one")
    try:
        doc = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc}); restore it or rebuild with `make convert`") from exc
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: not a JSON object; restore it or rebuild with `make convert`")
    return doc


def load_bundle(root: str | Path) -> Bundle:
    """Read and verify a bundle. Every mismatch is a :class:`BundleError` naming file, field and values."""
    root = Path(root)
    where = root / MANIFEST
    doc = read_manifest(root)
    if _get(doc, "schema", where) != SCHEMA:
        raise BundleError(f"{where}: schema is {doc['schema']!r}, this device reads schema {SCHEMA}; "
                          "update the device software or rebuild the bundle")
    files = _get(doc, "files", where)
    model = _verified(root, _get(doc, "files.model", where), "files.model", where)
    edgetpu, friendly = (_verified(root, files[key], f"files.{key}", where) if key in files else None
                         for key in ("edgetpu_model", "model_edgetpu_friendly"))
    head_path = _verified(root, _get(doc, "files.head", where), "files.head", where)
    head = load_head(head_path)
    classes = tuple(_get(doc, "classes", where))
    if head.classes != classes:
        raise BundleError(f"{head_path}: head classes {list(head.classes)} differ from {where} "
                          f"classes {list(classes)}")
    n_features = int(_get(doc, "output.features", where))
    if head.n_features != n_features:
        raise BundleError(f"{head_path}: head expects {head.n_features} features, {where} "
                          f"(output.features) says the model gives {n_features}")
    k = int(_get(doc, "head.k", where))
    if head.k != k:
        raise BundleError(f"{head_path}: head selects {head.k} features, {where} (head.k) says {k}")
    benign = _get(doc, "benign_class", where)
    if benign not in classes:
        raise BundleError(f"{where}: benign_class {benign!r} is not one of classes {list(classes)}")
    inp = _get(doc, "input", where)
    spec = InputSpec(size=int(inp["size"]), scale=float(inp["scale"]), zero_point=int(inp["zero_point"]),
                     dtype=str(inp["dtype"]))
    return Bundle(root=root, name=str(doc.get("name", root.name)), classes=classes, benign=benign, input=spec,
                  n_features=n_features, model_path=model, model_sha256=files["model"]["sha256"],
                  edgetpu_path=edgetpu, head=head,
                  thresholds=Thresholds(float(_get(doc, "thresholds.confidence", where)),
                                        float(_get(doc, "thresholds.all_probability", where)),
                                        float(_get(doc, "thresholds.benign_confidence", where))),
                  field_px=float(_get(doc, "input.field_px", where)),
                  rbc_diameter_px=float(_get(doc, "input.rbc_diameter_px", where)),
                  slide=SlideModel(float(_get(doc, "slide.field_false_alert", where)),
                                   float(_get(doc, "slide.field_sensitivity", where)),
                                   float(_get(doc, "slide.duplicate_similarity", where)),
                                   _optional_float(doc.get("slide", {}).get("field_false_alert_low"))), manifest=doc,
                  edgetpu_friendly_path=friendly,
                  references=_references(root, doc, len(classes), where))


def side_px(bundle: Bundle, camera_rbc_diameter_px: float) -> float | None:
    """Side of the square a calibrated camera takes so cells appear at the training scale (None: uncalibrated)."""
    if camera_rbc_diameter_px <= 0:
        return None
    return bundle.field_px * camera_rbc_diameter_px / bundle.rbc_diameter_px


def check_model_matches(bundle: Bundle, input_spec: InputSpec, n_out: int, where: Path) -> None:
    """The loaded interpreter must be the model the manifest describes."""
    m = bundle.root / MANIFEST
    pairs = [("input.size", bundle.input.size, input_spec.size), ("input.dtype", bundle.input.dtype, input_spec.dtype),
             ("input.scale", bundle.input.scale, input_spec.scale),
             ("input.zero_point", bundle.input.zero_point, input_spec.zero_point),
             ("output.features", bundle.n_features, n_out)]
    for fieldname, said, got in pairs:
        if (abs(said - got) > 1e-9 * max(1.0, abs(said))) if isinstance(said, float) else said != got:
            raise BundleError(f"{where}: model has {fieldname} = {got}, {m} says {said}; "
                              "the manifest and model come from different builds: rebuild with `make convert`")
