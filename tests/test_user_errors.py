"""Every entry point meets a user's mistake the same way: one ``error:`` line on stderr naming the
key, file or option at fault, exit status 2, no traceback (jobs/cli.py). Each user-facing error
class is raised by at least one case, in a real ``python -m`` process. The processes start together:
most of their time is importing torch."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli
from jobs.cli import UsageError
from pipeline import checkpoint as ckpt
from pipeline import config
from storage.dataformat import DataError
from storage.files import StorageError

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "jobs" / "configs" / "demo.yaml")

# (case id, error class, argv after "python -m", what the line must name); {tmp} is the test's folder,
# {data} the session's sample dataset.
# The first case of each entry point also runs as a real process.
CASES = [
    ("train-unknown-key", config.ConfigError, ["jobs.train", "--set", "model.colour=red"], "model.colour"),
    ("train-missing-config", FileNotFoundError, ["jobs.train", "--config", "{tmp}/nope.yaml"], "nope.yaml"),
    ("train-unwritable-storage", StorageError, ["jobs.train", "--config", DEMO, "--set", "data.root={data}",
                                                "--set", "run.storage_path={tmp}/good.pt/runs"], "run.storage_path"),
    ("train-no-dataset", DataError, ["jobs.train", "--config", DEMO, "--set", "data.root=/nonexistent"],
     "/nonexistent/dataset.json"),
    ("evaluate-damaged-checkpoint", ckpt.CheckpointError, ["jobs.evaluate", "--run", "{tmp}/damaged.pt"],
     "damaged.pt"),
    ("evaluate-no-checkpoint", FileNotFoundError, ["jobs.evaluate", "--run", "{tmp}/no-run"], "no-run"),
    ("evaluate-bad-mode", UsageError, ["jobs.evaluate", "--run", "{tmp}/good.pt", "--mode", "sideways"], "--mode"),
    ("features-bad-scales", UsageError, ["jobs.features", "--run", "{tmp}/good.pt", "--out", "{tmp}/f.parquet",
                                         "--scales", "8"], "--scales"),
    ("features-bad-workers", UsageError, ["jobs.features", "--run", "{tmp}/good.pt", "--out", "{tmp}/f.parquet",
                                          "--workers", "0"], "--workers"),
    ("preprocess-no-source", DataError, ["jobs.preprocess", "{tmp}/no-source", "{tmp}/out"], "no-source"),
    ("preprocess-bad-shard-size", DataError, ["jobs.preprocess", "{tmp}", "{tmp}/out", "--shard-size", "lots"],
     "--shard-size"),
    ("verify-not-a-dataset", DataError, ["jobs.preprocess", "verify", "{tmp}"], "dataset.json"),
    ("sample-no-classes", DataError, ["jobs.sample", "{tmp}/sample", "--classes", "0"], "--classes"),
    ("demo-unknown-key", config.ConfigError, ["jobs.demo", "--out", "{tmp}/demo", "--set", "run.colour=red"],
     "run.colour"),
    ("bench-unknown", UsageError, ["jobs.bench", "speed"], "speed"),
    ("transfer-one-split", UsageError, ["jobs.transfer", "--run", "{tmp}/good.pt", "--out", "{tmp}/t",
                                        "--split", "train"], "--train-per-class"),
    ("config-unknown-section", UsageError, ["jobs.config", "optimiser"], "optimiser"),
    ("submit-missing-data", config.ConfigError, ["jobs.submit", "train", "--set", "data.root=nowhere-to-be-found"],
     "data.root"),
]
IDS = [c[0] for c in CASES]
FIRST_OF_EACH = [c for i, c in enumerate(CASES) if c[2][0] not in {d[2][0] for d in CASES[:i]}]
MAIN = {"jobs.bench": "jobs.bench.__main__"}


def test_every_user_error_class_is_covered():
    assert {cls for _, cls, _, _ in CASES} == set(cli.USER_ERRORS)


def prepare(tmp: Path) -> None:
    """A real tiny checkpoint (good.pt) and the same cut short (damaged.pt)."""
    cfg = config.load(None, ["model.width=0.03125", "model.num_classes=4", "data.crop_size=32",
                             "data.scale_min=32", "data.scale_max=32"])
    state = {"model": ckpt.build_model(cfg, 4).state_dict(), "config": config.dump(cfg), "num_classes": 4}
    ckpt.save_checkpoint(ckpt.weights_only(state), tmp / "good.pt")
    (tmp / "damaged.pt").write_bytes((tmp / "good.pt").read_bytes()[:1000])


@pytest.fixture(scope="module")
def processes(tmp_path_factory, sample_dataset) -> dict[str, subprocess.CompletedProcess]:
    """The first mistake of every entry point, each in its own ``python -m`` process, all at once."""
    tmp = tmp_path_factory.mktemp("mistakes")
    prepare(tmp)
    procs = {case: subprocess.Popen([sys.executable, "-m", *(a.format(tmp=tmp, data=sample_dataset) for a in argv)],
                                    cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for case, _, argv, _ in FIRST_OF_EACH}
    out = {}
    for case, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[case] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def assert_one_error_line(returncode: int, stderr: str, names: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert names in lines[0]


@pytest.mark.parametrize("case, cls, argv, names", FIRST_OF_EACH, ids=[c[0] for c in FIRST_OF_EACH])
def test_every_entry_point_process_ends_a_mistake_with_one_line_and_status_2(processes, case, cls, argv, names):
    assert_one_error_line(processes[case].returncode, processes[case].stderr, names)


@pytest.mark.parametrize("case, cls, argv, names", CASES, ids=IDS)
def test_each_mistake_raises_its_class_and_becomes_one_line(case, cls, argv, names, tmp_path, monkeypatch,
                                                             capsys, sample_dataset):
    prepare(tmp_path)
    monkeypatch.chdir(ROOT)
    main = importlib.import_module(MAIN.get(argv[0], argv[0])).main
    args = [a.format(tmp=tmp_path, data=sample_dataset) for a in argv[1:]]
    with pytest.raises(cls):
        main(args)
    capsys.readouterr()
    code = cli.run(main, args)
    assert_one_error_line(code, capsys.readouterr().err, names)
