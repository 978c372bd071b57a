"""Phantom breast ultrasound: ultrasound-like images with a known, tunable class signal, for demos and tests.

Each patient has one lesion whose latent features (one standard-normal latent per feature) are drawn from
class-conditional normals with unit variance; `overlap` moves each class mean toward the common mean, so the
Bayes-optimal score is linear in the latents and the ceiling AUC is known in closed form (binormal model,
Metz 1978). The image model follows the usual B-mode simulation recipe (Wagner et al. 1983; Burckhardt 1978):
tissue reflectivity times fully developed speckle (the envelope of a blurred circular complex Gaussian field,
i.e. Rayleigh amplitude correlated over the resolution cell), depth attenuation, a focal-zone gain bump,
electronic noise and log compression. Malignant-looking (here: node-positive) lesions are more irregular,
taller-than-wide, more hypoechoic and shadowing, as in the BI-RADS ultrasound lexicon (Stavros et al. 1995).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from scipy.special import expit
from scipy.stats import norm

from alnus._io import atomic_path, atomic_write_text, file_sha256, write_csv
from alnus.data.roi import box_from_mask, format_box
from alnus.errors import AlnusError

__all__ = [
    "BIRADS",
    "PHANTOM_MARKER",
    "is_phantom_manifest",
    "DEV_SCANNER",
    "EXTERNAL_SCANNER",
    "FEATURES",
    "PhantomCase",
    "PhantomError",
    "Scanner",
    "ceiling_auc",
    "make_phantom",
    "phantom_image",
    "render_case",
    "sample_case",
    "simulate_readers",
]

FEATURES = ("shape_irregularity", "aspect_ratio", "echogenicity", "shadowing", "tumour_size_mm")
# Difference of the class means of each standard-normal latent at overlap 0 (same order as FEATURES).
# Chosen for a high ceiling AUC at overlap 0 and a realistic one at the default overlap (`ceiling_auc` computes it).
_SEPARATION = np.array([1.6, 1.6, 1.4, 1.4, 1.0])
BIRADS = ("2", "3", "4a", "4b", "4c", "5")
LABELS = ("negative", "positive")

# Readers: shared case difficulty (variance) makes readers agree with each other as real readers do.
_CASE_DIFFICULTY_VAR = 20.0
# The average reader's sensitivity at >= 4a at the reference overlap (Zhou 2020: radiologists 73%).
_READER_SENSITIVITY_4A = 0.70
_READER_REFERENCE_OVERLAP = 0.3
# BI-RADS cut points on a reader's standardised suspicion, relative to the 3|4a cut point.
_BIRADS_CUTS = np.array([-1.0, 0.0, 0.55, 1.05, 1.6])


class PhantomError(AlnusError):
    """Invalid phantom settings; the message names the setting and the allowed range."""


@dataclass(frozen=True)
class Scanner:
    """One site's scanner: how it turns tissue into pixels."""

    site: str
    prefix: str
    gain_db: float
    dynamic_range_db: float
    resolution_px: tuple[float, float]  # speckle cell sd (axial, lateral) in pixels of a 320-wide image
    noise: float  # electronic noise amplitude relative to glandular echo
    attenuation: float  # amplitude decay exponent over the full depth, after time-gain compensation
    fov_mm: float  # lateral field of view
    size_scale: tuple[float, float] = (1.0, 1.0)  # image size relative to the requested (H, W)

    def image_size(self, base: tuple[int, int]) -> tuple[int, int]:
        """This scanner's image size for a requested base size (H, W)."""
        return round(base[0] * self.size_scale[0]), round(base[1] * self.size_scale[1])


DEV_SCANNER = Scanner(
    site="dev_hospital",
    prefix="DEV",
    gain_db=0.0,
    dynamic_range_db=48.0,
    resolution_px=(0.9, 1.6),
    noise=0.03,
    attenuation=1.0,
    fov_mm=60.0,
)
# A second vendor: darker, noisier, coarser speckle, squarer image.
EXTERNAL_SCANNER = Scanner(
    site="external_hospital",
    prefix="EXT",
    gain_db=-2.0,
    dynamic_range_db=45.0,
    resolution_px=(1.3, 2.4),
    noise=0.05,
    attenuation=1.25,
    fov_mm=50.0,
    size_scale=(1.125, 0.9),
)


