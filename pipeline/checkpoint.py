"""Training checkpoints: one plain dict of tensors and primitives per file, never pickled code.

A checkpoint file (``checkpoint.pt``) holds::

    format            1
    model             the unwrapped net's state_dict (no "module." / "_orig_mod." prefixes)
    optimizer         the optimizer's state_dict (momentum buffers)
    schedule          pipeline.schedule.Plateau as a dict
    epoch             epochs completed (the epoch to run next)
    step              optimizer steps completed in all
    step_in_epoch     steps completed in ``epoch`` (0 at an epoch boundary)
    images_seen       step * global batch: the x axis of every metric
    workers           one dict per rank: {"rng": rng_state(), "data": DALI checkpoint bytes}
    config            the resolved config as YAML text
    num_classes       int
    mlflow_run_id     str ("" when the tracking server was never reached)
    dataset_fingerprint  str, dataset.json's fingerprint
    metrics           the last reported metrics (floats)
    epoch_keys        the keys of ``epoch`` trained on so far, one per line ("" at an epoch boundary):
                      what a resume at another worker count leaves out (pipeline/epochs.py)

``pack`` builds that dict and is the one place its keys are listed in code; ``weights_only`` keeps
what evaluation needs. Writes go through ``storage.files`` (atomic: a crash mid-write leaves the
previous file whole). Loading uses ``torch.load(weights_only=True)``.

Where a checkpoint can be named (``init_from``, the evaluation job): a ``checkpoint.pt`` file, a Ray
checkpoint folder holding one, or a run folder ``<storage>/<name>`` (its ``best/`` checkpoint, else
its latest ``checkpoint_*``); local paths or pyarrow/fsspec URIs such as ``s3://bucket/runs/A-256``.
"""
from __future__ import annotations

import io
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

import model
from pipeline import config as config_lib
from pipeline import faults
from pipeline.errors import CheckpointError, ConfigError
from pipeline.task import listed, mismatches, shapes
from storage import files

FORMAT = 1
FILENAME = "checkpoint.pt"
BEST = "best"               # <run folder>/best/checkpoint.pt: the best validation error so far (top-1, or
                            # localisation error for a box head: pipeline/task.py)
PREFIX = "checkpoint_"      # <run folder>/checkpoint_<step>/checkpoint.pt: the last K, Ray-managed
KEYS = ("model", "optimizer", "schedule", "epoch", "step", "step_in_epoch", "images_seen", "workers", "config",
        "num_classes", "mlflow_run_id", "dataset_fingerprint", "metrics", "epoch_keys")
OPTIONAL = ("epoch_keys",)  # checkpoints written before it existed resume their epoch from its start
# What a finished model needs: no optimizer state, schedule or data positions.
WEIGHT_KEYS = ("model", "config", "num_classes", "epoch", "step", "images_seen", "mlflow_run_id",
               "dataset_fingerprint", "metrics")


def pack(**fields: Any) -> dict[str, Any]:
    """The checkpoint dict of the module docstring; every one of ``KEYS`` must be given (``epoch_keys``
    defaults to "": an epoch boundary), no other."""
    fields = {"epoch_keys": "", **fields}
    if set(fields) != set(KEYS):
        missing, extra = sorted(set(KEYS) - set(fields)), sorted(set(fields) - set(KEYS))
        raise TypeError(f"checkpoint fields: missing {missing}, unknown {extra}")
    return {"format": FORMAT, **fields}


def weights_only(state: dict[str, Any]) -> dict[str, Any]:
    """A loaded checkpoint reduced to ``WEIGHT_KEYS`` (still a checkpoint ``load_checkpoint`` reads)."""
    return {"format": FORMAT, **{k: state[k] for k in WEIGHT_KEYS if k in state}}


# ---------------------------------------------------------------- RNG state as tensors and lists

def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device), numpy and python RNG states."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- save / load

def save_checkpoint(state: dict[str, Any], path: str | Path) -> str:
    """Write ``state`` to ``path`` (a local path or a URI), atomically."""
    with files.AtomicFile(path) as f:
        torch.save(state, f.file)
        faults.during_write(f.file)
    return str(path)


