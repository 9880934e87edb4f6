"""Corrupt shards are never trained on silently: the per-shard (and per-index) sha256 check before first
use (and its per-node cache), every index entry checked against its tar's member headers before DALI
reads it, and the error a DALI decode failure during iteration becomes. Faults are real bytes flipped or
zeroed inside real JPEGs, or real index lines edited, of a copy of the session's sample dataset."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from storage import shard_check
from storage.dataset import DataError, check_shards, open_dataset
from pipeline.loader import EvalLoader, TrainLoader
from pipeline.sharding import read_window, shards_holding
from storage import dataformat as fmt

SHARD = "train-000003.tar"          # the shard every fault goes into


pytestmark = pytest.mark.usefixtures("node_cache")   # each test its own node cache (conftest.py)


@pytest.fixture
def hashes(monkeypatch) -> list[Path]:
    """Every file the check hashes, in order (the real hashing still runs)."""
    seen, real, lock = [], shard_check._sha256_file, threading.Lock()

    def counting(path):
        with lock:
            seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(shard_check, "_sha256_file", counting)
    return seen


def copy_dataset(src: Path, dst: Path, checksums: bool | str = True) -> Path:
    """A copy of ``src`` with the shard and index sha256 preprocessing recorded; without them
    (``checksums=False``), as a dataset written before preprocessing recorded any; ``"shards"``: with
    the shards' only, as one written before index checksums existed."""
    shutil.copytree(src, dst)
    if checksums is not True:
        info = json.loads((dst / "dataset.json").read_text())
        for entry in info["splits"].values():
            del entry[shard_check.INDEXES_SHA256]
            if checksums != "shards":
                del entry[shard_check.SHARDS_SHA256]
        (dst / "dataset.json").write_text(json.dumps(info))
    return dst


def jpeg_of(root: Path, shard: str, sample: int = 1) -> tuple[int, int, str]:
    """(offset, size, key) of the JPEG of the ``sample``-th sample of ``shard``, from its index."""
    idx = (root / shard).with_suffix(".idx")
    components = fmt.parse_index(idx.read_text(), str(idx))[sample]
    return next((o, s, m.split(".")[0]) for e, o, s, m in components if e == "jpg")


def damage(root: Path, shard: str, how: str) -> str:
    """Flip 16 bytes in the middle of a JPEG's entropy-coded data, or zero its first 64 bytes (the
    SOI marker and headers); returns the damaged sample's key. The file's size stays the same."""
    offset, size, key = jpeg_of(root, shard)
    path = root / shard
    data = bytearray(path.read_bytes())
    if how == "flip":
        start = offset + size // 2
        data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
    else:
        data[offset:offset + 64] = bytes(64)
    with open(path, "r+b") as f:                      # in place, as a bad disk or a stray write would
        f.write(data)
    return key


def test_an_untouched_dataset_passes_and_the_second_check_reads_the_cache(sample_dataset, tmp_path, hashes,
                                                                          node_cache):
    root = copy_dataset(sample_dataset, tmp_path / "data")
    entry = fmt.read_info(root)["splits"]["train"]
    shards = entry["shards"]
    indexes = [n.replace(".tar", ".idx") for n in shards]
    assert entry[shard_check.SHARDS_SHA256] == [hashlib.sha256((root / n).read_bytes()).hexdigest() for n in shards]
    digest = [hashlib.sha256((root / i).read_bytes()).hexdigest() for i in indexes]
    assert entry[shard_check.INDEXES_SHA256] == digest
    check_shards(root, "train")
    assert sorted(p.name for p in hashes) == sorted(shards + indexes)
    assert node_cache.is_file()
    check_shards(root, "train")
    assert len(hashes) == 2 * len(shards)              # nothing hashed again
    check_shards(root, "val")                          # another split: its own shards and indexes, once
    assert len(hashes) == 2 * len(shards) + 2 * len(fmt.read_info(root)["splits"]["val"]["shards"])


