"""ONNX export of a model package, int8 quantisation calibrated on the run's validation images, and the ONNX Runtime
engines that run them.

`export_package(PACKAGE, "onnx")` writes `model.onnx` into the package: the package's network taking the batch that
`alnus.predict.Predictor.predict_batch` feeds, `(B, 1, H, W)` float32 in [0, 1], and returning the positive-class
probability `(B,)`: the sigmoid is inside the graph, so every consumer of the file gets probabilities without knowing
the model's head. The batch axis is dynamic. The graph comes from PyTorch's torch.export-based exporter
(`torch.onnx.export(..., dynamo=True)`, onnxscript): the maintained exporter (the TorchScript one is deprecated), which
exports every registered backbone and folds batch norm into the convolutions. Before the file is kept, PyTorch fp32
and ONNX Runtime run on real images: the validation split of the run the package was trained in (or `calibration`),
through the package's own preprocessing; the largest probability difference is recorded and an fp32 export over
`FP32_MAX_ABS_DIFF` is refused (no file kept).

`export_package(PACKAGE, "onnx-int8")` writes `model-int8.onnx`: onnxruntime's static quantisation (QDQ, per-channel
int8 weights, uint8 activations: VNNI's u8 x s8 dot products) after `quant_pre_process`, calibrated on the same
validation images. The classifier head and the sigmoid stay fp32 (a uint8 probability would have 256 values). Its
parity rule differs: the largest probability difference and the AUC of PyTorch fp32 and of int8 on the calibration
split are recorded and shown; the export is refused only when the int8 AUC is more than `INT8_MAX_AUC_DROP` below
fp32's. With `method="auto"` the calibration methods are tried in `AUTO_METHODS` order and the first that holds the
AUC is kept; every try is recorded.

Each export is recorded under `exports.<kind>` in the package's metadata.json (`alnus.models.package.record_export`,
checked by `read_metadata`); the weights and their hash are not touched. An ONNX file is never loaded unless its bytes
have the SHA-256 recorded there and it was made from the package's current weights, and it must be a plain graph:
one input `image`, one output `probability`, no external data, only the standard and onnxruntime operator domains.

`OnnxEngine(package, kind)` runs an export in onnxruntime; `available_engines(package)` lists the engines a package
offers, fastest first (measured by bench/int8.py; the numbers are in docs/performance.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alnus._io import NotAFileError, atomic_write_bytes, file_problem, open_regular
from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset
from alnus.errors import AlnusError
from alnus.models.package import (
    EXPORT_FILES,
    METADATA_FILE,
    is_ensemble,
    load_package,
    package_lock,
    read_metadata,
    record_export,
)
from alnus.runfolder import RunFolder, lock_run, read_splits

# The engines prediction can run on: PyTorch (always) and the exports a package may hold.
ENGINES = ("torch", "onnx", "onnx-int8")
EXPORTS = tuple(EXPORT_FILES)
# Fastest first as bench/int8.py measures it (docs/performance.md): int8 beats every other engine; fp32 ONNX Runtime
# beats eager PyTorch for some backbones and not for others, and is listed before it because it also matches fp32.
_SPEED_ORDER = ("onnx-int8", "onnx")
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
# The torch.export-based exporter writes opset 18 and later.
DEFAULT_OPSET = 18
MIN_OPSET = 18
# Largest |p_onnx - p_torch| an fp32 export may show on the calibration images, else it is refused.
FP32_MAX_ABS_DIFF = 1e-4
# An int8 export is refused when its AUC on the calibration split is more than this below PyTorch fp32's.
INT8_MAX_AUC_DROP = 0.005
CALIBRATION_SPLIT = "val"
# Calibration and parity use at most this many validation images (spread evenly over the split).
MAX_CALIBRATION_IMAGES = 500
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# `method="auto"`: tried in this order (cheapest first) until one holds the AUC.
AUTO_METHODS = CALIBRATION_METHODS
# Images per forward pass when running the parity checks.
_BATCH = 16
# Protocol buffers cannot hold more; a larger file is not one of ours.
MAX_ONNX_BYTES = 2**31 - 1
# Operator domains a package's graph may use: the standard ones and onnxruntime's own.
_ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})


class ExportError(AlnusError):
    """An export that cannot be made, is refused by its parity check, or cannot be loaded; says what to do."""


@dataclass(frozen=True)
class QuantSettings:
    """How onnxruntime quantises a graph statically (recorded with the int8 export)."""

    method: str = "minmax"
    quant_format: str = "QDQ"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    activation_symmetric: bool = False
    # Leading convolutions kept in fp32. The first sees the normalised image, (x - 0.5) / 0.5 for most backbones:
    # its 8-bit grid has a half-step offset there, which merges pairs of grey levels; early high-resolution layers
    # are also the most sensitive to activation rounding. The first costs no speed (docs/performance.md).
    fp32_convs: int = 1


class _Probability(nn.Module):
    """The package's network with its sigmoid: `(B, 1, H, W)` in [0, 1] -> positive-class probability `(B,)`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_onnx() -> None:
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise ExportError(
                f"ONNX export needs the {module} package, which is not installed: pip install onnx onnxruntime "
                "onnxscript"
            ) from None


