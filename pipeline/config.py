"""One typed config tree, loaded from YAML with ``--set a.b=c`` overrides.

Every key is declared once, as its dataclass field made by ``key()``: type, default, meaning (what
``python -m jobs.config`` prints), allowed values (choices, or a check with the words its error gives)
and whether a resume may change it (jobs/driver/resume.py); ``RANGES``, ``OWN_CHOICES``, ``choices()``
and resume's ``MAY_CHANGE`` are derived from those fields. A key whose list of values belongs to the
module that acts on it names that list as ``"module:NAME"``, imported only when a config is validated,
so that importing this module never imports torch. A key nobody declared, or a value of the wrong
type, is an error naming the key and what is allowed. The resolved tree is dumped back to YAML (into
MLflow and every checkpoint) and flattened to ``section.key`` params for MLflow.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


_YAML11_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def key(default: Any, meaning: str, *, choices: tuple[str, ...] | str | None = None,
        check: typing.Callable[[Any], bool] | None = None, needs: str = "", resume: bool = False,
        default_factory: typing.Callable[[], Any] | None = None) -> Any:
    """One config key, declared once: its default (or ``default_factory``), its meaning (what
    ``python -m jobs.config`` prints), the values it allows (``choices``: a tuple, or the
    ``"module:NAME"`` of the list the module that acts on the value owns; or a ``check`` with the
    words ``needs`` the error gives), and whether a resume may change it (``resume``)."""
    if not meaning.strip() or bool(check) != bool(needs):
        raise TypeError(f"key({default!r}): needs a meaning, and a check only with the words it needs")
    metadata = {"meaning": meaning, "choices": choices, "check": check, "needs": needs, "resume": resume}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    name: str = key("A", "A, A-LRN, B, C, D, E or vgg11 ... vgg19")
    width: float = key(1.0, "scales every channel count (conv and FC); 1.0 = the paper",
                       check=lambda v: v > 0, needs="> 0")
    num_classes: int = key(1000, "0 = read from dataset.json",
                           check=lambda v: v >= 0, needs=">= 0 (0 reads it from dataset.json)")
    init: str = key("paper", "paper (N(0, 0.01)) | glorot | kaiming", choices="model.init:INITS")
    # init_from, init_from_mode, reinit_head may change on resume: a resume takes its checkpoint's weights
    init_from: str = key("", '"" | checkpoint path or "runs:/<mlflow run id>" of the parent', resume=True)
    init_from_mode: str = key("all", "all: the parent's whole state_dict (S=384 from S=256) | "
                              "a: the paper's first-four-convs + FCs from a trained A",
                              choices=("all", "a"), resume=True)
    reinit_head: bool = key(False, "start FC8 afresh instead of taking the parent's (another class count)",
                            resume=True)
    dropout: float = key(0.5, "dropout ratio of FC6 and FC7 (the paper's 0.5)",
                         check=lambda v: 0 <= v < 1, needs="in [0, 1)")
    head: str = key("classes", "classes | scr | pcr: FC8 scores the classes, or predicts one box (scr) or one "
                    "per class (pcr), the paper's localisation (Appendix A)", choices="model.vgg:HEADS")
    train_layers: str = key("all", "all | fc: fine-tune every layer, or only FC6-FC8 (the convs frozen)",
                            choices=("all", "fc"))
    box_bias: str = key("zero", "zero | mean: a new box head's FC8 bias starts at 0 (the paper's random last "
                        "layer) or at the training split's mean box, which spares a small net the mean-box "
                        "phase (docs/localisation.md)", choices=("zero", "mean"), resume=True)


@dataclass
class DataConfig:
    # data.root may change on resume: the same data elsewhere, the dataset fingerprint is compared instead
    root: str = key("data/imagenet", "folder written by `python -m jobs.preprocess`", resume=True)
    train_split: str = key("train", "the split the net trains on (a folder name in data.root)")
    val_split: str = key("val", "the split validated after each epoch, and evaluated")
    crop_size: int = key(224, "the training crop's side in pixels (the paper: 224)",
                         check=lambda v: v >= 1, needs=">= 1")
    scale_min: int = key(256, "training scale S; scale_min == scale_max is a fixed S")
    scale_max: int = key(256, "S ~ U[scale_min, scale_max] per image when larger")
    test_scale: int = key(0, "Q for validation; 0 = S, or (Smin+Smax)/2 when jittered",
                          check=lambda v: v == 0 or v >= 1, needs=">= 1, or 0 for the default")
    flip: bool = key(True, "random horizontal flips in training")
    color_shift_std: float = key(0.1, "std of the PCA colour-shift alphas; 0 disables it",
                                 check=lambda v: v >= 0, needs=">= 0")
    mean_subtraction: bool = key(True, "subtract dataset.json's training mean RGB")
    decode: str = key("mixed", "mixed (GPU nvJPEG) | cpu; CPU-only machines always use cpu",
                      choices="pipeline.augment:DECODES", resume=True)
    hw_decoder_load: float = key(1.0, "share of JPEGs for the hardware JPEG decoder (A100/H100); see README",
                                 check=lambda v: 0 <= v <= 1, needs="in [0, 1]", resume=True)
    threads: int = key(4, "DALI CPU threads per worker", check=lambda v: v >= 1, needs=">= 1", resume=True)
    prefetch: int = key(2, "DALI prefetch queue depth", check=lambda v: v >= 1, needs=">= 1", resume=True)
    layout: str = key("NCHW", "NCHW | NHWC (channels_last)", choices="pipeline.augment:LAYOUTS")
    dtype: str = key("float32", "float32 | bfloat16 | float16 (the last two on GPU)",
                     choices="pipeline.augment:DTYPES")
    shuffle_buffer: int = key(4096, "DALI reader's shuffle buffer (shards are globally shuffled)",
                              check=lambda v: v >= 1, needs=">= 1")
    eval_batch_size: int = key(0, "0 = the per-worker training batch", resume=True,
                               check=lambda v: v >= 0, needs=">= 0 (0 is the training batch per worker)")
    val_mode: str = key("center", "center | dense: the per-epoch validation", choices=("center", "dense"))


@dataclass
class OptimConfig:
    lr: float = key(1e-2, "SGD learning rate at the start (the paper: 10^-2)", check=lambda v: v > 0, needs="> 0")
    momentum: float = key(0.9, "SGD momentum (the paper: 0.9)", check=lambda v: 0 <= v < 1, needs="in [0, 1)")
    weight_decay: float = key(5e-4, "L2 penalty multiplier (the paper: 5 * 10^-4)",
                              check=lambda v: v >= 0, needs=">= 0")
    decay_bias: bool = key(False, "biases are not decayed (see docs/training.md)")
    nesterov: bool = key(False, "Nesterov momentum (not the paper's)")
    fused: bool = key(False, "torch's fused SGD kernel (GPU)")


def _increasing(v: list[int]) -> bool:
    return all(1 <= a < b for a, b in zip(v, [*v[1:], float("inf")]))


@dataclass
class ScheduleConfig:
    epochs: int = key(74, "the paper stopped after 370K iterations = 74 epochs",
                      check=lambda v: v >= 1, needs=">= 1", resume=True)
    # patience, min_delta, cooldown, smoothing: the assumption behind their defaults is in patience's meaning
    patience: int = key(5, "counted epochs without a val top-1 improvement before dividing lr; "
                        "patience, min_delta, cooldown, smoothing: assumption: the paper says only \"when the "
                        "validation set accuracy stopped improving\"; these defaults are chosen by `python -m "
                        "jobs.bench schedule --grid`, a simulation of noisy (50,000-image val) and creeping "
                        "curves (docs/training.md, \"The plateau rule\")", check=lambda v: v >= 1, needs=">= 1")
    factor: float = key(0.1, "what each decay multiplies the rate by (the paper: 0.1)",
                        check=lambda v: 0 < v < 1, needs="in (0, 1)")
    max_decays: int = key(3, "the paper divided the rate 3 times in all", check=lambda v: v >= 0, needs=">= 0")
    min_delta: float = key(0.01, "an improvement must beat the last one's (smoothed) error by more than this "
                           "(a fraction: 0.01 = 500 of ImageNet's 50,000 val images)",
                           check=lambda v: 0 <= v < 1, needs="in [0, 1) (a fraction of the val images)")
    cooldown: int = key(2, "epochs after a decay whose lack of improvement is not counted",
                        check=lambda v: v >= 0, needs=">= 0")
    smoothing: float = key(0.7, "the rule judges an exponential moving average of the val error with this "
                           "weight on the past (0: each epoch's error alone)",
                           check=lambda v: 0 <= v < 1, needs="in [0, 1)")
    milestones: list[int] = key(MISSING, "epochs done after which lr is divided, e.g. [30, 50, 65]; replaces "
                                "the plateau rule; [] = plateau rule", default_factory=list,
                                check=_increasing, needs="strictly increasing epoch counts >= 1")
    stop_after_max_decays: bool = key(False, "stop early once the rate was divided max_decays times and stalls")

    def __post_init__(self) -> None:
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            raise ConfigError(f"schedule.milestones: {late} would never be reached in "
                              f"schedule.epochs {self.epochs}; each must be below it")


@dataclass
class RunConfig:
    name: str = key("vgg", "the same name resumes; a fresh start needs a new name")
    resume: str = key("auto", "auto: resume run.name if it has a checkpoint | never: refuse if it has one | "
                      "must: refuse if it has none", choices=("auto", "never", "must"), resume=True)
    storage_path: str = key("runs", "local folder or a pyarrow/fsspec URI (s3://...)")
    workers: int | str | list[int] = key(
        2, "Ray Train workers (data-parallel replicas), one GPU each with use_gpu: a count (4), or a range "
        "(2-8, YAML [2, 8]) for elastic training: start with what is free, shrink when a node goes, grow back",
        check=lambda v: _worker_range(v) is not None, needs="a count >= 1 or a range lo-hi with 1 <= lo <= hi",
        resume=True)
    use_gpu: bool = key(False, "one GPU per worker (DALI mixed decode, bf16); false: CPU and gloo", resume=True)
    cpus_per_worker: int = key(1, "CPUs Ray reserves for each worker (and its torch threads on CPU)",
                               check=lambda v: v >= 1, needs=">= 1", resume=True)
    placement_strategy: str = key("PACK", "Ray placement of the workers: PACK | SPREAD | STRICT_PACK | "
                                  "STRICT_SPREAD", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                                  resume=True)
    wait_for_nodes: bool = key(False, "workers that no live node set can hold: wait (an autoscaling cluster "
                               "adds nodes) instead of refusing before the run starts", resume=True)
    global_batch_size: int = key(256, "whatever the worker count: each worker takes global / workers, the "
                                 "first (global % workers) one more (docs/training.md)",
                                 check=lambda v: v >= 1, needs=">= 1")
    micro_batch_size: int = key(0, "0 = a worker's share in one pass; else gradient accumulation over parts "
                                "of at most this many images (when the share does not fit the device)",
                                check=lambda v: v >= 0, needs=">= 0 (0: no accumulation)", resume=True)
    seed: int = key(0, "seeds the initial weights and the data order")
    max_failures: int = key(0, "Ray Train FailureConfig", check=lambda v: v >= 0, needs=">= 0", resume=True)
    checkpoint_every_steps: int = key(0, "0 = only at the end of each epoch", resume=True,
                                      check=lambda v: v >= 0, needs=">= 0 (0: at epoch ends only)")
    keep_last: int = key(2, "plus the best (by validation top-1 error)",
                         check=lambda v: v >= 1, needs=">= 1", resume=True)
    amp: bool = key(True, "bf16 autocast on GPU; CPU always runs fp32", resume=True)
    channels_last: bool = key(True, "on GPU", resume=True)
    compile: bool = key(False, "torch.compile the model", resume=True)
    fuse_conv_relu: bool = key(False, "conv + bias + ReLU as one op, one cuDNN call on GPU (model/fused.py)",
                               resume=True)
    grad_compression: str = key("none", "none | bf16 (a DDP communication hook)", choices="pipeline.ddp:HOOKS")
    max_steps: int = key(0, "stop after this many optimizer steps (tests, smoke runs); 0 = off", resume=True,
                         check=lambda v: v >= 0, needs=">= 0 (0: no limit)")
    log_every_steps: int = key(10, "training metrics to MLflow every this many steps",
                               check=lambda v: v >= 1, needs=">= 1", resume=True)


    def __post_init__(self):
        lo_hi = _worker_range(self.workers)
        if lo_hi is not None:      # one form for every reader: a count, or [lo, hi] with lo < hi
            self.workers = lo_hi[0] if lo_hi[0] == lo_hi[1] else list(lo_hi)

    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers: equal unless the run is elastic."""
        return _worker_range(self.workers)

    def elastic(self) -> bool:
        lo, hi = self.worker_range()
        return lo < hi