@dataclass(frozen=True)
class PhantomCase:
    """One patient's lesion: the latent features (standard-normal scale) and its fixed shape."""

    positive: bool
    latent: tuple[float, float, float, float, float]  # one value per FEATURES entry
    shape_seed: int
    tilt_deg: float = 0.0

    def __post_init__(self) -> None:
        if len(self.latent) != len(FEATURES):
            raise PhantomError(f"PhantomCase: latent needs {len(FEATURES)} values ({', '.join(FEATURES)}).")

    @cached_property
    def boundary(self) -> np.ndarray:
        """Boundary radius over 720 angles, relative to the ellipse (1 = on the ellipse)."""
        return _boundary_radius(self.shape_seed, self.shape_irregularity)

    @property
    def shape_irregularity(self) -> float:
        """Radial boundary noise as a fraction of the radius (spiculation, lobulation)."""
        return float(0.01 + 0.3 * expit(1.5 * self.latent[0] - 0.5))

    @property
    def aspect_ratio(self) -> float:
        """Height / width of the lesion; above 1 is taller-than-wide."""
        return float(math.exp(-0.2 + 0.35 * self.latent[1]))

    @property
    def echogenicity(self) -> float:
        """Lesion echo amplitude relative to glandular tissue (1 = isoechoic)."""
        return float(0.3 * math.exp(-0.35 * self.latent[2]))

    @property
    def shadowing(self) -> float:
        """Posterior feature: fraction of amplitude lost below the lesion (negative = enhancement)."""
        return float(0.8 * math.tanh(0.8 * self.latent[3]))

    @property
    def tumour_size_mm(self) -> float:
        """Largest lesion diameter."""
        return float(5.0 + 25.0 * expit(0.8 * self.latent[4] - 0.4))

    @property
    def true_score(self) -> float:
        """Linear latent score; proportional to the Bayes-optimal log-likelihood ratio for any overlap < 1."""
        return float(np.dot(_SEPARATION, self.latent))

    def features(self) -> dict[str, float]:
        """The latent features in their physical units, plus `true_score`."""
        return {name: getattr(self, name) for name in (*FEATURES, "true_score")}


def ceiling_auc(overlap: float) -> float:
    """AUC of the Bayes-optimal score for a given overlap (binormal, equal variance: Phi(d / sqrt 2))."""
    d = (1.0 - overlap) * float(np.linalg.norm(_SEPARATION))
    return float(norm.cdf(d / math.sqrt(2.0)))


def sample_case(rng: np.random.Generator, positive: bool, *, overlap: float = 0.3) -> PhantomCase:
    """Draw one lesion: each latent ~ N(+-(1 - overlap) * separation / 2, 1) by class."""
    sign = 1.0 if positive else -1.0
    latent = rng.normal(sign * (1.0 - overlap) * _SEPARATION / 2.0, 1.0)
    return PhantomCase(
        positive=bool(positive),
        latent=tuple(float(v) for v in latent),
        shape_seed=int(rng.integers(2**31)),
        tilt_deg=float(rng.normal(0.0, 8.0)),
    )


def _boundary_radius(shape_seed: int, irregularity: float, n: int = 720) -> np.ndarray:
    """Boundary radius (1 = ellipse) over n angles: lobulation grows with irregularity, spicules past 0.08."""
    rng = np.random.default_rng(shape_seed)
    phi = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    k = np.arange(2, 6)[:, None]
    phase = rng.uniform(0, 2 * np.pi, (k.size, 1))
    lobes = (rng.normal(size=(k.size, 1)) * k**-1.5 * np.cos(k * phi + phase)).sum(0)
    # Spicules: narrow outward spikes at random angles (angular distance wrapped to [-pi, pi]).
    at = rng.uniform(0, 2 * np.pi, (int(rng.integers(8, 15)), 1))
    gap = (phi - at + np.pi) % (2 * np.pi) - np.pi
    height, width = rng.uniform(0.4, 1.0, at.shape), rng.uniform(0.02, 0.05, at.shape)
    spikes = (height * np.exp(-np.abs(gap) / width)).max(0)
    radius = 1.0 + irregularity * lobes / np.abs(lobes).max() + 2.0 * max(irregularity - 0.08, 0.0) * spikes
    return radius.astype(np.float32)


