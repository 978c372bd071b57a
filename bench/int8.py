"""int8 inference against the fp32 eager baseline, side by side in one process, and the int8 AUC check on real data.

Speed (random weights, `weights="none"`, one batch of random images in [0, 1]): for each backbone, in one process and
on the same weights, steps of these variants interleave (A B C D, then D C B A, ...):
- baseline: bench/throughput.py's inference baseline: `model.eval()`, `torch.no_grad()`, fp32 contiguous NCHW;
- ours: `alnus._hardware.choose_precision(cpu, "auto")` (bf16 autocast + channels_last here) under
  `torch.inference_mode()`; ours+compile: the same under `torch.compile` with inductor's weight freezing;
- ORT fp32: `alnus.export.export_onnx` in onnxruntime with `alnus.export.session_options`;
- ORT int8: `alnus.export.quantize_onnx` with the settings `alnus export --format onnx-int8` uses (static QDQ,
  per-channel int8 weights, uint8 activations), calibrated on random images, in the same session options;
- with `--tune`, the int8 alternatives: QOperator, per-tensor weights, symmetric activations, every convolution in
  int8, the first 7 convolutions in fp32, ORT without thread spinning, ORT's basic graph optimisations only, and
  other batch sizes.
A short pause after each step lets spinning thread pools of the previous variant go idle. images/s come from the
median step.

Real data (`--real PACKAGE`, default: the chosen model in runs/public_aux_birads): exports the package (`onnx` and
`onnx-int8`, calibrated and checked on its run's validation images, recorded in its metadata.json), then predicts the
run's external test images (split `external_test` of splits.csv, read through `alnus.predict`'s dataset path and the
run's image cache) with PyTorch fp32 and with ORT int8: both AUCs (DeLong 95% CI), the largest and median probability
difference, and the calls that change at the package's frozen threshold. Then, for information, other quantisation
settings calibrated on the same validation images, each scored on validation (where the export chooses) and on the
external test.

Writes the section between the int8 markers of docs/performance.md (other sections are kept).

Usage: .venv/bin/python bench/int8.py [--models inception_v3,efficientnet_lite0] [--batch 8] [--threads 2]
       [--rounds 12] [--warmup 2] [--tune] [--no-compile] [--real PACKAGE | --no-real] [--no-speed]
       [--save-json FILE] [--from-json FILE] [--out docs/performance.md] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _docs import write_section  # bench/ is on sys.path when a script here runs
from throughput import forward_flops, matmul_peak

from alnus._hardware import autocast, choose_precision, environment_info
from alnus._io import atomic_write_text
from alnus.export import QuantSettings, export_onnx, quantize_onnx, session_options
from alnus.models import create_model, get_spec

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "performance.md"
DEFAULT_REAL = REPO / "runs" / "public_aux_birads" / "models" / "efficientnet_lite0" / "model"  # the chosen model
DEVICE = torch.device("cpu")
# Speed-ups of int8 over the fp32 eager baseline that issue 9 asks for.
GOALS = {"inception_v3": 4.5, "efficientnet_lite0": 3.5}
MAX_AUC_DROP = 0.005
# A variant whose slowest step took over this multiple of its fastest was disturbed by other jobs.
NOISY = 1.5
# Seconds of idle time after each step (spinning worker threads of the variant that just ran stop competing).
PAUSE = 0.05
CALIBRATION_IMAGES = 32


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def int8_matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """Best TOP/s of `repeats` n x n int8 matmuls with int32 accumulation (`torch._int_mm`, oneDNN's VNNI path)."""
    a = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    torch._int_mm(a, b)
    return 2 * n**3 / min(_timed(lambda: torch._int_mm(a, b)) for _ in range(repeats)) / 1e12


def measure_peaks(peaks: dict[str, float]) -> None:
    """Raise `peaks` to the best fp32, bf16 and int8 matmul rates measured now (the quietest moment counts)."""
    for name, rate in (
        ("fp32", lambda: matmul_peak(torch.float32)),
        ("bf16", lambda: matmul_peak(torch.bfloat16)),
        ("int8", int8_matmul_peak),
    ):
        peaks[name] = max(peaks.get(name, 0.0), rate())
    print("matmul peaks so far (TFLOP/s, int8 TOP/s): " + ", ".join(f"{k} {v:.3f}" for k, v in peaks.items()))


def _ort_session(graph: bytes, threads: int, *, spinning: bool = True, level: str = "all") -> Any:
    import onnxruntime as ort

    options = session_options(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if level == "basic":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _ort_step(session: Any, x: np.ndarray) -> Callable[[], object]:
    return lambda: session.run(None, {"image": x})


def make_variants(
    name: str, batch: int, threads: int, *, compile_ours: bool, tune: bool
) -> tuple[dict[str, Callable[[], object]], dict[str, Any]]:
    """The steps to time for one backbone (name -> one forward pass of the batch) and what was measured on the way
    (export and quantisation seconds, compile seconds, graph sizes)."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, weights="none").eval()
    x = torch.rand(batch, 1, spec.input_size, spec.input_size)
    info: dict[str, Any] = {"size": spec.input_size, "gflops": forward_flops(model, spec.input_size) / 1e9}

    def baseline() -> None:
        with torch.no_grad():
            model(x)

    precision = choose_precision(DEVICE, "auto")
    info["ours"] = precision.reason
    layout = torch.channels_last if precision.channels_last else torch.contiguous_format
    ours_model = copy.deepcopy(model).to(memory_format=layout).eval()
    x_ours = x.contiguous(memory_format=layout)

    def ours(forward: Callable[[torch.Tensor], torch.Tensor] = ours_model) -> None:
        with torch.inference_mode(), autocast(DEVICE, precision):
            forward(x_ours)

    steps: dict[str, Callable[[], object]] = {"baseline": baseline, "ours": ours}
    if compile_ours:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(copy.deepcopy(ours_model))
        info["compile_s"] = _timed(lambda: ours(compiled))
        steps["ours+compile"] = lambda: ours(compiled)

    start = time.perf_counter()
    fp32 = export_onnx(copy.deepcopy(model), spec.input_size)
    info["export_s"] = time.perf_counter() - start
    calibration = np.random.default_rng(0).random((CALIBRATION_IMAGES, 1, spec.input_size, spec.input_size))
    calibration = calibration.astype(np.float32)
    xn = x.numpy()
    steps["ORT fp32"] = _ort_step(_ort_session(fp32, threads), xn)
    default = QuantSettings()
    settings = {"ORT int8": default}
    if tune:
        settings |= {
            "int8 QOperator": replace(default, quant_format="QOperator"),
            "int8 per-tensor": replace(default, per_channel=False),
            "int8 act. symmetric": replace(default, activation_symmetric=True),
            "int8 all convs int8": replace(default, fp32_convs=0),
            "int8 first 7 convs fp32": replace(default, fp32_convs=7),
        }
    graphs = {}
    for label, chosen in settings.items():
        start = time.perf_counter()
        graphs[label] = quantize_onnx(fp32, calibration, chosen)
        info.setdefault("quantize_s", {})[label] = time.perf_counter() - start
        steps[label] = _ort_step(_ort_session(graphs[label], threads), xn)
    info["settings"] = {label: asdict(s) for label, s in settings.items()}
    info["mb"] = {"fp32": len(fp32) / 2**20, "int8": len(graphs["ORT int8"]) / 2**20}
    if tune:
        steps["int8 no spinning"] = _ort_step(_ort_session(graphs["ORT int8"], threads, spinning=False), xn)
        steps["int8 basic graph opt."] = _ort_step(_ort_session(graphs["ORT int8"], threads, level="basic"), xn)
    return steps, info


def alternate(steps: dict[str, Callable[[], object]], rounds: int, times: dict[str, list[float]] | None) -> None:
    """`rounds` steps of every variant, in forward and reverse order on alternate rounds."""
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            elapsed = _timed(steps[name])
            if times is not None:
                times.setdefault(name, []).append(elapsed)
            time.sleep(PAUSE)


def batch_sweep(name: str, threads: int, batches: list[int], rounds: int) -> dict[str, float]:
    """images/s of the default int8 export at other batch sizes (steps interleaved across sizes)."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, weights="none").eval()
    fp32 = export_onnx(model, spec.input_size)
    calibration = np.random.default_rng(0).random((CALIBRATION_IMAGES, 1, spec.input_size, spec.input_size))
    session = _ort_session(quantize_onnx(fp32, calibration.astype(np.float32)), threads)
    rng = np.random.default_rng(1)
    steps = {
        str(b): _ort_step(session, rng.random((b, 1, spec.input_size, spec.input_size), dtype=np.float32))
        for b in batches
    }
    times: dict[str, list[float]] = {}
    alternate(steps, 1, None)
    alternate(steps, rounds, times)
    return {b: int(b) / statistics.median(t) for b, t in times.items()}


def measure_speed(args: argparse.Namespace, peaks: dict[str, float]) -> list[dict[str, Any]]:
    results = []
    measure_peaks(peaks)
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        t0 = time.perf_counter()
        steps, info = make_variants(name, args.batch, args.threads, compile_ours=args.compile, tune=args.tune)
        times: dict[str, list[float]] = {}
        alternate(steps, args.warmup, None)
        alternate(steps, args.rounds, times)
        result = {
            "name": name,
            **info,
            "images_per_s": {k: args.batch / statistics.median(v) for k, v in times.items()},
            "step_s": times,
        }
        if args.tune:
            result["batch_sweep"] = batch_sweep(name, args.threads, [1, args.batch, 4 * args.batch], args.rounds)
        results.append(result)
        base = result["images_per_s"]["baseline"]
        summary = ", ".join(f"{k} {v:.1f} ({v / base:.2f}x)" for k, v in result["images_per_s"].items())
        print(f"{name}: {summary} img/s ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = False
            torch._dynamo.reset()
        measure_peaks(peaks)
    return results


# -- real data ----------------------------------------------------------------------------------------------------


def external_images(package: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """The package's run's external test images as its network sees them (predict's dataset path, the run cache)."""
    import warnings

    from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset
    from alnus.export import package_run
    from alnus.models.package import read_metadata
    from alnus.runfolder import RunFolder, read_splits

    run = package_run(package)
    if run is None:
        raise SystemExit(f"{package} is not inside a run folder; pass the package of a run (runs/<name>/models/...)")
    meta = read_metadata(package)
    table = read_splits(run)
    rows = table[table["split"] == "external_test"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = UltrasoundDataset(
            rows,
            run,
            PreprocessSpec.from_dict(meta["preprocess"]),
            cache=ImageCache(RunFolder(run).cache),
            positive_label=meta["positive_label"],
        )
    dataset.warm()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()
    return x, dataset.targets, rows.reset_index(drop=True)


def measure_real(package: Path, threads: int) -> dict[str, Any]:
    """Export the package (fp32 and int8, as `alnus export` does), then compare PyTorch fp32 and ORT int8 on the
    external test images."""
    from alnus.export import OnnxEngine, export_package, torch_probabilities
    from alnus.models.package import load_package
    from alnus.operating_point import apply_operating_point
    from alnus.stats import auc_ci

    started = time.perf_counter()
    records = {kind: export_package(package, kind, progress=print) for kind in ("onnx", "onnx-int8")}
    export_s = time.perf_counter() - started
    model, meta = load_package(package)
    x, y, rows = external_images(package)
    probs = {"torch fp32": torch_probabilities(model, x)}
    for kind, label in (("onnx", "ORT fp32"), ("onnx-int8", "ORT int8")):
        probs[label] = OnnxEngine(package, kind, threads=threads)(x).astype(np.float64)
    out: dict[str, Any] = {
        "package": str(package.relative_to(REPO)) if package.is_relative_to(REPO) else package.name,
        "backbone": meta["backbone"],
        "positive_label": meta["positive_label"],
        "sites": sorted(rows["site"].unique()) if "site" in rows else [],
        "n_patients": int(rows["patient_id"].nunique()),
        "n_images": len(y),
        "n_positive": int(y.sum()),
        "export_s": export_s,
        "exports": {
            kind: {k: r[k] for k in ("max_abs_diff", "n_images", "auc_torch", "auc_int8", "calibration") if k in r}
            for kind, r in records.items()
        },
        "auc": {},
    }
    for label, p in probs.items():
        result = auc_ci(y, p, method="delong")
        out["auc"][label] = {"auc": result.estimate, "ci": [result.ci_low, result.ci_high]}
    diff = np.abs(probs["ORT int8"] - probs["torch fp32"])
    out["int8_max_abs_diff"] = float(diff.max())
    out["int8_median_abs_diff"] = float(np.median(diff))
    out["fp32_onnx_max_abs_diff"] = float(np.abs(probs["ORT fp32"] - probs["torch fp32"]).max())
    point = meta["threshold"]

    def calls_changed(p: np.ndarray) -> int | None:
        if point is None:
            return None
        calls = [apply_operating_point(rows.assign(prob=q), point)["call"].to_numpy() for q in (probs["torch fp32"], p)]
        return int((calls[0] != calls[1]).sum())

    if point is not None:
        out["threshold"] = {"value": point["value"], "level": point["level"]}
        out["calls_changed"] = calls_changed(probs["ORT int8"])
    out["alternatives"] = alternatives(package, x, y, probs["torch fp32"], calls_changed, threads)
    return out


def alternatives(
    package: Path,
    x_test: np.ndarray,
    y_test: np.ndarray,
    torch_test: np.ndarray,
    calls_changed: Callable[[np.ndarray], int | None],
    threads: int,
) -> list[dict[str, Any]]:
    """Other int8 settings, each calibrated on the run's validation images: validation and external test scores."""
    from alnus.export import calibration_images, read_export, torch_probabilities
    from alnus.models.package import load_package
    from alnus.stats import auc

    model, _ = load_package(package)
    images = calibration_images(package)
    x_val, y_val = images.x, images.y
    torch_val = torch_probabilities(model, x_val)
    fp32 = read_export(package, "onnx")[0]
    default = QuantSettings()
    chosen = {
        "minmax (default)": default,
        "percentile": replace(default, method="percentile"),
        "entropy": replace(default, method="entropy"),
        "minmax, every conv int8": replace(default, fp32_convs=0),
        "minmax, first 7 convs fp32": replace(default, fp32_convs=7),
        "minmax, per-tensor weights": replace(default, per_channel=False),
    }
    rows = []
    for label, settings in chosen.items():
        session = _ort_session(quantize_onnx(fp32, x_val, settings), threads)
        p_val = session.run(None, {"image": x_val})[0].astype(np.float64)
        p_test = session.run(None, {"image": x_test})[0].astype(np.float64)
        rows.append(
            {
                "settings": label,
                "val_auc": auc(y_val, p_val),
                "val_max_abs_diff": float(np.abs(p_val - torch_val).max()),
                "test_auc": auc(y_test, p_test),
                "test_max_abs_diff": float(np.abs(p_test - torch_test).max()),
                "test_median_abs_diff": float(np.median(np.abs(p_test - torch_test))),
                "calls_changed": calls_changed(p_test),
            }
        )
        print(rows[-1], flush=True)
    rows.insert(0, {"settings": "torch fp32", "val_auc": auc(y_val, torch_val), "test_auc": auc(y_test, torch_test)})
    return rows


# -- the section --------------------------------------------------------------------------------------------------


def _noisy(times: list[float]) -> bool:
    return max(times) / min(times) > NOISY


def _peak_kind(variant: str) -> str:
    """The arithmetic a variant runs its convolutions in."""
    if variant in ("baseline", "ORT fp32"):
        return "fp32"
    return "bf16" if variant.startswith("ours") else "int8"


def render_speed(run: dict[str, Any]) -> list[str]:
    results, settings = run["speed"], run["settings"]
    lines = [
        f"### Speed: batch {settings['batch']}, {settings['threads']} threads",
        "",
        "| backbone | px | GFLOPs/img | variant | img/s | x fp32 eager baseline | % of its matmul peak | step spread |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    peaks = run["peaks"]
    for r in results:
        base = r["images_per_s"]["baseline"]
        for variant, ips in r["images_per_s"].items():
            steps = r["step_s"][variant]
            spread = f"{max(steps) / min(steps):.2f}" + (" (noisy)" if _noisy(steps) else "")
            bold = "**" if variant in ("ORT int8", "baseline") else ""
            kind = _peak_kind(variant)
            share = f"{100 * ips * r['gflops'] / (1e3 * peaks[kind]):.0f}% {kind}"
            lines.append(
                f"| {r['name']} | {r['size']} | {r['gflops']:.2f} | {variant} | {ips:.1f} | {bold}{ips / base:.2f}x"
                f"{bold} | {share} | {spread} |"
            )
    lines += [
        "",
        f"- Matmul peaks measured in this run (best 4096 x 4096 matmul, {settings['threads']} threads, before, between "
        f"and after the backbones): fp32 {peaks['fp32']:.3f} TFLOP/s, bf16 {peaks['bf16']:.3f} TFLOP/s "
        f"({peaks['bf16'] / peaks['fp32']:.1f}x fp32), int8 {peaks['int8']:.3f} TOP/s (`torch._int_mm`, "
        f"{peaks['int8'] / peaks['bf16']:.1f}x bf16, {peaks['int8'] / peaks['fp32']:.1f}x fp32). The share column "
        "sets each variant's FLOPs (FlopCounterMode, forward) against the peak of the arithmetic it runs in.",
    ]
    fp32_share = max(
        r["images_per_s"][v] * r["gflops"] / (1e3 * peaks["fp32"]) for r in results for v in ("baseline", "ORT fp32")
    )
    if fp32_share > 1:
        lines.append(
            "- torch's fp32 matmul is not this CPU's fp32 limit: ORT's fp32 convolutions reach "
            f"{100 * fp32_share:.0f}% of it, so ratios to the fp32 peak (and the bf16 / fp32 ratio) overstate what "
            "bf16 adds over good fp32 code."
        )
    for r in results:
        ips = r["images_per_s"]
        best_ours = max(ips[k] for k in ("ours", "ours+compile") if k in ips)
        lines.append(
            f"- {r['name']}: ORT int8 is {ips['ORT int8'] / best_ours:.2f}x our best bf16 path "
            f"({'ours+compile' if ips.get('ours+compile', 0) >= ips['ours'] else 'ours'}) and "
            f"{ips['ORT int8'] / ips['ORT fp32']:.2f}x ORT fp32; ORT fp32 is {ips['ORT fp32'] / ips['ours']:.2f}x ours "
            "(eager bf16; `alnus predict` runs ONNX fp32 when exported, else PyTorch fp32)."
        )
    for r in results:
        if r["name"] in GOALS:
            got = r["images_per_s"]["ORT int8"] / r["images_per_s"]["baseline"]
            want = GOALS[r["name"]]
            verdict = "met" if got >= want else f"NOT met, {want / got:.2f}x short"
            lines.append(
                f"- Goal for {r['name']}: ORT int8 >= {want:g}x the fp32 eager baseline: **{got:.2f}x** ({verdict})."
            )
    for r in results:
        extra = [f"export {r['export_s']:.0f} s", f"int8 quantisation {r['quantize_s']['ORT int8']:.0f} s"]
        if "compile_s" in r:
            extra.append(f"torch.compile {r['compile_s']:.0f} s")
        lines.append(
            f"- {r['name']}: graph {r['mb']['fp32']:.1f} MiB fp32, {r['mb']['int8']:.1f} MiB int8; "
            + ", ".join(extra)
            + "."
        )
        if "batch_sweep" in r:
            sweep = ", ".join(f"batch {b}: {v:.1f}" for b, v in r["batch_sweep"].items())
            lines.append(f"- {r['name']}, ORT int8 images/s by batch size (interleaved): {sweep}.")
    lines += [
        f"- {settings['rounds']} timed steps per variant after {settings['warmup']} warm-up step(s), interleaved "
        f"(A B C D, then D C B A, ...) with a {PAUSE * 1000:.0f} ms pause after each step; images/s from the median "
        f"step. Spread = slowest / fastest step; (noisy): over {NOISY:g}, i.e. other jobs disturbed that variant. "
        'Random weights (`weights="none"`); int8 calibrated on '
        f"{CALIBRATION_IMAGES} random images (speed does not depend on the calibration).",
        f"- Ours: {run['speed'][0]['ours']}; ours+compile adds `torch.compile` with inductor weight freezing. "
        "ORT: onnxruntime's CPU provider with `alnus.export.session_options` (intra-op threads = "
        f"{settings['threads']}, all graph optimisations). ORT int8 = what `alnus export --format onnx-int8` writes: "
        "static QDQ, per-channel int8 weights, uint8 activations (VNNI's u8 x s8 products), MinMax calibration, "
        "first convolution, classifier head and sigmoid in fp32.",
    ]
    return lines


def render_real(real: dict[str, Any]) -> list[str]:
    auc = real["auc"]
    int8 = real["exports"]["onnx-int8"]
    drop = auc["torch fp32"]["auc"] - auc["ORT int8"]["auc"]
    sites = ", ".join(real["sites"]) or "not recorded"
    lines = [
        f"### Real data: {real['backbone']}, external test",
        "",
        f"`{real['package']}`: {real['n_images']} external test images of {real['n_patients']} patients (site: "
        f"{sites}; {real['n_positive']} {real['positive_label']}), image-level AUC with DeLong 95% CI:",
        "",
        "| engine | AUC (95% CI) |",
        "|---|---|",
    ]
    for label, a in auc.items():
        lines.append(f"| {label} | {a['auc']:.4f} ({a['ci'][0]:.3f}-{a['ci'][1]:.3f}) |")
    verdict = "met" if abs(drop) <= MAX_AUC_DROP else "NOT met"
    lines += [
        "",
        f"- Goal: int8 AUC within {MAX_AUC_DROP:g} of fp32 on the external test: fp32 minus int8 = {drop:+.4f} "
        f"(**{verdict}**).",
        f"- Largest probability difference, ORT int8 vs PyTorch fp32, over all {real['n_images']} test images: "
        f"**{real['int8_max_abs_diff']:.4f}** (median {real['int8_median_abs_diff']:.4f}); ORT fp32 vs PyTorch fp32: "
        f"{real['fp32_onnx_max_abs_diff']:.2g}.",
    ]
    if "calls_changed" in real:
        lines.append(
            f"- Calls that change at the package's frozen threshold ({real['threshold']['value']:.4g}, "
            f"{real['threshold']['level']} level): {real['calls_changed']} of {real['n_images']}."
        )
    cal = int8["calibration"]
    tried = "; ".join(f"{t['method']}: AUC {t['auc_int8']:.4f}, max diff {t['max_abs_diff']:.4f}" for t in cal["tried"])
    lines.append(
        f"- Export check on the run's validation split ({int8['n_images']} images, also the calibration images): AUC "
        f"fp32 {int8['auc_torch']:.4f}, int8 {int8['auc_int8']:.4f}, largest difference {int8['max_abs_diff']:.4f}; "
        f"calibration tried: {tried}; kept: {cal['method']}. fp32 export: largest difference "
        f"{real['exports']['onnx']['max_abs_diff']:.2g} on the same images (limit 1e-4). Both exports took "
        f"{real['export_s']:.0f} s together."
    )
    if real.get("alternatives"):
        lines += [
            "",
            "Other int8 settings, each calibrated on the same validation images (the export chooses on validation "
            "only; the external test columns are for information):",
            "",
            "| settings | val AUC | val max diff | test AUC | test max diff | test median diff | calls changed |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for a in real["alternatives"]:
            cells = [a["settings"], f"{a['val_auc']:.4f}"]
            cells += [f"{a[k]:.4f}" if k in a else "-" for k in ("val_max_abs_diff",)]
            cells.append(f"{a['test_auc']:.4f}")
            cells += [f"{a[k]:.4f}" if k in a else "-" for k in ("test_max_abs_diff", "test_median_abs_diff")]
            cells.append(str(a["calls_changed"]) if a.get("calls_changed") is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _arithmetic(flags: list[str]) -> str:
    """The CPU's low-precision instruction sets, in words, from its flags."""
    names = {"avx512_bf16": "AVX512-BF16", "avx512_vnni": "AVX512-VNNI", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}
    found = [name for flag, name in names.items() if flag in flags]
    amx = any(flag.startswith("amx") for flag in flags)
    if not found:
        return "none of AVX512-BF16, AVX512-VNNI or AMX"
    listed = found[0] if len(found) == 1 else f"{', '.join(found[:-1])} and {found[-1]}"
    return listed + ("" if amx else ", no AMX")


def render(run: dict[str, Any]) -> str:
    cpu = run["env"]["cpu"]
    sections = [
        "## int8 inference (ONNX Runtime) against the fp32 eager baseline",
        "",
        "`alnus export PACKAGE --format onnx-int8` (see `alnus.export`): ONNX Runtime's static int8 (QDQ), against "
        "the fp32 eager baseline of the throughput section and against our bf16 path. This CPU has "
        f"{_arithmetic(cpu['flags'])}; the matmul peaks below bound what each arithmetic can give.",
        "",
    ]
    if run.get("speed"):
        sections += render_speed(run) + [""]
    if run.get("real"):
        sections += render_real(run["real"]) + [""]
    sections += [
        f"- Hardware: {cpu['model']}, {cpu['usable_cores']} usable cores, flags {', '.join(cpu['flags'])}; torch "
        f"{run['env']['torch']}, onnxruntime {run['versions']['onnxruntime']}, onnx {run['versions']['onnx']}.",
        f"- The machine is shared: load average (1 min) {run['load']:.2f} at the start; variants interleave step by "
        "step so that other jobs slow them alike, and medians are reported.",
        f"- Date: {run['date']}; the whole run took {run['minutes']:.1f} min.",
        f"- Command: `{run['command']}`"
        + (
            f"; section written from its saved measurements by `{run['rendered_by']}`" if run.get("rendered_by") else ""
        ),
    ]
    return "\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="inception_v3,efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--tune", action="store_true", help="also time the int8 alternatives and batch sizes")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip ours+compile")
    parser.add_argument("--no-speed", action="store_true", help="only the real-data check")
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL, help="package of the real-data check")
    parser.add_argument("--no-real", action="store_true", help="only the speed measurements")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--save-json", type=Path)
    parser.add_argument("--from-json", type=Path)
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "bench/int8.py", *(sys.argv[1:] if argv is None else argv)])
    if not (args.from_json or args.no_real or (args.real / "metadata.json").is_file()):
        # Checked before the speed measurements, which take minutes.
        parser.error(
            f"--real {args.real}: no model package there (no metadata.json); train it (bench/public_configs.py "
            "--only aux_birads), pass --real PACKAGE (a package inside its run folder), or --no-real"
        )
    if args.from_json:
        run = json.loads(args.from_json.read_text())
        run["rendered_by"] = f"bench/int8.py --from-json {args.from_json}"
    else:
        torch.set_num_threads(args.threads)
        started, load = time.perf_counter(), os.getloadavg()[0]
        peaks: dict[str, float] = {}
        run = {
            "command": command,
            "settings": {k: getattr(args, k) for k in ("batch", "threads", "rounds", "warmup", "tune")},
            "speed": None if args.no_speed else measure_speed(args, peaks),
            "peaks": peaks,
            "real": None if args.no_real else measure_real(args.real.resolve(), args.threads),
            "env": environment_info(),
            "versions": {m: __import__(m).__version__ for m in ("onnx", "onnxruntime")},
            "load": load,
            "date": dt.date.today().isoformat(),
        }
        run["minutes"] = (time.perf_counter() - started) / 60
    if args.save_json:
        atomic_write_text(args.save_json, json.dumps(run, indent=1, default=str))
    section = render(run)
    print(section)
    if not args.no_write:
        write_section(args.out, "int8", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
