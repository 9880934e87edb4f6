"""A sharded pass's W ranks run as W Ray tasks (one CPU set or GPU each), or one after another in this
process, with one progress bar for all of them."""
from __future__ import annotations

from typing import Callable

from jobs import cluster


def run_ranks(work: Callable[..., object], workers: int, total: int, use_ray: bool = True,
              use_gpu: bool = False, cpus_per_worker: int = 1, quiet: bool = False,
              desc: str = "evaluating") -> list:
    """``work(rank, world, progress)`` for every rank, rank order. A tqdm bar counts the images the
    workers report through ``progress(n)`` (with Ray, via a small counter actor)."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc=f"{desc} ({workers} worker{'s' * (workers > 1)})", disable=quiet)
    if not use_ray:
        with bar:
            return [work(r, workers, bar.update) for r in range(workers)]

    import ray  # RAY

    cluster.connect(num_cpus=workers * cpus_per_worker)

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self):
            self.n = 0

        def add(self, n: int) -> None:
            self.n += n

        def get(self) -> int:
            return self.n

    counter = Progress.remote()

    def task(rank: int, world: int):
        return work(rank, world, lambda n: counter.add.remote(n))

    remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_retries=0)(task)
    refs = [remote.remote(r, workers) for r in range(workers)]
    pending = list(refs)
    with bar:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            bar.update(ray.get(counter.get.remote()) - bar.n)
    out = ray.get(refs)
    ray.kill(counter)
    return out
