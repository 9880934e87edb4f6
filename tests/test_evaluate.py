"""Evaluation: the paper's dense / multi-crop / multi-scale protocols, ensembles, exactly-once
sharding across workers, the results table and its MLflow child run, transfer features."""
from __future__ import annotations

import math

import pytest
import torch

import model
from pipeline import evaluate as E
from pipeline import scoring as S

CLASSES = 10


def tiny(name="A", crop=32, seed=0, classes=CLASSES):
    torch.manual_seed(seed)
    return model.build(name, num_classes=classes, width=1 / 16, image_size=crop, init="glorot").eval()


def images(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) * 60 for h, w in shapes]


# --------------------------------------------------------------------------------- pure scoring math

def test_test_scales_follow_the_paper():
    assert S.test_scales(256, 256) == [224, 256, 288]
    assert S.test_scales(384, 384) == [352, 384, 416]
    assert S.test_scales(256, 512) == [256, 384, 512]
    with pytest.raises(ValueError, match="smin"):
        S.test_scales(512, 256)


def test_crop_grid_is_exactly_the_5x5_grid_corners_included():
    boxes = S.crop_grid(256, 341, 224)
    assert len(boxes) == 25 and len(set(boxes)) == 25
    tops = sorted({t for t, _ in boxes})
    lefts = sorted({l for _, l in boxes})
    assert tops == [0, 8, 16, 24, 32]            # slack 32: even steps of 8
    assert lefts == [0, 29, 59, 88, 117]         # slack 117: steps of 29.25, mirrored, middle 58.5 up
    assert boxes == [(t, l) for t in tops for l in lefts]  # row-major, every (row, column) pair
    for corner in [(0, 0), (0, 117), (32, 0), (32, 117)]:
        assert corner in boxes
    # Every crop lies inside the image, the corner ones touch its borders.
    assert all(0 <= t <= 256 - 224 and 0 <= l <= 341 - 224 for t, l in boxes)
    # The grid is its own mirror image (what a flipped image needs), but for the middle column of an
    # odd slack (117): no whole-pixel crop is centred, it sits where the centre crop does.
    mirrored = [117 - l for l in reversed(lefts)]
    assert mirrored[:2] == lefts[:2] and mirrored[3:] == lefts[3:]
    assert (tops[2], lefts[2]) == S.center_box(256, 341, 224) == (16, 59)
    assert tops == [32 - t for t in reversed(tops)]
    assert S.crop_grid(224, 224, 224) == [(0, 0)] * 25
    assert S.crop_grid(300, 300, 100, n=3) == [(t, l) for t in (0, 100, 200) for l in (0, 100, 200)]
    with pytest.raises(ValueError, match="does not fit"):
        S.crop_grid(200, 300, 224)


def test_crops_are_the_pixels_at_the_grid_positions():
    h, w, c = 40, 57, 32
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([yy, xx, yy * 0]).float()[None]            # channel 0 = row, 1 = column
    boxes = S.crop_grid(h, w, c)
    crops = E.crops_of(img, boxes, c)
    assert crops.shape == (25, 3, c, c)
    for crop, (t, l) in zip(crops, boxes):
        assert (crop[0, 0, 0].item(), crop[1, 0, 0].item()) == (t, l)
        assert (crop[0, -1, -1].item(), crop[1, -1, -1].item()) == (t + c - 1, l + c - 1)
    assert crops[-1, 0, -1, -1] == h - 1 and crops[-1, 1, -1, -1] == w - 1  # bottom-right corner


def test_pooling_softmax_and_averages():
    m = torch.randn(2, CLASSES, 3, 4)
    torch.testing.assert_close(S.pool_score_map(m), m.mean(dim=(2, 3)))
    p = S.dense_posteriors(m)
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    a, b = torch.softmax(torch.randn(4, 5), 1), torch.softmax(torch.randn(4, 5), 1)
    torch.testing.assert_close(S.average_posteriors([a, b]), S.average_posteriors([b, a]))
    torch.testing.assert_close(S.average_posteriors([a, a]), a)
    torch.testing.assert_close(S.group_mean(torch.cat([a, b], 1).reshape(8, 5), 2), (a + b) / 2)
    with pytest.raises(ValueError, match="different shapes"):
        S.average_posteriors([a, b[:2]])


