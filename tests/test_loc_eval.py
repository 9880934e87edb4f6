"""``python -m jobs.evaluate --task localisation`` on the sample shards (every image has a box): the
table of both protocols with the baselines, ensembles as the union of boxes, the mean training box,
the MLflow child run, and bad input refused with one line before any worker starts."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import checkpoint as ckpt
from pipeline import config as C

WHOLE_WINDOW = (0.5, 0.5, 1.0, 1.0)   # (cx, cy, w, h) in window units: the whole window


def save(folder, root, head: str, seed: int, bias=None, parent: str = "") -> str:
    """A tiny A (width 1/16, crop 64, S in [64, 128], 4 classes) with ``head``, random weights, saved
    with the real checkpoint writer. ``bias``: FC8 zeroed and its bias set, so every output is it."""
    cfg = C.load(None, [f"data.root={root}", "model.width=0.0625", "model.num_classes=4", "model.init=glorot",
                        "model.dropout=0.0", f"model.head={head}", "data.crop_size=64", "data.scale_min=64",
                        "data.scale_max=128", "data.decode=cpu", "data.threads=1"])
    torch.manual_seed(seed)
    net = ckpt.build_model(cfg, 4)
    if bias is not None:
        torch.nn.init.zeros_(net.classifier[6].weight)
        net.classifier[6].bias.data = torch.tensor(bias)
    state = {"model": net.state_dict(), "config": C.dump(cfg), "num_classes": 4, "mlflow_run_id": parent}
    return ckpt.save_checkpoint(ckpt.weights_only(state), folder / f"{head}-{seed}" / ckpt.FILENAME)


@pytest.fixture(scope="module")
def nets(sample_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loc-nets")
    return {"classes": save(folder, sample_dataset, "classes", 1),
            "whole": save(folder, sample_dataset, "scr", 2, bias=WHOLE_WINDOW),
            "pcr": save(folder, sample_dataset, "pcr", 3)}


def run(tmp_path, name, *args):
    from jobs import evaluate as J

    return J.main(["--task", "localisation", "--out", str(tmp_path / name), "--quiet", "--no-mlflow", "--no-ray",
                   "--batch-size", "5", *args])


def by_row(res):
    return {r["row"]: r for r in res["rows"]}


def test_both_protocols_with_baselines_and_an_ensemble(nets, tmp_path, capsys):
    res = run(tmp_path, "two", "--checkpoint", nets["whole"], "--checkpoint", nets["pcr"],
              "--classifier", nets["classes"], "--scales", "64,96", "--workers", "2")
    out = capsys.readouterr().out
    rows = by_row(res)
    assert list(rows) == ["net1", "net2", "ensemble", "whole image", "mean training box"]
    assert [rows[r]["head"] for r in ("net1", "net2", "ensemble")] == ["SCR", "PCR", "SCR + PCR"]
    for r in rows.values():
        assert r["images"] == 32 and r["test Q"] == "64,96"
        assert 0 <= r["top-5 err % (b)"] <= r["top-1 err % (b)"] <= 100
    # A net that always predicts its whole window is the whole-crop baseline in protocol (a): this
    # holds only if its outputs are mapped through the crop the way the ground truth is.
    assert rows["net1"]["GT-class err % (a)"] == rows["whole image"]["GT-class err % (a)"]
    assert rows["ensemble"]["GT-class err % (a)"] == "-"                 # (a) is defined per net
    md = (tmp_path / "two" / "results.md").read_text()
    assert md in out and md.count("\n") == 2 + 5
    assert (tmp_path / "two" / "results.csv").read_text().splitlines()[0].startswith("config,head,fine-tuned")
    # The same PCR net twice, on one worker: the union of a set of boxes with itself merges each box
    # with its copy (IoU 1, same mean), so the ensemble ranks as the net alone; and one worker gives
    # the figures two did.
    res2 = run(tmp_path, "same", "--checkpoint", nets["pcr"], "--checkpoint", nets["pcr"],
               "--classifier", nets["classes"], "--scales", "64,96", "--workers", "1")
    rows2 = by_row(res2)
    cells = ("GT-class err % (a)", "top-1 err % (b)", "top-5 err % (b)")
    assert [rows2["net1"][c] for c in cells] == [rows["net2"][c] for c in cells]
    assert [rows2["ensemble"][c] for c in cells[1:]] == [rows["net2"][c] for c in cells[1:]]
    for base in ("whole image", "mean training box"):
        assert [rows2[base][c] for c in cells] == [rows[base][c] for c in cells]


def test_protocol_a_alone_needs_no_classifier(nets, tmp_path):
    rows = by_row(run(tmp_path, "a", "--checkpoint", nets["pcr"]))
    assert list(rows) == ["net1", "whole image", "mean training box"]
    for r in rows.values():
        assert r["top-1 err % (b)"] == r["top-5 err % (b)"] == "-"
        assert 0 <= r["GT-class err % (a)"] <= 100 and r["images"] == 32


def write_labels(path, given: dict[str, list[int]]):
    """A labels file as a classification evaluation writes it, with the classes ``given`` per key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = sorted(given)
    pq.write_table(pa.table({"key": keys, "label": [0] * len(keys), "top5": [given[k] for k in keys],
                             "posteriors": [[0.0] * len(given[k]) for k in keys]}), path)
    return str(path)


