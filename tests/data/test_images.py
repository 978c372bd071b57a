"""Tests for alnus.data.images: every Pillow mode, pydicom's bundled US files, and the failure modes."""

from __future__ import annotations

import logging
import os
import signal
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, features
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import MPEG2MPML, JPEGBaseline8Bit, JPEGLSLossless, UltrasoundImageStorage, generate_uid

from alnus.data.images import MAX_PIXELS, ImageReadError, image_shape, is_dicom, load_image, not_an_image

RNG = np.random.default_rng(0)
PATIENT_NAME = "Quixotic^Zenobia"
PATIENT_ID = "PID-7731-XQ"
INSTITUTION = "Saint Elsewhere Hospital"


def _luma(rgb: tuple[int, int, int]) -> float:
    """ITU-R 601-2 luma, the formula PIL's "L" documents."""
    r, g, b = rgb
    return r * 299 / 1000 + g * 587 / 1000 + b * 114 / 1000


def _save(path: Path, im: Image.Image, **params: object) -> Path:
    im.save(path, **params)
    return path


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    regions: list[tuple[int, int, int, int, int]] | None = None,
) -> Dataset:
    """Write a US DICOM with identifiers that must never leak; regions are (format, x0, y0, x1, y1)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = UltrasoundImageStorage
    ds.Modality = "US"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19230417"
    ds.StudyDate = "20240229"
    ds.InstitutionName = INSTITUTION
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    if regions is not None:
        items = []
        for spatial_format, x0, y0, x1, y1 in regions:
            item = Dataset()
            item.RegionSpatialFormat = spatial_format
            item.RegionDataType = 1
            item.RegionFlags = 0
            item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
            item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
            items.append(item)
        ds.SequenceOfUltrasoundRegions = items
    ds.save_as(path, enforce_file_format=True)
    return ds


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height but carries no pixels (a decompression-bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def _check(image: np.ndarray, shape: tuple[int, int]) -> None:
    assert image.dtype == np.uint8
    assert image.shape == shape
    assert image.flags.c_contiguous and image.flags.writeable


# --- Pillow formats and modes ---------------------------------------------------------------------


def test_grey_8bit_png_is_unchanged(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 256, (7, 5), dtype=np.uint8)
    image = load_image(_save(tmp_path / "a.png", Image.fromarray(pixels)))
    _check(image, (7, 5))
    np.testing.assert_array_equal(image, pixels)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_rgb_becomes_itu601_luminance(tmp_path: Path, suffix: str) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (12, 200, 77)]
    pixels = np.array([colours], dtype=np.uint8)
    image = load_image(_save(tmp_path / f"a{suffix}", Image.fromarray(pixels, "RGB")))
    _check(image, (1, len(colours)))
    assert image[0, 0] == 76  # pure red, as PIL "L"
    np.testing.assert_allclose(image[0], [_luma(c) for c in colours], atol=1)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (6, 4, 1), dtype=np.uint8)
    rgba = load_image(_save(tmp_path / "a.png", Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")))
    _check(rgba, (6, 4))
    np.testing.assert_array_equal(rgba, load_image(_save(tmp_path / "b.png", Image.fromarray(rgb, "RGB"))))


def test_la_keeps_grey_drops_alpha(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, (3, 8), dtype=np.uint8)
    la = np.stack([grey, np.full_like(grey, 7)], axis=2)
    image = load_image(_save(tmp_path / "a.png", Image.fromarray(la, "LA")))
    _check(image, (3, 8))
    np.testing.assert_array_equal(image, grey)


def test_palette_maps_through_its_colours(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[0, 1, 2, 1]], dtype=np.uint8), "P")
    im.putpalette([255, 0, 0, 0, 0, 255, 40, 40, 40])
    image = load_image(_save(tmp_path / "a.png", im))
    _check(image, (1, 4))
    assert image.tolist() == [[76, round(_luma((0, 0, 255))), 40, round(_luma((0, 0, 255)))]]


@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_bilevel_gives_0_and_255(tmp_path: Path, suffix: str) -> None:
    bits = np.array([[True, False, True], [False, False, True]])
    image = load_image(_save(tmp_path / f"a{suffix}", Image.fromarray(bits)))
    _check(image, (2, 3))
    np.testing.assert_array_equal(image, np.where(bits, 255, 0))


def test_cmyk_tiff(tmp_path: Path) -> None:
    im = Image.new("CMYK", (3, 1))
    for x, ink in enumerate([(0, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)]):  # white, black, red
        im.putpixel((x, 0), ink)
    image = load_image(_save(tmp_path / "a.tif", im))
    _check(image, (1, 3))
    assert image.tolist() == [[255, 0, 76]]


def test_jpeg_decodes_close_to_source(tmp_path: Path) -> None:
    pixels = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
    image = load_image(_save(tmp_path / "a.jpg", Image.fromarray(pixels), quality=95))
    _check(image, (16, 32))
    assert np.abs(image.astype(int) - pixels).max() <= 8


def test_16bit_ramp_png_maps_to_0_255(tmp_path: Path) -> None:
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    path = _save(tmp_path / "a.png", Image.fromarray(ramp))
    assert Image.open(path).mode == "I;16"
    image = load_image(path)
    _check(image, (16, 16))
    np.testing.assert_array_equal(image.ravel(), np.arange(256))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_tiff_scales_from_own_min_max(tmp_path: Path, mode: str) -> None:
    values = np.linspace(1000, 2000, 50).astype(np.uint16).reshape(5, 10)
    im = Image.frombytes(mode, (10, 5), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    path = _save(tmp_path / "a.tif", im)
    assert Image.open(path).mode == mode
    image = load_image(path)
    _check(image, (5, 10))
    expected = np.rint((values.astype(float) - 1000) * 255 / 1000)
    np.testing.assert_array_equal(image, expected)


def test_int32_and_float_tiff_scale_from_own_min_max(tmp_path: Path) -> None:
    ints = np.array([[-70000, 0], [30000, 130000]], dtype=np.int32)
    floats = np.array([[-1.5, 0.0], [0.5, 2.5]], dtype=np.float32)
    assert load_image(_save(tmp_path / "i.tif", Image.fromarray(ints, "I"))).tolist() == [[0, 89], [128, 255]]
    assert load_image(_save(tmp_path / "f.tif", Image.fromarray(floats, "F"))).tolist() == [
        [0, 96],
        [128, 255],
    ]


def test_constant_16bit_image_maps_to_zero(tmp_path: Path) -> None:
    image = load_image(_save(tmp_path / "a.png", Image.fromarray(np.full((4, 4), 4000, dtype=np.uint16))))
    _check(image, (4, 4))
    assert not image.any()


def test_float_with_nan_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.tif", Image.fromarray(np.array([[1.0, np.nan]], dtype=np.float32), "F"))
    with pytest.raises(ImageReadError, match="NaN"):
        load_image(path)


def test_multipage_tiff_frames(tmp_path: Path) -> None:
    pages = [Image.fromarray(np.full((3, 4), value, dtype=np.uint8)) for value in (10, 20, 30)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert load_image(path)[0, 0] == 10  # default: the first page (later ones may be previews)
    assert load_image(path, frame=0)[0, 0] == 10
    assert load_image(path, frame=2)[0, 0] == 30
    with pytest.raises(ImageReadError, match="3 frame"):
        load_image(path, frame=3)


# --- DICOM: pydicom's bundled ultrasound files -----------------------------------------------------


def _pil_luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))


def test_dicom_rgb() -> None:
    path = get_testdata_file("examples_rgb_color.dcm")
    image = load_image(path)
    _check(image, (240, 320))
    np.testing.assert_array_equal(image, _pil_luma(pydicom.dcmread(path).pixel_array))
    assert image_shape(path) == (240, 320)


def test_dicom_ybr_jpeg_frames_and_region_crop() -> None:
    path = get_testdata_file("examples_ybr_color.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and int(ds.NumberOfFrames) == 30
    (region,) = ds.SequenceOfUltrasoundRegions
    assert region.RegionSpatialFormat == 1
    # The region (84, 31)-(595, 414) runs past the 320 x 240 image: clipped, Max inclusive.
    y0, x0 = region.RegionLocationMinY0, region.RegionLocationMinX0
    y1, x1 = min(region.RegionLocationMaxY1 + 1, ds.Rows), min(region.RegionLocationMaxX1 + 1, ds.Columns)
    rgb = ds.pixel_array  # pydicom 3 returns RGB for YBR (as_rgb)
    for frame in (0, 7, 29):
        full = load_image(path, frame=frame, us_region=False)
        _check(full, (240, 320))
        # JPEG decoders may round colour conversion differently: allow 1 grey level.
        assert np.abs(full.astype(int) - _pil_luma(rgb[frame])).max() <= 1
        np.testing.assert_array_equal(load_image(path, frame=frame), full[y0:y1, x0:x1])
    assert not np.array_equal(load_image(path, frame=0), load_image(path, frame=29))
    np.testing.assert_array_equal(load_image(path), load_image(path, frame=15))  # middle frame
    assert image_shape(path) == (y1 - y0, x1 - x0) == load_image(path).shape
    assert image_shape(path, us_region=False) == (240, 320)
    for bad in (30, -1):
        with pytest.raises(ImageReadError, match="30 frame") as info:
            load_image(path, frame=bad)
        assert str(path) in str(info.value)


def test_dicom_ybr_left_unconverted_by_the_decoder_is_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    path = get_testdata_file("examples_ybr_color.dcm")
    expected = load_image(path, frame=3)
    as_array = Decoder.as_array

    def raw_as_array(self: Decoder, *args: object, **kwargs: object) -> tuple[np.ndarray, dict]:
        return as_array(self, *args, **{**kwargs, "raw": True})  # type: ignore[arg-type]

    monkeypatch.setattr(Decoder, "as_array", raw_as_array)
    assert raw_as_array(get_decoder(JPEGBaseline8Bit), pydicom.dcmread(path), index=3)[1][
        "photometric_interpretation"
    ].startswith("YBR")
    assert np.abs(load_image(path, frame=3).astype(int) - expected).max() <= 1


def test_dicom_palette_with_regions() -> None:
    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    formats = [r.RegionSpatialFormat for r in ds.SequenceOfUltrasoundRegions]
    assert formats == [1, 4]  # 2D tissue and a spectral strip: only the 2D one is kept
    tissue = ds.SequenceOfUltrasoundRegions[0]
    y0, x0 = tissue.RegionLocationMinY0, tissue.RegionLocationMinX0
    y1, x1 = min(tissue.RegionLocationMaxY1 + 1, ds.Rows), min(tissue.RegionLocationMaxX1 + 1, ds.Columns)
    rgb16 = apply_color_lut(ds.pixel_array, ds)
    assert rgb16.dtype == np.uint16
    scaled = np.rint((rgb16 - rgb16.min()) * (255 / (int(rgb16.max()) - int(rgb16.min())))).astype(np.uint8)
    image = load_image(path)
    _check(image, (y1 - y0, x1 - x0))
    np.testing.assert_array_equal(image, _pil_luma(scaled)[y0:y1, x0:x1])
    assert image_shape(path) == image.shape


# --- DICOM: files built here ----------------------------------------------------------------------


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 256, (6, 9), dtype=np.uint8)
    _write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1")
    _write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2")
    np.testing.assert_array_equal(load_image(tmp_path / "m1.dcm"), 255 - pixels)
    np.testing.assert_array_equal(load_image(tmp_path / "m2.dcm"), pixels)


def test_dicom_12bit_scales_and_monochrome1_inverts(tmp_path: Path) -> None:
    ramp = np.linspace(100, 4095, 64).astype(np.uint16).reshape(8, 8)
    _write_dicom(tmp_path / "m2.dcm", ramp, "MONOCHROME2", bits_stored=12)
    _write_dicom(tmp_path / "m1.dcm", ramp, "MONOCHROME1", bits_stored=12)
    expected = np.rint((ramp.astype(float) - 100) * 255 / (4095 - 100))
    np.testing.assert_array_equal(load_image(tmp_path / "m2.dcm"), expected)
    np.testing.assert_array_equal(load_image(tmp_path / "m1.dcm"), 255 - expected)


def test_dicom_multiframe_default_is_middle(tmp_path: Path) -> None:
    frames = np.stack([np.full((4, 5), v, dtype=np.uint8) for v in (10, 20, 30, 40)])
    path = tmp_path / "cine.dcm"
    _write_dicom(path, frames)
    assert load_image(path)[0, 0] == 30  # frame 4 // 2
    assert [load_image(path, frame=i)[0, 0] for i in range(4)] == [10, 20, 30, 40]
    with pytest.raises(ImageReadError, match="4 frame"):
        load_image(path, frame=4)
    single = tmp_path / "single.dcm"
    _write_dicom(single, frames[0])
    assert load_image(single, frame=0)[0, 0] == 10
    with pytest.raises(ImageReadError, match="1 frame"):
        load_image(single, frame=1)


@pytest.mark.parametrize(
    ("regions", "box"),
    [
        (None, (0, 20, 0, 30)),  # no sequence: no crop
        ([(1, 2, 3, 11, 12), (4, 0, 15, 29, 19)], (3, 13, 2, 12)),  # 2D region only; Max inclusive
        ([(1, 2, 3, 11, 12), (1, 20, 1, 24, 5)], (1, 13, 2, 25)),  # union of the 2D regions
        ([(3, 5, 5, 9, 9), (4, 0, 15, 29, 19)], (5, 20, 0, 30)),  # none 2D: union of all
        ([(1, 25, 10, 99, 99)], (10, 20, 25, 30)),  # clipped to the image
    ],
)
def test_dicom_us_region_crop(tmp_path: Path, regions: list | None, box: tuple[int, int, int, int]) -> None:
    pixels = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    path = tmp_path / "r.dcm"
    _write_dicom(path, pixels, regions=regions)
    y0, y1, x0, x1 = box
    np.testing.assert_array_equal(load_image(path), pixels[y0:y1, x0:x1])
    assert image_shape(path) == (y1 - y0, x1 - x0)
    np.testing.assert_array_equal(load_image(path, us_region=False), pixels)
    assert image_shape(path, us_region=False) == (20, 30)


def test_dicom_region_outside_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.dcm"
    _write_dicom(path, np.zeros((20, 30), dtype=np.uint8), regions=[(1, 40, 40, 50, 50)])
    with pytest.raises(ImageReadError, match="us_region=False"):
        load_image(path)
    assert load_image(path, us_region=False).shape == (20, 30)


def test_is_dicom_by_content_not_suffix(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    path = tmp_path / "IM0001"
    _write_dicom(path, pixels)
    assert is_dicom(path)
    np.testing.assert_array_equal(load_image(path), pixels)
    png_named_dcm = _save(tmp_path / "a.dcm", Image.fromarray(pixels), format="PNG")
    assert not is_dicom(png_named_dcm)
    np.testing.assert_array_equal(load_image(png_named_dcm), pixels)
    assert not is_dicom(tmp_path / "missing.dcm")


def test_dcm_without_dicm_header_says_so(tmp_path: Path) -> None:
    path = tmp_path / "raw.dcm"
    path.write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + bytes(200))
    with pytest.raises(ImageReadError, match="DICM"):
        load_image(path)


# --- Failure modes --------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not found") as info:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)
    with pytest.raises(ImageReadError, match="is a folder, not a file"):
        image_shape(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_fifo_device_and_broken_link_get_their_own_message_and_never_hang(tmp_path: Path) -> None:
    """issue 7.11: a FIFO (no writer) or /dev/zero given as an image is refused at once, not read forever."""
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "moved.png")

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("reading the path hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        cases = [(fifo, "named pipe"), (link, "broken symbolic link"), (tmp_path, "folder")]
        if Path("/dev/zero").exists():
            cases.append((Path("/dev/zero"), "is a device"))
        for path, words in cases:
            for func in (load_image, image_shape):
                with pytest.raises(ImageReadError, match=words) as info:
                    func(path)
                assert "not found" not in str(info.value)
            assert is_dicom(path) is False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_non_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("patient 12, left breast\n")
    for func in (load_image, image_shape):
        with pytest.raises(ImageReadError, match="not a PNG, JPEG, BMP, TIFF or DICOM") as info:
            func(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "ICO", "PCX", "EPS"])
def test_only_the_formats_alnus_reads_are_decoded_whatever_the_name(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attack review: a manifest row or a file named .png was decoded as any format Pillow knows (an ICO gave an
    icon of another size than the picture; a WebP and a GIF passed `data validate`), and an EPS file made Pillow run
    Ghostscript from PATH, then crash the whole run with a TypeError."""
    ran = tmp_path / "ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f'#!/bin/sh\necho "$*" >> {ran}\nexit 0\n')
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = tmp_path / "scan.png"
    if fmt == "EPS":
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 30\nshowpage\n")
    else:
        picture = Image.fromarray(RNG.integers(0, 256, (30, 40), dtype=np.uint8))
        if fmt == "WEBP" and not features.check("webp"):
            pytest.skip("this Pillow has no WebP codec")
        picture.save(path, format=fmt)
    for read in (load_image, image_shape):
        with pytest.raises(ImageReadError, match="not a PNG, JPEG, BMP, TIFF or DICOM image"):
            read(path)
    assert not_an_image(path)
    assert not ran.exists(), ran.read_text()


