"""Corrupt shards are never trained on silently: the per-shard sha256 check before first use (and its
per-node cache), and the error a DALI decode failure during iteration becomes. Faults are real bytes
flipped or zeroed inside real JPEGs of a copy of the session's sample dataset."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from storage import shard_check
from storage.dataset import DataError, check_shards
from pipeline.loader import EvalLoader, TrainLoader
from pipeline.sharding import read_window, shards_holding
from storage import dataformat as fmt

SHARD = "train-000003.tar"          # the shard every fault goes into


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own node cache, never the user's."""
    path = tmp_path / "cache" / "shards.json"
    monkeypatch.setenv(shard_check.CACHE_ENV, str(path))
    return path


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


def copy_dataset(src: Path, dst: Path, checksums: bool = True) -> Path:
    """A copy of ``src`` with the shard sha256 preprocessing recorded, or (``checksums=False``)
    without them, as a dataset written before preprocessing recorded them."""
    shutil.copytree(src, dst)
    if not checksums:
        info = json.loads((dst / "dataset.json").read_text())
        for entry in info["splits"].values():
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
    assert entry[shard_check.SHARDS_SHA256] == [hashlib.sha256((root / n).read_bytes()).hexdigest() for n in shards]
    check_shards(root, "train")
    assert sorted(p.name for p in hashes) == sorted(shards)
    assert node_cache.is_file()
    check_shards(root, "train")
    assert len(hashes) == len(shards)                  # nothing hashed again
    check_shards(root, "val")                          # another split: its own shards, once
    assert len(hashes) == len(shards) + len(fmt.read_info(root)["splits"]["val"]["shards"])


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
    assert len(hashes) == len(fmt.read_info(root)["splits"]["train"]["shards"])


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