def _linear_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Left neighbour index and right weight for linear interpolation from n_in points to n_out points."""
    t = np.linspace(0.0, n_in - 1.0, n_out, dtype=np.float32)
    i0 = np.minimum(t.astype(int), n_in - 2)
    return i0, (t - i0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: tuple[float, float]) -> np.ndarray:
    """Unit-sd noise correlated over `cell` (rows, columns) pixels: a smoothed coarse grid, upsampled."""
    h, w = shape
    gh, gw = max(3, math.ceil(h / cell[0]) + 2), max(3, math.ceil(w / cell[1]) + 2)
    coarse = ndimage.gaussian_filter(rng.standard_normal((gh, gw), dtype=np.float32), 0.7, mode="wrap")
    # Separable linear upsampling by indexing (a BLAS product would contend for the shared cores).
    r0, rf = _linear_weights(h, gh)
    rows = coarse[r0] * (1 - rf[:, None]) + coarse[r0 + 1] * rf[:, None]
    c0, cf = _linear_weights(w, gw)
    up = rows[:, c0] * (1 - cf) + rows[:, c0 + 1] * cf
    return (up - up.mean()) / (up.std() + 1e-6)


def _boundary(rng: np.random.Generator, w: int, base: float, amp: float) -> np.ndarray:
    """A wavy layer boundary: depth fraction for every column."""
    return base + amp * _smooth_noise(rng, (1, w), (1.0, w / 4.0))[0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function via tanh (keeps float32, faster than scipy's expit)."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _tissue(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Echo amplitude of the breast layers (skin, fat, gland, pectoral muscle) and layer depths per column."""
    y = (np.arange(h, dtype=np.float32) / h)[:, None]
    skin = np.float32(rng.uniform(0.025, 0.045))
    d_fat = _boundary(rng, w, rng.uniform(0.16, 0.26), 0.025)[None, :]
    d_muscle = _boundary(rng, w, rng.uniform(0.74, 0.86), 0.03)[None, :]
    in_gland = _sigmoid((y - d_fat) * np.float32(1 / 0.012))
    in_muscle = _sigmoid((y - d_muscle) * np.float32(1 / 0.012))
    fat = 0.28 * np.exp(0.35 * _smooth_noise(rng, (h, w), (h / 7.0, w / 6.0)))
    gland = 0.85 * np.exp(0.3 * _smooth_noise(rng, (h, w), (h / 45.0, w / 14.0)))
    muscle = 0.45 * np.exp(0.4 * _smooth_noise(rng, (h, w), (h / 70.0, w / 3.0)))
    amp = fat + in_gland * (gland - fat + in_muscle * (muscle - gland))
    # Bright specular lines: the skin and the pectoral fascia; the near field above the skin is dark.
    amp += 0.8 * np.exp(-0.5 * ((y - d_muscle) * np.float32(1 / 0.005)) ** 2)
    amp += 1.2 * np.exp(-0.5 * ((y - skin) * np.float32(1 / 0.006)) ** 2)
    amp *= _sigmoid((y - skin + np.float32(0.01)) * np.float32(1 / 0.004))
    return np.maximum(amp, np.float32(0.02)), np.concatenate([d_fat, d_muscle])


def _place_lesion(
    case: PhantomCase, rng: np.random.Generator, h: int, w: int, spacing_mm: float, bands: np.ndarray
) -> tuple[float, float, float, float, float]:
    """Centre (cy, cx), semi-axes (a lateral, b axial) in pixels and rotation of one view of the lesion."""
    size_px = case.tumour_size_mm / spacing_mm * rng.uniform(0.95, 1.05)
    ratio = case.aspect_ratio
    a, b = (size_px / 2, size_px * ratio / 2) if ratio < 1 else (size_px / 2 / ratio, size_px / 2)
    theta = math.radians(case.tilt_deg + rng.normal(0.0, 5.0))
    r_max = float(case.boundary.max())
    half_x = math.hypot(a * math.cos(theta), b * math.sin(theta)) * r_max
    half_y = math.hypot(a * math.sin(theta), b * math.cos(theta)) * r_max
    # The lesion must fit in the view; very large lesions are shown partly out of plane (smaller).
    fit = min(1.0, (0.45 * w - 2) / half_x, (0.42 * h - 2) / half_y)
    a, b, half_x, half_y = a * fit, b * fit, half_x * fit, half_y * fit
    cx = rng.uniform(0.3, 0.7) * w
    col = min(max(int(cx), 0), w - 1)
    top, bottom = bands[0, col] * h, bands[1, col] * h
    cy = top + (bottom - top) * rng.uniform(0.35, 0.6)
    cx = float(np.clip(cx, half_x + 2, w - half_x - 2))
    cy = float(np.clip(cy, half_y + 0.06 * h, h - half_y - 0.1 * h))
    return cy, cx, a, b, theta


