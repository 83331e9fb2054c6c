"""``python -m device <command>``: run, classify, check-config, selftest.

``main()`` returns the exit code: 0 success, 1 a failure (an image that
could not be decoded, a failed self-test, a model or storage error), 2 a
usage or configuration error. Errors are one line; ``--verbose`` adds the
traceback. Logs go to stderr in a journald-friendly form (syslog priority
prefixes, no timestamps, when run under systemd).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device import config as config_mod
from device.errors import ConfigError, ImageError, ScreenError
from device.reference import MAX_LSB, check_references

log = logging.getLogger("device")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<6>device.service: message``: journald reads the priority, and adds the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def setup_logging(verbose: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._leukoscreen = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for h in list(root.handlers):  # ours from an earlier main() call; leave other handlers (pytest's) alone
        if getattr(h, "_leukoscreen", False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("PIL", "waitress", "werkzeug", "gpiozero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "Task queue depth is N", once per queued request: a burst of page requests would flood the journal
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return handler


def _load_config(path: str | None) -> config_mod.Config:
    path = path or os.environ.get("LEUKOSCREEN_CONFIG") or None
    return config_mod.load(path)


# -- commands -------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from device import app

    return app.run(_load_config(args.config))


def _start_fault(args: argparse.Namespace, exc: BaseException) -> None:
    """``run`` could not start: the fault pattern on the LEDs before the non-zero exit (see ``device.app``)."""
    if getattr(args, "fn", None) is not cmd_run:
        return
    from device import app

    try:
        app.show_start_fault(args.config or os.environ.get("LEUKOSCREEN_CONFIG") or None, exc)
    except Exception as led_exc:  # never hide the original error
        log.warning("could not show the fault on the LEDs: %s", led_exc)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    res = config_mod.resolve(cfg)
    print(f"# {cfg.path or 'built-in defaults'}: OK")
    print(f"# on this machine: source {res.source}, GPIO {'mock' if res.mock_gpio else 'real'}, "
          f"model {res.model_dir}, state {res.state_dir}")
    print(config_mod.to_toml(cfg))
    return EXIT_OK


def _open_classifier(cfg: config_mod.Config) -> Any:
    from device.install import verify_bundle

    res = config_mod.resolve(cfg)
    return verify_bundle(res.model_dir, res.keys_dir, require_signature=cfg.model.require_signature,
                         threads=cfg.model.threads, use_edgetpu=cfg.model.use_edgetpu, references=False,
                         rbc_diameter_px=cfg.camera.rbc_diameter_px).classifier


def classify_one(clf: Any, path: Path, cfg: config_mod.Config) -> dict[str, Any]:
    """One image to the ``classify`` output record (status "error" when it cannot be decoded)."""
    from device.classifier import screen_field
    from device.preprocess import load_image

    out: dict[str, Any] = {"file": str(path)}
    try:
        frame = np.asarray(load_image(path), dtype=np.uint8)
    except ImageError as exc:
        return {**out, "status": "error", "label": None, "all": False, "confidence": 0.0, "scores": {},
                "reason": str(exc)}
    s = screen_field(clf, frame, cfg.quality)
    q, t = s.quality, s.timed
    if t is None:
        return {**out, "status": "retake", "label": None, "all": False, "confidence": 0.0, "scores": {},
                "reason": q.reason, "quality": q.figures()}
    v = t.verdict
    return {**out, "status": v.status, "label": v.label, "all": v.all, "confidence": round(v.confidence, 4),
            "scores": {k: round(p, 4) for k, p in v.scores.items()}, "reason": v.reason,
            "distance": round(v.distance, 3), "p_all": round(v.p_all, 4), "quality": q.figures(),
            "ms": round(t.preprocess_ms + t.invoke_ms + t.head_ms, 2)}


def cmd_classify(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    clf = _open_classifier(cfg)
    failed = 0
    for name in args.images:
        rec = classify_one(clf, Path(name), cfg)
        if rec["status"] == "error":
            failed += 1
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            what = rec["label"] or "-"
            conf = f" {rec['confidence']:.2f}" if rec["status"] in ("ok", "refer") else ""
            alert = "  ALL" if rec["all"] else ""
            why = f"  ({rec['reason']})" if rec["reason"] else ""
            print(f"{rec['file']}: {rec['status']} {what}{conf}{alert}{why}", flush=True)
    if failed:
        log.error("%d of %d image(s) could not be read", failed, len(args.images))
    return EXIT_FAIL if failed else EXIT_OK


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
    from device.sources import list_images
    from device.store import ResultStore

    cfg = _load_config(args.config)
    res = config_mod.resolve(cfg)
    if args.bundle:
        res = dataclasses.replace(res, model_dir=Path(args.bundle).resolve())
    problems: list[str] = []

    def check(name: str, fn: Any) -> Any:
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
        return f"{b.id}: every sha256 matches, {len(b.classes)} classes, input {b.input.size} px"
    check("bundle", verify_bundle)
    bundle = holder.get("bundle")
    if bundle is not None:
        def open_clf() -> str:
            holder["clf"] = Classifier.open(bundle, num_threads=cfg.model.threads, use_edgetpu=cfg.model.use_edgetpu)
            m = holder["clf"].model
            return f"{bundle.name} sha256 {bundle.model_sha256[:12]}…, {m.runtime}, {m.delegate}"
        check("model", open_clf)
    clf = holder.get("clf")
    if clf is not None:
        def references() -> str:
            if bundle.references is None:
                return "no reference images in this bundle (built before they were added); margin not measured"
            result = check_references(bundle, clf, max_lsb=args.max_lsb)
            if not result.ok:
                raise ValueError(f"{result.summary}; this machine's int8 arithmetic differs from the build "
                                 f"machine's ({result.made_on}) more than the bundle was checked for: do not screen "
                                 "with it, report the runtime version (see README, Fresh-machine check)")
            return result.summary
        check("references", references)

        samples_dir = Path(args.samples) if args.samples else config_mod.PACKAGE_DIR / "samples"

        def samples() -> str:
            paths = list_images(samples_dir)
            if not paths:
                raise ValueError(f"no sample images in {samples_dir}")
            right = labelled = 0
            for p in paths:
                rec = classify_one(clf, p, cfg)
                want = sample_label(p, clf.bundle.classes)
                if rec["status"] in ("error", "retake"):
                    raise ValueError(f"{p.name}: {rec['status']}: {rec['reason']}")
                if want is not None:
                    labelled += 1
                    right += int(rec["label"] == want)
                print(f"       {p.name}: {rec['status']} {rec['label'] or '-'} {rec['confidence']:.2f}"
                      f"{'' if want is None or rec['label'] == want else '  (expected ' + want + ')'}", flush=True)
            acc = right / labelled if labelled else 1.0
            if acc < args.min_accuracy:
                raise ValueError(f"only {right} of {labelled} samples labelled correctly "
                                 f"(< {args.min_accuracy:.0%}); the model or camera path is broken")
            return f"{len(paths)} images, {right} of {labelled} labelled as expected"
        check("samples", samples)

    def storage() -> str:
        store = ResultStore(res.state_dir, save_images=False)
        try:
            result = store.integrity_check()
            if result != "ok":
                raise ValueError(f"{store.path}: integrity_check says {result}")
            fd, tmp = tempfile.mkstemp(dir=res.state_dir, prefix=".selftest-")
            os.close(fd)
            os.unlink(tmp)
            return f"{store.path} ok, {store.stats().fields} records"
        finally:
            store.close()
    check("storage", storage)

    def leds() -> str:
        from device.app import make_leds
        from device.leds import make_pin_factory

        drv = make_leds(cfg, make_pin_factory(res.mock_gpio))
        try:
            drv.lamp_test(0.05 if res.mock_gpio else 0.4)
        finally:
            drv.close()
        return "mock GPIO (no lights off the Pi)" if res.mock_gpio else "watch: green, amber, red, buzzer"
    check("leds", leds)

    def camera() -> str:
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
    check("camera", camera)

    print("selftest " + ("PASSED" if not problems else f"FAILED: {', '.join(problems)}"), flush=True)
    return EXIT_OK if not problems else EXIT_FAIL


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure the field scale (median red-cell diameter) from image files or the configured camera."""
    from device.bundle import load_bundle, side_px
    from device.calibrate import calibrate, write_to_config
    from device.preprocess import load_image

    cfg = _load_config(args.config)
    res = config_mod.resolve(cfg)
    if args.images:
        frames = [np.asarray(load_image(p)) for p in args.images]
    else:
        from device.app import configured_source

        factory, kind = configured_source(res)
        src = factory()
        try:
            frames = [src.read().array for _ in range(args.frames)]
        finally:
            src.close()
    cal = calibrate(frames)
    bundle = load_bundle(res.model_dir)
    side = side_px(bundle, cal.rbc_diameter_px)
    print(f"median red-cell diameter {cal.rbc_diameter_px:.1f} px over {cal.fields} of {len(frames)} fields "
          f"(training images: {bundle.rbc_diameter_px:.1f} px in a {bundle.field_px:.0f} px field): each field will be "
          f"a {side:.0f} px square of the frame, resized to {bundle.input.size} px", flush=True)
    if args.write:
        if not cfg.path:
            raise ConfigError("--write needs --config FILE (the file to update); or add "
                              f"'rbc_diameter_px = {cal.rbc_diameter_px:.2f}' under [camera] yourself")
        write_to_config(Path(cfg.path), cal.rbc_diameter_px)
        _load_config(str(cfg.path))  # the file must still be valid
        print(f"wrote [camera] rbc_diameter_px = {cal.rbc_diameter_px:.2f} to {cfg.path}; restart the service",
              flush=True)


