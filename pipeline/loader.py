"""DALI pipelines over the shards and the torch iterators the training and evaluation loops use.

One pipeline definition per job with a device switch: ``device_id=None`` is DALI's CPU-only mode
(decode on the CPU, no CUDA needed); with a CUDA device index, ``cfg.decode`` picks nvJPEG on the GPU
("mixed") or libjpeg-turbo with the resize and normalisation on the GPU ("cpu"). ``device_id`` is the
*local* CUDA index (under Ray Train ``ray.train.torch.get_device().index``); ``shard_id`` and
``num_shards`` are the *global* rank and world size. See docs/pipeline.md for the guarantees.
"""
from __future__ import annotations

import base64
import json
import math
import re
import weakref
from typing import Iterator

import numpy as np
import torch

from pipeline import augment, box_augment
from pipeline.augment import DECODES
from pipeline.batch import Batch
from pipeline.config import test_scale
from storage.dataset import DataError, Split, open_dataset
from storage.shard_check import decode_failure
from pipeline.scoring import crop_grid
from pipeline.sharding import read_window, reader_batches, shard_range, shards_holding, steps_per_epoch
from storage import dataformat as fmt
from storage.dataformat import index_count

STATE_FORMAT = 1
EVAL_MODES = ("center", "dense", "multicrop")
# a DALI failure that comes from the data (a sample it cannot decode, a shard it cannot read), not
# from the machine (memory, CUDA): only these become a DataError that names the shards
DATA_FAILURE = re.compile(r"fn\.(decoders|readers)\.|nvImageCodec")


# --- pure functions --------------------------------------------------------------------------------

def decode_backend(decode: str, device_id: int | None) -> str:
    if decode not in DECODES:
        raise ValueError(f"Invalid decode {decode!r}. Only {', '.join(DECODES)} are supported.")
    if device_id is None:
        return "cpu"                                  # DALI's CPU-only mode: no CUDA at all
    return "mixed" if decode == "mixed" else "cpu-gpu"


def _seed(seed: int, shard_id: int, stream: int) -> int:
    """Distinct, reproducible seeds per rank and per use (DALI wants a non-negative int32)."""
    return (seed * 1_000_003 + shard_id * 7_919 + stream) % (2**31 - 1)


# --- DALI graph and conversion ----------------------------------------------------------------------

