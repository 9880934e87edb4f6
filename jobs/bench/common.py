"""What every benchmark shares: timing with device syncs, one JSON line per figure, a table, ratios."""
from __future__ import annotations

import itertools
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from storage.files import atomic_write


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a CPU-GPU sync point: only at the edges of a timed span


def time_it(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def peak_memory_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``; None (JSON null) when there is no denominator to compare with."""
    return numerator / denominator if denominator else None


def forever(loader):
    """Batches across epoch boundaries: each ``iter(loader)`` is one epoch of a TrainLoader."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


def pick_variants(text: str, known) -> list[str]:
    """``"a,b"`` -> ["a", "b"]; a name not in ``known`` is an error listing the known ones."""
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(known)}")
    return names


def add_ratios(rows: dict[str, dict], reference: str, column: str) -> None:
    """Each row's images/s over the ``reference`` row's, both measured in this run; None without it."""
    ref = rows.get(reference)
    for r in rows.values():
        r[column] = ratio(r["images_per_s"], ref["images_per_s"]) if ref else None


class Report:
    """Collects figures; prints each as one JSON line as it comes, then a table; optionally saves."""

    def __init__(self, bench: str, device: torch.device, out: str | None = None, **common):
        self.rows: list[dict] = []
        self.out = out  # saved after every figure, so a run cut short still leaves what it measured
        self.common = {"bench": bench, "device": device_name(device), **common}

    def add(self, **figure) -> dict:
        row = {**self.common, **figure}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save(self.out)
        return row

    def table(self, columns: list[str]) -> str:
        present = [c for c in columns if any(c in r for r in self.rows)]
        lines = ["| " + " | ".join(present) + " |", "|" + "---|" * len(present)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in present) + " |")
        return "\n".join(lines)

    def save(self, path: str | None) -> None:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(path), (json.dumps(self.rows, indent=1) + "\n").encode())


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)
