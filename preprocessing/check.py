"""Check one image and normalise it to what every reader decodes the same way: a baseline RGB JPEG.

DALI cannot skip a bad sample during training (a decode error kills its pipeline), so nothing reaches a
shard unless it decoded here. Outcomes (docs/data-format.md):

- ``kept``: a baseline RGB JPEG that decodes to the end of its entropy stream; bytes untouched;
- ``converted``: PNG/GIF/... (whatever its name), CMYK, grayscale, palette, alpha, progressive or
  arithmetic-coded JPEG: re-encoded as a baseline RGB JPEG at quality 95; or a JPEG whose EXIF
  orientation tag is not 1, which gets the tag rewritten to 1 in place (pixels and every other byte
  kept; see docs/preprocessing.md for why);
- ``resized``: longer side above ``max_side``: resized (Lanczos) and re-encoded at quality 95;
- ``quarantined``: empty, truncated, undecodable, not an image: never stored, the reason recorded.

The check decodes JPEGs with PIL's ``draft`` (libjpeg's DCT scaling, 1/8 per side): it still Huffman-
decodes every coefficient of the file, so truncation or a broken stream fails, at about half the cost
of a full decode. The 1/8-scale pixels (8x8 block means) feed the dataset's colour statistics.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

REENCODE_QUALITY = 95
# What PIL's plugins raise on corrupt input. Each becomes a quarantine reason: recorded, never hidden.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, KeyError,
                 ZeroDivisionError, struct.error, Image.DecompressionBombError)
_BASELINE_SOF = (0xC0, 0xC1)  # baseline and extended sequential Huffman: every JPEG decoder's common ground
_SOF_NAMES = {0xC2: "progressive", 0xC3: "lossless", 0xC5: "differential", 0xC6: "differential progressive",
              0xC7: "differential lossless", 0xC9: "arithmetic", 0xCA: "arithmetic progressive",
              0xCB: "arithmetic lossless", 0xCD: "arithmetic differential",
              0xCE: "arithmetic differential progressive", 0xCF: "arithmetic differential lossless"}
_MODE_NAMES = {"L": "grayscale", "LA": "grayscale+alpha", "P": "palette", "PA": "palette+alpha",
               "CMYK": "CMYK", "RGBA": "RGBA", "1": "1-bit", "I": "32-bit integer", "F": "float",
               "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "YCbCr": "YCbCr", "LAB": "Lab",
               "HSV": "HSV", "RGBX": "RGBX", "RGBa": "RGBa", "La": "La"}


@dataclass
class Checked:
    status: str  # kept / converted / resized / quarantined
    reason: str  # why converted / resized / quarantined; "" when kept
    data: bytes | None  # the bytes to store; None when quarantined
    width: int  # of the stored image; of the source when quarantined (0 if unknown)
    height: int
    pixels: np.ndarray | None  # (h, w, 3) uint8 at ~1/8 scale, for colour statistics; None if quarantined
    # (width, height) of the decoded source when the stored image was resized from it, else None. Boxes
    # are given in source pixels and scale by stored / source per axis. No other outcome moves a pixel:
    # an EXIF orientation is reset, never applied, so boxes need no rotation.
    resized_from: tuple[int, int] | None = None


@dataclass
class JpegInfo:
    sof: int | None  # the frame marker (0xC0 baseline, 0xC2 progressive, ...)
    orientation: int | None  # EXIF orientation of IFD0, None without one
    orientation_at: int | None  # byte offset of its 2-byte value, to rewrite it in place
    byte_order: str  # struct's "<" or ">": the TIFF block's byte order


def quarantine(reason: str, width: int = 0, height: int = 0) -> Checked:
    return Checked("quarantined", reason, None, width, height, None)


def check_image(data: bytes, max_side: int | None = None) -> Checked:
    """Decide what to store for one input file's bytes; never raises for bad image data."""
    if not data:
        return quarantine("empty file (0 bytes)")
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    try:
        im = Image.open(io.BytesIO(data), formats=("JPEG",) if is_jpeg else None)
        w, h = im.size
    except UnidentifiedImageError:
        if is_jpeg:
            return quarantine("undecodable: a JPEG signature but a header PIL cannot read")
        return quarantine("not an image: no known image format")
    except DECODE_ERRORS as e:
        return quarantine(f"undecodable header: {type(e).__name__}: {e}")
    if w <= 0 or h <= 0:
        return quarantine(f"undecodable: empty image size {w}x{h}", max(w, 0), max(h, 0))
    reasons, orient = _needed_changes(im, data)
    too_big = max_side is not None and max(w, h) > max_side
    turned = orient.orientation not in (None, 1)
    if not reasons and not too_big and (not turned or orient.orientation_at is not None):
        return _keep(im, data, orient)
    if turned:
        reasons.append(f"EXIF orientation {orient.orientation} dropped (pixels kept as stored)")
    return _reencode(im, reasons, max_side if too_big else None)


@dataclass
class _Orientation:
    orientation: int | None = None      # EXIF orientation tag, None when absent
    orientation_at: int | None = None   # its byte offset in the file, when our parser found it
    byte_order: str = "<"