def _read(split: Split, shard_id: int, num_shards: int, *, shuffle: bool, seed: int, buffer: int,
          stick_to_shard: bool, backend: str, boxes: str | None = None):
    """(jpegs, labels int32 (1,), keys uint8 padded to the batch's longest key) from the shards, and
    the box members (float32, 4 per box) when ``boxes`` says what a sample without one gives
    ("error", or "empty": no boxes).

    Labels go to the GPU inside DALI whenever the images do: torch copying them from pageable host
    memory would wait for the whole stream (the previous training step) on every batch."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    more = [fmt.BOX_EXT] if boxes else []
    jpegs, labels, keys, *box = fn.readers.webdataset(
        paths=list(split.shards), index_paths=list(split.indexes), ext=["jpg", "lbl", "key", *more],
        dtypes=[types.UINT8, types.INT32, types.UINT8] + [types.FLOAT] * len(more),
        missing_component_behavior=boxes or "error", shard_id=shard_id, num_shards=num_shards,
        random_shuffle=shuffle, initial_fill=max(buffer, 1), seed=seed, pad_last_batch=True,
        stick_to_shard=stick_to_shard, name="reader")
    return (jpegs, labels if backend == "cpu" else labels.gpu(), fn.pad(keys, fill_value=0), *box)


def _build(graph, *, batch_size: int, cfg, device_id: int | None, seed: int,
           checkpointing: bool = False, checkpoint: bytes | None = None):
    from nvidia.dali import Pipeline

    pipe = Pipeline(batch_size=batch_size, num_threads=cfg.threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=cfg.prefetch, enable_checkpointing=checkpointing,
                    checkpoint=checkpoint)
    with pipe:
        pipe.set_outputs(*graph())
    pipe.build()
    return pipe


class _Runner:
    """Runs a pipeline and turns its outputs into torch tensors on the right device and stream.
    ``suspects()`` lists the shards the reader may be in, for the error when DALI fails on the data."""

    def __init__(self, pipe, device: torch.device, cfg, split: Split, suspects):
        self.pipe, self.device, self.cfg, self.split = pipe, device, cfg, split
        self.suspects = weakref.WeakMethod(suspects)  # no cycle: the loader frees its pipeline at once

    def run(self):
        try:
            if self.device.type == "cuda":
                # outputs are ordered on torch's current stream: no host sync here
                return self.pipe.run(torch.cuda.current_stream(self.device))
            return self.pipe.run()
        except RuntimeError as e:
            if not DATA_FAILURE.search(str(e)):
                raise
            raise self.failure(str(e)) from e

    def failure(self, text: str) -> DataError:
        """DataError naming the shards and changed samples; DALI's reason is the line after its
        "encountered:" (the rest of its text is the pipeline definition's traceback)."""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        after = [i + 1 for i, ln in enumerate(lines) if ln.startswith("encountered")] + [len(lines) - 1]
        reason = lines[min(after[0], len(lines) - 1)] if lines else "no reason given"
        counts = [index_count(i) for i in self.split.indexes]
        shards = [self.split.shards[i] for i in shards_holding(counts, self.suspects()())]
        return decode_failure(self.cfg.root, self.split.name, shards or list(self.split.shards), reason)

    def tensor(self, dali_tensor) -> torch.Tensor:
        """Zero-copy view (DALI's default executor keeps the buffer alive while torch holds it)."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                return torch.from_dlpack(dali_tensor)
        return torch.from_dlpack(dali_tensor)

    def images(self, t: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) or (N, C, H, W) from DALI -> logical (N, C, H, W), cfg.dtype."""
        if self.cfg.dtype == "bfloat16":
            t = t.to(torch.bfloat16)                  # DALI produced float16; exact for |x| < 512
        if self.cfg.layout == "NHWC":
            t = t.permute(0, 3, 1, 2)                 # channels_last strides, logical NCHW
        return t

    def labels(self, tl) -> torch.Tensor:
        """(N,) int64, a copy made on the labels' device (a GPU kernel, not a host round trip)."""
        return self.tensor(tl.as_tensor()).reshape(-1).to(torch.int64)

    def keys(self, tl) -> list[str]:
        """The samples' keys; a key member that is not ASCII (damaged) is ``failure``'s DataError."""
        rows = [row.tobytes().rstrip(b"\0") for row in np.asarray(tl.as_tensor())]
        try:
            return [k.decode("ascii") for k in rows]
        except UnicodeDecodeError:
            bad = next(k for k in rows if not k.isascii())
            raise self.failure(f"a key member is not ASCII text: {bad!r}") from None


def _device(device_id: int | None) -> torch.device:
    return torch.device("cpu") if device_id is None else torch.device("cuda", device_id)


# --- training ---------------------------------------------------------------------------------------

def training_split(ds, name: str, boxes: bool, check: bool = True) -> Split:
    """The samples a training loader reads: split ``name`` of ``ds``, or only its samples with boxes
    (DALI reads filtered copies of the indexes, cached per node: ``box_augment.boxed_split``)."""
    split = ds.split(name, check=check)
    return box_augment.boxed_split(ds, split) if boxes else split


class TrainLoader:
    """The training pipeline of one rank: ``len(loader)`` steps per epoch, the same on every rank.

    ``for batch in loader`` yields the rest of the current epoch (all of it, unless a previous
    iteration was cut short or the loader was restored mid-epoch), then stops; the next ``for``
    starts the next epoch. ``loader.epoch`` / ``loader.step`` say where it is; ``loader.state()``
    is a JSON string that ``TrainLoader(..., state=...)`` resumes from bit-identically.
    ``boxes=True``: only the samples with boxes, each batch with its target boxes (``Batch.boxes``).
    ``split``: read these samples instead of the config's training split (one rank's chunk of
    ``pipeline.epoch_plan``, with shard_id 0 of 1; already only boxed samples when ``boxes``).
    ``trained`` lists the keys yielded in the current epoch, for a resize (``pipeline.epochs``)."""

    def __init__(self, cfg, batch_size: int, shard_id: int, num_shards: int,
                 device_id: int | None = None, seed: int = 0, state: str | bytes | None = None,
                 check: bool = True, boxes: bool = False, split: Split | None = None):
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} must be in [0, num_shards={num_shards})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ds = open_dataset(cfg.root)
        self.split = split or training_split(ds, cfg.train_split, boxes, check)
        self.stats = ds.stats()
        self.fingerprint = ds.fingerprint
        self.batch_size, self.shard_id, self.num_shards, self.seed = batch_size, shard_id, num_shards, seed
        self.boxes = boxes
        n = self.split.num_samples
        self.steps_per_epoch = steps_per_epoch(n, num_shards, batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{cfg.root}: {n} training samples are fewer than one global batch "
                             f"({num_shards} x {batch_size})")
        # with pad_last_batch the reader's epoch is this many batches on every rank: 0 or 1 more
        # than steps_per_epoch; the extra (partial, padded) batch is run and dropped at the epoch's end
        self._reader_batches = reader_batches(n, num_shards, batch_size)
        self.epoch, self.step = 0, 0
        self.trained: list[str] = []
        checkpoint = None
        if state is not None:
            checkpoint = self._restore(state)
        self.device = _device(device_id)
        backend = decode_backend(cfg.decode, device_id)

        def graph():
            jpegs, labels, keys, *box = _read(self.split, shard_id, num_shards, shuffle=True,
                                              seed=_seed(seed, shard_id, 1), buffer=cfg.shuffle_buffer,
                                              stick_to_shard=False, backend=backend,
                                              boxes="error" if boxes else None)
            images, draws = augment.train_augment(jpegs, cfg, self.stats, backend, with_draws=True)
            return images, labels, keys, *(box_augment.train_outputs(box[0], draws) if boxes else [])

        pipe = _build(graph, batch_size=batch_size, cfg=cfg, device_id=device_id,
                      seed=_seed(seed, shard_id, 2), checkpointing=True, checkpoint=checkpoint)
        self._runner = _Runner(pipe, self.device, cfg, self.split, self._suspects)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _suspects(self) -> list[tuple[int, int]]:
        """This epoch's range up to where the prefetching reader may be, less what its shuffle buffer
        has almost surely handed out (a sample stays in it 20 buffer-lengths with chance e^-20)."""
        cfg, b = self._runner.cfg, self.batch_size
        ahead = (self.step + cfg.prefetch + 3) * b + cfg.shuffle_buffer
        rng = self.shard_id + self.epoch                 # ranks rotate over the ranges epoch by epoch
        return read_window(self.split.num_samples, self.num_shards, rng, rng + 1, ahead,
                           behind=20 * cfg.shuffle_buffer + (cfg.prefetch + 4) * b)

    def __iter__(self) -> Iterator[Batch]:
        if self.step >= self.steps_per_epoch:
            self._finish_epoch()
        while self.step < self.steps_per_epoch:
            images, labels, keys, *extra = self._runner.run()
            self.step += 1                            # counted before the yield: state() is "after"
            r = self._runner
            keys = r.keys(keys)
            self.trained += keys
            yield Batch(r.images(r.tensor(images.as_tensor())), r.labels(labels), keys,
                        box_augment.train_boxes(extra, self.device) if extra else None)

    def _finish_epoch(self) -> None:
        for _ in range(self._reader_batches - self.steps_per_epoch):
            self._runner.run()                        # the reader's last (padded) batch: dropped
        self.epoch += 1
        self.step = 0
        self.trained = []

    def state(self) -> str:
        """Position + DALI pipeline checkpoint (reader and every RNG): 1-2 KB of JSON."""
        blob = self._runner.pipe.checkpoint()
        return json.dumps({
            "format": STATE_FORMAT, "epoch": self.epoch, "step": self.step,
            "shard_id": self.shard_id, "num_shards": self.num_shards, "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch, "fingerprint": self.fingerprint, "seed": self.seed,
            "boxes": self.boxes,
            "dali": base64.b64encode(blob if isinstance(blob, bytes) else blob.encode("latin-1")).decode(),
        })

    def _restore(self, state: str | bytes) -> bytes:
        try:
            s = json.loads(state)
            if s["format"] != STATE_FORMAT:
                raise ValueError(f"format {s['format']}, expected {STATE_FORMAT}")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a TrainLoader state: {e}") from e
        mine = {"shard_id": self.shard_id, "num_shards": self.num_shards, "batch_size": self.batch_size,
                "steps_per_epoch": self.steps_per_epoch, "fingerprint": self.fingerprint, "boxes": self.boxes}
        s.setdefault("boxes", False)                    # states saved before boxes existed
        diff = {k: (s.get(k), v) for k, v in mine.items() if s.get(k) != v}
        if diff:
            raise ValueError("loader state does not match this loader (saved, now): "
                             + ", ".join(f"{k}={a!r}, {b!r}" for k, (a, b) in diff.items())
                             + "; a mid-epoch resume needs the same dataset, world size, rank, batch "
                             "and boxes (the samples with boxes are another epoch)")
        self.epoch, self.step = int(s["epoch"]), int(s["step"])
        return base64.b64decode(s["dali"])


