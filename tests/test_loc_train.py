"""Localisation training (the paper's Appendix A, issue 16 part 3): the SCR/PCR nets a config builds,
their start from a classification checkpoint written by the real checkpoint writer, ``train_layers:
fc``, the Euclidean loss and the protocol (a) validation by hand, and a short real run through
``python -m jobs.train`` (Ray Train + MLflow) whose checkpoint reloads."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import model
from pipeline import checkpoint as ckpt
from pipeline import config
from pipeline.step import StepOptions, train_step
from pipeline.task import EUCLIDEAN, evaluate_boxes, freeze
from pipeline.task import task_for as Task
from pipeline.train_loop import Worker, build_net, default_wrap
from tiny import Recorder, run_checkpoint

CLASSES = 4
TINY_D = ["model.name=D", "model.width=0.0625", "data.crop_size=32", "data.scale_min=32", "data.scale_max=64",
          f"model.num_classes={CLASSES}", "model.init=kaiming"]


def loc_config(**over) -> config.Config:
    return config.load(None, TINY_D + [f"{k}={v}" for k, v in over.items()])


# ---------------------------------------------------------------------------------------------------
# The nets a config builds, and their start from a classification checkpoint
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head, outputs", [("classes", CLASSES), ("scr", 4), ("pcr", 4 * CLASSES)])
def test_build_model_gives_the_heads_output(head, outputs):
    net = ckpt.build_model(loc_config(**{"model.head": head}), CLASSES)
    fc7 = net.classifier[3].out_features
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, outputs)
    assert net.classifier[6].weight.shape == (outputs, fc7)
    # Only FC8 depends on the head: the body's keys and shapes are the classification net's.
    body = {k: v.shape for k, v in net.state_dict().items() if k not in model.HEAD_KEYS}
    plain = ckpt.build_model(loc_config(), CLASSES).state_dict()
    assert body == {k: v.shape for k, v in plain.items() if k not in model.HEAD_KEYS}


def test_a_box_head_is_drawn_after_the_body():
    """The same seed gives a box net the classification net's body: FC8 is drawn last, so the heads
    leave every other random draw (and a classification run's weights) as they were."""
    torch.manual_seed(3)
    a = ckpt.build_model(loc_config(), CLASSES).state_dict()
    torch.manual_seed(3)
    b = ckpt.build_model(loc_config(**{"model.head": "pcr"}), CLASSES).state_dict()
    for key in a:
        assert key in model.HEAD_KEYS or torch.equal(a[key], b[key]), key
    assert a["classifier.6.weight"].shape != b["classifier.6.weight"].shape


def classification_checkpoint(folder, name: str = "D") -> tuple[str, dict]:
    """A classification run's ``best/checkpoint.pt`` in ``folder``, written by pipeline.checkpoint."""
    return str(folder), run_checkpoint(loc_config(**{"model.name": name}), CLASSES, folder, seed=1)


@pytest.mark.parametrize("head", ["scr", "pcr"])
def test_init_from_a_classification_checkpoint_keeps_every_weight_but_a_random_fc8(head, tmp_path):
    folder, parent = classification_checkpoint(tmp_path / "D-256")
    cfg = loc_config(**{"model.head": head, "model.init_from": folder, "optim.lr": 1e-3})
    net, _ = build_net(cfg, Worker(), StepOptions(), None, default_wrap)
    got = net.state_dict()
    for key, value in parent.items():
        if key not in model.HEAD_KEYS:
            assert torch.equal(got[key], value), key
    w, b = got["classifier.6.weight"], got["classifier.6.bias"]
    assert w.shape[0] == (4 if head == "scr" else 4 * CLASSES)
    # "the last layer initialised randomly": N(0, 0.01), zero bias, whatever the parent's FC8 was
    assert 0.008 < w.std().item() < 0.012 and abs(w.mean().item()) < 0.002 and not b.any()


def test_init_from_another_model_is_an_error_naming_the_keys(tmp_path):
    folder, _ = classification_checkpoint(tmp_path / "A-256", name="A")
    cfg = loc_config(**{"model.head": "scr", "model.init_from": folder})
    with pytest.raises(ValueError, match="do not fit the localisation net: missing"):
        build_net(cfg, Worker(), StepOptions(), None, default_wrap)


@pytest.mark.parametrize("over, key", [
    ({"model.head": "boxes"}, "model.head"),
    ({"model.train_layers": "conv"}, "model.train_layers"),
    ({"model.head": "pcr", "model.init_from_mode": "a"}, "model.init_from_mode"),
    ({"model.head": "pcr", "model.reinit_head": "true"}, "model.reinit_head"),
    ({"model.head": "scr", "data.val_mode": "dense"}, "data.val_mode"),
])
def test_a_localisation_option_that_cannot_work_is_a_config_error(over, key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        loc_config(**over)


# ---------------------------------------------------------------------------------------------------
# What is trained: train_layers
# ---------------------------------------------------------------------------------------------------

def test_train_layers_fc_trains_only_fc6_to_fc8():
    cfg = loc_config(**{"model.head": "pcr", "model.train_layers": "fc", "optim.lr": 0.05})
    net, optimizer = build_net(cfg, Worker(), StepOptions(), None, default_wrap)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in net.classifier.parameters()}       # no frozen tensor in SGD
    task, labels = Task("pcr"), torch.tensor([0, 1, 2, 3])
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.6]] * 4)
    for _ in range(3):
        train_step(net, optimizer, torch.randn(4, 3, 32, 32), labels,
                   loss_fn=lambda out, part: task.loss(out, labels[part], boxes[part]))
    after = net.state_dict()
    for key, value in before.items():
        if key.startswith("features."):
            assert torch.equal(after[key], value), key
    assert all(not torch.equal(after[f"classifier.{i}.weight"], before[f"classifier.{i}.weight"]) for i in (0, 3, 6))
    # with "all", the convolutions learn too
    net_all = ckpt.build_model(loc_config(**{"model.head": "scr"}), CLASSES)
    assert freeze(net_all, "all") == 0 and all(p.requires_grad for p in net_all.parameters())