def _worker_range(value: Any) -> tuple[int, int] | None:
    """``run.workers`` as (lo, hi): 4, "2-8" or [2, 8]; None when it is none of those."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d{1,6}\s*-\s*\d{1,6}\s*", value):
        value = [int(v) for v in value.split("-")]
    if type(value) is int:
        value = [value, value]
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value) \
            and 1 <= value[0] <= value[1]:
        return value[0], value[1]
    return None


@dataclass
class TrackingConfig:
    """Where and how the run is logged: every key here may change on resume."""
    enabled: bool = key(True, "log to MLflow; false: checkpoints only", resume=True)
    uri: str = key("", '"" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here', resume=True)
    experiment: str = key("vgg", "the MLflow experiment the run is logged in", resume=True)
    system_metrics: bool = key(True, "MLflow's CPU, memory (and GPU) metrics of each worker", resume=True)
    log_model: bool = key(True, "log the best weights as an MLflow PyTorch model at the end (torch.export)",
                          resume=True)
    register_model: str = key("", "\"\" = don't register; else the registered model's name", resume=True)
    retry_s: float = key(30.0, "while the server is unreachable, try again this often (training goes on)",
                         check=lambda v: v > 0, needs="> 0", resume=True)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}; allowed: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue  # not this member of the union; the error below names them all
        raise ConfigError(f"{key}: expected {tp}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        (item,) = set(typing.get_args(tp)) - {Ellipsis}
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return origin(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None) and value is None:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool) and abs(value) <= sys.float_info.max:
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value):
        return float(value)  # PyYAML reads "1e-3" as a string (YAML 1.1 wants "1.0e-3")
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return path.strip().split("."), value


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (or the defaults), apply ``--set`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except IsADirectoryError as e:
            raise ConfigError(f"{path}: is a folder; --config takes a YAML file (jobs/configs/*.yaml)") from e
        except PermissionError as e:
            raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                              "a config is YAML text") from e
        try:
            raw = yaml.safe_load(text) or {}
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: a bad date, 4300+ digits
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    try:
        cfg = from_dict(Config, raw)
        validate(cfg)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}{' (with --set overrides)' if overrides else ''}: {e}") from None
    return cfg


def yaml_problem(e: Exception) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several)."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return f"{getattr(e, 'problem', None) or lines[0][:200]}{where}"


def leaves() -> dict[str, dataclasses.Field]:
    """``{"optim.lr": its field, ...}``: every key's declaration, in declaration order."""
    hints = typing.get_type_hints(Config)
    return {f"{s.name}.{f.name}": f for s in dataclasses.fields(Config) for f in dataclasses.fields(hints[s.name])}


