"""GPU correctness checks for the DALI pipeline, run by benchmarks/gpu.sh before any timing.

1. Center crops decoded by nvJPEG ("mixed") match DALI's CPU-only path key by key (JPEG decoders
   may differ by a few grey levels, nothing more).
2. A training batch held by torch is not overwritten by the batches DALI produces after it (the
   zero-copy DLPack view must keep DALI's buffer alive).
Prints one JSON line; exits non-zero on a failed check.
"""
import json
import sys

import torch

from pipeline.config import DataConfig
from pipeline.loader import EvalLoader, TrainLoader


def main(root: str, device_id: int) -> int:
    cfg = DataConfig(root=root, crop_size=224, scale_min=256, scale_max=256, decode="mixed", threads=8)
    worst_mean, worst_max, n = 0.0, 0.0, 0
    gpu, cpu = EvalLoader(cfg, 8, 0, 1, device_id=device_id, mode="center"), EvalLoader(cfg, 8, 0, 1, mode="center")
    for bg, bc in zip(gpu, cpu):
        assert bg.keys == bc.keys, (bg.keys, bc.keys)
        assert torch.equal(bg.labels.cpu(), bc.labels)
        d = (bg.images.float().cpu() - bc.images.float()).abs()
        worst_mean, worst_max, n = max(worst_mean, d.mean().item()), max(worst_max, d.max().item()), n + len(bg.keys)
    train_cfg = DataConfig(root=root, crop_size=224, scale_min=256, scale_max=512, decode="mixed", threads=8,
                           layout="NHWC", dtype="bfloat16")
    loader = TrainLoader(train_cfg, 64, 0, 1, device_id=device_id)
    it = iter(loader)
    held = next(it)
    copy = held.images.clone()
    for _ in range(3):
        later = next(it)
    torch.cuda.synchronize()
    intact = torch.equal(held.images, copy)
    finite = bool(torch.isfinite(later.images.float()).all())
    result = {"check": "gpu", "val_images": n, "center_mean_abs_diff": worst_mean, "center_max_abs_diff": worst_max,
              "held_batch_intact": intact, "train_dtype": str(later.images.dtype),
              "train_channels_last": later.images.is_contiguous(memory_format=torch.channels_last),
              "train_finite": finite, "train_shape": list(later.images.shape)}
    print(json.dumps(result))
    ok = n > 0 and worst_mean < 2.0 and intact and finite and result["train_channels_last"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
