"""Elastic training on the two-node test cluster (tests/conftest.py): a run of 2-4 workers loses a
node for good mid-epoch and finishes on the other, and a mid-epoch checkpoint of 4 workers resumes on
2 and on 1. Every sample of every epoch is trained on exactly once, counted by key from the per-rank
records the workers append (pipeline/faults.py ``trained``); a step a failed group did after its last
checkpoint is redone by the next group, and the later record of that step is the one that counts."""
from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

from cluster import checkpoints, gate, only_run, run_train, small, steps_of, succeeded, train_proc
from pipeline import checkpoint as ckpt
from pipeline import faults
from services import stop_group, wait_for
from storage.dataset import open_dataset

STEPS = 3     # the 48-image sample at global batch 16


def every_key(dataset: Path) -> Counter:
    from pipeline.epoch_plan import remaining_entries

    split = open_dataset(dataset).split("train")
    return Counter(key for _, key, _ in remaining_entries(split, frozenset()))


def records(*folders: Path) -> list[tuple[float, int, int, int, list[str]]]:
    """(time, epoch, step, world, keys) of every step every rank recorded, oldest first."""
    out = []
    for folder in folders:
        for f in folder.glob("rank*.log"):
            for line in f.read_text().splitlines():
                t, epoch, step, world, *keys = line.split(" ")
                out.append((float(t), int(epoch), int(step), int(world), keys))
    return sorted(out)


def epochs_trained(recs) -> dict[int, Counter]:
    """Per epoch, the keys of the steps that count: for each step, the records of the last group that
    did it, its world size of them (a step of an earlier group, lost with it, was redone later)."""
    by_step: dict[tuple[int, int], list] = defaultdict(list)
    for t, epoch, step, world, keys in recs:
        by_step[(epoch, step)].append((world, keys))
    out: dict[int, Counter] = defaultdict(Counter)
    for (epoch, _), done in by_step.items():
        world = done[-1][0]
        out[epoch].update(k for _, keys in done[-world:] for k in keys)
    return out


def test_a_run_loses_a_node_mid_epoch_and_finishes_on_the_rest(ray_cluster, shared_mlflow, sample_dataset,
                                                              tmp_path):
    """4 workers, two a node; after step 2 (checkpoint at 1) the second node is killed (its raylet and
    workers: the node is gone) and not replaced. Ray Train restarts the group on the 2 workers the
    head holds; the rest of epoch 0 is its untrained samples, and epochs 0 and 1 are each every sample
    once. The charts show the size (run/workers) and the goodput table its resize."""
    keys, storage = tmp_path / "keys", tmp_path / "runs"
    keys.mkdir()
    held = gate(tmp_path / "gate", 1)
    args = small(sample_dataset, storage, "elastic", shared_mlflow.uri, **{
        "run.workers": "2-4", "run.max_failures": 3, "run.checkpoint_every_steps": 1})
    log = tmp_path / "train.log"
    proc = train_proc(ray_cluster, args, log, **held, **{faults.KEYS_ENV: str(keys)})
    node = ray_cluster["nodes"][0]
    try:
        wait_for(lambda: len([r for r in records(keys) if r[2] == 2]) == 4, 240, "4 workers at step 2", proc=proc)
        assert checkpoints(storage / "elastic"), "no checkpoint at step 1"
        stop_group(node)                                       # the node is gone for good
        time.sleep(2)
        gate(tmp_path / "gate", 10**6)
        text = succeeded(proc, log, 400)
    finally:
        stop_group(proc)
        ray_cluster["nodes"][0] = ray_cluster["add_node"]()    # the later tests' second node

    recs = records(keys)
    assert recs[0][3] == 4 and recs[-1][3] == 2 and {r[3] for r in recs} == {4, 2}, text[-3000:]
    everything = every_key(sample_dataset)
    trained = epochs_trained(recs)
    assert sorted(trained) == [0, 1]
    for epoch, counted in trained.items():
        assert counted == everything, (epoch, counted - everything, everything - counted)
    assert re.search(r"checkpoint of 4 workers, this run 2: epoch 0 goes on", text), text[-3000:]

    client = shared_mlflow.client()
    run = only_run(client, "elastic")
    sizes = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "run/workers")]
    assert sizes[0][1] == 4 and sizes[-1][1] == 2 and [s for s, _ in sizes] == sorted(s for s, _ in sizes)
    assert steps_of(client, run.info.run_id, "train/loss") == [16 * s for s in range(1, 2 * STEPS + 1)]
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    resumed_at = min(s for s, w in sizes if w == 2)
    before = [v for s, v in losses.items() if s < resumed_at]
    assert min(before) - 0.2 < losses[resumed_at] < max(before) + 0.2, losses      # no jump at the resize
    # the steps rank 0 did after its last log point die with it: nothing is counted lost here (the
    # gate holds step 2 before its log point), the restart on 2 workers is the resize
    m = run.data.metrics
    assert m["goodput/resize_s"] > 0 and m["goodput/restore_s"] == 0, m
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "goodput.json", str(tmp_path))).read_text())
    rows = {row[0]: row[1] for row in table["data"]}                  # category, seconds, share of wall
    print("goodput table:", json.dumps(table))
    assert rows["resize"] == round(m["goodput/resize_s"], 3) > 0