def test_topk_errors_and_per_class_accuracy():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    labels = torch.tensor([1, 2, 2, 0])
    top = S.topk(p, 2)
    assert top.tolist() == [[1, 2], [0, 2], [2, 1], [2, 0]]     # ties broken by the lower index
    assert S.topk_errors(top, labels, ks=(1, 2)) == {1: 0.5, 2: 0.0}
    acc = S.per_class_accuracy(top[:, 0], labels, 4)
    assert acc[:3].tolist() == [0.0, 1.0, 0.5] and math.isnan(acc[3])  # class 3: no images
    t = S.Tally(4).add(top, labels)
    assert (t.n, t.top1_wrong, t.top5_wrong) == (4, 2, 0)
    merged = S.Tally(4).add(top[:2], labels[:2]).merge(S.Tally(4).add(top[2:], labels[2:]))
    assert (merged.n, merged.top1_wrong) == (4, 2)
    torch.testing.assert_close(merged.per_class_accuracy()[:3], acc[:3])


# ------------------------------------------------------------------------ protocols on tiny nets

@pytest.mark.parametrize("name,crop", [("A", 224), ("C", 64), ("A-LRN", 32)])
def test_dense_on_the_training_crop_equals_the_plain_forward(name, crop):
    net = tiny(name, crop)
    imgs = images([(crop, crop)] * 3)
    for flip in (False, True):
        p = E.Protocol(modes=("dense", "center"), scales=(crop,), crop=crop, flip=flip)
        out = E.posteriors_at_scale([net], imgs, p)
        with torch.no_grad():
            logits = net(torch.stack(imgs))
            if flip:
                plain = (torch.softmax(logits, 1) + torch.softmax(net(torch.stack(imgs).flip(3)), 1)) / 2
            else:
                plain = torch.softmax(logits, 1)
        assert plain.max() - plain.min() > 1e-3  # the net is not constant: the check can fail
        torch.testing.assert_close(out["dense"], plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["center"], plain, atol=1e-5, rtol=0)


def test_multicrop_is_the_mean_of_50_crop_posteriors():
    net = tiny()
    (img,) = images([(48, 72)])
    p = E.Protocol(modes=("multicrop",), scales=(48,), crop=32)
    got = E.posteriors_at_scale([net], [img], p)["multicrop"]
    crops = [img[:, t:t + 32, l:l + 32] for t, l in S.crop_grid(48, 72, 32)]
    views = torch.stack(crops + [c.flip(2) for c in crops])
    assert views.shape[0] == 50
    with torch.no_grad():
        want = torch.softmax(net(views), 1).mean(0, keepdim=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["dense", "multicrop", "center", "both"])
def test_flip_averaging_is_symmetric(mode):
    net = tiny()
    # 72 - 32 = 40: an even slack, so the 5x5 grid and the centre crop are their own mirror images.
    imgs = images([(48, 72), (40, 40), (48, 72)], seed=1)
    p = E.Protocol(modes=(mode,), scales=(40,), crop=32)
    a = E.posteriors_at_scale([net], imgs, p)[mode]
    b = E.posteriors_at_scale([net], [im.flip(2) for im in imgs], p)[mode]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    nf = E.Protocol(modes=(mode,), scales=(40,), crop=32, flip=False)
    c = E.posteriors_at_scale([net], imgs, nf)[mode]
    d = E.posteriors_at_scale([net], [im.flip(2) for im in imgs], nf)[mode]
    assert (c - d).abs().max() > 1e-4  # without the flip average the two differ: the test has teeth