# ---------------------------------------------------------------------------------------------------
# The loss, the training counts and the validation, by hand
# ---------------------------------------------------------------------------------------------------

def test_the_loss_is_caffes_euclidean_loss():
    pred = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.2, 0.4, 0.2, 0.2]])
    target = torch.tensor([[0.5, 0.5, 0.5, 1.0], [0.2, 0.4, 0.2, 0.4]])
    # Caffe: 1/(2N) sum ||p - t||^2 = (0.25 + 0.04) / 4
    assert Task("scr").loss(pred, torch.tensor([0, 0]), target).item() == pytest.approx(0.29 / 4)
    assert EUCLIDEAN == 2.0
    # PCR: only the ground-truth class's 4 outputs count; the others may be anything
    pcr = torch.full((2, 4 * CLASSES), 9.0)
    pcr[0, 8:12], pcr[1, 4:8] = pred[0], pred[1]
    assert Task("pcr").loss(pcr, torch.tensor([2, 1]), target).item() == pytest.approx(0.29 / 4)
    with pytest.raises(ValueError, match="batch has none"):
        Task("scr").loss(pred, torch.tensor([0, 0]), None)


def test_training_counts_are_box_iou_and_misses():
    target = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    pred = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.25]])   # IoU 1, then 0.5 (not > 0.5)
    iou, misses = Task("scr").counts(pred, torch.tensor([0, 1]), target).tolist()
    assert iou == pytest.approx(1.5) and misses == 1
    assert Task("scr").count_names == ("train/box_iou", "train/box_err")
    logits = torch.tensor([[3.0, 2, 1, 0], [0, 1, 2, 3]])
    assert Task().counts(logits, torch.tensor([0, 0]), None).tolist() == [1, 0]   # top-1 miss; top-5 of 4


class ConstantBoxes(nn.Module):
    """A 'net' that predicts the same outputs for every image."""

    def __init__(self, row: list[float]):
        super().__init__()
        self.row = nn.Parameter(torch.tensor(row), requires_grad=False)

    def forward(self, x):
        return self.row.expand(x.shape[0], -1)


