"""Every bad or awkward input a real image folder contains, with the exact verdict expected.

Images are made in the test (tmp_path or memory), small, so the whole file runs in seconds.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from cvlib.data.imageio import (
    BACKGROUND,
    IMAGE_EXTENSIONS,
    ImageInfo,
    ImageReadError,
    claims_image,
    is_image_name,
    load_rgb,
    probe,
    to_rgb,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(seed: int = 0, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth random 'scene' (upsampled low-resolution noise): structured like a photo, so
    perceptual hashes behave as they do on real pictures, and different for every seed."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    return low.resize(size, Image.Resampling.BICUBIC)


def halves(size=(20, 10), left=RED, right=BLUE) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size, right)
    im.paste(left, (0, 0, w // 2, h))
    return im


def with_orientation(im: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes())


def reason_of(source, **kw) -> str:
    with pytest.raises(ImageReadError) as info:
        probe(source, **kw)
    return info.value.reason


# --------------------------------------------------------------------------- accepted formats


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("JPEG", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "RGB")],
)
def test_every_accepted_format_probes_and_loads(tmp_path, fmt, mode):
    p = tmp_path / f"img.{fmt.lower()}"
    p.write_bytes(encode(photo(), fmt))
    info = probe(p, max_pixels=10**6)
    assert (info.format, info.mode, info.width, info.height, info.n_frames) == (fmt, mode, 160, 120, 1)
    rgb = load_rgb(p)
    assert rgb.mode == "RGB" and rgb.size == (160, 120)


def test_png_named_jpg_is_recorded_as_png(tmp_path):
    p = tmp_path / "really_a_png.jpg"
    p.write_bytes(encode(photo(), "PNG"))
    assert probe(p).format == "PNG"
    assert load_rgb(p).size == (160, 120)


def test_sources_path_bytes_and_file_object_agree(tmp_path):
    data = encode(photo(), "JPEG")
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    expected = probe(p)
    assert probe(data) == expected
    assert probe(io.BytesIO(data)) == expected
    assert np.array_equal(np.asarray(load_rgb(data)), np.asarray(load_rgb(p)))


def test_returned_image_outlives_the_file(tmp_path):
    """An RGB image needing no conversion must still be detached from the closed file."""
    p = tmp_path / "plain.png"
    p.write_bytes(encode(Image.new("RGB", (4, 4), GREEN), "PNG"))
    im = load_rgb(p)
    assert im.getpixel((0, 0)) == GREEN
    assert im.resize((2, 2)).getpixel((0, 0)) == GREEN


# --------------------------------------------------------------------------- rejected inputs


def test_empty_file_from_path_bytes_and_stream(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert reason_of(p) == "empty"
    assert reason_of(b"") == "empty"
    assert reason_of(io.BytesIO(b"")) == "empty"


def test_text_named_jpg_is_not_an_image(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(ImageReadError) as info:
        load_rgb(p)
    assert info.value.reason == "not_an_image"
    assert info.value.path == str(p)
    assert "not a recognised image" in info.value.message


def test_missing_file():
    assert reason_of("/nonexistent/definitely/not/here.jpg") == "missing"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
@pytest.mark.parametrize("draft", [True, False])
def test_truncated_file_is_rejected_and_flag_stays_false(tmp_path, fmt, draft):
    data = encode(photo(1), fmt, **({"progressive": True} if fmt == "JPEG" and draft else {}))
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    assert reason_of(p, draft=draft) == "truncated"
    with pytest.raises(ImageReadError) as info:
        load_rgb(p)
    assert info.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_jpeg_is_caught_by_the_draft_decode():
    """Draft mode must still read the whole entropy-coded stream: cut off the last 5%."""
    data = encode(photo(2, (640, 480)), "JPEG", quality=90)
    info = probe(data)
    assert (info.width, info.height) == (640, 480)  # the full size, not the draft size
    assert reason_of(data[: int(len(data) * 0.95)], draft=True) == "truncated"


def test_jpeg_signature_followed_by_garbage_is_corrupt():
    assert reason_of(b"\xff\xd8\xff\xe0\x00\x10" + b"\x00" * 5000) == "corrupt"


def test_jpeg_with_a_damaged_huffman_table_is_corrupt():
    data = bytearray(encode(photo(), "JPEG"))
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16  # impossible code-length counts
    with pytest.raises(ImageReadError) as info:
        load_rgb(bytes(data))
    assert info.value.reason == "corrupt"


def test_png_with_a_bad_header_checksum_is_corrupt():
    data = bytearray(encode(photo(), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    assert reason_of(bytes(data)) == "corrupt"


def test_png_with_damaged_pixel_data_is_corrupt():
    data = bytearray(encode(photo(3), "PNG"))
    idat = data.index(b"IDAT")
    for k in range(idat + 40, idat + 80):
        data[k] ^= 0x5A
    assert reason_of(bytes(data)) == "corrupt"


def test_decompression_bomb_by_configurable_limit(tmp_path):
    limit_before = Image.MAX_IMAGE_PIXELS
    p = tmp_path / "big.png"
    p.write_bytes(encode(Image.new("RGB", (100, 100)), "PNG"))
    assert probe(p, max_pixels=10_000).width == 100  # exactly at the limit is fine
    with pytest.raises(ImageReadError) as info:
        probe(p, max_pixels=9_999)
    assert info.value.reason == "decompression_bomb"
    assert "10000 pixels" in info.value.message
    with pytest.raises(ImageReadError) as info:
        load_rgb(p, max_pixels=5_000)
    assert info.value.reason == "decompression_bomb"
    assert Image.MAX_IMAGE_PIXELS == limit_before  # never raised or cleared


def test_bomb_is_refused_before_decoding(monkeypatch):
    """The limit is checked from the header: a huge image is refused without allocating it."""
    data = encode(Image.new("L", (4000, 3000)), "PNG")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    assert reason_of(data, max_pixels=1_000_000) == "decompression_bomb"


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "SGI"])
def test_images_in_other_formats_are_unsupported(tmp_path, fmt):
    p = tmp_path / "disguised.png"  # the name lies too: content decides
    p.write_bytes(encode(Image.new("RGB", (16, 16), RED), fmt))
    with pytest.raises(ImageReadError) as info:
        load_rgb(p)
    assert info.value.reason == "unsupported_format"
    assert repr(fmt) in info.value.message


def test_heif_container_is_unsupported_not_garbage():
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00" * 40
    assert reason_of(heic) == "unsupported_format"


def test_error_carries_reason_message_and_path():
    err = ImageReadError("truncated", "image file is truncated", "a/b.jpg")
    assert (err.reason, err.message, err.path) == ("truncated", "image file is truncated", "a/b.jpg")
    assert str(err) == "a/b.jpg: image file is truncated"
    assert ImageReadError("empty", "file is empty").path is None


# --------------------------------------------------------------------------- awkward but valid


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_6_turns_20x10_into_10x20(fmt):
    data = with_orientation(halves(), fmt, 6)
    info = probe(data)
    assert (info.width, info.height) == (10, 20)
    rgb = load_rgb(data)
    assert rgb.size == (10, 20)
    top, bottom = np.asarray(rgb)[2, 5], np.asarray(rgb)[17, 5]
    # Orientation 6 = the camera was turned clockwise: the stored left half is the top.
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize(("orientation", "size"), [(1, (20, 10)), (3, (20, 10)), (5, (10, 20)), (8, (10, 20))])
def test_every_orientation_gives_the_expected_shape(orientation, size):
    data = with_orientation(halves(), "PNG", orientation)
    assert load_rgb(data).size == size
    info = probe(data)
    assert (info.width, info.height) == size


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_does_not_lose_the_picture():
    data = encode(photo(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01\x02")
    assert probe(data).width == 160
    assert load_rgb(data).size == (160, 120)


def test_cmyk_becomes_rgb_with_plausible_colours():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # full magenta + yellow = red
    for fmt in ("JPEG", "TIFF"):
        data = encode(cmyk, fmt)
        assert probe(data).mode == "CMYK"
        r, g, b = load_rgb(data).getpixel((8, 8))
        assert r > 230 and g < 30 and b < 30, (fmt, r, g, b)


def test_palette_with_transparency_shows_the_background():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([*RED, *GREEN] + [0] * 762)
    im.putpixel((1, 1), 1)
    for fmt in ("PNG", "GIF"):
        data = encode(im, fmt, transparency=0)
        rgb = load_rgb(data)
        assert rgb.getpixel((0, 0)) == BACKGROUND, fmt  # transparent red -> background
        assert rgb.getpixel((1, 1)) == GREEN, fmt
        assert load_rgb(data, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


def test_rgba_and_la_are_composited_not_stripped():
    rgba = Image.new("RGBA", (4, 4), (*RED, 0))  # fully transparent red
    rgba.putpixel((1, 1), (*BLUE, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgb = load_rgb(encode(rgba, "PNG"))
    assert rgb.getpixel((0, 0)) == BACKGROUND  # convert("RGB") would have given red
    assert rgb.getpixel((1, 1)) == BLUE
    assert all(120 <= c <= 135 for c in rgb.getpixel((2, 2)))  # half black over white
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_rgb(encode(la, "PNG"), background=(10, 20, 30)).getpixel((0, 0)) == (10, 20, 30)


def test_rgb_png_with_a_colour_key_is_transparent():
    im = Image.new("RGB", (2, 2), RED)
    im.putpixel((1, 1), BLUE)
    rgb = load_rgb(encode(im, "PNG", transparency=RED))
    assert rgb.getpixel((0, 0)) == BACKGROUND and rgb.getpixel((1, 1)) == BLUE


def test_16_bit_ramp_keeps_its_levels():
    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    data = encode(Image.fromarray(ramp), "PNG")
    assert probe(data).mode.startswith("I;16")
    out = np.asarray(load_rgb(data))
    assert len(np.unique(out[..., 0])) > 200  # convert("RGB") clamps to about 2 levels
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16_bit_dark_image_stays_dark():
    """A fixed 65535 -> 255 scale: a dark 16-bit image must not be stretched to full range."""
    dark = np.full((8, 8), 1000, dtype=np.uint16)
    assert load_rgb(encode(Image.fromarray(dark), "PNG")).getpixel((0, 0)) == (4, 4, 4)


def test_32_bit_and_float_greyscale_are_scaled():
    as_int = Image.fromarray(np.arange(0, 65536, 256, dtype=np.int32).reshape(16, 16), "I")
    assert len(set(np.asarray(to_rgb(as_int))[..., 0].ravel())) > 250
    as_float = Image.fromarray(np.linspace(-1.0, 1.0, 256, dtype=np.float32).reshape(16, 16), "F")
    out = np.asarray(to_rgb(as_float))[..., 0]
    assert out.min() == 0 and out.max() == 255


def test_lab_tiff_is_converted_colorimetrically():
    data = encode(Image.new("LAB", (4, 4), (128, 128, 128)), "TIFF")  # mid grey (a, b offset 128)
    assert probe(data).mode == "LAB"
    r, g, b = load_rgb(data).getpixel((1, 1))
    assert abs(r - g) <= 3 and abs(g - b) <= 3 and 100 < r < 140, (r, g, b)


def test_probe_refuses_what_load_rgb_could_not_convert(monkeypatch):
    """What ingestion accepts must load during training: a mode with no RGB path is refused."""
    from cvlib.data import imageio

    def no_conversion(im, background):
        raise ValueError("conversion from XYZ to RGB not supported")

    monkeypatch.setattr(imageio, "_pixels_to_rgb", no_conversion)
    sixteen_bit = encode(Image.fromarray(np.zeros((4, 4), np.uint16)), "PNG")
    assert reason_of(sixteen_bit) == "unsupported_format"


@pytest.mark.parametrize("mode", ["L", "1"])
def test_greyscale_becomes_three_equal_channels(mode):
    im = Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))).convert(mode)
    rgb = load_rgb(encode(im, "PNG"))
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_gives_frame_0_and_the_frame_count(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    info = probe(data)
    assert info.n_frames == 3
    r, g, b = load_rgb(data).getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15, (fmt, r, g, b)


def test_draft_size_decodes_a_jpeg_smaller():
    data = encode(photo(0, (800, 600)), "JPEG")
    assert load_rgb(data, draft_size=(100, 100)).size == (200, 150)  # 1/4: still >= 100 px
    assert load_rgb(data).size == (800, 600)
    assert probe(data, draft=True) == probe(data, draft=False)  # same verdict and description


# --------------------------------------------------------------------------- perceptual hash


def perceptual_hash(data: bytes) -> int:
    """The pHash ingestion stores for these bytes (``probe`` with ``phash``, JPEGs in draft)."""
    h = probe(data, phash=True).phash
    assert h is not None
    return h


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def test_phash_survives_reencoding_and_resizing_but_tells_pictures_apart():
    base = photo(7, (480, 360))
    h = perceptual_hash(encode(base, "JPEG", quality=95))
    copies = [
        encode(base, "JPEG", quality=35),
        encode(base.resize((240, 180)), "JPEG", quality=80),
        encode(base, "PNG"),
        encode(base.resize((320, 240)), "WEBP", quality=70),
    ]
    assert max(hamming(h, perceptual_hash(c)) for c in copies) <= 4
    others = [perceptual_hash(encode(photo(seed, (480, 360)), "JPEG")) for seed in range(20, 30)]
    assert min(hamming(h, o) for o in others) > 10


def test_phash_of_draft_and_full_decode_agree():
    data = encode(photo(8, (800, 600)), "JPEG", quality=90)
    draft = probe(data, phash=True).phash
    full = probe(data, draft=False, phash=True).phash
    assert draft is not None and full is not None
    assert hamming(draft, full) <= 2


def test_phash_follows_exif_orientation():
    base = photo(9, (200, 100))
    stored_sideways = with_orientation(base.transpose(Image.Transpose.ROTATE_90), "JPEG", 6)
    assert load_rgb(stored_sideways).size == (200, 100)
    assert hamming(perceptual_hash(stored_sideways), perceptual_hash(encode(base, "JPEG"))) <= 4


def test_phash_only_when_asked():
    data = encode(photo(), "PNG")
    assert probe(data).phash is None
    assert isinstance(probe(data, phash=True).phash, int)


# --------------------------------------------------------------------------- names


def test_image_names_are_matched_case_insensitively():
    assert is_image_name("a/B.JPG") and is_image_name("x.Jpeg") and is_image_name("y.TIFF")
    assert not is_image_name("notes.txt") and not is_image_name("Makefile")
    assert not is_image_name("icon.ico") and claims_image("icon.ICO") and claims_image("p.heic")
    assert not claims_image("labels.csv")
    assert {".jpg", ".png", ".webp", ".bmp", ".gif", ".tif"} <= IMAGE_EXTENSIONS


def test_image_info_is_backward_compatible():
    assert ImageInfo(1, 2, "PNG", "RGB", 1) == ImageInfo(width=1, height=2, format="PNG", mode="RGB", n_frames=1)


def test_pixel_data_checksum_is_not_silently_accepted():
    """A PNG whose zlib stream is damaged must be refused even though its header is fine."""
    raw = b"\x00" + b"\x80" * 3 * 4  # one row, filter 0
    comp = bytearray(zlib.compress(raw * 4))
    comp[-3] ^= 0xFF  # break the adler32 checksum
    chunks = [
        (b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)),
        (b"IDAT", bytes(comp)),
        (b"IEND", b""),
    ]
    data = b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks
    )
    assert reason_of(data) == "corrupt"