# -- calibration images -------------------------------------------------------------------------------------------


def package_run(package_dir: str | os.PathLike[str]) -> Path | None:
    """The run folder a package sits in (`runs/<name>/models/<backbone>/model`), or None when it is elsewhere."""
    package = Path(package_dir).resolve()
    if package.name != "model" or package.parent.parent.name != "models":
        return None
    run = package.parent.parent.parent
    return run if RunFolder(run).model(package.parent.name).package == package else None


@dataclass(frozen=True)
class CalibrationImages:
    """The images an export is calibrated and checked on, as the package's network sees them: `x` `(N, 1, S, S)`
    float32 in [0, 1], `y` `(N,)` 0/1, and where they came from (`checked_on` as recorded, `where` as said)."""

    x: np.ndarray
    y: np.ndarray
    checked_on: dict[str, str]
    where: str
    note: str = ""  # rows of a manifest left out (a class the model does not know), said to the user


def calibration_images(
    package_dir: str | os.PathLike[str],
    calibration: str | os.PathLike[str] | None = None,
    *,
    max_images: int = MAX_CALIBRATION_IMAGES,
) -> CalibrationImages:
    """The validation images of a run, or the images of a labelled manifest, as the package's network sees them
    (through the package's preprocessing; a run's images through its image cache).

    Args:
        calibration: a run folder, or a labelled manifest (CSV: image, label, patient_id and the lesion boxes it needs;
            rows of a class the model does not know are left out); None: the run the package sits in.
        max_images: at most this many, spread evenly over the split or manifest (in its order).
    """
    meta = read_metadata(package_dir)
    if calibration is not None and Path(calibration).is_file():
        return _manifest_images(meta, Path(calibration), max_images)
    if calibration is not None and Path(calibration).exists() and not Path(calibration).is_dir():
        raise ExportError(
            f"--calibration {calibration} is neither a run folder nor a manifest file (a pipe or a device?); pass "
            f"runs/<name> or {MANIFEST_HINT}"
        )
    if calibration is not None and Path(calibration).suffix.lower() == ".csv" and Path(calibration).is_dir():
        raise ExportError(f"--calibration {calibration} is a folder, not a manifest file; pass the CSV file itself")
    run_dir = Path(calibration) if calibration is not None else package_run(package_dir)
    if run_dir is None:
        raise ExportError(
            f"{package_dir} is not inside a run folder, so it has no validation images to check the export on; pass "
            f"--calibration runs/<name> (the run the package was trained in) or --calibration {MANIFEST_HINT}"
        )
    if not RunFolder(run_dir).splits.is_file():
        raise ExportError(
            f"calibration run {run_dir} not found or not prepared (no {RunFolder(run_dir).splits.name}); pass "
            f"--calibration runs/<name> (the run the package was trained in) or {MANIFEST_HINT}"
        )
    table = read_splits(run_dir)
    rows = table[table["split"] == CALIBRATION_SPLIT]
    if rows.empty:
        raise ExportError(
            f"calibration run {run_dir} has no {CALIBRATION_SPLIT} images; pass --calibration a run with a "
            f"validation split, or {MANIFEST_HINT}"
        )
    unknown = sorted(set(rows["label"]) - set(meta["label_names"]))
    if unknown:
        raise ExportError(
            f"calibration run {run_dir} has labels {unknown} that package {package_dir} does not know "
            f"({meta['label_names']}); pass --calibration the run the package was trained in"
        )
    checked_on = {"run": Path(run_dir).name, "split": CALIBRATION_SPLIT}
    where = f"{CALIBRATION_SPLIT} images of run {run_dir}"
    cache = ImageCache(RunFolder(run_dir).cache)
    return _images(meta, _spread(rows, max_images), Path(run_dir), cache, checked_on, where)