def render_case(
    case: PhantomCase,
    rng: np.random.Generator,
    *,
    image_size: tuple[int, int] = (256, 320),
    scanner: Scanner = DEV_SCANNER,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one view of `case`: (image uint8 (H, W), lesion mask uint8 (H, W), 255 inside)."""
    h, w = image_size
    scale = w / 320.0
    spacing_mm = scanner.fov_mm / w
    amp, bands = _tissue(rng, h, w)
    cy, cx, a, b, theta = _place_lesion(case, rng, h, w, spacing_mm, bands)

    # Lesion, computed in its bounding window only.
    irr = case.shape_irregularity
    reach = max(a, b) * float(case.boundary.max()) + 8
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, h)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, w)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    rho = np.hypot(u / a, v / b)
    phi = np.arctan2(v / b, u / a)
    n = case.boundary.size
    radius = case.boundary[((phi + np.pi) * (n / (2 * np.pi))).astype(int) % n]
    inside = rho < radius
    # Irregular lesions also have indistinct margins: a wider transition band, in pixels.
    edge_px = (1.0 + 5.0 * irr) * max(scale, 0.5)
    soft = np.clip((radius - rho) * min(a, b) / edge_px + 0.5, 0.0, 1.0)
    texture = np.exp(0.25 * _smooth_noise(rng, soft.shape, (4.0 * scale + 1, 6.0 * scale + 1)))
    lesion_amp = 0.85 * case.echogenicity * texture
    window = amp[y0:y1, x0:x1]
    amp[y0:y1, x0:x1] = window * (1 - soft) + lesion_amp * soft

    # Posterior shadowing / enhancement: along the beam (straight down) from the lesion's deepest point.
    cols = inside.any(axis=0)
    deepest = y0 + inside.shape[0] - 1 - np.argmax(inside[::-1], axis=0)
    depth_below = np.arange(h, dtype=np.float32)[:, None] - deepest[None, :]
    posterior = np.where(cols[None, :], 1.0 - np.exp(-np.maximum(depth_below, 0.0) / (4.0 * scale + 1)), 0.0)
    posterior = ndimage.gaussian_filter1d(posterior.astype(np.float32), 2.5 * scale + 0.5, axis=1)
    amp[:, x0:x1] *= 1.0 - case.shadowing * posterior

    # Depth attenuation after time-gain compensation, and the transmit focus.
    depth = (np.arange(h, dtype=np.float32) / h)[:, None]
    focus = rng.uniform(0.3, 0.65)
    amp *= np.exp(-scanner.attenuation * depth) * (1.0 + 0.35 * np.exp(-0.5 * ((depth - focus) / 0.08) ** 2))

    # Fully developed speckle: a circular complex Gaussian field (real, imaginary) blurred by the resolution
    # cell; its envelope is Rayleigh-distributed and correlated over the cell (Wagner et al. 1983).
    sigma = (0.0, max(scanner.resolution_px[0] * scale, 0.4), max(scanner.resolution_px[1] * scale, 0.5))
    field_ = ndimage.gaussian_filter(rng.standard_normal((2, h, w), dtype=np.float32), sigma, truncate=3.0)
    speckle = field_[0] ** 2 + field_[1] ** 2
    # Compounding and the scanner's smoothing average a little incoherently, filling the deepest nulls.
    speckle = ndimage.gaussian_filter(speckle, (sigma[1] * 0.6, sigma[2] * 0.6), truncate=3.0)
    speckle *= np.float32(1.0 / speckle.mean())
    # Electronic noise adds incoherently: its power is exponential, like any complex Gaussian's.
    noise = rng.standard_exponential((h, w), dtype=np.float32) * np.float32(scanner.noise**2)
    envelope_db = 10.0 * np.log10(amp * amp * speckle + noise + np.float32(1e-8))

    # Log compression to 8 bits over the scanner's dynamic range.
    gain = 255.0 / scanner.dynamic_range_db
    grey = (envelope_db + np.float32(scanner.gain_db + scanner.dynamic_range_db - 19.0)) * np.float32(gain)
    image = np.clip(grey, 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1][inside] = 255
    return image, mask


def phantom_image(
    rng: np.random.Generator,
    positive: bool,
    *,
    overlap: float = 0.3,
    image_size: tuple[int, int] = (96, 128),
    scanner: Scanner = DEV_SCANNER,
) -> tuple[np.ndarray, np.ndarray]:
    """One random phantom image and its mask, for tests of other modules."""
    case = sample_case(rng, positive, overlap=overlap)
    return render_case(case, rng, image_size=image_size, scanner=scanner)


def _reader_traits(reader: int) -> tuple[np.ndarray, float, float]:
    """A simulated radiologist (fixed per index): feature weights, own noise variance, threshold bias."""
    rng = np.random.default_rng([0x5EAD, reader])
    weights = _SEPARATION * np.exp(rng.normal(0.0, 0.3, _SEPARATION.size))
    return weights, float(rng.uniform(8.0, 28.0)), float(rng.uniform(-0.3, 0.3))


def simulate_readers(cases: Sequence[PhantomCase], rng: np.random.Generator, *, readers: int = 5) -> pd.DataFrame:
    """BI-RADS readings (2..5) of `cases` by `readers` radiologists: columns reader_r1 .. reader_rN.

    Each reader's suspicion is a weighted sum of the visible latent features plus a case-difficulty term
    shared by all readers and the reader's own noise (the correlated binormal model behind MRMC studies,
    Dorfman-Berbaum-Metz 1992). Cut points are set so that the average reader calls >= 4a in 70% of
    positive cases at overlap 0.3; each reader shifts them by a personal bias.
    """
    latent = np.array([c.latent for c in cases], dtype=float).reshape(len(cases), len(FEATURES))
    difficulty = rng.normal(0.0, math.sqrt(_CASE_DIFFICULTY_VAR), len(cases))
    columns = {}
    for r in range(1, readers + 1):
        weights, noise_var, bias = _reader_traits(r)
        sd = math.sqrt(float(weights @ weights) + _CASE_DIFFICULTY_VAR + noise_var)
        suspicion = (latent @ weights + difficulty + rng.normal(0.0, math.sqrt(noise_var), len(cases))) / sd
        positive_mean = (1.0 - _READER_REFERENCE_OVERLAP) * float(weights @ _SEPARATION) / 2.0 / sd
        cut_4a = positive_mean - float(norm.ppf(_READER_SENSITIVITY_4A)) + bias
        columns[f"reader_r{r}"] = np.asarray(BIRADS)[np.digitize(suspicion, cut_4a + _BIRADS_CUTS)]
    return pd.DataFrame(columns, index=range(len(cases)))


def _write(path: Path, data: bytes) -> None:
    """Write atomically (rename) without fsync: the phantom can be regenerated; hundreds of fsyncs cost."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _dicom_bytes(
    image: np.ndarray,
    *,
    patient_id: str,
    study_id: str,
    age: int,
    uid_root: str,
    uid_view: str,
    spacing_mm: float,
) -> bytes:
    """A US DICOM file: `image` embedded in a larger frame with a dark margin; one 2-D region marks it.

    UIDs are derived from `uid_root` (the patient's study and series) and `uid_view` (the instance), so the
    same phantom gives the same files.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    h, w = image.shape
    top, bottom, left, right = max(h // 6, 8), max(h // 12, 4), max(w // 10, 6), max(w // 8, 8)
    right += (top + h + bottom) * (left + w + right) % 2  # DICOM values have even length
    frame = np.zeros((top + h + bottom, left + w + right), np.uint8)
    frame[top : top + h, left : left + w] = image
    # Screen furniture outside the region (grey bar, depth ticks): what region cropping must remove.
    frame[top : top + h, 2 : max(left // 3, 3)] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    ticks = np.arange(0, h, max(int(round(10.0 / spacing_mm)), 2)) + top
    frame[ticks, left + w + 2 : left + w + 2 + max(right // 3, 2)] = 200

    sop_class = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    sop_instance = generate_uid(entropy_srcs=[uid_view, "instance"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_root, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_root, "series"])
    ds.Modality = "US"
    ds.Manufacturer = "alnus phantom"
    ds.PatientName = "PHANTOM^PATIENT"
    ds.PatientID = patient_id
    ds.PatientSex = "F"
    ds.PatientAge = f"{age:03d}Y"
    ds.StudyID = study_id[-16:]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = frame.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2-D tissue image
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0 = left
    region.RegionLocationMinY0 = top
    region.RegionLocationMaxX1 = left + w - 1
    region.RegionLocationMaxY1 = top + h - 1
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = spacing_mm / 10.0
    region.PhysicalDeltaY = spacing_mm / 10.0
    ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    ds.PixelData = frame.tobytes()

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _check(name: str, ok: bool, allowed: str, value: object) -> None:
    if not ok:
        raise PhantomError(f"make_phantom: {name}={value!r} is invalid; use {allowed}.")


def _plan(
    *,
    sites: Sequence[tuple[Scanner, int]],
    overlap: float,
    views: tuple[int, int],
    prevalence: float,
    readers: int,
    seed: int,
) -> list[dict]:
    """Every image to write, with its patient's lesion and readings; cheap (nothing is rendered)."""
    planned = []
    for site_index, (scanner, n) in enumerate(sites):
        if n == 0:
            continue
        site_rng = np.random.default_rng([seed, site_index])
        positive = site_rng.permutation(np.arange(n) < round(prevalence * n))
        patients = []
        for i in range(n):
            # One generator per patient: a patient's data do not depend on how many patients follow.
            rng = np.random.default_rng([seed, site_index, i])
            case = sample_case(rng, bool(positive[i]), overlap=overlap)
            pid = f"{scanner.prefix}-{i + 1:04d}"
            patients.append(
                {
                    "patient_id": pid,
                    "study_id": f"{pid}-S1",
                    "label": LABELS[int(case.positive)],
                    "site": scanner.site,
                    "age": int(np.clip(round(rng.normal(56.0, 11.0)), 25, 90)),
                    "n_views": int(rng.integers(views[0], views[1] + 1)),
                    "case": case,
                    "scanner": scanner,
                    "key": [seed, site_index, i],
                }
            )
        readings = simulate_readers([p["case"] for p in patients], site_rng, readers=readers)
        for patient, reads in zip(patients, readings.to_dict("records"), strict=True):
            planned += [{**patient, **reads, "view": v} for v in range(1, patient["n_views"] + 1)]
    return planned


