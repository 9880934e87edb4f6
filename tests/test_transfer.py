"""Appendix B: the SVM's metrics against scikit-learn's, the multi-label file, Caltech's per-class
splits, and ``python -m jobs.transfer`` end to end on the sample shards (multi-label and single-label)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline import config as C
from pipeline import transfer as T
from storage.dataset import stored_labels
from storage.dataformat import DataError


# --------------------------------------------------------------------------------- metrics, no data

def test_average_precision_is_sklearns_with_and_without_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for trial in range(50):
        y = rng.integers(0, 2, 30)
        y[trial % 30] = 1
        s = rng.integers(0, 4, 30).astype(float) if trial % 2 else rng.normal(size=30)  # many ties / none
        assert T.average_precision(y, s, "raw") == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert T.average_precision([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], "raw") == 1.0
    # ranked: neg, neg, pos (precision 1/3), pos (2/4)
    assert T.average_precision([1, 0, 0, 1], [0.1, 0.9, 0.8, 0.7], "raw") == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert np.isnan(T.average_precision([0, 0], [0.3, 0.1], "raw"))
    m, ap = T.mean_average_precision(np.array([[1, 0], [0, 0]]), np.array([[0.9, 0.1], [0.2, 0.5]]), "raw")
    assert m == 1.0 and np.isnan(ap[1])                   # a class with no positive test image is left out


def test_ap_flavours_on_a_hand_worked_ranking():
    """5 images, no ties, ranked by score: pos, neg, neg, pos, pos (3 positives).
    rank  1    2    3    4    5
    TP    1    1    1    2    3
    P     1    1/2  1/3  2/4  3/5       precision = TP / rank
    R     1/3  1/3  1/3  2/3  1         recall = TP / 3
    raw:   recall steps at ranks 1, 4, 5: 1/3 (1 + 1/2 + 3/5) = 2.1 / 3 = 7/10
    voc12: the precision made monotone (max over this rank and below): 1, 3/5, 3/5 at those steps
           (rank 4's 1/2 is lifted to rank 5's 3/5): 1/3 (1 + 3/5 + 3/5) = 2.2 / 3 = 11/15
    voc07: t = 0, 0.1, 0.2, 0.3: some R >= t at rank 1, max P = 1;
           t = 0.4, 0.5, 0.6: ranks 4, 5 (R = 2/3, 1), max P = 3/5; t = 0.7 ... 1: rank 5, 3/5;
           (4 x 1 + 7 x 3/5) / 11 = 8.2 / 11 = 41/55"""
    y, s = [1, 0, 0, 1, 1], [0.9, 0.8, 0.7, 0.6, 0.5]
    got = {f: T.average_precision(y, s, f) for f in T.FLAVOURS}
    assert got == pytest.approx({"raw": 7 / 10, "voc12": 11 / 15, "voc07": 41 / 55}, abs=1e-12)
    with pytest.raises(ValueError, match="unknown AP flavour 'voc10'; known: voc07, voc12, raw"):
        T.average_precision(y, s, "voc10")


def test_ap_flavours_with_tied_scores_do_not_depend_on_the_input_order():
    """Scores a 0.9 (pos), b 0.7 (neg), c 0.7 (pos), d 0.2 (pos), e 0.1 (neg): b and c tie and enter
    as one threshold step.
    threshold  0.9  0.7  0.2  0.1
    TP         1    2    3    3
    seen       1    3    4    5
    P          1    2/3  3/4  3/5
    R          1/3  2/3  1    1
    raw:   1/3 (1 + 2/3 + 3/4) = 29/36
    voc12: monotone P at the recall steps: 1, max(2/3, 3/4, 3/5) = 3/4, 3/4: 1/3 (1 + 3/4 + 3/4) = 5/6
    voc07: t = 0 ... 0.3: 1; t = 0.4 ... 1: max P with R >= t = 3/4: (4 x 1 + 7 x 3/4) / 11 = 37/44
    (The devkits sort item by item: with c ranked before b, voc12 would be 1/3 (1 + 1 + 3/4) = 11/12,
    with b before c 5/6 -- an order the caller never chose.)"""
    y, s = np.array([1, 0, 1, 1, 0]), np.array([0.9, 0.7, 0.7, 0.2, 0.1])
    want = {"raw": 29 / 36, "voc12": 5 / 6, "voc07": 37 / 44}
    for order in ([0, 1, 2, 3, 4], [0, 2, 1, 3, 4], [4, 3, 2, 1, 0]):
        assert {f: T.average_precision(y[order], s[order], f) for f in T.FLAVOURS} == pytest.approx(want, abs=1e-12)


def test_voc07_counts_a_recall_of_exactly_a_threshold():
    """10 positives ranked: 3 pos, 3 neg, 7 pos. Rank 3: R = 3/10 = 0.3, P = 1; ranks 7 ... 13: TP = 4
    ... 10, P = TP / (TP + 3), largest at the end, 10/13. t = 0 ... 0.3: 1 (rank 3 reaches t = 0.3
    exactly); t = 0.4 ... 1: 10/13. (4 + 7 x 10/13) / 11 = 122/143. The devkit's float
    arange(0, 1.1, 0.1) has t = 0.30000000000000004 > 0.3 and would give (3 + 8 x 10/13) / 11 = 119/143."""
    y = [1] * 3 + [0] * 3 + [1] * 7
    assert T.average_precision(y, np.arange(13, 0, -1), "voc07") == pytest.approx(122 / 143, abs=1e-12)


def test_a_class_with_no_positive_is_nan_left_out_and_named(caplog):
    """Column 1 has no positive test image: AP NaN in every flavour, the mAP is column 0's alone
    (ranked pos, neg: AP 1 in every flavour), and the warning names it."""
    y = np.array([[1, 0], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.5]])
    for f in T.FLAVOURS:
        assert np.isnan(T.average_precision(y[:, 1], scores[:, 1], f))
        m, ap = T.mean_average_precision(y, scores, f)
        assert m == 1.0 and ap[0] == 1.0 and np.isnan(ap[1])
    with caplog.at_level("WARNING", logger="pipeline.transfer"):
        assert T.warn_no_positive(y, ["dog", "cat"], "test", "repeat 0: ") == ["cat"]
        assert T.warn_no_positive(np.array([[1, 1]]), ["dog", "cat"], "training") == []
    assert [r.getMessage() for r in caplog.records] == [
        "repeat 0: 1 class(es) with no positive test image: cat (AP NaN: left out of the mean)"]


def test_a_class_never_positive_in_training_is_named_by_the_repeat(caplog):
    """The pass warns before scoring: 'cat' has no positive training image (a constant SVM score, so
    chance AP, kept in the mAP) and 'cow' no positive test image (left out)."""
    from jobs.passes import transfer as P

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4))
    y_train = np.array([[1, 0, 1]] * 3 + [[0, 0, 0]] * 5)
    y_test = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]])
    got = {"a": (list("abcdefgh"), None, x[:8]), "b": (list("ijkl"), None, x[8:])}
    req = P.Request(train_split="a", split="b", labels="labels.csv", aggregate="mean", svm_c=1.0, ap="voc07",
                    train_per_class=0, test_per_class=0, repeats=1, seed=0, batch_size=1, out=Path("unused"))
    with caplog.at_level("WARNING", logger="pipeline.transfer"):
        entry, _ = P._repeat(0, ("a", np.arange(8)), ("b", np.arange(4)), ["dog", "cat", "cow"],
                             {"a": y_train, "b": y_test}, got, req)
    text = caplog.text
    assert "no positive training image: cat (" in text and "no positive test image: cow (" in text
    assert np.isnan(entry["per_class_ap"]["cow"]) and entry["per_class_ap"]["cat"] == pytest.approx(0.5)  # 2 of 4
    assert entry["svm_c"] == 1.0 and "svm_c_held_out" not in entry


def test_held_out_split_is_stratified_and_c_is_chosen_from_the_grid():
    labels = np.repeat([0, 1, 2], [10, 5, 1])
    fit, held = T.held_out_split(T.one_hot(labels, 3), True, 0.2, np.random.default_rng(0))
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]     # 20 % per class, a lone image kept
    assert sorted([*fit, *held]) == list(range(16))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5))
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0.5], axis=1).astype(np.int8)
    c, got = T.choose_c(x, y, "mAP", "voc07", np.random.default_rng(2))
    assert c in T.C_GRID and list(got) == list(T.C_GRID) and got[c] == max(got.values())
    with pytest.raises(DataError, match="too few"):
        T.held_out_split(y[:2], False, 0.2, np.random.default_rng(0))


def test_mean_class_recall_weighs_every_class_the_same():
    scores = np.array([[3, 0, 0], [3, 0, 0], [3, 0, 0], [0, 3, 0], [3, 0, 0]], dtype=float)
    labels = [0, 0, 0, 1, 1]                              # class 0: 3/3 right, class 1: 1/2, class 2: none
    m, recall = T.mean_class_recall(labels, scores)
    assert m == pytest.approx((1 + 0.5) / 2) and recall[:2].tolist() == [1.0, 0.5] and np.isnan(recall[2])


def test_linear_svms_one_vs_rest_separate_separable_labels():
    """Two overlapping labels, each a half-space of the descriptors: one-vs-rest SVMs rank every
    test image right (AP 1 for both), and a label given at random is not learnt."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = np.stack([x[:, 0] > 0.3, x[:, 1] < -0.2, rng.integers(0, 2, 200)], axis=1).astype(np.int8)
    scores = T.fit_scores(x[:120], y[:120], x[120:], c=10.0)
    assert scores.shape == (80, 3)
    m, ap = T.mean_average_precision(y[120:], scores, "raw")
    assert ap[0] > 0.98 and ap[1] > 0.98
    assert ap[2] < 0.8                                     # chance is the positive rate, about 0.5