@pytest.mark.parametrize("how", ["flip", "zero"])
def test_a_damaged_jpeg_is_refused_before_use_naming_the_shard(sample_dataset, data_config, tmp_path, how):
    root = copy_dataset(sample_dataset, tmp_path / "data")
    recorded = fmt.read_info(root)["splits"]["train"][shard_check.SHARDS_SHA256][3]
    damage(root, SHARD, how)
    actual = hashlib.sha256((root / SHARD).read_bytes()).hexdigest()
    with pytest.raises(DataError) as err:
        check_shards(root, "train")
    message = str(err.value)
    assert str(root.resolve() / SHARD) in message and "\n" not in message
    assert actual[:12] in message and recorded[:12] in message
    assert f"python -m jobs.preprocess verify {root.resolve()}" in message
    assert "train-000002.tar" not in message           # only the damaged shard is named
    with pytest.raises(DataError, match=SHARD):        # the loaders check before DALI reads anything
        TrainLoader(data_config(root), 8, 0, 1)
    check_shards(root, "val")                          # the other split is untouched


def test_flipped_bytes_decode_silently_so_only_the_checksum_catches_them(sample_dataset, data_config, tmp_path):
    """Why the check exists: DALI decodes a JPEG with flipped entropy-coded bytes without a word."""
    root = copy_dataset(sample_dataset, tmp_path / "data")
    key = damage(root, SHARD, "flip")
    seen = [k for b in TrainLoader(data_config(root), 8, 0, 1, check=False) for k in b.keys]
    assert key in seen


def test_a_changed_file_is_hashed_again(sample_dataset, tmp_path, hashes):
    root = copy_dataset(sample_dataset, tmp_path / "data")
    check_shards(root, "train")
    before = len(hashes)
    path = root / SHARD
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # new mtime, same bytes
    check_shards(root, "train")
    assert [p.name for p in hashes[before:]] == [SHARD]
    # damaged, then its size and mtime put back (as cp -p or rsync -a would): the ctime still changes
    damage(root, SHARD, "flip")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    with pytest.raises(DataError, match=SHARD):
        check_shards(root, "train")


def test_processes_of_a_node_hash_each_shard_once_between_them(sample_dataset, tmp_path, hashes):
    """Concurrent checks (the workers of one node) take turns on the cache's lock: the later ones
    find the hashes of the first instead of reading the shards again."""
    root = copy_dataset(sample_dataset, tmp_path / "data")
    errors = []

    def check():
        try:
            check_shards(root, "train")
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(hashes) == 2 * len(fmt.read_info(root)["splits"]["train"]["shards"])   # each tar and .idx once


def test_a_broken_cache_file_is_rebuilt(sample_dataset, tmp_path, hashes, node_cache):
    root = copy_dataset(sample_dataset, tmp_path / "data")
    node_cache.parent.mkdir(parents=True)
    node_cache.write_text("{not json")
    check_shards(root, "train")
    assert hashes and json.loads(node_cache.read_text())["format"] == shard_check.CACHE_FORMAT


def test_a_dataset_without_checksums_is_read_with_one_warning(sample_dataset, tmp_path, hashes, caplog):
    root = copy_dataset(sample_dataset, tmp_path / "data", checksums=False)
    with caplog.at_level(logging.WARNING, logger="storage.shard_check"):
        check_shards(root, "train")
        check_shards(root, "train")
    warnings = [r.getMessage() for r in caplog.records if "unchecked" in r.getMessage()]
    assert len(warnings) == 1 and str(root.resolve() / "dataset.json") in warnings[0]
    assert shard_check.SHARDS_SHA256 in warnings[0] and shard_check.INDEXES_SHA256 in warnings[0]
    assert not hashes


def test_a_malformed_checksum_list_names_dataset_json(sample_dataset, tmp_path):
    root = copy_dataset(sample_dataset, tmp_path / "data")
    info = json.loads((root / "dataset.json").read_text())
    info["splits"]["train"][shard_check.SHARDS_SHA256].pop()
    (root / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=rf"dataset.json: split 'train': {shard_check.SHARDS_SHA256} must list"):
        check_shards(root, "train")