def _write_view(out: Path, view: dict, *, image_size: tuple[int, int], dicom: bool) -> dict:
    """Render one planned image, write it and its mask; return its manifest row."""
    case, scanner = view["case"], view["scanner"]
    size = scanner.image_size(image_size)
    rng = np.random.default_rng([*view["key"], view["view"]])
    image, mask = render_case(case, rng, image_size=size, scanner=scanner)
    stem = f"{view['patient_id']}-{view['view']}"
    image_rel, mask_rel = f"images/{stem}.{'dcm' if dicom else 'png'}", f"masks/{stem}.png"
    if dicom:
        uid_root = f"alnus-phantom/{view['key']}"
        data = _dicom_bytes(
            image,
            patient_id=view["patient_id"],
            study_id=view["study_id"],
            age=view["age"],
            uid_root=uid_root,
            uid_view=f"{uid_root}/{view['view']}",
            spacing_mm=scanner.fov_mm / size[1],
        )
    else:
        data = _png_bytes(image)
    _write(out / image_rel, data)
    _write(out / mask_rel, _png_bytes(mask))
    row = {name: view[name] for name in ("patient_id", "study_id", "label", "site")}
    row = {"image": image_rel, **row, "roi": format_box(box_from_mask(mask)), "mask": mask_rel}
    row |= {"age": view["age"], "tumour_size_mm": round(case.tumour_size_mm, 1)}
    row |= {name: value for name, value in view.items() if name.startswith("reader_")}
    row |= {name: round(value, 4) for name, value in case.features().items() if name != "tumour_size_mm"}
    return row