def test_an_ensemble_of_a_model_with_itself_equals_the_model():
    net = tiny()
    imgs = images([(40, 56), (56, 40), (40, 56)])
    p = E.Protocol(modes=("both", "center"), scales=(40,), crop=32)
    one = E.posteriors_at_scale([net], imgs, p)
    two = E.posteriors_at_scale([net, net], imgs, p)
    for m in ("center", "dense", "multicrop", "both"):
        torch.testing.assert_close(one[m], two[m], atol=1e-6, rtol=0)
    other = tiny(seed=1)
    mixed = E.posteriors_at_scale([net, other], imgs, p)["dense"]
    torch.testing.assert_close(mixed, (one["dense"] + E.posteriors_at_scale([other], imgs, p)["dense"]) / 2)


def test_images_of_different_sizes_give_what_each_gives_alone():
    net = tiny()
    imgs = images([(40, 56), (56, 40), (40, 64), (40, 56)])
    p = E.Protocol(modes=("both",), scales=(40,), crop=32)
    batch = E.posteriors_at_scale([net], imgs, p)
    assert E.shape_groups(imgs) == {(40, 56): [0, 3], (56, 40): [1], (40, 64): [2]}
    for i, im in enumerate(imgs):
        alone = E.posteriors_at_scale([net], [im], p)
        for m in ("dense", "multicrop", "both"):
            torch.testing.assert_close(batch[m][i], alone[m][0], atol=1e-6, rtol=0)


def test_protocol_rejects_unknown_modes_and_small_scales():
    with pytest.raises(ValueError, match="Only center, dense, multicrop, both"):
        E.Protocol(modes=("sparse",))
    with pytest.raises(ValueError, match=">= the crop"):
        E.Protocol(scales=(200,), crop=224)
    p = E.Protocol(modes=("both",), scales=(256, 384), crop=224)
    assert p.computed == ("dense", "multicrop") and p.reported == ("dense", "multicrop", "both")
    assert E.rows(p)[:3] == [("dense", "256"), ("dense", "384"), ("dense", "256,384")]


def fake_share(keys, shapes_at, labels):
    """A batches_at(Q) for evaluate_share: images of the given shape per Q, in 2 batches."""
    def batches_at(q):
        imgs = images([shapes_at(q)] * len(keys), seed=q)
        half = len(keys) // 2
        for sl in (slice(0, half), slice(half, None)):
            yield keys[sl], torch.tensor(labels[sl]), imgs[sl]
    return batches_at


def test_evaluate_share_multiscale_rows_are_the_mean_over_scales():
    net = tiny()
    keys = [f"k{i}" for i in range(5)]
    labels = [i % CLASSES for i in range(5)]
    p = E.Protocol(modes=("dense",), scales=(32, 40), crop=32)
    seen = []
    res = E.evaluate_share([net], fake_share(keys, lambda q: (q, q + 8), labels), p, keep_posteriors=True,
                           progress=seen.append)
    assert sum(seen) == 5 * 2
    assert res.keys == sorted(keys) and res.labels.tolist() == labels
    assert set(res.top) == {("dense", "32"), ("dense", "40"), ("dense", "32,40")}
    per_q = [E.posteriors_at_scale([net], images([(q, q + 8)] * 5, seed=q), p)["dense"] for q in (32, 40)]
    mean = (per_q[0] + per_q[1]) / 2
    torch.testing.assert_close(res.posteriors["dense"].float(), mean, atol=1e-3, rtol=0)
    assert res.top[("dense", "32,40")].tolist() == S.topk(mean, 5).tolist()
    assert res.top[("dense", "32")].tolist() == S.topk(per_q[0], 5).tolist()


def test_evaluate_share_rejects_a_key_seen_twice():
    net = tiny()
    p = E.Protocol(modes=("center",), scales=(32,), crop=32)
    with pytest.raises(E.DuplicateKeyError, match="came twice"):
        E.evaluate_share([net], fake_share(["a", "b", "a", "c"], lambda q: (q, q), [0, 1, 0, 2]), p)


def test_check_exactly_once_names_duplicates_and_missing_keys():
    def share(keys):
        return E.ShareResult(keys, torch.zeros(len(keys), dtype=torch.long), {})
    E.check_exactly_once([share(["a", "b"]), share(["c"])], {"a", "b", "c"})
    with pytest.raises(E.DuplicateKeyError, match=r"1 duplicated \['b'\], 1 missing \['c'\]"):
        E.check_exactly_once([share(["a", "b"]), share(["b"])], {"a", "b", "c"})
    with pytest.raises(E.DuplicateKeyError, match=r"1 unexpected \['z'\]"):
        E.check_exactly_once([share(["a", "b", "c", "z"])], {"a", "b", "c"})