# --- evaluation -------------------------------------------------------------------------------------

class EvalLoader:
    """Validation inputs of one rank, every stored image exactly once over all ranks per pass.

    mode "center": (N, C, crop, crop) center crops of the image rescaled to Q.
    mode "dense": whole images rescaled to Q; each DALI batch is split into groups of equal size,
    yielded in order as (n, C, H, W) with 1 <= n <= batch_size (no padding, nothing resized twice).
    mode "multicrop": (N, 50, C, crop, crop): the 5x5 ``pipeline.scoring.crop_grid`` positions row-major
    (indices 0-24), then the same crops flipped horizontally (25-49).
    ``scale`` is Q (default: ``test_scale(cfg)``). ``batch_size`` is used as given (the caller
    resolves cfg.eval_batch_size == 0 to the per-worker training batch).
    ``boxes=True`` (center, dense): every image, each with its ground-truth boxes (``Batch.boxes``)."""

    def __init__(self, cfg, batch_size: int, shard_id: int, num_shards: int,
                 device_id: int | None = None, mode: str = "center", scale: int | None = None,
                 check: bool = True, boxes: bool = False):
        if mode not in EVAL_MODES:
            raise ValueError(f"Invalid eval mode {mode!r}. Only {', '.join(EVAL_MODES)} are supported.")
        if boxes and mode == "multicrop":
            raise ValueError("boxes=True is for eval modes center and dense, not multicrop")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} must be in [0, num_shards={num_shards})")
        ds = open_dataset(cfg.root)
        self.split = ds.split(cfg.val_split, check=check)
        if boxes:
            box_augment.check_has_boxes(ds, cfg.val_split)
        self.stats = ds.stats()
        self.mode, self.batch_size, self.crop = mode, batch_size, cfg.crop_size
        self.shard_id, self.num_shards = shard_id, num_shards
        self.scale = int(scale or test_scale(cfg))
        if self.scale < self.crop:
            raise ValueError(f"test scale Q={self.scale} is smaller than the crop {self.crop}")
        start, end = shard_range(self.split.num_samples, num_shards, shard_id)
        self.num_samples = end - start                # the real (unpadded) images of this rank
        self._reader_batches = reader_batches(self.split.num_samples, num_shards, batch_size)
        self._pending = 0                             # runs left from an interrupted pass
        self.device = _device(device_id)
        backend = decode_backend(cfg.decode, device_id)
        mean = augment.mean_rgb(self.stats, cfg.mean_subtraction).tolist()

        def graph():
            # stick_to_shard: every pass reads the same samples on this rank, so num_samples holds
            # a sample without boxes gets none ("empty"): evaluation covers every image
            jpegs, labels, keys, *box = _read(self.split, shard_id, num_shards, shuffle=False, seed=0,
                                              buffer=1, stick_to_shard=True, backend=backend,
                                              boxes="empty" if boxes else None)
            images = augment.rescale(augment.decode(jpegs, backend, cfg.hw_decoder_load), float(self.scale))
            crop = self.crop if mode == "center" else None
            images = augment.normalize(images, mean=mean, crop=crop, layout=cfg.layout, dtype=cfg.dtype)
            return images, labels, keys, *(box_augment.eval_outputs(box[0], jpegs) if boxes else [])

        pipe = _build(graph, batch_size=batch_size, cfg=cfg, device_id=device_id, seed=0)
        self._runner = _Runner(pipe, self.device, cfg, self.split, self._suspects)

    def _suspects(self) -> list[tuple[int, int]]:
        """The batches around this pass's position in the rank's range (read in order, no shuffle)."""
        b, depth = self.batch_size, self._runner.cfg.prefetch + 3
        ahead = (self._reader_batches - self._pending + depth) * b
        return read_window(self.split.num_samples, self.num_shards, self.shard_id, self.shard_id, ahead,
                           behind=(depth + 1) * b)

    def __len__(self) -> int:
        """Batches holding real images (dense mode may split each into several equal-size groups)."""
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self._pending):               # realign after a pass that was cut short
            self._runner.run()
        self._pending = self._reader_batches
        remaining, seen = self.num_samples, set()
        r = self._runner
        for _ in range(self._reader_batches):
            images, labels, keys, *extra = r.run()
            self._pending -= 1
            n = min(remaining, self.batch_size)       # the rest is the reader's padding: never counted
            remaining -= n
            if n == 0:
                continue
            keys = r.keys(keys)[:n]
            if seen.intersection(keys) or len(set(keys)) != n:
                raise RuntimeError(f"eval reader returned a key twice in one pass: {keys}")
            seen.update(keys)
            labels = r.labels(labels)[:n]
            crop = self.crop if self.mode == "center" else None
            boxes = box_augment.eval_boxes(extra, n, self.scale, crop) if extra else ()
            if self.mode == "center":
                yield Batch(r.images(r.tensor(images.as_tensor()))[:n], labels, keys, gt_boxes=boxes)
            elif self.mode == "dense":
                yield from self._groups(images, labels, keys, n, boxes)
            else:
                yield Batch(self._multicrop(images, n), labels, keys)

    def _sample(self, images, i: int) -> torch.Tensor:
        """One image as a logical (1, C, H, W) tensor."""
        return self._runner.images(self._runner.tensor(images[i])[None])

    def _groups(self, images, labels, keys, n, boxes):
        shapes = images.shape()
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(tuple(shapes[i]), []).append(i)
        for idx in groups.values():
            t = torch.cat([self._sample(images, i) for i in idx])
            if self._runner.cfg.layout == "NHWC":
                t = t.contiguous(memory_format=torch.channels_last)
            yield Batch(t, labels[idx], [keys[i] for i in idx], gt_boxes=tuple(boxes[i] for i in idx) if boxes else ())

    def _multicrop(self, images, n) -> torch.Tensor:
        c, out = self.crop, []
        for i in range(n):
            img = self._sample(images, i)[0]                      # (C, H, W)
            crops = torch.stack([img[:, y:y + c, x:x + c] for y, x in
                                 crop_grid(img.shape[1], img.shape[2], c)])
            out.append(torch.cat([crops, crops.flip(-1)]))        # (50, C, c, c)
        t = torch.stack(out)                                      # (N, 50, C, c, c)
        if self._runner.cfg.layout == "NHWC":                     # t.flatten(0, 1) is channels_last
            t = t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return t