# What a phantom manifest's columns are, for whoever opens the folder (PHANTOM.md).
PHANTOM_COLUMNS = (
    "How it is made. Each patient has a lesion whose hidden features (shape_irregularity, aspect_ratio, echogenicity, "
    "shadowing, tumour_size_mm; standard-normal latents except the size) differ between the classes; each hospital "
    "(site) has its own simulated scanner (gain, dynamic range, speckle size, noise, depth attenuation, field of view,"
    " image size), so the second hospital is a real site shift for the model. The image and its lesion mask are drawn "
    "from those features; roi is the box around the mask. The feature columns are the truth behind the image, shown "
    "for teaching: a model never sees them. true_score is their weighted sum, the ideal observer's score (the best AUC"
    " any reader or model could reach on these images).\n\nThe readers (reader_r1 ...) are simulated radiologists "
    "reading BI-RADS 2 to 5: each one's suspicion is a weighted sum of the visible features, plus a case difficulty "
    "shared by all readers (so they agree with each other as real readers do) and the reader's own noise: the "
    "correlated binormal model behind MRMC studies (Dorfman, Berbaum & Metz 1992). Their cut points are set so that "
    "the average reader calls 4a or above in 70% of malignant cases (Zhou et al. 2020: radiologists 73%), each reader "
    "shifted by a personal bias. Their results and every comparison with them are as simulated as the images."
)