def test_a_decode_failure_during_training_names_the_shard_and_key(sample_dataset, data_config, tmp_path):
    """No checksums recorded: DALI meets the zeroed header itself, mid-epoch."""
    root = copy_dataset(sample_dataset, tmp_path / "data", checksums=False)
    key = damage(root, SHARD, "zero")
    loader = TrainLoader(data_config(root), 8, 0, 1)
    with pytest.raises(DataError) as err:
        for _ in loader:
            pass
    message = str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)          # DALI's own error, kept as the cause
    assert f"{SHARD}: {key}" in message and "nvImageCodec" in message and "\n" not in message
    assert "jobs.preprocess verify" in message


def test_a_decode_failure_during_evaluation_names_the_shard(sample_dataset, data_config, tmp_path):
    root = copy_dataset(sample_dataset, tmp_path / "data", checksums=False)
    shard = "val-000002.tar"
    key = damage(root, shard, "zero")
    with pytest.raises(DataError, match=rf"{shard}: {key}.*jobs.preprocess verify"):
        for _ in EvalLoader(data_config(root), 4, 0, 1):
            pass


def test_the_reader_window_covers_what_dali_may_be_reading():
    # 3 ranks over 30 samples: ranges [0, 10), [10, 20), [20, 30)
    assert read_window(30, 3, 1, 2, ahead=4, behind=100) == [(10, 14)]
    assert read_window(30, 3, 1, 2, ahead=8, behind=3) == [(15, 18)]
    assert read_window(30, 3, 2, 3, ahead=13, behind=5) == [(28, 30), (0, 3)]   # into the next epoch's
    assert read_window(30, 3, 2, 2, ahead=13, behind=20) == [(20, 30), (20, 23)]  # eval: its own again
    assert shards_holding([7, 7, 7], [(6, 8)]) == [0, 1]
    assert shards_holding([7, 7, 7], [(14, 15), (0, 1)]) == [0, 2]
    assert shards_holding([7, 7, 7], [(7, 14)]) == [1]


def test_the_loader_bench_times_the_check_side_by_side(tmp_path):
    from jobs.bench import loader

    out = tmp_path / "loader.json"
    loader.main(["--work", str(tmp_path / "work"), "--device", "cpu", "--threads", "1", "--batch-size", "4",
                 "--steps", "2", "--warmup", "1", "--rounds", "2", "--checksum", "--skip-baseline",
                 "--classes", "2", "--per-class", "8", "--size", "48,64", "--crop", "32", "--scale-min", "32",
                 "--scale-max", "48", "--out", str(out)])
    plain, checked, r = json.loads(out.read_text())
    assert (plain["pipeline"], checked["pipeline"], r["pipeline"]) == ("dali", "dali+checksum", "ratio")
    assert plain["images_per_s"] > 0 and checked["images_per_s"] > 0
    assert checked["check_cold_s"] > 0 and checked["check_warm_s"] >= 0 and checked["shard_bytes"] > 0
    assert r["checksum_over_plain"] == pytest.approx(checked["images_per_s"] / plain["images_per_s"])
    assert r["cold_check_over_epoch"] == pytest.approx(checked["check_cold_s"] / plain["epoch_s"])


# ---- the indexes: checksummed, and each entry checked against its tar before DALI reads it -------------

VAL = "val-000000.tar"                # the shard whose index every index fault goes into


def edit_index(root: Path, shard: str, edit) -> list[list[str]]:
    """``edit(lines)`` the index of ``shard`` as lines of space-separated fields (its header line first)
    in place, and write it back; returns the lines as written."""
    idx = (root / shard).with_suffix(".idx")
    lines = [line.split(" ") for line in idx.read_text().splitlines()]
    edit(lines)
    idx.write_text("".join(" ".join(f) + "\n" for f in lines))
    return lines


def jpg(line: list[str], field: int, change) -> str:
    """Change the jpg component's offset (``field`` 1) or size (2) on an index line's fields to
    ``change(old)``; returns the old value."""
    i = line.index("jpg") + field
    old, line[i] = line[i], str(change(line[i]))
    return old


