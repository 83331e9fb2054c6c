"""Targets, ``results.json`` and the Markdown table (pure: a results dict in, text out).

The targets are the issue's, fixed here and never adjusted to the figures:
a row says "met" or "MISSED", or "not measured" with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MET, MISSED, NOT_MEASURED = "met", "MISSED", "not measured"
LOOP_VARIANTS = ("replay", "camera", "camera_lores")


@dataclass(frozen=True)
class Target:
    key: str
    what: str
    limit: float
    unit: str
    get: Callable[[dict], float | None]  # the measured value from the results (None: not measured)
    at_least: bool = False  # the limit is a floor (agreement), not a ceiling
    section: str = ""  # where a missing figure would have come from

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit


def _dig(d: dict, *path: str) -> Any:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _sum(*values: Any) -> float | None:
    return None if any(v is None for v in values) else float(sum(values))


TARGETS: tuple[Target, ...] = (
    Target("int8_vs_float", "int8 bare invoke / float32 TFLite bare invoke (same threads, same run)", 0.35, "x",
           lambda r: _dig(r, "bare", "int8_vs_float32_tflite"), section="bare"),
    Target("loop_ratio", "Loop time per field / bare int8 invoke, same interpreter threads (replay source, as "
           "`make run`)", 1.10, "x", lambda r: _dig(r, "loop", "replay", "ratio"), section="loop"),
    Target("loop_ratio_camera", "Loop time per field / bare int8 invoke, same interpreter threads (camera-size "
           "1014x760 frames as the Pi camera gives them: main stream + model-size lores stream)", 1.10, "x",
           lambda r: _dig(r, "loop", "camera_lores", "ratio"), section="loop"),
    Target("preprocess_head_ms", "Preprocessing + head per field (camera-size frames, median)", 2.0, "ms",
           lambda r: _sum(_dig(r, "micro", "camera", "preprocess_ms"), _dig(r, "micro", "camera", "head_ms")),
           section="micro"),
    Target("peak_rss_mb", "Peak RSS of `python -m device run` (replay)", 150.0, "MB",
           lambda r: _dig(r, "memory", "peak_rss_mb"), section="memory"),
    Target("rss_growth_mb", "RSS growth over 1,000 fields (no growth: <= 1 MB, ~1 KB/field)", 1.0, "MB",
           lambda r: _dig(r, "memory", "growth_mb"), section="memory"),
    Target("first_result_s", "Process start to first recorded result (median of runs)", 5.0, "s",
           lambda r: _dig(r, "startup", "median_s"), section="startup"),
    Target("page_load_ratio", "Loop time per field under page load / idle", 1.10, "x",
           lambda r: _dig(r, "page_load", "ratio"), section="page_load"),
    Target("page_burst_ratio", "Loop time per field during bursts of 200 concurrent GET /api/status / idle", 1.10,
           "x", lambda r: _dig(r, "page_burst", "ratio"), section="page_burst"),
    Target("int8_float_agreement", "int8 vs float decisions (status, label, ALL alert) agree (held-out images; the "
           "bundle's metrics.json, else its manifest's top-class figure)", 0.995, "%",
           lambda r: _dig(r, "meta", "bundle", "decision_agreement", "rate")
           or _dig(r, "meta", "bundle", "metrics", "int8_float_agreement"), at_least=True, section="meta"),
)


def _why_missing(results: dict, t: Target) -> str:
    if t.section == "meta":
        return ("the bundle has neither metrics.json's int8_float_decision_agreement nor the manifest's "
                "metrics.int8_float_agreement")
    s = results.get(t.section)
    if isinstance(s, dict) and s.get("error"):
        return str(s["error"])
    if isinstance(s, dict) and t.key.startswith("loop"):
        variant = s.get("replay" if t.key == "loop_ratio" else "camera_lores")
        if isinstance(variant, dict):
            return str(variant.get("error", "no figure"))
    return "section skipped" if s is None else "no figure"


def evaluate_targets(results: dict) -> list[dict]:
    rows = []
    for t in TARGETS:
        value = t.get(results)
        if value is None:
            rows.append({"key": t.key, "what": t.what, "limit": t.limit, "unit": t.unit, "measured": None,
                         "at_least": t.at_least, "result": NOT_MEASURED, "note": _why_missing(results, t)})
        else:
            rows.append({"key": t.key, "what": t.what, "limit": t.limit, "unit": t.unit, "at_least": t.at_least,
                         "measured": round(float(value), 4), "result": MET if t.met(value) else MISSED})
    return rows


def _f(v: Any, nd: int = 2, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float | int):
        return f"{v:.{nd}f}{unit}"
    return str(v)


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(results: dict) -> str:
    """The whole RESULTS.md; the first table is the targets."""
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    b = meta.get("bundle", {})
    out = [
        "# LeukoScreen benchmark (`make bench`)",
        "",
        f"- Date: {meta.get('date', '-')} (took {_f(meta.get('duration_s'), 0, ' s')})",
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('platform', '')}); "
        f"load average at start {_f(m.get('load_start'), 2)}, at end {_f(m.get('load_end'), 2)}",
        f"- Bundle: `{b.get('dir', '?')}` ({b.get('name', '?')}, {b.get('input_size', '?')} px input, "
        f"model sha256 {str(b.get('model_sha256', '?'))[:12]}); TFLite threads: {meta.get('threads', '?')} "
        f"(model comparisons), {meta.get('loop_threads', meta.get('threads', '?'))} (the appliance: loop, page, "
        "start-up, memory); "
        f"runtime {meta.get('runtime', '?')}; numpy BLAS threads: {meta.get('blas_threads') or 'OpenBLAS default'}",
    ]
    if meta.get("quick"):
        out.append("- **QUICK RUN** (`--quick`): fewer repetitions and fields; figures are indicative only")
    out += ["", "## Targets", "", "| Target | Measured | Limit | Result |", "|---|---:|---:|---|"]
    for row in results.get("targets") or evaluate_targets(results):
        # 4 significant digits: a ratio of 1.103 against a limit of 1.1 must not print as "1.1 x ... MISSED"
        measured = "-" if row["measured"] is None else f"{row['measured']:.4g} {row['unit']}"
        result = row["result"] if row["result"] != NOT_MEASURED else f"{NOT_MEASURED}: {row.get('note', '')}"
        limit = f"{'>=' if row.get('at_least') else '<='} {row['limit']:g} {row['unit']}"
        if row["unit"] == "%":
            measured = "-" if row["measured"] is None else f"{row['measured'] * 100:.2f}%"
            limit = f"{'>=' if row.get('at_least') else '<='} {row['limit'] * 100:g}%"
        out.append(f"| {_cell(row['what'])} | {measured} | {limit} | "
                   f"{'**MISSED**' if row['result'] == MISSED else _cell(result)} |")

    bare = results.get("bare") or {}
    if "bare" in results:
        out += ["", "## Bare interpreter (same weights, same threads, one input, same run)", ""]
    if bare.get("error"):
        out.append(f"Not measured: {bare['error']}")
    if bare.get("models"):
        out += ["| Model | Runtime | File size | Median | p95 | Runs | Median vs int8 |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for r in bare["models"]:
            out.append(f"| {_cell(r['name'])} | {_cell(r['runtime'])} | {_f(r['bytes'] / 1e6, 2, ' MB')} | "
                       f"{_f(r['median_ms'], 2, ' ms')} | {_f(r['p95_ms'], 2, ' ms')} | {r['n']} | "
                       f"{_f(r.get('vs_int8'), 2, 'x')} |")
        agree = bare.get("agreement")
        if agree:
            out.append("")
            out.append("Same weights check (cosine similarity of the 1000-d features on the sample images, worst "
                       f"image): int8 TFLite vs onnxruntime float32 {_f(agree.get('int8_vs_onnx'), 4)}, float32 "
                       f"TFLite vs onnxruntime {_f(agree.get('f32_tflite_vs_onnx'), 6)}.")
        if bare.get("int8_vs_float32_tflite") is not None:
            out += ["", f"int8 (CPU graph) / float32 TFLite: **{_f(bare['int8_vs_float32_tflite'], 3, 'x')}**."]
        g = bare.get("graphs")
        if g:
            out += ["", f"The bundle's two int8 graphs (CPU graph vs Edge-TPU-friendly graph, both on the CPU) on the "
                        f"same {g['images']} sample images: worst feature cosine {_f(g['worst_feature_cosine'], 4)}, "
                        f"decisions (status, label, ALL) agree on {g['decisions_agree']} of {g['images']}."]
        if bare.get("errors"):
            out += ["", "Peers not measured: " + "; ".join(bare["errors"])]

    loop = results.get("loop") or {}
    if "loop" in results:
        out += ["", "## The loop (real `device.service.Service`: source -> quality -> inference -> head -> record "
                "-> LEDs)", ""]
    if loop.get("error"):
        out.append(f"Not measured: {loop['error']}")
    variants = [(k, loop[k]) for k in LOOP_VARIANTS if isinstance(loop.get(k), dict)]
    other = loop.get("compare_threads") or {}
    lt = loop.get("threads", meta.get("threads", "?"))
    if variants:
        out += ["| | " + " | ".join(v.get("label", k) for k, v in variants) + " |",
                "|---|" + "---:|" * len(variants)]

        def row(label: str, fn: Callable[[dict], str], source: dict | None = None) -> None:
            src = loop if source is None else source
            cells = []
            for k, _ in variants:
                v = src.get(k)
                cells.append("-" if not isinstance(v, dict) or v.get("error") else fn(v))
            out.append(f"| {label} | " + " | ".join(cells) + " |")

        row("Fields timed", lambda v: str(v.get("fields", "-")))
        row("Time per field, median (mean)", lambda v: f"{_f(v.get('period_median_ms'), 2)} "
            f"({_f(v.get('period_mean_ms'), 2)}) ms")
        row("Bare int8 invoke, median (same model object, around the loop)",
            lambda v: _f(v.get("bare_invoke_median_ms"), 2, " ms"))
        row(f"**Loop / bare invoke** ({lt} interpreter thread(s), both)",
            lambda v: f"**{_f(v.get('ratio'), 3, 'x')}**")
        stages = []
        for _, v in variants:
            for s in (v.get("stages") or {}):
                if s not in stages:
                    stages.append(s)
        for s in stages:
            def cell(v: dict, s: str = s) -> str:
                st = (v.get("stages") or {}).get(s, {})
                share = f"{st.get('share', 0) * 100:.1f}%"
                return f"{share} ({_f(st.get('median_ms'), 2)} ms)" if not st.get("overlapped") else \
                    f"{_f(st.get('median_ms'), 2)} ms ({share})"
            overlapped = any(((v.get("stages") or {}).get(s) or {}).get("overlapped") for _, v in variants)
            row(f"overlapped: {s}, median (time / period)" if overlapped else f"share of period: {s} (median)", cell)
        row("Verdicts", lambda v: ", ".join(f"{k} {n}" for k, n in sorted((v.get("statuses") or {}).items())))
        if other:
            n = other.get("threads", "?")
            row(f"Time per field with {n} interpreter thread(s) (--threads), median",
                lambda v: _f(v.get("period_median_ms"), 2, " ms"), other)
            row(f"... vs with {lt}", lambda v: _f(v.get("period_vs_loop_threads"), 3, "x"), other)
            row(f"... / its own bare invoke ({n} threads)", lambda v: _f(v.get("ratio"), 3, "x"), other)
            row(f"... / the bare invoke at {lt}", lambda v: _f(v.get("period_vs_bare_loop_threads"), 3, "x"), other)
        for k, v in variants:
            if v.get("error"):
                out.append(f"\n{v.get('label', k)}: not measured: {v['error']}")
        if loop.get("notes"):
            out += [""] + [f"- {n}" for n in loop["notes"]]

    ops = results.get("ops") or {}
    if "ops" in results:
        out += ["", "## Per-op profile (each op cut out into a one-op model, timed alone; same runtime and threads)",
                ""]
    if ops.get("error"):
        out.append(f"Not measured: {ops['error']}")
    graphs = [(k, v) for k, v in ops.items() if isinstance(v, dict) and v.get("by_type")]
    if graphs:
        types: list[str] = []
        for _, g in graphs:
            types += [t for t in g["by_type"] if t not in types]
        out += ["| Op type | " + " | ".join(f"`{g['model']}`" for _, g in graphs) + " |",
                "|---|" + "---:|" * len(graphs)]
        for t in types:
            cells = []
            for _, g in graphs:
                d = g["by_type"].get(t)
                cells.append("-" if d is None else f"{d['count']} x, {_f(d['ms'], 2)} ms ({d['share'] * 100:.1f}%)")
            out.append(f"| {t} | " + " | ".join(cells) + " |")
        out.append("| **sum of ops / whole graph** | " + " | ".join(
            f"**{_f(g['sum_of_ops_ms'], 2)} / {_f(g['whole_ms'], 2)} ms**" for _, g in graphs) + " |")

    micro = results.get("micro") or {}
    if "micro" in results:
        out += ["", "## Preprocessing, quality gate and head per frame (median, this process)", ""]
    if micro.get("error"):
        out.append(f"Not measured: {micro['error']}")
    else:
        cols = [(k, micro[k]) for k in ("samples", "camera", "camera_lores") if isinstance(micro.get(k), dict)]
        if cols:
            out += ["| | " + " | ".join(v["label"] for _, v in cols) + " |", "|---|" + "---:|" * len(cols)]
            for key, label in (("preprocess_ms", "preprocess (crop/resize + quantize)"),
                               ("head_ms", "head (dequantize + mRMR/SVM/Platt + decision)"),
                               ("quality_ms", "quality gate")):
                out.append(f"| {label} | " + " | ".join(_f(v.get(key), 3, " ms") for _, v in cols) + " |")

    def section(key: str, title: str, text: Callable[[dict], list[str]]) -> None:
        """A measured section's paragraph, or why it was not measured; nothing when it did not run."""
        sec = results.get(key)
        if sec is None:
            return
        out.extend(["", f"## {title}", ""])
        out.extend([f"Not measured: {sec['error']}"] if sec.get("error") else text(sec))

    section("page_load", "Under page load (loopback clients only)", lambda page: [
        f"{page.get('clients')} clients polling {', '.join(page.get('paths', []))} every "
        f"{_f(page.get('interval_s'), 2)} s for {_f(page.get('seconds_per_phase'), 0)} s per phase, phases "
        f"{' / '.join(page.get('phases', []))}: {page.get('requests')} requests "
        f"({_f(page.get('req_per_s'), 1)}/s; the page itself polls once per 2.5 s, so about "
        f"{_f((page.get('req_per_s') or 0) * 2.5, 0)} open pages' worth), {page.get('errors')} errors, "
        f"latency median "
        f"{_f(page.get('latency_ms', {}).get('median'), 1)} ms, p95 {_f(page.get('latency_ms', {}).get('p95'), 1)}"
        f" ms; the client process used {_f(page.get('client_cpu_s'), 1)} CPU s on this machine.",
        "",
        f"Time per field idle {_f(page.get('idle_period_ms'), 2)} ms, under load "
        f"{_f(page.get('load_period_ms'), 2)} ms: **{_f(page.get('ratio'), 3, 'x')}**.",
    ])
    section("page_burst", "Bursts of concurrent status requests (loopback)", lambda burst: [
        f"{burst.get('bursts')} bursts of {burst.get('size')} concurrent GET /api/status (`python -m bench.burst`, "
        f"all opened at once), between idle phases of {_f(burst.get('idle_s'), 0)} s: "
        f"{burst.get('answered_200')} of {burst.get('requests')} answered 200; bursts took "
        f"{', '.join(_f(x, 2, ' s') for x in burst.get('burst_seconds') or [])}.",
        "",
        f"Time per field idle {_f(burst.get('idle_period_ms'), 2)} ms ({burst.get('idle_fields')} fields), during "
        f"bursts {_f(burst.get('burst_period_ms'), 2)} ms ({burst.get('burst_fields')} fields): "
        f"**{_f(burst.get('ratio'), 3, 'x')}**. (`tests/reliability/test_web.py` checks that every request is "
        "answered and the loop goes on; the slow-down is measured only here.)",
    ])

    mem = results.get("memory") or {}
    st = results.get("startup") or {}
    if "memory" in results or "startup" in results:
        out += ["", "## Memory and start-up (`python -m device run` as a subprocess, replay source)", ""]
    if mem.get("error"):
        out.append(f"Memory not measured: {mem['error']}")
    elif mem:
        out.append(f"Peak RSS {_f(mem.get('peak_rss_mb'), 1)} MB (VmHWM); RSS after {mem.get('warm_fields')} "
                   f"warm-up fields {_f(mem.get('rss_warm_mb'), 1)} MB, {mem.get('measured_fields')} fields later "
                   f"{_f(mem.get('rss_end_mb'), 1)} MB: growth {_f(mem.get('growth_mb'), 2)} MB (fitted slope "
                   f"{_f(mem.get('slope_kb_per_field'), 3)} KB/field); USS at end {_f(mem.get('uss_end_mb'), 1)} MB; "
                   f"{_f(mem.get('fields_per_s'), 1)} fields/s; exit code {mem.get('exit_code')}.")
    if st.get("error"):
        out.append(f"Start-up not measured: {st['error']}")
    elif st:
        runs = ", ".join(_f(x, 2, " s") for x in st.get("runs_s", []))
        out.append(f"First recorded result after process start: {runs} (median {_f(st.get('median_s'), 2)} s).")

    comp = results.get("compute") or {}
    if "compute" in results:
        out += ["", "## Compute", ""]
    if comp.get("error"):
        out.append(f"Not measured: {comp['error']}")
    elif comp:
        out.append(f"{comp.get('gmacs', 0):.3f} GMAC per field ({comp.get('counted_ops')} conv/FC ops walked from "
                   f"`{comp.get('model')}`); achieved here {_f(comp.get('achieved_gmac_s'), 1)} GMAC/s "
                   f"(int8, {meta.get('threads', '?')} threads, bare median invoke).")
        e = comp.get("estimates") or {}
        if e:
            out += ["", f"**{e.get('label', 'ESTIMATE')}**", "", "| Device | Estimated invoke | Basis |",
                    "|---|---:|---|",
                    f"| Raspberry Pi 4 (4 threads) | {_ms(e['pi4_ms'][0])}-{_ms(e['pi4_ms'][1])} ms | "
                    f"{_cell(e.get('pi4_basis', ''))}: "
                    f"{', '.join(f'{k} {v} GMAC/s' for k, v in e['pi4_rates_gmac_s'].items())} |",
                    f"| Raspberry Pi 5 | {_ms(e['pi5_ms'][0])}-{_ms(e['pi5_ms'][1])} ms | {e['pi5_assumption']} |"]
            et = e.get("edgetpu")
            if et:
                out.append(f"| Coral Edge TPU (USB 3) | {_ms(et['ms'][0])}-{_ms(et['ms'][1])} ms | "
                           f"{_cell(et['basis'])}: streaming {_ms(et['stream_ms'][0])}-{_ms(et['stream_ms'][1])} ms + "
                           f"compute {_ms(et['compute_ms'][0])}-{_ms(et['compute_ms'][1])} ms; needs the "
                           f"Edge-TPU-compiled graph "
                           f"({'in the bundle' if comp.get('edgetpu_model') else 'NOT in this bundle'}; its source, "
                           f"the Edge-TPU-friendly graph, "
                           f"{'is' if comp.get('edgetpu_friendly_model') else 'is NOT'} in the bundle) |")
            out += ["", f"_{e.get('sources', '')}_"]
    notes = results.get("notes") or []
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def write(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "targets": evaluate_targets(results)}
    js, md = out_dir / "results.json", out_dir / "RESULTS.md"
    js.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    md.write_text(render_markdown(results))
    return js, md
