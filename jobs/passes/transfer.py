"""Transfer to other datasets (the paper's appendix B): every image's descriptors (``passes.features``),
a linear SVM per class, scored by mAP (multi-label sets) or mean class recall (single-label sets),
over one or more random splits; the results files (results.json, results.md, scores-<repeat>.csv)."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.cli import UsageError
from jobs.passes import front, results
from jobs.passes.features import extract, write_parquet
from jobs.passes.members import Member, member_scales
from pipeline import evaluate as E
from pipeline import features as F
from pipeline import transfer as T
from storage import dataset
from storage.dataset import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What a transfer evaluation was asked (``python -m jobs.transfer``'s options)."""
    train_split: str
    split: str
    labels: str
    aggregate: str
    svm_c: float | str          # LinearSVC's C > 0, or "auto": chosen per repeat (pipeline.transfer.choose_c)
    ap: str                     # the AP flavour of the mAP, one of pipeline.transfer.FLAVOURS
    train_per_class: int
    test_per_class: int
    repeats: int
    seed: int
    batch_size: int
    out: Path

    def __post_init__(self):
        check(self)


def run(members: list[Member], req: Request, opts: front.PassOptions) -> dict:
    """Descriptors of both splits (written as parquet), then the SVMs, scores and results."""
    scales = member_scales(opts.scales, members)           # the options first: they cost nothing to check
    got, ds = {}, dataset.open_dataset(opts.data or members[0].cfg.data.root)
    splits = [req.train_split] if req.split == req.train_split else [req.train_split, req.split]
    sidecar = read_labels(req.labels, ds, splits)          # before any feature pass: a bad file costs nothing
    for split in splits:
        keys, labels, per_net = extract(members, ds, split, req.batch_size, opts)
        feats = F.descriptor(per_net, req.aggregate)
        write_parquet(req.out / f"features-{split}.parquet", keys, labels, feats)
        got[split] = (keys, labels.numpy(), feats.numpy())
    names, targets = class_targets(req.labels, sidecar, ds, got)
    return report(req, names, targets, got, splits_of(req, got), scales, members)


def check(req: Request) -> None:
    """The combinations argparse cannot check."""
    same = req.split == req.train_split
    if req.svm_c != "auto" and (isinstance(req.svm_c, str) or not 0 < req.svm_c < math.inf):
        raise UsageError(f"--svm-c must be a number > 0 or 'auto', got {req.svm_c!r}")
    if req.ap not in T.FLAVOURS:
        raise UsageError(f"--ap must be one of {', '.join(T.FLAVOURS)}, got {req.ap!r}")
    if req.repeats < 1 or req.train_per_class < 0 or req.test_per_class < 0:
        raise UsageError("--repeats must be >= 1, --train-per-class and --test-per-class >= 0")
    if same and not req.train_per_class:
        raise UsageError(f"--split and --train-split are both {req.split!r}: give --train-per-class N to "
                         "split it at random per class (Caltech), or another --split to test on")
    if req.labels and req.train_per_class:
        raise UsageError("--train-per-class samples single-label classes; it does not apply with --labels")
    if req.repeats > 1 and not req.train_per_class:
        raise UsageError("--repeats needs --train-per-class: without it every repeat is the same split")


def read_labels(labels_file: str, ds: Dataset, splits: list[str]) -> tuple[list[str], dict[str, list[str]]] | None:
    """The multi-label file (None without one), read and checked against the splits' stored images:
    each has a row, and each row is one of theirs."""
    if not labels_file:
        return None
    names, labels = T.read_sidecar(labels_file)
    stored = {k for s in splits for k in ds.stored_labels(s)}
    T.label_matrix(sorted(stored), names, labels, labels_file)          # a stored image without a row
    unknown = sorted(set(labels) - stored)
    if unknown:
        raise UsageError(f"--labels {labels_file}: {len(unknown)} key(s) are no stored image of "
                         f"{', '.join(splits)} (e.g. {unknown[:3]}): a file for another dataset or split?")
    empty = sorted(k for k in stored if not labels[k])
    if empty:   # the format allows an image with no label (a negative for every class); say how many
        log.warning("%s: %d of %d images have no label (a negative for every class), e.g. %s", labels_file,
                    len(empty), len(stored), empty[:3])
    return names, labels


def class_targets(labels_file: str, sidecar, ds: Dataset, got: dict) -> tuple[list[str], dict[str, np.ndarray]]:
    """(class names, per split the (N, classes) 0/1 targets): the multi-label file's names, or the
    dataset's classes with each image's single label."""
    if sidecar is not None:
        names, labels = sidecar
        return names, {s: T.label_matrix(keys, names, labels, labels_file) for s, (keys, _, _) in got.items()}
    classes = ds.classes
    n = max(len(classes), 1 + max(int(lbl.max()) for _, lbl, _ in got.values() if len(lbl)))
    names = [c.get("wnid") or str(i) for i, c in enumerate(classes)] + [str(i) for i in range(len(classes), n)]
    return names, {s: T.one_hot(lbl, n) for s, (_, lbl, _) in got.items()}


def splits_of(req: Request, got: dict) -> list[tuple[tuple[str, np.ndarray], tuple[str, np.ndarray]]]:
    """Per repeat ((train split, its indices), (test split, its indices))."""
    rng = np.random.default_rng(req.seed)
    train_labels = got[req.train_split][1]
    everything = {s: np.arange(len(v[0])) for s, v in got.items()}
    out = []
    for _ in range(req.repeats):
        if req.split == req.train_split:
            train, test = T.per_class_split(train_labels, req.train_per_class, req.test_per_class, rng)
        elif req.train_per_class:
            train = T.per_class_split(train_labels, req.train_per_class, 0, rng, test_share=False)[0]
            test = everything[req.split]
        else:
            train, test = everything[req.train_split], everything[req.split]
        out.append(((req.train_split, train), (req.split, test)))
    return out