def _bare_dicom_files(folder: Path) -> list[Path]:
    """A DICOM file without its preamble, without preamble and 'DICM', and a data set without file meta."""
    full = folder / "full.dcm"
    ds = _write_dicom(full, RNG.integers(0, 256, (16, 16), dtype=np.uint8))
    data = full.read_bytes()
    (folder / "no_preamble.dcm").write_bytes(data[128:])
    (folder / "no_dicm.dcm").write_bytes(data[132:])
    del ds.file_meta
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, False
    write_dataset(stream, ds)  # no file meta: starts at (0008,0016)
    (folder / "no_meta.dcm").write_bytes(stream.getvalue())
    return [folder / "no_preamble.dcm", folder / "no_dicm.dcm", folder / "no_meta.dcm"]


def test_not_an_image_accepts_what_image_shape_reads_and_names_the_rest(tmp_path: Path) -> None:
    grey = Image.fromarray(RNG.integers(0, 256, (30, 40), dtype=np.uint8))
    # Saved under another format's name: the content decides, as in load_image and the manifest check, among the
    # formats alnus reads; another format is named as one alnus does not read.
    readable = [_save(tmp_path / "plain.png", grey), _save(tmp_path / "jpeg.png", grey, format="JPEG"),
                _save(tmp_path / "bmp.tif", grey, format="BMP")]  # fmt: skip
    other = [_save(tmp_path / "gif.png", grey, format="GIF")]
    if features.check("webp"):
        other.append(_save(tmp_path / "webp.png", grey, format="WEBP"))
    if features.check("jpg_2000"):
        other.append(_save(tmp_path / "jp2.jpg", grey, format="JPEG2000"))
    for path in other:
        assert not_an_image(path).endswith("a format alnus does not read; export it as PNG"), path
    readable.append(tmp_path / "scan.dcm")
    _write_dicom(readable[-1], RNG.integers(0, 256, (16, 16), dtype=np.uint8))
    for path in readable:
        assert not_an_image(path) == "", path
        assert load_image(path).ndim == 2
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("patient 12, left breast\n")
    (tmp_path / "noise.png").write_bytes(bytes(range(256)))
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    refused = {
        tmp_path / "empty.png": "an empty file, 0 bytes",
        tmp_path / "notes.jpg": "text, not an image",
        tmp_path / "noise.png": "not a PNG, JPEG, BMP, TIFF, DICOM or other image file that alnus reads",
        tmp_path / "cut.png": "a PNG file whose header is truncated or corrupt",
    }
    refused |= {
        path: "a DICOM data set without the 128-byte preamble and 'DICM'" for path in _bare_dicom_files(tmp_path)
    }
    for path, words in refused.items():
        assert not_an_image(path).startswith(words), path
        with pytest.raises(ImageReadError):
            image_shape(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_pillow_file(tmp_path: Path, suffix: str) -> None:
    path = _save(tmp_path / f"a{suffix}", Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert image_shape(path) == (64, 64)  # the header survives: image_shape does not decode
    with pytest.raises(ImageReadError, match="truncated or corrupt; re-export it"):
        load_image(path)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
def test_truncated_dicom(tmp_path: Path) -> None:
    native = tmp_path / "native.dcm"
    _write_dicom(native, RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    native.write_bytes(native.read_bytes()[:-1000])
    jpeg = tmp_path / "jpeg.dcm"
    source = Path(get_testdata_file("examples_ybr_color.dcm")).read_bytes()
    jpeg.write_bytes(source[: len(source) // 2])
    header = tmp_path / "header.dcm"
    header.write_bytes(source[:200])
    for path in (native, jpeg, header):
        with pytest.raises(ImageReadError, match="truncated or corrupt") as info:
            load_image(path, frame=0)
        assert str(path) in str(info.value)


def test_dicom_pixel_data_of_another_size_than_its_header_says_is_refused(tmp_path: Path) -> None:
    """Attack review: Columns one less than the pixels' width was read (with only pydicom's warning) as a sheared image
    that changed the model's call; so were Rows/Columns of 10 and 1-bit BitsAllocated on 8-bit data."""
    import pydicom

    odd = tmp_path / "odd.dcm"  # 3 x 5 = 15 bytes, padded to an even 16: read as it is
    pixels = RNG.integers(0, 256, (3, 5), dtype=np.uint8)
    _write_dicom(odd, pixels)
    np.testing.assert_array_equal(load_image(odd), pixels)
    for name, change in (("columns", {"Columns": 29}), ("small", {"Rows": 10, "Columns": 10}),
                         ("one_bit", {"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0})):  # fmt: skip
        path = tmp_path / f"{name}.dcm"
        _write_dicom(path, RNG.integers(0, 256, (20, 30), dtype=np.uint8))
        ds = pydicom.dcmread(path)
        for key, value in change.items():
            setattr(ds, key, value)
        ds.save_as(path)
        wanted = r"pixel data holds 600 bytes, but its header .* needs \d+: the file is truncated or corrupt, or its"
        with pytest.raises(ImageReadError, match=wanted):
            load_image(path)


def test_png_bomb_header_is_refused(tmp_path: Path) -> None:
    huge = _png_header(tmp_path / "huge.png", 100_000, 100_000)  # over 2x Pillow's limit: its error
    for func in (load_image, image_shape):
        with pytest.raises(ImageReadError, match="decompression bomb"):
            func(huge)


def test_max_pixels_above_pillows_limit_is_honoured_without_global_change(tmp_path: Path) -> None:
    """issue 7.11: our limit decides (users cannot raise PIL.Image.MAX_IMAGE_PIXELS from the CLI)."""
    before = Image.MAX_IMAGE_PIXELS
    big = _png_header(tmp_path / "big.png", 10_000, 10_000)  # between Pillow's limit and 2x: only a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert image_shape(big, max_pixels=10**9) == (10_000, 10_000)
        with pytest.raises(ImageReadError, match="--max-pixels") as info:
            image_shape(big)
    assert "data.max_image_pixels" in str(info.value) and "PIL.Image" not in str(info.value)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == before
    assert MAX_PIXELS == before  # our default is Pillow's default


def _png16_header(path: Path, width: int, height: int) -> Path:
    """A 16-bit grey PNG header of width x height with no pixel data: a few dozen bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_16bit_bomb_is_refused_from_its_header_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 7.11: a 16-bit 9400x9400 PNG (under Pillow's pixel limit) counts 2 bytes a pixel and is refused."""
    from PIL import ImageFile

    def never(self: object) -> None:
        raise AssertionError("the pixels must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    bomb = _png16_header(tmp_path / "bomb.png", 9400, 9400)
    assert 9400 * 9400 < MAX_PIXELS < 2 * 9400 * 9400
    for func in (load_image, image_shape):
        with pytest.raises(ImageReadError, match=r"9400 x 9400 pixels of 2 byte\(s\)") as info:
            func(bomb)
        assert "--max-pixels" in str(info.value)


def test_max_pixels_counts_bytes_per_pixel(tmp_path: Path) -> None:
    """issue 7.11: 100 x 100 pixels fit 10,000 as 8-bit grey, not as 16-bit grey or RGB."""
    grey = _save(tmp_path / "grey.png", Image.fromarray(np.zeros((100, 100), dtype=np.uint8)))
    deep = _save(tmp_path / "deep.png", Image.fromarray(np.arange(10_000, dtype=np.uint16).reshape(100, 100)))
    rgb = _save(tmp_path / "rgb.png", Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)))
    dcm = tmp_path / "deep.dcm"
    _write_dicom(dcm, np.arange(10_000, dtype=np.uint16).reshape(100, 100) % 4096, bits_stored=12)
    assert load_image(grey, max_pixels=10_000).shape == (100, 100)
    for path, needed in ((deep, 20_000), (rgb, 30_000), (dcm, 20_000)):
        with pytest.raises(ImageReadError, match="decompression bombs"):
            load_image(path, max_pixels=needed - 1)
        assert load_image(path, max_pixels=needed).shape == (100, 100)
    with pytest.raises(ImageReadError, match="whole number >= 1"):
        load_image(grey, max_pixels=0)


def test_deep_images_scale_in_chunks_with_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 7.11: the float working copy is bounded; chunking must not change a single pixel."""
    import alnus.data.images as images

    values = RNG.integers(0, 65536, (37, 29), dtype=np.uint16)
    path = _save(tmp_path / "deep.png", Image.fromarray(values))
    whole = load_image(path)
    monkeypatch.setattr(images, "_SCALE_CHUNK", 100)
    assert np.array_equal(load_image(path), whole)
    low, high = float(values.min()), float(values.max())
    assert np.array_equal(whole, np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8))


def test_max_pixels_parameter(tmp_path: Path) -> None:
    png = _save(tmp_path / "a.png", Image.fromarray(np.zeros((4, 4), dtype=np.uint8)))
    dcm = tmp_path / "a.dcm"
    _write_dicom(dcm, np.zeros((4, 4), dtype=np.uint8))
    for path in (png, dcm):
        assert load_image(path, max_pixels=16).shape == (4, 4)
        with pytest.raises(ImageReadError, match="decompression bombs"):
            load_image(path, max_pixels=15)
        with pytest.raises(ImageReadError, match="decompression bombs"):
            image_shape(path, max_pixels=15)


def test_dicom_bomb_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.dcm"
    ds = _write_dicom(path, np.zeros((4, 4), dtype=np.uint8))
    ds.Rows = ds.Columns = 60_000  # header claims 3.6 Gpx; the 16 bytes of pixel data are never decoded
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="60000 x 60000 pixels"):
        load_image(path)


def _unsupported_photometric(path: Path) -> None:
    ds = _write_dicom(path, np.zeros((4, 4), dtype=np.uint8))
    ds.PhotometricInterpretation = "HSV"
    ds.save_as(path, enforce_file_format=True)


def _no_decoder_installed(path: Path) -> None:
    ds = _write_dicom(path, np.zeros((4, 4), dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(12)])
    ds.save_as(path, enforce_file_format=True)


def _no_decoder_exists(path: Path) -> None:
    ds = _write_dicom(path, np.zeros((4, 4), dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([bytes(16)])
    ds.save_as(path, enforce_file_format=True)


def _truncated(path: Path) -> None:
    _write_dicom(path, np.zeros((32, 32), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_jpeg(path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"))
    ds.PatientName, ds.PatientID, ds.InstitutionName = PATIENT_NAME, PATIENT_ID, INSTITUTION
    ds.PixelData = encapsulate([bytes(64)] * int(ds.NumberOfFrames))
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (_unsupported_photometric, "'HSV' is not supported"),
        (_no_decoder_installed, "install"),
        (_no_decoder_exists, "cannot be decoded by pydicom"),
        (_truncated, "truncated or corrupt"),
        (_corrupt_jpeg, "truncated or corrupt"),
    ],
)
def test_dicom_errors_never_reveal_identifiers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, build: object, reason: str
) -> None:
    path = tmp_path / "study.dcm"
    build(path)  # type: ignore[operator]
    assert PATIENT_NAME.encode() in path.read_bytes()  # the identifiers are really in the file
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageReadError) as info:
            load_image(path, frame=0)
    message = str(info.value)
    assert reason in message and str(path) in message
    chained = [info.value.__cause__, info.value.__context__]
    said = [message, repr(info.value), caplog.text, *map(str, chained), *(str(w.message) for w in caught)]
    for secret in (PATIENT_NAME, "Quixotic", "Zenobia", PATIENT_ID, INSTITUTION, "19230417", "20240229"):
        assert not any(secret in text for text in said), secret


@pytest.mark.realdata
def test_breast_rgba_pngs_decode(shared_data: Path) -> None:
    for name in ("case001.png", "case002.png"):
        path = shared_data / "BrEaST-Lesions-USG" / "images" / name
        with Image.open(path) as im:
            assert im.mode == "RGBA"
            expected = np.asarray(im.convert("L"))
        image = load_image(path)
        _check(image, expected.shape)
        np.testing.assert_array_equal(image, expected)
        assert image_shape(path) == image.shape


def test_parse_frame_is_one_rule_for_every_stage() -> None:
    from alnus.data.images import parse_frame

    assert parse_frame("") is None and parse_frame(None) is None and parse_frame("  ") is None
    assert parse_frame(" 2 ") == 2 and parse_frame("0") == 0 and parse_frame(7) == 7
    for bad in ("-1", "+1", "1.0", "x", "²"):
        with pytest.raises(ValueError, match="not a whole number >= 0"):
            parse_frame(bad)
    # An attack review: 5000 digits got Python's "Exceeds the limit (4300 digits) for integer string conversion".
    with pytest.raises(ValueError, match=r"frame 99999999999999999999\.\.\. \(5000 digits\) is beyond any file"):
        parse_frame("9" * 5000)
    assert parse_frame("000000000012") == 12


def test_a_deflated_dicom_is_refused_before_it_is_inflated(tmp_path) -> None:
    """Attack review: a deflated data set inflates whole inside pydicom (a 1.6 MB file held 1.5 GB); refused."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from alnus.data.images import ImageReadError, load_image

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "US", 8, 8, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 8, 8, 7
    ds.PixelRepresentation, ds.PixelData = 0, bytes(64)
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    with pytest.raises(ImageReadError, match="deflated DICOM .* not read"):
        load_image(path)


def test_the_first_page_of_a_many_page_tiff_is_read_without_counting_pages(tmp_path, monkeypatch) -> None:
    """Attack review: every decode of a 20,000-page TIFF walked all pages to count them (15 s each)."""
    from PIL import Image, TiffImagePlugin

    from alnus.data.images import load_image

    pages = [Image.fromarray(np.full((8, 8), v, dtype=np.uint8)) for v in (10, 20, 30)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])

    def no_count(self) -> int:
        raise AssertionError("n_frames was counted")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "n_frames", property(no_count))
    assert int(load_image(path)[0, 0]) == 10


@pytest.mark.parametrize("bound", [[0, 1], "nan", "1e400"])
def test_dicom_region_bound_not_one_number_is_refused(tmp_path: Path, bound: object) -> None:
    # A crafted file: a region's location with two values, or (as DS) no whole number; it crashed with TypeError.
    path = tmp_path / "r.dcm"
    ds = _write_dicom(path, np.zeros((20, 30), dtype=np.uint8), regions=[(1, 2, 3, 11, 12)])
    (region,) = ds.SequenceOfUltrasoundRegions
    if isinstance(bound, str):
        region.add_new("RegionLocationMinX0", "DS", bound)
    else:
        region.RegionLocationMinX0 = bound
    ds.save_as(path, enforce_file_format=True)
    for read in (load_image, image_shape):
        with pytest.raises(ImageReadError, match="not one whole number each; load it with us_region=False"):
            read(path)
    assert load_image(path, us_region=False).shape == (20, 30)


def test_uncompressed_colour_dicom_without_planar_configuration_is_named(tmp_path: Path) -> None:
    """Attack review: an RGB DICOM lacking Planar Configuration (type 1C) was refused as "pixel data is truncated or
    corrupt", which sent a user looking for damage; the header's gap is named, and with the tag it decodes."""
    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    path = tmp_path / "rgb.dcm"
    ds = _write_dicom(path, rgb, "RGB")
    del ds.PlanarConfiguration
    ds.save_as(path, enforce_file_format=True)
    for read in (load_image, image_shape):
        with pytest.raises(ImageReadError, match=r"rgb\.dcm: DICOM colour image \(3 samples per pixel, .*Planar Conf"):
            read(path)
    ds.PlanarConfiguration = 0
    ds.save_as(path, enforce_file_format=True)
    assert load_image(path).shape == (32, 40)
