"""Spec for mumic_core.images: every file here is generated in the test, in the format it claims to be."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from mumic_core.images import (
    DEFAULT_MAX_PIXELS,
    OPENAI_MEAN,
    OPENAI_STD,
    REASONS,
    ImageError,
    decode,
    image_size_from_header,
    load_for_model,
    normalize,
    preprocess,
    sha256_hex,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --- generated files -----------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def patches(w: int = 96, h: int = 64) -> Image.Image:
    """A smooth colour gradient with four flat patches: JPEG keeps it within a few levels."""
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None].repeat(w, 1)
    arr = np.stack([40 + 160 * x, 40 + 160 * y, 200 - 120 * x * y], axis=-1)
    pw, ph = w // 4, h // 4
    for i, colour in enumerate([(220, 30, 30), (30, 180, 40), (40, 60, 210), (240, 220, 40)]):
        cx, cy = (i % 2) * (w // 2) + w // 8, (i // 2) * (h // 2) + h // 8
        arr[cy : cy + ph, cx : cx + pw] = colour
    return Image.fromarray(np.rint(arr).astype(np.uint8))


def noise(w: int = 128, h: int = 128) -> Image.Image:
    """Incompressible pixels, so the second half of the file is pixel data, not headers."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def solid(colour, size=(16, 16), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def blank_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built by hand: zero rows deflate ~1000:1."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = max(1, (4 << 20) // len(row))
    deflate = zlib.compressobj(6)
    idat, left = [], height
    while left:
        n = min(left, rows_per_block)
        idat.append(deflate.compress(row * n))
        left -= n
    idat.append(deflate.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def grey_ink_cmyk_profile() -> bytes:
    """A minimal ICC v2 CMYK printer profile whose inks all print grey: L* = 100 * (1 - coverage), a* = b* = 0.

    No CMYK profile ships with Pillow; this one makes colours that plain conversion never would.
    """

    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    clut = bytearray()  # 2x2x2x2 grid, first channel slowest; lut8 Lab: L* 0..100 → 0..255, a*/b* 0 → 128
    for c, m, y, k in np.ndindex(2, 2, 2, 2):
        clut += bytes([round(255 * (1 - max(k, (c + m + y) / 3))), 128, 128])
    identity = bytes(range(256))
    a2b0 = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    a2b0 += identity * 4 + bytes(clut) + identity * 3
    desc = b"grey inks\0"
    tags = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", len(desc)) + desc + bytes(78)),
        (b"wtpt", b"XYZ " + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249)),
        (b"cprt", b"text" + bytes(4) + b"none\0"),
        (b"A2B0", a2b0),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = struct.pack(">I", offset + len(body)) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"prtrCMYKLab "
    header += bytes(12) + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48)
    return header + table + body


def tiff_with_tag(data: bytes, tag: int, value: int) -> bytes:
    """A little-endian TIFF from Pillow with one SHORT tag of its first IFD set to `value`."""
    out = bytearray(data)
    ifd = struct.unpack_from("<I", out, 4)[0]
    for i in range(struct.unpack_from("<H", out, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", out, entry)[0] == tag:
            struct.pack_into("<HHIH", out, entry, tag, 3, 1, value)
            return bytes(out)
    raise AssertionError(f"tag {tag} not in the TIFF")


def with_orientation(img: Image.Image, fmt: str, orientation: int, **params) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif.tobytes(), **params)


def pixel(img: Image.Image, xy) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))


def close(a, b, tol: int = 2) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def mean_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def reason_of(data: bytes, **kw) -> str:
    with pytest.raises(ImageError) as info:
        decode(data, **kw)
    return info.value.reason


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return blank_png(30_000, 30_000)  # 900 MP; ~110 KB on disk


@pytest.fixture
def no_big_allocations(monkeypatch):
    """Fail the test if Pillow is asked for a pixel buffer over 20 MP (every decode allocates through here)."""
    real_new = Image.core.new

    def guarded_new(mode, size, *args):
        assert size[0] * size[1] <= 20_000_000, f"pixels allocated for {size}"
        return real_new(mode, size, *args)

    monkeypatch.setattr(Image.core, "new", guarded_new)


