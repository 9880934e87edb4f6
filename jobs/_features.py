"""What jobs.features and jobs.transfer share: appendix B's descriptors of every stored image of a split,
extracted over W workers (each image exactly once), and their parquet file."""
from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path

import numpy as np
import torch

from jobs._ranks import Member, prepare_rank, run_ranks
from pipeline import config as config_lib
from pipeline import dataset
from pipeline import evaluate as E
from pipeline import features as F
from storage.files import atomic_write


@dataclasses.dataclass(frozen=True)
class Pass:
    """How to run a sharded pass: workers, Ray or not, GPU or not, DALI batch."""

    workers: int = 1
    use_ray: bool = True
    use_gpu: bool = False
    cpus_per_worker: int = 1
    batch_size: int = 16
    quiet: bool = False


def split_data(cfg: config_lib.Config, root: str, split: str, use_gpu: bool) -> config_lib.DataConfig:
    """The member's data config pointed at ``root``/``split``, decoded for evaluation."""
    return dataclasses.replace(cfg.data, root=root or cfg.data.root, val_split=split or cfg.data.val_split,
                               layout="NCHW", dtype="float32", decode="mixed" if use_gpu else "cpu")


def _rank(nets, data, member_scales, flip, run: Pass, threads, rank, world, progress):
    nets, device, batches_at = prepare_rank(nets, data, run.batch_size, rank, world, run.use_gpu, threads)
    return F.features_share(nets, batches_at, member_scales, flip, device,
                            amp_dtype=torch.bfloat16 if run.use_gpu else None, progress=progress)


def extract(members: list[Member], data: config_lib.DataConfig, member_scales: tuple[tuple[int, ...], ...],
            flip: bool, run: Pass) -> tuple[list[str], torch.Tensor, list[torch.Tensor]]:
    """(sorted keys, labels, per net (N, scales, D)) of every stored image of ``data.val_split``,
    checked exactly once against the manifest before anything is returned."""
    expected = dataset.stored_labels(data.root, data.val_split)
    union = {q for qs in member_scales for q in qs}
    work = functools.partial(_rank, [m.net.cpu() for m in members], data, member_scales, flip, run,
                             run.cpus_per_worker if run.use_ray else 0)
    shares = run_ranks(work, run.workers, len(expected) * len(union), run.use_ray, run.use_gpu,
                       run.cpus_per_worker, run.quiet, desc=f"features {data.val_split}")
    E.check_exactly_once([E.ShareResult(k, lbl, {}) for k, lbl, _ in shares], expected)
    keys = [k for ks, _, _ in shares for k in ks]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    labels = torch.cat([lbl for _, lbl, _ in shares])[order]
    if [expected[keys[i]] for i in order] != labels.tolist():
        raise RuntimeError(f"labels from the shards of {data.val_split!r} differ from the manifest")
    per_net = [torch.cat([f[i] for _, _, f in shares])[order] for i in range(len(members))]
    return [keys[i] for i in order], labels, per_net


def write_parquet(path: Path, keys: list[str], labels: torch.Tensor, feats: torch.Tensor) -> None:
    """Write key, label, feature (fixed_size_list<float32>[D]), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = feats.shape[1]
    flat = pa.array(feats.float().numpy().reshape(-1), type=pa.float32())
    table = pa.table({"key": pa.array(keys, pa.string()),
                      "label": pa.array(labels.numpy().astype(np.int32), pa.int32()),
                      "feature": pa.FixedSizeListArray.from_arrays(flat, d)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write(path, buffer.getvalue())


def read_parquet(path: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, labels, (N, D) features) of a file ``write_parquet`` wrote."""
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    keys = t.column("key").to_pylist()
    feats = torch.from_numpy(t.column("feature").combine_chunks().flatten().to_numpy().copy())
    return keys, torch.tensor(t.column("label").to_pylist(), dtype=torch.long), feats.reshape(len(keys), -1)
