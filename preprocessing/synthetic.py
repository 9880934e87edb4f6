"""The embedded ILSVRC-shaped sample: real WordNet ids, learnable shapes and textures, real file layout.

``generate`` (``python -m jobs.sample OUT [--classes 10] [--train-per-class N] [--val-per-class M]
[--oddities] [--seed S]`` on the command line) writes::

    OUT/train/<wnid>/<wnid>_<n>.JPEG         class folders, as ILSVRC2012 train
    OUT/val/ILSVRC2012_val_NNNNNNNN.JPEG      flat, numbered in shuffled class order, as ILSVRC2012 val
    OUT/LOC_train_solution.csv                Kaggle's train boxes (one per image, as below)
    OUT/LOC_val_solution.csv                  Kaggle's val labels and boxes (one per image, as below)
    OUT/LOC_synset_mapping.txt                wnid and name per class, sorted by wnid
    OUT/oddities.json                         with --oddities: each odd file, its kind, its expected status
                                              (a hidden image and a README are expected "skipped")

A class is a kind of shape or texture (disc, square, stripes, checkerboard, ...) drawn under random
colours, position, scale and a noisy background, so a small VGG learns it from 64 px crops. Every image
has its own RNG seeded from (seed, split, class, index): the output is identical byte for byte for a
given seed whatever ``workers`` is.

Every image's box (both CSVs, Kaggle's layout, so preprocessing reads them the way it reads ImageNet's)
is exact: the bounds of the pixels its object changed, ``(x1, y1, x2, y2)`` as pixel edges (the object
covers columns ``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1``). For a shape (disc, square, triangle, ring,
cross, diamond, star, target, hexagon, halfdisc) that is the shape's own pixels, which may be clipped by
the image border; for a texture (stripes, checker, dots, grid) it is the whole textured rectangle, its
gaps included (they are tinted), which covers 60-100% of each side. Oddities that are images get the
box of the image they were made from; the zero-byte and not-an-image files get none.
"""
from __future__ import annotations

import io
import json
import math
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from storage.dataformat import DataError

# The ten most distinct kinds come first: ``--classes 10`` uses them.
KINDS = ("disc", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "checker", "dots",
         "dstripes", "diamond", "star", "target", "grid", "hexagon", "halfdisc")
JPEG_QUALITY = 90  # ImageNet's JPEGs are mostly q75-q95
_SYNSETS = Path(__file__).with_name("data") / "synsets.txt"


def synsets() -> list[tuple[str, str]]:
    """The real ImageNet (wnid, name) pairs the sample draws its class folders from, sorted by wnid."""
    rows = [line.split(" ", 1) for line in _SYNSETS.read_text().splitlines() if line.strip()]
    return [(w, n) for w, n in rows]


