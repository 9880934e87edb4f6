"""The preprocessed dataset's on-disk format (docs/data-format.md), defined once for its writer
(preprocessing/) and its readers (pipeline/, jobs/, ``jobs.preprocess verify``).

    <root>/dataset.json                 classes, splits and their shards, colour statistics, format
    <root>/<split>-NNNNNN.tar           WebDataset shards (ustar)
    <root>/<split>-NNNNNN.idx           DALI's wds2idx index of each shard
    <root>/<split>/manifest.parquet     one row per input file, whatever happened to it
    <root>/history.json                 one entry per preprocessing run that changed the dataset

Writers publish in this order: shards and indexes, manifests, history.json, dataset.json last. A
reader trusts only what dataset.json lists, and a manifest only grows by rows appended at its end, so
``read_manifest`` returns the rows that the dataset.json it reads describes, even while a run adds data.

Every error here is a ``DataError`` whose message names the file at fault.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import atomic_write, write_if_changed

FORMAT = 1                       # dataset.json "format"
DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
INDEX_VERSION = "v1.2"           # the wds2idx format DALI's fn.readers.webdataset reads
_COUNT = re.compile(r"[0-9]{1,18}")  # an index header's sample count: ASCII digits ("²".isdigit()) int() reads
TAR_BLOCK = 512                  # a tar header's size; every member's data starts one block after it
STATUSES = ("kept", "converted", "resized", "quarantined")
HISTORY_JSON = "history.json"
# Per split in dataset.json: hex sha256 of each shard's bytes, in "shards" order. Datasets written
# before it existed lack it; readers treat it as absent.
SHARDS_SHA256 = "shards_sha256"
# Per split in dataset.json: hex sha256 of each shard's DALI index (.idx), in "shards" order. Datasets
# written before it existed lack it; readers treat it as absent.
INDEXES_SHA256 = "indexes_sha256"
# Per class in dataset.json: the history.json run that added it (0: the first build).
CLASS_RUN = "run"
BASE_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("label", pa.int32()), ("wnid", pa.string()),
    ("shard", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("bytes", pa.int64()), ("sha256", pa.string()),
])
# Localisation columns, all null for an input without an annotation (or quarantined):
#   boxes           the kept boxes, flat x1, y1, x2, y2, ... in stored-image pixels (the box member's
#                   values); [] when annotated but no box was kept
#   boxes_clipped   how many of them were clipped into the image
#   boxes_rejected  each box not kept, "<wnid> <x1> <y1> <x2> <y2>: <reason>" (annotation pixels)
# A manifest of a dataset without annotations is written without them (the bytes it always had);
# ``read_manifest`` gives every manifest all of them, null where the file has none.
BOX_SCHEMA = pa.schema([("boxes", pa.list_(pa.float32())), ("boxes_clipped", pa.int32()),
                        ("boxes_rejected", pa.list_(pa.string()))])
BOX_COLUMNS = tuple(BOX_SCHEMA.names)
MANIFEST_SCHEMA = pa.schema(list(BASE_SCHEMA) + list(BOX_SCHEMA))
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
BASE_COLUMNS = tuple(BASE_SCHEMA.names)

# A sample's boxes (localisation, the paper's Appendix A): the shard member ``<key>.box``, float32
# little-endian, 4 per box, corners (x1, y1, x2, y2) in pixels of the stored JPEG; only samples with at
# least one kept box have it, so a dataset without annotations has no such member at all.
BOX_EXT = "box"
BOX_DTYPE = "<f4"
BOX_BYTES = 16                  # one box: 4 x float32
# Per split in dataset.json, only when the split has any annotation: {"images": stored images with at
# least one kept box, "boxes": kept boxes, "clipped": of them clipped, "rejected": boxes not kept,
# "annotated": stored images with an annotation, "without": stored images without one}.
SPLIT_BOXES = "boxes"

# A sample's index components: (extension, data offset, size, member name).
Component = tuple[str, int, int, str]


class DataError(ValueError):
    """A source, dataset folder or option that cannot be used; the message names the file or setting."""


# ---------------------------------------------------------------- boxes

def encode_boxes(boxes) -> bytes:
    """(N, 4) corners in stored-image pixels -> the ``box`` member's bytes."""
    import numpy as np   # pyarrow needs numpy anyway; imported here to keep the module's top light

    return np.asarray(boxes, dtype=BOX_DTYPE).reshape(-1, 4).tobytes()


