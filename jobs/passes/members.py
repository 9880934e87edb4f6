"""The nets a pass runs, named by ``--run``: each one's checkpoint (a file or folder, or an MLflow
training run's), config and weights; whether they can form an ensemble; each one's test scales."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from jobs.cli import MAX_SCALE, UsageError
from jobs.tracking import results
from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline import evaluate as E
from pipeline.scoring import test_scales
from storage import dataset


@dataclass
class Member:
    """One ``--run`` of the ensemble: its net (CPU, eval mode), config and MLflow training run."""

    spec: str
    net: nn.Module
    cfg: config_lib.Config
    checkpoint: str
    parent_run_id: str          # the training run in MLflow ("" when none is known)
    num_classes: int
    dataset_fingerprint: str = ""   # what it was trained on: its checkpoint's, else its dataset.json's


def resolve_member(spec: str, tracking_uri: str = "") -> Member:
    """``spec``: a checkpoint file/folder/run folder (local or URI), or an MLflow run id
    (``runs:/<id>`` or 32 hex digits) whose checkpoint is found from its tags or its artifacts."""
    run_id = results.run_id_of(spec)
    if run_id and not Path(spec).exists():
        if not tracking_uri:
            raise UsageError(f"--run {run_id} looks like an MLflow run id, but no tracking URI is set "
                             "(--tracking-uri or $MLFLOW_TRACKING_URI)")
        location = results.checkpoint_of_run(run_id, tracking_uri)
    else:
        location, run_id = spec, ""
    state = ckpt.load_checkpoint(location)
    cfg = ckpt.config_of(state)
    net = ckpt.build_model(cfg, state["num_classes"])
    net.load_state_dict(state["model"])
    return Member(spec, net.eval(), cfg, state["path"], run_id or state.get("mlflow_run_id", "") or "",
                  int(state["num_classes"]), state.get("dataset_fingerprint") or _fingerprint_of(cfg.data.root))


def _fingerprint_of(root: str) -> str:
    """dataset.json's fingerprint at ``root``; "" when there is none to read (moved, or never made)."""
    from storage.dataformat import DataError

    try:
        return dataset.open_dataset(root).fingerprint
    except (DataError, OSError):
        return ""


def check_ensemble(members: list[Member]) -> None:
    """Members must share their classes, training crop and dataset (fingerprints, where known)."""
    def differ(what: str, values: list) -> None:
        if len(set(values)) > 1:
            named = ", ".join(f"{m.spec}: {v}" for m, v in zip(members, values))
            raise UsageError(f"ensemble members disagree on {what} ({named})")
    differ("the number of classes", [m.num_classes for m in members])
    differ("the training crop", [m.cfg.data.crop_size for m in members])
    known = [m for m in members if m.dataset_fingerprint]
    if len({m.dataset_fingerprint for m in known}) > 1:
        named = ", ".join(f"{m.spec}: {m.dataset_fingerprint[:12]}" for m in known)
        raise UsageError(f"ensemble members were trained on different datasets (dataset fingerprints {named})")


def member_scales(text: str, members: list[Member]) -> tuple[tuple[int, ...], ...]:
    """Each member's own test scales: ``--scales auto`` or ``single`` from its own training S, a list
    for every member alike, or one set per member in ``--run`` order, ``/`` between them
    (``256/352,384``: Table 9's fusion)."""
    if "/" not in text:
        return tuple(parse_scales(text, m.cfg.data) for m in members)
    sets = [s.strip() for s in text.split("/")]
    if len(sets) != len(members):
        raise UsageError(f"--scales {text}: {len(sets)} Q sets for {len(members)} nets; give one per net, "
                         "in the order of the nets, '/' between them")
    return tuple(parse_scales(s, m.cfg.data) for s, m in zip(sets, members))


def parse_scales(text: str, data: config_lib.DataConfig) -> tuple[int, ...]:
    """'auto': the paper's three Q for the training S range; 'single': the validation Q; or a list;
    each Q in [the training crop, MAX_SCALE]."""
    if text in ("auto", "single"):
        scales = (tuple(test_scales(data.scale_min, data.scale_max)) if text == "auto"
                  else (config_lib.test_scale(data),))
        if min(scales) < data.crop_size:
            raise UsageError(f"--scales {text}: a net trained at S in [{data.scale_min}, {data.scale_max}] gets "
                             f"Q {E.scale_label(scales)}, below its crop {data.crop_size}; give --scales Q1,Q2,...")
        return scales
    try:
        scales = tuple(int(q) for q in text.split(","))
    except ValueError:
        raise UsageError(f"--scales {text!r}: auto, single or comma-separated integers") from None
    if not scales or min(scales) < data.crop_size or max(scales) > MAX_SCALE:
        raise UsageError(f"--scales {text}: every Q must be in [{data.crop_size}, {MAX_SCALE}] (the training crop, "
                         f"and a bound on the dense maps' memory)")
    return scales


# ----------------------------------------------------------------------------- the nets in a table

def train_scale(data: config_lib.DataConfig) -> str:
    """The table's 'train S' column, as the paper writes it: 256, or [256;512] when jittered."""
    if data.scale_min == data.scale_max:
        return str(data.scale_min)
    return f"[{data.scale_min};{data.scale_max}]"


def one_name(c: config_lib.Config) -> str:
    w = c.model.width
    return c.model.name + ("" if w == 1 else f" (w={w:g})")


def config_name(cfgs: list[config_lib.Config]) -> str:
    """'D', 'A (w=0.0625)', or 'D + E' for an ensemble."""
    return " + ".join(one_name(c) for c in cfgs)


def train_scales(cfgs: list[config_lib.Config]) -> str:
    """The 'train S' of several nets: one value when they share it, else each net's, ' / ' between."""
    each = [train_scale(c.data) for c in cfgs]
    return each[0] if len(set(each)) == 1 else " / ".join(each)