def _needed_changes(im: Image.Image, data: bytes) -> tuple[list[str], _Orientation]:
    """(why the bytes cannot be kept as they are, the EXIF orientation and where it is)."""
    reasons, orient = [], _Orientation()
    if im.format != "JPEG":
        mode = _MODE_NAMES.get(im.mode, im.mode)
        reasons.append(f"{im.format} {mode if im.mode != 'RGB' else 'RGB'} -> RGB JPEG")
        return reasons, orient
    info = jpeg_structure(data)
    if info.sof not in _BASELINE_SOF:
        kind = _SOF_NAMES.get(info.sof, "unknown-frame") if info.sof is not None else "frameless"
        reasons.append(f"{kind} JPEG -> baseline")
    if im.mode != "RGB":
        reasons.append(f"{_MODE_NAMES.get(im.mode, im.mode)} JPEG -> RGB")
    orient = _Orientation(info.orientation, info.orientation_at, info.byte_order)
    if orient.orientation is None and "exif" in im.info:  # EXIF our parser could not read: ask PIL
        try:
            orient.orientation = im.getexif().get(0x0112)
        except DECODE_ERRORS:
            orient.orientation = None  # unreadable EXIF: no reader can find an orientation in it either
    return reasons, orient


def _keep(im: Image.Image, data: bytes, orient: _Orientation) -> Checked:
    """The original bytes, once every coefficient decoded; an EXIF rotation reset to 1 in place."""
    w, h = im.size
    try:
        im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # 1/8-scale IDCT; every coefficient still decoded
        im.load()
    except DECODE_ERRORS as e:
        return quarantine(f"undecodable: {type(e).__name__}: {e}", w, h)
    pixels = np.asarray(im)
    if orient.orientation in (None, 1):
        return Checked("kept", "", data, w, h, pixels)
    patched = bytearray(data)
    struct.pack_into(orient.byte_order + "H", patched, orient.orientation_at, 1)
    return Checked("converted", f"EXIF orientation {orient.orientation} reset to 1 (pixels kept as stored)",
                   bytes(patched), w, h, pixels)


def _reencode(im: Image.Image, reasons: list[str], max_side: int | None) -> Checked:
    """A baseline RGB JPEG re-encoded from the decoded pixels, resized to ``max_side`` when given."""
    w, h = im.size
    try:
        if max_side and im.format == "JPEG":
            scale = max_side / max(w, h)
            im.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))))  # decode at >= the target
        im.load()
        rgb = _to_rgb(im, reasons)
    except DECODE_ERRORS as e:
        return quarantine(f"undecodable: {type(e).__name__}: {e}", w, h)
    status = "converted"
    if max_side:
        scale = max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        reasons.append(f"resized {w}x{h} -> {size[0]}x{size[1]}")
        status = "resized"
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=REENCODE_QUALITY)  # baseline, 4:2:0, no EXIF, no ICC
    pixels = np.asarray(rgb.reduce(8) if min(rgb.size) >= 8 else rgb)
    return Checked(status, "; ".join(reasons), buf.getvalue(), rgb.width, rgb.height, pixels,
                   (w, h) if max_side else None)


def _to_rgb(im: Image.Image, reasons: list[str]) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        reasons.append("alpha composited on white")
        return white.convert("RGB")
    if im.mode.startswith("I;16"):
        arr = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)  # 16-bit -> 8-bit, no clipping
        return Image.fromarray(arr).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def jpeg_structure(data: bytes) -> JpegInfo:
    """The frame type and EXIF orientation of a JPEG, from its markers before the first scan."""
    sof = orientation = orientation_at = None
    byte_order = "<"
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            break  # not a marker where one must be: leave it to the decoder to fail
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1  # fill byte
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        seg = pos + 4
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            sof = marker if sof is None else sof
        elif marker == 0xE1 and data[seg:seg + 6] == b"Exif\x00\x00" and orientation is None:
            orientation, orientation_at, byte_order = _exif_orientation(data, seg + 6, seg + length - 2)
        elif marker in (0xDA, 0xD9):
            break  # start of scan: the header is over
        pos = seg + length - 2
    return JpegInfo(sof, orientation, orientation_at, byte_order)


def _exif_orientation(data: bytes, tiff: int, end: int) -> tuple[int | None, int | None, str]:
    """Orientation (tag 0x0112) of IFD0 in the TIFF block at ``tiff``, its value's offset, byte order."""
    order = data[tiff:tiff + 2]
    if order not in (b"II", b"MM") or end - tiff < 8:
        return None, None, "<"
    e = "<" if order == b"II" else ">"
    try:
        ifd = tiff + struct.unpack_from(e + "I", data, tiff + 4)[0]
        count = struct.unpack_from(e + "H", data, ifd)[0]
        for k in range(count):
            entry = ifd + 2 + 12 * k
            if entry + 12 > end:
                break
            tag, typ, num = struct.unpack_from(e + "HHI", data, entry)
            if tag == 0x0112 and typ == 3 and num == 1:
                return struct.unpack_from(e + "H", data, entry + 8)[0], entry + 8, e
    except struct.error:
        return None, None, e  # a malformed EXIF block: no orientation; the decode still judges the image
    return None, None, e
