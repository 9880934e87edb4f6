"""Which samples each rank reads when DALI's own split over ranks cannot serve: the rest of an epoch
after the worker count changed mid-epoch, or an epoch whose global batch the workers do not divide.

The epoch is kept by keys: every rank records the keys it has trained on this epoch, and each
checkpoint holds their union (``epoch_keys``). ``plan`` takes the samples *not* in that set, in
shard-file order, rotated by a seeded offset (so the fewer-than-one-global-batch tail that drop-last
skips differs from epoch to epoch), and cuts them into one contiguous chunk per rank, rank r's chunk
``batches(G, W)[r] * steps`` samples long. Each rank reads its chunk through filtered copies of the
DALI indexes (one per tar file it touches; the tars are unchanged), shuffled by DALI's buffer as
usual. Every remaining sample is thus read once over the W ranks, apart from that tail
(docs/pipeline.md, "Resizing").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage import dataformat as fmt
from storage.dataset import Split


def batches(global_batch: int, world: int) -> list[int]:
    """Each rank's share of the global batch: ``G // W``, and one more for the first ``G % W`` ranks
    (every share >= 1 needs W <= G). ``train_one_epoch`` weights rank r's mean loss by
    ``share * W / G``, so DDP's average over ranks is the mean over the whole global batch."""
    if not 1 <= world <= global_batch:
        raise ValueError(f"{world} workers cannot share a global batch of {global_batch}: each needs >= 1 image")
    return [global_batch // world + (r < global_batch % world) for r in range(world)]


def join_keys(keys: list[str]) -> str:
    """The one-string form of a key set kept in a checkpoint: keys one per line (keys hold no newline)."""
    return "\n".join(keys)


def split_keys(text: str) -> frozenset[str]:
    return frozenset(text.split("\n")) if text else frozenset()


@dataclass(frozen=True)
class Plan:
    """One rank's part of an epoch: its samples as a split over filtered index copies, its share of
    the global batch, and the steps every rank runs."""
    split: Split
    batch_size: int
    steps: int
    remaining: int            # samples of the epoch not yet trained on, over all ranks


def plan(split: Split, skip: frozenset[str], world: int, rank: int, global_batch: int, seed: int,
         folder: Path) -> Plan:
    """Rank ``rank`` of ``world``'s part of the samples of ``split`` whose keys are not in ``skip``,
    written as index copies into ``folder``. ``steps`` is 0 when fewer than one global batch remain
    (the epoch is over: drop-last); then the split is empty."""
    share = batches(global_batch, world)
    entries = remaining_entries(split, skip)            # [(tar number, key, index line)], shard-file order
    steps = len(entries) // global_batch
    if steps == 0:
        return Plan(Split(split.name, (), (), 0), share[rank], 0, len(entries))
    offset = int(np.random.default_rng([seed, len(entries)]).integers(len(entries)))
    start = offset + steps * sum(share[:rank])
    picked = sorted((start + np.arange(share[rank] * steps)) % len(entries))   # back in shard-file order
    by_tar: dict[int, list[str]] = {}
    for i in picked:
        tar, _, line = entries[i]
        by_tar.setdefault(tar, []).append(line)
    folder.mkdir(parents=True, exist_ok=True)
    shards, indexes = [], []
    for tar, lines in by_tar.items():
        out = folder / f"{tar:06d}-{Path(split.indexes[tar]).name}"
        out.write_text(fmt.index_text(lines))     # a private temporary: no atomic rename or fsync
        shards.append(split.shards[tar])
        indexes.append(str(out))
    return Plan(Split(split.name, tuple(shards), tuple(indexes), len(picked)), share[rank], steps, len(entries))


def remaining_entries(split: Split, skip: frozenset[str]) -> list[tuple[int, str, str]]:
    """(tar number, key, index line) of every sample whose key is not in ``skip``, in shard-file
    order. The indexes were checked against their tars when the split was opened."""
    return [(tar, key, line) for tar, idx in enumerate(split.indexes)
            for key, line in fmt.index_keyed_lines(idx) if key not in skip]
