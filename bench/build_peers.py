"""``python -m bench.build_peers``: the float peers of the shipped model, from the same trained weights.

Run as a subprocess by :mod:`bench.peers` so torch and TensorFlow never load
into the benchmark process (their threads and memory would distort it).
Writes into ``--out``: ``darknet19.onnx`` (``convert.export``, the same
export the int8 model came from) and ``darknet19_float32.tflite`` (onnx2tf's
plain float32 conversion, native LEAKY_RELU: what a user would deploy
instead of the int8 model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True, type=Path)
    p.add_argument("--size", required=True, type=int)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)

    import onnx2tf
    import torch

    from convert.export import export_onnx, load_trained
    from convert.quantize import ONNX2TF_SAMPLE
    from device.preprocess import frame_to_rgb, load_image
    from device.sources import list_images

    torch.set_num_threads(2)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    net, state = load_trained(args.weights)
    onnx_path = out / "darknet19.onnx"
    export_onnx(net, onnx_path, args.size)
    # onnx2tf checks against (and, offline, fails to download) this sample; write it from the committed samples.
    samples = [frame_to_rgb(np.asarray(load_image(p)), 128) for p in list_images(ROOT / "device" / "samples")]
    sample = np.stack([samples[i % len(samples)] for i in range(20)]).astype(np.float32) / 255.0
    np.save(out / ONNX2TF_SAMPLE, sample)
    with contextlib.chdir(out):
        onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(out / "tf"), non_verbose=True)
    found = sorted((out / "tf").glob("*_float32.tflite"))
    if not found:
        print(f"onnx2tf wrote no *_float32.tflite into {out / 'tf'}", file=sys.stderr)
        return 1
    shutil.copyfile(found[0], out / "darknet19_float32.tflite")
    shutil.rmtree(out / "tf", ignore_errors=True)  # saved_model and float16: not needed
    (out / ONNX2TF_SAMPLE).unlink(missing_ok=True)
    (out / "peers.json").write_text(json.dumps({
        "weights": str(args.weights), "size": args.size, "width": state.get("width"),
        "onnx2tf": getattr(onnx2tf, "__version__", "?"), "torch": torch.__version__,
        "build_s": round(time.perf_counter() - t0, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
