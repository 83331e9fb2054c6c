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
from dataclasses import fields
from pathlib import Path

from device.errors import ScreenError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "all-aria"
ORDER = ("split", "train", "export", "quantize", "features", "head", "bundle")


def _train_cfg(a):
    from convert.train import TrainConfig

    return TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})


def _options(a):
    from convert.steps import Options

    return Options(data=a.data.resolve(), work=a.work.resolve(), models=a.models.resolve(),
                   test_fraction=a.test_fraction, val_fraction=a.val_fraction, block=a.block,
                   seed=a.seed, calib=a.calib, edgetpu_friendly=not a.keep_leakyrelu, criterion=a.criterion,
                   folds=a.folds, force=a.force)


def run(step: str, a) -> None:
    from convert import steps
    from convert.bundle import add_references, held_out_candidates, write_bundle

    o = _options(a)
    todo = ORDER if step == "all" else (step,)
    for s in todo:
        if s == "train":
            steps.train(o, _train_cfg(a))
        elif s == "bundle":
            write_bundle(o)
        elif s == "evaluate":
            from convert.scorecard import print_summary

            print_summary(o, a.shifts)
        elif s == "references":
            add_references(o.models, held_out_candidates(o))
        elif s == "sign":
            sign(a)
        elif s == "import-onnx":
            from convert.onnx_import import import_onnx

            if a.target is None:
                raise SystemExit("python -m convert import-onnx FILE.onnx: name the ONNX file")
            import_onnx(o, Path(a.target), classes=a.classes.split(",") if a.classes else None)
        elif s == "edgetpu":
            out = steps.edgetpu(o)
            print(f"Edge TPU model: {out}" if out else "edgetpu_compiler is not installed; see the message above")
        else:
            getattr(steps, s)(o)


def sign(a) -> None:
    """``python -m convert sign [BUNDLE]``: sign the manifest (run after every ``bundle`` step)."""
    from device.signing import new_private_key, public_key_path, sign_bundle

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
    from convert.train import TrainConfig
    from device.signing import DEFAULT_PRIVATE_KEY

    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=(*ORDER, "edgetpu", "evaluate", "references", "all", "sign", "import-onnx"))
    p.add_argument("target", nargs="?", help="sign: the bundle folder (default --models); "
                                              "import-onnx: the ONNX file of a DarkNet19 trained elsewhere")
    p.add_argument("--shifts", action="store_true", help="evaluate: also print the shift suite's table")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="class-per-folder image set (default %(default)s)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "convert", help="intermediate files")
    p.add_argument("--models", type=Path, default=ROOT / "models", help="bundle output folder")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="newest acquisition numbers of each class held out as the new-patient test split")
    p.add_argument("--val-fraction", type=float, default=0.15, help="validation split (every choice is made on it)")
    p.add_argument("--block", type=int, default=36,
                   help="consecutive acquisition numbers kept together (about one patient)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", type=int, default=256, help="calibration images for int8 (>= 200 for a real model)")
    p.add_argument("--keep-leakyrelu", action="store_true",
                   help="make only the CPU graph (native LEAKY_RELU), no Edge-TPU-friendly second graph")
    p.add_argument("--criterion", choices=("MIQ", "MID"), default="MIQ", help="mRMR criterion")
    p.add_argument("--folds", type=int, default=10, help="CV folds for the report's Table 2")
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
