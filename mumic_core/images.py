"""The decode stage: image bytes → RGB pixels → uint8 arrays ready for the model.

A file that cannot become pixels raises ImageError with a short reason; nothing else escapes for bad bytes:
decode() and load_for_model() turn any other Exception raised while decoding (a MemoryError, a plugin's
RuntimeError, a numpy error) into an ImageError that names its type, so one file never fails a batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import struct
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageCms

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = ("empty", "not_an_image", "truncated", "too_large", "unsupported", "corrupt")
DEFAULT_MAX_PIXELS = 64_000_000
# Longest side over shortest side. A 1x100000 strip passes the pixel limit, but resizing its short side to
# the model's size would make a 64x6400000 (1.2 GB) image; no catalog photo is anywhere near 100:1.
MAX_ASPECT_RATIO = 100

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("shortest", "squash", "longest")

# How much larger than the resize output a JPEG is decoded (load_for_model): 1 lets libjpeg decode a
# 1024x768 photo at 1/2 scale for a 224 px model (1.65x faster decode + preprocess than a 2x margin).
JPEG_DRAFT_MARGIN = 1

# Pillow's bomb check runs inside Image.open, before we can see the header size, and is a warning above
# 89 MP and an error above 179 MP. Left on, it would be a second, different rule (and a stray warning).
# Switching it off is safe here because every path into pixels goes through _open(), which refuses
# width*height > max_pixels from the header before anything is decoded. Done once, here, rather than
# per call: per-call toggling of a module global (or of warnings filters) is not thread-safe. It is
# process-wide, so other code in a process that imports this module should open images through decode().
Image.MAX_IMAGE_PIXELS = None

# Only web raster formats. Pillow would also open EPS (by running Ghostscript on the bytes) and dozens of
# exotic formats; none belongs in a product catalog and each is attack surface.
_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "TIFF", "BMP", "AVIF")

# Signatures, to tell a damaged file of a format we read ("corrupt") from an image in a format we do not
# read ("unsupported": HEIC from phones, SVG logos, ...) and from bytes that are no image ("not_an_image").
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"8BPS", "PSD"),
    (b"%!PS", "PostScript"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")

# What Pillow's plugins raise on malformed input (the same set its own fuzzers accept). Only Pillow calls
# sit inside these try blocks, so a bug of ours still crashes loudly.
_PILLOW_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
)

_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Wide one-band images (16-bit, 32-bit int, float) become 8 bits this many pixels at a time, so no
# full-size wide copy is ever made (a 16-bit PNG compresses ~1000:1; int64 copies of it would not).
_STRIP_PIXELS = 1 << 18


class ImageError(Exception):
    """A file that cannot be turned into pixels: `.reason` is one of REASONS, `.detail` says why."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}")
        detail = " ".join(str(detail).split())  # the error column holds one line
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes → a fully loaded RGB image, upright (EXIF orientation applied), transparency over white."""
    with _as_image_error(data):
        img = _load(_open_for_pixels(data, max_pixels), data)
        return _to_rgb(_upright(img, _exif_orientation(img)))


def image_size_from_header(data: bytes) -> tuple[int, int]:
    """(width, height) as stored (before EXIF rotation), read from the header without decoding pixels."""
    return _open(data, max_pixels=None).size


def load_for_model(
    data: bytes,
    image_size: int | tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize_mode: str = "shortest",
) -> np.ndarray:
    """decode() + preprocess() in one go, letting libjpeg decode big JPEGs at 1/2, 1/4 or 1/8 scale.

    Returns uint8 [3, H, W]. Same result as preprocess(decode(data), ...) when no scaling applies.
    """
    _check_resize_mode(resize_mode)  # a caller's mistake: stays a ValueError
    target_h, target_w = _target_hw(image_size)
    with _as_image_error(data):
        return _load_for_model(data, target_h, target_w, max_pixels, resize_mode)


def _load_for_model(
    data: bytes, target_h: int, target_w: int, max_pixels: int, resize_mode: str
) -> np.ndarray:
    img = _open_for_pixels(data, max_pixels)
    if img.format in ("JPEG", "MPO"):  # their EXIF is read with the header, so this loads nothing
        w, h = img.size
        if _exif_orientation(img) in (5, 6, 7, 8):  # stored sideways: displayed width = stored height
            out_h, out_w = _resized_size(h, w, target_h, target_w, resize_mode)
        else:
            out_w, out_h = _resized_size(w, h, target_h, target_w, resize_mode)
        # draft() picks the smallest DCT scale (1/2, 1/4, 1/8) that leaves the image at least this big.
        # libjpeg's scaled decode already averages each 8x8 block, so the bicubic step after it needs no
        # 2x margin; with one, images under 896 px (most catalog photos) would never be scaled at all.
        img.draft("RGB", (JPEG_DRAFT_MARGIN * out_w, JPEG_DRAFT_MARGIN * out_h))
    img = _load(img, data)
    return preprocess(_to_rgb(_upright(img, _exif_orientation(img))), (target_h, target_w), resize_mode)


def load_many(
    datas: Sequence[bytes | None],
    image_size: int | tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize_mode: str = "shortest",
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """load_for_model over a batch: the one decode helper of retag and training data.

    Items that are None are left alone (nothing to decode: a failed read, a skipped row). Returns
    (pixels of the decoded items packed in order, uint8 [n_ok, 3, H, W]; ok mask [N]; per item the
    ImageError line, or None).
    """
    h, w = _target_hw(image_size)
    pixels = np.empty((len(datas), 3, h, w), np.uint8)
    ok = np.zeros(len(datas), bool)
    errors: list[str | None] = [None] * len(datas)
    n_ok = 0
    for i, data in enumerate(datas):
        if data is None:
            continue
        try:
            pixels[n_ok] = load_for_model(data, (h, w), max_pixels, resize_mode)
        except ImageError as e:
            errors[i] = str(e)
            continue
        ok[i] = True
        n_ok += 1
    return pixels[:n_ok], ok, errors


def preprocess(
    img: Image.Image, image_size: int | tuple[int, int], resize_mode: str = "shortest"
) -> np.ndarray:
    """RGB image → uint8 [3, H, W], resized like open_clip's eval transform (bicubic, then crop or pad).

    "shortest": short side to size, centre crop (open_clip's default); "squash": straight to (H, W);
    "longest": long side to size, centred on zeros. image_size is an int or (H, W).
    """
    _check_resize_mode(resize_mode)
    _check_aspect(img.width, img.height, "image")  # before the resize that would blow it up
    if img.mode != "RGB":
        img = img.convert("RGB")
    target_h, target_w = _target_hw(image_size)
    new_size = _resized_size(img.width, img.height, target_h, target_w, resize_mode)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    if img.size != (target_w, target_h):
        img = img.crop(_crop_or_pad_box(img.width, img.height, target_h, target_w))  # outside → zeros
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # [3, H, W]


def normalize(
    batch_uint8: np.ndarray,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> np.ndarray:
    """Reference normalisation: uint8 [B, 3, H, W] (or [3, H, W]) → float32 (x/255 - mean) / std."""
    mean_c = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)  # [3, 1, 1]
    std_c = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return ((batch_uint8.astype(np.float32) / np.float32(255.0)) - mean_c) / std_c


# --- opening and loading -------------------------------------------------------------------------------


@contextlib.contextmanager
def _as_image_error(data: bytes) -> Iterator[None]:
    """Whatever else decoding one file raises becomes an ImageError naming its type (never BaseException:
    KeyboardInterrupt and SystemExit pass). Pillow's own errors are classified where they are raised."""
    try:
        yield
    except ImageError:
        raise
    except MemoryError as e:
        raise ImageError("too_large", f"MemoryError while decoding {len(data)} bytes") from e
    except Exception as e:
        log.debug("unexpected error decoding %d bytes", len(data), exc_info=True)
        detail = f"{type(e).__name__}: {str(e)[:200]}" if str(e) else type(e).__name__
        raise ImageError("corrupt", f"unexpected {detail} while decoding {len(data)} bytes") from e


def _open_for_pixels(data: bytes, max_pixels: int) -> Image.Image:
    img = _open(data, max_pixels)
    _check_aspect(img.width, img.height, str(img.format))
    return img


def _check_aspect(w: int, h: int, what: str) -> None:
    if w <= 0 or h <= 0:
        raise ImageError("corrupt", f"{what} is {w}x{h}")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        ratio = max(w, h) // min(w, h)
        raise ImageError(
            "unsupported", f"{what} {w}x{h}: aspect ratio {ratio}:1 is above the limit {MAX_ASPECT_RATIO}:1"
        )


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """Image.open (lazy: reads the header only) plus our size rule. Nothing is decoded yet."""
    if not data:
        raise ImageError("empty", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=_available_formats())
    except Image.UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt is None:
            raise ImageError(
                "not_an_image", f"{len(data)} bytes in no image format, starting {data[:16]!r}"
            ) from None
        if fmt in _available_formats():
            raise ImageError(
                "corrupt", f"{fmt} signature but unreadable header ({len(data)} bytes)"
            ) from None
        raise ImageError("unsupported", f"{fmt} image; this pipeline reads {'/'.join(_FORMATS)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Only if something re-enabled Pillow's check after our import; still the image's fault, not ours.
        raise ImageError("too_large", f"Pillow: {e}") from e
    except _PILLOW_ERRORS as e:
        raise _classify(e, data, "header") from e
    w, h = img.size
    if w <= 0 or h <= 0:  # Pillow's plugins refuse these today; preprocess would divide by zero
        raise ImageError("corrupt", f"{img.format} header says {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError("too_large", f"{img.format} {w}x{h} = {w * h} pixels > limit {max_pixels}")
    return img


def _load(img: Image.Image, data: bytes) -> Image.Image:
    try:
        img.load()
    except _PILLOW_ERRORS as e:
        raise _classify(e, data, f"{img.format} {img.width}x{img.height} pixels") from e
    return img


def _classify(e: BaseException, data: bytes, stage: str) -> ImageError:
    msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    text = str(e).lower()
    if "truncated" in text or isinstance(e, EOFError | struct.error) or _riff_short(data):
        return ImageError("truncated", f"{stage}: {msg} ({len(data)} bytes)")
    if "not available" in text or "not supported" in text or "unsupported" in text:
        return ImageError("unsupported", f"{stage}: {msg}")
    return ImageError("corrupt", f"{stage}: {msg}")


def _available_formats() -> list[str]:
    Image.init()  # registers plugins once; cheap afterwards
    return [f for f in _FORMATS if f in Image.OPEN]


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":  # ISO media file: the brand says which
        if data[8:12] in (b"avif", b"avis"):
            return "AVIF"
        if data[8:12] in _HEIF_BRANDS:
            return "HEIF"
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def _riff_short(data: bytes) -> bool:
    """WebP decodes inside Image.open and says only "could not create decoder"; its RIFF size says more."""
    if _sniff(data) != "WEBP":
        return False
    return len(data) < 8 + struct.unpack("<I", data[4:8])[0]


def _exif_orientation(img: Image.Image) -> int:
    # A malformed EXIF block does not make the pixels unusable: treat it as "no rotation" (also when
    # Pillow's "Corrupt EXIF data" warning is an error, as under python -W error).
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG)
    except (*_PILLOW_ERRORS, Warning):
        return 1
    return orientation if isinstance(orientation, int) and orientation in _ORIENTATION_TRANSPOSE else 1


def _upright(img: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


# --- colour --------------------------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    try:
        if mode == "CMYK":
            return _cmyk_to_rgb(img)
        if mode in _SIXTEEN_BIT_MODES:
            # Pillow's convert() clips these at 255 instead of scaling; keep the top 8 bits instead.
            # Mode "I" (32-bit) comes from 16-bit PNG/TIFF in practice, so it is read as 0..65535 too.
            return _wide_gray_to_rgb(img, _top_8_of_16_bits)
        if mode == "F":
            # Float images are usually 0..1; anything brighter is taken as 0..255.
            peak = max((float(_finite(s).max()) for _, s in _strips(img)), default=0.0)
            scale = 255.0 if peak <= 1.0 else 1.0
            return _wide_gray_to_rgb(img, lambda s: np.clip(np.rint(_finite(s) * scale), 0, 255))
        if mode in _ALPHA_MODES or "transparency" in img.info:
            # Transparent product shots are shown on white pages; black (Pillow's default) would not match.
            rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")  # no direct La → RGBA
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return img.convert("RGB")
    except _PILLOW_ERRORS as e:
        raise ImageError("unsupported", f"{img.format} mode {mode} to RGB: {type(e).__name__}: {e}") from e


def _strips(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(top row, pixels) of a one-band image, _STRIP_PIXELS at a time, in the image's own dtype."""
    w, h = img.size
    step = max(1, _STRIP_PIXELS // w)
    for top in range(0, h, step):
        yield top, np.asarray(img.crop((0, top, w, min(h, top + step))))


def _wide_gray_to_rgb(img: Image.Image, to_8_bits) -> Image.Image:
    """A one-band image of more than 8 bits → RGB, converted strip by strip into one uint8 plane."""
    out = np.empty((img.height, img.width), np.uint8)
    for top, strip in _strips(img):
        out[top : top + strip.shape[0]] = to_8_bits(strip)
    return Image.fromarray(out).convert("RGB")


def _top_8_of_16_bits(strip: np.ndarray) -> np.ndarray:
    if strip.dtype.kind == "i":  # mode "I" (int32): clip into 0..65535 first
        strip = np.clip(strip, 0, 65535)
    return strip >> 8  # uint16 (any byte order) stays uint16: no wider copy


def _finite(strip: np.ndarray) -> np.ndarray:
    return np.nan_to_num(strip.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow already undoes Adobe's inverted CMYK and libjpeg turns YCCK into CMYK; what is left is
    # which CMYK → RGB mapping to use. An embedded profile says what the inks mean; without one (or
    # with a broken one) Pillow's plain formula is the best guess.
    icc = img.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass
    return img.convert("RGB")


# --- geometry ------------------------------------------------------------------------------------------


def _check_resize_mode(resize_mode: str) -> None:
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")


def _target_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, tuple | list):
        target_h, target_w = image_size
        return int(target_h), int(target_w)
    return int(image_size), int(image_size)


def _resized_size(w: int, h: int, target_h: int, target_w: int, resize_mode: str) -> tuple[int, int]:
    """(width, height) after the resize step, with open_clip's (torchvision's) rounding."""
    if resize_mode == "squash":
        return target_w, target_h
    if resize_mode == "shortest" and target_h == target_w:
        # torchvision Resize(int): short side exact, long side truncated.
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(target_h * long / short)
        return (target_h, new_long) if w <= h else (new_long, target_h)
    # open_clip ResizeKeepRatio: one ratio for both sides, rounded.
    ratio_h, ratio_w = h / target_h, w / target_w
    ratio = min(ratio_h, ratio_w) if resize_mode == "shortest" else max(ratio_h, ratio_w)
    return max(1, round(w / ratio)), max(1, round(h / ratio))


def _crop_or_pad_box(w: int, h: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """Crop box centring a (w, h) image in (target_w, target_h); negative offsets pad (open_clip rounding)."""
    left = int(round((w - target_w) / 2.0)) if w >= target_w else -((target_w - w) // 2)
    top = int(round((h - target_h) / 2.0)) if h >= target_h else -((target_h - h) // 2)
    return left, top, left + target_w, top + target_h
