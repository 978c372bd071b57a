"""Decode ultrasound images (PNG/JPEG/BMP/TIFF, DICOM) to one representation: uint8 (H, W) grey-scale.

Colour (RGB, RGBA, palette, YBR, CMYK) becomes luminance as PIL's "L" (ITU-R 601-2); data deeper than
8 bits is scaled linearly from the image's own min..max to 0..255 (a constant image maps to 0);
MONOCHROME1 is inverted so that bright = echogenic; DICOM files are cropped to their 2D ultrasound
region. Unless `frame` says otherwise, a multi-frame DICOM gives its middle frame (a cine sweep is
usually started before and stopped after the lesion, so the middle frame is the likeliest to show it),
while a multi-page Pillow file gives its first page (the main image; later pages of MPO or TIFF files
are often previews or reduced resolutions).
See docs/architecture.md ("Images").
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from alnus._io import FILE_NOT_FOUND, NotAFileError, file_problem, open_regular
from alnus.errors import AlnusError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.pixels.decoders.base import Decoder

# Pillow's default decompression-bomb limit (about 89 Mpx); an ultrasound frame is well under 1 Mpx. The limit counts
# decoded bytes per pixel (a 16-bit pixel twice, RGB three times), since memory, not the pixel count, is what a bomb
# exhausts. Users raise it with `--max-pixels` or `data.max_image_pixels`.
MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# Elements scaled at a time from deep (16-bit, float) pixels to uint8: bounds the float64 working copy.
_SCALE_CHUNK = 1 << 20
_LIMIT_HINT = (
    "(a guard against decompression bombs; a pixel counts once per byte it decodes to); if the image is genuine, "
    "raise the limit with --max-pixels N on the command line or data.max_image_pixels in the config"
)

_DICOM_SUFFIXES = {".dcm", ".dicom"}
# The formats Pillow may decode, whatever a file is named: the ones alnus reads. Pillow would otherwise identify any
# of its plugins' formats by content (GIF, WebP, ICO, and EPS, whose plugin runs Ghostscript).
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_SUPPORTED_PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "PALETTE COLOR",
    # JPEG 2000 only: the codec undoes its colour transform, so decoded pixels are RGB.
    "YBR_ICT",
    "YBR_RCT",
}
_REGION_BOUNDS = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")


class ImageReadError(AlnusError):
    """An image could not be decoded; the message names the file and what to do."""


class FrameError(ImageReadError):
    """The frame asked for is not one of the file's; the message says which frames it has."""


def parse_frame(cell: object) -> int | None:
    """A manifest `frame` cell as a 0-based frame index; None when empty. ValueError for anything else."""
    text = "" if cell is None else str(cell).strip()
    if not text:
        return None
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"frame {cell!r:.80} is not a whole number >= 0 (the 0-based frame index)")
    if len(text.lstrip("0")) > 9:  # no file has a billion frames; int() refuses over 4300 digits in its own words
        raise ValueError(f"frame {text[:20]}... ({len(text)} digits) is beyond any file's frames")
    return int(text)


def is_dicom(path: str | Path) -> bool:
    """Whether `path` is a DICOM Part 10 file, by content (b"DICM" at byte 128) whatever its name.

    False for anything that is not a regular file (a FIFO or a device is never opened for reading).
    """
    try:
        with open_regular(path) as fh:
            head = fh.read(132)
    except (OSError, NotAFileError):
        return False
    return head[128:132] == b"DICM"


def not_an_image(path: str | Path) -> str:
    """What a file is instead of an image that `load_image` reads ("an empty file, 0 bytes", "text, not an image",
    ...), or "" when it is one. Cheap: reads the DICOM marker or the header that Pillow names the format by (as
    `image_shape` does, so that what it accepts is what the manifest check accepts), and decodes no pixels."""
    try:
        with open_regular(path) as fh:
            head = fh.read(132)
            if not head:
                return "an empty file, 0 bytes"
            if head[128:132] == b"DICM":
                return ""
            fh.seek(0)
            return _not_a_pillow_image(fh, head)
    except (OSError, NotAFileError) as exc:
        return f"unreadable: {exc}"


