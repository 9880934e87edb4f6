"""preprocessing/ run again: after a kill, on an unchanged source, with more workers, with new files;
and ``verify`` on sound and broken datasets. All on copies of the session's sample (conftest.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from odd_sample import SIZES, Killed, build, crash_after, mtimes, snapshot
from preprocessing import synthetic
from preprocessing.manifest import box_counts, counts
from storage.dataformat import SHARDS_SHA256, parse_index, read_manifest
from preprocessing.verify import verify




def test_killed_after_two_shards_then_rerun_gives_identical_bytes(built, odd_source, tmp_path):
    ref = built[0]
    out = tmp_path / "out"
    with pytest.raises(Killed):
        build(odd_source, out, map_fn=crash_after(2))
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not (out / "dataset.json").exists() and not (out / "train" / "manifest.parquet").exists()
    done = mtimes(out)
    # What a kill in the middle of the third shard leaves: a temp file, and (from a non-atomic copy, say)
    # junk under the final name that no part file vouches for.
    (out / ".tmp-train-000002.tar.12345.deadbeef").write_bytes(b"half a shard")
    (out / "train-000002.tar").write_bytes(b"junk")
    _, log = build(odd_source, out)
    assert snapshot(out) == snapshot(ref)
    assert {k: v for k, v in mtimes(out).items() if k in done} == done  # finished shards not rewritten
    assert not list(out.glob(".tmp-*")) and "temp file" in log


def test_rerun_on_unchanged_source_does_nothing(built, odd_source, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built[0], out)  # copy2: mtimes kept
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    summary, log = build(odd_source, out)
    assert "nothing to do" in log
    assert summary["train"]["shards_written"] == summary["val"]["shards_written"] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_workers_do_not_change_the_bytes(built, odd_source, tmp_path):
    build(odd_source, tmp_path / "w2", workers=2)
    assert snapshot(tmp_path / "w2") == snapshot(built[0])


def test_new_source_files_go_into_new_shards_only(built, odd_source, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(odd_source, src)
    shutil.copytree(built[0], out)
    before, old_tars = snapshot(out), mtimes(out)
    extra = synthetic.generate(tmp_path / "extra", classes=4, train_per_class=5, val_per_class=0, seed=9,
                               size_range=SIZES)
    new = []
    for p in sorted((extra / "train").rglob("*.JPEG")):
        dest = src / "train" / p.parent.name / f"{p.parent.name}_{70000 + len(new)}.JPEG"
        shutil.copy(p, dest)
        new.append(dest.relative_to(src).as_posix())
    assert len(new) == 20
    gone = sorted((src / "train").rglob("*_1.JPEG"))[0]
    gone.unlink()
    touched = sorted((src / "train").rglob("*_2.JPEG"))[0]
    touched.write_bytes(touched.read_bytes() + b"\0")
    summary, log = build(src, out)
    assert summary["train"]["added"] == 20 and summary["val"]["added"] == 0
    assert summary["train"]["removed"] == 1 and summary["train"]["changed"] == 1
    assert "added 20 images in 3 shards (train-000007..train-000009)" in log
    assert gone.name in log and touched.name in log
    after = snapshot(out)
    for name, data in before.items():
        if name.endswith((".tar", ".idx")):
            assert after[name] == data, name  # existing shards untouched, byte for byte
    assert {k: v for k, v in mtimes(out).items() if k in old_tars} == old_tars
    rows = read_manifest(out, "train").to_pylist()
    new_rows = [r for r in rows if r["source"] in new]
    assert len(rows) == 52 + 20 and len(new_rows) == 20
    assert {r["shard"] for r in new_rows} == {"train-000007.tar", "train-000008.tar", "train-000009.tar"}
    assert gone.relative_to(src).as_posix() in {r["source"] for r in rows}  # reported, left in its shard
    assert verify(out) == []
    _, log = build(src, out)  # now nothing is new: nothing to do, the removal and change still reported
    assert "nothing to do" in log and "added" not in log and "changed" in log and "gone" in log
    assert snapshot(out) == after


# ---- verify --------------------------------------------------------------------------------------------

def test_verify_passes_a_sound_dataset_and_says_what_it_checked(built):
    assert verify(built[0]) == []
    r = subprocess.run([sys.executable, "-m", "jobs.preprocess", "verify", str(built[0]), "--workers", "2"],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    splits = json.loads((built[0] / "dataset.json").read_text())["splits"]
    shards, images = sum(len(s["shards"]) for s in splits.values()), sum(s["num_samples"] for s in splits.values())
    assert r.returncode == 0 and f"ok: {shards} shards holding {images} images (train, val)" in r.stdout
    assert "full JPEG decode" in r.stdout and f"{images}/{images}" in r.stderr     # the progress bar's end


def test_verify_catches_a_truncated_shard(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built[0], out)
    shard = out / "train-000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    problems = verify(out)
    assert problems and problems[0].shard == "train-000003.tar"
    keys = [r["key"] for r in read_manifest(out, "train").to_pylist() if r["shard"] == "train-000003.tar"]
    assert problems[0].key in keys and "truncated" in problems[0].message
    r = subprocess.run([sys.executable, "-m", "jobs.preprocess", "verify", str(out), "--workers", "1"],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 1 and "train-000003.tar" in r.stderr and problems[0].key in r.stderr


@pytest.mark.parametrize("where", ["jpeg", "header"])
def test_verify_catches_a_flipped_byte(built, tmp_path, where):
    out = tmp_path / "out"
    shutil.copytree(built[0], out)
    shard = out / "train-000001.tar"
    sample = parse_index(shard.with_suffix(".idx").read_text())[2]
    key = sample[0][3].split(".")[0]
    _, offset, size, _ = next(c for c in sample if c[0] == "jpg")  # after the .box member, when there is one
    at = offset + size // 2 if where == "jpeg" else offset - 512 + 3  # inside its name in the header
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify(out)
    assert problems and problems[0].shard == "train-000001.tar" and problems[0].key == key
    assert ("sha256" if where == "jpeg" else "header") in problems[0].message



def test_verify_checks_each_shards_sha256_and_reads_datasets_without_it(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built[0], out)
    info = json.loads((out / "dataset.json").read_text())
    for s in info["splits"].values():
        assert s[SHARDS_SHA256] == [hashlib.sha256((out / shard).read_bytes()).hexdigest() for shard in s["shards"]]
    # A dataset written before the field existed still verifies.
    without = json.loads(json.dumps(info))
    for s in without["splits"].values():
        del s[SHARDS_SHA256]
    (out / "dataset.json").write_text(json.dumps(without))
    assert verify(out) == []
    # A flipped byte in the zero padding after a .cls member: no sample or header check reads it.
    (out / "dataset.json").write_text(json.dumps(info))
    shard = out / "val-000001.tar"
    _, offset, size, _ = parse_index(shard.with_suffix(".idx").read_text())[0][0]  # the first .cls member
    data = bytearray(shard.read_bytes())
    data[offset + size + 5] = 1
    shard.write_bytes(bytes(data))
    problems = verify(out, decode=False)
    assert [(p.shard, p.key) for p in problems] == [("val-000001.tar", "")]
    assert "sha256 of the shard" in problems[0].message and SHARDS_SHA256 in problems[0].message


def test_verify_names_manifest_level_problems_in_row_order(built, tmp_path):
    """The manifest's own checks (counts, box counts, repeated keys, misplaced rows) come first, in
    row order, whatever the number of workers."""
    out = tmp_path / "out"
    shutil.copytree(built[0], out)
    path = out / "train" / "manifest.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    stored = [i for i, r in enumerate(rows) if r["status"] != "quarantined"]
    quarantined = [i for i, r in enumerate(rows) if r["status"] == "quarantined"]
    assert len(stored) > 5 and quarantined and box_counts(rows) is not None  # the sample has all three
    dup, stray, named = stored[4], stored[2], quarantined[0]
    left = rows[stray]["shard"]
    rows[dup]["key"] = rows[stored[0]]["key"]
    rows[stray]["shard"] = "train-999999.tar"
    rows[named]["shard"] = "train-000000.tar"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    info = json.loads((out / "dataset.json").read_text())
    s = info["splits"]["train"]
    s["counts"]["kept"] += 1
    s["boxes"]["boxes"] += 1
    (out / "dataset.json").write_text(json.dumps(info))

    expected = [("", "", f"manifest counts {counts(rows)} ({len(rows)} rows) differ from dataset.json {s['counts']}"),
                ("", "", f"manifest box counts {box_counts(rows)} differ from dataset.json {s['boxes']}")]
    by_row = {dup: (rows[dup]["shard"], rows[dup]["key"], "key appears twice in the manifest"),
              stray: ("train-999999.tar", rows[stray]["key"], "stored row names a shard not in dataset.json"),
              named: ("train-000000.tar", rows[named]["key"], "quarantined row names a shard")}
    expected += [by_row[i] for i in sorted(by_row)]
    problems = verify(out, decode=False)
    assert [(p.shard, p.key, p.message) for p in problems[:len(expected)]] == expected
    assert all(p.split == "train" for p in problems[:len(expected)])
    # the shards the moved rows left or joined no longer match their indexes
    assert {p.shard for p in problems[len(expected):]} >= {left, "train-000000.tar"}
    assert verify(out, workers=2, decode=False) == problems