# What to pass instead of a run: a labelled manifest (a model shipped on its own has no run folder).
MANIFEST_HINT = "a labelled manifest of validation images (CSV with image, label, patient_id and the lesion boxes)"


def _manifest_images(meta: Mapping[str, Any], manifest: Path, max_images: int) -> CalibrationImages:
    """A labelled manifest's images (checked as `alnus threshold` checks its manifest; other classes left out)."""
    from alnus.data.manifest import labelled_table

    table, left_out = labelled_table(manifest, dict(meta), "an export is checked", leave_out=True)
    checked_on = {"manifest": manifest.name}
    images = _images(meta, _spread(table, max_images), manifest.parent, None, checked_on, f"images of {manifest}")
    return dataclasses.replace(images, note=left_out)


def _spread(rows: Any, max_images: int) -> Any:
    """At most `max_images` rows, spread evenly over the table (in its order)."""
    if len(rows) > max_images:
        rows = rows.iloc[np.linspace(0, len(rows) - 1, max_images).round().astype(int)]
    return rows.reset_index(drop=True)


def _images(
    meta: Mapping[str, Any], rows: Any, root: Path, cache: ImageCache | None, checked_on: dict[str, str], where: str
) -> CalibrationImages:
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    with warnings.catch_warnings():
        # One class only is said where it matters (the int8 check); an fp32 export needs no labels.
        warnings.filterwarnings("ignore", message="no row has label")
        dataset = UltrasoundDataset(rows, root, spec, cache=cache, positive_label=meta["positive_label"])
    dataset.warm()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()
    return CalibrationImages(
        np.ascontiguousarray(x, dtype=np.float32), dataset.targets.astype(np.int64), checked_on, where
    )


# -- export and quantisation -------------------------------------------------------------------------------------


def export_onnx(model: nn.Module, size: int, *, opset: int = DEFAULT_OPSET) -> bytes:
    """The network (fp32, eval) as ONNX bytes: input `image` (batch, 1, size, size), output `probability` (batch,)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset!r} is not supported; choose {MIN_OPSET} to {newest} (default {DEFAULT_OPSET})")
    wrapped = _Probability(model.float().eval()).eval()
    example = torch.rand(2, 1, size, size)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped,
                (example,),
                None,
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        raise ExportError(f"the ONNX exporter could not export this network ({type(exc).__name__}: {exc})") from exc
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _head_nodes(model: Any) -> list[str]:
    """Nodes from the last matrix product (the classifier) to the output: kept in fp32 by the quantiser."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names, frontier = [], [o.name for o in model.graph.output]
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.name in names:
            continue
        names.append(node.name)
        if node.op_type not in ("Gemm", "MatMul"):
            frontier.extend(node.input)
    return names


def _leading_convs(model: Any, n: int) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type == "Conv"][:n]


