"""Checkpoint files (pipeline/checkpoint.py): plain dicts, atomic writes, safe loads, named locations."""
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import model
from pipeline import checkpoint as ckpt
from pipeline import config
from pipeline import faults
from storage import files


def make_state(cfg=None, seed=0, step=1):
    cfg = cfg or config.load(None, ["model.width=0.03125", "data.crop_size=32", "data.scale_min=32",
                                    "data.scale_max=32", "model.num_classes=4"])
    torch.manual_seed(seed)
    net = ckpt.build_model(cfg, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return {"format": ckpt.FORMAT, "model": net.state_dict(), "optimizer": opt.state_dict(),
            "schedule": {"lr": 0.01, "best": 0.5}, "epoch": 1, "step": step, "step_in_epoch": 0,
            "images_seen": 256 * step, "workers": [{"rng": ckpt.rng_state(), "data": '{"format": 1}'}],
            "config": config.dump(cfg), "num_classes": 4, "mlflow_run_id": "abc", "dataset_fingerprint": "f",
            "metrics": {"val/top1_err": 0.5}}


def test_round_trip_with_weights_only(tmp_path):
    state = make_state()
    path = ckpt.save_checkpoint(state, tmp_path / "checkpoint.pt")
    back = ckpt.load_checkpoint(path)
    assert back["path"] == str(path) and back["step"] == 1 and back["mlflow_run_id"] == "abc"
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["state"][0]["momentum_buffer"].shape == state["model"]["features.0.weight"].shape
    # The raw file itself loads with the safe unpickler too.
    assert torch.load(path, weights_only=True)["num_classes"] == 4
    assert not list(tmp_path.glob(".*tmp*"))


def test_rng_state_restores_every_generator():
    state = ckpt.rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    ckpt.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_model_from_checkpoint_gives_the_net_and_its_config(tmp_path):
    state = make_state()
    ckpt.save_checkpoint(state, tmp_path / "checkpoint.pt")
    net, cfg = ckpt.model_from_checkpoint(tmp_path)
    assert cfg.model.width == 0.03125 and cfg.data.crop_size == 32
    assert not net.training
    x = torch.randn(1, 3, 32, 32)
    ref = ckpt.build_model(cfg, 4)
    ref.load_state_dict(state["model"])
    assert torch.equal(net(x), ref.eval()(x))


def test_resolve_file_folder_and_run_folder(tmp_path):
    run = tmp_path / "A-256"
    for step in (3, 12):
        ckpt.save_checkpoint(make_state(step=step), run / f"checkpoint_{step:010d}" / "checkpoint.pt")
    assert ckpt.resolve(run, "latest").endswith("checkpoint_0000000012/checkpoint.pt")
    assert ckpt.resolve(run, "best").endswith("checkpoint_0000000012/checkpoint.pt")  # no best/ yet
    ckpt.save_checkpoint(make_state(step=3), run / "best" / "checkpoint.pt")
    assert ckpt.resolve(run).endswith("best/checkpoint.pt")
    assert ckpt.load_checkpoint(run, "latest")["step"] == 12
    folder = run / "checkpoint_0000000003"
    assert ckpt.resolve(folder) == f"{folder}/checkpoint.pt"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.resolve(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected checkpoint.pt"):
        ckpt.resolve(tmp_path / "empty")


def test_resolve_through_a_uri(tmp_path):
    ckpt.save_checkpoint(make_state(step=7), tmp_path / "r" / "checkpoint_0000000007" / "checkpoint.pt")
    assert ckpt.load_checkpoint(f"file://{tmp_path}/r")["step"] == 7


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "model": {}, "x": Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.pt") as refused:
        ckpt.load_checkpoint(path)
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)   # torch's weights_only refusal


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a checkpoint of format 1"):
        ckpt.load_checkpoint(tmp_path / "other.pt")


def test_unwrap_strips_ddp_and_compile_wrappers():
    net = model.build("A", num_classes=4, width=0.03125, image_size=32)
    compiled = torch.compile(net)
    assert ckpt.unwrap(compiled) is net and ckpt.unwrap(net) is net


def test_a_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A process killed mid-write (the knob truncates the temp file to half and exits at once, as
    a dying node would) never touches the checkpoint it was replacing."""
    target = tmp_path / "run" / "checkpoint.pt"
    ckpt.save_checkpoint(make_state(step=1), target)
    before = target.read_bytes()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import make_state
        from pipeline import checkpoint as ckpt
        ckpt.save_checkpoint(make_state(step=2), {str(target)!r})
        print("not reached")
    """)
    env = {**os.environ, faults.CRASH_ENV: "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == faults.CRASH_EXIT, proc.stderr
    assert "not reached" not in proc.stdout
    partial = list(target.parent.glob(f"{files.TMP_PREFIX}checkpoint.pt.*"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(before) * 2
    with pytest.raises(Exception):
        torch.load(partial[0], weights_only=True)  # the half-written file is garbage...
    assert target.read_bytes() == before           # ...and the previous checkpoint is untouched
    assert ckpt.load_checkpoint(target)["step"] == 1
