"""Table 8's three configs at S = 384 (the paper ran Table 8 there): each passes ``jobs.train --dry-run``
with only its places made local (the sample's shards, a parent D of its width) and its size shrunk."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model
from jobs import cli, cluster
from jobs import train
from pipeline import config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
TABLE_8 = {"loc-D-SCR-384": ("scr", "fc"), "loc-D-PCR-384-fc": ("pcr", "fc"), "loc-D-PCR-384": ("pcr", "all")}


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(cluster, "connect", refuse)


@pytest.mark.parametrize("name", sorted(TABLE_8))
def test_table_8_configs_at_384_pass_a_dry_run(name, sample_dataset, tmp_path, no_ray, capsys):
    cfg = config.load(CONFIGS / f"{name}.yaml")
    assert (cfg.model.head, cfg.model.train_layers) == TABLE_8[name]
    assert (cfg.model.name, cfg.model.init_from, cfg.data.scale_min, cfg.data.scale_max) == ("D", "D-384", 384, 384)
    assert (cfg.optim.lr, cfg.data.val_mode, cfg.run.name) == (1e-3, "center", name)
    parent = tmp_path / "D-384.pt"        # the classification D the config names, at the test's width
    torch.save(model.build("D", num_classes=4, width=0.0625, image_size=cfg.data.crop_size).state_dict(), parent)
    sets = {"data.root": sample_dataset, "run.storage_path": tmp_path / "runs", "model.init_from": parent,
            "model.width": 0.0625, "run.use_gpu": "false", "run.workers": 1, "run.cpus_per_worker": 1,
            "run.global_batch_size": 8, "data.decode": "cpu", "tracking.enabled": "false"}
    argv = ["--config", str(CONFIGS / f"{name}.yaml"), "--dry-run"]
    argv += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert cli.run(train.main, argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"new run '{name}'" in out and "48 training images" in out and f"head: {TABLE_8[name][0]}" in out
