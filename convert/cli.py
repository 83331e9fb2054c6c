"""Command line of the host toolchain."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

from device.errors import ScreenError

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "all-aria"
DEFAULT_WORK = Path("build/convert")
DEFAULT_MODELS = Path("models")


def _train_args(p: argparse.ArgumentParser) -> None:
    from convert.train import TrainConfig

    for f in fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"(default {f.default})")


def cmd_split(a) -> None:
    from convert import data

    scan = data.scan(a.data)
    parts = data.split(scan.samples, a.test_fraction, a.block, a.seed)
    data.write_split(a.work / "split.json", scan, parts, test_fraction=a.test_fraction, block=a.block, seed=a.seed)
    print(f"split: {len(parts['train'])} train / {len(parts['test'])} test, "
          f"{len(scan.duplicates)} duplicates dropped, {len(scan.skipped)} skipped -> {a.work / 'split.json'}")


def cmd_train(a) -> None:
    import numpy as np
    import torch

    from convert import data
    from convert.train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})
    if not (a.work / "split.json").exists():
        cmd_split(a)
    classes, parts, doc = data.read_split(a.work / "split.json")
    root = Path(doc["data_root"])
    t0 = time.time()
    xtr = data.load_rgb(root, parts["train"], cfg.size)
    xte = data.load_rgb(root, parts["test"], cfg.size)
    ytr = np.array([classes.index(s.label) for s in parts["train"]])
    yte = np.array([classes.index(s.label) for s in parts["test"]])
    log.info("loaded %d + %d images in %.1f s", len(xtr), len(xte), time.time() - t0)
    net = train(cfg, xtr, ytr, xte, yte, len(classes), a.work / "train")
    torch.save({"model": net.state_dict(), "classes": classes, "width": cfg.width,
                "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
                "seconds": time.time() - t0}, a.work / "darknet19.pt")
    print(f"trained -> {a.work / 'darknet19.pt'}")


STEPS = {"split": cmd_split, "train": cmd_train}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="class-per-folder image set")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="intermediate files")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="bundle output folder")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--block", type=int, default=5, help="consecutive images kept on one side of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("split", help="scan, de-duplicate and split the data set")
    _train_args(sub.add_parser("train", help="train DarkNet19 (resumable)"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        STEPS[a.step](a)
    except ScreenError as exc:
        if a.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
