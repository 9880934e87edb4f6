"""Annotation files are inputs like images (docs/preprocessing.md, "Boxes"): an edit that would give an
image already planned other boxes is refused naming the file, after a completed run and after a killed
one (never a manifest mixing two versions), and the history records which file built which shards;
the readers turn bad bytes, repeated ids, rows without a comma and damaged state files into one line or
a listed problem, never a traceback. Tiny synthetic sources, built in-process; the CLI in-process too."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from jobs import cli
from jobs.preprocess import main
from odd_sample import Killed, build, crash_after, mtimes, shard_samples, snapshot
from preprocessing import synthetic
from preprocessing.annotations import read_voc_dir
from preprocessing.plan import read_plan
from preprocessing.report import BOX_PROBLEMS
from storage import dataformat as fmt
from storage.dataformat import DataError

SHARD = 2  # 6 train images: 3 shards; 4 val images: 2 shards




def source(tmp_path: Path, name: str = "src") -> Path:
    return synthetic.generate(tmp_path / name, classes=2, train_per_class=3, val_per_class=2, size_range=(48, 64))


def rows_of(csv: Path) -> dict[str, str]:
    """image id -> its prediction string."""
    return dict(line.split(",", 1) for line in csv.read_text().splitlines()[1:])


def write_rows(csv: Path, rows: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    csv.write_text("\n".join(["ImageId,PredictionString", *(f"{k},{v}" for k, v in rows.items()), *extra]) + "\n")


def run_cli(capsys, *args) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr's lines) of ``python -m jobs.preprocess ARGS``, in this process."""
    argv = [str(a) for a in args]
    if argv[0] not in ("report", "verify"):
        argv += ["--workers", "1", "--no-progress"]
    rc = cli.run(main, argv)
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


def one_error_line(rc: int, err: list[str]) -> str:
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def train_boxes(out: Path) -> tuple[dict, dict]:
    """({source stem: manifest boxes}, {source stem: box member as a flat list, or None}) of train."""
    rows = {r["key"]: r for r in fmt.read_manifest(out, "train").to_pylist()}
    members = {s["key"]: fmt.decode_boxes(s["box"]).reshape(-1).tolist() if "box" in s else None
               for s in shard_samples(out, "train")}
    return ({Path(r["source"]).stem: r["boxes"] for r in rows.values()},
            {Path(rows[k]["source"]).stem: v for k, v in members.items()})