def _switch_command(args: argparse.Namespace, action: str) -> int:
    from device import install

    cfg = _load_config(args.config)
    res = config_mod.resolve(cfg)
    verify = install.Verifier(res.keys_dir, threads=cfg.model.threads, use_edgetpu=cfg.model.use_edgetpu)

    def say(msg: str) -> None:
        print(msg, flush=True)

    if action == "install":
        done = install.install_bundle(Path(args.path), res.bundles_dir, res.factory_dir, verify, progress=say)
    else:
        done = install.rollback(res.bundles_dir, res.factory_dir, verify, progress=say)
    for line in done.checks:
        say(f"ok   {line}")
    say(f"active:   {done.active}  ({done.active_dir})")
    say(f"previous: {done.previous or '-'}  (`python -m device rollback` returns to it)")
    say("service: " + ("not restarted (--no-restart)" if args.no_restart else install.restart_service()))
    return EXIT_OK


def cmd_install_bundle(args: argparse.Namespace) -> int:
    return _switch_command(args, "install")


def cmd_rollback(args: argparse.Namespace) -> int:
    return _switch_command(args, "rollback")


def cmd_bundles(args: argparse.Namespace) -> int:
    from device.install import installed

    res = config_mod.resolve(_load_config(args.config))
    st = installed(res.bundles_dir, res.factory_dir)
    print(f"active:   {st.active}  ({st.active_dir}{', factory bundle' if st.factory else ''})")
    print(f"previous: {st.previous or '-'}" + (f"  ({st.previous_dir})" if st.previous_dir else ""))
    print(f"trusted keys: {res.keys_dir}")
    return EXIT_OK