def decode_boxes(data: bytes, name: str = "box member"):
    """The ``box`` member's bytes -> (N, 4) float32 corners; ``name`` goes into the error."""
    import numpy as np

    if len(data) % 16:
        raise DataError(f"{name}: {len(data)} bytes is not a whole number of 4-float boxes")
    return np.frombuffer(data, dtype=BOX_DTYPE).reshape(-1, 4)


# ---------------------------------------------------------------- dataset.json

def boxed_images(info: dict, split: str) -> int:
    """How many stored images of ``split`` have a box, from dataset.json's ``boxes`` entry (0: none).
    Readers learn that a split has boxes from here, never by scanning its shards."""
    images = (info.get("splits", {}).get(split, {}).get(SPLIT_BOXES) or {}).get("images", 0)
    return images if isinstance(images, int) and not isinstance(images, bool) else 0


def info_path(root: str | os.PathLike) -> Path:
    return Path(root) / DATASET_JSON


def read_info(root: str | os.PathLike) -> dict:
    """The parsed ``<root>/dataset.json``, checked to be a format this version reads."""
    path = info_path(root)
    if not path.is_file():
        raise DataError(f"{path}: not found; is {root} a folder written by `python -m jobs.preprocess`?")
    try:
        info = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, a number past 4300 digits, nested too deep
        raise DataError(f"{path}: not valid JSON ({str(e)[:200]})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise DataError(f"{path}: format {got!r}; this version reads format {FORMAT}")
    if wrong := _info_problem(info):
        raise DataError(f"{path}: {wrong}; not a dataset.json this version reads")
    return info


def _info_problem(info: dict) -> str:
    """What in dataset.json is not of the type its readers take ("" if nothing); an absent key is
    its reader's business."""
    classes, splits = info.get("classes", []), info.get("splits", {})
    if not (isinstance(classes, list) and all(isinstance(c, dict) for c in classes)
            and isinstance(info.get("stats", {}), (dict, type(None)))):
        return "classes is not a list of objects, or stats not an object"
    if not isinstance(splits, dict) or not all(isinstance(e, dict) for e in splits.values()):
        return "splits is not an object of one object per split"
    for split, e in splits.items():
        shards, counts = e.get("shards", []), [e.get(k, 0) for k in ("num_samples", "inputs")]
        if not (isinstance(shards, list) and all(isinstance(n, str) for n in shards) and isinstance(
                e.get(SPLIT_BOXES, {}), dict) and all(type(n) is int and n >= 0 for n in counts)):
            return (f"split {split!r} needs shards a list of file names, num_samples and inputs whole numbers "
                    f">= 0 and {SPLIT_BOXES} an object")
    return ""


def write_info(root: str | os.PathLike, info: dict) -> bool:
    """Write dataset.json (atomically, only when it changes); True if it wrote."""
    return write_if_changed(info_path(root), (json.dumps(info, indent=1) + "\n").encode())


# ---------------------------------------------------------------- manifest.parquet

def manifest_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / split / MANIFEST


def has_boxes(row: dict) -> bool:
    """Whether a manifest row carries an annotation (any of ``BOX_COLUMNS`` set)."""
    return any(row.get(c) is not None for c in BOX_COLUMNS)


def manifest_bytes(rows: list[dict]) -> bytes:
    """Parquet bytes of manifest rows (dicts with ``BASE_COLUMNS``, and ``BOX_COLUMNS`` for annotated
    inputs), deterministic for the same rows. Without any annotation the box columns are left out, so
    such a dataset's manifest is byte for byte what it was before boxes existed."""
    schema = MANIFEST_SCHEMA if any(has_boxes(r) for r in rows) else BASE_SCHEMA
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_manifest(root: str | os.PathLike, split: str, rows: list[dict]) -> bool:
    path = manifest_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_if_changed(path, manifest_bytes(rows))


def read_manifest(root: str | os.PathLike, split: str, columns: list[str] | None = None,
                  info: dict | None = None) -> pa.Table:
    """The manifest of ``split`` (all columns, or ``columns``), in shard order: the rows that
    ``info`` (default: the dataset.json read now) describes. A run adding data appends rows and
    publishes dataset.json after the manifest, so its first ``inputs`` rows are what ``info`` lists."""
    info = read_info(root) if info is None else info
    path = manifest_path(root, split)
    if not path.is_file():
        raise DataError(f"{path}: manifest of split {split!r} not found")
    table = _with_box_columns(path, columns)
    rows = info.get("splits", {}).get(split, {}).get("inputs")
    if rows is None:  # written before "inputs" existed: the whole manifest
        return table
    if table.num_rows < rows:
        raise DataError(f"{path}: {table.num_rows} rows, but {info_path(root)} says split {split!r} has "
                        f"{rows} inputs; the manifest is older than dataset.json or damaged")
    return table.slice(0, rows)


def _with_box_columns(path: Path, columns: list[str] | None) -> pa.Table:
    """The manifest's ``columns`` (default ``MANIFEST_COLUMNS``); box columns a manifest written
    without them lacks come back null (no annotation), in the order asked for. A file that is not
    parquet, is damaged, or lacks a column or has one of another type is a DataError naming it."""
    want = list(MANIFEST_COLUMNS if columns is None else columns)
    try:
        names = pq.read_schema(path).names
        have = {c for c in names if names.count(c) == 1}
        table = pq.read_table(path, columns=[c for c in want if c in have])
    except (pa.ArrowException, OSError, ValueError) as e:  # not parquet, damaged, cut short
        raise DataError(f"{path}: not a readable manifest ({str(e).strip().splitlines()[0][:200]})") from e
    wrong = [f"no column {c}" for c in want if c not in have and c not in BOX_COLUMNS]
    wrong += [f"column {c} is {t}, not {MANIFEST_SCHEMA.field(c).type}" for c, t in zip(table.column_names,
              table.schema.types) if c in MANIFEST_COLUMNS and t != MANIFEST_SCHEMA.field(c).type]
    if wrong:
        raise DataError(f"{path}: {', '.join(wrong[:5])}; not a manifest this version reads")
    for c in want:
        if c not in have and c in BOX_COLUMNS:
            table = table.append_column(BOX_SCHEMA.field(c), pa.nulls(table.num_rows, BOX_SCHEMA.field(c).type))
    return table.select(want)


# ---------------------------------------------------------------- history.json

def history_path(root: str | os.PathLike) -> Path:
    return Path(root) / HISTORY_JSON


def read_history(root: str | os.PathLike) -> list[dict]:
    """The runs that built ``root`` (oldest first; [] for a dataset written before history.json).
    Each entry: run, when (UTC ISO), source, options, git_commit, tool_version, classes_added,
    added (per split: inputs, stored, kept, converted, resized, quarantined, shards), fingerprint (of
    dataset.json after the run). The entry whose fingerprint is dataset.json's is the latest published."""
    path = history_path(root)
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(history, list):
        raise DataError(f"{path}: expected a list of runs, got {type(history).__name__}")
    return history


# ---------------------------------------------------------------- DALI index files

def index_text(lines: list[str]) -> str:
    """An index file's text from its per-sample lines (``<ext> <offset> <size> <name>`` groups)."""
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def write_index(idx: str | os.PathLike, lines: list[str]) -> int:
    """Write an index atomically; returns its sample count."""
    atomic_write(idx, index_text(lines).encode("ascii"))
    return len(lines)


def parse_index(text: str, name: str = "index") -> list[list[Component]]:
    """Index text -> per sample, its components. ``name`` (the file) and the line go into every error.

    Beyond the syntax: each member name is ``<key>.<ext>`` with the component's extension (the key is
    the name up to the first dot of its last path part, as ``wds2idx`` groups members), a sample's
    members share their key, and no key is in two samples."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not _COUNT.fullmatch(head[1]):
        raise DataError(f"{name}: header {lines[0] if lines else ''!r} is not '{INDEX_VERSION} <samples>'")
    if int(head[1]) != len(lines) - 1:
        raise DataError(f"{name}: says {head[1]} samples but has {len(lines) - 1} lines")
    out, seen = [], {}
    for n, line in enumerate(lines[1:], 2):
        f = line.split(" ")
        numbers = f[1::4] + f[2::4]
        if len(f) % 4 or "" in numbers or not "".join(numbers).isdigit():   # one C call per line
            raise DataError(f"{name} line {n}: {line[:200]!r} is not groups of '<ext> <offset> <size> <name>'")
        key = _sample_key(f, name, n)
        if key in seen:
            raise DataError(f"{name} line {n}: key {key} is also the sample of line {seen[key]}")
        seen[key] = n
        try:
            out.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
        except ValueError as e:          # digits, but more than int() reads (4,300)
            raise DataError(f"{name} line {n}: {e}") from e
        for ext, _, size, member in out[-1]:
            if ext == BOX_EXT and size % BOX_BYTES:      # DALI would fail on it mid-epoch, inside a worker
                raise DataError(f"{name} line {n}: {member} is {size} bytes, not a whole number of "
                                f"{BOX_BYTES}-byte boxes (4 float32 each)")
    return out


def _sample_key(fields: list[str], name: str, n: int) -> str:
    """The key every member of an index line's ``fields`` names as ``<key>.<ext>``, else a DataError."""
    first = fields[3]
    base = first.rfind("/") + 1
    dot = first.find(".", base)
    stem = first[:dot + 1]                                  # "<key>."
    if dot <= base or fields[3::4] != [stem + ext for ext in fields[0::4]]:
        raise DataError(f"{name} line {n}: members {' '.join(fields[3::4])[:200]} are not <key>.<ext> of one "
                        f"key with the extensions {' '.join(fields[0::4])[:100]}")
    return first[:dot]


def index_count(idx: str | os.PathLike) -> int:
    """The sample count in an index file's header line, without reading the rest."""
    with open(idx, "rb") as f:
        head = f.readline(100).decode("ascii", "replace").split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not _COUNT.fullmatch(head[1]):
        raise DataError(f"{idx}: not a DALI webdataset index (expected '{INDEX_VERSION} <count>' "
                        f"on the first line, got {' '.join(head)!r}); delete it to rebuild")
    return int(head[1])


def read_index(idx: str | os.PathLike) -> list[list[Component]]:
    """The parsed index file ``idx`` (``parse_index``); an unreadable or non-ASCII one is a DataError."""
    try:
        return parse_index(Path(idx).read_bytes().decode("ascii"), str(idx))
    except UnicodeDecodeError as e:
        raise DataError(f"{idx}: not an ASCII DALI index ({e}); delete it to rebuild it from its shard") from e


def index_lines_with(idx: str | os.PathLike, ext: str) -> list[str]:
    """The lines of index ``idx`` whose sample has an ``ext`` component, unparsed: ``read_index``'s
    fast path to select the samples of an index ``check_index`` passed (parsing every component costs
    far more at ImageNet's size: docs/pipeline.md, "Boxes"). Only the header's count is checked."""
    # "<ext> <offset> <size> <name>" groups: a name has a dot, an offset is digits, so " ext " is an extension
    first, inner = f"{ext} ", f" {ext} "
    return [line for line in _counted_lines(idx) if line.startswith(first) or inner in line]


def index_keyed_lines(idx: str | os.PathLike) -> list[tuple[str, str]]:
    """(key, line) of every sample of index ``idx``, the line unparsed: the same fast path, for a
    selection by key (``pipeline.epoch_plan``). A line's first member name is ``<key>.<ext>``."""
    out = []
    for line in _counted_lines(idx):
        name = line.split(" ", 4)[3]
        out.append((name[:name.find(".", name.rfind("/") + 1)], line))
    return out


def _counted_lines(idx: str | os.PathLike) -> list[str]:
    """The sample lines of index ``idx``, its header's count checked."""
    lines = Path(idx).read_bytes().decode("ascii", "replace").splitlines() or [""]
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or head[1] != str(len(lines) - 1):
        raise DataError(f"{idx}: header {lines[0]!r} is not '{INDEX_VERSION} {len(lines) - 1}' (its sample count)")
    return lines[1:]


def check_index(idx: str | os.PathLike, tar: str | os.PathLike) -> int:
    """Raise ``DataError`` unless index ``idx`` lists the members of ``tar`` as they are: in tar order,
    each member's header right after the previous member's (padded) data, as the writer lays them out
    (so no member is skipped, moved or read twice), ``offset + size`` inside the file, and the ustar
    header right before ``offset`` (the 512 bytes before a member's data) naming ``<key>.<ext>`` with
    that size. Reads one 512-byte block per member, nothing else of the tar. Returns the sample count.
    What DALI would read from a stale or edited index (another sample's bytes, nothing where a
    member is missing, or past the end of the file, which kills the process) is refused here instead."""
    samples = read_index(idx)
    with open(tar, "rb", buffering=0) as f:
        fd, end = f.fileno(), os.fstat(f.fileno()).st_size
        at = 0                                             # where the next member's header must start
        for n, sample in enumerate(samples, 2):
            for ext, offset, size, member in sample:
                if offset != at + TAR_BLOCK or offset + size > end:
                    why = _misplaced(offset, size, at, end)
                    raise _index_mismatch(idx, tar, n, member, offset, size, why)
                head = os.pread(fd, TAR_BLOCK, at)
                name = member.encode("ascii")
                # the fast path: the name field starts with the name, NUL-ended (unless it is 100
                # bytes), and the size field as our writer and GNU tar write it (11 octal digits)
                if not (head.startswith(name) and (len(name) >= 100 or head[len(name):len(name) + 1] == b"\0")
                        and head[124:135] == b"%011o" % size):
                    found = _member_header(head)
                    if found != (member, size):
                        there = f"is {found[0]!r} ({found[1]} bytes)" if found else "is not a tar header"
                        raise _index_mismatch(idx, tar, n, member, offset, size, f"the member header there {there}")
                at = offset + size + (-size % TAR_BLOCK)
    return len(samples)


def _misplaced(offset: int, size: int, at: int, end: int) -> str:
    """Why a member's (offset, size) cannot be the next member, whose header starts at ``at``."""
    if offset + size > end and offset == at + TAR_BLOCK:
        return f"that ends at byte {offset + size}, past the tar's end ({end} bytes)"
    before = f"the member before it ends at byte {at}" if at else "the tar's first member"
    return (f"{before}, so its data must start at byte {at + TAR_BLOCK}: the index skips, moves or repeats "
            "members there")


def _member_header(head: bytes) -> tuple[str, int] | None:
    """(name, size) of a ustar header block (the prefix field joined to the name), or None when
    ``head`` is not a valid header (checksum)."""
    try:
        info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None
    return info.name, info.size


def _index_mismatch(idx, tar, line: int, member: str, offset: int, size: int, why: str) -> DataError:
    key = member[:member.find(".", member.rfind("/") + 1)]
    return DataError(f"{tar}: key {key}: {idx} line {line} puts {member} at byte {offset} ({size} bytes), "
                     f"but {why}; the index does not match its shard: delete {Path(idx).name} to rebuild it "
                     f"from the shard, or run `python -m jobs.preprocess verify {Path(tar).parent}`")


def scan_index_lines(tar: str | os.PathLike) -> list[str]:
    """The index lines of an existing tar, as DALI's ``wds2idx`` writes them: a sample's members are
    consecutive regular files sharing the name up to the first dot; hidden files are skipped."""
    samples: list[list[Component]] = []
    last = None
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                base_dir = m.name.rfind("/") + 1
                dot = m.name.find(".", base_dir)
                if not m.isreg() or dot < 0 or dot == base_dir:
                    continue
                base, component = m.name[:dot], (m.name[dot + 1:], m.offset_data, m.size, m.name)
                if base != last:
                    samples.append([])
                    last = base
                samples[-1].append(component)
    except tarfile.TarError as e:
        raise DataError(f"{tar}: not a readable tar ({e})") from e
    if not samples:
        raise DataError(f"{tar}: holds no samples")
    return [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) for sample in samples]
