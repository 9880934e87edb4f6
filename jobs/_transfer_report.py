"""jobs.transfer's SVMs and results (results.json, results.md, scores-<repeat>.csv), and the synthetic
sample's multi-label file."""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from pipeline import dataset
from pipeline import evaluate as E
from pipeline import transfer as T
from storage.dataformat import DataError
from storage.files import atomic_write

# The synthetic sample's kinds (preprocessing.synthetic.KINDS) in three overlapping families: each
# image's labels are its kind and its family, so a multi-label set with a structure a net can see.
FAMILIES = {"round": ("disc", "ring", "dots", "target", "halfdisc"),
            "angular": ("square", "triangle", "cross", "diamond", "star", "hexagon"),
            "lined": ("hstripes", "vstripes", "dstripes", "checker", "grid")}


def _repeat(r: int, train, test, names, targets, got, args) -> tuple[dict, np.ndarray]:
    """One random split: the SVMs trained, the test images scored, the metrics."""
    (train_split, tri), (test_split, tei) = train, test
    scores = T.fit_scores(got[train_split][2][tri], targets[train_split][tri], got[test_split][2][tei],
                          args.svm_c, args.seed + r)
    m_ap, ap = T.mean_average_precision(targets[test_split][tei], scores)
    entry = {"repeat": r, "train_images": int(len(tri)), "test_images": int(len(tei)), "mAP": m_ap,
             "per_class_ap": dict(zip(names, ap.tolist()))}
    if not args.labels:
        mcr, recall = T.mean_class_recall(got[test_split][1][tei], scores)
        entry.update({"mean_class_recall": mcr, "per_class_recall": dict(zip(names, recall.tolist()))})
    return entry, scores


def report(out: Path, args, names: list[str], targets: dict, got: dict, splits: list, scales, members) -> dict:
    """Train and score every repeat, write the files, print the summary; returns what it wrote."""
    metric = "mAP" if args.labels else "mean_class_recall"
    repeats, score_files = [], []
    for r, (train, test) in enumerate(splits):
        entry, scores = _repeat(r, train, test, names, targets, got, args)
        repeats.append(entry)
        keys = [got[test[0]][0][i] for i in test[1]]
        score_files.append(out / f"scores-{r}.csv")
        _write_scores(score_files[-1], keys, names, scores)
    values = np.array([e[metric] for e in repeats])
    summary = {"metric": metric, "mean": float(values.mean()), "std": float(values.std()),
               "repeats": repeats, "classes": names, "aggregate": args.aggregate,
               "scales": " / ".join(E.scale_label(qs) for qs in scales), "svm_c": args.svm_c,
               "runs": [m.spec for m in members], "train_split": args.train_split, "test_split": args.split,
               "labels": args.labels or "manifest (single label)"}
    atomic_write(out / "results.json", (json.dumps(_nan_to_none(summary), indent=1) + "\n").encode())
    atomic_write(out / "results.md", _markdown(summary).encode())
    print(_markdown(summary), end="")
    print(f"results written to {out}/ (results.json, results.md, scores-*.csv, features-*.parquet)")
    return {**summary, "scores": [str(p) for p in score_files], "out": str(out)}


def _write_scores(path: Path, keys: list[str], names: list[str], scores: np.ndarray) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["key", *names])
    w.writerows([k, *(repr(float(v)) for v in row)] for k, row in zip(keys, scores))
    atomic_write(path, buf.getvalue().encode())


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
    head = (f"| nets | scales | aggregate | train → test | {s['metric']} % | repeats |\n|---|---|---|---|---|---|\n"
            f"| {' + '.join(s['runs'])} | {s['scales']} | {s['aggregate']} | {s['train_split']} → "
            f"{s['test_split']} | {pct:.2f}{spread} | {len(s['repeats'])} |\n")
    key = "per_class_ap" if s["metric"] == "mAP" else "per_class_recall"
    per = s["repeats"][0][key]
    lines = [f"| {n} | {'' if v != v else f'{100 * v:.2f}'} |" for n, v in per.items()]
    return head + f"\n| class | {key} % (repeat 0) |\n|---|---|\n" + "\n".join(lines) + "\n"


def sample_labels(argv: list[str]) -> int:
    """``python -m jobs.transfer sample-labels ROOT OUT.csv``: the synthetic sample's multi-label file,
    every stored image of every split labelled with its kind and its kind's family."""
    from preprocessing.synthetic import KINDS, synsets

    p = argparse.ArgumentParser(prog="python -m jobs.transfer sample-labels", description=sample_labels.__doc__)
    p.add_argument("root", help="the preprocessed synthetic sample (jobs.sample, then jobs.preprocess)")
    p.add_argument("out", help="the CSV to write (key,labels)")
    a = p.parse_args(argv)
    info = dataset.read_info(a.root)
    kind_of = {w: KINDS[i] for i, (w, _) in enumerate(synsets()[:len(KINDS)])}
    family = {k: f for f, kinds in FAMILIES.items() for k in kinds}
    classes = [c.get("wnid", "") for c in info.get("classes", [])]
    if not classes or any(w not in kind_of for w in classes):
        raise DataError(f"{a.root}: not the synthetic sample (its classes are not the sample's wnids)")
    rows: dict[str, str] = {}
    for split in info.get("splits", {}):
        for key, label in dataset.stored_labels(a.root, split).items():
            if key in rows:
                raise DataError(f"{a.root}: key {key!r} is in two splits; a key-labelled file cannot tell them apart")
            kind = kind_of[classes[label]]
            rows[key] = f"{kind} {family[kind]}"
    atomic_write(Path(a.out), ("key,labels\n" + "".join(f"{k},{v}\n" for k, v in sorted(rows.items()))).encode())
    print(f"{len(rows)} images, labels {sorted({n for v in rows.values() for n in v.split()})} -> {a.out}")
    return 0