# --- ImageError and helpers ----------------------------------------------------------------------------


def test_image_error_reads_reason_colon_detail_on_one_line():
    e = ImageError("truncated", "JPEG 10x10\nstopped early")
    assert (e.reason, e.detail) == ("truncated", "JPEG 10x10 stopped early")
    assert str(e) == "truncated: JPEG 10x10 stopped early"


def test_image_error_survives_pickling_between_workers():
    e = pickle.loads(pickle.dumps(ImageError("too_large", "9x9")))
    assert (e.reason, e.detail, str(e)) == ("too_large", "9x9", "too_large: 9x9")


def test_image_error_refuses_a_reason_outside_reasons():
    assert set(REASONS) == {"empty", "not_an_image", "truncated", "too_large", "unsupported", "corrupt"}
    with pytest.raises(ValueError):
        ImageError("bad_vibes", "x")


def test_sha256_hex_is_the_hex_digest_of_the_bytes():
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_hex(b"") == hashlib.sha256(b"").hexdigest()


# --- decode: formats and colours -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, params, tol",
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("GIF", {}, 0),
        ("JPEG", {"quality": 95}, 6),
    ],
)
def test_decode_returns_a_loaded_rgb_image_with_the_original_colours(fmt, params, tol):
    original = Image.new("RGB", (32, 16), RED)
    original.paste(BLUE, (16, 0, 32, 16))
    img = decode(encode(original, fmt, **params))
    assert img.mode == "RGB" and img.size == (32, 16)
    assert close(pixel(img, (4, 8)), RED, tol) and close(pixel(img, (28, 8)), BLUE, tol)


def test_decode_cmyk_jpeg_gives_the_colours_of_the_rgb_original():
    original = patches()
    img = decode(encode(original.convert("CMYK"), "JPEG", quality=95))  # Pillow writes Adobe-inverted CMYK
    assert img.mode == "RGB" and img.size == original.size
    assert mean_abs_diff(img, original) < 8


def test_decode_cmyk_jpeg_takes_its_colours_from_the_embedded_icc_profile():
    original = patches()
    original.paste(WHITE, (0, 0, 8, 8))
    img = decode(encode(original.convert("CMYK"), "JPEG", quality=95, icc_profile=grey_ink_cmyk_profile()))
    rgb = np.asarray(img).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 1]).max() <= 2 and np.abs(rgb[..., 1] - rgb[..., 2]).max() <= 2
    assert close(pixel(img, (2, 2)), WHITE, 3)  # no ink is paper white, also through the profile


def test_decode_cmyk_jpeg_with_a_broken_icc_profile_falls_back_to_plain_conversion():
    original = patches()
    data = encode(original.convert("CMYK"), "JPEG", quality=95, icc_profile=b"not an ICC profile" * 8)
    assert mean_abs_diff(decode(data), original) < 8


def test_decode_cmyk_tiff_gives_the_colours_of_the_rgb_original():
    original = patches()
    assert mean_abs_diff(decode(encode(original.convert("CMYK"), "TIFF")), original) < 1


def test_decode_composites_rgba_png_over_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 128), (0, 0, 255, 255)])
    img = decode(encode(rgba, "PNG"))
    assert img.mode == "RGB"
    assert pixel(img, (0, 0)) == WHITE  # fully transparent red is background, not red or black
    assert close(pixel(img, (1, 0)), (255, 127, 127))
    assert pixel(img, (2, 0)) == BLUE


def test_decode_turns_an_rgb_pngs_transparent_colour_white():
    img = Image.new("RGB", (2, 1), BLUE)
    img.putpixel((0, 0), RED)
    out = decode(encode(img, "PNG", transparency=RED))
    assert pixel(out, (0, 0)) == WHITE and pixel(out, (1, 0)) == BLUE


def test_decode_turns_the_transparent_palette_index_white():
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putdata([0, 1])
    img = decode(encode(pal, "PNG", transparency=0))
    assert pixel(img, (0, 0)) == WHITE and pixel(img, (1, 0)) == RED