def _not_a_pillow_image(fh: IO[bytes], head: bytes) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(fh, formats=PILLOW_FORMATS).close()
    except Image.DecompressionBombError:
        return ""  # an image: its size is refused, with what to do, when it is read
    except UnidentifiedImageError:
        if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            return "text, not an image"
        if _bare_dicom(head):
            return (
                "a DICOM data set without the 128-byte preamble and 'DICM' that a DICOM file starts with, which alnus "
                "does not read; export it again as a DICOM file"
            )
        # Pillow reports a header that its plugin cannot parse as unidentified too: name the format it begins as.
        begins_as = [name for name in Image.ID if (accept := Image.OPEN[name][1]) is not None and accept(head[:16])]
        if begins_as and begins_as[0] not in PILLOW_FORMATS:
            return f"a {begins_as[0]} file, a format alnus does not read; export it as PNG"
        if begins_as:
            return f"a {begins_as[0]} file whose header is truncated or corrupt"
        return "not a PNG, JPEG, BMP, TIFF, DICOM or other image file that alnus reads, by its content"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"an image file whose header is truncated or corrupt ({exc})"
    return ""


def _bare_dicom(head: bytes) -> bool:
    """Whether `head` begins like DICOM without its preamble: 'DICM' itself, or a little-endian tag of the file meta
    (0002,xxxx) or identifying (0008,xxxx) group."""
    return head.startswith(b"DICM") or (head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) > 4 and head[3] == 0)


def image_shape(path: str | Path, *, us_region: bool = True, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) that `load_image` returns for `path`, read from the header without decoding pixels.

    Fails where `load_image` would on header problems (missing file, not an image, too many pixels,
    unsupported DICOM photometric interpretation or transfer syntax); truncated pixel data is only
    found by decoding.
    """
    path, limit = _existing_file(path), _limit(max_pixels)
    if is_dicom(path):
        ds = _read_dicom(path, pixels=False)
        rows, columns, _, _ = _check_dicom_header(ds, path, limit)
        box = _us_region_box(ds, path, rows, columns) if us_region else None
        return (rows, columns) if box is None else (box[1] - box[0], box[3] - box[2])
    with _open_pillow(path, limit) as im:
        return im.height, im.width


def us_region_note(path: str | Path) -> str:
    """Where a DICOM that `load_image` crops to its ultrasound region was cropped, as a sentence for an error about
    a mask or box of the wrong size or place; "" for any other file (or one whose header cannot be read)."""
    try:
        if not is_dicom(path):
            return ""
        ds = _read_dicom(Path(path), pixels=False)
        rows, columns = int(ds.Rows), int(ds.Columns)
        box = _us_region_box(ds, Path(path), rows, columns)
    except (AlnusError, OSError, AttributeError, TypeError, ValueError):
        return ""
    if box is None or box == (0, rows, 0, columns):
        return ""
    y0, y1, x0, x1 = box
    return (
        f"alnus reads this DICOM cropped to its ultrasound region, x {x0}-{x1 - 1} and y {y0}-{y1 - 1} of its "
        f"{columns}x{rows} frame: masks and boxes are in pixels of that {x1 - x0}x{y1 - y0} crop, so subtract {x0} "
        f"from x and {y0} from y of a box read on the whole frame"
    )


def frame_choice(
    path: str | Path, frame: int | None = None, *, max_pixels: int | None = None
) -> tuple[int, int | None]:
    """(the 0-based frame `load_image` decodes for `frame`, the number of frames of the file), from its header.

    A file read by Pillow with no frame asked for gives its first frame, and its count is None: counting the pages of
    a TIFF reads each page's header (a 20,000-page file took 15 s), which `load_image` avoids for that frame too.
    Fails as `load_image` would on header problems, with a `FrameError` for a frame the file does not have.
    """
    path, limit = _existing_file(path), _limit(max_pixels)
    if is_dicom(path):
        _, _, n_frames, _ = _check_dicom_header(_read_dicom(path, pixels=False), path, limit)
        return _pick_frame(path, frame, n_frames, default=n_frames // 2), n_frames
    with _open_pillow(path, limit) as im:  # opened either way: the header's problems, as load_image finds them
        if frame is None:
            return 0, None
        n_frames = getattr(im, "n_frames", 1)
        return _pick_frame(path, frame, n_frames, default=0), n_frames


def load_image(
    path: str | Path, *, frame: int | None = None, us_region: bool = True, max_pixels: int | None = None
) -> np.ndarray:
    """Decode `path` to a C-contiguous uint8 (H, W) grey-scale array.

    Args:
        frame: 0-based frame of a multi-frame file; None takes a DICOM's middle frame, a TIFF's first page.
        us_region: crop a DICOM to the union of its 2D tissue regions (SequenceOfUltrasoundRegions).
        max_pixels: refuse a frame that decodes to more than this many bytes (8-bit grey pixels; a 16-bit
            pixel counts 2, RGB 3), from its header, before decoding it; None is `MAX_PIXELS`.
    """
    path, limit = _existing_file(path), _limit(max_pixels)
    if is_dicom(path):
        image = _decode_dicom(path, frame, us_region, limit)
    else:
        image = _decode_pillow(path, frame, limit)
    # Writeable, so callers can augment in place (Pillow's arrays are read-only views).
    return np.require(image, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def alpha_channel(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray | None:
    """The first frame's alpha channel (uint8 (H, W), 255 opaque) of an image read by Pillow; None for a file without
    one (and for DICOM). A palette image's transparency counts as alpha. Fails as `load_image` would."""
    path, limit = _existing_file(path), _limit(max_pixels)
    if is_dicom(path):
        return None
    with _open_pillow(path, limit) as im:
        if "A" not in im.getbands() and "transparency" not in im.info:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning; our limit was checked above
                rgba = im.convert("RGBA")
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageReadError(f"{path}: file is truncated or corrupt; re-export it ({exc}).") from exc
        return np.asarray(rgba)[..., 3].copy()


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings while a header is read: they are about values alnus does not use (a malformed UID,
    an over-long ID) and quote them, identifiers included, on stderr; what alnus needs it checks itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        yield