# -- entry ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device", description="LeukoScreen: offline ALL screening appliance")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", metavar="FILE",
                        help="TOML config (default: $LEUKOSCREEN_CONFIG, else built-in defaults)")
        sp.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    with_config(sub.add_parser("run", help="run the appliance (camera loop, LEDs, web page)")).set_defaults(
        fn=cmd_run)
    c = with_config(sub.add_parser("classify", help="classify image files once"))
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    c.set_defaults(fn=cmd_classify)
    with_config(sub.add_parser("check-config", help="validate a config and print the effective values")).set_defaults(
        fn=cmd_check_config)
    s = with_config(sub.add_parser("selftest", help="verify bundle, samples, storage, LEDs and camera"))
    s.add_argument("--samples", metavar="DIR", help="labelled sample images (default: device/samples)")
    s.add_argument("--bundle", metavar="DIR", help="check this bundle folder instead of the configured one")
    s.add_argument("--min-accuracy", type=float, default=0.5,
                   help="fail if fewer samples than this share are labelled as their name says (default 0.5)")
    s.add_argument("--max-lsb", type=int, default=MAX_LSB, metavar="N",
                   help="fail if a reference image's int8 features differ from the build machine's by more than N "
                        "(default %(default)s: the largest perturbation the bundle's REPORT.md measures)")
    s.set_defaults(fn=cmd_selftest)
    cal = with_config(sub.add_parser("calibrate", help="measure the field scale (median red-cell diameter)"))
    cal.add_argument("images", nargs="*", metavar="IMAGE", help="fields to measure (default: read the camera)")
    cal.add_argument("--frames", type=int, default=12, help="camera frames to measure (default 12)")
    cal.add_argument("--write", action="store_true", help="write the result into the --config file")
    cal.set_defaults(fn=cmd_calibrate)
    i = with_config(sub.add_parser("install-bundle", help="verify a signed bundle (e.g. on a USB stick), install "
                                                          "it, switch to it, keep the current one for rollback"))
    i.add_argument("path", metavar="PATH", help="the bundle folder (holding manifest.json and manifest.sig)")
    i.add_argument("--no-restart", action="store_true", help="do not restart the systemd service afterwards")
    i.set_defaults(fn=cmd_install_bundle)
    r = with_config(sub.add_parser("rollback", help="return to the bundle that was active before the last install"))
    r.add_argument("--no-restart", action="store_true", help="do not restart the systemd service afterwards")
    r.set_defaults(fn=cmd_rollback)
    with_config(sub.add_parser("bundles", help="show the active and previous bundle")).set_defaults(fn=cmd_bundles)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    handler = setup_logging(args.verbose)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        log.error("%s", exc, exc_info=args.verbose)
        _start_fault(args, exc)
        return EXIT_USAGE
    except ScreenError as exc:
        log.error("%s", exc, exc_info=args.verbose)
        _start_fault(args, exc)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.error("unexpected %s: %s%s", type(exc).__name__, exc, "" if args.verbose else " (--verbose for details)",
                  exc_info=args.verbose)
        _start_fault(args, exc)
        return EXIT_FAIL
    finally:  # main() may be called again in the same process (tests, tools): leave logging as we found it
        handler.flush()
        logging.getLogger().removeHandler(handler)