def test_protocol_b_guesses_the_label_sources_classes_in_its_order(nets, sample_dataset, tmp_path):
    """The paper took protocol (b)'s top-5 classes from its best classification system. A classification
    evaluation leaves each image's top classes (labels.parquet); given as --labels, (b) guesses those
    classes, in that order, each with its best merged box, whatever the boxes' own ranking."""
    from jobs import evaluate as J
    from storage.dataset import stored_labels

    cls = J.main(["--run", nets["classes"], "--mode", "dense", "--scales", "64", "--no-ray", "--no-mlflow",
                  "--quiet", "--batch-size", "5", "--out", str(tmp_path / "cls")])
    top = {k: t.tolist() for s in cls["shares"] for k, t in zip(s.keys, s.top[("dense", "64")])}
    from jobs.passes import labels

    assert {k: v.tolist() for k, v in labels.read(tmp_path / "cls" / labels.FILENAME).items()} == top
    truth = stored_labels(sample_dataset, "val")
    others = {k: [c for c in range(4) if c != truth[k]] for k in truth}
    sources = {"first": {k: [truth[k]] + others[k] for k in truth},           # the true class guessed first
               "second": {k: [others[k][0], truth[k]] + others[k][1:] for k in truth},
               "absent": others}                                             # never the true class
    common = ["--checkpoint", nets["whole"], "--checkpoint", nets["pcr"], "--classifier", nets["classes"],
              "--scales", "64", "--protocol", "b"]
    own = by_row(run(tmp_path, "own", *common))
    got = {name: by_row(run(tmp_path, name, *common, "--labels", write_labels(tmp_path / f"{name}.parquet", given)))
           for name, given in sources.items()}
    from_eval = by_row(run(tmp_path, "eval", *common, "--labels", str(tmp_path / "cls")))
    b1, b5 = "top-1 err % (b)", "top-5 err % (b)"
    assert own["net1"]["labels (b)"] == "classifier boxes" and from_eval["net1"]["labels (b)"] == "eval cls"
    for row in own:
        assert got["absent"][row][b1] == got["absent"][row][b5] == 100       # only the source's classes
        assert got["second"][row][b1] == 100                                 # and its order: top-1 is wrong
        assert got["second"][row][b5] == got["first"][row][b5]              # the same boxes of the true class
        assert got["first"][row][b1] == got["first"][row][b5]               # the true class's one box decides
        # The evaluation's classes are all 4 (top-5 of 4), as the classifier's own: the same best box
        # of each class, so the same top-5 figure; only the order (top-1) may differ.
        assert from_eval[row][b5] == own[row][b5]
    assert own["net1"][b1] < 100           # the boxes' own ranking does hit: "second" is not the nets' order