def quantize_onnx(fp32: bytes, calibration: np.ndarray, settings: QuantSettings = QuantSettings()) -> bytes:
    """Static int8 quantisation of an fp32 export, calibrated on `calibration` `(N, 1, S, S)` images.

    onnxruntime's `quant_pre_process` (shape inference, graph clean-up) first, then `quantize_static`; the classifier
    head and sigmoid are excluded (see the module docstring).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if settings.method not in methods:
        raise ExportError(f"calibration method {settings.method!r} unknown; choose {', '.join(CALIBRATION_METHODS)}")
    if isinstance(settings.fp32_convs, bool) or not isinstance(settings.fp32_convs, int) or settings.fp32_convs < 0:
        raise ExportError(f"fp32_convs must be a whole number >= 0, got {settings.fp32_convs!r}")
    if settings.quant_format not in ("QDQ", "QOperator") or not {settings.activation_type, settings.weight_type} <= set(
        types
    ):
        raise ExportError(f"quantisation settings {settings} are not supported (QDQ or QOperator, uint8 or int8)")

    # Batches of one size (the histogram collectors stack a chunk's arrays), handed over one batch per chunk
    # (onnxruntime's strided calibration), so only one batch of intermediate outputs is held in memory at a time.
    size = max(d for d in range(1, _BATCH + 1) if len(calibration) % d == 0)
    batches = [calibration[i : i + size] for i in range(0, len(calibration), size)]

    class Batches(CalibrationDataReader):
        """The calibration images in equal batches; `set_range` selects the chunk being collected."""

        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._batches = iter(batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self._batches, None)
            return None if chunk is None else {INPUT_NAME: chunk}

    with tempfile.TemporaryDirectory(prefix="alnus-quant-") as tmp:
        source, prepared, output = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(fp32)
        quant_pre_process(str(source), str(prepared))
        graph = onnx.load(str(prepared))
        excluded = _head_nodes(graph) + _leading_convs(graph, settings.fp32_convs)
        quantize_static(
            str(prepared),
            str(output),
            Batches(),
            quant_format=QuantFormat.QDQ if settings.quant_format == "QDQ" else QuantFormat.QOperator,
            per_channel=settings.per_channel,
            reduce_range=False,
            activation_type=types[settings.activation_type],
            weight_type=types[settings.weight_type],
            nodes_to_exclude=excluded,
            calibrate_method=methods[settings.method],
            extra_options={
                "ActivationSymmetric": settings.activation_symmetric,
                "WeightSymmetric": True,
                "CalibStridedMinMax": 1,
            },
        )
        return output.read_bytes()


# -- running a graph ----------------------------------------------------------------------------------------------


def session_options(threads: int | None = None) -> Any:
    """onnxruntime session options for this CPU: one intra-op thread per usable core (or `threads`), all graph
    optimisations, operators run in sequence."""
    import onnxruntime as ort

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ExportError(f"threads must be a positive whole number, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _session(graph: bytes, threads: int | None = None) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(graph, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"onnxruntime cannot load the graph ({type(exc).__name__}: {str(exc)[:300]})") from exc


def _run(session: Any, x: np.ndarray, batch: int = _BATCH) -> np.ndarray:
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(np.float64) if out else np.empty(0)


def torch_probabilities(model: nn.Module, x: np.ndarray, batch: int = _BATCH) -> np.ndarray:
    """The reference: PyTorch fp32, eval mode, contiguous NCHW, `(N,)` probabilities."""
    model = model.float().eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(torch.sigmoid(model(torch.from_numpy(x[i : i + batch]))).double().numpy())
    return np.concatenate(out) if out else np.empty(0)


def _one_class(images: CalibrationImages) -> str:
    return (
        f"the {images.where} are of one class only, so the int8 export's AUC cannot be checked; pass --calibration a "
        "run whose validation split has both classes, or a manifest that has both"
    )


def _auc(y: np.ndarray, p: np.ndarray, images: CalibrationImages) -> float:
    from alnus.stats import auc

    if len(set(y.tolist())) < 2:
        raise ExportError(_one_class(images))
    return auc(y, p)


def _check_reference(reference: np.ndarray, package: Path, images: CalibrationImages) -> None:
    """PyTorch's probabilities, the reference of every check, must be probabilities: NaN weights give none."""
    bad = ~(np.isfinite(reference) & (reference >= 0) & (reference <= 1))
    if bad.any():
        raise ExportError(
            f"the network of {package} gives {float(reference[bad][0]):g} as a probability for {int(bad.sum())} of "
            f"{len(reference)} {images.where}; a probability is a number from 0 to 1, so its weights are damaged: "
            "restore the package from its source; there is nothing to export."
        )