@pytest.mark.parametrize("head", ["scr", "pcr"])
def test_protocol_a_validation_by_hand(head):
    """The box (0.5, 0.5, 0.5, 0.5) of a 32 px crop is the corners (8, 8, 24, 24). Image 0: the same box
    (correct); image 1: a far box (wrong); image 2: a far box and one of IoU 0.75 (correct); image 3:
    no box (not counted). Error 1/3. PCR predicts it for class 1 only, the class of every image."""
    row = [0.5, 0.5, 0.5, 0.5] if head == "scr" else [0.0, 0.0, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5] + [0.9] * 8
    gt = [torch.tensor([[8.0, 8, 24, 24]]), torch.tensor([[0.0, 0, 8, 8]]),
          torch.tensor([[0.0, 0, 4, 4], [8, 8, 24, 20]]), torch.zeros(0, 4)]
    batch = SimpleNamespace(images=torch.zeros(4, 3, 32, 32), labels=torch.ones(4, dtype=torch.long), gt_boxes=gt)
    loader = type("Loader", (), {"crop": 32, "__iter__": lambda self: iter([batch])})()
    v = evaluate_boxes(Task(head), ConstantBoxes(row), loader, worker=Worker(), amp_dtype=None)
    assert v.error == pytest.approx(1 / 3) and v.metrics["val/loc_err"] == v.error
    assert v.metrics["val/box_iou"] == pytest.approx((1 + 0 + 0.75) / 3) and v.tally is None