def generate(out_dir, classes: int = 10, train_per_class: int = 20, val_per_class: int = 5,
             oddities: bool = False, seed: int = 0, size_range: tuple[int, int] = (300, 640),
             workers: int = 1) -> Path:
    """Write the sample under ``out_dir`` and return it: the SOURCE root for ``preprocessing.writer``.

    ``size_range`` bounds each image side in pixels (tests use (96, 160) for speed).
    """
    limit = min(len(KINDS), len(synsets()))
    if not 1 <= classes <= limit:
        raise DataError(f"--classes {classes}: the sample has between 1 and {limit} classes")
    if train_per_class < 0 or val_per_class < 0:
        raise DataError("--train-per-class and --val-per-class must be >= 0")
    lo, hi = size_range
    if not 16 <= lo <= hi:
        raise DataError(f"size_range {size_range}: need 16 <= low <= high")
    root = Path(out_dir)
    wnids = synsets()[:classes]
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "val").mkdir(parents=True, exist_ok=True)

    tasks = []  # (path, seed words, class index, size_range); drawn in any order, same bytes
    for c, (wnid, _) in enumerate(wnids):
        (root / "train" / wnid).mkdir(exist_ok=True)
        for i in range(train_per_class):
            tasks.append((root / "train" / wnid / f"{wnid}_{i + 1}.JPEG", (seed, 0, c, i), c, size_range))
    # Val: numbered 1..N in a seeded shuffled class order, as the real val set.
    val_classes = [c for c in range(classes) for _ in range(val_per_class)]
    order = np.random.default_rng([seed, 1]).permutation(len(val_classes))
    val_rows = []
    for n, j in enumerate(order, start=1):
        c = val_classes[j]
        path = root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG"
        tasks.append((path, (seed, 1, c, n), c, size_range))
        val_rows.append((path.stem, c))

    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            boxes = pool.map(_write_image, tasks, chunksize=16)
    else:
        boxes = [_write_image(t) for t in tasks]
    odd = _write_oddities(root, wnids, seed, size_range, len(val_rows) + 1) if oddities else {}
    for split in ("train", "val"):
        rows = [(t[0], wnids[t[2]][0], box) for t, box in zip(tasks, boxes)
                if t[0].relative_to(root).parts[0] == split]
        rows += [(root / rel, info["wnid"], info["box"]) for rel, info in odd.items()
                 if rel.startswith(split + "/") and info.get("box")]
        lines = ["ImageId,PredictionString"] + [f"{path.stem},{wnid} {' '.join(map(str, box))} "
                                                for path, wnid, box in rows]
        _write_text(root / f"LOC_{split}_solution.csv", "\n".join(lines) + "\n")
    for info in odd.values():
        info.pop("box", None)
    _write_text(root / "LOC_synset_mapping.txt", "".join(f"{w} {n}\n" for w, n in wnids))
    if odd:
        _write_text(root / "oddities.json", json.dumps(odd, indent=1, sort_keys=True) + "\n")
    return root


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


def _write_image(task) -> tuple[int, int, int, int]:
    path, words, c, size_range = task
    img, box = draw(np.random.default_rng(list(words)), KINDS[c], size_range)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buf.getvalue())
    return box


def draw(rng: np.random.Generator, kind: str, size_range=(300, 640)) -> tuple[Image.Image, tuple]:
    """One RGB image of ``kind`` and its exact object box (x1, y1, x2, y2), pixel edges (module doc)."""
    img, mask = render(rng, kind, size_range)
    box = mask.getbbox()
    if box is None:  # cannot happen (an object is at least 6 px wide); an inexact box must never go out
        raise RuntimeError(f"drew a {kind} that covers no pixel")
    return img, box