# Written beside a phantom's manifest: a study of that manifest is marked as simulated (`alnus.study.prepare_run`).
PHANTOM_MARKER = "PHANTOM.md"


def make_phantom(
    out: Path,
    *,
    patients: int = 160,
    external_patients: int = 60,
    overlap: float = 0.3,
    images_per_patient: tuple[int, int] = (1, 3),
    prevalence: float = 0.4,
    image_size: tuple[int, int] = (256, 320),
    dicom_fraction: float = 0.1,
    readers: int = 5,
    seed: int = 0,
) -> Path:
    """Write a two-site phantom study (`out/manifest.csv`, `out/images/`, `out/masks/`); return the manifest.

    Deterministic for a seed: the same settings give the same bytes. Each site holds exactly
    round(prevalence * patients) positive patients; round(dicom_fraction * images) images (at least one
    when the fraction is above 0) are DICOM. Files already in `out` are overwritten, others are kept.
    """
    lo, hi = images_per_patient
    _check("patients", patients >= 1, "an integer >= 1", patients)
    _check("external_patients", external_patients >= 0, "an integer >= 0", external_patients)
    _check("overlap", 0.0 <= overlap <= 1.0, "a number in [0, 1]", overlap)
    _check("images_per_patient", 1 <= lo <= hi, "(min, max) with 1 <= min <= max", images_per_patient)
    _check("prevalence", 0.0 < prevalence < 1.0, "a number in (0, 1)", prevalence)
    _check("image_size", min(image_size) >= 48, "(H, W) with both >= 48 pixels", image_size)
    _check("dicom_fraction", 0.0 <= dicom_fraction <= 1.0, "a number in [0, 1]", dicom_fraction)
    _check("readers", readers >= 0, "an integer >= 0", readers)
    out = Path(out)

    views = _plan(
        sites=((DEV_SCANNER, patients), (EXTERNAL_SCANNER, external_patients)),
        overlap=overlap,
        views=(lo, hi),
        prevalence=prevalence,
        readers=readers,
        seed=seed,
    )
    n_dicom = max(round(dicom_fraction * len(views)), int(dicom_fraction > 0))
    dicom = np.random.default_rng([seed, 2]).permutation(len(views)) < n_dicom
    rows = [_write_view(out, view, image_size=image_size, dicom=d) for view, d in zip(views, dicom, strict=True)]
    manifest = out / "manifest.csv"
    write_csv(pd.DataFrame(rows), manifest)
    atomic_write_text(
        out / PHANTOM_MARKER,
        f"Simulated images made by `alnus data phantom` (seed {seed}): not patients, for demonstrations and tests "
        f"only. A study of this manifest says so in its report and model cards.\n\n{PHANTOM_COLUMNS}\n\n"
        f"manifest.csv sha256 {file_sha256(manifest)}\n",
    )
    return manifest


def is_phantom_manifest(manifest: Path) -> bool:
    """Whether `manifest` is a phantom's, unchanged: the PHANTOM.md beside it names its SHA-256 (so real data put
    in a phantom's folder, or an edited phantom manifest, are not taken for simulated ones)."""
    marker = Path(manifest).parent / PHANTOM_MARKER
    try:
        if not marker.is_file():
            return False
        with marker.open("rb") as fh:
            text = fh.read(64 << 10).decode("utf-8", errors="replace")
        return f"sha256 {file_sha256(Path(manifest))}" in text
    except OSError:
        return False