# -- the export command -------------------------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _base_record(kind: str, graph: bytes, meta: Mapping[str, Any], opset: int, size: int) -> dict[str, Any]:
    return {
        "file": EXPORT_FILES[kind],
        "sha256": _sha256(graph),
        "weights_sha256": meta["weights_sha256"],
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "input": {"name": INPUT_NAME, "shape": ["batch", 1, size, size], "dtype": "float32", "range": [0, 1]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch"], "meaning": "positive-class probability (sigmoid in graph)"},
        "versions": {n: _version(n) for n in ("onnx", "onnxruntime", "onnxscript", "torch")},
        "created": _now(),
    }


@contextlib.contextmanager
def _package_lock(package_dir: Path) -> Iterator[None]:
    """Hold the writer lock of the run the package sits in (evaluate rewrites the same metadata.json); a package on
    its own, its folder's lock (two exports at once could leave one's file under the other's record)."""
    run = package_run(package_dir)
    if run is None:
        with package_lock(package_dir):
            yield
        return
    with lock_run(run, command="alnus export"):
        yield


def export_package(
    package_dir: str | os.PathLike[str],
    kind: str = "onnx",
    *,
    calibration: str | os.PathLike[str] | None = None,
    opset: int = DEFAULT_OPSET,
    method: str = "auto",
    max_images: int = MAX_CALIBRATION_IMAGES,
    settings: QuantSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export a package's network to ONNX (`kind="onnx"`) or int8 ONNX (`"onnx-int8"`), check it on the
    calibration run's validation images and record it in metadata.json; return the record.

    Args:
        calibration: the run whose validation images calibrate and check the export (None: the package's own run).
        method: int8 calibration: `auto` or one of CALIBRATION_METHODS.
        settings: int8 quantisation settings (their `method` is replaced by `method`).
        progress: called with a line of text at each step.

    Raises:
        ExportError: the export fails, or its parity check refuses it (then no file is kept).
    """
    say = progress or (lambda _text: None)
    if kind not in EXPORTS:
        raise ExportError(f"unknown export format {kind!r}; choose {', '.join(EXPORTS)}")
    if method != "auto" and method not in CALIBRATION_METHODS:
        raise ExportError(f"calibration method {method!r} unknown; choose auto, {', '.join(CALIBRATION_METHODS)}")
    package = Path(package_dir)
    _refuse_ensemble(package, kind)
    _require_onnx()
    with _package_lock(package):
        model, meta = load_package(package)
        size = int(meta["preprocess"]["size"])
        images = calibration_images(package, calibration, max_images=max_images)
        x = images.x
        say(f"{len(x)} {images.where}" + (f" ({images.note})" if images.note else ""))
        if kind == "onnx-int8" and len(set(images.y.tolist())) < 2:
            raise ExportError(_one_class(images))  # before any export work: the int8 check needs both classes
        reference = torch_probabilities(model, x)
        _check_reference(reference, package, images)
        fp32 = _reusable_fp32(package, meta, opset) if kind == "onnx-int8" else None
        if fp32 is not None:
            _check_fp32(fp32, images, reference)  # the recorded export, checked again on these images before reuse
        else:
            say(f"exporting {meta['backbone']} (opset {opset})")
            fp32 = export_onnx(model, size, opset=opset)
        if kind == "onnx":
            record = _check_fp32(fp32, images, reference)
        else:
            record = _quantize_checked(fp32, images, reference, method, settings or QuantSettings(), say)
        graph = record.pop("graph")
        record = {**_base_record(kind, graph, meta, opset, size), **record}
        # The file first, then the record naming its hash: a crash between leaves a file no record vouches for.
        atomic_write_bytes(package / EXPORT_FILES[kind], graph)
        record_export(package, kind, record)
    return record


def _refuse_ensemble(package: Path, kind: str) -> None:
    """An ensemble is several networks, not one graph: each member is exported from its own package, before building."""
    meta = read_metadata(package)
    if not is_ensemble(meta):
        return
    if meta.get("adaptation"):
        raise ExportError(
            f"{package} is an adapted ensemble ({meta['backbone']}); an export is one network's graph. Export each "
            f"member inside it, {package}/members/1 to {package}/members/{len(meta['members'])}, with `alnus export "
            f"{package}/members/<i> --format {kind} --calibration RUN` (RUN: the run the members were trained in); "
            "the ensemble then runs each member on its checked export. Its sources' exports would undo the adaptation."
        )
    sources = ", ".join(str(m["source"]) for m in meta["members"])
    raise ExportError(
        f"{package} is an ensemble ({meta['backbone']}); an export is one network's graph, so an ensemble is not "
        f"exported as one. Export each member's own package ({sources}) with `alnus export PKG --format {kind}`, then "
        "build the ensemble again (`alnus ensemble RUN --name NAME --member PKG ... --force` copies each member's "
        "checked exports); `--engine auto` then runs every member on its fp32 ONNX export"
    )


def _reusable_fp32(package: Path, meta: Mapping[str, Any], opset: int) -> bytes | None:
    """The package's fp32 export when it is current (same weights, opset, intact), to quantise without re-exporting."""
    record = meta["exports"].get("onnx")
    if not record or record["opset"] != opset or record["weights_sha256"] != meta["weights_sha256"]:
        return None
    try:
        return read_export(package, "onnx")[0]
    except ExportError:
        return None


def _check_fp32(graph: bytes, images: CalibrationImages, reference: np.ndarray) -> dict[str, Any]:
    diff = float(np.abs(_run(_session(graph), images.x) - reference).max())
    if not diff <= FP32_MAX_ABS_DIFF:  # also refuses NaN
        raise ExportError(
            f"the ONNX export differs from PyTorch by up to {diff:.3g} in probability on {len(images.x)} "
            f"{images.where} (allowed {FP32_MAX_ABS_DIFF:g}); it was not kept. Report this with the backbone name; "
            "predict with --engine torch meanwhile"
        )
    return {
        "graph": graph,
        "max_abs_diff": diff,
        "tolerance": FP32_MAX_ABS_DIFF,
        "n_images": len(images.x),
        "checked_on": dict(images.checked_on),
        "passed": True,
    }


def _quantize_checked(
    fp32: bytes,
    images: CalibrationImages,
    reference: np.ndarray,
    method: str,
    settings: QuantSettings,
    say: Callable[[str], None],
) -> dict[str, Any]:
    x, y = images.x, images.y
    auc_torch = _auc(y, reference, images)
    if auc_torch < 0.5:  # the check would then pass an int8 model that ranks worse, and refuse one that ranks better
        raise ExportError(
            f"the network's AUC on the {images.where} is {auc_torch:.4f}, below chance: are their labels swapped "
            f"(the package's positive label is given to images of the other class)? The int8 check compares AUCs, "
            "so it needs labels the network ranks above chance"
        )
    tried: list[dict[str, Any]] = []
    for name in AUTO_METHODS if method == "auto" else (method,):
        chosen = QuantSettings(**{**asdict(settings), "method": name})
        say(f"quantising to int8 ({name} calibration)")
        graph = quantize_onnx(fp32, x, chosen)
        probs = _run(_session(graph), x)
        probabilities = bool(np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all())
        auc_int8 = _auc(y, probs, images) if probabilities else math.nan
        diff = float(np.abs(probs - reference).max())
        held = bool(auc_torch - auc_int8 <= INT8_MAX_AUC_DROP)  # NaN fails
        tried.append({"method": name, "auc_int8": auc_int8, "max_abs_diff": diff, "passed": held})
        say(f"{name}: AUC fp32 {auc_torch:.4f}, int8 {auc_int8:.4f}, largest probability difference {diff:.4f}")
        if held:
            return {
                "graph": graph,
                "max_abs_diff": diff,
                "n_images": len(x),
                "checked_on": dict(images.checked_on),
                "auc_torch": auc_torch,
                "auc_int8": auc_int8,
                "max_auc_drop": INT8_MAX_AUC_DROP,
                "calibration": {
                    **images.checked_on,
                    "n_images": len(x),
                    **asdict(chosen),
                    "excluded": f"classifier head and sigmoid, first {chosen.fp32_convs} convolution(s)",
                    "tried": tried,
                },
                "passed": True,
            }
    results = "; ".join(f"{t['method']}: AUC {t['auc_int8']:.4f}" for t in tried)
    raise ExportError(
        f"the int8 export loses AUC on {len(x)} {images.where}: fp32 {auc_torch:.4f}, int8 "
        f"{results} (allowed drop {INT8_MAX_AUC_DROP:g}); it was not kept. Use the fp32 export "
        "(alnus export PACKAGE --format onnx) instead"
    )


# -- loading an export --------------------------------------------------------------------------------------------


def read_export(package_dir: str | os.PathLike[str], kind: str) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """The bytes of a package's export, its record and the package metadata, after every check: recorded, passed,
    made from the current weights, SHA-256 as recorded, and a plain graph (see `check_graph`)."""
    if kind not in EXPORTS:
        raise ExportError(f"unknown ONNX engine {kind!r}; choose {', '.join(EXPORTS)}")
    package = Path(package_dir)
    meta = read_metadata(package)
    record = meta["exports"].get(kind)
    where = package / METADATA_FILE
    redo = f"export it: alnus export {package} --format {kind}"
    if record is None:
        raise ExportError(f"package {package} has no {kind} export; {redo}")
    if not record["passed"]:
        raise ExportError(f"the {kind} export of {package} did not pass its parity check ({where}); {redo}")
    if record["weights_sha256"] != meta["weights_sha256"]:
        raise ExportError(f"the {kind} export of {package} was made from earlier weights; {redo}")
    path = package / record["file"]
    problem = file_problem(path)
    if problem is not None:
        raise ExportError(f"{path}: {problem}; {redo}")
    if path.stat().st_size > MAX_ONNX_BYTES:
        raise ExportError(f"{path} is larger than any ONNX graph can be; it is not ours and is not loaded; {redo}")
    try:
        with open_regular(path) as fh:
            graph = fh.read()
    except NotAFileError as exc:
        raise ExportError(f"{exc}; {redo}") from None
    if _sha256(graph) != record["sha256"]:
        raise ExportError(
            f"{path} does not match {where} (SHA-256 differs): it was changed after export, so it is not loaded. "
            f"Copy the package again, or {redo}"
        )
    check_graph(graph, int(meta["preprocess"]["size"]), str(path))
    return graph, record, meta


def _every_tensor(graph: Any) -> tuple[list[Any], bool]:
    """Every TensorProto a graph holds (initializers, sparse initializers' values and indices, and node attributes
    of every kind), and whether any node carries a subgraph: external data can hide in any of them (attack review:
    a sparse initializer's values read a file from the working directory)."""
    tensors = [*graph.initializer]
    for sparse in graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    subgraphs = False
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                tensors.append(attribute.t)
            tensors += list(attribute.tensors)
            if attribute.HasField("sparse_tensor"):
                tensors += [attribute.sparse_tensor.values, attribute.sparse_tensor.indices]
            for sparse in attribute.sparse_tensors:
                tensors += [sparse.values, sparse.indices]
            subgraphs = subgraphs or attribute.HasField("g") or len(attribute.graphs) > 0
        subgraphs = subgraphs or node.op_type in ("If", "Loop", "Scan")
    return tensors, subgraphs


def check_graph(graph: bytes, size: int, where: str) -> None:
    """Refuse a graph that is not a plain export of ours: external data (a path to read), operator domains other
    than the standard ones and onnxruntime's (custom ops), or inputs and outputs other than ours."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_model_from_string(graph)
    except Exception as exc:  # protobuf's DecodeError and others
        raise ExportError(f"{where} is not an ONNX graph ({type(exc).__name__}); export again") from None
    # Only the domains nodes use: the quantiser declares several it does not use.
    domains = {n.domain for n in model.graph.node}
    foreign = sorted(domains - _ALLOWED_DOMAINS)
    if foreign or model.functions:
        raise ExportError(f"{where} uses operators outside the standard set ({foreign or 'functions'}); not loaded")
    tensors, subgraphs = _every_tensor(model.graph)
    if subgraphs or any(uses_external_data(t) or t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
        raise ExportError(f"{where} refers to external data or holds subgraphs; an alnus export has neither")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"{where} does not take `{INPUT_NAME}` and return `{OUTPUT_NAME}`; it is not an alnus export")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if dims[1:] != [1, size, size]:
        raise ExportError(f"{where} takes images of shape {dims}, not (batch, 1, {size}, {size}); export again")


class OnnxEngine:
    """A package's ONNX export (`kind`: onnx or onnx-int8) in onnxruntime: `(B, 1, H, W)` float32 in [0, 1] ->
    positive-class probabilities `(B,)` float32. Thread-safe (onnxruntime sessions are).

    Raises:
        ExportError: no such export, or it fails a check of `read_export`.
    """

    def __init__(self, package_dir: str | os.PathLike[str], kind: str, *, threads: int | None = None) -> None:
        _require_onnx()
        graph, record, meta = read_export(package_dir, kind)
        self.package_dir = Path(package_dir)
        self.kind = kind
        self.record = record
        self.metadata = meta
        self.size = int(meta["preprocess"]["size"])
        self._session = _session(graph, threads)
        self.threads = self._session.get_session_options().intra_op_num_threads

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (1, self.size, self.size):
            raise ExportError(
                f"the {self.kind} engine takes a batch (B, 1, {self.size}, {self.size}); got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        try:
            out = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, RuntimeException, ...)
            raise ExportError(
                f"the {self.kind} export of {self.package_dir} failed at run time ({type(exc).__name__}); export it "
                "again, or predict with --engine torch"
            ) from None
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (x.shape[0],) or not np.isfinite(out).all():
            raise ExportError(f"the {self.kind} export of {self.package_dir} gave no probability per image; export "
                              "it again, or predict with --engine torch")  # fmt: skip
        return out

    def __repr__(self) -> str:
        return f"OnnxEngine({str(self.package_dir)!r}, {self.kind!r}, threads={self.threads})"


def available_engines(package_dir: str | os.PathLike[str]) -> list[str]:
    """Engines a package offers, fastest first: its exports that passed their parity check and were made from its
    current weights (and whose file is there), then always `torch`. The file's hash is checked when it is loaded."""
    package = Path(package_dir)
    meta = read_metadata(package)
    found = []
    for kind in _SPEED_ORDER:
        record = meta["exports"].get(kind)
        if (
            record is not None
            and record["passed"]
            and record["weights_sha256"] == meta["weights_sha256"]
            and (package / record["file"]).is_file()
        ):
            found.append(kind)
    return [*found, "torch"]