def _metric(req: Request) -> str:
    return "mAP" if req.labels else "mean_class_recall"


def _svm_c(r: int, x: np.ndarray, y: np.ndarray, req: Request) -> tuple[float, dict]:
    """Repeat r's C and what results.json records of its choice: the fixed ``--svm-c``, or under
    ``--svm-c auto`` the best of T.C_GRID on a held-out share of this repeat's training images
    (printed), with every C's held-out figure."""
    if req.svm_c != "auto":
        return float(req.svm_c), {}
    metric = _metric(req)
    c, got = T.choose_c(x, y, metric, req.ap, np.random.default_rng([req.seed, r]), req.seed + r)
    figures = ", ".join(f"{k:g}: {v:.4f}" for k, v in got.items())
    print(f"repeat {r}: --svm-c auto chose C = {c:g} ({metric}{' ' + req.ap if metric == 'mAP' else ''} on a "
          f"held-out {T.HELD_OUT:.0%} of the {len(y)} training images, per C: {figures})")
    return c, {"svm_c_held_out": {f"{k:g}": v for k, v in got.items()}}


def _repeat(r: int, train, test, names, targets, got, req: Request) -> tuple[dict, np.ndarray]:
    """One random split: the SVMs trained (C fixed or chosen), the test images scored, the metrics;
    a warning names every class with no positive training or test image."""
    (train_split, tri), (test_split, tei) = train, test
    x, y, y_test = got[train_split][2][tri], targets[train_split][tri], targets[test_split][tei]
    T.warn_no_positive(y, names, "training", f"repeat {r}: ")
    T.warn_no_positive(y_test, names, "test", f"repeat {r}: ")
    c, chosen = _svm_c(r, x, y, req)
    scores = T.fit_scores(x, y, got[test_split][2][tei], c, req.seed + r)
    m_ap, ap = T.mean_average_precision(y_test, scores, req.ap)
    entry = {"repeat": r, "train_images": int(len(tri)), "test_images": int(len(tei)), "svm_c": c, **chosen,
             "mAP": m_ap, "per_class_ap": dict(zip(names, ap.tolist()))}
    if not req.labels:
        mcr, recall = T.mean_class_recall(got[test_split][1][tei], scores)
        entry.update({"mean_class_recall": mcr, "per_class_recall": dict(zip(names, recall.tolist()))})
    return entry, scores


def report(req: Request, names: list[str], targets: dict, got: dict, splits: list, scales, members) -> dict:
    """Train and score every repeat, write the files, print the summary; returns what it wrote."""
    metric = _metric(req)
    repeats, files = [], {}
    for r, (train, test) in enumerate(splits):
        entry, scores = _repeat(r, train, test, names, targets, got, req)
        repeats.append(entry)
        keys = [got[test[0]][0][i] for i in test[1]]
        files[f"scores-{r}.csv"] = results.to_csv(["key", *names], ([k, *(repr(float(v)) for v in row)]
                                                                    for k, row in zip(keys, scores)))
    values = np.array([e[metric] for e in repeats])
    summary = {"metric": metric, "mean": float(values.mean()), "std": float(values.std()),
               "repeats": repeats, "classes": names, "aggregate": req.aggregate,
               "scales": " / ".join(E.scale_label(qs) for qs in scales), "svm_c": req.svm_c, "ap": req.ap,
               "runs": [m.spec for m in members], "train_split": req.train_split, "test_split": req.split,
               "labels": req.labels or "manifest (single label)"}
    files = {"results.json": json.dumps(_nan_to_none(summary), indent=1) + "\n", "results.md": _markdown(summary),
             **files}
    paths = results.write(req.out, files)
    print(_markdown(summary), end="")
    print(f"results written to {req.out}/ (results.json, results.md, scores-*.csv, features-*.parquet)")
    return {**summary, "scores": [str(p) for p in paths[2:]], "out": str(req.out)}


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _markdown(s: dict) -> str:
    pct = 100 * s["mean"]
    spread = f" ± {100 * s['std']:.2f}" if len(s["repeats"]) > 1 else ""
    metric = f"mAP ({s['ap']})" if s["metric"] == "mAP" else s["metric"]
    head = (f"| nets | scales | aggregate | train → test | {metric} % | repeats |\n|---|---|---|---|---|---|\n"
            f"| {' + '.join(s['runs'])} | {s['scales']} | {s['aggregate']} | {s['train_split']} → "
            f"{s['test_split']} | {pct:.2f}{spread} | {len(s['repeats'])} |\n")
    key = "per_class_ap" if s["metric"] == "mAP" else "per_class_recall"
    per = s["repeats"][0][key]
    lines = [f"| {n} | {'' if v != v else f'{100 * v:.2f}'} |" for n, v in per.items()]
    chosen = ", ".join(f"{e['svm_c']:g}" for e in s["repeats"])
    c = f"{s['svm_c']:g}" if s["svm_c"] != "auto" else f"auto, chosen per repeat on held-out training images: {chosen}"
    notes = f"\nAP: {s['ap']} ({T.FLAVOUR_ABOUT[s['ap']]}). SVM C: {c}.\n"
    return head + notes + f"\n| class | {key} % (repeat 0) |\n|---|---|\n" + "\n".join(lines) + "\n"