def test_an_edited_csv_after_a_completed_run_is_refused_naming_it(tmp_path, capsys):
    src, out = source(tmp_path), tmp_path / "out"
    csv = src / "LOC_train_solution.csv"
    build(src, out, shard_size=SHARD)
    first_sha = hashlib.sha256(csv.read_bytes()).hexdigest()
    assert fmt.read_history(out)[0]["annotations"]["train"] == {
        "file": str(csv), "sha256": first_sha, "shards": fmt.read_info(out)["splits"]["train"]["shards"]}
    before, state = snapshot(out), (out / ".preprocess" / "state.json").read_bytes()
    rows = rows_of(csv)
    stem = sorted(rows)[0]
    original = dict(rows)
    rows[stem] = f"{rows[stem].split()[0]} 1 2 17 19"
    write_rows(csv, rows)

    line = one_error_line(*run_cli(capsys, src, out)[::2])
    assert line.startswith(f"error: {csv}: 1 images that {out} already planned would get other boxes")
    assert f"1 changed, 0 no longer annotated; e.g. train/{stem.split('_')[0]}/{stem}.JPEG" in line
    assert f"sha256 {first_sha[:16]}" in line and "rebuild into a fresh OUT" in line
    assert snapshot(out) == before and (out / ".preprocess" / "state.json").read_bytes() == state  # nothing written
    write_rows(csv, {k: v for k, v in original.items() if k != stem})  # its row deleted
    line = one_error_line(*run_cli(capsys, src, out)[::2])
    assert line.startswith(f"error: {csv}: 1 images") and "0 changed, 1 no longer annotated" in line
    write_rows(csv, rows)

    # The option that applies the edit: a fresh OUT, whose boxes and history are the new file's.
    fresh = tmp_path / "fresh"
    rc, log, err = run_cli(capsys, src, fresh, "--shard-size", SHARD)
    assert rc == 0, err
    manifest, members = train_boxes(fresh)
    assert manifest[stem] == members[stem] == [1, 2, 17, 19]
    assert fmt.read_history(fresh)[0]["annotations"]["train"]["sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()

    # Back as it was, plus a row for an image SOURCE does not hold: no planned image changes.
    write_rows(csv, original, extra=("n00000000_9,n00000000 1 1 5 5",))
    rc, log, err = run_cli(capsys, src, out)
    assert rc == 0, err
    assert f"train: {csv} changed since {out} last read it; every image already planned keeps" in log
    assert "nothing to do" in log and snapshot(out) == before
    recorded = json.loads((out / ".preprocess" / "state.json").read_text())["annotations"]["train"]
    assert recorded == {"file": str(csv), "sha256": hashlib.sha256(csv.read_bytes()).hexdigest()}
    rc, report, _ = run_cli(capsys, "report", out)
    assert "run 0: " in report and f"train boxes from LOC_train_solution.csv sha256 {first_sha[:12]} (3 new shards)" \
        in report


@pytest.mark.parametrize("case", ["written", "unwritten", "appeared"])
def test_a_killed_run_resumed_with_an_edited_csv_never_mixes_two_versions(tmp_path, case):
    """``written``/``unwritten``: boxes of an image in a shard the killed run wrote / had not written yet
    change: refused, nothing published; with the file put back, the resumed run equals an uninterrupted
    one. ``appeared``: a row arrives for an image planned without one: it stays without boxes (as the
    uninterrupted run has it), and the run says so."""
    src = source(tmp_path)
    csv = src / "LOC_train_solution.csv"
    rows = full = rows_of(csv)
    if case == "appeared":  # one class planned without annotations: 3 images, so 1 or more not in the first shard
        rows = {k: v for k, v in full.items() if not k.startswith(sorted(full)[0].split("_")[0])}
        write_rows(csv, rows)
    ref, out = tmp_path / "ref", tmp_path / "out"
    build(src, ref, shard_size=SHARD)
    with pytest.raises(Killed):
        build(src, out, shard_size=SHARD, map_fn=crash_after(1))
    assert [p.name for p in out.glob("*.tar")] == ["train-000000.tar"] and not fmt.info_path(out).exists()
    done = mtimes(out)
    shard_of = {Path(r["source"]).stem: r["shard"] for r in read_plan(out, "train")}
    if case == "appeared":
        bare = next(s for s in sorted(full) if s not in rows and shard_of[s] != "train-000000")
        write_rows(csv, {**rows, bare: full[bare]})
        _, log = build(src, out, shard_size=SHARD)
        assert "warning: train: 1 stored images have an annotation now but were written without one" in log
        assert train_boxes(out)[1][bare] is None and snapshot(out) == snapshot(ref)
        return
    stem = next(s for s in sorted(rows) if (shard_of[s] == "train-000000") == (case == "written"))
    edited = {**rows, stem: f"{rows[stem].split()[0]} 1 2 17 19"}
    write_rows(csv, edited)
    with pytest.raises(DataError, match=rf"^{re.escape(str(csv))}: 1 images that .* already planned would get other "
                                        rf"boxes .*{stem}"):
        build(src, out, shard_size=SHARD)
    assert not fmt.info_path(out).exists() and not fmt.manifest_path(out, "train").exists()
    assert mtimes(out) == done  # nothing written
    write_rows(csv, rows)
    build(src, out, shard_size=SHARD)
    assert snapshot(out) == snapshot(ref) and mtimes(out)["train-000000.tar"] == done["train-000000.tar"]


def test_a_byte_that_is_not_utf8_in_the_csv_is_one_line_naming_file_and_line(tmp_path, capsys):
    src, out = source(tmp_path), tmp_path / "out"
    csv = src / "LOC_train_solution.csv"
    lines = csv.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b" ", b" \xff", 1)  # line 3
    csv.write_bytes(b"\r\n".join(lines))  # CRLF ends: still line 3
    line = one_error_line(*run_cli(capsys, src, out)[::2])
    assert line == f"error: {csv}:3: byte 0xff is not UTF-8; save the file as UTF-8"
    assert not out.exists()  # refused before writing anything


def test_a_byte_that_is_not_utf8_in_the_val_csv_is_one_line_too(tmp_path, capsys):
    """The val CSV is read first for the flat val folder's labels: the same one line."""
    src, out = source(tmp_path), tmp_path / "out"
    csv = src / "LOC_val_solution.csv"
    lines = csv.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b" ", b" \xff", 1)  # line 2
    csv.write_bytes(b"\n".join(lines))
    line = one_error_line(*run_cli(capsys, src, out)[::2])
    assert line == f"error: {csv}:2: byte 0xff is not UTF-8; save the file as UTF-8"
    assert not out.exists()


