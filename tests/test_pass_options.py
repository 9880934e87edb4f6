"""The sharded passes' options and inputs checked in the driver, before any worker starts: test scales
in range, no more workers than images, an MLflow run id that exists, the split's shards readable, a
multi-label file that is UTF-8 and names the stored images, and ``jobs.submit --address`` a URL. Each
mistake is one ``error:`` line and exit status 2."""
from __future__ import annotations

import shutil

import pytest

from jobs import cli
from test_loc_eval import save


@pytest.fixture(scope="module")
def nets(sample_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("option-nets")
    return {"classes": save(folder, sample_dataset, "classes", 1), "pcr": save(folder, sample_dataset, "pcr", 3)}


@pytest.fixture
def no_workers(monkeypatch):
    from jobs.passes import front

    def never(*a, **k):
        raise AssertionError("workers started")
    monkeypatch.setattr(front, "run_ranks", never)


def damaged(sample_dataset, tmp_path):
    """A copy of the sample with one byte of a val shard flipped."""
    root = tmp_path / "damaged"
    shutil.copytree(sample_dataset, root)
    shard = sorted(root.glob("val-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    return root


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("case, says", [
    ("huge scale", "every Q must be in [64, 1024]"),
    ("no scale", "auto, single or comma-separated integers"),
    ("a set per net, too few", "2 Q sets for 1 nets"),
    ("more workers than images", "--workers 33: more than the 32 stored images"),
    ("damaged shard", "changed since preprocessing"),
    ("damaged shard, localisation", "changed since preprocessing"),
])
def test_evaluation_mistakes_are_one_line_before_any_worker(case, says, nets, sample_dataset, tmp_path, no_workers,
                                                            capsys):
    from jobs import evaluate

    data = str(damaged(sample_dataset, tmp_path)) if "damaged" in case else ""
    argv = {"huge scale": ["--run", nets["classes"], "--scales", "40000"],
            "no scale": ["--run", nets["classes"], "--scales=--"],
            "a set per net, too few": ["--run", nets["classes"], "--scales", "64/96"],
            "more workers than images": ["--run", nets["classes"], "--workers", "33"],
            "damaged shard": ["--run", nets["classes"], "--data", data],
            "damaged shard, localisation": ["--task", "localisation", "--checkpoint", nets["pcr"], "--data", data],
            }[case]
    assert cli.run(evaluate.main, [*argv, "--no-ray", "--no-mlflow", "--out", str(tmp_path / "out")]) == 2
    assert says in one_error_line(capsys)


def test_a_run_id_the_server_does_not_know_is_one_line(shared_mlflow, tmp_path, no_workers, capsys):
    from jobs import evaluate

    argv = ["--run", "0123456789abcdef0123456789abcdef", "--tracking-uri", shared_mlflow.uri, "--no-ray",
            "--out", str(tmp_path / "out")]
    assert cli.run(evaluate.main, argv) == 2
    assert "MLflow run 0123456789abcdef0123456789abcdef: not found at" in one_error_line(capsys)


@pytest.mark.parametrize("case, says", [
    ("not utf-8", "labels.csv:3: not UTF-8 text (byte 0xff"),
    ("unknown keys", "2 key(s) are no stored image"),
    ("a stored image without labels", "no labels for"),
])
def test_a_bad_multi_label_file_is_refused_before_any_feature_pass(case, says, nets, sample_dataset, tmp_path,
                                                                  no_workers, capsys):
    from jobs import transfer
    from storage.dataset import stored_labels

    keys = sorted(k for s in ("train", "val") for k in stored_labels(sample_dataset, s))
    rows = [f"{k},disc round" for k in keys]
    body = {"not utf-8": "\n".join(rows[:1]) + "\n" + rows[1].replace("disc", "d\udcffsc"),
            "unknown keys": "\n".join(rows + ["ghost1,disc", "ghost2,ring"]),
            "a stored image without labels": "\n".join(rows[1:])}[case]
    (tmp_path / "labels.csv").write_bytes(("key,labels\n" + body + "\n").encode("utf-8", "surrogateescape"))
    argv = ["--run", nets["classes"], "--out", str(tmp_path / "t"), "--labels", str(tmp_path / "labels.csv"),
            "--train-split", "train", "--split", "val", "--no-ray", "--quiet"]
    assert cli.run(transfer.main, argv) == 2
    assert says in one_error_line(capsys)


@pytest.mark.parametrize("address", ["not a url", "ftp://head:8265", "http://head:port"])
def test_submit_refuses_an_address_that_is_no_url(address, capsys):
    from jobs import submit

    assert cli.run(submit.main, ["--address", address, "train", "--config", "jobs/configs/demo.yaml"]) == 2
    assert f"--address {address!r}: not the cluster's Jobs API URL" in one_error_line(capsys)


def test_images_without_labels_are_allowed_and_counted_aloud(sample_dataset, tmp_path, caplog):
    """The multi-label format allows an image with no label (a negative for every class): never
    silently, the count is logged."""
    from jobs.passes.transfer import read_labels
    from storage.dataset import open_dataset, stored_labels

    keys = sorted(stored_labels(sample_dataset, "val"))
    rows = [f"{k}," if i < 3 else f"{k},disc" for i, k in enumerate(keys)]
    (tmp_path / "labels.csv").write_text("key,labels\n" + "\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        names, labels = read_labels(str(tmp_path / "labels.csv"), open_dataset(sample_dataset), ["val"])
    assert names == ["disc"] and [labels[k] for k in keys[:3]] == [[], [], []]
    assert any(f"3 of {len(keys)} images have no label" in r.getMessage() for r in caplog.records)