def test_a_mid_epoch_checkpoint_of_4_workers_resumes_on_2_and_on_1(ray_cluster, shared_mlflow, sample_dataset,
                                                                  tmp_path):
    """4 workers stop after step 1 of 3 (a checkpoint each step). The same command on 2 workers
    finishes the epoch into the same MLflow run; the 4 workers' run folder, restored, finishes it on
    1 worker too. Each way the epoch is every sample once, the steps go on from 2 and the learning
    rate is the same."""
    storage, copy = tmp_path / "runs", tmp_path / "copy"
    first, on2, on1 = (tmp_path / n for n in ("k4", "k2", "k1"))
    for k in (first, on2, on1):
        k.mkdir()

    def train(store: Path, workers: int, keys: Path, **over) -> str:
        args = small(sample_dataset, store, "resize", shared_mlflow.uri, **{
            "run.workers": workers, "run.checkpoint_every_steps": 1, "schedule.epochs": 1, **over})
        return run_train(ray_cluster, args, tmp_path / f"train-{workers}.log", **{faults.KEYS_ENV: str(keys)})

    train(storage, 4, first, **{"run.max_steps": 1})
    shutil.copytree(storage, copy)                         # the 4 workers' run folder, kept aside
    texts = {2: train(storage, 2, on2)}
    ends = {2: [ckpt.load_checkpoint(p) for p in checkpoints(storage / "resize")]}
    shutil.rmtree(storage)
    shutil.copytree(copy, storage)                         # the same checkpoint again, this time on 1
    texts[1] = train(storage, 1, on1, **{"tracking.enabled": False})
    ends[1] = [ckpt.load_checkpoint(p) for p in checkpoints(storage / "resize")]
    everything = every_key(sample_dataset)
    for world, keys in ((2, on2), (1, on1)):
        text, saved = texts[world], ends[world]
        assert f"checkpoint of 4 workers, this run {world}: epoch 0 goes on" in text, text[-3000:]
        assert "resumes at epoch 0, step 1" in text
        recs = records(first, keys)
        assert {(r[2], r[3]) for r in recs} == {(1, 4), (2, world), (3, world)}
        assert epochs_trained(recs)[0] == everything
        assert [s["step"] for s in saved][-2:] == [2, 3] and saved[-1]["epoch"] == 1
        assert {s["schedule"]["lr"] for s in saved} == {0.01}
        assert saved[-1]["epoch_keys"] == "" and len(saved[-2]["epoch_keys"].split("\n")) == 32
    client = shared_mlflow.client()
    run = only_run(client, "resize")                             # one run: the resume logged into it
    assert steps_of(client, run.info.run_id, "train/loss") == [16, 32, 48]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "run/workers")] == [4, 2, 2]
    assert {m.value for m in client.get_metric_history(run.info.run_id, "lr")} == {0.01}
