"""Every reader of a file format, fed mutated copies of valid files (written by the project's own
writers, or taken from the session's sample): the only outcomes are a correct read or that reader's
error class with the file named in a one-line message; never another exception type, a hang or a
crashed process (the project rule: one reader per format, each turning every problem into its error).

``Mutator`` is seeded (the same cases on every run): truncation, bit and byte flips, a chunk cut or
doubled, re-encoding (UTF-16, Latin-1 with non-ASCII bytes, a BOM), and for structured formats one
value swapped for another type (str, int, float, list, dict, null, NaN, inf, 10**12, 2**63, 10**400,
a 5000-digit number, negative, empty), a key deleted or added, a value wrapped in a list, or lists
nested 50000 deep; parquet files also get a column dropped, doubled or of another type. Each reader's
first cases are ``edges``: the inputs that broke it once, each named with what it raised then (kept
as cases after the reader's fix), and a few shapes the fix refuses.

Each in-process case runs in a thread with a time budget (``BUDGET_S``); the loader that reaches DALI
runs all its cases in one child process. Cases per reader: ``CASES``; each test prints its tally
(``pytest -s``): how many read, how many its error refused.
"""
from __future__ import annotations

import copy
import io
import json
import math
import random
import shutil
import subprocess
import sys
import tarfile
import threading
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs.cli import UsageError
from jobs.passes import labels as eval_labels
from jobs.tracking import journal
from pipeline import checkpoint as ckpt
from pipeline import config, goodput
from pipeline.errors import CheckpointError, ConfigError
from pipeline.transfer import read_sidecar
from preprocessing import report, state
from preprocessing.annotations import Annotations, read_kaggle_csv, read_voc_xml
from storage import dataformat as fmt
from storage import shard_check
from storage.dataformat import DataError
from storage.dataset import open_dataset
from storage.files import StorageError

ROOT = Path(__file__).resolve().parent.parent
SEED = 20251204
BUDGET_S = 10.0         # one in-process case; more is a hang
CASES = {"checkpoint": 150, "dataset.json": 200, "dataset.json split": 160, "manifest": 200, "index": 300,
         "index split": 80, "loader (DALI)": 20, "box member": 300, "state.json": 200, "box_problems.json": 150,
         "kaggle csv": 200, "voc xml": 200, "journal": 200, "goodput": 200, "sidecar": 200, "config": 200,
         "labels.parquet": 200}
HUGE, DEEP = "@@HUGE@@", "@@DEEP@@"         # in JSON or YAML text: 5000 digits, lists nested 50000 deep
SWAPS = ("text", "", 0, -7, 10 ** 12, 2 ** 63, 10 ** 400, 1.5, -0.5, float("nan"), float("inf"), float("-inf"),
         True, None, [], [1, "a"], {}, {"k": 1}, HUGE, DEEP)
TOKENS = ("", "-7", "1000000000000", "9" * 5000, "1.5", "nan", "inf", "x", "\u00b2", " ", "null", "[]", "{}", "\t")
DEEP_JSON = b"[" * 50000 + b"]" * 50000


# ---------------------------------------------------------------------------------------------- mutator

