"""Fixtures of the service tests: a tiny model package with a frozen threshold and a model card, images of every
kind (and broken ones), a test client, and the real server (uvicorn) in a thread on a free loopback port."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from alnus.data.dataset import PreprocessSpec
from alnus.data.roi import RoiPolicy, format_box
from alnus.models import create_model
from alnus.models.package import freeze_threshold, read_metadata, save_package, set_reader_rule
from alnus.predict import Predictor
from alnus.report.card import intended_use
from alnus.serve import Access, ModelService, Settings, create_app
from alnus.serve.clients import PER_CLIENT

TOKEN = "test-token-0123456789-abcdefghijklmnopqrstuvwxyz"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LABELS = ["negative", "positive"]
# Identifiers written into the test DICOM: none may reach an answer or a log line.
IDENTIFIERS = {
    "PatientName": "DOE^JANE^MARIE",
    "PatientID": "MRN-SECRET-4711",
    "PatientBirthDate": "19610417",
    "StudyDate": "20240229",
    "AccessionNumber": "ACC-99-SECRET",
    "InstitutionName": "Saint Hidden Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
}
# A site name that is HTML: the page must show it as text.
HOSTILE = "<img src=x onerror=alert(1)>"
# The lesion box the tests send with `grey_image()`, and another one where the image's probability is lower.
BOX = (20, 10, 30, 25)
LOW_BOX = (0, 30, 25, 25)


def free_port() -> int:
    """A loopback port nobody listens on now (for a server that is built, or started, by the test)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def grey_image(height: int = 60, width: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 120, size=(height, width)).astype(np.uint8)
    image[height // 4 : height // 2, width // 3 : width // 2] += 120  # a bright "lesion"
    return image


def dicom_bytes(image: np.ndarray | None, *, margin: int = 6) -> bytes:
    """An ultrasound DICOM holding `image` in a larger frame (one 2-D region marks it) and patient identifiers;
    without pixel data when `image` is None. A 3-D `image` (frames, height, width) is a cine loop of those frames."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    frames = None if image is None else image.reshape(-1, *image.shape[-2:])
    h, w = (40, 50) if frames is None else frames.shape[1:]
    frame = np.zeros((1 if frames is None else len(frames), h + 2 * margin, w + 2 * margin), dtype=np.uint8)
    if frames is not None:
        frame[:, margin : margin + h, margin : margin + w] = frames
    ds.Rows, ds.Columns = frame.shape[1:]
    if image is not None and image.ndim == 3:
        ds.NumberOfFrames = len(frames)
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionLocationMinX0, region.RegionLocationMinY0 = margin, margin
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = margin + w - 1, margin + h - 1
    ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    if image is not None:
        ds.PixelData = frame.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _card(meta: dict[str, Any]) -> str:
    """A model card with the sections the service reads (as `alnus report` writes them)."""
    return "\n".join(
        [
            "# Model card: tiny\\_cnn (run serve)",
            "",
            "## Intended use",
            "",
            *intended_use(meta),
            "",
            "## Validation results",
            "",
            "Per patient, at the frozen threshold; proportions in % (k/n; 95% CI, Clopper-Pearson).",
            "",
            "| split | patients (pos/neg) | AUC (95% CI) | sensitivity |",
            "|---|---|---|---|",
            "| val | 30 (12/18) | 0.81 (0.65-0.97) | 83.3 (10/12; 51.6-97.9) |",
            "| external\\_test | 41 (20/21) | 0.77 (0.62-0.91) | 75.0 (15/20; 50.9-91.3) |",
            "",
            "## Known limitations",
            "",
            f"- Tested externally at {HOSTILE.replace('<', chr(92) + '<').replace('>', chr(92) + '>')}.",
            "",
        ]
    )


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_cnn, 32 px, trained on lesion boxes (ROI mode box), a patient-level threshold frozen, a model card."""
    folder = tmp_path_factory.mktemp("serve") / "model"
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    with torch.no_grad():
        model.classifier().weight.mul_(50)  # spread the probabilities, so that a mixed-up input shows
    spec = PreprocessSpec(size=32, roi=RoiPolicy("box", margin=0.1))
    # `training` holds the study's paths (as a trained package's does): /v1/model must leave it out.
    training = {"data": {"manifest": str(folder / "secret.csv")}}
    save_package(folder, model, {"preprocess": spec.to_dict(), "label_names": LABELS, "positive_label": "positive",
                                 "run": "serve", "training": training})  # fmt: skip
    point = {"value": 0.5, "rule": "youden", "target": None, "level": "patient", "aggregate": "mean"}
    freeze_threshold(folder, point, reason="test")
    (folder / "README.md").write_text(_card(read_metadata(folder)), encoding="utf-8")
    return folder


def reader_rule_record(value: float) -> dict[str, Any]:
    """A reader rule as `alnus reader-rule` writes it: BI-RADS >= 4a, a 4 or 4a below `value` ruled out."""
    chosen = {"reader": "reader_birads", "n_images": 40, "n_cases": 30, "n_pos": 12, "n_incomplete": 0,
              "n_lowest": 10, "n_lowest_pos": 4, "reader_sensitivity": 1.0, "reader_specificity": 0.5,
              "with_ai_specificity": 0.6}  # fmt: skip
    return {"method": "rule_out", "scale": "birads", "positive_from": "4a", "lowest": ["4", "4a"], "value": value,
            "level": "patient", "aggregate": "mean", "chosen_on": chosen, "frozen_at": "2026-01-01T00:00:00+00:00",
            "frozen_on": "secret-validation.csv"}  # fmt: skip


@pytest.fixture(scope="session")
def rule_package(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`package` with a reader rule whose value lies between the probabilities of `grey_image()` in `LOW_BOX` and in
    `BOX`: read as BI-RADS 4a, the image in `LOW_BOX` is ruled out and the one in `BOX` is not (a 4b never is)."""
    folder = tmp_path_factory.mktemp("serve-rule") / "model"
    shutil.copytree(package, folder)
    rows = [{"roi": format_box(BOX)}, {"roi": format_box(LOW_BOX)}]
    high, low = (float(p) for p in predictor_of(folder).predict_arrays([grey_image()] * 2, rows=rows))
    assert high - low > 1e-3, f"the test boxes must give distinct probabilities ({low} in LOW_BOX, {high} in BOX)"
    set_reader_rule(folder, reader_rule_record((low + high) / 2))
    return folder


@pytest.fixture(scope="session")
def whole_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_cnn on whole images, no threshold frozen yet, no model card."""
    folder = tmp_path_factory.mktemp("serve-whole") / "model"
    torch.manual_seed(1)
    spec = PreprocessSpec(size=32)
    save_package(folder, create_model("tiny_cnn"), {"preprocess": spec.to_dict(), "label_names": LABELS,
                                                    "positive_label": "positive"})  # fmt: skip
    return folder


def predictor_of(package: Path) -> Predictor:
    return Predictor(package, device="cpu", precision="fp32", batch_size=1)


def client_for(
    predictor: Predictor,
    tmp_path: Path,
    *,
    access: Access | None = None,
    max_upload_bytes: int = 2_000_000,
    per_client: int = PER_CLIENT,
    **settings: Any,
) -> Any:
    """A TestClient of a fresh service; uploads are kept under tmp_path/uploads while a request runs."""
    from fastapi.testclient import TestClient

    service = ModelService(predictor, Settings(work_dir=tmp_path / "uploads", **settings))
    app = create_app(service, access or Access(token=TOKEN, source="test"), max_upload_bytes=max_upload_bytes,
                     per_client=per_client)  # fmt: skip
    return TestClient(app, raise_server_exceptions=False)


@dataclass
class Hold:
    """Holds a predictor's forward passes until `release` is set; `started` is set when the first one begins."""

    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    passes: int = 0


def held_predictor(package: Path, hold: Hold) -> Predictor:
    """A predictor whose image predictions wait for `hold.release` (the worker stays busy until the test lets go)."""
    predictor = predictor_of(package)
    real = predictor.predict_arrays

    def held(images: Any, rows: Any = None, root: Any = ".") -> np.ndarray:
        hold.passes += 1
        hold.started.set()
        if not hold.release.wait(60):
            raise RuntimeError("the test never released the predictor")
        return real(images, rows=rows, root=root)

    predictor.predict_arrays = held  # type: ignore[method-assign]
    return predictor


@dataclass
class Gate:
    """Counts the predictions running at once and tells when one has started."""

    started: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    peak: int = 0
    finished: int = 0


def slow_predictor(package: Path, seconds: float, gate: Gate) -> Predictor:
    """A predictor whose image predictions keep the worker busy for `seconds` with real forward passes."""
    predictor = predictor_of(package)
    real = predictor.predict_arrays

    def slow(*args: Any, **kwargs: Any) -> np.ndarray:
        with gate.lock:
            gate.active += 1
            gate.peak = max(gate.peak, gate.active)
        gate.started.set()
        try:
            deadline = time.perf_counter() + seconds
            out = real(*args, **kwargs)
            batch = torch.rand(16, 1, 32, 32)
            while time.perf_counter() < deadline:
                predictor.predict_batch(batch)
            return out
        finally:
            with gate.lock:
                gate.active -= 1
                gate.finished += 1

    predictor.predict_arrays = slow  # type: ignore[method-assign]
    return predictor


class LiveServer:
    """uvicorn serving an app in a thread, on a loopback port chosen by the OS (bound before the server starts)."""

    def __init__(self, app: Any, **settings: Any) -> None:
        """`settings`: more `uvicorn.Config` keywords (the service's own: `alnus.serve.server.uvicorn_settings`)."""
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        settings = {"log_config": None, "access_log": False, **settings}
        config = uvicorn.Config(app, lifespan="off", timeout_graceful_shutdown=2, **settings)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture
def live_server() -> Iterator[type[LiveServer]]:
    yield LiveServer


def assert_no_uploads_left(folder: Path, within: float = 5.0) -> None:
    """Every request's upload folder is removed. The worker thread removes it when the job ends, which can be a
    moment after the answer reached the client (a CI run saw one still there): wait up to `within` seconds."""
    import time

    deadline = time.monotonic() + within
    while (left := list(folder.iterdir()) if folder.is_dir() else []) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], f"upload folder(s) left behind: {left}"