def dicom_modality(path: str | Path) -> str | None:
    """A DICOM file's Modality ("US" for ultrasound), None when the tag is absent or empty.

    Reads that one tag only (no identifiers). Raises `ImageReadError` for an unreadable header.
    """
    import pydicom

    path = _existing_file(path)
    with _regular_file(path) as fh, quiet_pydicom():
        try:
            value: str | None = str(
                pydicom.dcmread(fh, specific_tags=["Modality"], stop_before_pixels=True).get("Modality", "") or ""
            ).strip()
        except Exception:  # pydicom raises many types
            value = None
    if value is None:
        # Outside the handler: see _read_dicom.
        raise ImageReadError(f"{path}: DICOM header is truncated or corrupt; re-export the file.")
    return value or None


def _limit(max_pixels: int | None) -> int:
    if max_pixels is None:
        return MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ImageReadError(f"the image size limit max_pixels must be a whole number >= 1, got {max_pixels!r}.")
    return max_pixels


def _existing_file(path: str | Path) -> Path:
    """`path` when it is a regular file; otherwise a message saying what it is (a FIFO is never opened)."""
    path = Path(path)
    problem = file_problem(path)
    if problem == FILE_NOT_FOUND:
        raise ImageReadError(f"{path}: file not found; check the path (relative to the manifest).")
    if problem is not None:
        raise ImageReadError(f"{path}: {problem}; point to an image file.")
    return path


def _pick_frame(path: Path, frame: int | None, n_frames: int, default: int) -> int:
    if frame is None:
        return default
    if not 0 <= frame < n_frames:
        raise FrameError(
            f"{path}: frame {frame} requested but the file has {n_frames} frame(s); "
            f"use a frame from 0 to {n_frames - 1}."
        )
    return frame


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale linearly from the array's own min..max to 0..255; a constant array maps to 0.

    Works chunk by chunk, so the float64 working copy stays small whatever the image's size.
    """
    low, high = float(values.min()), float(values.max())
    out = np.zeros(values.shape, dtype=np.uint8)
    if high == low:
        return out
    scale = 255.0 / (high - low)
    flat_in, flat_out = np.ascontiguousarray(values).reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _SCALE_CHUNK):
        part = flat_in[start : start + _SCALE_CHUNK].astype(np.float64)
        flat_out[start : start + _SCALE_CHUNK] = np.rint((part - low) * scale)
    return out


def _to_grey(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) RGB of any depth -> uint8 (H, W), with PIL's ITU-R 601-2 luminance."""
    if pixels.dtype != np.uint8:
        pixels = _scale_to_uint8(pixels)
    if pixels.ndim == 3:
        pixels = np.asarray(Image.fromarray(np.ascontiguousarray(pixels), "RGB").convert("L"))
    return pixels


# --- Pillow: PNG, JPEG, BMP, TIFF -------------------------------------------------------------------


def _pillow_bytes_per_pixel(mode: str) -> int:
    """Bytes one pixel of a Pillow `mode` decodes to (I;16: 2, I and F: 4, RGB: 3, L: 1)."""
    if mode.startswith("I;16"):
        return 2
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        return 4
    return bands * (4 if mode in ("I", "F") or mode.startswith("I;32") else 1)


