"""``python -m device selftest``: bundle, signature, reference images, samples, storage, LEDs and camera,
each reported as ``ok`` or ``FAIL`` with what was found; the samples go through the field pipeline."""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from device import config as config_mod
from device.commands import EXIT_FAIL, EXIT_OK, load_config
from device.errors import ScreenError
from device.status import Status

log = logging.getLogger(__name__)


def sample_label(path: Path, classes: Sequence[str]) -> str | None:
    """The class a sample's name gives (``<class, spaces as ->__<original name>``), or None."""
    if "__" not in path.name:
        return None
    prefix = path.name.split("__", 1)[0].lower()
    return next((c for c in classes if c.replace(" ", "-").lower() == prefix), None)


def cmd_selftest(args: argparse.Namespace) -> int:
    from device.bundle import load_bundle
    from device.classifier import Classifier
    from device.signing import verify_signature

    cfg = load_config(args.config)
    res = config_mod.resolve(cfg)
    if args.bundle:
        res = dataclasses.replace(res, model_dir=Path(args.bundle).resolve())
    problems: list[str] = []

    def check(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            detail = fn()
        except (ScreenError, OSError, RuntimeError, ValueError, ImportError) as exc:
            print(f"FAIL {name}: {exc}", flush=True)
            problems.append(name)
            if args.verbose:
                log.exception(name)
            return None
        print(f"ok   {name}: {detail} ({(time.perf_counter() - t0) * 1000:.0f} ms)", flush=True)
        return detail

    print(f"# config {cfg.path or 'built-in defaults'}; model {res.model_dir}", flush=True)
    holder: dict[str, Any] = {}

    def signature() -> str:
        try:
            return verify_signature(res.model_dir, res.keys_dir).describe() + f" (trusted keys in {res.keys_dir})"
        except ScreenError as exc:
            if cfg.model.require_signature:
                raise
            return f"NOT verified, allowed by require_signature = false: {exc}"
    check("signature", signature)

    def verify_bundle() -> str:
        b = holder["bundle"] = load_bundle(res.model_dir)
        return (f"{b.id}: every sha256 matches, {len(b.classes)} classes, input {b.input.size} px; head: k = "
                f"{b.head.k}, out-of-distribution {b.head.ood_method}, network check "
                f"{'on' if b.head.network_coef is not None else 'off (a bundle from before 2026-12-08)'}")
    check("bundle", verify_bundle)
    bundle = holder.get("bundle")
    if bundle is not None:
        def open_clf() -> str:
            holder["clf"] = Classifier.open(bundle, num_threads=cfg.model.threads,
                                            use_edgetpu=cfg.model.use_edgetpu)
            m = holder["clf"].model
            return f"{bundle.name} sha256 {bundle.model_sha256[:12]}…, {m.runtime}, {m.delegate}"
        check("model", open_clf)
    clf = holder.get("clf")
    if clf is not None:
        check("references", lambda: _references(clf, args.max_lsb))
        samples_dir = Path(args.samples) if args.samples else config_mod.PACKAGE_DIR / "samples"
        check("samples", lambda: _samples(clf, samples_dir, cfg, args.min_accuracy))
    check("storage", lambda: _storage(res.state_dir))
    check("leds", lambda: _leds(cfg, res.mock_gpio))
    check("camera", lambda: _camera(res, cfg))
    print("selftest " + ("PASSED" if not problems else f"FAILED: {', '.join(problems)}"), flush=True)
    return EXIT_OK if not problems else EXIT_FAIL


def _references(clf: Any, max_lsb: int) -> str:
    from device.reference import check_references

    bundle = clf.bundle
    if bundle.references is None:
        return "no reference images in this bundle (built before they were added); margin not measured"
    result = check_references(bundle, clf, max_lsb=max_lsb)
    if not result.ok:
        raise ValueError(f"{result.summary}; this machine's int8 arithmetic differs from the build "
                         f"machine's ({result.made_on}) more than the bundle was checked for: do not screen "
                         "with it, report the runtime version (see README, Fresh-machine check)")
    return result.summary


def _samples(clf: Any, samples_dir: Path, cfg: config_mod.Config, min_accuracy: float) -> str:
    from device.commands.classify import ERROR, classify_file
    from device.sources import list_images

    paths = list_images(samples_dir)
    if not paths:
        raise ValueError(f"no sample images in {samples_dir}")
    right = labelled = 0
    for p in paths:
        rec = classify_file(clf, p, cfg.quality).to_json()
        want = sample_label(p, clf.bundle.classes)
        if rec["status"] in (ERROR, Status.RETAKE):
            raise ValueError(f"{p.name}: {rec['status']}: {rec['reason']}")
        if want is not None:
            labelled += 1
            right += int(rec["label"] == want)
        print(f"       {p.name}: {rec['status']} {rec['label'] or '-'} {rec['confidence']:.2f}"
              f"{'' if want is None or rec['label'] == want else '  (expected ' + want + ')'}", flush=True)
    acc = right / labelled if labelled else 1.0
    if acc < min_accuracy:
        raise ValueError(f"only {right} of {labelled} samples labelled correctly "
                         f"(< {min_accuracy:.0%}); the model or camera path is broken")
    return f"{len(paths)} images, {right} of {labelled} labelled as expected"


def _storage(state_dir: Path) -> str:
    from device.sources import synthetic_field
    from device.store import ResultStore
    from device.store.images import encode_jpeg, jpeg_encoder

    store = ResultStore(state_dir, save_images=False)
    try:
        result = store.integrity_check()
        if result != "ok":
            raise ValueError(f"{store.path}: integrity_check says {result}")
        fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".selftest-")
        os.close(fd)
        os.unlink(tmp)
        frame = synthetic_field(0, (320, 240))
        with Image.open(io.BytesIO(encode_jpeg(frame))) as img:  # what the recorder does with every frame
            if img.format != "JPEG" or img.size != (320, 240):
                raise ValueError(f"a 320x240 frame came back from the JPEG encoder as {img.format} {img.size}")
        return f"{store.path} ok, {store.stats().fields} records; frame JPEGs by {jpeg_encoder()}"
    finally:
        store.close()


def _leds(cfg: config_mod.Config, mock: bool) -> str:
    from device.app import make_leds
    from device.leds import make_pin_factory

    drv = make_leds(cfg, make_pin_factory(mock))
    try:
        drv.lamp_test(0.05 if mock else 0.4)
    finally:
        drv.close()
    return "mock GPIO (no lights off the Pi)" if mock else "watch: green, amber, red, buzzer"


def _camera(res: config_mod.Resolved, cfg: config_mod.Config) -> str:
    from device.app import configured_source
    from device.quality import assess

    factory, kind = configured_source(res)
    src = factory()
    try:
        frame = src.read()
    finally:
        src.close()
    q = assess(frame.array, cfg.quality)
    h, w = frame.array.shape[:2]
    return f"{kind} {w}x{h}, quality {'ok' if q.ok else q.reason}"