def test_penultimate_features_are_the_dense_fc7_activations():
    net = tiny(crop=32)
    imgs = images([(32, 32), (32, 32)])
    f = E.penultimate_features(net, imgs, flip=False)
    assert f.shape == (2, net.classifier[3].out_features)
    with torch.no_grad():
        x = net.avgpool(net.features(torch.stack(imgs))).flatten(1)
        want = net.classifier[4](net.classifier[3](net.classifier[1](net.classifier[0](x))))
    torch.testing.assert_close(f, want, atol=1e-5, rtol=0)
    n = E.l2_normalise(E.penultimate_features(net, images([(40, 56)]), flip=True))
    torch.testing.assert_close(n.norm(dim=1), torch.ones(1))


# ------------------------------------------------------------------ the jobs on the sample dataset

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline import checkpoint as ckpt  # noqa: E402
from pipeline import config as C  # noqa: E402
from pipeline.dataset import stored_labels  # noqa: E402
from pipeline.loader import shard_range  # noqa: E402


@pytest.fixture(scope="module")
def trained(sample_dataset, data_config, tmp_path_factory):
    """A tiny A (width 1/16, crop 64, S in [64, 128]) trained for a few steps with plain torch on the
    sample through the DALI training loader, saved as a real checkpoint. Returns the checkpoint folder."""
    from pipeline.loader import TrainLoader

    cfg = C.Config(model=C.ModelConfig(name="A", width=1 / 16, num_classes=4, init="glorot", dropout=0.0),
                   data=data_config(sample_dataset))
    C.validate(cfg)
    torch.manual_seed(0)
    net = ckpt.build_model(cfg, 4).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = TrainLoader(cfg.data, 16, 0, 1, seed=0)
    for _ in range(3):                                   # 3 epochs of 3 steps
        for b in loader:
            loss = torch.nn.functional.cross_entropy(net(b.images), b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    folder = tmp_path_factory.mktemp("run") / "A-tiny"
    ckpt.save_checkpoint({"format": ckpt.FORMAT, "model": net.state_dict(), "config": C.dump(cfg),
                          "num_classes": 4, "mlflow_run_id": "", "step": 9}, folder / "best" / ckpt.FILENAME)
    return folder


def run_eval(tmp_path, *args, name="out"):
    from jobs import evaluate as J

    return J.main(["--out", str(tmp_path / name), "--quiet", "--no-mlflow", "--batch-size", "5", *args])


def test_exactly_once_on_1_2_3_workers_and_the_same_figures(trained, sample_dataset, tmp_path):
    stored = stored_labels(sample_dataset, "val")
    assert len(stored) == 32  # 5 shards of <= 7: divisible by neither 2 nor 3 workers
    table = None
    for w in (1, 2, 3):
        res = run_eval(tmp_path, "--run", str(trained), "--mode", "dense", "--scales", "64,96",
                       "--workers", str(w), "--no-ray", name=f"w{w}")
        shares = res["shares"]
        assert len(shares) == w
        keys = [k for s in shares for k in s.keys]
        assert len(keys) == len(set(keys)) == 32 and set(keys) == set(stored)
        assert [len(s.keys) for s in shares] == [b - a for a, b in (shard_range(32, w, r) for r in range(w))]
        for s in shares:
            assert s.labels.tolist() == [stored[k] for k in s.keys]
        assert all(r["images"] == 32 for r in res["rows"])
        # The sharding changes nothing but who computes what: identical tables.
        table = table or res["rows"]
        assert res["rows"] == table


def test_a_broken_sharding_is_caught_before_any_figure(trained, tmp_path, monkeypatch):
    from jobs import evaluate as J

    real = J.loader_batches

    def rank1_reads_rank0(data, batch, rank, world, device_id):
        return real(data, batch, 0 if rank == 1 else rank, world, device_id)

    monkeypatch.setattr(J, "loader_batches", rank1_reads_rank0)
    with pytest.raises(E.DuplicateKeyError, match=r"not exactly once: 10 duplicated .* 11 missing"):
        run_eval(tmp_path, "--run", str(trained), "--mode", "center", "--scales", "64", "--workers", "3",
                 "--no-ray")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/ray-eval-{os.getpid()}",
                 log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_ray_workers_evaluate_each_image_exactly_once(trained, sample_dataset, tmp_path, ray_cluster):
    local = run_eval(tmp_path, "--run", str(trained), "--mode", "dense", "--scales", "64,96", "--workers", "1",
                     "--no-ray", name="local")
    res = run_eval(tmp_path, "--run", str(trained), "--mode", "dense", "--scales", "64,96", "--workers", "3",
                   name="ray")
    counts = [len(s.keys) for s in res["shares"]]
    assert counts == [10, 11, 11]
    keys = [k for s in res["shares"] for k in s.keys]
    assert sorted(keys) == sorted(stored_labels(sample_dataset, "val"))
    assert res["rows"] == local["rows"]
    assert (tmp_path / "ray" / "results.md").read_text() == (tmp_path / "local" / "results.md").read_text()


def test_an_ensemble_of_a_checkpoint_with_itself_equals_it(trained, tmp_path):
    one = run_eval(tmp_path, "--run", str(trained), "--mode", "both", "--scales", "64", "--no-ray", name="one")
    two = run_eval(tmp_path, "--run", str(trained), "--run", str(trained), "--mode", "both", "--scales", "64",
                   "--no-ray", name="two")
    strip = [{k: v for k, v in r.items() if k != "config"} for r in one["rows"]]
    assert [{k: v for k, v in r.items() if k != "config"} for r in two["rows"]] == strip
    assert two["rows"][0]["config"] == "A (w=0.0625) + A (w=0.0625)"
    for row in one["shares"][0].top:
        torch.testing.assert_close(one["shares"][0].top[row], two["shares"][0].top[row])


def test_demo_model_center_dense_multicrop_both(trained, sample_dataset, tmp_path, capsys):
    """The protocols side by side on the trained tiny model (figures printed; the tiny sample makes
    them noisy, so only relations that must hold are asserted)."""
    res = run_eval(tmp_path, "--run", str(trained), "--mode", "all", "--no-ray", name="all")
    out = capsys.readouterr().out
    rows = {(r["mode"], r["test Q"]): r for r in res["rows"]}
    assert set(rows) == {(m, q) for m in ("center", "dense", "multicrop", "both")
                         for q in ("64", "96", "128", "64,96,128")}   # auto: [Smin, mid, Smax] = 64, 96, 128
    for r in rows.values():
        assert r["images"] == 32 and r["train S"] == "[64;128]"
        assert 0 <= r["top-5 err %"] <= r["top-1 err %"] <= 100
        assert r["top-5 err %"] == 0  # 4 classes: the label is always among the top 5
    # Per-class accuracy, weighted by class size, is 1 - top-1 error.
    counts = torch.bincount(torch.tensor(list(stored_labels(sample_dataset, "val").values())), minlength=4)
    for (mode, q), acc in res["per_class"].items():
        assert (acc * counts).sum().item() / 32 == pytest.approx(1 - rows[(mode, q)]["top-1 err %"] / 100, abs=1e-4)
    # The printed table and the files agree.
    md = (tmp_path / "all" / "results.md").read_text()
    assert md in out and md.count("\n") == 2 + 16
    csv_lines = (tmp_path / "all" / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "config,train S,test Q,mode,top-1 err %,top-5 err %,images" and len(csv_lines) == 17
    import csv

    per_class = list(csv.DictReader((tmp_path / "all" / "per_class.csv").open()))
    assert [r["images"] for r in per_class] == [str(int(n)) for n in counts]
    assert per_class[0]["wnid"] == "n01440764" and len(per_class[0]) == 4 + 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on a free local port (job execution off: no worker processes)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--artifacts-destination",
                             str(root / "artifacts"), "--workers", "1"],
                            stdout=open(root / "log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MLflow server did not start: {(root / 'log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and nothing else
    proc.wait(timeout=30)


def test_mlflow_child_run_of_the_training_run(trained, tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("train-exp")
    # A training run as jobs/train.py leaves it: tagged with its run folder (best/ checkpoint inside).
    parent = client.create_run(exp, run_name="A-tiny", tags={"run_folder": str(trained)}).info.run_id
    from jobs import evaluate as J

    res = J.main(["--run", parent, "--mode", "both", "--scales", "64,96", "--no-ray", "--workers", "2",
                  "--quiet", "--batch-size", "5", "--out", str(tmp_path / "ml2")])
    child = client.get_run(res["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.info.experiment_id == exp and child.info.status == "FINISHED"
    both = [r for r in res["rows"] if r["mode"] == "both" and r["test Q"] == "64,96"][0]
    assert child.data.metrics["both/q64-96/top1_error"] == pytest.approx(both["top-1 err %"] / 100)
    assert child.data.metrics["top1_error"] == pytest.approx(both["top-1 err %"] / 100)
    assert len([k for k in child.data.metrics if k.endswith("top1_error")]) == 1 + 9  # 3 modes x 3 Q-sets
    assert child.data.params["scales"] == "64,96" and child.data.params["images"] == "32"
    arts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"results.csv", "results.md", "per_class.csv", "results_table.json"} <= arts
    import mlflow.artifacts

    got = mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="results.csv",
                                              tracking_uri=mlflow_server)
    assert Path(got).read_text() == (tmp_path / "ml2" / "results.csv").read_text()
    # A run that only holds its checkpoint as an artifact: downloaded, then evaluated.
    other = client.create_run(exp, run_name="artifact-only").info.run_id
    client.log_artifact(other, str(trained / "best" / ckpt.FILENAME), "best")
    member = J.resolve_member(other, mlflow_server)
    assert member.parent_run_id == other and member.checkpoint.endswith(ckpt.FILENAME)


def test_features_job_writes_l2_normalised_penultimate_features(trained, sample_dataset, tmp_path):
    import pyarrow.parquet as pq

    from jobs import features

    paths = [features.main(["--run", str(trained), "--out", str(tmp_path / f"f{w}.parquet"), "--scales", "64,96",
                            "--workers", str(w), "--no-ray", "--quiet", "--batch-size", "5"]) for w in (1, 3)]
    t = pq.read_table(paths[0])
    assert t.schema.field("feature").type.list_size == 4096 // 16
    keys, labels = t.column("key").to_pylist(), t.column("label").to_pylist()
    stored = stored_labels(sample_dataset, "val")
    assert keys == sorted(stored) and labels == [stored[k] for k in keys]
    f = torch.tensor(t.column("feature").combine_chunks().flatten().to_numpy()).reshape(len(keys), -1)
    norms = f.norm(dim=1)
    assert ((norms - 1).abs() < 1e-4).float().mean() > 0.9   # an all-zero FC7 (dead ReLUs) stays zero
    assert (f >= 0).all()                                    # after FC7's ReLU
    assert pq.read_table(paths[1]).equals(t)                 # 3 workers write the same file


def test_eval_benchmark_reports_images_per_second(capsys):
    from jobs.bench import eval as bench

    rows = bench.main(["--model", "A", "--width", "0.0625", "--image-size", "32", "--scale", "48", "--batch", "3",
                       "--classes", "5", "--iters", "1", "--warmup", "0", "--variants", "same,mixed,center"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in printed] == ["same", "mixed", "center"]
    assert [r["shapes"] for r in rows] == [1, 3, 1]
    for r in rows:
        assert r["images_per_s"] > 0 and r["device"].startswith("CPU") and r["bench"] == "eval"


def test_cli_help_names_the_protocols():
    out = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--help"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1]).stdout
    for word in ("--mode", "--scales", "--no-flip", "--workers", "multicrop", "mlflow.parentRunId"):
        assert word in out