class Mutator:
    """Seeded mutations of one reader's inputs; each returns (what it did, the result)."""

    def __init__(self, reader: str):
        self.r = random.Random(f"{SEED}:{reader}")

    def raw(self, data: bytes, text: bool = False) -> tuple[str, bytes]:
        """Truncated, bit- or byte-flipped, a chunk cut or doubled; text also re-encoded."""
        r, b = self.r, bytearray(data)
        kind = r.choice(("truncate", "bits", "bytes", "chunk") + (("utf-16", "latin-1", "bom") if text else ()))
        if kind == "truncate":
            at = r.randrange(len(data))
            return f"truncated at {at}", data[:at]
        if kind in ("bits", "bytes"):
            where = [r.randrange(len(b)) for _ in range(r.randint(1, 6))]
            for i in where:
                b[i] = b[i] ^ (1 << r.randrange(8)) if kind == "bits" else r.randrange(256)
            return f"{kind} changed at {where}", bytes(b)
        if kind == "chunk":
            i, n, cut = r.randrange(len(b)), r.randint(1, 64), r.random() < 0.5
            changed = b[:i] + b[i + n:] if cut else b[:i + n] + b[i:]
            return f"{n} bytes at {i} {'cut' if cut else 'doubled'}", bytes(changed)
        s = data.decode("utf-8", "replace")
        if kind == "utf-16":
            return kind, s.encode(r.choice(("utf-16", "utf-16-le")))
        if kind == "latin-1":
            i, c = r.randrange(len(s) + 1), r.choice("\u00e9\u00f1\u00b2\u00ff\u00a0")
            return f"latin-1, {c!r} at {i}", (s[:i] + c + s[i:]).encode("latin-1", "replace")
        return kind, b"\xef\xbb\xbf" + data

    def tree(self, value):
        """A copy of JSON-like ``value`` with one node swapped for another type, deleted, given an
        extra key, or wrapped in a list: (what it did, the copy)."""
        r, value = self.r, copy.deepcopy(value)
        # a container first, then one of its keys: a dict weighs the same as a list of 100 hashes
        parent = r.choice([None] + [c for c in _containers(value) if c])
        k = None if parent is None else r.choice(list(parent) if isinstance(parent, dict) else range(len(parent)))
        old = value if parent is None else parent[k]
        action = r.choice(("swap", "swap", "swap", "delete", "extra", "wrap"))
        if action == "delete" and parent is not None:
            del parent[k]
            return f"{k!r} deleted", value
        if action == "extra" and isinstance(old, dict):
            old[r.choice(("extra", "", "0", "format"))] = r.choice(SWAPS)
            return f"{k!r} got a key", value
        new = [old] if action == "wrap" else r.choice(SWAPS)
        if parent is None:
            return f"the whole as {_short(new)}", new
        parent[k] = new
        return f"{k!r} as {_short(new)}", value

    def json(self, value, data: bytes) -> tuple[str, bytes]:
        """Half the time ``raw`` text mutations of ``data``, else ``tree`` of ``value`` as JSON."""
        if self.r.random() < 0.5:
            return self.raw(data, text=True)
        what, new = self.tree(value)
        return what, splice(json.dumps(new, indent=1)).encode()

    def fields(self, text: str, sep: str) -> tuple[str, bytes]:
        """One line's field (split at ``sep``) swapped for an odd token, deleted or doubled, or a line
        doubled or cut."""
        r, lines = self.r, text.split("\n")
        n = r.randrange(len(lines))
        f = lines[n].split(sep)
        i, action = r.randrange(len(f)), r.choice(("token", "token", "token", "delete", "double", "line"))
        if action == "line":
            lines.insert(n, lines[n]) if r.random() < 0.5 else lines.pop(n)
        elif action == "token":
            f[i] = r.choice(TOKENS)
        elif action == "delete":
            del f[i]
        else:
            f.insert(i, f[i])
        if action != "line":
            lines[n] = sep.join(f)
        return f"line {n + 1} field {i}: {action}", "\n".join(lines).encode()

    def table(self, t: pa.Table) -> tuple[str, bytes]:
        """Parquet bytes of ``t`` with a column dropped, added (maybe under a name it has) or of
        another type, or one value in it swapped (null, NaN, inf, huge, negative, empty, a list)."""
        col, action = self.r.choice(t.column_names), self.r.choice(("drop", "extra", "retype", "value", "value"))
        try:
            t = _table_edit(self.r, t, col, action)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):    # no such table: drop instead
            action, t = "drop", t.drop_columns([col])
        sink = io.BytesIO()
        pq.write_table(t, sink)
        return f"{col}: {action}", sink.getvalue()