def render(rng: np.random.Generator, kind: str, size_range=(300, 640),
           with_object: bool = True) -> tuple[Image.Image, Image.Image]:
    """One RGB image of ``kind`` and its object mask (mode "L", 255 on every pixel the object changed).
    The mask is drawn with the same calls as the object, so it costs no random numbers: the image is
    the same with or without it. ``with_object=False``: the same image without its object (the object
    is drawn last), for tests that find the object's pixels by difference."""
    lo, hi = size_range
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    bg = rng.integers(0, 256, 3)
    # Background: a smooth low-resolution blotch field plus fine grain, so files have a realistic
    # entropy (ImageNet-like ~0.4 bytes/pixel at q90) and colour alone never gives the class away.
    small = rng.normal(0, 28, (max(2, h // 32), max(2, w // 32), 3))
    blotch = np.asarray(Image.fromarray(np.clip(small + 128, 0, 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR), dtype=np.int16) - 128
    grain = rng.integers(-28, 29, (h, w, 3), dtype=np.int16)
    arr = np.clip(bg.astype(np.int16) + blotch + grain, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    fg = rng.integers(0, 256, 3)
    if np.abs(fg - bg).sum() < 180:  # keep the object visible against its background
        fg = 255 - bg
    fg2 = rng.integers(0, 256, 3)
    s = min(w, h)
    size = s * rng.uniform(0.4, 0.8)
    cx = rng.uniform(size / 2, w - size / 2)
    cy = rng.uniform(size / 2, h - size / 2)
    box = (int(cx - size / 2), int(cy - size / 2), int(cx + size / 2), int(cy + size / 2))  # nominal
    mask = Image.new("L", (w, h), 0)
    if with_object:
        _DRAW[kind](img, mask, rng, box, tuple(int(v) for v in fg), tuple(int(v) for v in fg2))
    return img, mask


def _polygon(cx, cy, r, n, rot):
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _shape(kind):
    def paint(img, mask, rng, box, fg, fg2):
        d = _Both(img, mask)
        x0, y0, x1, y1 = box
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        tilt = rng.uniform(-0.3, 0.3)  # radians: small, so a square never becomes a diamond
        if kind == "disc":
            d.ellipse(box, fill=fg)
        elif kind == "ring":
            d.ellipse(box, outline=fg, width=max(2, int(r * 0.25)))
        elif kind == "target":
            for k, frac in enumerate((1.0, 0.75, 0.5, 0.25)):
                rr = r * frac
                d.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=fg if k % 2 == 0 else fg2)
        elif kind == "halfdisc":
            d.pieslice(box, 180, 360, fill=fg)
        elif kind == "square":
            d.polygon(_polygon(cx, cy, r * 1.2, 4, math.pi / 4 + tilt), fill=fg)
        elif kind == "diamond":
            d.polygon(_polygon(cx, cy, r, 4, tilt / 3), fill=fg)
        elif kind == "triangle":
            d.polygon(_polygon(cx, cy, r, 3, -math.pi / 2 + tilt), fill=fg)
        elif kind == "hexagon":
            d.polygon(_polygon(cx, cy, r, 6, tilt), fill=fg)
        elif kind == "star":
            pts = []
            for k in range(10):
                rr = r if k % 2 == 0 else r * 0.4
                a = -math.pi / 2 + tilt + math.pi * k / 5
                pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
            d.polygon(pts, fill=fg)
        elif kind == "cross":
            t = r * 0.3
            d.rectangle((x0, cy - t, x1, cy + t), fill=fg)
            d.rectangle((cx - t, y0, cx + t, y1), fill=fg)
    return paint


def _texture(kind):
    def paint(img, drawn, rng, box, fg, fg2):
        # Textures fill a large region so that any crop of the object shows the pattern.
        w, h = img.size
        x0, y0 = int(rng.uniform(0, w * 0.2)), int(rng.uniform(0, h * 0.2))
        x1, y1 = int(rng.uniform(w * 0.8, w)), int(rng.uniform(h * 0.8, h))
        period = max(4.0, min(w, h) * rng.uniform(0.05, 0.1))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        if kind == "hstripes":
            mask = (yy // (period / 2)) % 2 == 0
        elif kind == "vstripes":
            mask = (xx // (period / 2)) % 2 == 0
        elif kind == "dstripes":
            mask = ((xx + yy) // (period / 1.4)) % 2 == 0
        elif kind == "checker":
            mask = ((xx // period) + (yy // period)) % 2 == 0
        elif kind == "grid":
            mask = ((xx % period) < period / 5) | ((yy % period) < period / 5)
        else:  # dots
            dx, dy = (xx % period) - period / 2, (yy % period) - period / 2
            mask = dx * dx + dy * dy < (period * 0.3) ** 2
        arr = np.asarray(img).copy()
        region = arr[y0:y1, x0:x1]
        region[mask] = fg
        region[~mask] = (region[~mask].astype(np.uint16) + fg2) // 2  # the gaps: tinted background
        img.paste(Image.fromarray(arr))
        drawn.paste(255, (x0, y0, x1, y1))  # every pixel of the rectangle changed: stripes and tinted gaps
    return paint


class _Both:
    """ImageDraw calls made on the image (in the colour given) and on the mask (255)."""

    def __init__(self, img: Image.Image, mask: Image.Image):
        self.draws = (ImageDraw.Draw(img), ImageDraw.Draw(mask))

    def __getattr__(self, name):
        def call(*args, **kw):
            image, mask = self.draws
            getattr(image, name)(*args, **kw)
            getattr(mask, name)(*args, **{k: 255 if k in ("fill", "outline") and v is not None else v
                                           for k, v in kw.items()})
        return call


_DRAW = {k: _texture(k) if k in ("hstripes", "vstripes", "dstripes", "checker", "grid", "dots")
         else _shape(k) for k in KINDS}


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _write_oddities(root: Path, wnids, seed: int, size_range, first_val: int) -> dict:
    """One file of each case preprocessing must handle; returns {relpath: {kind, expect, wnid, box}}
    (box: of the image the file was made from, None for the files that are no image)."""
    rng = np.random.default_rng([seed, 2])
    wnid = wnids[0][0]

    def base(big=False):
        sr = (2000, 2400) if big else size_range
        return draw(rng, KINDS[0], sr)  # (image, its exact box)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    img, rgba_box = base()
    rgba = img.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[: alpha.shape[0] // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    img, good_box = base()
    good = _encode(img, quality=JPEG_QUALITY)
    sof = good.index(b"\xff\xc0")
    no_height = good[: sof + 5] + b"\x00\x00" + good[sof + 7:]  # SOF0 height 0: no decoder accepts it
    # The images are drawn in this order (the RNG's): the cases' bytes do not depend on their boxes.
    drawn = [base() for _ in range(6)] + [base(big=True)]
    (png, png_box), (cmyk, cmyk_box), (gray, gray_box), (pal, pal_box), (rot, rot_box), (prog, prog_box), \
        (large, large_box) = drawn
    cases = {  # kind: (bytes, expected status without --max-side, box or None)
        "png_named_jpeg": (_encode(png, "PNG"), "converted", png_box),
        "cmyk_jpeg": (_encode(cmyk.convert("CMYK"), quality=JPEG_QUALITY), "converted", cmyk_box),
        "grayscale_jpeg": (_encode(gray.convert("L"), quality=JPEG_QUALITY), "converted", gray_box),
        "palette_png": (_encode(pal.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "converted", pal_box),
        "alpha_png": (_encode(rgba, "PNG"), "converted", rgba_box),
        "exif_rotated_jpeg": (_encode(rot, quality=JPEG_QUALITY, exif=exif.tobytes()), "converted", rot_box),
        "progressive_jpeg": (_encode(prog, quality=JPEG_QUALITY, progressive=True), "converted", prog_box),
        "large_jpeg": (_encode(large, quality=JPEG_QUALITY), "kept", large_box),
        "zero_bytes": (b"", "quarantined", None),
        "truncated_jpeg": (good[: len(good) // 2], "quarantined", good_box),
        "undecodable_jpeg": (no_height, "quarantined", good_box),
        "not_an_image": (b"<html><body>404 Not Found</body></html>\n", "quarantined", None),
    }
    out = {}
    for n, (kind, (data, expect, box)) in enumerate(cases.items()):
        rel = f"train/{wnid}/{wnid}_{900001 + n}.JPEG"
        (root / rel).write_bytes(data)
        out[rel] = {"kind": kind, "expect": expect, "wnid": wnid, "box": box}
    # Files that are no input: counted and listed as skipped, never stored.
    for kind, name, data in (("hidden_image", "..evil.jpg", good), ("not_an_image_extension", "README.txt",
                                                                      b"notes about this class\n")):
        rel = f"train/{wnid}/{name}"
        (root / rel).write_bytes(data)
        out[rel] = {"kind": kind, "expect": "skipped", "wnid": wnid}
    # Two in val, to exercise its path: numbered after the regular val images.
    for n, kind in enumerate(("truncated_jpeg", "grayscale_jpeg")):
        rel = f"val/ILSVRC2012_val_{first_val + n:08d}.JPEG"
        (root / rel).write_bytes(cases[kind][0])
        out[rel] = {"kind": kind, "expect": cases[kind][1], "wnid": wnid, "box": cases[kind][2]}
    return out
