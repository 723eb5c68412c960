"""Reading images the way a production pipeline must: never trusting the extension, never
dropping a file silently, and turning every awkward-but-valid image into plain 8-bit RGB.

Pillow's process-wide switches stay at their safe values: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
never set (it would also accept PNGs with bad checksums) and ``Image.MAX_IMAGE_PIXELS`` is never
raised or cleared. The pixel limit callers ask for is enforced here, from the header, before any
pixel is decoded. Nothing here touches the ``warnings`` filters either: they are process-wide
and not thread-safe, and ingestion decodes from several threads at once.
"""

from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

# Formats visionflow accepts, as Pillow names them after sniffing the content. MPO is how Pillow
# reports multi-picture JPEGs from phones; it decodes as a JPEG.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff"}
)
# Names that claim an image in a format visionflow does not take. Ingestion looks at them (and
# quarantines them as ``unsupported_format``) rather than skipping them as "not an image": a
# folder of iPhone HEICs or Photoshop files should show up in the report, not vanish.
OTHER_IMAGE_EXTENSIONS = frozenset(
    {
        ".ico", ".cur", ".icns", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".tga", ".pcx", ".psd",
        ".sgi", ".rgb", ".ras", ".xbm", ".xpm", ".dds", ".qoi", ".jp2", ".j2k", ".jpx", ".jpf",
        ".avif", ".avifs", ".heic", ".heif", ".svg", ".eps", ".dng", ".cr2", ".nef", ".arw",
    }
)  # fmt: skip
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as a viewer shows them

# EXIF orientation -> the transpose that makes the image upright (the table ImageOps uses).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DRAFT_MIN = 64
_PLAIN_MODES = frozenset({"L", "RGB", "CMYK", "YCbCr", "1", "P", "RGBA", "LA"})  # convert() always works
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "PA", "RGBa"})


class ImageReadError(Exception):
    """An image that cannot be used, with a machine-readable ``reason``.

    Reasons: ``empty``, ``not_an_image``, ``unsupported_format``, ``truncated``, ``corrupt``
    (damaged data that is not simply cut short), ``decompression_bomb``, ``missing``,
    ``unreadable`` (the bytes could not be read: permissions, I/O errors).
    """

    def __init__(self, reason: str, message: str, path: str | os.PathLike[str] | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.message = message


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What validation learned about a file, before any conversion."""

    width: int  # after EXIF orientation
    height: int
    format: str
    mode: str
    n_frames: int
    phash: int | None = None  # 64-bit perceptual hash, when asked for


Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
T = TypeVar("T")


# --------------------------------------------------------------------------- opening and errors


def _open(source: Source) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageReadError("empty", "file is empty")
        return Image.open(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        if os.path.getsize(source) == 0:
            raise ImageReadError("empty", "file is empty")
        return Image.open(source)
    return Image.open(source)


def _head(source: Source, n: int = 32) -> tuple[bytes, int | None]:
    """First bytes and total size of a source, for diagnosing a file Pillow gave up on."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return bytes(source[:n]), len(source)
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read(n), os.fstat(f.fileno()).st_size
        pos = source.tell()
        source.seek(0)
        head = source.read(n)
        end = source.seek(0, os.SEEK_END)
        source.seek(pos)
        return head, end
    except (OSError, ValueError, AttributeError):
        return b"", None


def _diagnose(head: bytes, size: int | None) -> tuple[str, str] | None:
    """Tell a damaged image from a non-image by its signature, and a cut-short file from a
    damaged one where the header says how long the file should be."""
    if size == 0:
        return "empty", "file is empty"
    known = (
        (b"\xff\xd8\xff", "JPEG"),
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"BM", "BMP"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
    )
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = struct.unpack("<I", head[4:8])[0] + 8
        if size is not None and declared > size:
            return "truncated", f"WebP header declares {declared} bytes, file has {size}"
        return "corrupt", "starts like a WebP file but cannot be decoded"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        return "unsupported_format", f"an ISO media file (brand {brand!r}: HEIF/AVIF/video), not an accepted format"
    for magic, fmt in known:
        if not head.startswith(magic):
            continue
        if fmt == "TIFF" and len(head) >= 8 and size is not None:
            offset = struct.unpack("<I" if magic[:2] == b"II" else ">I", head[4:8])[0]
            if offset >= size:
                return "truncated", f"TIFF header points past the end of the file ({offset} >= {size})"
        if fmt == "BMP" and len(head) >= 6 and size is not None:
            declared = struct.unpack("<I", head[2:6])[0]
            if declared > size:
                return "truncated", f"BMP header declares {declared} bytes, file has {size}"
        if fmt == "GIF" and size is not None and size < 13:
            return "truncated", "file ends inside the GIF header"
        if fmt == "PNG" and size is not None and size < 33:
            return "truncated", "file ends inside the PNG header"
        return "corrupt", f"starts like a {fmt} file but cannot be decoded"
    return None


def _decode_error(exc: BaseException) -> tuple[str, str]:
    """Reason for an exception raised while Pillow parsed or decoded pixel data."""
    msg = f"{type(exc).__name__}: {exc}"
    low = str(exc).lower()
    if isinstance(exc, OSError) and exc.errno is not None:  # a real I/O error, not bad data
        return "unreadable", msg
    if "truncat" in low or isinstance(exc, EOFError):
        return "truncated", msg
    if "decompressed data too large" in low or ("too many" in low and "chunk" in low):
        return "decompression_bomb", msg  # PNG text/iCCP chunks that inflate without bound
    if isinstance(exc, MemoryError):
        return "unreadable", msg
    return "corrupt", msg


def _guarded(fn: Callable[[Image.Image], T], source: Source) -> T:
    """Open ``source``, run ``fn`` on the image and map Pillow's many failure types to one
    exception with a reason. The image is always closed; ``fn`` must return detached data."""
    path = source if isinstance(source, (str, os.PathLike)) else None
    try:
        with _open(source) as im:
            return fn(im)
    except ImageReadError as exc:
        raise ImageReadError(exc.reason, exc.message, path) from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError("decompression_bomb", str(exc), path) from exc
    except FileNotFoundError as exc:
        raise ImageReadError("missing", "file does not exist", path) from exc
    except UnidentifiedImageError as exc:
        found = _diagnose(*_head(source))
        reason, message = found or ("not_an_image", "content is not a recognised image format")
        raise ImageReadError(reason, message, path) from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error, IndexError, TypeError) as exc:
        reason, message = _decode_error(exc)
        if reason == "corrupt":  # maybe the header tells us the file was simply cut short
            found = _diagnose(*_head(source))
            if found is not None and found[0] == "truncated":
                reason, message = found[0], f"{found[1]} ({message})"
        raise ImageReadError(reason, message, path) from exc