@pytest.mark.parametrize(
    "mode, colour, opened_as", [("LA", (100, 128), "La"), ("RGBA", (100, 100, 100, 128), "RGBA")]
)
def test_decode_composites_premultiplied_alpha_tiffs_over_white(mode, colour, opened_as):
    # ExtraSamples = 1 marks the alpha as associated (colour already multiplied by alpha).
    data = tiff_with_tag(encode(Image.new(mode, (2, 2), colour), "TIFF"), 338, 1)
    assert Image.open(io.BytesIO(data)).mode == opened_as  # Pillow cannot convert "La" straight to RGBA
    assert close(pixel(decode(data), (0, 0)), (227, 227, 227))  # 100 + 255 - 128: 100 is already x alpha


def test_decode_spreads_grayscale_over_three_equal_channels():
    assert pixel(decode(encode(solid(77, mode="L"), "PNG")), (0, 0)) == (77, 77, 77)
    la = decode(encode(solid((0, 0), mode="LA"), "PNG"))  # black, fully transparent
    assert pixel(la, (0, 0)) == WHITE


def test_decode_one_bit_image_is_black_and_white():
    bits = Image.new("1", (8, 1), 0)
    bits.putpixel((3, 0), 1)
    img = decode(encode(bits, "PNG"))
    assert pixel(img, (3, 0)) == WHITE and pixel(img, (0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_decode_16_bit_grayscale_keeps_its_gradient_in_8_bits(fmt):
    values = np.array([[0, 255, 256, 4096, 32768, 49152, 65280, 65535]], dtype=np.uint16)
    img = decode(encode(Image.fromarray(values), fmt))
    red = [pixel(img, (x, 0))[0] for x in range(values.shape[1])]
    assert red == [0, 0, 1, 16, 128, 192, 255, 255]  # top 8 bits, not clipped at 255


def test_decode_float_image_in_zero_to_one_becomes_zero_to_255():
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    img = decode(encode(Image.fromarray(values), "TIFF"))
    assert [pixel(img, (x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_decode_animated_gif_gives_the_first_frame():
    frames = [solid(c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert pixel(decode(data), (8, 8)) == RED


def test_decode_animated_webp_gives_the_first_frame():
    frames = [solid(c) for c in (GREEN, RED, BLUE)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50)
    assert close(pixel(decode(data), (8, 8)), GREEN)


# --- decode: EXIF orientation ---------------------------------------------------------------------------

# Where the stored image's top-left (red) and top-right (green) corners are seen, per EXIF orientation.
SEEN_AT = {
    1: ("TL", "TR"),
    2: ("TR", "TL"),
    3: ("BR", "BL"),
    4: ("BL", "BR"),
    5: ("TL", "BL"),
    6: ("TR", "BR"),
    7: ("BR", "TR"),
    8: ("BL", "TL"),
}


def marked_corners(w: int = 40, h: int = 20) -> Image.Image:
    img = Image.new("RGB", (w, h), WHITE)
    img.paste(RED, (0, 0, 6, 6))
    img.paste(GREEN, (w - 6, 0, w, 6))
    return img


def corner(img: Image.Image, name: str) -> tuple[int, int, int]:
    x = 2 if name[1] == "L" else img.width - 3
    y = 2 if name[0] == "T" else img.height - 3
    return pixel(img, (x, y))


def test_decode_rotates_a_jpeg_tagged_orientation_6_upright():
    img = decode(with_orientation(marked_corners(), "JPEG", 6, quality=95))
    assert img.size == (20, 40)  # stored 40x20 lying on its side
    assert close(corner(img, "TR"), RED, 12) and close(corner(img, "BR"), GREEN, 12)
    assert close(corner(img, "TL"), WHITE, 12)


@pytest.mark.parametrize("orientation", sorted(SEEN_AT))
def test_decode_applies_every_exif_orientation(orientation):
    img = decode(with_orientation(marked_corners(), "PNG", orientation))
    assert img.size == ((20, 40) if orientation >= 5 else (40, 20))
    red_at, green_at = SEEN_AT[orientation]
    assert corner(img, red_at) == RED and corner(img, green_at) == GREEN


# --- decode: refusals ----------------------------------------------------------------------------------


def test_decode_refuses_zero_bytes_as_empty():
    assert reason_of(b"") == "empty"


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(1).bytes(4096),
        b"hello, this is a text file and not an image\n" * 20,
        b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
    ],
    ids=["random", "text", "html", "pdf"],
)
def test_decode_refuses_bytes_that_are_no_image_as_not_an_image(data):
    with pytest.raises(ImageError) as info:
        decode(data)
    assert info.value.reason == "not_an_image"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),  # iPhone photo
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n",  # never handed to Ghostscript
        b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64),
        b"8BPS\x00\x01" + bytes(64),
    ],
    ids=["heic", "svg", "eps", "jpeg2000", "psd"],
)
def test_decode_refuses_images_in_formats_it_does_not_read_as_unsupported(data):
    assert reason_of(data) == "unsupported"


@pytest.mark.parametrize(
    "fmt, params", [("JPEG", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {})]
)
def test_decode_refuses_a_file_cut_in_half_as_truncated(fmt, params):
    data = encode(noise(), fmt, **params)
    decode(data)  # whole, it is fine
    assert reason_of(data[: len(data) // 2]) == "truncated"


def test_decode_calls_garbage_behind_a_jpeg_signature_corrupt():
    assert reason_of(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4) == "corrupt"


def test_decode_refuses_a_bomb_from_its_header_without_allocating_pixels(bomb, no_big_allocations):
    # No timer (a loaded machine makes any bound flaky): what matters is that no pixel buffer is asked
    # for (no_big_allocations) and that Python-side memory stays small while refusing it.
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert "30000x30000" in info.value.detail
    assert peak < 20_000_000, f"{peak} bytes allocated while refusing a {len(bomb)}-byte bomb"


def test_max_pixels_is_set_per_call_and_inclusive():
    data = encode(solid(RED, (100, 100)), "PNG")
    assert reason_of(data, max_pixels=9_999) == "too_large"
    assert decode(data, max_pixels=10_000).size == (100, 100)
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_pillows_own_bomb_warning_and_error_never_escape(bomb, no_big_allocations):
    # 100 MP is over Pillow's warning threshold, 900 MP over its error threshold; ours decides both.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert reason_of(blank_png(10_000, 10_000)) == "too_large"
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert image_size_from_header(bomb) == (30_000, 30_000)  # Pillow would have refused to open it


def test_decode_still_says_too_large_if_pillows_bomb_check_is_switched_back_on(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # 10_000 px is over Pillow's 2x error limit
    assert reason_of(encode(solid(RED, (100, 100)), "PNG")) == "too_large"


def test_image_size_from_header_reads_stored_size_without_decoding(no_big_allocations):
    assert image_size_from_header(encode(solid(RED, (30, 20)), "JPEG")) == (30, 20)
    assert image_size_from_header(blank_png(12_000, 9_000)) == (12_000, 9_000)
    with pytest.raises(ImageError):
        image_size_from_header(b"not an image")


# --- preprocess ----------------------------------------------------------------------------------------


def bands(w: int = 300, h: int = 200) -> Image.Image:
    """Red left edge, blue right edge, green middle: shows what a resize mode keeps."""
    img = Image.new("RGB", (w, h), GREEN)
    img.paste(RED, (0, 0, 30, h))
    img.paste(BLUE, (w - 30, 0, w, h))
    return img


def test_preprocess_shortest_resizes_the_short_side_then_centre_crops():
    out = preprocess(bands(), 100)
    assert out.shape == (3, 100, 100) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    assert (out[0] > 128).sum() == 0 and (out[2] > 128).sum() == 0  # the side bands are cropped away
    assert out[1].min() > 200


def test_preprocess_squash_keeps_the_whole_image():
    out = preprocess(bands(), (120, 50), resize_mode="squash")  # "shortest" would keep only green
    assert out.shape == (3, 120, 50)
    assert out[0, :, :5].mean() > 200 and out[2, :, -5:].mean() > 200


def test_preprocess_longest_fits_the_image_and_pads_with_zeros():
    out = preprocess(bands(), 100, resize_mode="longest")  # 300x200 → 100x67, 16 rows above, 17 below
    assert out.shape == (3, 100, 100)
    assert out[:, :16].max() == 0 and out[:, -17:].max() == 0
    assert out[0, 50, :5].mean() > 200 and out[2, 50, -5:].mean() > 200 and out[1, 50, 50] > 200


def test_preprocess_shortest_with_a_non_square_size_fills_height_and_width():
    out = preprocess(bands(), (64, 128))  # scale 300x200 to 128x85, crop 64 rows
    assert out.shape == (3, 64, 128)
    assert out[0, :, :5].mean() > 200  # full width kept: the red band is still there


def test_preprocess_and_load_for_model_refuse_an_unknown_resize_mode():
    with pytest.raises(ValueError):
        preprocess(bands(), 32, resize_mode="stretch")
    with pytest.raises(ValueError):
        load_for_model(encode(bands(), "JPEG"), 32, resize_mode="stretch")


@pytest.mark.parametrize(
    "resize_mode, size", [("shortest", 224), ("shortest", (96, 160)), ("longest", 224), ("squash", (64, 200))]
)
def test_preprocess_then_normalize_matches_open_clips_eval_transform(resize_mode, size):
    open_clip = pytest.importorskip("open_clip")
    img = patches(301, 177)
    theirs = open_clip.image_transform(size, is_train=False, resize_mode=resize_mode)(img).numpy()
    ours = normalize(preprocess(img, size, resize_mode)[None], OPENAI_MEAN, OPENAI_STD)[0]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_normalize_is_x_over_255_minus_mean_over_std_per_channel():
    batch = np.random.default_rng(2).integers(0, 256, (2, 3, 4, 5), dtype=np.uint8)
    out = normalize(batch, OPENAI_MEAN, OPENAI_STD)
    assert out.dtype == np.float32 and out.shape == batch.shape
    for c in range(3):
        expected = (batch[:, c] / 255.0 - OPENAI_MEAN[c]) / OPENAI_STD[c]
        np.testing.assert_allclose(out[:, c], expected, rtol=1e-5, atol=1e-5)


# --- load_for_model ------------------------------------------------------------------------------------


def test_load_for_model_equals_decode_then_preprocess_for_a_small_png():
    rgba = patches(120, 90).convert("RGBA")
    rgba.putalpha(200)
    data = with_orientation(rgba, "PNG", 8)
    np.testing.assert_array_equal(load_for_model(data, 64), preprocess(decode(data), 64))


@pytest.mark.parametrize("size, shape", [(224, (224, 224)), ((128, 256), (128, 256))])
def test_load_for_model_decodes_a_large_jpeg_at_reduced_scale_and_stays_close(monkeypatch, size, shape):
    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, requested):
        result = real_draft(self, mode, requested)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = with_orientation(patches(2400, 1600), "JPEG", 6, quality=92)  # seen as 1600x2400
    fast = load_for_model(data, size)
    # libjpeg decoded at 1/4 scale: 600x400 still holds the resize (224x336 or 256x384, seen upright)
    assert drafted == [(600, 400)]
    slow = preprocess(decode(data), size)
    assert fast.shape == slow.shape == (3, *shape)
    assert mean_abs_diff(fast, slow) < 6


def test_load_for_model_refuses_what_decode_refuses(bomb, no_big_allocations):
    with pytest.raises(ImageError) as info:
        load_for_model(bomb, 224)
    assert info.value.reason == "too_large"
    with pytest.raises(ImageError) as info:
        load_for_model(encode(noise(), "JPEG")[:2000], 224)
    assert info.value.reason == "truncated"


# --- hostile input: a typed, one-line ImageError, never a crash or a blow-up ------------------------------

from mumic_core import images  # noqa: E402  (the module itself: its private steps are fault-injected)
from mumic_core.images import MAX_ASPECT_RATIO, load_many  # noqa: E402


def png_chunk(tag: bytes, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return struct.pack(">I", size) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, row: bytes, level: int = 9) -> bytes:
    """A PNG built by hand from one repeated scanline (filter byte included): any depth, any size."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(row * height, level)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def sixteen_bit(kind: str, w: int, h: int) -> bytes:
    """16-bit (and 32-bit int) files as catalogs get them; every pixel is 0x8000-ish (top byte 0x80..0x9f)."""
    if kind == "PNG I;16":  # grayscale PNG: Pillow opens it as I;16
        return raw_png(w, h, 16, 0, b"\x00" + b"\x80\x10" * w)
    if kind == "PNG RGB 16":
        return raw_png(w, h, 16, 2, b"\x00" + b"\x80\x10\x90\x20\x9f\x30" * w)
    if kind == "PNG RGBA 16":
        return raw_png(w, h, 16, 6, b"\x00" + b"\x80\x10\x90\x20\x9f\x30\xff\xff" * w)
    values = np.full((h, w), 0x8010, np.uint16)
    if kind == "TIFF I;16B":
        img = Image.frombytes("I;16B", (w, h), values.astype(">u2").tobytes())
    else:  # "TIFF I": 32-bit int
        img = Image.fromarray(values.astype(np.int32))
    return encode(img, "TIFF", compression="tiff_deflate")


def traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["PNG I;16", "PNG RGB 16", "PNG RGBA 16", "TIFF I;16B", "TIFF I"])
def test_16_bit_images_decode_without_a_wide_full_size_copy(kind):
    w, h = 3000, 2000  # 6 MP; the old int64 path peaked at 16 bytes per pixel (96 MB) for PNG I;16
    data = sixteen_bit(kind, w, h)
    opened = Image.open(io.BytesIO(data))
    assert opened.size == (w, h)
    peak = traced_peak(lambda: load_for_model(data, 64))
    # one uint8 plane plus small strips; any int32/int64 copy of the whole image is >= 4 bytes a pixel
    assert peak < 3 * w * h, f"{kind} ({opened.mode}): peak {peak / (w * h):.1f} bytes per pixel"
    out = load_for_model(data, 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8
    assert 0x80 <= int(out[0].min()) <= int(out.max()) <= 0xFF  # the top 8 bits, not clipped to 255


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I", np.int32)])
def test_every_16_bit_mode_keeps_its_top_8_bits(mode, dtype):
    values = np.array([[0, 255, 256, 4096, 32768, 49152, 65280, 65535]])
    img = Image.frombytes(mode, (8, 1), values.astype(dtype).tobytes())
    rgb = images._to_rgb(img)
    assert [pixel(rgb, (x, 0))[0] for x in range(8)] == [0, 0, 1, 16, 128, 192, 255, 255]


def test_a_32_bit_int_image_outside_0_65535_is_clipped_not_wrapped():
    img = Image.fromarray(np.array([[-5, 70_000, 2**31 - 1]], np.int32))
    assert [pixel(images._to_rgb(img), (x, 0))[0] for x in range(3)] == [0, 255, 255]


@pytest.mark.parametrize(
    "error, reason",
    [
        (RuntimeError("plugin exploded"), "corrupt"),
        (np.linalg.LinAlgError("numpy says no"), "corrupt"),
        (AttributeError("'NoneType' object has no attribute 'tile'"), "corrupt"),
        (MemoryError(), "too_large"),
    ],
)
def test_any_other_exception_while_decoding_becomes_a_typed_error(monkeypatch, error, reason):
    def boom(img, data):
        raise error

    monkeypatch.setattr(images, "_load", boom)
    data = encode(solid(RED), "PNG")
    for call in (lambda: decode(data), lambda: load_for_model(data, 64)):
        with pytest.raises(ImageError) as info:
            call()
        assert info.value.reason == reason
        assert type(error).__name__ in str(info.value)  # ours or the file's: the type says which
        assert "\n" not in str(info.value)
    pixels, ok, errors = load_many([data, None], 64)
    assert pixels.shape == (0, 3, 64, 64) and ok.tolist() == [False, False]
    assert errors[0].startswith(f"{reason}: ") and errors[1] is None


def test_keyboard_interrupt_and_a_wrong_argument_are_not_swallowed(monkeypatch):
    data = encode(solid(RED), "PNG")
    with pytest.raises(ValueError, match="resize_mode"):
        load_for_model(data, 64, resize_mode="stretch")

    def interrupted(img, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "_load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_for_model(data, 64)


def gif_header(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x2c" + bytes(8) + b"\x3b"


@pytest.mark.parametrize(
    "data",
    [
        raw_png(0, 0, 8, 0, b""),
        raw_png(0, 10, 8, 0, b"\x00"),
        raw_png(10, 0, 8, 0, b"\x00" + bytes(10)),
        gif_header(0, 0),
        b"BM"
        + struct.pack("<IHHI", 62, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, 0, 0, 1, 24, 0, 0, 0, 0, 0, 0),
    ],
    ids=["png-0x0", "png-0x10", "png-10x0", "gif-0x0", "bmp-0x0"],
)
def test_zero_sized_images_get_a_typed_error(data):
    with pytest.raises(ImageError) as info:
        load_for_model(data, 64)
    # Pillow refuses them in its header parser: PNG/GIF signatures say corrupt; BMP has no signature here
    assert info.value.reason in ("corrupt", "truncated", "not_an_image")


def test_check_aspect_refuses_a_zero_side_even_if_a_plugin_lets_it_through():
    with pytest.raises(ImageError, match="corrupt: PNG is 0x5"):
        images._check_aspect(0, 5, "PNG")


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (101, 1), (3, 400)])
def test_an_absurd_aspect_ratio_is_refused_from_the_header_before_decoding_or_resizing(monkeypatch, size):
    def no_pixels(img, data):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(images, "_load", no_pixels)
    data = blank_png(*size)
    for call in (lambda: decode(data), lambda: load_for_model(data, 64, resize_mode="squash")):
        with pytest.raises(
            ImageError, match=r"^unsupported: PNG \d+x\d+: aspect ratio \d+:1 is above"
        ) as info:
            call()
        assert info.value.reason == "unsupported"


def test_an_aspect_ratio_of_exactly_the_limit_still_decodes():
    assert load_for_model(blank_png(MAX_ASPECT_RATIO, 1), 64).shape == (3, 64, 64)
    assert load_for_model(encode(patches(400, 4), "JPEG"), 64).shape == (3, 64, 64)


def test_preprocess_refuses_an_absurd_aspect_ratio_instead_of_allocating_a_huge_resize():
    with pytest.raises(ImageError, match="aspect ratio 100000:1"):
        preprocess(Image.new("RGB", (1, 100_000)), 64)


def junk_exif(n: int = 60_000, seed: int = 0) -> bytes:
    """A TIFF-looking EXIF header (big-endian, IFD at 8) claiming 0xffff entries, then random bytes."""
    return b"MM\x00*\x00\x00\x00\x08\xff\xff" + np.random.default_rng(seed).bytes(n)


def huge_valid_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: 60 KB of text
    exif[_ORIENTATION] = 1
    return exif.tobytes()


_ORIENTATION = 0x0112


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("exif", ["junk", "huge", "junk-jpeg-prefixed"])
def test_a_huge_or_malformed_exif_block_is_ignored(fmt, exif):
    blob = {
        "junk": junk_exif(),
        "huge": huge_valid_exif(),
        "junk-jpeg-prefixed": b"Exif\x00\x00" + junk_exif(seed=1),
    }[exif]
    data = encode(solid(RED, (32, 32)), fmt, exif=blob)
    if fmt != "TIFF":  # a TIFF's EXIF is parsed into tags on save; the junk one is below
        assert len(data) > 50_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data" for some of these
        img = decode(data)
    assert img.size == (32, 32) and close(pixel(img, (16, 16)), RED, tol=3)


def tiff_with_a_bad_exif_pointer() -> bytes:
    """A TIFF whose ExifIFD pointer leads ~4 GB past its end (Pillow warns "Corrupt EXIF data")."""
    from PIL import TiffImagePlugin

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[0x8769], tags.tagtype[0x8769] = 8, 4  # an ExifIFD pointer (LONG), rewritten below
    data = bytearray(encode(solid(RED, (32, 32)), "TIFF", tiffinfo=tags))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 0x8769:
            struct.pack_into("<I", data, entry + 8, 0xFFFFFFF0)
            return bytes(data)
    raise AssertionError("no ExifIFD tag written")


def test_a_tiff_whose_exif_pointer_leads_outside_the_file_is_decoded_ignoring_it():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = decode(tiff_with_a_bad_exif_pointer())
    assert close(pixel(img, (16, 16)), RED)


def test_a_corrupt_exif_warning_turned_into_an_error_is_still_a_typed_image_error():
    data = tiff_with_a_bad_exif_pointer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a service run with -W error: Pillow's warning now raises
        with pytest.raises(ImageError) as info:  # Pillow's TIFF load reads the EXIF itself
            load_for_model(data, 64)
    assert info.value.reason == "corrupt" and "UserWarning: Corrupt EXIF data" in info.value.detail


def good_png() -> bytes:
    return encode(solid(GREEN, (8, 8)), "PNG")


def with_chunk_length(data: bytes, tag: bytes, length: int) -> bytes:
    at = data.index(tag) - 4
    return data[:at] + struct.pack(">I", length) + data[at + 4 :]


@pytest.mark.parametrize("tag", [b"IHDR", b"IDAT", b"tEXt"])
def test_a_bogus_png_chunk_length_is_typed_or_harmless(tag):
    png = good_png()
    if tag == b"tEXt":  # a text chunk before the pixels, claiming 4 GB
        png = png[:33] + png_chunk(b"tEXt", b"Comment\x00hello", length=0xFFFFFFF0) + png[33:]
    data = with_chunk_length(png, tag, 0xFFFFFFF0)
    peak = 0
    try:
        peak = traced_peak(lambda: load_for_model(data, 64))
    except ImageError as e:
        assert e.reason in ("corrupt", "truncated") and "\n" not in str(e)
    else:
        # the pixels really are all there: decoded, and nothing near 4 GB was asked for
        assert np.array_equal(load_for_model(data, 64), load_for_model(png, 64))
    assert peak < 20_000_000
    if tag == b"IHDR":
        with pytest.raises(ImageError):
            decode(data)


def html_zip() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("index.html", "<html><script>alert(document.cookie)</script></html>")
    return buf.getvalue()


def test_a_real_image_that_is_also_a_zip_or_has_script_appended_decodes_as_the_image():
    import zipfile

    jpeg_zip = encode(solid(RED, (32, 32)), "JPEG") + html_zip()
    assert zipfile.is_zipfile(io.BytesIO(jpeg_zip))  # a valid ZIP too: the polyglot is real
    gif_js = encode(solid(BLUE, (8, 8)).convert("P"), "GIF") + b"*/=1;alert(document.cookie);//"
    png_html = good_png() + b"<html><script>alert(1)</script></html>"
    for data, colour in ((jpeg_zip, RED), (gif_js, BLUE), (png_html, GREEN)):
        assert close(pixel(decode(data), (4, 4)), colour, tol=3)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff\xe0" + html_zip(),
        b"\xff\xd8\xff<html><script>alert(1)</script></html>",
        b"GIF89a/*\x00\x00\x00\x00\x00*/=alert(1);",
        b"GIF89a/*" + b"\x00" * 4 + b"*/=1;alert(document.cookie);//",
        b"\x89PNG\r\n\x1a\n<script>alert(1)</script>",
        b"<html>\xff\xd8\xff\xe0 not really</html>",
    ],
    ids=[
        "jpeg-magic+zip",
        "jpeg-magic+html",
        "gif-js-header",
        "gif-js-short",
        "png-magic+html",
        "html+jpeg-magic",
    ],
)
def test_a_polyglot_that_is_no_valid_image_gets_a_typed_one_line_error(data):
    with pytest.raises(ImageError) as info:
        load_for_model(data, 64)
    assert info.value.reason in ("not_an_image", "corrupt", "truncated", "unsupported")
    assert "\n" not in str(info.value)
