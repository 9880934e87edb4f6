"""One typed config tree, loaded from YAML with ``--set a.b=c`` overrides.

Every field is declared here with its default and meaning; a key nobody declared, or a value of the
wrong type, is an error naming the key and what is allowed. The resolved tree is dumped back to YAML
(into MLflow and every checkpoint) and flattened to ``section.key`` params for MLflow.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


_YAML11_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "A"                      # A, A-LRN, B, C, D, E or vgg11 ... vgg19
    width: float = 1.0                   # scales every channel count (conv and FC); 1.0 = the paper
    num_classes: int = 1000              # 0 = read from dataset.json
    init: str = "paper"                  # paper (N(0, 0.01)) | glorot | kaiming
    init_from: str = ""                  # "" | checkpoint path or "runs:/<mlflow run id>" of the parent
    init_from_mode: str = "all"          # all: the parent's whole state_dict (S=384 from S=256) |
                                         # a: the paper's first-four-convs + FCs from a trained A
    reinit_head: bool = False            # start FC8 afresh instead of taking the parent's (another class count)
    dropout: float = 0.5                 # dropout ratio of FC6 and FC7 (the paper's 0.5)
    head: str = "classes"                # classes | scr | pcr: FC8 scores the classes, or predicts one box
                                         # (scr) or one per class (pcr), the paper's localisation (Appendix A)
    train_layers: str = "all"            # all | fc: fine-tune every layer, or only FC6-FC8 (the convs frozen)
    box_bias: str = "zero"               # zero | mean: a new box head's FC8 bias starts at 0 (the paper's
                                         # random last layer) or at the training split's mean box, which
                                         # spares a small net the mean-box phase (docs/localisation.md)


@dataclass
class DataConfig:
    root: str = "data/imagenet"          # folder written by `python -m jobs.preprocess`
    train_split: str = "train"           # the split the net trains on (a folder name in data.root)
    val_split: str = "val"               # the split validated after each epoch, and evaluated
    crop_size: int = 224                 # the training crop's side in pixels (the paper: 224)
    scale_min: int = 256                 # training scale S; scale_min == scale_max is a fixed S
    scale_max: int = 256                 # S ~ U[scale_min, scale_max] per image when larger
    test_scale: int = 0                  # Q for validation; 0 = S, or (Smin+Smax)/2 when jittered
    flip: bool = True                    # random horizontal flips in training
    color_shift_std: float = 0.1         # std of the PCA colour-shift alphas; 0 disables it
    mean_subtraction: bool = True        # subtract dataset.json's training mean RGB
    decode: str = "mixed"                # mixed (GPU nvJPEG) | cpu; CPU-only machines always use cpu
    hw_decoder_load: float = 1.0         # share of JPEGs for the hardware JPEG decoder (A100/H100); see README
    threads: int = 4                     # DALI CPU threads per worker
    prefetch: int = 2                    # DALI prefetch queue depth
    layout: str = "NCHW"                 # NCHW | NHWC (channels_last)
    dtype: str = "float32"               # float32 | bfloat16 | float16 (the last two on GPU)
    shuffle_buffer: int = 4096           # DALI reader's shuffle buffer (shards are globally shuffled)
    eval_batch_size: int = 0             # 0 = the per-worker training batch
    val_mode: str = "center"             # center | dense: the per-epoch validation


@dataclass
class OptimConfig:
    lr: float = 1e-2                     # SGD learning rate at the start (the paper: 10^-2)
    momentum: float = 0.9                # SGD momentum (the paper: 0.9)
    weight_decay: float = 5e-4           # L2 penalty multiplier (the paper: 5 * 10^-4)
    decay_bias: bool = False             # biases are not decayed (see docs/training.md)
    nesterov: bool = False               # Nesterov momentum (not the paper's)
    fused: bool = False                  # torch's fused SGD kernel (GPU)


@dataclass
class ScheduleConfig:
    epochs: int = 74                     # the paper stopped after 370K iterations = 74 epochs
    # patience, min_delta, cooldown, smoothing: assumption: the paper says only "when the validation set
    # accuracy stopped improving"; these defaults are chosen by `python -m jobs.bench schedule --grid`, a
    # simulation of noisy (50,000-image val) and creeping curves (docs/training.md, "The plateau rule")
    patience: int = 5                    # counted epochs without a val top-1 improvement before dividing lr
    factor: float = 0.1                  # what each decay multiplies the rate by (the paper: 0.1)
    max_decays: int = 3                  # the paper divided the rate 3 times in all
    min_delta: float = 0.01              # an improvement must beat the last one's (smoothed) error by more
                                         # than this (a fraction: 0.01 = 500 of ImageNet's 50,000 val images)
    cooldown: int = 2                    # epochs after a decay whose lack of improvement is not counted
    smoothing: float = 0.7               # the rule judges an exponential moving average of the val error
                                         # with this weight on the past (0: each epoch's error alone)
    milestones: list[int] = field(default_factory=list)  # epochs done after which lr is divided, e.g.
                                         # [30, 50, 65]; replaces the plateau rule; [] = plateau rule
    stop_after_max_decays: bool = False  # stop early once the rate was divided max_decays times and stalls

    def __post_init__(self) -> None:
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            raise ConfigError(f"schedule.milestones: {late} would never be reached in "
                              f"schedule.epochs {self.epochs}; each must be below it")


@dataclass
class RunConfig:
    name: str = "vgg"                    # the same name resumes; a fresh start needs a new name
    resume: str = "auto"                 # auto: resume run.name if it has a checkpoint | never: refuse if
                                         # it has one | must: refuse if it has none
    storage_path: str = "runs"           # local folder or a pyarrow/fsspec URI (s3://...)
    workers: int = 2                     # Ray Train workers (data-parallel replicas), one GPU each with use_gpu
    use_gpu: bool = False                # one GPU per worker (DALI mixed decode, bf16); false: CPU and gloo
    cpus_per_worker: int = 1             # CPUs Ray reserves for each worker (and its torch threads on CPU)
    placement_strategy: str = "PACK"     # Ray placement of the workers: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    wait_for_nodes: bool = False         # workers that no live node set can hold: wait (an autoscaling
                                         # cluster adds nodes) instead of refusing before the run starts
    global_batch_size: int = 256         # split evenly across workers; an uneven split is an error
    seed: int = 0                        # seeds the initial weights and the data order
    max_failures: int = 0                # Ray Train FailureConfig
    checkpoint_every_steps: int = 0      # 0 = only at the end of each epoch
    keep_last: int = 2                   # plus the best (by validation top-1 error)
    amp: bool = True                     # bf16 autocast on GPU; CPU always runs fp32
    channels_last: bool = True           # on GPU
    compile: bool = False                # torch.compile the model
    fuse_conv_relu: bool = False         # conv + bias + ReLU as one op, one cuDNN call on GPU (model/fused.py)
    grad_compression: str = "none"       # none | bf16 (a DDP communication hook)
    max_steps: int = 0                   # stop after this many optimizer steps (tests, smoke runs); 0 = off
    log_every_steps: int = 10            # training metrics to MLflow every this many steps


@dataclass
class TrackingConfig:
    enabled: bool = True                 # log to MLflow; false: checkpoints only
    uri: str = ""                        # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: str = "vgg"              # the MLflow experiment the run is logged in
    system_metrics: bool = True          # MLflow's CPU, memory (and GPU) metrics of each worker
    log_model: bool = True               # log the best weights as an MLflow PyTorch model at the end (torch.export)
    register_model: str = ""             # "" = don't register; else the registered model's name
    retry_s: float = 30.0                # while the server is unreachable, try again this often (training goes on)


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
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
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
        text = Path(path).read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
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
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


# Choice lists no other module owns: the loop's per-epoch validation (center crop or dense), how the
# net starts from its parent, Ray's placement strategies.
OWN_CHOICES = {
    "model.init_from_mode": ("all", "a"),
    "model.train_layers": ("all", "fc"),
    "model.box_bias": ("zero", "mean"),
    "data.val_mode": ("center", "dense"),
    "run.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "run.resume": ("auto", "never", "must"),
}
# Numeric keys and the values they accept: (test, what the error says is needed).
RANGES = {
    "model.width": (lambda v: v > 0, "> 0"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.num_classes": (lambda v: v >= 0, ">= 0 (0 reads it from dataset.json)"),
    "data.crop_size": (lambda v: v >= 1, ">= 1"),
    "data.test_scale": (lambda v: v == 0 or v >= 1, ">= 1, or 0 for the default"),
    "data.color_shift_std": (lambda v: v >= 0, ">= 0"),
    "data.hw_decoder_load": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.threads": (lambda v: v >= 1, ">= 1"),
    "data.prefetch": (lambda v: v >= 1, ">= 1"),
    "data.shuffle_buffer": (lambda v: v >= 1, ">= 1"),
    "data.eval_batch_size": (lambda v: v >= 0, ">= 0 (0 is the training batch per worker)"),
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "schedule.epochs": (lambda v: v >= 1, ">= 1"),
    "schedule.patience": (lambda v: v >= 1, ">= 1"),
    "schedule.factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    "schedule.max_decays": (lambda v: v >= 0, ">= 0"),
    "schedule.min_delta": (lambda v: 0 <= v < 1, "in [0, 1) (a fraction of the val images)"),
    "schedule.cooldown": (lambda v: v >= 0, ">= 0"),
    "schedule.smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "schedule.milestones": (lambda v: all(1 <= a < b for a, b in zip(v, [*v[1:], float("inf")])),
                            "strictly increasing epoch counts >= 1"),
    "run.workers": (lambda v: v >= 1, ">= 1"),
    "run.cpus_per_worker": (lambda v: v >= 1, ">= 1"),
    "run.global_batch_size": (lambda v: v >= 1, ">= 1"),
    "run.max_failures": (lambda v: v >= 0, ">= 0"),
    "run.checkpoint_every_steps": (lambda v: v >= 0, ">= 0 (0: at epoch ends only)"),
    "run.keep_last": (lambda v: v >= 1, ">= 1"),
    "run.max_steps": (lambda v: v >= 0, ">= 0 (0: no limit)"),
    "run.log_every_steps": (lambda v: v >= 1, ">= 1"),
    "tracking.retry_s": (lambda v: v > 0, "> 0"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a fixed list of values -> its allowed values. Each list comes from the module
    that acts on the value; they are imported here, not at the top, because they import torch and
    ``ConfigError`` must stay importable without it (jobs.preprocess)."""
    import model
    from pipeline import augment, ddp, loader

    return {"model.init": model.INITS, "model.head": model.HEADS, "data.decode": loader.DECODES, "data.layout": tuple(augment.LAYOUTS),
            "data.dtype": augment.DTYPES, "run.grad_compression": tuple(ddp.HOOKS), **OWN_CHOICES}


