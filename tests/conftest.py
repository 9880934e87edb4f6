"""Shared fixtures: a tiny ILSVRC-shaped sample written by the real preprocessing, built once per session.

``sample_source``   SOURCE folder from ``preprocessing.synthetic.generate`` (4 classes, 12 train and
                    8 val images per class, sides 96-160 px).
``sample_dataset``  its shards, indexes, manifests and dataset.json from ``preprocessing.writer``
                    (shard_size 7: 7 train shards for 48 images, 5 val shards for 32, so shard counts
                    divide by neither 2 nor 3 ranks while the train split divides into global
                    batches of 2 x 8 and 3 x 4).
``data_config``     factory: ``data_config(root, **overrides)`` -> DataConfig sized for tests
                    (crop 64, S in [64, 128], CPU decode, 2 threads, float32 NCHW).
``odd_source``      the preprocessing tests' sample with every oddity (tests/odd_sample.py)
``built``           (out, summary, log) of preprocessing it with shard size 8
``odd_manifest``    {split: manifest rows} of ``built``
Treat the session-scoped folders as read-only; copy them (``shutil.copytree``) to break them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

SAMPLE_CLASSES = 4
SAMPLE_TRAIN_PER_CLASS = 12
SAMPLE_VAL_PER_CLASS = 8
SAMPLE_SHARD_SIZE = 7


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory) -> Path:
    from preprocessing import synthetic

    return Path(synthetic.generate(tmp_path_factory.mktemp("sample") / "source", classes=SAMPLE_CLASSES,
                                   train_per_class=SAMPLE_TRAIN_PER_CLASS, val_per_class=SAMPLE_VAL_PER_CLASS,
                                   oddities=False, seed=0, size_range=(96, 160)))


@pytest.fixture(scope="session")
def sample_dataset(sample_source, tmp_path_factory) -> Path:
    from preprocessing import writer

    out = tmp_path_factory.mktemp("sample-shards")
    writer.preprocess(sample_source, out, shard_size=SAMPLE_SHARD_SIZE, seed=0, progress=False,
                      log=lambda message: None)
    return Path(out)


@pytest.fixture(scope="session")
def data_config():
    from pipeline.config import DataConfig

    def make(root, **overrides) -> DataConfig:
        base = dict(root=str(root), crop_size=64, scale_min=64, scale_max=128, decode="cpu", threads=2,
                    prefetch=2, shuffle_buffer=64)
        base.update(overrides)
        return DataConfig(**base)

    return make


@pytest.fixture(scope="session")
def odd_source(tmp_path_factory) -> Path:
    from odd_sample import SIZES
    from preprocessing import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("odd") / "source", classes=4, train_per_class=10,
                              val_per_class=4, oddities=True, seed=0, size_range=SIZES)


@pytest.fixture(scope="session")
def built(odd_source, tmp_path_factory):
    from odd_sample import build

    out = tmp_path_factory.mktemp("built") / "out"
    summary, log = build(odd_source, out)
    return out, summary, log


@pytest.fixture
def odd_manifest(built):
    from storage.dataformat import read_manifest

    return {s: read_manifest(built[0], s).to_pylist() for s in ("train", "val")}
