"""Cross-machine comparison for the fresh-machine check (``tools/fresh-machine.sh arm64``).

``python tools/screen_dump.py dump OUT.npz [--model DIR] IMAGE...``: every image through the public
classification path (``Classifier.screen``: the verdict and the model's raw int8 output), saved with the
machine's description. ``python tools/screen_dump.py compare X86.npz ARM.npz``: one JSON line with the
decision agreement and the largest int8 (LSB) and probability differences. Uses only ``device/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's device/, whatever an editable install elsewhere points at


def dump(out: Path, model: Path, images: list[Path]) -> None:
    from device.bundle import load_bundle
    from device.classifier import Classifier
    from device.preprocess import load_image
    from device.reference import decision

    bundle = load_bundle(model)
    clf = Classifier.open(bundle, num_threads=4, use_edgetpu=False)
    feats, probs, decisions = [], [], []
    for p in images:
        q, timed = clf.screen(np.asarray(load_image(p), dtype=np.uint8))
        feats.append(q)
        probs.append([timed.verdict.scores[c] for c in bundle.classes])
        decisions.append(decision(timed.verdict.status, timed.verdict.label))
    with open(out, "wb") as f:
        np.savez(f, names=np.array([p.name for p in images]), features_q=np.stack(feats), probs=np.array(probs),
                 decisions=np.array(decisions),
                 machine=np.array(f"{platform.machine()} {platform.system()}, {clf.model.runtime}"))


def compare(a: Path, b: Path) -> dict:
    with np.load(a) as x, np.load(b) as y:
        if list(x["names"]) != list(y["names"]):
            raise SystemExit(f"{a} and {b} hold different images")
        diff = np.abs(x["features_q"].astype(np.int32) - y["features_q"].astype(np.int32))
        same = x["decisions"] == y["decisions"]
        return {"images": int(len(same)), "decisions_identical": int(same.sum()),
                "differing": [f"{n}: {d1} vs {d2}" for n, d1, d2, s in zip(x["names"], x["decisions"],
                                                                            y["decisions"], same) if not s],
                "max_lsb": int(diff.max()), "fraction_values_differing": round(float((diff > 0).mean()), 4),
                "max_prob_diff": round(float(np.abs(x["probs"] - y["probs"]).max()), 4),
                "a": str(x["machine"]), "b": str(y["machine"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/screen_dump.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out", type=Path)
    d.add_argument("images", type=Path, nargs="+")
    d.add_argument("--model", type=Path, default=ROOT / "models")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "dump":
        dump(args.out, args.model, args.images)
    else:
        print(json.dumps(compare(args.a, args.b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
