"""Appendix B's classifier and metrics, in plain numpy and scikit-learn: a linear SVM per class
(one-vs-rest) on L2-normalised descriptors, its C fixed or chosen on held-out training images, mean
average precision in three flavours (FLAVOURS) for multi-label sets (VOC) and mean class recall for
single-label ones (Caltech), random per-class splits, and the multi-label sidecar file.

Multi-label sidecar (a CSV, one row per image): ``key,labels`` header, then the manifest's sample
key and its labels as names separated by spaces (``000005,chair person``); the label vocabulary is
the sorted set of names in the file, independent of the dataset's single integer label. An image
may have no label (a negative for every class).
"""
from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from storage.dataformat import DataError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- labels

def read_sidecar(path: str | Path) -> tuple[list[str], dict[str, list[str]]]:
    """(sorted label names, key -> its names) of a multi-label sidecar; DataError naming the file and
    the line for a missing header, an empty key or a key given twice."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: multi-label file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["key", "labels"]:
            raise DataError(f"{path}: the first line must be the header 'key,labels', got {header}")
        got: dict[str, list[str]] = {}
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            key = row[0].strip()
            if not key or len(row) > 2:
                raise DataError(f"{path}:{line}: expected 'key,names separated by spaces', got {row}")
            if key in got:
                raise DataError(f"{path}:{line}: key {key!r} given twice")
            got[key] = (row[1] if len(row) > 1 else "").split()
    return sorted({n for names in got.values() for n in names}), got


def label_matrix(keys: Sequence[str], names: Sequence[str], labels: dict[str, list[str]],
                 source: str = "the multi-label file") -> np.ndarray:
    """(N, classes) 0/1 matrix of ``keys`` (rows) and ``names`` (columns); a key the file lacks is a
    DataError naming it."""
    missing = [k for k in keys if k not in labels]
    if missing:
        raise DataError(f"{source}: no labels for {len(missing)} stored image(s), e.g. {missing[:5]}")
    column = {n: j for j, n in enumerate(names)}
    y = np.zeros((len(keys), len(names)), dtype=np.int8)
    for i, k in enumerate(keys):
        y[i, [column[n] for n in labels[k]]] = 1
    return y


def one_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
    y = np.zeros((len(labels), num_classes), dtype=np.int8)
    y[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)] = 1
    return y


def per_class_split(labels: Sequence[int], train_per_class: int, test_per_class: int,
                    rng: np.random.Generator, test_share: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Caltech's protocol: per class, ``train_per_class`` random images to train on and up to
    ``test_per_class`` of the rest (0: all the rest) to test on. (train indices, test indices), sorted.
    ``test_share``: every class must keep an image to test on (else ``train_per_class`` will do)."""
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < train_per_class + test_share:
            raise DataError(f"class {c} has {len(idx)} images: too few for {train_per_class} to train on"
                            + (" and at least one to test on" if test_share else ""))
        train.append(idx[:train_per_class])
        rest = idx[train_per_class:]
        test.append(rest[:test_per_class] if test_per_class else rest)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ----------------------------------------------------------------------------- the classifier

def fit_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float = 1.0,
               seed: int = 0) -> np.ndarray:
    """One linear SVM per class (scikit-learn's LinearSVC, one-vs-rest: class j against every image
    without label j), trained on (N, D) descriptors and an (N, classes) 0/1 matrix; returns the
    (M, classes) decision values of the test descriptors. A class with no positive (or no negative)
    training image gets a constant score."""
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import LinearSVC

    clf = OneVsRestClassifier(LinearSVC(C=c, random_state=seed, max_iter=10_000))
    with warnings.catch_warnings():  # "label not present in all training examples": the constant above
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        warnings.filterwarnings("ignore", message="Label not .* present in all training examples")
        clf.fit(x_train, y_train)
    return np.asarray(clf.decision_function(x_test), dtype=np.float64).reshape(len(x_test), y_train.shape[1])


# C for the SVMs, chosen on a held-out part of the training images (``--svm-c auto``): the grid, the
# share held out, and on ties the smallest C (the strongest regularisation) wins.
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
HELD_OUT = 0.2