def _table_edit(r: random.Random, t: pa.Table, col: str, action: str) -> pa.Table:
    if action == "drop":
        return t.drop_columns([col])
    if action == "extra":
        return t.append_column(r.choice(("extra", col)), pa.array([r.choice(SWAPS[:6])] * t.num_rows))
    if action == "retype":
        new = r.choice(("x", 7, 10 ** 12, -7, 1.5, float("nan"), [1], [], {"a": 1}, None, [1.5], ["x"]))
        return t.set_column(t.column_names.index(col), col, pa.array([new] * t.num_rows))
    rows, i = t.to_pylist(), r.randrange(t.num_rows)
    rows[i][col] = r.choice(("", "x", -7, 0, 2 ** 31 - 1, 10 ** 12, 1.5, float("nan"), float("inf"), None,
                             [], [float("nan")], [-7], [10 ** 12], ["x"], {"a": 1}))
    try:
        return pa.Table.from_pylist(rows, schema=t.schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.Table.from_pylist(rows)            # the value picks the column's type


def _containers(value):
    """Every dict and list in ``value``, itself included, once each."""
    if isinstance(value, (dict, list)):
        yield value
        for v in (value.values() if isinstance(value, dict) else value):
            yield from _containers(v)


def _short(value) -> str:
    return repr(value)[:40]


def splice(text: str) -> str:
    """The placeholders as what they stand for: a 5000-digit number, lists nested 50000 deep."""
    return text.replace(f'"{HUGE}"', "9" * 5000).replace(f'"{DEEP}"', DEEP_JSON.decode())


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------- property

def outcome(case: str, read, errors, names) -> tuple[bool, object]:
    """Run ``read()`` in a thread: (True, its value), or (False, the error) when it raised one of
    ``errors`` with ``names`` in a one-line message; anything else (another exception type, a message
    without the file or on several lines, more than BUDGET_S) fails, naming ``case``."""
    box: dict = {}

    def target():
        try:
            box["value"] = read()
        except BaseException as e:          # judged below, in the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(BUDGET_S)
    assert not t.is_alive(), f"{case}: still reading after {BUDGET_S} s (a hang)"
    if "error" not in box:
        return True, box["value"]
    e = box["error"]
    assert isinstance(e, errors), f"{case}: {type(e).__name__}, not {errors}:\n" + \
        "".join(traceback.format_exception(e))[-3000:]
    assert str(names) in str(e), f"{case}: the message does not name {names}: {e}"
    assert "\n" not in str(e), f"{case}: the message is not one line (the CLI's one `error:` line): {e}"
    return False, e


class Tally:
    """One reader's cases and how they came out."""

    def __init__(self, reader: str):
        self.reader, self.read, self.refused = reader, 0, 0
        self.m = Mutator(reader)

    def cases(self, edges: list, mutate, count: int | None = None):
        """``edges`` first, then ``mutate()``'s: (what, input) of ``count`` cases in all."""
        for n in range(count or CASES[self.reader]):
            yield edges[n] if n < len(edges) else mutate()

    def check(self, case: str, read, errors, names, valid=lambda value: True) -> None:
        """One case: read, and its value ``valid`` (what the format promises), or refused (``outcome``)."""
        case = f"{self.reader} [{self.read + self.refused}] {case}"
        ok, value = outcome(case, read, errors, names)
        assert not ok or valid(value), f"{case}: read, but not what the format promises: {_short(value)}"
        self.read += ok
        self.refused += not ok

    def done(self, refusals: bool = True) -> None:
        """Print the tally; every case ran, and (``refusals``) some were refused."""
        print(f"\n{self.reader}: {self.read + self.refused} cases, {self.read} read, {self.refused} refused")
        assert self.read + self.refused == CASES[self.reader], (self.reader, self.read, self.refused)
        assert self.refused or not refusals, f"{self.reader}: no case was refused; do the mutations reach it?"


# ---------------------------------------------------------------------------------------------- checkpoints

def tiny_state() -> dict:
    """A whole checkpoint of net A at width 1/32 on 32 px crops, 4 classes, as the loop packs it."""
    cfg = config.load(None, ["model.width=0.03125", "data.crop_size=32", "data.scale_min=32", "data.scale_max=32",
                             "model.num_classes=4"])
    torch.manual_seed(0)
    net = ckpt.build_model(cfg, 4)
    return ckpt.pack(model=net.state_dict(), optimizer={}, schedule={}, epoch=1, step=3, step_in_epoch=0,
                     images_seen=48, workers=[], config=config.dump(cfg), num_classes=4, mlflow_run_id="",
                     dataset_fingerprint="", metrics={"val/top1_err": 0.5})


def saved(state) -> bytes:
    sink = io.BytesIO()
    torch.save(state, sink)
    return sink.getvalue()


def for_pickle(value):
    """The placeholders as values torch.save writes: a 5000-digit int, lists nested 200 deep."""
    if isinstance(value, dict):
        return type(value)((k, for_pickle(v)) for k, v in value.items())
    if isinstance(value, list):
        return [for_pickle(v) for v in value]
    if isinstance(value, str) and value in (HUGE, DEEP):
        return 10 ** 5000 if value == HUGE else json.loads("[" * 200 + "]" * 200)
    return value


def mutated_checkpoint(m: Mutator, bases: dict, cfg_text: str) -> tuple[str, bytes]:
    """One of ``bases`` (whole, weights only, a bare state_dict) mutated: its file's bytes, its dict
    (a tensor swapped for one of another shape or dtype, too), or its config's YAML."""
    name = m.r.choice(sorted(bases))
    state, how = bases[name], m.r.random()
    if how < 0.4:
        what, data = m.raw(saved(state))
        return f"{name}: {what}", data
    if how < 0.8 or "config" not in state:
        what, new = m.tree(state)
        tensors = [(p, k) for p in _containers(new) for k in (p if isinstance(p, dict) else range(len(p)))
                   if isinstance(p[k], torch.Tensor)]
        if tensors and m.r.random() < 0.3:
            p, k = m.r.choice(tensors)
            p[k] = m.r.choice((torch.zeros(0), torch.tensor(float("nan")), torch.zeros(2, 3, dtype=torch.int8),
                               torch.zeros(p[k].shape[::-1] or (1,))))
            what += f"; {k!r} another tensor"
    else:
        what, text = mutated_yaml(m, cfg_text)
        new = {**state, "config": text.decode("utf-8", "replace")}
    return f"{name}: {what}", saved(for_pickle(new))


def mutated_yaml(m: Mutator, text: str) -> tuple[str, bytes]:
    """``text`` (YAML) with raw text mutations, or one node of its tree changed, dumped again."""
    if m.r.random() < 0.4:
        return m.raw(text.encode(), text=True)
    what, new = m.tree(yaml.safe_load(text))
    dumped = yaml.safe_dump(new, sort_keys=False).replace(f"'{HUGE}'", f'"{HUGE}"').replace(f"'{DEEP}'", f'"{DEEP}"')
    return what, splice(dumped).encode()


# Single bytes of tiny_state's file (this torch's layout) that made the weights-only unpickler raise
# something else than its UnpicklingError: (offset, new byte, what it raised).
BYTE_EDGES = ((507, 148, "KeyError"), (1029, 50, "AttributeError"), (1768, 75, "AssertionError"),
              (2508, 127, "TypeError"), (189, 97, "IndexError"), (4321, 133, "UnicodeDecodeError"))


def checkpoint_edges(whole: dict) -> list[tuple[str, bytes]]:
    valid, cfg = saved(whole), whole["config"]

    def at(i: int, v: int) -> bytes:
        return valid[:i] + bytes([v]) + valid[i + 1:]

    crop = cfg.replace("crop_size: 32", "crop_size: 1000000000000").replace("scale_min: 32", "scale_min: 1000000000000")
    return [("cut short at half (mapping it: OSError)", valid[:len(valid) // 2]),
            *((f"byte {i} as {v} ({raised})", at(i, v)) for i, v, raised in BYTE_EDGES),
            ("config with 5000 digits (YAML: ValueError)", saved({**whole, "config": cfg.replace("seed: 0", "seed: "
                                                                                               + "9" * 5000)})),
            ("config nested 50000 deep (YAML: RecursionError)", saved({**whole, "config": DEEP_JSON.decode()})),
            ("config with a date that is none (YAML: ValueError)", saved({**whole, "config": cfg.replace(
                "name: vgg", "name: 2024-13-45")})),
            ("num_classes 2**63 (the net on meta: TypeError)", saved({**whole, "num_classes": 2 ** 63})),
            ("crops of 10**12 px (the net on meta: TypeError)", saved({**whole, "config": crop.replace(
                "scale_max: 32", "scale_max: 1000000000000")}))]


def test_checkpoints(tmp_path):
    whole = tiny_state()
    bases = {"whole": whole, "weights only": ckpt.weights_only(whole), "state_dict": dict(whole["model"])}
    ckpt.save_checkpoint(whole, tmp_path / "valid.pt")
    assert ckpt.load_checkpoint(tmp_path / "valid.pt")["num_classes"] == 4     # the writer's file reads
    t = Tally("checkpoint")
    edges = checkpoint_edges(whole)
    for n, (what, data) in enumerate(t.cases(edges, lambda: mutated_checkpoint(t.m, bases, whole["config"]),
                                             CASES["checkpoint"] // 2)):
        path = write(tmp_path / f"case-{n}.pt", data)
        t.check(f"load_checkpoint, {what}", lambda: ckpt.load_checkpoint(path), (CheckpointError, ConfigError),
                path, lambda s: isinstance(s["model"], dict) and s["num_classes"] >= 1)
        t.check(f"load_weights, {what}", lambda: ckpt.load_weights(path), (CheckpointError, ConfigError), path,
                lambda w: all(isinstance(v, torch.Tensor) for v in w[0].values()) and w[1] == str(path))
        path.unlink()
    t.done()


# ---------------------------------------------------------------------------------------------- dataset.json

@pytest.fixture(scope="module")
def dataset_copy(sample_dataset, tmp_path_factory) -> Path:
    """A copy of the sample this module's cases break (each puts back what it changed)."""
    return Path(shutil.copytree(sample_dataset, tmp_path_factory.mktemp("fuzz") / "data"))


def dataset_edges(info: dict) -> list[tuple[str, bytes]]:
    """dataset.json as it broke its reader (the JSON) or the split check and the statistics (the
    exception it raised), and some more shapes ``read_info`` refuses now."""
    def every_split(key: str, value) -> dict:
        return {**info, "splits": {s: {**e, key: value} for s, e in info["splits"].items()}}

    return [(what, splice(json.dumps(new)).encode()) for what, new in (
        ("5000 digits (json: ValueError)", {**info, "seed": HUGE}),
        ("nested 50000 deep (json: RecursionError)", {**info, "seed": DEEP}),
        ("stats a string (AttributeError)", {**info, "stats": "text"}),
        ("a mean of 10**400 (isfinite: OverflowError)", {**info, "stats": {**info["stats"],
                                                                           "mean_rgb": [10 ** 400, 0, 0]}}),
        ("splits a list (TypeError)", {**info, "splits": list(info["splits"])}),
        ("splits a number (TypeError)", {**info, "splits": 0}),
        ("each split a string (AttributeError)", {**info, "splits": {s: "text" for s in info["splits"]}}),
        ("shards a number (TypeError)", every_split("shards", 7)),
        ("inputs a string (TypeError)", every_split("inputs", "x")),
        ("a shard name a number (TypeError)", {**info, "splits": {s: {**e, "shards": [*e["shards"], 5]}
                                                                  for s, e in info["splits"].items()}}),
        ("num_samples a string (shape)", every_split("num_samples", "x")),
        ("num_samples NaN (shape)", every_split("num_samples", float("nan"))),
        ("inputs -1 (shape)", every_split("inputs", -1)))]


def test_dataset_json(dataset_copy, tmp_path):
    valid = (dataset_copy / fmt.DATASET_JSON).read_bytes()
    info = json.loads(valid)
    t = Tally("dataset.json")
    for what, data in t.cases(dataset_edges(info), lambda: t.m.json(info, valid)):
        write(tmp_path / fmt.DATASET_JSON, data)
        t.check(what, lambda: fmt.read_info(tmp_path), DataError, tmp_path / fmt.DATASET_JSON,
                lambda v: isinstance(v, dict))
    t.done()


def test_dataset_json_split_and_stats(dataset_copy):
    """The split check and the colour statistics of a copy of the sample with a mutated dataset.json."""
    path = dataset_copy / fmt.DATASET_JSON
    valid = path.read_bytes()
    info = json.loads(valid)
    t = Tally("dataset.json split")
    try:
        for what, data in t.cases(dataset_edges(info), lambda: t.m.json(info, valid), CASES["dataset.json split"] // 2):
            write(path, data)
            split = t.m.r.choice(("train", "val"))
            t.check(f"split({split}), {what}", lambda: open_dataset(dataset_copy).split(split), DataError,
                    dataset_copy, lambda s: s.num_samples >= 0 and len(s.shards) == len(s.indexes))
            t.check(f"stats, {what}", lambda: open_dataset(dataset_copy).stats(), DataError, dataset_copy,
                    lambda s: len(s.mean_rgb) == 3 and all(map(math.isfinite, s.mean_rgb)))
    finally:
        path.write_bytes(valid)
    t.done()


# ---------------------------------------------------------------------------------------------- manifest

def parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_manifest(sample_dataset, tmp_path):
    shutil.copy(sample_dataset / fmt.DATASET_JSON, tmp_path / fmt.DATASET_JSON)
    valid = (sample_dataset / "val" / fmt.MANIFEST).read_bytes()
    table = pq.read_table(io.BytesIO(valid))
    path = fmt.manifest_path(tmp_path, "val")
    edges = [("cut short at half (ArrowInvalid)", valid[:len(valid) // 2]),
             ("no column label (ArrowInvalid, several lines)", parquet(table.drop_columns(["label"]))),
             ("label a string column (read)", parquet(table.set_column(2, "label", pa.array(["x"] * len(table))))),
             ("column key twice (ArrowInvalid)", parquet(table.append_column("key", table.column("key"))))]
    t = Tally("manifest")

    def promised(got: pa.Table) -> bool:
        return got.schema.names == list(fmt.MANIFEST_COLUMNS) and all(
            got.schema.field(c).type == fmt.MANIFEST_SCHEMA.field(c).type for c in fmt.MANIFEST_COLUMNS)

    for what, data in t.cases(edges, lambda: t.m.raw(valid) if t.m.r.random() < 0.5 else t.m.table(table)):
        write(path, data)
        t.check(what, lambda: fmt.read_manifest(tmp_path, "val"), DataError, path, promised)
    t.done()


# ---------------------------------------------------------------------------------------------- DALI indexes

def components(samples) -> bool:
    return isinstance(samples, list) and all(
        isinstance(e, str) and type(o) is int and type(s) is int and o >= 0 and s >= 0 and isinstance(m, str)
        for sample in samples for e, o, s, m in sample)


def mutated_index(m: Mutator, valid: bytes) -> tuple[str, bytes]:
    return m.raw(valid, text=True) if m.r.random() < 0.5 else m.fields(valid.decode("ascii"), " ")


def test_index(sample_dataset, tmp_path):
    valid = (sample_dataset / "val-000001.idx").read_bytes()
    path = tmp_path / "val-000001.idx"
    body = valid.split(b"\n", 1)[1]
    edges = [("a count in superscript digits (int: ValueError)", b"v1.2 \xb2\n" + body),
             ("a count of 5000 digits (int: ValueError)", b"v1.2 " + b"9" * 5000 + b"\n" + body)]
    t = Tally("index")
    for what, data in t.cases(edges, lambda: mutated_index(t.m, valid), CASES["index"] // 2):
        write(path, data)
        t.check(f"parse_index, {what}", lambda: fmt.parse_index(data.decode("latin-1"), "that.idx"), DataError,
                "that.idx", components)
        t.check(f"read_index, {what}", lambda: fmt.read_index(path), DataError, path, components)
    t.done()


def test_index_split(dataset_copy):
    """The whole check of split "val" (every entry against its tar's headers, the sha256) with one of
    its indexes mutated: it runs before DALI, so in-process."""
    valid = (dataset_copy / "val-000000.idx").read_bytes()
    edges = [("val-000000", "UTF-16 (index_count: UnicodeDecodeError)", valid.decode().encode("utf-16")),
             ("val-000000", "a 0xff byte on line 2 (index_count: UnicodeDecodeError)",
              valid.replace(b"\n", b"\xff\n", 2).replace(b"\xff\n", b"\n", 1))]
    t = Tally("index split")

    def mutate():
        shard = f"val-00000{t.m.r.randrange(5)}"
        return shard, *mutated_index(t.m, (dataset_copy / f"{shard}.idx").read_bytes())

    for shard, what, data in t.cases(edges, mutate):
        path = dataset_copy / f"{shard}.idx"
        valid = path.read_bytes()
        try:
            write(path, data)
            t.check(f"{path.name}: {what}", lambda: open_dataset(dataset_copy).split("val"), DataError, dataset_copy)
        finally:
            path.write_bytes(valid)
    t.done()


# ---------------------------------------------------------------------------------------------- box members

def test_box_members(sample_dataset):
    with tarfile.open(sample_dataset / "val-000000.tar") as tar:
        boxes = [tar.extractfile(m).read() for m in tar if m.name.endswith(".box")]
    assert boxes and all(fmt.decode_boxes(b).shape == (1, 4) for b in boxes)
    valid = boxes[0] + fmt.encode_boxes([[1, 2, 30, 40], [0, 0, 5.5, 7]])    # 3 boxes
    t = Tally("box member")
    for what, data in t.cases([], lambda: t.m.raw(valid)):
        t.check(what, lambda: fmt.decode_boxes(data, "x.box"), DataError, "x.box",
                lambda b: b.dtype == "<f4" and b.ndim == 2 and b.shape[1] == 4)
    t.done()


# ---------------------------------------------------------------------------------------------- preprocessing state

def state_shape(have) -> bool:
    """What a rerun takes from a state.json of this format (preprocessing/state.py)."""
    if have is None or have.get("format") != fmt.FORMAT:
        return have is None or isinstance(have, dict)
    options, classes, splits = have["options"], have["classes"], have.get("splits")
    size, side = options["shard_size"], options["max_side"]
    return (type(have["seed"]) is int and (type(size) is int and size >= 1 or isinstance(size, str))
            and (side is None or type(side) is int)
            and all(type(c[0]) is int and isinstance(c[1], str) and isinstance(c[2], str) for c in classes)
            and (splits is None or all(isinstance(s, str) for s in splits))
            and all(isinstance(a["file"], str) and isinstance(a["sha256"], str)
                    for a in have.get("annotations", {}).values()))


def test_state_json(sample_dataset, tmp_path):
    valid = state.state_path(sample_dataset).read_bytes()
    have = json.loads(valid)
    edges = [("nested 50000 deep (json: RecursionError)", DEEP_JSON)] + [
        (what, json.dumps({**have, **new}).encode()) for what, new in (
            ("a class [0, 5, 'x'] (read)", {"classes": [[0, 5, "x"]]}),
            ("splits [null] (read)", {"splits": [None]}),
            ("shard_size NaN (read)", {"options": {**have["options"], "shard_size": float("nan")}}),
            ("a class index true (read)", {"classes": [[True, "n01440764", "tench"]]}))]
    path = state.state_path(tmp_path)
    t = Tally("state.json")
    for what, data in t.cases(edges, lambda: t.m.json(have, valid)):
        write(path, data)
        t.check(what, lambda: state.read_state(tmp_path), DataError, path, state_shape)
    t.done()


def test_box_problems_json(tmp_path):
    # as preprocessing/report.py's _box_problems writes it
    lines = ["src/LOC_val_solution.csv:3: no comma in 'x' (rows are ImageId,PredictionString): row not used",
             "src/a.xml: object 1: no name or no numeric bndbox"]
    valid = (json.dumps(lines, indent=0) + "\n").encode()
    path = tmp_path / ".preprocess" / report.BOX_PROBLEMS
    t = Tally("box_problems.json")
    edges = [("nested 50000 deep (json: RecursionError)", DEEP_JSON)]
    for what, data in t.cases(edges, lambda: t.m.json(lines, valid)):
        write(path, data)
        t.check(what, lambda: report.read_box_problems(tmp_path), DataError, path,
                lambda got: isinstance(got, list) and all(isinstance(s, str) for s in got))
    t.done()


# ---------------------------------------------------------------------------------------------- annotations

def boxes_shape(ann: Annotations) -> bool:
    return all(len(b) == 5 and isinstance(b[0], str) and all(type(v) is float for v in b[1:])
               for boxes in ann.boxes.values() for b in boxes)


def text_case(m: Mutator, valid: bytes, seps: tuple[str, ...]) -> tuple[str, bytes]:
    return m.raw(valid, text=True) if m.r.random() < 0.5 else m.fields(valid.decode(), m.r.choice(seps))


def test_kaggle_csv(sample_source, tmp_path):
    valid = (sample_source / "LOC_val_solution.csv").read_bytes()
    path = tmp_path / "LOC_val_solution.csv"
    t = Tally("kaggle csv")
    for what, data in t.cases([], lambda: text_case(t.m, valid, (",", " "))):
        write(path, data)
        t.check(what, lambda: read_kaggle_csv(path), DataError, path, boxes_shape)
    t.done()


VOC = """<?xml version="1.0" encoding="utf-8"?>
<annotation><folder>val</folder><filename>ILSVRC2012_val_00000001</filename>
<size><width>500</width><height>375</height><depth>3</depth></size>
<object><name>n01751748</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>
<bndbox><xmin>111</xmin><ymin>108</ymin><xmax>441</xmax><ymax>193</ymax></bndbox></object>
<object><name>n01751748</name><bndbox><xmin>5.5</xmin><ymin>0</ymin><xmax>80</xmax><ymax>375</ymax></bndbox></object>
</annotation>
"""
LAUGHS = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaaaaaaaa">'
          + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi"))
          + "]><annotation><object><name>&i;</name></object></annotation>")


def voc_text(m: Mutator) -> tuple[str, bytes]:
    """VOC's bytes mutated, or one element's text swapped for an odd token."""
    if m.r.random() < 0.5:
        return m.raw(VOC.encode(), text=True)
    parts = VOC.split(">")
    i = m.r.randrange(1, len(parts))
    token = m.r.choice(TOKENS + ("&amp;", "&bogus;", "<x>", "]]>", "\x00", "-1e400", "1e400"))
    parts[i] = token + parts[i][parts[i].find("<"):] if "<" in parts[i] else parts[i]
    return f"text {i} as {token[:12]!r}", ">".join(parts).encode()


def test_voc_xml(tmp_path):
    """Problems are listed, not raised: nothing may come out of read_voc_xml (but a DataError)."""
    path = tmp_path / "ILSVRC2012_val_00000001.xml"
    t, problems = Tally("voc xml"), 0
    for what, data in t.cases([("a billion laughs", LAUGHS.encode())], lambda: voc_text(t.m)):
        ann = Annotations()
        write(path, data)
        t.check(what, lambda: read_voc_xml(path, ann), DataError, path,
                lambda _: boxes_shape(ann) and all(str(path) in p for p in ann.problems))
        problems += bool(ann.problems)
    print(f"voc xml: {problems} of the {t.read} read listed a problem, naming the file")
    assert problems
    t.done(refusals=False)


# ---------------------------------------------------------------------------------------------- run folders

def test_journal(tmp_path):
    points = [("train/loss", 6.9, 1_700_000_000_000 + i, 32 * i) for i in range(5)] + [("val/top1_err", 0.98, 1, 160)]
    journal.write(str(tmp_path), points)
    path = Path(journal.path(str(tmp_path)))
    valid = path.read_bytes()
    assert journal.read(str(tmp_path)) == points
    edges = [("a line nested 50000 deep (json: RecursionError)", valid + DEEP_JSON + b"\n"),
             ("a value of 10**400 (isfinite: OverflowError)", valid + b'["train/loss", 1' + b"0" * 400 + b", 1, 2]\n")]

    def mutate() -> tuple[str, bytes]:
        if t.m.r.random() < 0.5:
            return t.m.raw(valid, text=True)
        i, lines = t.m.r.randrange(len(points)), valid.decode().splitlines()
        what, line = t.m.tree(list(points[i]))
        lines[i] = splice(json.dumps(line))
        return f"line {i + 1}: {what}", ("\n".join(lines) + "\n").encode()

    t = Tally("journal")
    for what, data in t.cases(edges, mutate):
        write(path, data)
        t.check(what, lambda: journal.read(str(tmp_path)), StorageError, path,
                lambda got: all(isinstance(k, str) and math.isfinite(v) and type(s) is int and type(st) is int
                                for k, v, s, st in got))
    t.done()


def test_goodput(tmp_path):
    ledger = {**goodput.Ledger({c: 1.5 * i for i, c in enumerate(goodput.CATEGORIES)}).metrics(), "train/loss": 2.0}
    valid = {goodput.WALL: {"wall_s": 12.5}, goodput.LEDGER: ledger}       # as jobs/train.py and the worker write
    edges = [(goodput.WALL, "nested 50000 deep (json: RecursionError)", DEEP_JSON),
             (goodput.WALL, "wall_s 10**400 (isfinite: OverflowError)", b'{"wall_s": 1' + b"0" * 400 + b"}")]
    t = Tally("goodput")

    def mutate():
        name = t.m.r.choice(sorted(valid))
        return name, *t.m.json(valid[name], json.dumps(valid[name]).encode())

    for name, what, data in t.cases(edges, mutate):
        path = write(tmp_path / name, data)
        t.check(f"{name}: {what}", lambda: goodput.read(str(tmp_path), name), StorageError, path,
                lambda got: all(type(v) is float and math.isfinite(v) and v >= 0 for v in got.values()))
        path.unlink()
    t.done()


def test_sidecar(tmp_path):
    # as ``python -m jobs.transfer sample-labels`` writes it
    rows = {f"ILSVRC2012_val_{i:08d}": ["disc round", "square", "", "star pointy"][i % 4] for i in range(12)}
    valid = ("key,labels\n" + "".join(f"{k},{v}\n" for k, v in rows.items())).encode()
    path = tmp_path / "labels.csv"
    t = Tally("sidecar")
    for what, data in t.cases([], lambda: text_case(t.m, valid, (",", " "))):
        write(path, data)
        t.check(what, lambda: read_sidecar(path), DataError, path,
                lambda got: all(isinstance(k, str) and all(isinstance(n, str) for n in v) for k, v in got[1].items()))
    t.done()


# ---------------------------------------------------------------------------------------------- config, labels

def test_config(tmp_path):
    valid = (ROOT / "jobs" / "configs" / "demo.yaml").read_text()
    edges = [(what, valid.replace(old, new).encode()) for what, old, new in (
        ("5000 digits (YAML: ValueError)", "epochs: 30", "epochs: " + "9" * 5000),
        ("lr 10**400 (float: OverflowError)", "lr: 4.0e-3", "lr: 1" + "0" * 400),
        ("a date that is none (YAML: ValueError)", "name: small-cpu", "name: 2024-13-45"),
        ("an unknown key (the message named no file)", "  dropout: 0.0", "  dropout: 0.0\n  depth: 3"),
        ("a YAML syntax error (a message of several lines)", "model:\n", "model: [A, width\n"))]
    edges.append(("nested 50000 deep (YAML: RecursionError)", b"model: " + DEEP_JSON))
    path = tmp_path / "demo.yaml"
    t = Tally("config")
    for what, data in t.cases(edges, lambda: mutated_yaml(t.m, valid)):
        write(path, data)
        t.check(what, lambda: config.load(path), ConfigError, path, lambda cfg: isinstance(cfg, config.Config))
    t.done()


def test_labels_parquet(tmp_path):
    keys = [f"ILSVRC2012_val_{i:08d}" for i in range(8)]
    table = pa.table({"key": keys, "label": pa.array(range(8), pa.int32()),
                      "top5": pa.array([[i % 4, 1, 2, 3, 0] for i in range(8)], pa.list_(pa.int32())),
                      "posteriors": pa.array([[0.5, 0.2, 0.1, 0.1, 0.1]] * 8, pa.list_(pa.float32()))},
                     metadata={"mode": "center", "row": "Q=256"})
    valid = parquet(table)
    edges = [(what, parquet(table.set_column(table.column_names.index(col), col, pa.array(values))))
             for what, col, values in (("key a float column (read)", "key", [1.5] * 8),
                                       ("top5 an int column (read)", "top5", [-7] * 8),
                                       ("top5 null (torch.tensor: TypeError)", "top5",
                                        pa.nulls(8, pa.list_(pa.int32()))),
                                       ("top5 a list of strings (torch.tensor: TypeError)", "top5", [["x"]] * 8),
                                       ("key a list column (unhashable: TypeError)", "key", [[1]] * 8))]
    edges.append(("no top5 column (ArrowInvalid, several lines)", parquet(table.drop_columns(["top5"]))))
    path = tmp_path / eval_labels.FILENAME
    t = Tally("labels.parquet")
    for what, data in t.cases(edges, lambda: t.m.raw(valid) if t.m.r.random() < 0.5 else t.m.table(table)):
        write(path, data)
        t.check(what, lambda: eval_labels.read(path), UsageError, path,
                lambda got: all(isinstance(k, str) and v.dtype == torch.long and v.ndim == 1 for k, v in got.items()))
    t.done()


# ---------------------------------------------------------------------------------------------- DALI

LOADER = r"""
import contextlib, io, json, logging, sys, traceback
from pathlib import Path
from jobs import cli
from pipeline.config import DataConfig
from pipeline.loader import EvalLoader

logging.basicConfig(level=logging.WARNING)          # to the real stderr, not a case's
root, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
cfg = DataConfig(root=str(root), crop_size=64, scale_min=64, scale_max=128, decode="cpu", threads=1, prefetch=1)
for case in cases:
    valid = (root / case["file"]).read_bytes()
    (root / case["file"]).write_bytes(Path(case["data"]).read_bytes())
    print(json.dumps({"what": case["what"]}), flush=True)        # started: named if the process dies
    seen, err = [], io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = cli.run(lambda argv: seen.extend(k for b in EvalLoader(cfg, 4, 0, 1, device_id=None) for k in b.keys))
    except Exception:
        rc, err = None, io.StringIO(traceback.format_exc())
    print(json.dumps({"what": case["what"], "rc": rc, "stderr": err.getvalue(), "images": len(seen)}), flush=True)
    (root / case["file"]).write_bytes(valid)
"""


def member_flip(m: Mutator, tar: bytes, idx: str) -> tuple[str, bytes]:
    """1 to 3 bytes changed inside one member's data (a JPEG half the time, else a label, a key, a
    box), or its first 64 zeroed (a JPEG's markers)."""
    members = [c for sample in fmt.parse_index(idx) for c in sample]
    ext, offset, size, member = m.r.choice([c for c in members if c[0] == "jpg"] if m.r.random() < 0.5 else members)
    b = bytearray(tar)
    if m.r.random() < 0.4:
        b[offset:offset + min(size, 64)] = bytes(min(size, 64))
        return f"{member} zeroed", bytes(b)
    for i in [offset + m.r.randrange(size) for _ in range(m.r.randint(1, 3))]:
        b[i] = m.r.randrange(256)
    return f"{member} changed", bytes(b)


def test_loader_through_dali(sample_dataset, tmp_path):
    """EvalLoader (DALI's CPU mode) over a copy of the sample without checksums, so that DALI meets the
    mutated index or tar bytes the checks let through; every case in one child process: each is a
    read or the CLI's exit status 2 with one ``error:`` line, and the process never dies of a signal."""
    root = Path(shutil.copytree(sample_dataset, tmp_path / "data"))
    info = json.loads((root / fmt.DATASET_JSON).read_text())
    for entry in info["splits"].values():
        del entry[shard_check.SHARDS_SHA256], entry[shard_check.INDEXES_SHA256]
    (root / fmt.DATASET_JSON).write_text(json.dumps(info))
    tar, idx = (root / "val-000002.tar").read_bytes(), (root / "val-000002.idx").read_text()
    key = next(o for sample in fmt.parse_index(idx) for e, o, s, m in sample if e == "key")
    edges = [("val-000002.tar", "a key member not ASCII (the loader: UnicodeDecodeError)",
              tar[:key + 5] + b"\xfb" + tar[key + 6:])]
    t = Tally("loader (DALI)")

    def mutate():
        shard, how = f"val-00000{t.m.r.randrange(5)}", t.m.r.random()
        tar, idx = (root / f"{shard}.tar").read_bytes(), (root / f"{shard}.idx").read_bytes()
        if how < 0.25:
            return f"{shard}.idx", *mutated_index(t.m, idx)
        return f"{shard}.tar", *(t.m.raw(tar) if how < 0.5 else member_flip(t.m, tar, idx.decode()))

    cases = [{"what": f"{name}: {what}", "file": name, "data": str(write(tmp_path / f"case-{n}", data))}
             for n, (name, what, data) in enumerate(t.cases(edges, mutate))]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", LOADER, str(root), str(tmp_path / "cases.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (f"exit status {proc.returncode} (negative: a signal) during "
                                  f"{lines[-1]['what'] if lines else 'the start'}\n{proc.stderr[-3000:]}")
    for c in (c for c in lines if "rc" in c):
        err, case = [line for line in c["stderr"].splitlines() if line.strip()], f"loader (DALI) {c['what']}"
        assert c["rc"] in (0, 2), f"{case}: not a read nor exit status 2:\n{c['stderr'][-3000:]}"
        if c["rc"] == 0:
            assert c["images"] == 32 and not err, f"{case}: read {c['images']} of the 32 images: {err}"
        else:
            assert len(err) == 1 and err[0].startswith("error: ") and str(root) in err[0], f"{case}: {err}"
        t.read, t.refused = t.read + (c["rc"] == 0), t.refused + (c["rc"] == 2)
    t.done()
