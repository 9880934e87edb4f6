"""GPU correctness checks for the DALI pipeline, run by jobs/bench/gpu.sh before any timing:
``python -m jobs.bench.gpu_check SHARDS [DEVICE_ID]``.

1. Center crops decoded by nvJPEG ("mixed") match DALI's CPU-only path key by key (JPEG decoders
   may differ by a few grey levels, nothing more).
2. A training batch held by torch is not overwritten by the batches DALI produces after it (the
   zero-copy DLPack view must keep DALI's buffer alive).
3. Fetching a training batch and running a training step never blocks the host on the GPU
   (torch's sync debug mode raises on any synchronising call): one such wait per step drains the
   GPU's queue, and the shard-fed step loses the launch-ahead the resident step enjoys.
4. cuDNN's fused conv + bias + ReLU (model/fused.py) gives the unfused net's outputs and gradients in
   bf16 channels_last, up to bf16 rounding, and NaN left in the memory its output reuses never
   reaches the output (PyTorch passes that buffer to cuDNN as an input scaled by 0).
Prints the figures as one JSON line, then the verdicts (pipeline, fused op) as another; exits non-zero
when either fails.
"""
import copy
import json
import sys

import torch

import model
from model.fused import conv2d_relu, fuse_conv_relu
from pipeline.config import DataConfig
from pipeline.loader import EvalLoader, TrainLoader
from pipeline.step import StepOptions, prepare, sgd, train_step


def fused_vs_plain(device: torch.device) -> dict:
    """Largest relative L2 difference of the logits and of any parameter's gradient."""
    torch.manual_seed(0)
    plain = model.build("A", num_classes=100, width=0.25, image_size=64, init="kaiming",
                        dropout=0.0).to(device)
    plain = plain.to(memory_format=torch.channels_last)
    fused = copy.deepcopy(plain)
    fuse_conv_relu(fused)
    x = torch.randn(16, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    outs = []
    try:
        for net in (plain, fused):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = net(x).float()
            out.square().mean().backward()
            outs.append(out.detach())
    except RuntimeError as e:
        return {"fused_error": str(e).splitlines()[0]}
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"fused_logits_rel_diff": rel(outs[1], outs[0]),
            "fused_grad_rel_diff": max(rel(q.grad, p.grad) for p, q in zip(plain.parameters(), fused.parameters()))}


def nan_garbage_ignored(device: torch.device, tries: int = 3) -> dict:
    """Run the fused op into a freed block of NaNs (the caching allocator hands the same block back
    for the same size): its output must stay finite."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device, torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(8, 64, 56, 56, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    want = torch.relu(conv(x)).float()
    reused, worst = 0, 0.0
    with torch.no_grad():
        for _ in range(tries):
            junk = torch.full_like(want, float("nan"), dtype=torch.bfloat16, memory_format=torch.channels_last)
            ptr = junk.data_ptr()
            del junk
            out = conv2d_relu(x, conv.weight, conv.bias, 1)
            reused += out.data_ptr() == ptr
            if not torch.isfinite(out).all():
                return {"fused_nan_leak": True, "fused_nan_block_reused": reused}
            worst = max(worst, ((out.float() - want).norm() / want.norm()).item())
    return {"fused_nan_leak": False, "fused_nan_block_reused": reused, "fused_nan_rel_diff": worst}


def sync_free(loader: TrainLoader, device_id: int, fuse: bool, steps: int = 3) -> str:
    """'' when batches and steps ran with no host sync, else the error torch raised."""
    device = torch.device("cuda", device_id)
    opts = StepOptions(amp_dtype=torch.bfloat16, channels_last=True, fuse_conv_relu=fuse)
    net = prepare(model.build("A", num_classes=1000, width=0.25, image_size=224).to(device), opts)
    opt = sgd(net, lr=1e-3, fused=True)
    it = iter(loader)
    try:
        batch = next(it)
        train_step(net, opt, batch.images, batch.labels, opts.amp_dtype)   # lazy state: allowed to sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(steps):
            batch = next(it)
            train_step(net, opt, batch.images, batch.labels, opts.amp_dtype)
    except RuntimeError as e:          # a sync (or the fused op failing outright): say which
        return str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return ""


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
    snapshot = held.images.clone()
    for _ in range(3):
        later = next(it)
    torch.cuda.synchronize()
    intact = torch.equal(held.images, snapshot)
    finite = bool(torch.isfinite(later.images.float()).all())
    sync_error = sync_free(loader, device_id, fuse=False)
    fused_sync_error = sync_free(loader, device_id, fuse=True)
    fused = fused_vs_plain(torch.device("cuda", device_id))
    fused.update(nan_garbage_ignored(torch.device("cuda", device_id)))
    result = {"check": "gpu", "val_images": n, "center_mean_abs_diff": worst_mean, "center_max_abs_diff": worst_max,
              "held_batch_intact": intact, "train_dtype": str(later.images.dtype),
              "train_channels_last": later.images.is_contiguous(memory_format=torch.channels_last),
              "train_finite": finite, "train_shape": list(later.images.shape),
              "labels_on_gpu": later.labels.is_cuda, "host_sync_in_step": sync_error,
              "host_sync_in_fused_step": fused_sync_error, **fused}
    print(json.dumps(result))
    pipeline_ok = (n > 0 and worst_mean < 2.0 and intact and finite and result["train_channels_last"]
                   and later.labels.is_cuda and not sync_error)
    fused_ok = (not fused_sync_error and fused.get("fused_logits_rel_diff", 1) < 0.02
                and fused.get("fused_grad_rel_diff", 1) < 0.05 and fused.get("fused_nan_leak") is False
                and fused.get("fused_nan_block_reused", 0) > 0)      # else the NaN check proved nothing
    print(json.dumps({"check": "verdict", "pipeline_ok": pipeline_ok, "fused_conv_relu_ok": fused_ok}))
    ok = pipeline_ok and fused_ok
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m jobs.bench.gpu_check SHARDS [DEVICE_ID]  (SHARDS: a folder written by "
                 "jobs.preprocess; DEVICE_ID: the CUDA device, default 0)")
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