def test_the_localisation_configs_say_what_the_paper_did():
    """Net D; SCR or PCR; single scale; from the classification run of the same S; lr 1e-3; protocol
    (a) validation; each parent is one of the experiment configs."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    want = {"loc-D-SCR-256": ("scr", 256, "D-256"), "loc-D-PCR-256": ("pcr", 256, "D-256"),
            "loc-D-PCR-384": ("pcr", 384, "D-384")}
    for name, (head, s, parent) in want.items():
        cfg = config.load(folder / f"{name}.yaml")
        assert (cfg.model.name, cfg.model.head, cfg.model.init_from, cfg.run.name) == ("D", head, parent, name)
        assert (cfg.data.scale_min, cfg.data.scale_max, cfg.optim.lr, cfg.data.val_mode) == (s, s, 1e-3, "center")
        assert config.load(folder / f"{parent}.yaml").data.scale_min == s
    assert config.load(folder / "loc-D-SCR-256.yaml").model.train_layers == "fc"


# ---------------------------------------------------------------------------------------------------
# Real runs on the sample's shards (every sample has boxes): in one process, then through jobs.train
# ---------------------------------------------------------------------------------------------------

def test_a_localisation_run_in_one_process_trains_only_the_fc_layers(sample_dataset, tmp_path):
    """A classification run's checkpoint (the loop's own writer) starts a PCR run with train_layers fc:
    the convolutions stay the parent's, FC6-FC8 learn, the box metrics are logged, the best checkpoint
    is the lowest val/loc_err, and the checkpoint loads into the net its config builds."""
    from pipeline.train_loop import run_worker
    from tiny import tiny_config

    base = {"model.num_classes": CLASSES, "run.workers": 1, "run.global_batch_size": 8, "run.log_every_steps": 2}
    parent = Recorder()
    run_worker(tiny_config(sample_dataset, **base, **{"run.max_steps": 2, "schedule.epochs": 1}), Worker(),
               report=parent.report, log=parent.log)
    ckpt.save_checkpoint(parent.reported[-1][1], tmp_path / "A-cls" / "best" / ckpt.FILENAME)
    cfg = tiny_config(sample_dataset, **base, **{"model.head": "pcr", "model.train_layers": "fc", "optim.lr": 0.01,
                                                "model.init_from": tmp_path / "A-cls", "schedule.epochs": 2})
    rec = Recorder()
    result = run_worker(cfg, Worker(), report=rec.report, log=rec.log)
    train = [m for _, m in rec.logged if "train/loss" in m]
    assert len(train) == 6 and all({"train/box_iou", "train/box_err"} <= set(m) and "train/top1_err" not in m
                                   for m in train)
    assert all(0 <= m["train/box_iou"] <= 1 and m["train/loss"] > 0 for m in train)
    epochs = [m for _, m in rec.logged if "val/loc_err" in m]
    assert len(epochs) == 2 and "val/top1_err" not in epochs[0] and result.tally is None
    errors = [m["val/loc_err"] for m in epochs]
    state = rec.reported[-1][1]
    assert state["schedule"]["best"] == min(errors)
    assert [best for *_, best in rec.reported] == [True, errors[1] < errors[0]]
    before, after = parent.reported[-1][1]["model"], state["model"]
    for key in before:
        if key.startswith("features."):
            assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["classifier.0.weight"], before["classifier.0.weight"])
    assert after["classifier.6.weight"].shape[0] == 4 * CLASSES
    ckpt.save_checkpoint(state, tmp_path / "loc" / ckpt.FILENAME)          # what the loop wrote, kept
    net, loaded_cfg = ckpt.model_from_checkpoint(tmp_path / "loc")
    assert loaded_cfg.model.head == "pcr" and net(torch.zeros(2, 3, 32, 32)).shape == (2, 4 * CLASSES)


@pytest.fixture
def no_ray(monkeypatch):
    from jobs import cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(cluster, "connect", refuse)


def test_a_localisation_mistake_is_one_error_line_before_ray(sample_dataset, tmp_path, no_ray, capsys):
    """A parent of another model, and a dataset without boxes: each one `error:` line, status 2."""
    import json
    import shutil

    from jobs import cli
    from jobs import train as J
    from tiny import tiny_sets

    parent, _ = classification_checkpoint(tmp_path / "A-256", name="A")
    bare = tmp_path / "no-boxes"
    shutil.copytree(sample_dataset, bare)
    info = json.loads((bare / "dataset.json").read_text())
    for entry in info["splits"].values():
        entry.pop("boxes")
    (bare / "dataset.json").write_text(json.dumps(info))
    base = {"model.name": "D", "model.head": "scr", "model.num_classes": 0, "run.workers": 1,
            "run.global_batch_size": 8, "run.storage_path": tmp_path / "runs", "tracking.enabled": "false"}
    for over, names in [({"model.init_from": parent}, "model.init_from"), ({"data.root": bare}, "needs boxes")]:
        sets = tiny_sets(sample_dataset, **{**base, **over})
        code = cli.run(J.main, [a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and names in err[0], err


def test_a_localisation_run_through_ray_train_and_mlflow(ray_cluster, shared_mlflow, sample_dataset, tmp_path):
    """``python -m jobs.train`` on the two-node cluster, 2 workers (DDP over gloo with the convolutions
    frozen): an SCR net from a classification checkpoint logs its params, the box metrics and
    val/loc_err to MLflow, keeps the parent's convolutions on both replicas, and leaves a best
    checkpoint (and an MLflow model) that reload as the box net."""
    import mlflow

    from cluster import only_run, run_train, small, steps_of

    parent, weights = classification_checkpoint(tmp_path / "A-cls", name="A")
    storage = tmp_path / "runs"
    args = small(sample_dataset, storage, "loc-scr", shared_mlflow.uri, **{
        "model.head": "scr", "model.train_layers": "fc", "model.init_from": parent, "optim.lr": 0.01,
        "tracking.log_model": "true"})
    text = run_train(ray_cluster, args, tmp_path / "train.log", timeout=400)
    assert "localisation error" in text

    client = shared_mlflow.client()
    run = only_run(client, "loc-scr")
    assert run.info.status == "FINISHED"
    assert (run.data.params["model.head"], run.data.params["model.train_layers"]) == ("scr", "fc")
    # 48 images / global batch 16 = 3 steps an epoch, 2 epochs, every step logged; stepped by images seen
    assert steps_of(client, run.info.run_id, "train/loss") == [16 * s for s in range(1, 7)]
    assert steps_of(client, run.info.run_id, "val/loc_err") == [48, 96]
    assert {"train/box_iou", "train/box_err", "val/box_iou"} <= set(run.data.metrics)
    assert "val/top1_err" not in run.data.metrics and "train/top1_err" not in run.data.metrics
    errors = [m.value for m in client.get_metric_history(run.info.run_id, "val/loc_err")]

    best = ckpt.load_checkpoint(storage / "loc-scr", "best")
    assert best["metrics"]["val/loc_err"] == min(errors) and 0 <= min(errors) <= 1
    assert best["workers"][0]["param_digest"] == best["workers"][1]["param_digest"]
    net = ckpt.build_model(ckpt.config_of(best), best["num_classes"])
    net.load_state_dict(best["model"])
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    for key, value in weights.items():
        if key.startswith("features."):
            assert torch.equal(best["model"][key], value), key
    mlflow.set_tracking_uri(shared_mlflow.uri)
    info = mlflow.models.get_model_info(run.data.tags["model_uri"])
    assert info.metadata["head"] == "scr" and info.metadata["output"].startswith("(N, 4)")