def test_repeated_ids_and_rows_without_a_comma_are_counted_and_listed(tmp_path, capsys):
    src, out = source(tmp_path), tmp_path / "out"
    csv = src / "LOC_train_solution.csv"
    rows = rows_of(csv)
    stem = sorted(rows)[0]
    wnid = rows[stem].split()[0]
    write_rows(csv, rows, extra=(f"{stem},{wnid} 1 2 17 19", "no comma on this line"))
    rc, log, err = run_cli(capsys, src, out, "--shard-size", SHARD)
    assert rc == 0, err
    n = len(rows) + 2  # the repeated row's line: header, the rows, then it
    assert "; 1 unreadable rows or objects; 1 rows repeat an earlier row's image id (not used)" in log
    assert "annotations: 1 rows or objects could not be read, 1 rows repeat an earlier row's image id" in log
    problems = json.loads((out / ".preprocess" / BOX_PROBLEMS).read_text())
    assert problems == [f"{csv}:{n}: {stem}: repeats the image id of line {sorted(rows).index(stem) + 2}: row not used",
                        f"{csv}:{n + 1}: no comma in 'no comma on this line' (rows are ImageId,PredictionString): "
                        "row not used"]
    assert all(f"  {p}" in log for p in problems)
    manifest, members = train_boxes(out)
    assert manifest[stem] == members[stem] == [float(v) for v in rows[stem].split()[1:]]  # the first row's
    rc, report, _ = run_cli(capsys, "report", out)
    assert f"box repeated {problems[0]}" in report and f"box unreadable {problems[1]}" in report


@pytest.mark.parametrize("damage", [b"{\"format\": ", b"\xff\xfe{}", b"[]", b"{\"format\": %d, \"seed\": 0}"])
def test_a_damaged_state_json_is_one_line_naming_it(tmp_path, capsys, damage):
    src, out = source(tmp_path), tmp_path / "out"
    build(src, out, shard_size=SHARD, splits=["val"])
    state = out / ".preprocess" / "state.json"
    state.write_bytes(damage.replace(b"%d", str(fmt.FORMAT).encode()))
    line = one_error_line(*run_cli(capsys, src, out)[::2])
    assert line.startswith(f"error: {state} is damaged (") and "restore it from a copy, or rebuild" in line


def test_a_damaged_box_problems_json_is_one_line_naming_it_and_a_rerun_rewrites_it(tmp_path, capsys):
    src, out = source(tmp_path), tmp_path / "out"
    build(src, out, shard_size=SHARD, splits=["val"])
    problems = out / ".preprocess" / BOX_PROBLEMS
    for damage in (b"[\"half a li", b"{\"a\": 1}"):
        problems.write_bytes(damage)
        line = one_error_line(*run_cli(capsys, "report", out)[::2])
        assert line.startswith(f"error: {problems} is damaged (") and f"jobs.preprocess SOURCE {out}" in line
    rc, _, err = run_cli(capsys, src, out)
    assert rc == 0 and json.loads(problems.read_text()) == [], err
    assert run_cli(capsys, "report", out)[0] == 0


def test_xml_that_is_not_utf8_or_not_readable_is_a_listed_problem(tmp_path):
    d = tmp_path / "Annotations" / "CLS-LOC" / "val"
    d.mkdir(parents=True)
    good = b"<annotation><object><name>n01</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax>" \
           b"</bndbox></object></annotation>"
    files = {"ok": good, "bad_byte": good.replace(b"n01", b"n\xff1"),
             "unknown_encoding": b'<?xml version="1.0" encoding="bogus"?><annotation/>',
             "multibyte": b'<?xml version="1.0" encoding="shift_jis"?><annotation/>',
             "infinite_size": b"<annotation><size><width>inf</width><height>3</height></size></annotation>"}
    for name, data in files.items():
        (d / f"{name}.xml").write_bytes(data)
    ann = read_voc_dir(d)
    assert ann.boxes == {"ok": [("n01", 1., 2., 3., 4.)], "infinite_size": []} and ann.sizes == {}
    assert sorted(Path(p.split(": ")[0]).stem for p in ann.problems) == ["bad_byte", "multibyte", "unknown_encoding"]
    assert all("not readable XML" in p for p in ann.problems)
    (d / "ok.xml").write_bytes(good.replace(b"<xmin>1", b"<xmin>0"))
    assert read_voc_dir(d).sha256 != ann.sha256  # the folder's digest follows its files