def test_in_order_guesses_keep_the_given_order_and_each_class_best_box():
    from pipeline.localise import LocProtocol, in_order_guesses

    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.1, 0.2, 0.9, 0.5])
    labels = torch.tensor([1, 1, 2, 0])          # by merged score: class 2 (0.9), 0 (0.5), 1 (0.3)
    lab, box = in_order_guesses(boxes, scores, labels, torch.tensor([1, 3, 2]), LocProtocol(scales=(64,), crop=64))
    assert lab.tolist() == [[1, 3, 2, -1, -1]]
    torch.testing.assert_close(box[0, :3], torch.tensor([[0, 0, 10, 10], [0, 0, 0, 0], [50, 50, 60, 60]],
                                                        dtype=torch.float32))


def test_each_localisation_net_at_its_own_scales(nets, tmp_path):
    """Table 9's fusion: each net at its own Q set ('/' between the sets), the union decoded once."""
    rows = by_row(run(tmp_path, "fusion", "--checkpoint", nets["whole"], "--checkpoint", nets["pcr"],
                      "--classifier", nets["classes"], "--scales", "64/64,96"))
    assert [rows[r]["test Q"] for r in ("net1", "net2", "ensemble")] == ["64", "64,96", "64 / 64,96"]
    alone = by_row(run(tmp_path, "alone", "--checkpoint", nets["pcr"], "--classifier", nets["classes"],
                       "--scales", "64,96"))
    first = by_row(run(tmp_path, "first", "--checkpoint", nets["whole"], "--classifier", nets["classes"],
                       "--scales", "64"))
    cells = ("top-1 err % (b)", "top-5 err % (b)")
    assert [rows["net2"][c] for c in cells] == [alone["net1"][c] for c in cells]   # its own Qs, as alone
    assert [rows["net1"][c] for c in cells] == [first["net1"][c] for c in cells]
    assert rows["net1"]["GT-class err % (a)"] == first["net1"]["GT-class err % (a)"]   # (a) at its first Q