def swap_jpeg_offsets(root: Path, shard: str) -> str:
    """Swap the jpg offsets of the samples on index lines 3 and 4 (the tar untouched); returns the
    key of line 3, whose jpg now points at line 4's image."""
    def swap(lines):
        offset = jpg(lines[3], 1, lambda _: lines[2][lines[2].index("jpg") + 1])   # line 4's jpg at line 3's,
        jpg(lines[2], 1, lambda _: offset)                                          # line 3's at line 4's
    return edit_index(root, shard, swap)[2][3].split(".")[0]


def test_swapped_jpeg_offsets_are_refused_naming_the_shard_key_and_line(sample_dataset, data_config, tmp_path):
    root = copy_dataset(sample_dataset, tmp_path / "data")
    key = swap_jpeg_offsets(root, VAL)
    with pytest.raises(DataError) as err:
        open_dataset(root).split("val")
    message = str(err.value)
    assert message.startswith(f"{root.resolve() / VAL}: key {key}: ") and "\n" not in message
    assert f"{VAL[:-4]}.idx line 3 puts {key}.jpg at byte" in message and "preprocess verify" in message
    with pytest.raises(DataError, match=f"{VAL}: key {key}"):      # not cached as good: refused again,
        EvalLoader(data_config(root), 4, 0, 1, check=False)         # with or without the sha256 check
    open_dataset(root).split("train")                                # the other split is untouched


