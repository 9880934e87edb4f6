"""What goes into ``manifest.parquet`` and ``dataset.json`` (their format: ``storage.dataformat``):
the dataset fingerprint, status counts and the train split's colour statistics.

Colour statistics (the paper's mean subtraction and AlexNet's PCA colour shift): for every stored train
image, the exact integer sums of its RGB values and of their pairwise products over its 1/8-scale pixels
(8x8 block means, what the check decoded anyway) give the image's mean and second moment; these are
averaged over images in shard order, so the result is the same bytes for any number of workers. The
mean is exact up to rounding; the covariance misses the variance inside 8x8 blocks (fine texture), a few
per cent of it for photographs (docs/preprocessing.md).
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata

import numpy as np

from storage import dataformat as fmt


def tool_version() -> str:
    try:
        return metadata.version("vgg-at-scale")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def fingerprint(manifests: dict[str, list[dict]]) -> str:
    """sha256 over the manifest rows of every split, each split's rows sorted by key. The box columns
    count only in rows that have them, so a dataset without annotations keeps the fingerprint it had
    before boxes existed (a rerun does not make it look changed)."""
    h = hashlib.sha256()
    for split in sorted(manifests):
        for row in sorted(manifests[split], key=lambda r: r["key"]):
            values = [row[c] for c in fmt.BASE_COLUMNS]
            if fmt.has_boxes(row):
                values += [row.get(c) for c in fmt.BOX_COLUMNS]
            h.update(json.dumps([split] + values).encode() + b"\n")
    return h.hexdigest()


def box_counts(rows: list[dict]) -> dict[str, int] | None:
    """dataset.json's per-split ``boxes`` entry (``storage.dataformat.SPLIT_BOXES``) from manifest rows;
    None when no input of the split has an annotation."""
    if not any(fmt.has_boxes(r) for r in rows):
        return None
    stored = [r for r in rows if r["status"] != "quarantined"]
    annotated = [r for r in stored if fmt.has_boxes(r)]
    return {"images": sum(bool(r["boxes"]) for r in annotated),
            "boxes": sum(len(r["boxes"] or []) // 4 for r in annotated),
            "clipped": sum(r["boxes_clipped"] or 0 for r in annotated),
            "rejected": sum(len(r["boxes_rejected"] or []) for r in annotated),
            "annotated": len(annotated), "without": len(stored) - len(annotated)}


def source_fingerprint(plan_rows: list[dict]) -> str:
    """sha256 over the (source path, size) of every input a split was built from, sorted by path."""
    h = hashlib.sha256()
    for r in sorted(plan_rows, key=lambda r: r["source"]):
        h.update(f"{r['source']}\t{r['size']}\n".encode())
    return h.hexdigest()


def counts(rows: list[dict]) -> dict[str, int]:
    c = dict.fromkeys(fmt.STATUSES, 0)
    for r in rows:
        c[r["status"]] += 1
    return c


# ---- colour statistics -------------------------------------------------------------------------------

class Moments:
    """Running sums of per-image RGB means and second moments; add images in a fixed order."""

    def __init__(self):
        self.images = 0
        self.mean_sum = [0.0] * 3
        self.second_sum = [0.0] * 6  # RR, RG, RB, GG, GB, BB

    def add_image(self, pixels: np.ndarray) -> None:
        """``pixels``: (h, w, 3) uint8. Every product and partial sum below is an integer under 2**53,
        so float64 holds it exactly: BLAS's summation order (SIMD, threads, machine) cannot change a
        bit, only the order of images does, and that is the shard order."""
        q = np.ascontiguousarray(pixels.reshape(-1, 3).T, dtype=np.float64)  # (3, n) planes
        n = q.shape[1]
        s1 = q.sum(axis=1)
        s2 = q @ q.T  # (3, 3) sums of products: 3x faster than integer dots
        for i in range(3):
            self.mean_sum[i] += float(s1[i]) / n
        k = 0
        for i in range(3):
            for j in range(i, 3):
                self.second_sum[k] += float(s2[i, j]) / n
                k += 1
        self.images += 1

    def to_json(self) -> dict:
        return {"images": self.images, "mean_sum": self.mean_sum, "second_sum": self.second_sum}

    def merge(self, d: dict) -> None:
        self.images += d["images"]
        self.mean_sum = [a + b for a, b in zip(self.mean_sum, d["mean_sum"])]
        self.second_sum = [a + b for a, b in zip(self.second_sum, d["second_sum"])]

    def stats(self) -> dict | None:
        """Mean RGB and the RGB covariance's eigenvalues (descending) and unit eigenvectors (rows), on
        the 0-255 scale; None without images."""
        if not self.images:
            return None
        mean = np.array(self.mean_sum) / self.images
        s = np.array(self.second_sum) / self.images
        second = np.array([[s[0], s[1], s[2]], [s[1], s[3], s[4]], [s[2], s[4], s[5]]])
        cov = second - np.outer(mean, mean)
        val, vec = np.linalg.eigh(cov)  # ascending; columns are eigenvectors
        order = np.argsort(val)[::-1]
        val, vec = val[order], vec[:, order].T
        vec *= np.where(vec[np.arange(3), np.abs(vec).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]  # sign: largest +
        return {"mean_rgb": [float(v) for v in mean], "rgb_eigval": [float(v) for v in val],
                "rgb_eigvec": [[float(v) for v in row] for row in vec], "images": self.images,
                "method": "per-image moments of 1/8-scale pixels, averaged over train images"}


def dataset_info(classes, seed: int, options: dict, splits: dict, manifests: dict, stats) -> dict:
    return {
        "format": fmt.FORMAT,
        "tool_version": tool_version(),
        "seed": seed,
        "options": options,
        "fingerprint": fingerprint(manifests),
        "classes": [{"index": c.index, "wnid": c.wnid, "name": c.name} for c in classes],
        "splits": splits,
        "stats": stats,
    }
