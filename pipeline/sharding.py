"""How DALI's webdataset reader splits samples over ranks and epochs: pure functions, tested without
DALI (docs/pipeline.md, "The epoch"); the loaders (``pipeline.loader``) follow them."""
from __future__ import annotations

import math

import numpy as np


def shard_range(num_samples: int, num_shards: int, shard_id: int) -> tuple[int, int]:
    """[start, end) of the samples (in shard-file order) DALI's reader gives ``shard_id``:
    contiguous, disjoint, covering, sizes differing by at most one whatever the tar file count."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def reader_batches(num_samples: int, num_shards: int, batch_size: int) -> int:
    """Batches in one reader epoch with ``pad_last_batch``: every rank pads to ceil(N / W) samples and
    then to a whole batch, so every rank runs the same number of batches per epoch."""
    return math.ceil(math.ceil(num_samples / num_shards) / batch_size)


def steps_per_epoch(num_samples: int, num_shards: int, batch_size: int) -> int:
    """floor(N / global batch): the same on every rank, so DDP never waits on a rank that ran out."""
    return num_samples // (num_shards * batch_size)


def read_window(num_samples: int, num_shards: int, range_id: int, next_id: int, ahead: int,
                behind: int) -> list[tuple[int, int]]:
    """[start, end) sample ranges a reader of range ``range_id`` may hold when it has read ``ahead``
    samples of it and still buffers up to ``behind`` of them; past the range's end it reads on into
    range ``next_id`` (the next epoch's, or its own again for the eval reader)."""
    start, end = shard_range(num_samples, num_shards, range_id % num_shards)
    hi, out = start + ahead, []
    if start + max(ahead - behind, 0) < end:
        out.append((start + max(ahead - behind, 0), min(hi, end)))
    if hi > end:
        n_start, n_end = shard_range(num_samples, num_shards, next_id % num_shards)
        out.append((n_start, min(n_end, n_start + hi - end)))
    return out


def shards_holding(counts: list[int], ranges: list[tuple[int, int]]) -> list[int]:
    """Indices of the tar files (holding ``counts`` samples each, in order) with a sample in ``ranges``."""
    ends = np.cumsum(counts)
    return [i for i, (e, n) in enumerate(zip(ends.tolist(), counts))
            if any(a < e and b > e - n for a, b in ranges)]
