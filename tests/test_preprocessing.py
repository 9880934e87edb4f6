"""preprocessing/: the per-image check, deterministic shards, options, errors, the CLI and Ray mode.

One small ILSVRC-shaped sample with every oddity is built once per session (tests/odd_sample.py, fixtures
in conftest.py); tests that break or extend it work on copies. Reruns, resume and verify are in
test_preprocessing_rerun.py, source layouts in test_preprocessing_sources.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from odd_sample import SHARD, build, image_files, shard_samples, snapshot
from preprocessing import report, synthetic
from preprocessing.check import check_image, jpeg_structure
from preprocessing.verify import verify
from storage.dataformat import DataError, parse_index, read_info, read_manifest


# ---- the synthetic sample -------------------------------------------------------------------------------

def test_synthetic_sample_is_ilsvrc_shaped_and_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", classes=3, train_per_class=2, val_per_class=2, oddities=True,
                           seed=5, size_range=(64, 96))
    b = synthetic.generate(tmp_path / "b", classes=3, train_per_class=2, val_per_class=2, oddities=True,
                           seed=5, size_range=(64, 96), workers=2)
    files_a = {p.relative_to(a): p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()}
    files_b = {p.relative_to(b): p.read_bytes() for p in sorted(b.rglob("*")) if p.is_file()}
    assert files_a == files_b  # same seed, any number of workers: same bytes
    c = synthetic.generate(tmp_path / "c", classes=3, train_per_class=2, val_per_class=2, seed=6,
                           size_range=(64, 96))
    assert (c / "val" / "ILSVRC2012_val_00000001.JPEG").read_bytes() != \
        (a / "val" / "ILSVRC2012_val_00000001.JPEG").read_bytes()
    real = dict(synthetic.synsets())
    wnids = sorted(p.name for p in (a / "train").iterdir())
    assert wnids == sorted(real)[:3]
    assert (a / "LOC_synset_mapping.txt").read_text().splitlines()[0] == f"{wnids[0]} {real[wnids[0]]}"
    lines = (a / "LOC_val_solution.csv").read_text().splitlines()
    assert lines[0] == "ImageId,PredictionString"
    assert {line.split(",")[0] for line in lines[1:]} == {p.stem for p in (a / "val").iterdir()}
    assert all(line.split(",")[1].split()[0] in wnids for line in lines[1:])
    with Image.open(a / "train" / wnids[1] / f"{wnids[1]}_1.JPEG") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and 64 <= min(im.size) <= max(im.size) <= 96


def test_synthetic_default_sizes_are_realistic(tmp_path):
    root = synthetic.generate(tmp_path, classes=2, train_per_class=3, val_per_class=0)
    for p in (root / "train").rglob("*.JPEG"):
        with Image.open(p) as im:
            assert 300 <= min(im.size) and max(im.size) <= 640
        assert 15_000 < p.stat().st_size < 400_000  # ImageNet-like JPEG sizes


# ---- accounting and per-image outcomes -----------------------------------------------------------------

def test_every_input_is_accounted_for(built, odd_source, odd_manifest):
    out, summary, _ = built
    info = read_info(out)
    for split in ("train", "val"):
        rows = odd_manifest[split]
        files = image_files(odd_source, split)
        assert {r["source"] for r in rows} == files and len(rows) == len(files)
        stored = [r for r in rows if r["status"] != "quarantined"]
        quarantined = [r for r in rows if r["status"] == "quarantined"]
        assert len(stored) + len(quarantined) == len(files)
        assert info["splits"][split]["num_samples"] == len(stored) == summary[split]["stored"]
        assert info["splits"][split]["counts"]["quarantined"] == len(quarantined)
        assert len(shard_samples(out, split)) == len(stored)
    assert summary["train"]["quarantined"] == 4 and summary["val"]["quarantined"] == 1


def test_oddities_get_their_expected_outcome(built, odd_source, odd_manifest):
    oddities = json.loads((odd_source / "oddities.json").read_text())
    rows = {r["source"]: r for split in odd_manifest.values() for r in split}
    skipped = {o["source"]: o for o in pq.read_table(report.skipped_path(built[0])).to_pylist()}
    for rel, odd in oddities.items():
        if odd["expect"] == "skipped":
            assert rel not in rows and skipped[rel]["status"] == "skipped", odd
            assert ("hidden" if odd["kind"] == "hidden_image" else "not an image") in skipped[rel]["reason"]
            continue
        row = rows[rel]
        assert row["status"] == odd["expect"], (odd["kind"], row)
        if odd["expect"] != "kept":
            assert row["reason"], odd["kind"]
        if odd["expect"] == "quarantined":
            assert row["shard"] is None and row["sha256"] is None and row["bytes"] == 0
    by_kind = {o["kind"]: rows[rel] for rel, o in oddities.items() if rel in rows and rel.startswith("train/")}
    assert "CMYK" in by_kind["cmyk_jpeg"]["reason"] and "PNG" in by_kind["png_named_jpeg"]["reason"]
    assert "truncated" in by_kind["truncated_jpeg"]["reason"]
    assert "EXIF orientation 6" in by_kind["exif_rotated_jpeg"]["reason"]


def test_stored_images_are_baseline_rgb_jpegs(built, odd_source, odd_manifest):
    out = built[0]
    for split in ("train", "val"):
        rows = {r["key"]: r for r in odd_manifest[split]}
        for s in shard_samples(out, split):
            row = rows[s["key"]]
            jpg = s["jpg"]
            assert hashlib.sha256(jpg).hexdigest() == row["sha256"] and len(jpg) == row["bytes"]
            if row["status"] == "kept":  # original bytes untouched
                assert jpg == (odd_source / row["source"]).read_bytes()
            else:
                with Image.open(io.BytesIO(jpg)) as im:
                    im.load()
                    assert im.format == "JPEG" and im.mode == "RGB", row
                    assert im.size == (row["width"], row["height"])
                info = jpeg_structure(jpg)
                assert info.sof == 0xC0 and info.orientation in (None, 1), row


def test_quarantined_never_reach_a_shard(built, odd_manifest):
    out = built[0]
    for split, rows in odd_manifest.items():
        in_shards = [s["key"] for s in shard_samples(out, split)]
        quarantined = {r["key"] for r in rows if r["status"] == "quarantined"}
        assert quarantined and not quarantined & set(in_shards)
        assert in_shards == [r["key"] for r in rows if r["status"] != "quarantined"]  # manifest = shard order


def test_check_image_outcomes_directly():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8))
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=90)
    good = buf.getvalue()
    assert check_image(good).status == "kept" and check_image(good).data is good
    assert check_image(good, max_side=30).status == "resized"
    assert max(Image.open(io.BytesIO(check_image(good, max_side=30).data)).size) == 30
    assert check_image(b"").status == "quarantined"
    assert check_image(good[:-200]).status == "quarantined"
    assert check_image(b"GIF89a" + b"\0" * 20).status == "quarantined"
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    c = check_image(buf.getvalue())
    assert c.status == "converted" and jpeg_structure(c.data).orientation == 1
    assert len(c.data) == len(buf.getvalue())  # the tag is rewritten in place: pixels untouched
    assert sum(a != b for a, b in zip(c.data, buf.getvalue())) == 1


# ---- the shards ----------------------------------------------------------------------------------------

def test_shards_are_deterministic_ustar_with_valid_indexes(built):
    out = built[0]
    info = read_info(out)
    for split in ("train", "val"):
        for shard in info["splits"][split]["shards"]:
            with tarfile.open(out / shard) as tf:
                members = tf.getmembers()
            assert 0 < len(members) <= 5 * SHARD  # box, cls, jpg, key, lbl
            for m in members:
                assert m.isreg() and m.mtime == 0 and m.uid == m.gid == 0 and m.mode == 0o644
            raw = (out / shard).read_bytes()
            assert raw[257:263] == b"ustar\x00" and len(raw) % 10240 == 0
            index = parse_index((out / shard).with_suffix(".idx").read_text())
            listed = [c for sample in index for c in sample]
            assert len(listed) == len(members)
            for (ext, offset, size, name), m in zip(listed, members):
                assert (offset, size, name) == (m.offset_data, m.size, m.name)
    if shutil.which("tar"):  # DALI's own wds2idx agrees byte for byte
        from wds2idx import IndexCreator
        shard = out / info["splits"]["train"]["shards"][0]
        ref = out.parent / "ref.idx"
        with IndexCreator(str(shard), str(ref), verbose=False) as ic:
            ic.create_index()
        assert ref.read_text() == shard.with_suffix(".idx").read_text()


def test_samples_are_shuffled_globally_with_the_seed(built, odd_source, odd_manifest, tmp_path):
    out = built[0]
    info = read_info(out)
    assert info["seed"] == 0 and len(info["splits"]["train"]["shards"]) == 7  # ceil(52 / 8)
    labels = [r["label"] for r in odd_manifest["train"] if r["status"] != "quarantined"]
    assert len(set(labels[:SHARD])) >= 2  # the first shard mixes classes
    assert labels != sorted(labels)
    _, _ = build(odd_source, tmp_path / "seed1", seed=1, splits=["val"])
    other = [r["key"] for r in read_manifest(tmp_path / "seed1", "val").to_pylist()]
    assert sorted(other) == sorted(r["key"] for r in odd_manifest["val"])
    assert other != [r["key"] for r in odd_manifest["val"]]


def test_webdataset_reads_shards_with_manifest_labels(built, odd_manifest):
    import webdataset as wds

    out = built[0]
    info = read_info(out)
    for split in ("train", "val"):
        rows = {r["key"]: r for r in odd_manifest[split]}
        urls = [str(out / s) for s in info["splits"][split]["shards"]]
        n = 0
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            row = rows[sample["__key__"]]
            assert int(sample["cls"]) == row["label"]
            assert struct.unpack("<i", sample["lbl"])[0] == row["label"]
            assert sample["key"].decode() == row["key"]
            assert hashlib.sha256(sample["jpg"]).hexdigest() == row["sha256"]
            n += 1
        assert n == info["splits"][split]["num_samples"]


def test_dali_reads_shards_on_cpu_with_manifest_labels(built, odd_manifest):
    from nvidia.dali import fn, pipeline_def, types

    out = built[0]
    info = read_info(out)
    for split in ("train", "val"):
        shards = [str(out / s) for s in info["splits"][split]["shards"]]

        @pipeline_def(batch_size=8, num_threads=1, device_id=None)
        def pipe():
            jpg, lbl, key = fn.readers.webdataset(
                paths=shards, index_paths=[s[:-4] + ".idx" for s in shards], ext=["jpg", "lbl", "key"],
                dtypes=[types.UINT8, types.INT32, types.UINT8], missing_component_behavior="error",
                name="reader")
            return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl, key

        p = pipe()
        p.build()
        total = p.epoch_size("reader")
        assert total == info["splits"][split]["num_samples"]
        rows = {r["key"]: r for r in odd_manifest[split]}
        seen = set()
        while len(seen) < total:
            images, labels, keys = p.run()
            for i in range(len(labels)):
                key = bytes(np.array(keys[i])).decode()
                if key in seen:
                    continue  # the reader pads the last batch
                seen.add(key)
                row = rows[key]
                assert int(np.array(labels[i])[0]) == row["label"]
                # EXIF orientation is neutralised: DALI (which honours it) and PIL see the same shape.
                assert np.array(images[i]).shape == (row["height"], row["width"], 3), row
        assert seen == {k for k, r in rows.items() if r["status"] != "quarantined"}


def test_dataset_json_and_colour_statistics(built, odd_manifest):
    out = built[0]
    info = read_info(out)
    assert [c["wnid"] for c in info["classes"]] == sorted(c["wnid"] for c in info["classes"])
    assert info["classes"][0] == {"index": 0, "wnid": "n01440764", "name": "tench, Tinca tinca", "run": 0}
    st = info["stats"]
    val, vec = np.array(st["rgb_eigval"]), np.array(st["rgb_eigvec"])
    assert np.all(np.diff(val) <= 0) and np.all(val > 0)
    np.testing.assert_allclose(vec @ vec.T, np.eye(3), atol=1e-9)
    # Independently: full decode of every stored train JPEG, 8x8 box means, per-image moments averaged.
    means, seconds = [], []
    for s in shard_samples(out, "train"):
        with Image.open(io.BytesIO(s["jpg"])) as im:
            x = np.asarray(im.convert("RGB").reduce(8), np.float64).reshape(-1, 3)
        means.append(x.mean(0))
        seconds.append(x.T @ x / len(x))
    mean = np.mean(means, 0)
    cov = np.mean(seconds, 0) - np.outer(mean, mean)
    np.testing.assert_allclose(st["mean_rgb"], mean, atol=1.0)
    ours = vec.T @ np.diag(val) @ vec
    assert np.abs(ours - cov).max() < 0.05 * np.abs(cov).max()


# ---- options, errors, the CLI and Ray --------------------------------------------------------------

def test_clear_errors_for_conflicting_options_and_foreign_folders(built, odd_source, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built[0], out)
    with pytest.raises(DataError, match=r"built with other options .*state.json.*: --seed 1 \(OUT has 0\)"):
        build(odd_source, out, seed=1)
    with pytest.raises(DataError, match=r"--shard-size 16 \(OUT has 8\), --max-side 500 \(OUT has None\)"):
        build(odd_source, out, shard_size=16, max_side=500)
    other = synthetic.generate(tmp_path / "other", classes=2, train_per_class=1, val_per_class=0,
                               size_range=(32, 48))
    for p in sorted((other / "train").rglob("*.JPEG")):
        p.rename(p.with_name("other_" + p.name))  # no file in common with what OUT was built from
    with pytest.raises(DataError, match=r"holds none of the 52 files .*is it the same dataset"):
        build(other, out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "dataset.json").write_text("{}")
    with pytest.raises(DataError, match="not written by this tool"):
        build(odd_source, foreign)
    assert not (foreign / ".preprocess.lock").exists()  # the refused run let go of its lock
    with pytest.raises(DataError, match="--shard-size"):
        build(odd_source, tmp_path / "x", shard_size="12 parsecs")


def test_max_side_resizes_and_records_it(tmp_path):
    root = synthetic.generate(tmp_path / "s", classes=2, train_per_class=3, val_per_class=1, oddities=True,
                              size_range=(96, 160))
    summary, _ = build(root, tmp_path / "out", max_side=150)
    rows = [r for s in ("train", "val") for r in read_manifest(tmp_path / "out", s).to_pylist()]
    big = [r for r in rows if r["source"].endswith("_900008.JPEG")][0]  # the 2000+ px oddity
    assert big["status"] == "resized" and max(big["width"], big["height"]) == 150 and "resized" in big["reason"]
    assert all(max(r["width"], r["height"]) <= 150 for r in rows if r["status"] != "quarantined")
    assert summary["train"]["resized"] >= 1
    assert verify(tmp_path / "out") == []


def test_cli_runs_end_to_end_and_reports_per_split(odd_source, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "jobs.preprocess", str(odd_source), str(out), "--workers", "1",
                        "--shard-size", "16", "--split", "val", "--no-progress"],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert "val: 18 inputs -> 17 stored" in r.stdout and "1 quarantined" in r.stdout
    assert f"all of them: python -m jobs.preprocess report {out}" in r.stdout
    assert "quarantined  val/ILSVRC2012_val_00000017.JPEG: undecodable: OSError: image file is truncated" in r.stdout
    assert "not in a split folder of this run (val)" in r.stdout  # train/ was not asked for
    r = subprocess.run([sys.executable, "-m", "jobs.preprocess", str(odd_source), str(out), "--workers", "1",
                        "--shard-size", "17", "--split", "val", "--no-progress"],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and "--shard-size 17 (OUT has 16)" in r.stderr
    assert os.path.exists(out / "val-000000.idx")


def test_ray_tasks_write_the_same_bytes(built, odd_source, tmp_path):
    import ray
    from jobs.preprocess import ray_map

    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False)
    try:
        build(odd_source, tmp_path / "out", map_fn=ray_map(None))  # one Ray task per shard
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert snapshot(tmp_path / "out") == snapshot(built[0])
