"""DDP on two processes over gloo: the bf16 gradient-compression hook, and the training loop under
torch.compile and conv-ReLU fusion (what the paper configs run on GPUs, here on the CPU)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.ddp import apply_grad_compression
from services import free_port


def _worker(rank, port, mode, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    ddp = torch.nn.parallel.DistributedDataParallel(lin)
    apply_grad_compression(ddp, mode)
    # Rank r's gradient of sum(W x) w.r.t. W is 2 * (1 + r/3): 2 and 8/3, whose mean 7/3 is not
    # representable in bf16, so the hook's rounding is visible.
    ddp(torch.full((2, 4), 1.0 + rank / 3)).sum().backward()
    queue.put((rank, lin.weight.grad.clone()))
    dist.destroy_process_group()


def _grads(mode):
    queue = mp.get_context("spawn").Manager().Queue()
    mp.spawn(_worker, args=(free_port(), mode, queue), nprocs=2)
    return dict(queue.get() for _ in range(2))


def test_bf16_hook_averages_in_bf16_and_ranks_agree():
    plain, bf16 = _grads("none"), _grads("bf16")
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

def _train(rank, port, dataset, over, queue):
    from pipeline import checkpoint as ckpt
    from pipeline.train_loop import Worker, run_worker
    from tiny import tiny_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = tiny_config(dataset, **{"model.num_classes": 4, "model.dropout": 0.0, "run.workers": 2,
                                  "run.global_batch_size": 16, "run.max_steps": 2, **over})

    def report(metrics, folder, best):
        if folder:
            state = ckpt.load_checkpoint(folder)
            queue.put((state["model"], [w["param_digest"] for w in state["workers"]]))

    run_worker(cfg, Worker(rank=rank, world_size=2), report=report, log=lambda metrics, step: None)
    dist.destroy_process_group()


def _two_process_weights(dataset, **over):
    queue = mp.get_context("spawn").Manager().Queue()
    mp.spawn(_train, args=(free_port(), str(dataset), over, queue), nprocs=2)
    return queue.get()


def test_compiled_and_fused_ddp_training_keeps_replicas_equal_and_matches_plain(sample_dataset):
    plain, plain_digests = _two_process_weights(sample_dataset)
    fast, digests = _two_process_weights(sample_dataset, **{"run.compile": True, "run.fuse_conv_relu": True})
    assert digests[0] == digests[1] and plain_digests[0] == plain_digests[1]     # the replicas agree
    assert list(fast) == list(plain)                        # no module. / _orig_mod. in the checkpoint
    start = _two_process_weights(sample_dataset, **{"run.max_steps": 1})[0]
    for k in plain:
        moved = (plain[k] - start[k]).norm()                # what the second step changed
        assert moved > 0 and (fast[k] - plain[k]).norm() < 0.01 * moved, k
