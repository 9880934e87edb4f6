"""What jobs.features and jobs.transfer share: appendix B's descriptors of every stored image of a split,
extracted over W workers (each image exactly once), and their parquet file."""
from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import torch

from jobs.passes import front
from jobs.passes.members import Member, member_scales
from pipeline import features as F
from storage.dataset import Dataset
from storage.files import atomic_write


def _rank(nets, data, member_scales, flip, batch_size, use_gpu, threads, rank, world, progress):
    nets, device, batches_at = front.prepare_rank(nets, data, batch_size, rank, world, use_gpu, threads)
    return F.features_share(nets, batches_at, member_scales, flip, device,
                            amp_dtype=torch.bfloat16 if use_gpu else None, progress=progress)


def extract(members: list[Member], ds: Dataset, split: str, batch_size: int,
            opts: front.PassOptions) -> tuple[list[str], torch.Tensor, list[torch.Tensor]]:
    """(sorted keys, labels, per net (N, scales, D)) of every stored image of ``split`` of ``ds``,
    checked exactly once against the manifest before anything is returned."""
    data = front.split_data(members[0].cfg, opts, split)
    scales = member_scales(opts.scales, members)
    expected = front.open_split(ds, data, opts)
    union = {q for qs in scales for q in qs}
    work = functools.partial(_rank, [m.net.cpu() for m in members], data, scales, opts.flip, batch_size,
                             opts.gpu, opts.threads)
    shares = front.run(work, opts, len(expected) * len(union), f"features {data.val_split}")
    front.check_counted_once(((k, lbl) for k, lbl, _ in shares), expected)
    keys = [k for ks, _, _ in shares for k in ks]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    labels = torch.cat([lbl for _, lbl, _ in shares])[order]
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