def test_multi_label_file_and_its_mistakes(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("key,labels\na,dog person\nb,\nc,person\n")
    names, labels = T.read_sidecar(f)
    assert names == ["dog", "person"] and labels == {"a": ["dog", "person"], "b": [], "c": ["person"]}
    assert T.label_matrix(["c", "a", "b"], names, labels).tolist() == [[0, 1], [1, 1], [0, 0]]
    with pytest.raises(DataError, match=r"no labels for 1 stored image\(s\), e.g. \['z'\]"):
        T.label_matrix(["a", "z"], names, labels, str(f))
    f.write_text("key,labels\na,dog\na,cat\n")
    with pytest.raises(DataError, match="labels.csv:3: key 'a' given twice"):
        T.read_sidecar(f)
    f.write_text("image,classes\na,dog\n")
    with pytest.raises(DataError, match="header 'key,labels'"):
        T.read_sidecar(f)


def test_caltech_splits_per_class():
    labels = np.repeat([0, 1, 2], [10, 6, 8])
    train, test = T.per_class_split(labels, 4, 3, np.random.default_rng(0))
    assert np.bincount(labels[train]).tolist() == [4, 4, 4] and np.bincount(labels[test]).tolist() == [3, 2, 3]  # "up to" 3
    assert not set(train) & set(test)
    _, rest = T.per_class_split(labels, 4, 0, np.random.default_rng(1))
    assert np.bincount(labels[rest]).tolist() == [6, 2, 4]                 # 0: every image not trained on
    other, _ = T.per_class_split(labels, 4, 0, np.random.default_rng(2))
    assert sorted(other) != sorted(train)                                  # repeats draw other images
    with pytest.raises(DataError, match="class 1 has 6 images"):
        T.per_class_split(labels, 6, 0, np.random.default_rng(0))


# --------------------------------------------------------------------------------- the job, on shards

def net(folder: Path, root, seed: int) -> str:
    """A tiny random-weight checkpoint (A, width 1/32, crop 32) whose config points at ``root``."""
    cfg = C.load(None, [f"data.root={root}", "model.width=0.03125", "model.num_classes=4", "model.init=glorot",
                        "data.crop_size=32", "data.scale_min=32", "data.scale_max=64", "data.decode=cpu",
                        "data.threads=1"])
    torch.manual_seed(seed)
    state = {"model": ckpt.build_model(cfg, 4).state_dict(), "config": C.dump(cfg), "num_classes": 4}
    return ckpt.save_checkpoint(ckpt.weights_only(state), folder / str(seed) / ckpt.FILENAME)


def test_transfer_on_a_multi_label_sample_gives_sklearns_map(sample_dataset, tmp_path):
    from sklearn.metrics import average_precision_score

    from jobs.passes import features
    from jobs import transfer

    labels_file = tmp_path / "labels.csv"
    assert transfer.main(["sample-labels", str(sample_dataset), str(labels_file)]) == 0
    rows = list(csv.DictReader(labels_file.open()))
    val = stored_labels(sample_dataset, "val")
    assert len(rows) == 48 + 32 and all(len(r["labels"].split()) == 2 for r in rows)   # kind + family
    res = transfer.main(["--run", net(tmp_path, sample_dataset, 1), "--out", str(tmp_path / "t"),
                         "--labels", str(labels_file), "--train-split", "train", "--split", "val",
                         "--scales", "32,48", "--aggregate", "stack", "--no-ray", "--quiet", "--batch-size", "8",
                         "--ap", "raw"])
    assert res["metric"] == "mAP" and res["classes"] == ["angular", "disc", "ring", "round", "square", "triangle"]
    # The descriptor: FC7 (4096 / 32 = 128-D) at 2 scales stacked, L2-normalised, every val image once.
    keys, _, feats = features.read_parquet(tmp_path / "t" / "features-val.parquet")
    assert keys == sorted(val) and feats.shape == (32, 2 * 128)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(32))
    # mAP by hand: sklearn's AP of each label over the written test scores, averaged.
    scores = list(csv.DictReader((tmp_path / "t" / "scores-0.csv").open()))
    assert [s["key"] for s in scores] == sorted(val)
    truth = {r["key"]: set(r["labels"].split()) for r in rows}
    aps = [average_precision_score([name in truth[s["key"]] for s in scores], [float(s[name]) for s in scores])
           for name in res["classes"]]
    assert res["mean"] == pytest.approx(float(np.mean(aps)), abs=1e-9)
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved["repeats"][0]["mAP"] == pytest.approx(float(np.mean(aps)), abs=1e-9)
    assert saved["repeats"][0]["test_images"] == 32 and saved["repeats"][0]["train_images"] == 48
    assert saved["ap"] == "raw" and saved["svm_c"] == 1.0 and saved["repeats"][0]["svm_c"] == 1.0
    assert "mAP (raw) %" in (tmp_path / "t" / "results.md").read_text()


