"""Command line of the host toolchain: ``python -m convert <step>``.

Steps, in order: split, train, export, quantize, [edgetpu], features, head,
bundle. ``all`` runs them in order, skipping any whose outputs are current.
``evaluate [--shifts]`` prints the new-patient test results (and the shift suite) of the work folder.
``references`` re-makes only the bundle's reference images (``bundle`` makes
them too) from the held-out split in the work folder.

``sign [BUNDLE]`` signs a bundle's manifest (Ed25519; ``--new-key`` makes a key
pair): run it after every ``bundle`` step, since re-bundling makes the old
signature stale. ``import-onnx FILE.onnx`` brings a DarkNet19 trained elsewhere
(MATLAB's ``exportONNXNetwork`` layout) into the chain: quantize, features,
head, bundle.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from convert import steps
from convert.bundle import add_references, held_out_candidates, write_bundle
from convert.onnx_import import import_onnx
from convert.options import Options
from convert.scorecard import print_summary
from convert.train import TrainConfig
from device.errors import ScreenError
from device.signing import DEFAULT_PRIVATE_KEY, new_private_key, public_key_path, sign_bundle

log = logging.getLogger(__name__)

#: A command: the options and the parsed arguments in, whatever it makes out.
Command = Callable[[Options, argparse.Namespace], object]


def train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})


def _percentile(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = float("nan")
    if not 50.0 < p < 100.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentile between 50 and 100 (exclusive), "
                                         "e.g. 99.9995")
    return p


def options_from(a: argparse.Namespace) -> Options:
    return Options(data=a.data.resolve(), work=a.work.resolve(), models=a.models.resolve(),
                   test_fraction=a.test_fraction, val_fraction=a.val_fraction, block=a.block,
                   seed=a.seed, calib=a.calib, range_percentile=a.range_percentile,
                   edgetpu_friendly=not a.keep_leakyrelu, criterion=a.criterion, folds=a.folds, force=a.force)


#: The chain, in order: ``all`` runs these, each skipping itself when its outputs are current.
CHAIN: dict[str, Command] = {
    "split": lambda o, a: steps.split(o),
    "train": lambda o, a: steps.train(o, train_config(a)),
    "export": lambda o, a: steps.export(o),
    "quantize": lambda o, a: steps.quantize(o),
    "features": lambda o, a: steps.features(o),
    "head": lambda o, a: steps.head(o),
    "bundle": lambda o, a: write_bundle(o),
}


def run_chain(o: Options, a: argparse.Namespace) -> None:
    for step in CHAIN.values():
        step(o, a)


def edgetpu(o: Options, a: argparse.Namespace) -> None:
    out = steps.edgetpu(o)
    print(f"Edge TPU model: {out}" if out else "edgetpu_compiler is not installed; see the message above")


def import_onnx_command(o: Options, a: argparse.Namespace) -> Path:
    if a.target is None:
        raise SystemExit("python -m convert import-onnx FILE.onnx: name the ONNX file")
    return import_onnx(o, Path(a.target), classes=a.classes.split(",") if a.classes else None)


#: Every command of ``python -m convert``, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {
    **CHAIN,
    "edgetpu": edgetpu,
    "evaluate": lambda o, a: print_summary(o, a.shifts),
    "references": lambda o, a: add_references(o.models, held_out_candidates(o)),
    "all": run_chain,
    "sign": lambda o, a: sign(a),
    "import-onnx": import_onnx_command,
}


def run(command: str, a: argparse.Namespace) -> None:
    COMMANDS[command](options_from(a), a)


def sign(a: argparse.Namespace) -> None:
    """``python -m convert sign [BUNDLE]``: sign the manifest (run after every ``bundle`` step)."""
    key = Path(a.key).expanduser()
    if a.new_key:
        pub = new_private_key(key)
        print(f"new signing key {key} (keep it secret, back it up offline); public key {pub}: copy it into "
              "device/config/keys/ (the checkout) and /etc/leukoscreen/keys/ (each box)")
        if a.target is None:
            return
    bundle = Path(a.target) if a.target else a.models
    signed = sign_bundle(bundle, key)
    print(f"signed {bundle}/manifest.json (sha256 {signed.manifest_sha256[:16]}...) with key {signed.key_id} "
          f"({public_key_path(key)}) -> {bundle}/manifest.sig")


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=tuple(COMMANDS))
    p.add_argument("target", nargs="?", help="sign: the bundle folder (default --models); "
                                              "import-onnx: the ONNX file of a DarkNet19 trained elsewhere")
    p.add_argument("--shifts", action="store_true", help="evaluate: also print the shift suite's table")
    p.add_argument("--data", type=Path, default=d.data, help="class-per-folder image set (default %(default)s)")
    p.add_argument("--work", type=Path, default=d.work, help="intermediate files")
    p.add_argument("--models", type=Path, default=d.models, help="bundle output folder")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="newest acquisition numbers of each class held out as the new-patient test split")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="validation split (every choice is made on it)")
    p.add_argument("--block", type=int, default=d.block,
                   help="consecutive acquisition numbers kept together (about one patient)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--calib", type=int, default=d.calib, help="calibration images for int8 (>= 200 for a real model)")
    p.add_argument("--range-percentile", type=_percentile, default=d.range_percentile, metavar="P",
                   help="int8 activation ranges at the P-th percentile of the calibration activations (e.g. "
                        "99.9995) instead of their min/max; measured and not adopted, see README")
    p.add_argument("--keep-leakyrelu", action="store_true",
                   help="make only the CPU graph (native LEAKY_RELU), no Edge-TPU-friendly second graph")
    p.add_argument("--criterion", choices=("MIQ", "MID"), default=d.criterion, help="mRMR criterion")
    p.add_argument("--folds", type=int, default=d.folds, help="CV folds for the report's Table 2")
    p.add_argument("--force", action="store_true", help="re-run steps even when current")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    g = p.add_argument_group("sign")
    g.add_argument("--key", default=str(DEFAULT_PRIVATE_KEY), help="Ed25519 private key (PEM) (default %(default)s)")
    g.add_argument("--new-key", action="store_true", help="generate the key pair at --key first")
    g = p.add_argument_group("import-onnx")
    g.add_argument("--classes", help="the ONNX network's class order, comma-separated (default: its metadata "
                                     "'classes', else the split's order)")
    g = p.add_argument_group("training (paper Table 1)")
    for f in fields(TrainConfig):
        if f.name == "seed":  # shared with the split's --seed
            continue
        g.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"(default {f.default})")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("matplotlib", "PIL", "h5py", "tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run(a.step, a)
    except ScreenError as exc:
        if a.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