def test_mean_training_box_equals_the_shards_boxes_over_the_jpeg_sizes(sample_dataset):
    """Read another way: every .box member of the train shards with tarfile, over its JPEG's size."""
    from pipeline.localise import mean_training_box

    info = json.loads((sample_dataset / "dataset.json").read_text())
    found = []
    for shard in info["splits"]["train"]["shards"]:
        with tarfile.open(sample_dataset / shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, data in members.items():
            if name.endswith(".box"):
                w, h = Image.open(io.BytesIO(members[name[:-4] + ".jpg"])).size
                found.append(np.frombuffer(data, "<f4").reshape(-1, 4) / [w, h, w, h])
    assert len(found) == 48
    torch.testing.assert_close(mean_training_box(sample_dataset, "train"),
                               torch.tensor(np.concatenate(found).mean(0), dtype=torch.float32))


def test_mlflow_child_run_of_the_localisation_training_run(nets, sample_dataset, tmp_path, shared_mlflow, monkeypatch):
    from mlflow.tracking import MlflowClient

    from jobs import evaluate as J

    client = MlflowClient(shared_mlflow.uri)
    exp = client.create_experiment("loc-eval")
    parent = client.create_run(exp, run_name="loc-train").info.run_id
    loc = save(tmp_path, sample_dataset, "pcr", 3, parent=parent)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_mlflow.uri)
    res = J.main(["--task", "localisation", "--checkpoint", loc, "--classifier", nets["classes"], "--no-ray",
                  "--quiet", "--batch-size", "8", "--out", str(tmp_path / "ml")])
    child = client.get_run(res["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent and child.info.status == "FINISHED"
    rows = by_row(res)
    for row, metric, col in (("net1", "loc/net1/top5_error", "top-5 err % (b)"),
                             ("whole image", "loc/whole_image/gt_class_error", "GT-class err % (a)"),
                             ("mean training box", "loc/mean_training_box/top1_error", "top-1 err % (b)")):
        assert child.data.metrics[metric] == pytest.approx(rows[row][col] / 100)
    assert child.data.metrics["loc_top5_error"] == pytest.approx(rows["net1"]["top-5 err % (b)"] / 100)
    assert child.data.params["task"] == "localisation" and child.data.params["images"] == "32"
    arts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"results.csv", "results.md", "results_table.json"} <= arts


def no_boxes(sample_dataset, tmp_path):
    """A copy of the sample whose dataset.json says no split has boxes."""
    root = tmp_path / "no-boxes"
    shutil.copytree(sample_dataset, root)
    info = json.loads((root / "dataset.json").read_text())
    for split in info["splits"].values():
        split.pop("boxes", None)
    (root / "dataset.json").write_text(json.dumps(info))
    return root


@pytest.mark.parametrize("case, says", [
    ("classifier as loc", "a classification net"),
    ("loc as classifier", "a localisation net"),
    ("b without classifier", "needs --classifier"),
    ("split without boxes", "has no boxes"),
    ("labels not there", "no labels.parquet there"),
    ("labels of other images", "have no labels there"),
    ("labels of another dataset", "is not one of the nets' 4 classes"),
    ("labels with protocol a", "this runs protocol (a) alone"),
])
def test_bad_input_is_one_error_line_before_any_worker(nets, sample_dataset, tmp_path, capsys, monkeypatch,
                                                       case, says):
    from jobs import cli
    from jobs import evaluate as J
    from jobs.passes import front

    def never(*a, **k):
        raise AssertionError("workers started")

    def every(classes):
        from storage.dataset import stored_labels

        return {k: classes for k in stored_labels(sample_dataset, "val")}
    b = ["--checkpoint", nets["pcr"], "--classifier", nets["classes"], "--protocol", "b"]

    monkeypatch.setattr(front, "run_ranks", never)
    argv = {"classifier as loc": ["--checkpoint", nets["classes"]],
            "loc as classifier": ["--checkpoint", nets["pcr"], "--classifier", nets["whole"]],
            "b without classifier": ["--checkpoint", nets["pcr"], "--protocol", "b"],
            "split without boxes": ["--checkpoint", nets["pcr"], "--data", str(no_boxes(sample_dataset, tmp_path))],
            "labels not there": [*b, "--labels", str(tmp_path)],
            "labels of other images": [*b, "--labels", write_labels(tmp_path / "other.parquet", {"x": [0, 1]})],
            "labels of another dataset": [*b, "--labels", write_labels(tmp_path / "seven.parquet", every([0, 7]))],
            "labels with protocol a": ["--checkpoint", nets["pcr"], "--protocol", "a", "--labels",
                                       write_labels(tmp_path / "a.parquet", every([0, 1]))],
            }[case]
    assert cli.run(J.main, ["--task", "localisation", "--workers", "2", "--no-mlflow", "--out",
                             str(tmp_path / "x"), *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]


def test_help_names_the_task_and_its_options(capsys):
    from jobs import evaluate as J

    for parse, words in ((J.parse, ("--task", "localisation")),
                         (J.parse_localisation, ("--checkpoint", "--classifier", "--protocol", "union", "baselines"))):
        with pytest.raises(SystemExit):
            parse(["--help"])
        out = capsys.readouterr().out
        assert all(w in out for w in words), (words, out)
    assert J.task_of(["--run", "x", "--task", "localisation"]) == ("localisation", ["--run", "x"])
    assert J.task_of(["--run", "x"]) == ("classification", ["--run", "x"])