def _check_header(im: Image.Image, max_pixels: int) -> None:
    if im.format not in ALLOWED_FORMATS:
        raise ImageReadError("unsupported_format", f"format {im.format!r} is not one of {sorted(ALLOWED_FORMATS)}")
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageReadError("corrupt", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageReadError("decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")


def _check_convertible(im: Image.Image) -> None:
    """Run the RGB conversion on one pixel, so a file probe accepts never fails later in
    ``load_rgb`` (a crash mid-epoch) because of an exotic pixel mode."""
    if im.mode in _PLAIN_MODES:
        return
    try:
        _pixels_to_rgb(im.crop((0, 0, 1, 1)), BACKGROUND)
    except (ValueError, OSError) as exc:
        raise ImageReadError("unsupported_format", f"pixel mode {im.mode!r} cannot be converted to RGB: {exc}") from exc


def _frame_count(im: Image.Image) -> int:
    return max(1, int(getattr(im, "n_frames", 1) or 1))


def _orientation(im: Image.Image) -> int:
    """EXIF (or XMP) orientation, 1 when absent or unreadable: a broken EXIF block is metadata
    damage, not a reason to lose the picture. Call only after ``load()``: for PNG, reading EXIF
    loads the image, and a load error swallowed here would leave a half-decoded image behind."""
    try:
        value = im.getexif().get(0x0112, 1)
        value = int(value)
    except Exception:  # noqa: BLE001 - any malformed EXIF means "no orientation"
        return 1
    return value if value in _UPRIGHT else 1


def _load(im: Image.Image) -> None:
    """Decode every byte of pixel data, so truncation is found now and not mid-epoch."""
    im.load()


# --------------------------------------------------------------------------- public API


def probe(
    source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True, phash: bool = False
) -> ImageInfo:
    """Validate an image by decoding it and describe it.

    With ``draft`` a JPEG is decoded at 1/8 scale in greyscale: libjpeg still reads the whole
    entropy-coded stream (so truncation is still caught; the verdict is the full decode's) but
    skips the IDCT, upsampling and colour conversion, about half the CPU of a full decode (the
    entropy decoding left is the floor). ``phash`` adds a perceptual hash computed from the same
    decoded pixels, at little extra cost.
    """

    def run(im: Image.Image) -> ImageInfo:
        _check_header(im, max_pixels)
        fmt, mode = str(im.format), str(im.mode)
        n_frames = _frame_count(im)
        w, h = im.size
        if draft and fmt in JPEG_FORMATS:
            # 1/8 scale, but keep 64 px a side when the image has them: the hash needs detail
            im.draft("L", (min(w, max(w // 8, _DRAFT_MIN)), min(h, max(h // 8, _DRAFT_MIN))))
        if isinstance(source, (bytes, bytearray, memoryview)):
            # already in memory: hand the decoder all of it at once instead of 64 KiB at a time
            im.decodermaxblock = max(im.decodermaxblock, len(source))
        _load(im)
        _check_convertible(im)
        orientation = _orientation(im)
        if orientation in (5, 6, 7, 8):  # these orientations swap width and height
            w, h = h, w
        ph = _phash_loaded(im, orientation) if phash else None
        return ImageInfo(width=w, height=h, format=fmt, mode=mode, n_frames=n_frames, phash=ph)

    return _guarded(run, source)


def load_rgb(
    source: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    background: tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    """Open any accepted image as upright 8-bit RGB (the first frame of an animation).

    ``draft_size``: for JPEGs, let libjpeg decode at the smallest power-of-two reduction that is
    still at least this size, a large saving when the model wants 224 px from a 12 MP photo.
    """

    def run(im: Image.Image) -> Image.Image:
        _check_header(im, max_pixels)
        if draft_size is not None and im.format in JPEG_FORMATS:
            im.draft("RGB", draft_size)
        _load(im)
        out = to_rgb(im, background=background)
        return im.copy() if out is im else out  # closing ``im`` would destroy a returned ``im``

    return _guarded(run, source)


def to_rgb(im: Image.Image, *, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Apply EXIF orientation and convert any mode to 8-bit RGB without losing information
    that a plain ``convert("RGB")`` would throw away (alpha, 16-bit depth)."""
    orientation = _orientation(im)
    out = _pixels_to_rgb(im, background)
    if orientation != 1:
        out = out.transpose(_UPRIGHT[orientation])
    return out


def _pixels_to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = im.mode
    if mode in _HIGH_DEPTH_MODES:
        im = _high_depth_to_l(im)
        mode = "L"
    if "transparency" in im.info and mode in ("P", "L", "RGB", "1"):
        im = im.convert("RGBA")  # a tRNS colour key or palette alpha becomes a real alpha channel
        mode = "RGBA"
    elif mode == "P":
        im = im.convert("RGB")
        mode = "RGB"
    if mode in _ALPHA_MODES:
        if mode != "RGBA":
            im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (*background, 255))
        canvas.alpha_composite(im)
        return canvas.convert("RGB")
    if mode == "LAB":  # TIFF CIELAB: a plain convert() copies channels, which is not colour
        return ImageCms.applyTransform(im, _lab_to_srgb())
    if mode != "RGB":
        return im.convert("RGB")  # L, 1, CMYK (Pillow undoes Adobe's inversion), YCbCr, ...
    return im


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.buildTransformFromOpenProfiles(lab, srgb, "LAB", "RGB")


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit and float greyscale to 8 bits by scaling (``convert`` would clamp at 255).

    The scale is fixed by the container (65535 -> 255), not stretched per image, so a dark
    16-bit image stays dark and two images keep comparable brightness. 32-bit integers that fit
    16 bits are treated as 16-bit (how older Pillow opened 16-bit PNGs); anything else, and
    floats, have no natural range and are stretched min..max.
    """
    arr = np.asarray(im)
    if arr.dtype.kind == "f" or (arr.dtype.kind in "iu" and arr.dtype.itemsize >= 4):
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if arr.dtype.kind != "f" and lo >= 0 and hi <= 65535:
            scaled = arr.astype(np.float64) / 257.0
        elif hi <= lo:
            scaled = np.zeros(arr.shape, np.float64)
        else:
            scaled = (np.nan_to_num(arr.astype(np.float64), nan=lo) - lo) / (hi - lo) * 255.0
    else:
        scaled = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


# --------------------------------------------------------------------------- perceptual hash

_HASH_SIDE = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


_DCT8 = _dct_matrix(_HASH_SIDE)[:8]


def _phash_loaded(im: Image.Image, orientation: int) -> int:
    """pHash (DCT of a 32x32 greyscale thumbnail, low 8x8 frequencies against their median).

    Chosen over dHash because on look-alike but distinct images (handwritten digits) dHash
    chains thousands of them into one group at a useful threshold while pHash does not. The
    thumbnail is a box (area) average, so a JPEG decoded at 1/8 scale and the same picture
    decoded in full give nearly the same hash.
    """
    if im.mode == "L":
        gray = im
    elif im.mode in ("RGB", "CMYK", "YCbCr", "1") and "transparency" not in im.info:
        gray = im.convert("L")
    else:
        gray = _pixels_to_rgb(im, BACKGROUND).convert("L")
    small = gray.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BOX)
    if orientation != 1:
        small = small.transpose(_UPRIGHT[orientation])
    # The 1 KiB of pixels straight from tobytes(): cheaper than the array interface, same values.
    pixels = np.frombuffer(small.tobytes(), dtype=np.uint8).reshape(_HASH_SIDE, _HASH_SIDE).astype(np.float64)
    coeffs = (_DCT8 @ pixels @ _DCT8.T).ravel()  # only the 8x8 lowest frequencies are used
    ranked = np.sort(coeffs)
    bits = coeffs > (ranked[31] + ranked[32]) / 2  # the median of 64 values
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


# --------------------------------------------------------------------------- names


def is_image_name(path: str | os.PathLike[str]) -> bool:
    """Whether a file name claims an accepted image (case-insensitive); content is checked later."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def claims_image(path: str | os.PathLike[str]) -> bool:
    """Whether a file name claims any image at all, accepted format or not."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()  # Path().suffix, without a Path per file
    return suffix in IMAGE_EXTENSIONS or suffix in OTHER_IMAGE_EXTENSIONS