def test_train_dry_run_refuses_a_swapped_index_in_one_error_line(sample_dataset, tmp_path, monkeypatch, capsys):
    from jobs import cli, cluster, train as J
    from tiny import tiny_sets

    root = copy_dataset(sample_dataset, tmp_path / "data")
    key = swap_jpeg_offsets(root, VAL)
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    sets = tiny_sets(root, **{"model.num_classes": 0, "run.workers": 2, "run.global_batch_size": 16,
                              "run.storage_path": tmp_path / "runs", "run.name": "pre", "schedule.epochs": 2,
                              "tracking.enabled": "false"})
    code = cli.run(J.main, [a for k, v in sets.items() for a in ("--set", f"{k}={v}")] + ["--dry-run"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert f"{VAL}: key {key}" in err[0]


READ_VAL = """
import sys
from jobs import cli
from pipeline.config import DataConfig
from pipeline.loader import EvalLoader
cfg = DataConfig(root=sys.argv[1], crop_size=64, scale_min=64, scale_max=128, decode="cpu", threads=1, prefetch=1)
sys.exit(cli.run(lambda argv: [len(b.keys) for b in EvalLoader(cfg, 4, 0, 1)], sys.argv[1:]))
"""


def test_an_8_gib_size_is_an_error_naming_shard_and_key_never_a_crash(sample_dataset, tmp_path):
    """DALI reads such an entry and dies of SIGSEGV; the check refuses it first, even in a dataset
    without checksums, where nothing else would."""
    root = copy_dataset(sample_dataset, tmp_path / "data", checksums=False)
    key = edit_index(root, VAL, lambda lines: jpg(lines[2], 2, lambda _: 8 << 30))[2][3].split(".")[0]
    proc = subprocess.run([sys.executable, "-c", READ_VAL, str(root)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, f"exit status {proc.returncode} (negative: a signal)\n{proc.stderr[-2000:]}"
    assert len(err) == 1 and f"{VAL}: key {key}" in err[0] and f"({8 << 30} bytes)" in err[0], proc.stderr[-2000:]
    assert "past the tar's end" in err[0]


def test_an_edited_index_is_named_by_its_line_or_caught_by_its_checksum(sample_dataset, tmp_path):
    root = copy_dataset(sample_dataset, tmp_path / "data")
    idx = (root / VAL).with_suffix(".idx")
    recorded, original = fmt.read_info(root)["splits"]["val"][shard_check.INDEXES_SHA256][0], idx.read_text()
    key = original.splitlines()[3].split(" ")[3].split(".")[0]                 # the sample of line 4

    def jpg_left_out(lines):
        del lines[3][lines[3].index("jpg"):lines[3].index("jpg") + 4]

    edits = [(lambda lines: jpg(lines[3], 2, lambda size: int(size) - 1), "the member header"),
             (jpg_left_out, "skips, moves or repeats"),
             (lambda lines: lines.insert(2, lines.pop(3)), "skips, moves or repeats")]        # lines 3, 4 swapped
    for edit, why in edits:                       # each named with the shard, the key, the line and why
        idx.write_text(original)
        edit_index(root, VAL, edit)
        with pytest.raises(DataError, match=rf"{VAL}: key {key}: .*{idx.name} line [34] .*{why}"):
            open_dataset(root).split("val", check=False)
    # a number written with a leading zero: the same entries, other bytes; only the checksum sees it
    idx.write_text(original)
    edit_index(root, VAL, lambda lines: jpg(lines[3], 1, lambda offset: "0" + offset))
    open_dataset(root).split("val", check=False)
    with pytest.raises(DataError) as err:
        open_dataset(root).split("val")
    message = str(err.value)
    assert message.startswith(f"{idx.resolve()}: sha256 ") and f"dataset.json records {recorded[:12]}" in message
    assert "changed since preprocessing" in message and "rebuilt from it when deleted" in message
    # deleted, it is rebuilt from its shard: byte for byte what preprocessing wrote
    idx.unlink()
    open_dataset(root).split("val")
    assert hashlib.sha256(idx.read_bytes()).hexdigest() == recorded


def test_a_dataset_without_index_checksums_is_read_with_one_warning(sample_dataset, tmp_path, hashes, caplog):
    root = copy_dataset(sample_dataset, tmp_path / "data", checksums="shards")
    with caplog.at_level(logging.WARNING, logger="storage.shard_check"):
        open_dataset(root).split("train")
        open_dataset(root).split("train")
    warnings = [r.getMessage() for r in caplog.records if "unchecked" in r.getMessage()]
    assert len(warnings) == 1 and str(root.resolve() / "dataset.json") in warnings[0]
    assert shard_check.INDEXES_SHA256 in warnings[0] and shard_check.SHARDS_SHA256 not in warnings[0]
    assert sorted(p.name for p in hashes) == sorted(fmt.read_info(root)["splits"]["train"]["shards"])  # tars only


def test_the_second_start_of_a_node_reads_no_tar_header(sample_dataset, tmp_path, monkeypatch):
    root = copy_dataset(sample_dataset, tmp_path / "data")
    reads, real = [], os.pread                 # the check's threads share the list: append is atomic
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: reads.append(n) or real(fd, n, offset))
    names = fmt.read_info(root)["splits"]["val"]["shards"]
    members = sum(len(s) for n in names for s in fmt.read_index((root / n).with_suffix(".idx")))
    open_dataset(root).split("val", check=False)
    assert len(reads) == members and set(reads) == {fmt.TAR_BLOCK}   # one header block per member
    open_dataset(root).split("val", check=False)                      # another loader start on the node
    assert len(reads) == members
    idx = (root / VAL).with_suffix(".idx")
    os.utime(idx, ns=(idx.stat().st_atime_ns, idx.stat().st_mtime_ns + 1_000_000_000))  # new stamp, same bytes
    open_dataset(root).split("val", check=False)
    assert len(reads) == members + sum(len(s) for s in fmt.read_index(idx))   # that index alone again


def test_the_index_reader_names_the_line_of_a_member_that_is_not_its_samples():
    good = ["cls 512 3 a.cls jpg 1536 9 a.jpg", "cls 3072 3 b.cls jpg 4096 9 b.jpg"]
    assert [[c[3] for c in s] for s in fmt.parse_index(fmt.index_text(good))] == [["a.cls", "a.jpg"],
                                                                                  ["b.cls", "b.jpg"]]
    for lines, why in [([good[0], good[1].replace("b.jpg", "a.jpg")], "line 3: members b.cls a.jpg are not"),
                       ([good[0], good[1].replace("jpg 4096", "png 4096")], "line 3: members .* extensions cls png"),
                       ([good[0], good[0]], "line 3: key a is also the sample of line 2"),
                       ([good[0], good[1].replace("3 b.cls", "x b.cls")], "line 3: 'cls 3072 x b.cls")]:
        with pytest.raises(DataError, match=f"x.idx {why}"):
            fmt.parse_index(fmt.index_text(lines), "x.idx")