def _allowed(spec: tuple[str, ...] | str) -> tuple[str, ...]:
    """A key's ``choices``: the tuple itself, or the ``"module:NAME"`` list imported now."""
    if isinstance(spec, str):
        module, name = spec.split(":")
        return tuple(getattr(importlib.import_module(module), name))
    return tuple(spec)


# Derived from the fields: the choice lists declared here (not named in another module), and the
# numeric keys with the values they accept: (test, what the error says is needed).
OWN_CHOICES = {k: f.metadata["choices"] for k, f in leaves().items() if isinstance(f.metadata.get("choices"), tuple)}
RANGES = {k: (f.metadata["check"], f.metadata["needs"]) for k, f in leaves().items() if f.metadata.get("check")}


def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a fixed list of values -> its allowed values. A list another module acts on is
    named there and imported only here, when called: most of them import torch, and ``ConfigError``
    must stay importable without it (jobs.preprocess)."""
    return {k: _allowed(f.metadata["choices"]) for k, f in leaves().items() if f.metadata.get("choices")}


def validate(cfg: Config) -> None:
    """Every check a config allows without looking at data or storage (jobs/train.py does those)."""
    from pipeline.task import task_for   # imports torch; a config alone does not
    import model

    flat = flatten(cfg)
    for key, allowed in choices().items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(allowed)}")
    for key, (ok, needed) in RANGES.items():
        if not ok(flat[key]):
            raise ConfigError(f"{key}: {flat[key]!r}; it must be {needed}")
    try:
        model.canonical_name(cfg.model.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    d = cfg.data
    if not d.crop_size <= d.scale_min <= d.scale_max:
        raise ConfigError(f"data.scale_min/scale_max: need crop_size <= scale_min <= scale_max, got "
                          f"{d.crop_size}, {d.scale_min}, {d.scale_max}")
    task_for(cfg.model.head).check_config(cfg)   # what the head refuses (pipeline/task.py)
    if cfg.run.elastic() and cfg.run.max_failures == 0:
        raise ConfigError(f"run.workers {cfg.run.workers} is a range (elastic) but run.max_failures is 0: the "
                          "first lost node would end the run; set run.max_failures (each lost node counts one)")
    if cfg.run.worker_range()[1] > cfg.run.global_batch_size:
        raise ConfigError(f"run.workers {cfg.run.workers}: more workers than images in run.global_batch_size "
                          f"{cfg.run.global_batch_size}; each worker needs at least one")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"optim.lr": 0.01, ...}``: one entry per leaf, for MLflow params."""
    out = {}
    for section, values in to_dict(cfg).items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v
    return out


def test_scale(d: DataConfig) -> int:
    """Q for validation: data.test_scale, else S (fixed) or the middle of [Smin, Smax] (jittered)."""
    return d.test_scale or (d.scale_min + d.scale_max) // 2