def resolve(location: str | Path, which: str = "best") -> str:
    """The checkpoint *file* that ``location`` names: itself if a file; ``<dir>/checkpoint.pt`` for a
    Ray checkpoint folder; for a run folder, ``best/`` (``which="best"``) or the latest
    ``checkpoint_*`` (``which="latest"``, also the fallback when there is no best yet)."""
    import pyarrow.fs

    if which not in ("best", "latest"):
        raise ValueError(f"Invalid which={which!r}. Only best and latest are supported.")
    location = str(location)
    fs, root = files.filesystem(location)
    join = (lambda *parts: "/".join(p.rstrip("/") for p in parts))
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.File:
        return location
    if info.type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"no checkpoint at {location!r}: no such file or folder")
    if fs.get_file_info(join(root, FILENAME)).type == pyarrow.fs.FileType.File:
        return join(location, FILENAME)
    if which == "best" and fs.get_file_info(join(root, BEST, FILENAME)).type == pyarrow.fs.FileType.File:
        return join(location, BEST, FILENAME)
    entries = fs.get_file_info(pyarrow.fs.FileSelector(root))
    # Ray names them checkpoint_<step, zero-padded>, so the name order is the step order.
    found = sorted(e.base_name for e in entries if e.type == pyarrow.fs.FileType.Directory
                   and e.base_name.startswith(PREFIX)
                   and fs.get_file_info(join(e.path, FILENAME)).type == pyarrow.fs.FileType.File)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {location!r}: expected {FILENAME}, {BEST}/{FILENAME} "
                                f"or {PREFIX}*/{FILENAME}")
    return join(location, found[-1], FILENAME)


def step_folders(run_folder: str | Path) -> list[str]:
    """The run's ``checkpoint_<step>`` folders holding a checkpoint file, newest first."""
    import pyarrow.fs

    location = str(run_folder)
    fs, root = files.filesystem(location)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return []
    names = sorted((e.base_name for e in fs.get_file_info(pyarrow.fs.FileSelector(root))
                    if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith(PREFIX)
                    and fs.get_file_info(f"{e.path}/{FILENAME}").type == pyarrow.fs.FileType.File), reverse=True)
    return [f"{location.rstrip('/')}/{n}" for n in names]


def latest_loadable(run_folder: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint of a run that loads, or None. A folder whose file does not load (a copy
    cut short when a node died) is skipped with a warning, and the one before it is tried."""
    import logging

    for folder in step_folders(run_folder):
        try:
            return load_checkpoint(folder)
        except CheckpointError as e:
            logging.getLogger(__name__).warning("skipping unreadable checkpoint %s: %s", folder, e)
    return None


def load_checkpoint(location: str | Path, which: str = "best") -> dict[str, Any]:
    """Load a checkpoint dict (tensors on the CPU) from a file, a checkpoint folder or a run folder
    (see ``resolve``); never unpickles code (``weights_only=True``). Refused, naming the file, unless
    it is a whole checkpoint (``checked``)."""
    path = resolve(location, which)
    state = checked(_load_file(path), path)
    state["path"] = path
    return state


REQUIRED = ("model", "config", "num_classes")    # what any checkpoint holds, a weights-only one too


def checked(state: Any, path: str) -> dict[str, Any]:
    """``state`` read from ``path`` if it is a checkpoint of ``FORMAT``: the keys it needs (every one
    of ``KEYS`` for a training checkpoint, one with an optimizer), its weights tensors, its class count
    a positive int, its config YAML, and those weights the net its config builds with that class count.
    Anything else is a ``CheckpointError`` naming ``path`` and the problem."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of format {FORMAT} "
                              f"(got format {state.get('format') if isinstance(state, dict) else type(state)})")
    training = "optimizer" in state
    need = [k for k in KEYS if k not in OPTIONAL] if training else REQUIRED
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(repr(k) for k in missing)} in it; a "
                              f"{'training ' if training else ''}checkpoint holds {', '.join(need)}")
    if not isinstance(state.get("epoch_keys", ""), str):
        raise CheckpointError(f"{path}: its 'epoch_keys' is not text (the keys trained on in its epoch)")
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"{path}: its 'model' is not a state_dict of tensors")
    n = state["num_classes"]
    if type(n) is not int or n < 1:
        raise CheckpointError(f"{path}: num_classes {n!r} is not a positive whole number")
    cfg = config_of({**state, "path": path})
    try:
        with torch.device("meta"):     # shapes only, nothing allocated (10**12 classes included)
            net = build_model(cfg, n)
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:   # a size past int64 (or inf, NaN)
        raise CheckpointError(f"{path}: its config and num_classes {n} build no net ({first_line(e)})") from None
    wrong = mismatches(shapes(net), state["model"])
    if wrong:
        m = cfg.model
        raise CheckpointError(f"{path}: its weights are not those of the net its config and num_classes build "
                              f"({m.name}, width {m.width}, {cfg.data.crop_size} px crops, head {m.head}, "
                              f"{n} classes): {listed(wrong)}")
    return state


