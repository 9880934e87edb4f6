"""The manifest check of a split (its shards all listed in dataset.json, its stored rows the recorded
``num_samples``) reads the manifest once per node: a later loader start finds the sound verdict cached,
and a rewritten manifest or a changed dataset.json is read, and refused, again. Faults are real edits
of a copy of the session's sample dataset."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import dataformat as fmt
from storage.dataset import DataError, open_dataset

SPLIT = "train"


pytestmark = pytest.mark.usefixtures("node_cache")   # each test its own node cache (conftest.py)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The split of each manifest read (the real read still runs)."""
    seen, real = [], fmt.read_manifest

    def counting(root, split, *args, **kwargs):
        seen.append(split)
        return real(root, split, *args, **kwargs)

    monkeypatch.setattr(fmt, "read_manifest", counting)
    return seen


@pytest.fixture
def root(sample_dataset, tmp_path) -> Path:
    return Path(shutil.copytree(sample_dataset, tmp_path / "data"))


def start(root: Path):
    """What a loader start does: the dataset opened afresh and the split resolved."""
    return open_dataset(root).split(SPLIT, check=False)


def edit_info(root: Path, edit) -> None:
    info = json.loads(fmt.info_path(root).read_text())
    edit(info["splits"][SPLIT])
    fmt.info_path(root).write_text(json.dumps(info))


def rewrite_manifest(root: Path, edit) -> None:
    """The manifest written again with ``edit(rows)`` applied (a new file: new stamp)."""
    path = fmt.manifest_path(root, SPLIT)
    table = pq.read_table(path)
    rows = table.to_pylist()
    edit(rows)
    path.unlink()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def test_a_second_start_does_not_read_the_manifest(root, reads):
    first = start(root)
    assert reads == [SPLIT]
    second = start(root)
    assert reads == [SPLIT]                       # the verdict came from the node's cache
    assert second == first


def test_an_explicit_shard_cache_keeps_the_verdict_beside_it(root, reads, tmp_path):
    from storage.dataset import resolve_split

    ds, elsewhere = open_dataset(root), tmp_path / "elsewhere" / "hashes.json"
    resolve_split(ds.root, ds.info, SPLIT, cache=elsewhere)
    resolve_split(ds.root, ds.info, SPLIT, cache=elsewhere)
    assert reads == [SPLIT]
    assert list(elsewhere.parent.glob("hashes-manifest-check.json"))
    start(root)                                   # the default cache is another node's: read again
    assert reads == [SPLIT, SPLIT]


def test_a_touched_manifest_is_read_again(root, reads):
    start(root)
    path = fmt.manifest_path(root, SPLIT)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    start(root)
    assert reads == [SPLIT, SPLIT]
    start(root)
    assert reads == [SPLIT, SPLIT]                # and its new verdict cached


def test_a_rewritten_manifest_naming_an_unlisted_shard_is_refused_every_time(root, reads):
    start(root)

    def move_to_unlisted(rows):
        stored = next(r for r in rows if r["shard"])
        stored["shard"] = "train-999999.tar"

    rewrite_manifest(root, move_to_unlisted)
    for _ in range(2):                            # a bad verdict is never cached
        with pytest.raises(DataError, match="train-999999.tar which dataset.json does not list"):
            start(root)
    assert reads == [SPLIT, SPLIT, SPLIT]


def test_a_dataset_json_counting_fewer_inputs_is_caught_with_the_verdict_cached(root, reads):
    start(root)
    edit_info(root, lambda entry: entry.update(inputs=entry["inputs"] - 1))
    with pytest.raises(DataError, match="records num_samples"):
        start(root)
    assert reads == [SPLIT, SPLIT]


def test_a_damaged_num_samples_is_caught_with_the_verdict_cached(root, reads):
    start(root)
    edit_info(root, lambda entry: entry.update(num_samples=entry["num_samples"] + 1))
    with pytest.raises(DataError, match="manifest.parquet: .* records num_samples"):
        start(root)


def test_a_missing_shard_the_manifest_names_is_caught_on_a_warm_start(root, reads):
    start(root)
    shard = sorted(root.glob(f"{SPLIT}-*.tar"))[-1]
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard.name}: shard named in .*manifest.parquet is missing on disk"):
        start(root)
    assert reads == [SPLIT]                       # found by stat, not by reading the manifest


def test_a_missing_manifest_is_named(root):
    fmt.manifest_path(root, SPLIT).unlink()
    with pytest.raises(DataError, match=f"manifest of split '{SPLIT}' not found"):
        start(root)


def test_an_unreadable_cache_is_an_empty_one(root, reads, node_cache):
    start(root)
    for verdicts in node_cache.parent.glob("manifest-check-*.json"):
        verdicts.write_text("{not json")
    start(root)
    assert reads == [SPLIT, SPLIT]
