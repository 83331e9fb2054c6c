"""The toolchain's steps and their currency checks.

Each step reads files from the work folder and writes files there; a stamp
(hash of its input files and parameters) lets ``python -m convert all``
skip steps whose outputs are current. Timings are kept for the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from convert import data
from convert.options import HISTORY_FILE, WEIGHTS_FILE, Options, load_part, paths
from device.bundle import MANIFEST, sha256_file

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- stamps
def _stamp_path(o: Options, step: str) -> Path:
    return paths(o).stamps / f"{step}.json"


def _inputs_hash(inputs: list[Path], params: dict) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for p in inputs:
        h.update(f"{p.name}:{sha256_file(p) if p.exists() else 'missing'}".encode())
    return h.hexdigest()


def current(o: Options, step: str, inputs: list[Path], outputs: list[Path], params: dict) -> bool:
    sp = _stamp_path(o, step)
    if o.force or not sp.exists() or not all(p.exists() for p in outputs):
        return False
    return json.loads(sp.read_text()).get("inputs") == _inputs_hash(inputs, params)


def stamp(o: Options, step: str, inputs: list[Path], params: dict, seconds: float, **info) -> None:
    sp = _stamp_path(o, step)
    sp.parent.mkdir(parents=True, exist_ok=True)
    sp.write_text(json.dumps({"inputs": _inputs_hash(inputs, params), "seconds": seconds, **info}, indent=1))


def step_seconds(o: Options) -> dict[str, float]:
    out = {}
    for p in sorted(paths(o).stamps.glob("*.json")):
        out[p.stem] = json.loads(p.read_text()).get("seconds", 0.0)
    return out


def run_step(o: Options, step: str, inputs: list[Path], outputs: list[Path], params: dict, fn) -> bool:
    """Run ``fn()`` unless current; returns True when it ran."""
    if current(o, step, inputs, outputs, params):
        log.info("%s: current, skipped", step)
        return False
    t0 = time.time()
    log.info("%s: running", step)
    info = fn() or {}
    stamp(o, step, inputs, params, time.time() - t0, **info)
    log.info("%s: done in %.1f s", step, time.time() - t0)
    return True


# --------------------------------------------------------------------------- steps
def split(o: Options) -> None:
    p = paths(o).split

    def go():
        scan = data.scan(o.data)
        parts = data.split(scan.samples, o.test_fraction, o.val_fraction, o.block, o.seed)
        data.write_split(p, scan, parts, test_fraction=o.test_fraction, val_fraction=o.val_fraction, block=o.block,
                         seed=o.seed)
        print(f"split: {len(parts['train'])} train / {len(parts['val'])} validation / {len(parts['test'])} test "
              f"(newest acquisition numbers), {len(scan.duplicates)} duplicates dropped, "
              f"{len(scan.skipped)} unreadable skipped -> {p}")
        return {part: len(parts[part]) for part in data.PARTS}

    params = {"data": str(Path(o.data).resolve()), "tf": o.test_fraction, "vf": o.val_fraction, "block": o.block,
              "seed": o.seed}
    # The data folder is an input too: re-scan when its listing changes.
    root = Path(o.data)
    listing = sorted(f"{q.relative_to(root)}:{q.stat().st_size}" for q in root.rglob("*") if q.is_file()) \
        if root.is_dir() else []
    params["listing"] = hashlib.sha256("\n".join(listing).encode()).hexdigest()
    run_step(o, "split", [], [p], params, go)


def train(o: Options, cfg) -> None:
    import torch

    from convert.train import train as train_net

    pp = paths(o)

    def go():
        classes, parts, doc = data.read_split(pp.split)
        src = np.stack(data.load_sources(Path(doc["data_root"]), parts["train"]))
        ytr = np.array([classes.index(s.label) for s in parts["train"]])
        _, xva, yva, _ = load_part(o, "val", cfg.size)
        t0 = time.time()
        net = train_net(cfg, src, ytr, xva, yva, len(classes), pp.train_dir, first_cycle=committed_first_cycle(o, cfg))
        history = pp.train_dir / HISTORY_FILE  # saved with the weights, so a build that reuses them can report it
        torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()},
                    "classes": classes, "width": cfg.width,
                    "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
                    "seconds": time.time() - t0,
                    "history": json.loads(history.read_text()) if history.exists() else []}, pp.weights)
        return {"epochs": cfg.epochs}

    params = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    if not o.force and not pp.weights.exists() and reuse_committed_weights(o, params):
        stamp(o, "train", [pp.split], params, 0.0, reused=True)
        return
    run_step(o, "train", [pp.split], [pp.weights], params, go)


def _committed_weights(o: Options) -> dict | None:
    """The committed weights file's contents when they were trained on this work folder's split."""
    import torch

    src, manifest = Path(o.models) / WEIGHTS_FILE, Path(o.models) / MANIFEST
    if not src.exists() or not manifest.exists():
        return None
    _, parts, _ = data.read_split(paths(o).split)
    if json.loads(manifest.read_text()).get("split", {}).get("hash") != data.split_hash(parts):
        log.info("committed weights %s not used: trained on another split", src)
        return None
    return torch.load(src, map_location="cpu", weights_only=False)


def committed_first_cycle(o: Options, cfg) -> dict | None:
    """The committed weights as the tune stage's start, when they are this recipe's first cycle.

    They are when their configuration is ``cfg`` without the tune stage (the recipe before it): then the
    first cycle (49 minutes when it was trained, 2 cores) is not run again. ``--force`` trains from scratch.
    """
    if o.force or not cfg.tune_epochs or (w := _committed_weights(o)) is None:
        return None
    if w.get("config") != cfg.first_cycle():
        return None
    print(f"train: the committed weights {Path(o.models) / WEIGHTS_FILE} are this recipe's first cycle; "
          f"training the {cfg.tune_epochs}-epoch tune stage from them")
    return {k: v.float() if v.is_floating_point() else v for k, v in w["model"].items()}


def reuse_committed_weights(o: Options, params: dict) -> bool:
    """Take ``models/source/darknet19-fp16.pt`` instead of retraining (90 minutes on a CPU).

    Only when it was trained with the same configuration on the same split
    (the manifest's split hash); ``--force`` retrains regardless.
    """
    import shutil

    src = Path(o.models) / WEIGHTS_FILE
    w = _committed_weights(o)
    if w is None:
        return False
    if w.get("config") != params:
        log.info("committed weights %s not reused: trained with another configuration", src)
        return False
    shutil.copyfile(src, paths(o).weights)
    print(f"train: reusing the committed weights {src} (same split and config); pass --force to retrain")
    return True


def trained_size(o: Options) -> int:
    import torch

    return int(torch.load(paths(o).weights, map_location="cpu", weights_only=False)["config"]["size"])


def export(o: Options) -> None:
    from convert.export import export_onnx, float_features_onnx, float_features_torch, load_trained

    pp = paths(o)

    def go():
        net, state = load_trained(pp.weights)
        size = int(state["config"]["size"])
        export_onnx(net, pp.onnx, size)
        _, x, _, _ = load_part(o, "test", size)
        x = x[:16]
        a, b = float_features_torch(net, x), float_features_onnx(pp.onnx, x)
        diff = float(np.abs(a - b).max())
        rel = diff / float(np.abs(a).max())
        pp.export.write_text(json.dumps({"max_abs_diff": diff, "max_rel_diff": rel, "images": len(x)}, indent=1))
        print(f"ONNX vs PyTorch on {len(x)} real test images: max |diff| {diff:.3g} ({rel:.2g} of max activation)")
        return {"max_abs_diff": diff}

    run_step(o, "export", [pp.weights, pp.split], [pp.onnx, pp.export], {}, go)


def quantize(o: Options) -> None:
    """The CPU int8 graph (native LEAKY_RELU) and, unless disabled, the Edge-TPU-friendly one, same calibration."""
    from convert.quantize import RANGE_IMAGES, to_int8_graphs

    pp = paths(o)

    def go():
        size = trained_size(o)
        classes, parts, _ = data.read_split(pp.split)
        rng = np.random.default_rng(o.seed)
        train_items = parts["train"]
        chosen = [train_items[i] for i in sorted(rng.permutation(len(train_items))[:o.calib])]
        _, x, _, _ = load_part(o, "train", size, chosen)
        if len(x) < 200:
            log.warning("calibrating on %d images (< 200): fine for tests, not for a shipped model", len(x))
        pp.edgetpu_friendly.unlink(missing_ok=True)
        g = to_int8_graphs(pp.onnx, x, pp.onnx2tf_dir, cpu_dest=pp.tflite,
                           edgetpu_friendly_dest=pp.edgetpu_friendly if o.edgetpu_friendly else None,
                           range_percentile=o.range_percentile)
        info = {"calibration_images": len(x), "op_types": g.cpu_op_types, "edgetpu_friendly": o.edgetpu_friendly,
                "edgetpu_friendly_op_types": g.edgetpu_friendly_op_types,
                "calibration_names": [s.path for s in chosen],
                "activation_range": ({"percentile": o.range_percentile, "images": min(RANGE_IMAGES, len(x))}
                                     if o.range_percentile is not None else "min/max")}
        pp.quant.write_text(json.dumps(info, indent=1))
        print(f"int8 TFLite: {pp.tflite} ({pp.tflite.stat().st_size / 1e6:.1f} MB), ops {g.cpu_op_types}"
              + (f"; Edge-TPU-friendly graph {pp.edgetpu_friendly}" if g.edgetpu_friendly else ""))
        return {"calibration_images": len(x)}

    run_step(o, "quantize", [pp.onnx, pp.split], [pp.tflite, pp.quant],
             {"calib": o.calib, "etpu": o.edgetpu_friendly, "seed": o.seed, "graphs": 2,
              **({"range": [o.range_percentile, RANGE_IMAGES]} if o.range_percentile is not None else {})}, go)


def edgetpu(o: Options) -> Path | None:
    """Compile the Edge-TPU-friendly graph with Coral's compiler, where it is installed."""
    from convert.quantize import compile_edgetpu

    pp = paths(o)
    if not pp.edgetpu_friendly.exists():
        log.warning("no Edge-TPU-friendly graph in %s (run quantize without --keep-leakyrelu)", o.work)
        return None
    out = compile_edgetpu(pp.edgetpu_friendly, pp.edgetpu_dir)
    if out is None:
        pp.edgetpu.unlink(missing_ok=True)
        return None
    out.replace(pp.edgetpu)
    return pp.edgetpu


def features(o: Options) -> None:
    """Features of every split, of the shift suite and of the out-of-distribution sets, via device/ code."""
    from convert.evaluate_sets import BCCD_FOLDER, ood_sets, shift_sets
    from convert.export import float_features_onnx
    from device.calibrate import rbc_diameter
    from device.inference import TFLiteModel

    pp = paths(o)

    def go():
        model = TFLiteModel(pp.tflite, num_threads=2)
        size = model.input_spec.size
        classes, parts, doc = data.read_split(pp.split)
        root = Path(doc["data_root"])
        out: dict[str, np.ndarray] = {"classes": np.array(classes), "out_scale": np.float64(model.output_spec.scale),
                                      "out_zero_point": np.int64(model.output_spec.zero_point)}
        t0 = time.time()
        sources = {}
        for part in data.PARTS:
            sources[part] = src = data.load_sources(root, parts[part])
            screened = [screen(model, im, size) for im in src]
            out[part] = np.stack([f for f, _ in screened])
            out[f"{part}_q"] = np.array([q for _, q in screened])  # the gate's code: its scale check retakes ~1%
            out[f"y_{part}"] = np.array([classes.index(s.label) for s in parts[part]])
            out[f"{part}_names"] = np.array([s.path for s in parts[part]])
        d = [x for im in sources["train"] if (x := rbc_diameter(im)) is not None]
        out["rbc_diameter_px"] = np.float64(np.median(d))
        out["field_px"] = np.float64(sources["train"][0].shape[0])
        n = sum(len(parts[p]) for p in data.PARTS)
        per_image = (time.time() - t0) / n
        _, x_te, _, _ = load_part(o, "test", size)
        out["test_float"] = float_features_onnx(pp.onnx, x_te)
        np.savez_compressed(pp.features, **out)
        print(f"features: {n} images through device/ int8 code ({per_image * 1000:.0f} ms/image here)")
        geometry = (float(out["field_px"]), float(out["rbc_diameter_px"]))

        def one(im: np.ndarray, side: float | None) -> tuple[np.ndarray, str]:
            return screen(model, im, size, side)

        np.savez_compressed(pp.shifts, **shift_sets(sources["test"], geometry, one))
        np.savez_compressed(pp.ood, **ood_sets(geometry, one, o.seed, Path(o.data).parent / BCCD_FOLDER))
        return {"ms_per_image": per_image * 1000}

    run_step(o, "features", [pp.tflite, pp.onnx, pp.split], [pp.features, pp.shifts, pp.ood],
             {"version": 5}, go)


def screen(model, frame: np.ndarray, size: int, side_px: float | None = None) -> tuple[np.ndarray, str]:
    """(dequantized features, quality-gate code) of one frame, exactly as the device computes them."""
    from device.classifier import model_features
    from device.quality import gate

    prep, q = gate(frame, size, side_px=side_px)
    return model_features(model, prep.rgb), q.code


def head(o: Options) -> None:
    """mRMR + SVM on train; k, C, calibration, OOD method and threshold, decision thresholds and the slide's
    near-duplicate threshold on validation; the network's own classifier (the trained linear layer) shipped beside
    the SVM as the second opinion ``device.classifier.decide`` asks for."""
    from dataclasses import asdict, replace

    from convert.evaluate import duplicate_threshold, gate_codes
    from convert.export import load_trained
    from convert.fit import choose_k, choose_thresholds, compare_ood
    from device.head import save_head

    pp = paths(o)

    def go():
        z = np.load(pp.features)
        zo = np.load(pp.ood)
        classes = [data.DISPLAY_NAMES.get(c, c) for c in z["classes"]]
        benign = classes.index(data.DISPLAY_NAMES[data.BENIGN]) if data.DISPLAY_NAMES[data.BENIGN] in classes else 0
        xtr, ytr, xva, yva = z["train"], z["y_train"], z["val"], z["y_val"]
        sel = choose_k(xtr, ytr, xva, yva, criterion=o.criterion, seed=o.seed)
        idx = sel.ranking[:sel.k]
        sets = {"in:validation": (xva, gate_codes(z, "val"))}
        for name in ("bccd|calibrated", "bccd|none", "synthetic"):
            if name in zo.files:
                sets[name] = (zo[name], zo[name + "|q"])
        h, table = compare_ood(xtr, ytr, xva, yva, classes, idx, sel.C, o.seed, sets)
        net, _ = load_trained(pp.weights)  # its outputs are in the split's class order, as the head's
        h = replace(h, network_coef=net.classifier.weight.detach().double().numpy(),
                    network_intercept=net.classifier.bias.detach().double().numpy())
        th, th_info = choose_thresholds(h, xva, yva, benign)
        dup = duplicate_threshold(h, xva, data.block_groups(data.split_blocks(pp.split), z["val_names"]))
        save_head(pp.head, h)
        pp.selection.write_text(json.dumps({
            "k": sel.k, "C": sel.C, "criterion": o.criterion, "ranking": sel.ranking.tolist(), "table": sel.table,
            "best_val_accuracy": sel.best, "one_se": sel.se, "ood_method": h.ood_method, "ood_comparison": table,
            "thresholds": asdict(th), "thresholds_info": th_info, "duplicate_similarity": dup["threshold"],
            "duplicate_val_pairs": dup["distinct_pairs"]}, indent=1))
        print(f"head: mRMR ({o.criterion}) k={sel.k} (paper: 521), C={sel.C}, OOD {h.ood_method} > "
              f"{h.ood_threshold:.3f}, thresholds {th}")
        return {"k": sel.k, "C": sel.C}

    run_step(o, "head", [pp.features, pp.ood, pp.split, pp.weights], [pp.head, pp.selection],
             {"criterion": o.criterion, "seed": o.seed, "version": 4}, go)