def test_transfer_caltech_style_random_splits_of_one_split(sample_dataset, tmp_path, capsys):
    from jobs import cli
    from jobs import transfer
    from jobs.cli import UsageError

    ckpt_path = net(tmp_path, sample_dataset, 2)
    argv = ["--run", ckpt_path, "--out", str(tmp_path / "c"), "--train-split", "val", "--split", "val",
            "--scales", "32", "--no-ray", "--quiet", "--batch-size", "8"]
    with pytest.raises(UsageError, match="--train-per-class"):     # one split, no way to split it: a mistake
        transfer.main(argv)
    assert cli.run(transfer.main, argv) == 2 and capsys.readouterr().err.count("\n") == 1
    split = ["--train-per-class", "5", "--test-per-class", "2", "--repeats", "2"]
    with pytest.raises(UsageError, match="--svm-c must be a number > 0 or 'auto', got 0.0"):
        transfer.main(argv + split + ["--svm-c", "0"])
    for bad in (["--svm-c", "best"], ["--ap", "voc10"]):                  # argparse's own refusals
        with pytest.raises(SystemExit):
            transfer.main(argv + split + bad)
    capsys.readouterr()
    res = transfer.main(argv + split + ["--svm-c", "auto"])
    assert res["metric"] == "mean_class_recall" and len(res["repeats"]) == 2
    # --svm-c auto: per repeat a C of the grid, the best held-out mean class recall, printed and recorded.
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    printed = capsys.readouterr().out
    assert saved["svm_c"] == "auto" and saved["ap"] == "voc07"          # the default flavour, named
    for r in saved["repeats"]:
        assert r["svm_c"] in T.C_GRID and list(r["svm_c_held_out"]) == [f"{c:g}" for c in T.C_GRID]
        assert r["svm_c_held_out"][f"{r['svm_c']:g}"] == max(r["svm_c_held_out"].values())
        assert f"repeat {r['repeat']}: --svm-c auto chose C = {r['svm_c']:g} (mean_class_recall" in printed
    for r, path in zip(res["repeats"], res["scores"]):
        assert (r["train_images"], r["test_images"]) == (4 * 5, 4 * 2)
        scores = list(csv.DictReader(open(path)))
        val = stored_labels(sample_dataset, "val")
        right = {c: [] for c in range(4)}
        for s in scores:                                     # mean class recall by hand from the scores
            right[val[s["key"]]].append(max(range(4), key=lambda c: float(s[res["classes"][c]])) == val[s["key"]])
        assert r["mean_class_recall"] == pytest.approx(np.mean([np.mean(v) for v in right.values()]))
    keys = [[s["key"] for s in csv.DictReader(open(p))] for p in res["scores"]]
    assert keys[0] != keys[1]                                # two different random splits
    assert res["mean"] == pytest.approx(np.mean([r["mean_class_recall"] for r in res["repeats"]]))
