"""DDP on two processes over gloo: the bf16 gradient-compression hook, and the training loop under
torch.compile and conv-ReLU fusion (what the paper configs run on GPUs, here on the CPU)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.ddp import apply_grad_compression
from services import free_port


def _worker(rank, port, modes, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for mode in modes:   # one process group, a fresh layer and DDP per mode
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3)
        ddp = torch.nn.parallel.DistributedDataParallel(lin)
        apply_grad_compression(ddp, mode)
        # Rank r's gradient of sum(W x) w.r.t. W is 2 * (1 + r/3): 2 and 8/3, whose mean 7/3 is not
        # representable in bf16, so the hook's rounding is visible.
        ddp(torch.full((2, 4), 1.0 + rank / 3)).sum().backward()
        queue.put((mode, rank, lin.weight.grad.clone()))
    dist.destroy_process_group()


def _grads(*modes):
    """{mode: {rank: gradient}}, every mode on the same two processes (each start costs seconds)."""
    queue = mp.get_context("spawn").Manager().Queue()
    mp.spawn(_worker, args=(free_port(), modes, queue), nprocs=2)
    out = {mode: {} for mode in modes}
    for _ in range(2 * len(modes)):
        mode, rank, grad = queue.get()
        out[mode][rank] = grad
    return out


def test_bf16_hook_averages_in_bf16_and_ranks_agree():
    grads = _grads("none", "bf16")
    plain, bf16 = grads["none"], grads["bf16"]
    exact = torch.full((3, 4), 7 / 3)
    torch.testing.assert_close(plain[0], exact)
    assert torch.equal(plain[0], plain[1]) and torch.equal(bf16[0], bf16[1])
    # The hook divides each rank's gradient by the world size in bf16, then sums in bf16.
    in_bf16 = torch.tensor(2.0).bfloat16() / 2 + torch.tensor(8 / 3).bfloat16() / 2
    assert torch.equal(bf16[0], torch.full((3, 4), in_bf16.item()))
    assert not torch.equal(bf16[0], plain[0])


def test_unknown_mode_names_the_setting():
    with pytest.raises(ValueError, match="run.grad_compression 'fp8'. Only none, bf16"):
        apply_grad_compression(None, "fp8")


# --- the training loop itself on two processes: DDP under torch.compile and conv-ReLU fusion ---------

def _train(rank, port, dataset, runs, queue):
    from pipeline import checkpoint as ckpt
    from pipeline.train_loop import Worker, run_worker
    from tiny import tiny_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for i, over in enumerate(runs):   # one run after another on the same two processes
        # Two steps, a checkpoint after each: the first step's weights come with the run.
        cfg = tiny_config(dataset, **{"model.num_classes": 4, "model.dropout": 0.0, "run.workers": 2,
                                      "run.global_batch_size": 16, "run.max_steps": 2,
                                      "run.checkpoint_every_steps": 1, **over})

        def report(metrics, folder, best, i=i):
            if folder:
                state = ckpt.load_checkpoint(folder)
                queue.put((i, state["step"], state["model"], [w["param_digest"] for w in state["workers"]]))

        run_worker(cfg, Worker(rank=rank, world_size=2), report=report, log=lambda metrics, step: None)
    dist.destroy_process_group()


def _two_process_weights(dataset, *runs):
    """For each config override in ``runs``, trained in turn by the same two processes: {step: (rank 0's
    checkpointed weights, every rank's parameter digest)} after steps 1 and 2."""
    queue = mp.get_context("spawn").Manager().Queue()
    mp.spawn(_train, args=(free_port(), str(dataset), runs, queue), nprocs=2)
    out = [{} for _ in runs]
    for _ in range(2 * len(runs)):
        i, step, weights, digests = queue.get()
        out[i][step] = (weights, digests)
    return out


def test_compiled_and_fused_ddp_training_keeps_replicas_equal_and_matches_plain(sample_dataset):
    plain_run, fast_run = _two_process_weights(sample_dataset, {},
                                               {"run.compile": True, "run.fuse_conv_relu": True})
    (plain, plain_digests), (fast, digests) = plain_run[2], fast_run[2]
    assert digests[0] == digests[1] and plain_digests[0] == plain_digests[1]     # the replicas agree
    assert list(fast) == list(plain)                        # no module. / _orig_mod. in the checkpoint
    start = plain_run[1][0]                                 # the plain run's weights after step 1
    for k in plain:
        moved = (plain[k] - start[k]).norm()                # what the second step changed
        assert moved > 0 and (fast[k] - plain[k]).norm() < 0.01 * moved, k
