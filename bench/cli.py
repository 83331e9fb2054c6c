"""``python -m bench`` (``make bench``): run every section, write results.json and RESULTS.md, print the table.

Sections run in one process, one after another, and each failure is
recorded in its section (the table says "not measured" and why) rather than
ending the run. ``--quick`` shortens everything for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from bench import report

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
#: results.json key of a section, where it is not the section's name
KEYS = {"page": "page_load", "burst": "page_burst"}
SECTIONS = ("bare", "ops", "micro", "loop", "page", "burst", "startup", "memory", "compute")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decision_agreement(bundle_dir: Path) -> dict | None:
    """int8 vs float *device decisions* (status, label, ALL alert) from the bundle's ``metrics.json`` (written by
    ``python -m convert evaluate`` beside the manifest), or None where the bundle has none."""
    try:
        doc = json.loads((bundle_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    got = doc.get("int8_float_decision_agreement") if isinstance(doc, dict) else None
    return {k: got[k] for k in ("rate", "k", "n")} if isinstance(got, dict) and "rate" in got else None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def machine() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": affinity,
            "platform": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
            "load_start": round(os.getloadavg()[0], 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "models",
                   help="model bundle folder (default models/; tests/fixtures/bundle is the tiny one)")
    p.add_argument("--out", type=Path, default=ROOT / "bench", help="where results.json and RESULTS.md go")
    p.add_argument("--build-dir", type=Path, default=ROOT / "build" / "bench",
                   help="cache of the float peer models (keyed by the weights' sha256)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                   help="TFLite/onnxruntime threads of the model comparisons (bare, ops; default: the cores here, "
                        "at most 4 as on a Pi)")
    p.add_argument("--loop-threads", type=int, default=0,
                   help="interpreter threads of the appliance sections (loop, page, burst, startup, memory); "
                        "default 0 = the device's own default, `[model] threads = 0` (the cores but one)")
    p.add_argument("--quick", action="store_true", help="short smoke run: fewer repetitions and fields")
    p.add_argument("--only", default="", help=f"comma-separated sections to run ({', '.join(SECTIONS)})")
    p.add_argument("--clients", type=int, default=8, help="page-load clients (default 8)")
    p.add_argument("--page-interval", type=float, default=0.1,
                   help="each page-load client's pause between requests, s (default 0.1; the page polls every 2.5)")
    p.add_argument("--budget-s", type=float, default=570.0,
                   help="wall-clock budget of the whole run; the long sections shorten their time-outs to fit "
                        "(default 570: make bench must finish in under 10 minutes)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def plan(quick: bool) -> dict:
    if quick:
        return dict(bare_s=1.0, micro_s=0.5, loop_fields=30, loop_warm=3, loop_blocks=2, page_warm=5,
                    page_phase_s=2.5, page_pairs=1, bursts=1, burst_idle_s=1.0, startup_runs=1,
                    mem_warm=20, mem_fields=100, timeout=120.0, op_runs=5)
    return dict(bare_s=8.0, micro_s=2.0, loop_fields=150, loop_warm=3, loop_blocks=5, page_warm=10,
                page_phase_s=6.0, page_pairs=3, bursts=3, burst_idle_s=2.0, startup_runs=3,
                mem_warm=100, mem_fields=1000, timeout=300.0, op_runs=20)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("device", "PIL", "waitress", "gpiozero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" under page load: expected
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        print(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    wanted = [s for s in SECTIONS if not only or s in only]

    from device.bundle import load_bundle
    from device.classifier import Classifier
    from device.errors import ScreenError

    bundle_dir = args.bundle.resolve()
    try:
        bundle = load_bundle(bundle_dir)
    except ScreenError as exc:
        print(f"bench: {exc}\n(while the real bundle is being built: make bench ARGS='--bundle tests/fixtures/bundle')",
              file=sys.stderr)
        return 1
    P = plan(args.quick)
    t_run = time.perf_counter()

    def time_left(cap: float) -> float:
        """A section's time-out: ``cap``, or less so that the run ends within --budget-s."""
        return max(20.0, min(cap, args.budget_s - (time.perf_counter() - t_run) - 10.0))

    from device.inference import interpreter_threads

    # The appliance sections run the service as `make run` does: the interpreter thread count `[model] threads`
    # gives here (the cores but one by default); the model comparisons use --threads.
    loop_threads = interpreter_threads(args.loop_threads)
    clf = Classifier.open(bundle, num_threads=args.threads, use_edgetpu=False)
    # pin_cores as `[model] pin_cores = true` (the shipped default) makes it for `make run`.
    clf_loop = Classifier.open(bundle, num_threads=loop_threads, use_edgetpu=False, pin_cores=True)
    results: dict = {"meta": {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "bundle": {"dir": os.path.relpath(bundle_dir, ROOT), "name": bundle.name, "input_size": bundle.input.size,
                   "model_sha256": bundle.model_sha256, "model_bytes": bundle.model_path.stat().st_size,
                   "model_op_types": (bundle.manifest.get("quantization") or {}).get("op_types"),
                   "edgetpu_friendly_graph": bundle.edgetpu_friendly_path is not None,
                   "edgetpu_compiled_graph": bundle.edgetpu_path is not None,
                   "metrics": bundle.manifest.get("metrics"),
                   "decision_agreement": decision_agreement(bundle_dir)},
        "threads": args.threads, "loop_threads": loop_threads,
        "loop_cores": clf_loop.model.cores.describe() if clf_loop.model.cores else None,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "runtime": clf.model.runtime, "quick": args.quick, "sections": wanted,
        "versions": {d: _version(d) for d in ("ai-edge-litert", "onnxruntime", "numpy", "pillow", "flask",
                                               "waitress")}},
        "notes": []}

    from bench import loop as loop_mod
    from device.preprocess import load_image
    from device.sources import list_images

    sample_paths = list_images(loop_mod.SAMPLES)
    model_rgb = [np.asarray(load_image(p).resize((bundle.input.size,) * 2), dtype=np.uint8) for p in sample_paths]

    def section(name: str, fn) -> None:
        if name not in wanted:
            return
        t0 = time.perf_counter()
        log.info("%s ...", name)
        try:
            results[KEYS.get(name, name)] = fn()
        except Exception as exc:  # one broken section must not hide the others
            log.error("%s failed: %s", name, exc)
            if args.verbose:
                traceback.print_exc()
            results[KEYS.get(name, name)] = {"error": f"{type(exc).__name__}: {exc}"}
        log.info("%s done in %.1f s", name, time.perf_counter() - t0)

    def bare() -> dict:
        from bench import peers

        return peers.measure(bundle, args.threads, model_rgb, args.build_dir, P["bare_s"])

    def micro() -> dict:
        samples = [np.asarray(load_image(p), dtype=np.uint8) for p in sample_paths]
        cam = loop_mod.camera_frames()
        return {"samples": loop_mod.micro(clf, samples, "replay samples", P["micro_s"]),
                "camera": loop_mod.micro(clf, cam, "camera-size frames", P["micro_s"]),
                "camera_lores": loop_mod.micro(clf, loop_mod.lores_frames(cam, bundle.input.size),
                                               "camera lores stream", P["micro_s"])}

    def loop() -> dict:
        out: dict = {}

        def run(classifier, threads: int, src: str) -> dict:
            return loop_mod.run_loop(bundle, classifier, threads, source=src, fields=P["loop_fields"],
                                     warm=P["loop_warm"], blocks=P["loop_blocks"], bare_s=P["bare_s"],
                                     timeout=time_left(P["timeout"]))

        for src in loop_mod.LOOP_SOURCES:
            out[src.replace("-", "_")] = run(clf_loop, loop_threads, src)
        out["threads"] = loop_threads
        if args.threads != loop_threads:  # the same loop with every core's worth of interpreter threads
            out["compare_threads"] = {"threads": args.threads}
            for src in loop_mod.LOOP_SOURCES:
                key = src.replace("-", "_")
                r = run(clf, args.threads, src)
                base = out[key]
                if not r.get("error") and not base.get("error"):
                    r["period_vs_loop_threads"] = round(r["period_median_ms"] / base["period_median_ms"], 4)
                    r["period_vs_bare_loop_threads"] = round(r["period_median_ms"] / base["bare_invoke_median_ms"],
                                                             4)
                out["compare_threads"][key] = r
        out["notes"] = [
            f"The loop runs as `make run` runs it: {loop_threads} interpreter thread(s), "
            + ("as --loop-threads asked" if args.loop_threads else
               "what the shipped `[model] threads = 0` gives here (the cores but one, 1 to 4: the core left over "
               "runs capture, gate, preparation, record, LEDs and the page)")
            + ", and its bare invoke is timed at the same count"
            + (f" on the same cores ({clf_loop.model.cores.describe()}, as `[model] pin_cores = true` splits them)"
               if clf_loop.model.cores else "")
            + (f"; the same loop at {args.threads} threads (--threads) is the comparison below it."
               if args.threads != loop_threads else "."),
            "Time per field = interval between consecutive frame captures. The loop is a pipeline: the frames "
            "thread captures, gates (quality) and prepares the next frame and the recorder thread commits and then "
            "shows the last result while the screening thread runs the model, so only inference, head and 'other' "
            "(hand-offs, waiting, losing the cores to the other threads) make up the period; the other stages' "
            "medians are listed as overlapped, their share = their summed time / the summed period.",
            "'inference' = quantizing the input + invoke + dequantize. 'record' includes encoding the frame as a "
            "JPEG (store.save_images = true, the shipped default), writing it and the SQLite commit "
            "(synchronous=FULL), fsyncs included; the recorder commits the results waiting for it together, and "
            "each result of such a batch is charged an equal share of its time. A replayed file that is a plain "
            "JPEG is stored as its own bytes, not encoded again.",
            "Bare invoke = the same TFLiteModel object called directly (set input, invoke, read output), in "
            f"{P['loop_blocks'] + 1} segments interleaved with {P['loop_blocks']} loop blocks (a fresh Service each, "
            f"{P['loop_warm']} untimed fields first), so drift on a shared machine hits both figures alike.",
        ]
        return out

    def ops() -> dict:
        from bench import ops as ops_mod

        graphs = [("cpu", bundle.model_path)]
        if bundle.edgetpu_friendly_path is not None:
            graphs.append(("edgetpu_friendly", bundle.edgetpu_friendly_path))
        return {key: ops_mod.graph_profile(path, args.threads, P["op_runs"]) for key, path in graphs}

    def page() -> dict:
        return loop_mod.run_page_load(bundle, clf_loop, loop_threads, clients=args.clients,
                                      interval_s=args.page_interval,
                                      phase_s=P["page_phase_s"], paths=("/api/status", "/api/live"),
                                      pairs=P["page_pairs"], warm=P["page_warm"],
                                      timeout=time_left(P["timeout"]))

    def burst() -> dict:
        return loop_mod.run_page_burst(bundle, clf_loop, loop_threads, size=200, bursts=P["bursts"],
                                       idle_s=P["burst_idle_s"], warm=P["page_warm"], timeout=time_left(P["timeout"]))

    def startup() -> dict:
        from bench import proc

        return proc.startup(bundle_dir, loop_threads, P["startup_runs"], timeout=60.0)

    def memory() -> dict:
        from bench import proc

        return proc.memory(bundle_dir, loop_threads, P["mem_warm"], P["mem_fields"],
                           timeout=time_left(P["timeout"] * 2))

    def compute() -> dict:
        from bench import macs as macs_mod
        from bench import ops as ops_mod
        from bench.peers import INT8_NAME

        rows = macs_mod.graph_macs(bundle.model_path)
        total = int(sum(r.macs for r in rows))
        bare_models = (results.get("bare") or {}).get("models") or []
        inv = next((m["median_ms"] for m in bare_models if m["name"] == INT8_NAME), None)
        if inv is None:  # bare section skipped: time the model here
            from bench.loop import bare_invoke
            from bench.stats import summary

            inv = summary(bare_invoke(clf.model, model_rgb[0], P["bare_s"]))["median"]
        top = sorted(rows, key=lambda r: -r.macs)[:3]
        etpu_source = bundle.edgetpu_friendly_path or bundle.model_path  # same parameters, other activation ops
        return {"macs": total, "gmacs": round(total / 1e9, 4), "counted_ops": len(rows),
                "model": bundle.model_path.name,
                "int8_invoke_median_ms": inv, "achieved_gmac_s": round(total / (inv / 1000) / 1e9, 2),
                "largest_ops": [{"op": r.op, "output": r.output_shape, "weights": r.weight_shape, "macs": r.macs}
                                for r in top],
                "edgetpu_model": bundle.edgetpu_path is not None,
                "edgetpu_friendly_model": bundle.edgetpu_friendly_path is not None,
                "estimates": macs_mod.estimates(total, ops_mod.param_bytes(etpu_source))}

    for name, fn in (("bare", bare), ("ops", ops), ("micro", micro), ("loop", loop), ("page", page), ("burst", burst),
                     ("startup", startup), ("memory", memory), ("compute", compute)):
        section(name, fn)

    results["meta"]["duration_s"] = round(time.perf_counter() - t_run, 1)
    results["meta"]["machine"]["load_end"] = round(os.getloadavg()[0], 2)
    if results["meta"]["machine"]["load_start"] > 0.5 * (os.cpu_count() or 1):
        results["notes"].append(f"The machine was busy when the run started (load average "
                                f"{results['meta']['machine']['load_start']} on {os.cpu_count()} cores): absolute "
                                "times are inflated; ratios measured in the same run are less affected.")
    if args.threads > (os.cpu_count() or 1):
        results["notes"].append(f"{args.threads} threads on {os.cpu_count()} cores: oversubscribed.")
    results["notes"].append("MB = 10^6 bytes. Every ratio's two figures come from this run.")
    if "memory" in wanted:
        results["notes"].append("Reading RSS growth: SQLite's page cache (512 KiB per connection, "
                                "device/store/schema.py) fills as the database grows (under 1 KB per field), and "
                                "RSS moves by about 1 MB either way "
                                "between samples, so growth of that size over 1,000 fields does not by itself prove "
                                "a leak; a longer run (e.g. the 10,000-field soak) tells a leak from a filling cache.")
    js, md = report.write(results, args.out)
    print(md.read_text())
    print(f"wrote {os.path.relpath(js, Path.cwd())} and {os.path.relpath(md, Path.cwd())}")
    return 0
