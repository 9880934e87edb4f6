"""The training setup the tests share: net A at width 1/16 on 32 px crops of a sample dataset, decoded
on the CPU by one DALI thread. Each test adds what it is about (workers, batch, epochs, ...)."""
from __future__ import annotations

from pipeline import config

TINY = {"data.crop_size": 32, "data.scale_min": 32, "data.scale_max": 64, "data.decode": "cpu",
        "data.threads": 1, "data.shuffle_buffer": 64, "model.width": 0.0625, "model.init": "kaiming"}


def tiny_sets(dataset, **over) -> dict:
    """``section.key -> value`` overrides: TINY on ``dataset``, then ``over``."""
    return {"data.root": dataset, **TINY, **over}


def tiny_config(dataset, **over) -> config.Config:
    return config.load(None, [f"{k}={v}" for k, v in tiny_sets(dataset, **over).items()])


class Recorder:
    """Stands in for Ray Train's reporting in one-process runs of ``run_worker``: what the loop logged
    (step, metrics) and reported (metrics, the checkpoint it pointed at, loaded, and whether best)."""

    def __init__(self):
        self.logged, self.reported = [], []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def report(self, metrics, folder, best):
        from pipeline import checkpoint as ckpt

        self.reported.append((dict(metrics), ckpt.load_checkpoint(folder) if folder else None, best))


def run_checkpoint(cfg: config.Config, classes: int, folder, seed: int) -> dict:
    """A finished run's ``<folder>/best/checkpoint.pt`` of ``cfg``'s net, as the loop writes it (the
    real checkpoint writer); returns the net's state_dict."""
    import torch

    from pipeline import checkpoint as ckpt

    torch.manual_seed(seed)
    net = ckpt.build_model(cfg, classes)
    state = ckpt.pack(model=net.state_dict(), optimizer={}, schedule={}, epoch=1, step=6, step_in_epoch=0,
                      images_seen=48, workers=[], config=config.dump(cfg), num_classes=classes, mlflow_run_id="",
                      dataset_fingerprint="", metrics={})
    ckpt.save_checkpoint(state, f"{folder}/best/{ckpt.FILENAME}")
    return net.state_dict()
