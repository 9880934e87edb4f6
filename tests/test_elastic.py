"""Training at a worker count that changes: the rest of an epoch after a resize is every untrained
sample once (pipeline/epoch_plan.py, pipeline/epochs.py), uneven shares of the global batch give the
global batch's gradient, and gradient accumulation gives the batch's. One process: DALI on the CPU,
torch.distributed over gloo where DDP is the point (tests/test_elastic_cluster.py: on Ray)."""
from __future__ import annotations

import multiprocessing as mp
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipeline import epoch_plan
from pipeline.epochs import Epochs
from pipeline.step import train_step
from services import free_port
from storage.dataset import open_dataset

G = 16            # the global batch: the 48-image sample is 3 global batches an epoch


def keys_of(split) -> list[str]:
    return [key for _, key, _ in epoch_plan.remaining_entries(split, frozenset())]


def steps(loaders: list[Epochs], n: int | None = None) -> list[list[str]]:
    """Run every rank's loader ``n`` steps (all of the epoch's rest when None); each step's keys."""
    its = [iter(ld) for ld in loaders]
    out = []
    while n is None or len(out) < n:
        batches = [next(it, None) for it in its]
        if batches[0] is None:
            assert all(b is None for b in batches)      # every rank runs the same steps
            return out
        out.append([k for b in batches for k in b.keys])
    return out


def group(cfg, world: int, **kw) -> list[Epochs]:
    return [Epochs(cfg, G, r, world, seed=3, **kw) for r in range(world)]


def test_plan_cuts_the_untrained_samples_into_one_chunk_a_rank_of_its_share(sample_dataset, tmp_path):
    split = open_dataset(sample_dataset).split("train")
    every = keys_of(split)
    trained = frozenset(every[5:21])                   # one global batch, anywhere
    for world in (1, 2, 3, 5):
        plans = [epoch_plan.plan(split, trained, world, r, G, seed=7, folder=tmp_path / f"{world}-{r}")
                 for r in range(world)]
        assert [p.batch_size for p in plans] == epoch_plan.batches(G, world)
        assert {p.steps for p in plans} == {2} and sum(p.batch_size for p in plans) == G
        chunks = [keys_of(p.split) for p in plans]
        assert [len(c) for c in chunks] == [p.batch_size * 2 for p in plans]
        got = Counter(k for c in chunks for k in c)
        assert max(got.values()) == 1 and set(got) == set(every) - trained
    assert epoch_plan.batches(256, 3) == [86, 85, 85]
    with pytest.raises(ValueError, match="5 workers cannot share a global batch of 4"):
        epoch_plan.batches(4, 5)


def test_the_tail_drop_last_skips_moves_with_the_epoch(sample_dataset, tmp_path):
    """40 untrained samples at G 16: 2 steps, 8 left over; the 8 differ from seed to seed."""
    split = open_dataset(sample_dataset).split("train")
    trained = frozenset(keys_of(split)[:8])
    tails = set()
    for seed in range(4):
        plan = epoch_plan.plan(split, trained, 1, 0, G, seed=seed, folder=tmp_path / str(seed))
        assert plan.steps == 2 and plan.remaining == 40
        tails.add(frozenset(set(keys_of(split)) - trained - set(keys_of(plan.split))))
    assert len(tails) > 1 and all(len(t) == 8 for t in tails)


@pytest.mark.parametrize("after", [2, 3, 1, 8])
def test_an_epoch_resized_mid_way_trains_every_sample_once(sample_dataset, data_config, after):
    """4 ranks train one step of epoch 0, then the run goes on with ``after`` ranks from the keys a
    checkpoint would hold: the epoch is every stored sample exactly once; the next epoch too."""
    cfg = data_config(sample_dataset, crop_size=32, scale_min=32, scale_max=48, threads=1)
    every = Counter(keys_of(open_dataset(sample_dataset).split("train")))
    first = group(cfg, 4)
    done = steps(first, 1)
    assert [ld.step for ld in first] == [1] * 4 and all(ld.state() for ld in first)
    trained = frozenset(k for ld in first for k in ld.trained())
    assert trained == set(done[0]) and len(trained) == G
    rest = group(cfg, after, epoch=0, trained=trained)
    assert {len(ld) for ld in rest} == {3} and {ld.step for ld in rest} == {1}
    assert [ld.batch_size for ld in rest] == epoch_plan.batches(G, after)
    done += steps(rest)
    assert Counter(k for s in done for k in s) == every
    assert {ld.epoch for ld in rest} == {0} and {ld.position() for ld in rest} == {1.0}
    assert all(ld.trained() == [] for ld in rest)       # over: a checkpoint now points at epoch 1
    following = steps(rest)
    assert {ld.epoch for ld in rest} == {1} and Counter(k for s in following for k in s) == every


def _ddp_grad(rank: int, world: int, port: int, x, y, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = nn.parallel.DistributedDataParallel(nn.Linear(6, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    share = epoch_plan.batches(len(y), world)
    lo = sum(share[:rank])
    train_step(net, opt, x[lo:lo + share[rank]], y[lo:lo + share[rank]], weight=share[rank] * world / len(y))
    queue.put((rank, net.module.weight.grad.clone().numpy()))
    dist.destroy_process_group()


def test_uneven_shares_give_the_global_batch_gradient():
    """16 images over 3 ranks (6, 5, 5), each rank's loss weighted by its share: DDP's average is the
    gradient of the mean loss over all 16, as one process computes it."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    queue = mp.get_context("spawn").Manager().Queue()
    torch.multiprocessing.spawn(_ddp_grad, args=(3, free_port(), x, y, queue), nprocs=3)
    grads = dict(queue.get() for _ in range(3))
    torch.manual_seed(0)
    one = nn.Linear(6, 3)
    train_step(one, torch.optim.SGD(one.parameters(), lr=0.0), x, y)
    for g in grads.values():
        torch.testing.assert_close(torch.from_numpy(g), one.weight.grad, atol=1e-6, rtol=1e-5)


def test_gradient_accumulation_gives_the_whole_batchs_step():
    torch.manual_seed(2)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    nets = []
    for micro in (0, 4, 1):
        torch.manual_seed(0)
        net = nn.Linear(6, 3)
        loss, out = train_step(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y, micro_batch=micro)
        nets.append((net, loss, out))
    for net, loss, out in nets[1:]:
        torch.testing.assert_close(net.weight, nets[0][0].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(loss, nets[0][1], atol=1e-6, rtol=1e-5)
        assert out.shape == nets[0][2].shape == (10, 3)


def test_the_resize_bench_measures_each_stage_at_a_given_size(tmp_path):
    from jobs.bench import resize

    rows = resize.main(["--samples", "3000", "--shards", "8", "--work", str(tmp_path), "--after", "3",
                        "--global-batch", "16"])
    assert [r["stage"] for r in rows] == ["keys", "checkpoint", "read", "plan"]
    trained = rows[0]["trained"]
    assert trained % 16 == 0 and abs(trained - 1500) < 16 and rows[0]["mb"] > 0
    plan = rows[-1]
    assert plan["steps"] == (3000 - trained) // 16 and plan["rank_samples"] == 6 * plan["steps"]
    assert all(r["seconds"] >= 0 for r in rows)