def _load_file(path: str) -> Any:
    """What ``torch.load(weights_only=True)`` finds in ``path``. A local file is mapped, not read: a
    driver that only looks at the config and progress of a checkpoint of D (1 GB with momentum)
    touches a few pages of it."""
    local = not files.is_uri(path)
    source = path if local else io.BytesIO(files.read_bytes(path))
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=local)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found or "Weights only load failed" in str(e):    # torch's refusal to unpickle code
            raise CheckpointError(f"{path}: holds pickled Python objects{f' ({found[1]})' if found else ''}, not "
                                  f"only tensors and plain values; checkpoints are read without running pickled "
                                  f"code, so it is refused") from e
        raise CheckpointError(f"{path}: not a readable checkpoint, damaged or cut short ({first_line(e)})") from e
    # On damaged bytes torch.load raises nearly any type: RuntimeError and EOFError (its zip reader), OSError
    # (mapping a cut-short file), and from its unpickler KeyError, IndexError, TypeError, ValueError,
    # AttributeError, AssertionError (tests/test_fuzz_readers.py). Each of them means the file is damaged.
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, damaged or cut short ({first_line(e)})") from e


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load_weights(location: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(a net's state_dict, the file it came from) from one of our checkpoints (its best weights) or
    from a bare state_dict file such as torchvision's ``vgg16-397923af.pth`` (loaded weights-only)."""
    path = resolve(location, "best")
    found = _load_file(path)
    if isinstance(found, dict) and "format" in found:
        return checked(found, path)["model"], path
    if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
        raise CheckpointError(f"{path}: neither a checkpoint of format {FORMAT} nor a state_dict of tensors")
    return found, path


def config_of(state: dict[str, Any]) -> config_lib.Config:
    """The resolved config a checkpoint was trained with; one that is not YAML is a
    ``CheckpointError``, one this code does not accept a ``ConfigError``, each naming the file."""
    path = state.get("path", "checkpoint")
    try:
        data = yaml.safe_load(state["config"]) if isinstance(state["config"], str) else None
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: a bad date, 4300+ digits
        raise CheckpointError(f"{path}: its config is not valid YAML ({config_lib.yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: its config is not a YAML mapping of config sections")
    try:
        cfg = config_lib.from_dict(config_lib.Config, data)
        config_lib.validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: its config: {e}") from None
    return cfg


def build_model(cfg: config_lib.Config, num_classes: int) -> nn.Module:
    """The net a config describes (the training crop sets FC6's grid; ``model.head`` FC8: class
    scores, or the localisation heads' boxes), freshly initialised. Every checkpoint, classification
    or localisation, loads into the net its own config builds."""
    m = cfg.model
    return model.build(m.name, num_classes=num_classes, width=m.width, init=m.init,
                       image_size=cfg.data.crop_size, dropout=m.dropout, head=m.head)


def model_from_checkpoint(location: str | Path, which: str = "best") -> tuple[nn.Module, config_lib.Config]:
    """(net with the checkpoint's weights, in eval mode on the CPU; its resolved Config)."""
    state = load_checkpoint(location, which)
    cfg = config_of(state)
    net = build_model(cfg, state["num_classes"])
    net.load_state_dict(state["model"])
    return net.eval(), cfg


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        else:
            return net