def validate(cfg: Config) -> None:
    """Every check a config allows without looking at data or storage (jobs/train.py does those)."""
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
    validate_localisation(cfg)
    if cfg.run.workers < 1 or cfg.run.global_batch_size % cfg.run.workers:
        raise ConfigError(f"run.global_batch_size {cfg.run.global_batch_size} does not split evenly "
                          f"across run.workers {cfg.run.workers}")


def validate_localisation(cfg: Config) -> None:
    """A box head starts from a classification net's body (every weight but FC8, which is always new)
    and validates on the centre crop (the paper's protocol (a)); the options that mean otherwise are
    refused instead of ignored."""
    m = cfg.model
    if m.head == "classes":
        if m.box_bias != "zero":
            raise ConfigError(f"model.box_bias: {m.box_bias!r} starts a box head; model.head is 'classes'")
        return
    if m.init_from_mode != "all":
        raise ConfigError(f"model.init_from_mode: {m.init_from_mode!r} with model.head {m.head!r}; a "
                          f"localisation net starts from a classification net of the same model (all)")
    if m.reinit_head:
        raise ConfigError(f"model.reinit_head: a localisation head ({m.head}) is always new; leave it false")
    if cfg.data.val_mode != "center":
        raise ConfigError(f"data.val_mode: {cfg.data.val_mode!r} with model.head {m.head!r}; a localisation "
                          f"run validates on the centre crop (center), dense boxes are jobs.evaluate's")


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
