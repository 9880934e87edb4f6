"""The child side of ``python -m jobs.bench scale``: one stage in its own process, its own peak RSS.

    python -m jobs.bench.scale_child RESULT.json module jobs.preprocess SOURCE OUT --workers 2
    python -m jobs.bench.scale_child RESULT.json call NAME JSON-KWARGS

``module`` runs an entry point exactly as ``python -m <module> ARGS`` does (``runpy``, ``__main__``,
its own ``sys.exit`` status); ``call`` runs one of the measured calls below (a stage without an entry
point: a loader start, the exactly-once check, the dataset logged to MLflow, the index check). Either
way RESULT.json gets this process's own ``getrusage`` (RUSAGE_SELF: the driver) and that of the
children it waited for (RUSAGE_CHILDREN: e.g. the preprocessing workers, whose ``ru_maxrss`` is the
largest one's), plus what a call returned.

assumption: the entry point runs under ``runpy`` in this wrapper rather than as its own ``-m``
process: the same interpreter, imports and ``__main__`` module, and the only way to read the driver's
peak apart from its children's (a parent's ``wait4`` folds the children in).
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path


def usage(who: int) -> dict:
    """CPU seconds and peak RSS (MB; Linux reports ``ru_maxrss`` in KiB) of RUSAGE_SELF / _CHILDREN.

    This process's peak is its address space's high-water mark (``VmHWM``), not ``ru_maxrss``: Linux
    carries the parent's peak over a fork and exec into ``ru_maxrss``. A child's ``ru_maxrss`` keeps
    that floor (at least this process's RSS when it started the child): an upper bound."""
    r = resource.getrusage(who)
    peak, source = r.ru_maxrss * 1024, "ru_maxrss"
    if who == resource.RUSAGE_SELF:
        try:
            status = Path("/proc/self/status").read_text()
            peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
            source = "VmHWM"
        except (OSError, StopIteration, ValueError):
            source = "ru_maxrss (no VmHWM: an upper bound)"
    return {"cpu_s": r.ru_utime + r.ru_stime, "peak_rss_mb": peak / 1e6, "peak_rss_from": source}


def loader_start(root: str, kind: str, rank: int, world: int, batch: int, boxes: bool) -> dict:
    """Seconds to build rank ``rank``'s loader (train or val, on DALI's CPU: ``device_id=None``) and to
    get its first batch: what a rank waits before its first step."""
    from pipeline import config as config_lib
    from pipeline.loader import EvalLoader, TrainLoader

    sets = ["data.decode=cpu", "data.threads=1", "data.shuffle_buffer=256", "data.crop_size=32",
            "data.scale_min=32", "data.scale_max=64", "data.test_scale=32"]
    data = config_lib.load(None, [f"data.root={root}", *sets]).data
    t0 = time.perf_counter()
    if kind == "train":
        loader = TrainLoader(data, batch, rank, world, device_id=None, boxes=boxes)
    else:
        loader = EvalLoader(data, batch, rank, world, device_id=None, mode="center", boxes=boxes)
    built = time.perf_counter()
    batch0 = next(iter(loader))
    first = time.perf_counter()
    return {"build_s": built - t0, "first_batch_s": first - built, "start_s": first - t0,
            "samples": loader.split.num_samples, "batch_images": int(batch0.images.shape[0])}


def gather_check(root: str, world: int) -> dict:
    """The classify pass's exactly-once check (``jobs.passes.front.check_counted_once``) on ``world``
    synthetic rank results covering the val keys as DALI would split them: no forward pass."""
    import torch

    from jobs.passes import front
    from pipeline.sharding import shard_range
    from storage.dataset import open_dataset

    t0 = time.perf_counter()
    ds = open_dataset(root)
    expected = ds.stored_labels("val")
    read = time.perf_counter()
    keys = list(expected)
    shares = []
    for rank in range(world):
        start, end = shard_range(len(keys), world, rank)
        part = keys[start:end]
        shares.append((part, torch.tensor([expected[k] for k in part])))
    built = time.perf_counter()
    front.check_counted_once(shares, expected)
    done = time.perf_counter()
    return {"images": len(keys), "read_labels_s": read - t0, "check_s": done - built}


def log_dataset(root: str, uri: str) -> dict:
    """What a training run's tracker does with the dataset: an experiment, a run, the dataset input."""
    from mlflow import MlflowClient

    from jobs.tracking import outputs

    t0 = time.perf_counter()
    client = MlflowClient(uri)
    exp = outputs.experiment_id(client, "bench-scale", uri, root)
    run_id = client.create_run(exp, run_name=f"scale-{os.getpid()}").info.run_id
    made = time.perf_counter()
    outputs.log_dataset(client, run_id, root)
    done = time.perf_counter()
    client.set_terminated(run_id)
    return {"run_s": made - t0, "log_dataset_s": done - made}


def index_check(root: str, cache: str, warm_rounds: int) -> dict:
    """The DALI index check of both splits' real shards (``jobs.bench.index.check_seconds``): once on
    an empty node cache, then ``warm_rounds`` times on the filled one (the median)."""
    import statistics

    from jobs.bench.index import check_seconds
    from storage.dataset import open_dataset

    ds = open_dataset(root)
    splits = [ds.split(s, check=False) for s in ds.info["splits"]]
    tars = [Path(t) for s in splits for t in s.shards]
    indexes = [Path(i) for s in splits for i in s.indexes]
    cold, cold_cpu = check_seconds(tars, indexes, Path(cache), empty=True)
    warm = [check_seconds(tars, indexes, Path(cache), empty=False) for _ in range(warm_rounds)]
    return {"entries": sum(s.num_samples for s in splits), "shards": len(tars), "cold_s": cold,
            "cold_cpu_s": cold_cpu, "warm_s": statistics.median(w for w, _ in warm)}


def merge(images: int, seed: int) -> dict:
    """Protocol (b)'s merging timed by ``jobs.bench.merge.measure``."""
    from jobs.bench.merge import measure

    return measure(images, seed)


def source(root: str, images: int, seed: int, workers: int) -> dict:
    """The ILSVRC-shaped SOURCE tree (``preprocessing.imagenet_shape``), written or found complete."""
    from preprocessing import imagenet_shape

    marker = Path(root) / imagenet_shape.MARKER
    found = marker.is_file() and json.loads(marker.read_text()).get("complete") is True
    imagenet_shape.generate(root, train_images=images, seed=seed, workers=workers, progress=False)
    record = json.loads(marker.read_text())
    return {"found_complete": found,   # then the seconds are a check, not the writing
            **{k: v for k, v in record.items() if isinstance(v, int) and not isinstance(v, bool)}}


PROFILE_ENV = "SCALE_PROFILE"    # where to write the cProfile stats of this process (the driver)
CALLS = {f.__name__: f for f in (loader_start, gather_check, log_dataset, index_check, merge, source)}


def main(argv: list[str]) -> int:
    result_path, how, what, *rest = argv
    status, returned = 0, None
    profile = os.environ.get(PROFILE_ENV)     # a stage run under cProfile: its figures are inflated
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if how == "module":
            sys.argv = [what, *rest]
            runpy.run_module(what, run_name="__main__", alter_sys=True)
        else:
            returned = CALLS[what](**json.loads(rest[0] if rest else "{}"))
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        Path(result_path).write_text(json.dumps({"driver": usage(resource.RUSAGE_SELF),
                                                 "children": usage(resource.RUSAGE_CHILDREN),
                                                 "result": returned}))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
