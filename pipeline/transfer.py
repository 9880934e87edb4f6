"""Appendix B's classifier and metrics, in plain numpy and scikit-learn: a linear SVM per class
(one-vs-rest) on L2-normalised descriptors, mean average precision for multi-label sets (VOC) and
mean class recall for single-label ones (Caltech), random per-class splits, and the multi-label
sidecar file.

Multi-label sidecar (a CSV, one row per image): ``key,labels`` header, then the manifest's sample
key and its labels as names separated by spaces (``000005,chair person``); the label vocabulary is
the sorted set of names in the file, independent of the dataset's single integer label. An image
may have no label (a negative for every class).
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from storage.dataformat import DataError


# ----------------------------------------------------------------------------- labels

def read_sidecar(path: str | Path) -> tuple[list[str], dict[str, list[str]]]:
    """(sorted label names, key -> its names) of a multi-label sidecar; DataError naming the file and
    the line for a missing header, an empty key or a key given twice."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: multi-label file not found")
    with path.open(newline="") as f:
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


# ----------------------------------------------------------------------------- metrics

def average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """Non-interpolated AP of one class: sum over the distinct score thresholds, from the highest, of
    (recall gained) x (precision at that threshold); tied scores enter together. NaN with no positive."""
    y, scores = np.asarray(y).astype(bool), np.asarray(scores, dtype=np.float64)
    positives = y.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], np.cumsum(y[order])
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]   # the last index of each run of equal scores
    tp, seen = hits[last], last + 1
    recall_gain = np.diff(np.r_[0, tp]) / positives
    return float(np.sum(recall_gain * tp / seen))


def mean_average_precision(y: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """(mAP over the classes with a positive test image, per-class AP with NaN for the others)."""
    ap = np.array([average_precision(y[:, j], scores[:, j]) for j in range(y.shape[1])])
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"), ap


def mean_class_recall(labels: Sequence[int], scores: np.ndarray) -> tuple[float, np.ndarray]:
    """Single-label sets: predicted class = highest score; (mean over the classes with a test image of
    the share of its images predicted right, per-class recall with NaN for classes without one)."""
    labels = np.asarray(labels)
    pred = scores.argmax(axis=1)
    recall = np.full(scores.shape[1], np.nan)
    for c in np.unique(labels):
        recall[c] = float(np.mean(pred[labels == c] == c))
    return float(np.nanmean(recall)), recall
