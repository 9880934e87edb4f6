"""An evaluation's labels: each image's top-5 classes (best first) and their posteriors, from the last
row of a classification evaluation (all its Qs together, or its ensemble), as ``labels.parquet`` in
its results folder and its MLflow results run. A localisation evaluation takes them as protocol (b)'s
classes, as the paper took its best classification system's (``--labels``). One writer, one reader."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from jobs.cli import UsageError
from jobs.tracking import results as tracking_results
from pipeline import evaluate as E

FILENAME = "labels.parquet"
BOXES = "boxes"        # no labels given: the classifiers' classes ranked by their merged boxes' scores


def to_parquet(shares: list[E.ShareResult], protocol: E.Protocol) -> bytes:
    """key, label, top5 (list<int32>), posteriors (list<float32>) of every image, sorted by key, for
    the last reported mode's last row; which row it is goes in the schema's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    mode, row = E.rows(protocol)[-1]
    keys = [k for s in shares for k in s.keys]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    top = torch.cat([s.top[(mode, row)] for s in shares])[order]
    post = torch.cat([s.top_posteriors[mode] for s in shares])[order].float()
    labels = torch.cat([s.labels for s in shares])[order]
    table = pa.table({"key": [keys[i] for i in order], "label": pa.array(labels.numpy(), pa.int32()),
                      "top5": pa.array(top.int().tolist(), pa.list_(pa.int32())),
                      "posteriors": pa.array(post.tolist(), pa.list_(pa.float32()))},
                     metadata={"mode": mode, "row": row})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read(path: str | Path) -> dict[str, torch.Tensor]:
    """key -> (k,) classes, best first, of a file ``to_parquet`` wrote; a file that is not one is a
    UsageError naming it."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path, columns=["key", "top5"])
    except (OSError, pa.ArrowException, KeyError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"--labels {path}: not a classification evaluation's {FILENAME} ({why})") from None
    key, top5 = t.schema.field("key").type, t.schema.field("top5").type
    flat = pc.list_flatten(t.column("top5")) if pa.types.is_list(top5) else None
    if not (pa.types.is_string(key) and flat is not None and pa.types.is_signed_integer(flat.type)) \
            or t.column("key").null_count or t.column("top5").null_count or flat.null_count:
        raise UsageError(f"--labels {path}: not a classification evaluation's {FILENAME} (key {key}, top5 {top5}, "
                         "or a null in them; it has key string, top5 list<int32>)")
    t = t.to_pydict()
    return {k: torch.tensor(c, dtype=torch.long) for k, c in zip(t["key"], t["top5"])}


def resolve(spec: str, tracking_uri: str) -> tuple[str, str]:
    """(the labels file, a short name for the results table) of ``--labels``: a results folder, its
    ``labels.parquet``, or the MLflow id of an evaluation's results run (its artifact, downloaded)."""
    run_id = tracking_results.run_id_of(spec)
    if run_id and not Path(spec).exists():
        if not tracking_uri:
            raise UsageError(f"--labels {spec} looks like an MLflow run id, but no tracking URI is set "
                             "(--tracking-uri or $MLFLOW_TRACKING_URI)")
        return tracking_results.artifact_of_run(run_id, FILENAME, tracking_uri), f"eval {run_id[:8]}"
    path = Path(spec) / FILENAME if Path(spec).is_dir() else Path(spec)
    if not path.is_file():
        raise UsageError(f"--labels {spec}: no {FILENAME} there; give a classification evaluation's results "
                         f"folder (python -m jobs.evaluate --out DIR), its {FILENAME}, or its MLflow run id")
    return str(path), f"eval {path.parent.name}"


def check_cover(given: dict[str, torch.Tensor], expected: dict[str, int], num_classes: int, spec: str) -> None:
    """Every image of the split has its labels (the evaluation ran on the same split), each image the
    same number of classes (1 to 5), each a class of the nets."""
    missing = [k for k in expected if k not in given]
    if missing:
        raise UsageError(f"--labels {spec}: {len(missing)} of the split's {len(expected)} images have no labels "
                         f"there (e.g. {missing[0]}): evaluate the same split first")
    sizes = {len(given[k]) for k in expected}
    if len(sizes) != 1 or not 1 <= min(sizes) <= 5:
        raise UsageError(f"--labels {spec}: each image needs the same number of classes, 1 to 5; found {sorted(sizes)}")
    top = max(int(given[k].max()) for k in expected) if expected else 0
    low = min(int(given[k].min()) for k in expected) if expected else 0
    if low < 0 or top >= num_classes:
        raise UsageError(f"--labels {spec}: class {top if top >= num_classes else low} is not one of the nets' "
                         f"{num_classes} classes: evaluated with nets of another dataset?")