def _check_pillow_size(path: Path, im: Image.Image, max_pixels: int, what: str = "image") -> None:
    per_pixel = _pillow_bytes_per_pixel(im.mode)
    if im.width * im.height * per_pixel > max_pixels:
        raise ImageReadError(
            f"{path}: {what} has {im.width} x {im.height} pixels of {per_pixel} byte(s) ({im.mode}), over the "
            f"limit of {max_pixels:,} {_LIMIT_HINT}; or export it smaller."
        )


@contextlib.contextmanager
def _regular_file(path: Path) -> Iterator[IO[bytes]]:
    """The image file opened for reading; a FIFO, device or folder is an `ImageReadError`, never a hang."""
    with contextlib.ExitStack() as stack:
        try:
            fh = stack.enter_context(open_regular(path))
        except NotAFileError as exc:
            raise ImageReadError(f"{exc}; point to an image file.") from None
        except OSError as exc:
            raise ImageReadError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions.") from None
        yield fh


@contextlib.contextmanager
def _open_pillow(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """Open lazily (header only) from a regular file, refusing decompression bombs before any decoding.

    Our limit (`max_pixels`, in bytes) decides; Pillow's warning is silenced (in scope only, so Pillow's global
    filters and Image.MAX_IMAGE_PIXELS stay as other users set them) so that a larger `max_pixels` is honoured,
    while Pillow's hard error (twice its limit) remains a ceiling that cannot be raised from here.
    """
    with _regular_file(path) as fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fh, formats=PILLOW_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageReadError(
                f"{path}: refused as a possible decompression bomb ({exc}); that is Pillow's own ceiling, above "
                "any --max-pixels: export the image smaller."
            ) from exc
        except UnidentifiedImageError as exc:
            hint = (
                "it is named like DICOM but lacks the DICOM file header ('DICM' at byte 128); re-export it"
                if path.suffix.lower() in _DICOM_SUFFIXES
                else "check the path or export the image as PNG"
            )
            raise ImageReadError(f"{path}: not a PNG, JPEG, BMP, TIFF or DICOM image; {hint}.") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageReadError(f"{path}: file is truncated or corrupt; re-export it ({exc}).") from exc
        with im:
            _check_pillow_size(path, im, max_pixels)
            yield im


def _decode_pillow(path: Path, frame: int | None, max_pixels: int) -> np.ndarray:
    with _open_pillow(path, max_pixels) as im:
        # Counting frames walks every page of a TIFF: the default (first) frame needs no count.
        index = 0 if frame is None else _pick_frame(path, frame, getattr(im, "n_frames", 1), default=0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if index:
                    im.seek(index)
                    # A later page may be larger or deeper than the first: check it before decoding it.
                    _check_pillow_size(path, im, max_pixels, what=f"frame {index}")
                im.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise ImageReadError(f"{path}: file is truncated or corrupt; re-export it ({exc}).") from exc
        if im.mode in ("I", "F") or im.mode.startswith("I;"):
            values = np.asarray(im)
            if not np.isfinite(values).all():
                raise ImageReadError(f"{path}: contains NaN or infinite pixel values; re-export it.")
            return _scale_to_uint8(values)
        try:
            # convert("L") drops alpha and applies the ITU-R 601-2 luma transform to RGB, P, CMYK...
            return np.asarray(im if im.mode == "L" else im.convert("L"))
        except ValueError as exc:
            raise ImageReadError(
                f"{path}: Pillow image mode {im.mode!r} cannot be made grey-scale; export the image as PNG."
            ) from exc


# --- DICOM (pydicom) ------------------------------------------------------------------------------


def _dicom_tags() -> list[int]:
    """The tags the decoder needs: group 0028 (image pixel module, palettes), pixel data, US regions."""
    from pydicom.datadict import DicomDictionary, tag_for_keyword

    tags = [tag for tag in DicomDictionary if tag >> 16 == 0x0028]
    return [*tags, 0x7FE00010, 0x7FE00001, 0x7FE00002, tag_for_keyword("SequenceOfUltrasoundRegions")]


def _read_dicom(path: Path, *, pixels: bool) -> Dataset:
    """Read only the tags `_dicom_tags` lists: identifiers (names, IDs, dates) are never parsed."""
    import pydicom
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    deflated = False
    with _regular_file(path) as fh, quiet_pydicom():
        # The path is a regular file now (`_regular_file` checked it): its file meta group alone is read by name.
        with contextlib.suppress(Exception):  # pydicom raises many types; a bare data set has no file meta
            deflated = read_file_meta_info(path).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        if not deflated:
            try:
                return pydicom.dcmread(fh, specific_tags=_dicom_tags(), stop_before_pixels=not pixels)
            except Exception:  # pydicom raises many types
                pass
    if deflated:
        # pydicom inflates a deflated data set whole before any header can be checked: a file of a few MB can hold
        # gigabytes (a decompression bomb), so this transfer syntax is refused, never inflated.
        raise ImageReadError(
            f"{path}: deflated DICOM (transfer syntax Deflated Explicit VR Little Endian) is not read, as its size "
            "cannot be bounded before inflating; re-export it uncompressed or with an image compression (JPEG, RLE)."
        )
    # Raised outside the handler so pydicom's exception, whose text may quote file values, is not even
    # attached as __context__.
    raise ImageReadError(f"{path}: DICOM header is truncated or corrupt; re-export the file.")


def _check_dicom_header(ds: Dataset, path: Path, max_pixels: int) -> tuple[int, int, int, Decoder]:
    """Refuse what cannot be decoded before touching the pixels; return (rows, columns, frames, decoder)."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        photometric = str(ds.PhotometricInterpretation).strip()
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(
            f"{path}: DICOM file lacks a valid image pixel module (Rows, Columns, Photometric "
            "Interpretation): it is truncated or corrupt, or not an image (e.g. a report); re-export it."
        ) from None
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise ImageReadError(
            f"{path}: DICOM photometric interpretation {photometric!r} is not supported "
            f"(supported: {', '.join(sorted(_SUPPORTED_PHOTOMETRIC))}); export the image as PNG."
        )
    _check_planar_configuration(ds, path)
    # Only one frame is ever decoded, so the limit is per frame; a long cine loop is not a bomb.
    per_pixel = _dicom_bytes_per_pixel(ds, photometric)
    if rows * columns * per_pixel > max_pixels:
        raise ImageReadError(
            f"{path}: DICOM frame has {columns} x {rows} pixels of {per_pixel} byte(s), over the limit of "
            f"{max_pixels:,} {_LIMIT_HINT}; or export it smaller."
        )
    return rows, columns, max(n_frames, 1), _dicom_decoder(ds, path)


def _check_planar_configuration(ds: Dataset, path: Path) -> None:
    """An uncompressed colour image must say how its samples are stored (Planar Configuration, type 1C): without it
    pydicom cannot decode it, and guessing would scramble a planar image into another picture without a word."""
    try:
        samples = int(ds.get("SamplesPerPixel") or 1)
        compressed = bool(ds.file_meta.get("TransferSyntaxUID") and ds.file_meta.TransferSyntaxUID.is_compressed)
    except (AttributeError, TypeError, ValueError):
        return  # the decoder says what is wrong with these
    if samples > 1 and not compressed and ds.get("PlanarConfiguration") is None:
        raise ImageReadError(
            f"{path}: DICOM colour image ({samples} samples per pixel, uncompressed) lacks Planar Configuration "
            "(0028,0006), which says whether its colour samples are interleaved or in planes; re-export the file "
            "from the scanner or PACS, or export the image as PNG."
        )


def _dicom_bytes_per_pixel(ds: Dataset, photometric: str) -> int:
    """Bytes one decoded pixel takes: samples x whole bytes per sample; a palette expands to 3 samples."""
    try:
        samples = max(int(ds.get("SamplesPerPixel") or 1), 1)
        per_sample = max((int(ds.get("BitsAllocated") or 8) + 7) // 8, 1)
    except (TypeError, ValueError):
        samples, per_sample = 1, 1
    return (3 if photometric == "PALETTE COLOR" else samples) * per_sample


def _dicom_decoder(ds: Dataset, path: Path) -> Decoder:
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise ImageReadError(f"{path}: DICOM file meta lacks a Transfer Syntax UID; re-export the file.")
    name = getattr(syntax, "name", str(syntax))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageReadError(
            f"{path}: DICOM transfer syntax {name!r} cannot be decoded by pydicom; export the image as PNG "
            "or as uncompressed DICOM."
        ) from None
    if not decoder.is_available:
        raise ImageReadError(
            f"{path}: DICOM transfer syntax {name!r} needs a decoder that is not installed; install one of "
            f"({'; '.join(decoder.missing_dependencies)}), e.g. `pip install pylibjpeg pylibjpeg-libjpeg`, "
            "or export the image as PNG."
        )
    return decoder


def _us_region_box(ds: Dataset, path: Path, rows: int, columns: int) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), ends exclusive: union of the 2D tissue regions (all regions if none is 2D), clipped.

    RegionSpatialFormat 1 is 2D tissue (DICOM PS3.3 C.8.5.5.1.1); the Max coordinates are inclusive.
    None when the file has no SequenceOfUltrasoundRegions.
    """
    regions = list(ds.get("SequenceOfUltrasoundRegions") or [])
    if not regions:
        return None
    tissue = [region for region in regions if region.get("RegionSpatialFormat") == 1]
    bounds = []
    for region in tissue or regions:
        if any(region.get(key) is None for key in _REGION_BOUNDS):
            raise ImageReadError(
                f"{path}: an ultrasound region lacks its location ({', '.join(_REGION_BOUNDS)}); "
                "load it with us_region=False or re-export the file."
            )
        try:
            bounds.append([int(region.get(key)) for key in _REGION_BOUNDS])
        except (TypeError, ValueError, OverflowError):  # several values, or a number that is no pixel (NaN, inf)
            raise ImageReadError(
                f"{path}: an ultrasound region's location ({', '.join(_REGION_BOUNDS)}) is not one whole number "
                "each; load it with us_region=False or re-export the file."
            ) from None
    x0, y0 = max(min(b[0] for b in bounds), 0), max(min(b[1] for b in bounds), 0)
    x1, y1 = min(max(b[2] for b in bounds) + 1, columns), min(max(b[3] for b in bounds) + 1, rows)
    if x0 >= x1 or y0 >= y1:
        raise ImageReadError(
            f"{path}: the ultrasound region lies outside the {columns} x {rows} image; "
            "load it with us_region=False or re-export the file."
        )
    return y0, y1, x0, x1


def _check_native_length(ds: Dataset, path: Path, rows: int, columns: int, n_frames: int) -> None:
    """Uncompressed pixel data must be as long as its header says (one byte of padding to an even length allowed):
    otherwise pydicom reads it anyway, with a warning, and the image comes out sheared or cut."""
    try:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is None or syntax.is_compressed:
            return
        samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated)
        actual = len(ds.PixelData)
    except (AttributeError, TypeError, ValueError):  # what is missing or malformed, the decoder reports
        return
    # YBR_FULL_422 stores two samples per pixel (the chroma of a pixel pair shared).
    per_pixel = 2 if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422" else samples
    expected = (rows * columns * n_frames * per_pixel * bits + 7) // 8
    if actual not in (expected, expected + 1):
        raise ImageReadError(
            f"{path}: DICOM pixel data holds {actual} bytes, but its header ({rows} rows x {columns} columns x "
            f"{n_frames} frame(s), {samples} sample(s) of {bits} bits) needs {expected}: the file is truncated or "
            "corrupt, or its header does not describe its pixels (the image would come out sheared or cut); "
            "re-export the file."
        )


def _decode_dicom(path: Path, frame: int | None, us_region: bool, max_pixels: int) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, as_pixel_options, convert_color_space

    ds = _read_dicom(path, pixels=True)
    rows, columns, n_frames, decoder = _check_dicom_header(ds, path, max_pixels)
    index = _pick_frame(path, frame, n_frames, default=n_frames // 2)
    if "PixelData" not in ds:
        # pydicom drops a Pixel Data element cut short by the end of the file, so this is also truncation.
        raise ImageReadError(
            f"{path}: DICOM file has no pixel data: it is truncated or corrupt, or not an image; re-export it"
        )
    _check_native_length(ds, path, rows, columns, n_frames)
    box = _us_region_box(ds, path, rows, columns) if us_region else None
    try:
        pixels, props = decoder.as_array(ds, index=index, **as_pixel_options(ds))
        # props describe the array as returned: pydicom 3 converts YBR to RGB itself (as_rgb), but a codec
        # plugin may hand back YBR, so convert only what is still YBR.
        photometric = str(props["photometric_interpretation"])
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        elif photometric in ("YBR_FULL", "YBR_FULL_422"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        elif int(props["bits_stored"]) <= 8 and int(props["pixel_representation"]) == 0:
            pixels = pixels.astype(np.uint8)
    except Exception:  # pydicom and its codec plugins raise many types
        pass
    else:
        image = _to_grey(pixels)
        if photometric == "MONOCHROME1":
            image = 255 - image
        return image if box is None else image[box[0] : box[1], box[2] : box[3]]
    # Outside the handler: see _read_dicom.
    raise ImageReadError(f"{path}: DICOM pixel data is truncated or corrupt; re-export the file.")
