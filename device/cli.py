"""``python -m device <command>``: the parser, logging and ``run``; the other commands are ``device.commands``.

``main()`` returns the exit code: 0 success, 1 a failure (an image that
could not be decoded, a failed self-test, a model or storage error), 2 a
usage or configuration error. Errors are one line; ``--verbose`` adds the
traceback. Logs go to stderr in a journald-friendly form (syslog priority
prefixes, no timestamps, when run under systemd).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from device import config as config_mod
from device.commands import EXIT_FAIL, EXIT_OK, EXIT_USAGE, config_path, load_config
from device.commands.bundles import cmd_bundles, cmd_install_bundle, cmd_rollback
from device.commands.calibrate import cmd_calibrate
from device.commands.classify import cmd_classify
from device.commands.selftest import cmd_selftest
from device.errors import ConfigError, ScreenError
from device.reference import MAX_LSB

log = logging.getLogger("device")
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


# -- commands -------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from device import app

    return app.run(load_config(args.config))


def _start_fault(args: argparse.Namespace, exc: BaseException) -> None:
    """``run`` could not start: the fault pattern on the LEDs before the non-zero exit (see ``device.app``)."""
    if getattr(args, "fn", None) is not cmd_run:
        return
    from device import app

    try:
        app.show_start_fault(config_path(args.config), exc)
    except Exception as led_exc:  # never hide the original error
        log.warning("could not show the fault on the LEDs: %s", led_exc)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    res = config_mod.resolve(cfg)
    print(f"# {cfg.path or 'built-in defaults'}: OK")
    print(f"# on this machine: source {res.source}, GPIO {'mock' if res.mock_gpio else 'real'}, "
          f"model {res.model_dir}, state {res.state_dir}")
    print(config_mod.to_toml(cfg))
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
    cal = with_config(sub.add_parser("calibrate",
                                     help="measure the field scale (a red-cell diameter, from the fields' texture)"))
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