def held_out_split(y: np.ndarray, single_label: bool, share: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(indices to fit on, indices held out) of the rows of an (N, classes) 0/1 matrix, sorted: a
    ``share`` of them held out at random; single-label, per class (stratified: round(share x its
    images), but never its last image). DataError if nothing would be held out or left to fit on."""
    if single_label:
        held = []
        for c in np.unique(np.argmax(y, axis=1)):
            idx = rng.permutation(np.flatnonzero(np.argmax(y, axis=1) == c))
            held.append(idx[:min(len(idx) - 1, int(round(share * len(idx))))])
        held = np.concatenate([np.zeros(0, dtype=np.int64), *held])
    else:
        held = rng.permutation(len(y))[:int(round(share * len(y)))]
    if not 0 < len(held) < len(y):
        raise DataError(f"{len(y)} training images: too few to hold {share:.0%} out for choosing C; "
                        "give --svm-c a number")
    return np.setdiff1d(np.arange(len(y)), held), np.sort(held)


def score(metric: str, y: np.ndarray, scores: np.ndarray, flavour: str) -> float:
    """``metric`` ("mAP" with the AP ``flavour``, or "mean_class_recall" of single-label rows) of
    (N, classes) 0/1 targets and SVM scores."""
    if metric == "mAP":
        return mean_average_precision(y, scores, flavour)[0]
    if metric == "mean_class_recall":
        return mean_class_recall(np.argmax(y, axis=1), scores)[0]
    raise ValueError(f"unknown metric {metric!r}; known: mAP, mean_class_recall")


def choose_c(x: np.ndarray, y: np.ndarray, metric: str, flavour: str, rng: np.random.Generator,
             seed: int = 0, grid: Sequence[float] = C_GRID, share: float = HELD_OUT) -> tuple[float, dict]:
    """(the C of ``grid`` with the best ``metric`` on a held-out ``share`` of the training images,
    {C: its held-out figure}): SVMs fitted on the rest for each C, ties to the smallest C. Refitting
    on all the training images with that C is the caller's (fit_scores)."""
    fit, held = held_out_split(y, metric == "mean_class_recall", share, rng)
    got = {float(c): score(metric, y[held], fit_scores(x[fit], y[fit], x[held], c, seed), flavour) for c in grid}
    finite = {c: v for c, v in got.items() if v == v}
    if not finite:
        raise DataError(f"no held-out image is positive for any class: {metric} is undefined for every C; "
                        "give --svm-c a number")
    return max(finite, key=lambda c: (finite[c], -c)), got


# ----------------------------------------------------------------------------- metrics

# The average-precision flavours (``--ap``), each with the line the results files give it.
FLAVOUR_ABOUT = {"voc07": "VOC-2007 devkit's 11-point interpolated AP, the paper's VOC-2007 figure",
                 "voc12": "VOC-2010+ all-point interpolated AP, the paper's VOC-2012 figure",
                 "raw": "non-interpolated AP, scikit-learn's average_precision_score"}
FLAVOURS = tuple(FLAVOUR_ABOUT)


def _pr_steps(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, images ranked) at each distinct score threshold, highest score first: the end
    of each run of equal scores, so tied images enter together and the order they came in is moot."""
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], np.cumsum(y[order])
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]   # the last index of each run of equal scores
    return hits[last], last + 1


def average_precision(y: np.ndarray, scores: np.ndarray, flavour: str) -> float:
    """AP of one class from (N,) 0/1 labels and (N,) scores, by ``flavour`` (one of FLAVOURS).

    The ranking is cut at each distinct score (ties: one threshold step, all tied images at once;
    the devkits sort item by item, so with ties their figure depends on the input order, ours does
    not), giving precision p_k and recall r_k per step k.
    - raw: sum_k (r_k - r_{k-1}) p_k.
    - voc12: sum_k (r_k - r_{k-1}) max_{j >= k} p_j (precision made monotone non-increasing).
    - voc07: mean over t in {0, 0.1, ..., 1} of max {p_k : r_k >= t}, 0 if no step reaches t;
      r_k >= t is compared exactly (10 TP >= 10 t P in integers), where the devkit compares floats
      (Python ports' ``arange(0, 1.1, 0.1)`` puts t = 0.3, 0.6, 0.7 a hair above 3/10, 6/10, 7/10).
    NaN for a class with no positive image."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown AP flavour {flavour!r}; known: {', '.join(FLAVOURS)}")
    y, scores = np.asarray(y).astype(bool), np.asarray(scores, dtype=np.float64)
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    tp, seen = _pr_steps(y, scores)
    precision = tp / seen
    if flavour == "voc07":
        reached = 10 * tp[None, :] >= np.arange(11)[:, None] * positives   # (11 thresholds, steps)
        return float(np.mean(np.max(np.where(reached, precision, 0.0), axis=1)))
    if flavour == "voc12":
        precision = np.maximum.accumulate(precision[::-1])[::-1]
    recall_gain = np.diff(np.r_[0, tp]) / positives
    return float(np.sum(recall_gain * precision))


def mean_average_precision(y: np.ndarray, scores: np.ndarray, flavour: str) -> tuple[float, np.ndarray]:
    """(mAP over the classes with a positive test image, per-class AP with NaN for the others) of
    (N, classes) 0/1 labels and scores. Silent: callers name the left-out classes (warn_no_positive)."""
    ap = np.array([average_precision(y[:, j], scores[:, j], flavour) for j in range(y.shape[1])])
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"), ap


_NO_POSITIVE = {"test": "AP NaN: left out of the mean",
                "training": "its SVM scores are a constant, so its AP is chance level: kept in the mean"}


def warn_no_positive(y: np.ndarray, names: Sequence[str], split: str, context: str = "") -> list[str]:
    """The names of the columns of an (N, classes) 0/1 matrix with no positive, logged as one warning
    naming them and the effect on the mean (``split``: "test" or "training")."""
    missing = [n for n, seen in zip(names, np.asarray(y).any(axis=0)) if not seen]
    if missing:
        logger.warning("%s%d class(es) with no positive %s image: %s (%s)", context, len(missing), split,
                       ", ".join(missing), _NO_POSITIVE[split])
    return missing


def mean_class_recall(labels: Sequence[int], scores: np.ndarray) -> tuple[float, np.ndarray]:
    """Single-label sets: predicted class = highest score; (mean over the classes with a test image of
    the share of its images predicted right, per-class recall with NaN for classes without one)."""
    labels = np.asarray(labels)
    pred = scores.argmax(axis=1)
    recall = np.full(scores.shape[1], np.nan)
    for c in np.unique(labels):
        recall[c] = float(np.mean(pred[labels == c] == c))
    return float(np.nanmean(recall)), recall
