"""What a training run does that depends on what FC8 predicts (``model.head``): one class per head,
made by ``task_for(head)``. Outside this module (and ``model.heads``, which builds FC8), no code asks
which head a net has: it asks its task.

- ``Classification`` (``classes``, the paper's section 3.1): softmax cross-entropy; train top-1/top-5
  error; validation top-1/top-5 error and loss on the centre crop or densely; the plateau rule
  follows val top-1 error.
- ``SCR`` / ``PCR`` (Appendix A): the Euclidean loss between the predicted box and the ground truth,
  (cx, cy, w, h) in units of the crop side (docs/localisation.md); PCR counts only the ground-truth
  class's 4 outputs. Validation is the paper's protocol (a), "the central crop, the ground-truth class's
  box": an image is correct when that box has IoU > 0.5 with one of its ground-truth boxes; the
  fraction wrong is ``val/loc_err``, which replaces val top-1 error in the plateau rule and the choice
  of the best checkpoint.

Plain torch; the training loop, the driver's checks, the logged model and the localisation pass ask
these and nothing else of the head.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Collection

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import model
from pipeline import boxes as box_lib
from pipeline import evaluate as eval_lib
from pipeline import scoring
from pipeline.errors import ConfigError
from pipeline.worker import Worker

# assumption: the training loss is Caffe's EuclideanLoss, 1/(2N) sum_i ||p_i - t_i||^2 over the 4 box
# parameters; model.box_loss is the mean over N and the 4 parameters, i.e. half of it. The paper names
# only a "Euclidean loss" (with lr 1e-3 and weight decay 5e-4); that its code used Caffe's layer is
# inferred from the implementation being derived from C++ Caffe (section 3.3). With Caffe's scale the
# paper's lr and weight decay keep their balance (doubling the lr instead would double the decay too).
EUCLIDEAN = 2.0
log = logging.getLogger("pipeline.train_loop")
ROLES = ("classification", "localisation")


def freeze(net: nn.Module, train_layers: str) -> int:
    """``model.train_layers``: "all" trains every layer; "fc" freezes the convolutions (``features``),
    so only FC6, FC7 and FC8 learn, the paper's other localisation fine-tune ("only the fully-connected
    layers"). Returns the number of frozen tensors. Call before the data-parallel wrapper and the
    optimizer: DDP only syncs, and ``pipeline.step.sgd`` only updates, parameters that require grad."""
    if train_layers == "all":
        return 0
    if train_layers != "fc":
        raise ValueError(f"Invalid train_layers {train_layers!r}. Only all and fc are supported.")
    frozen = list(net.features.parameters())
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


class Task:
    """The head's part of a run. ``boxes``: whether the loaders must yield boxes (``Batch.boxes`` in
    training, ``Batch.gt_boxes`` in validation); ``role``: what a pass may use the net for."""
    head: ClassVar[str]
    label: ClassVar[str]                 # the head in a results table
    role: ClassVar[str]
    boxes: ClassVar[bool]
    count_names: ClassVar[tuple[str, str]]   # the metric names of ``counts``' two sums per image
    output: ClassVar[str]                # what the logged model's output means

    def require(self, role: str, what: str, hint: str) -> None:
        """Refuse a net of another role where ``role`` is needed, naming ``what`` and a ``hint``."""
        if role != self.role:
            raise ConfigError(f"{what}: a {self.role} net (model.head={self.head}); {role} needs "
                              f"model.head {' or '.join(t.head for t in TASKS.values() if t.role == role)} ({hint})")

    def loss(self, out: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """The training loss of a batch: ``out`` the net's (N, outputs), ``labels`` (N,), ``boxes``
        (N, 4) target boxes (a box head's). In fp32 whatever the autocast dtype."""
        raise NotImplementedError

    def counts(self, out: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """(2,) sums over a batch, kept on the device (``count_names``)."""
        raise NotImplementedError

    def validate(self, net: nn.Module, loader, *, worker: Worker, num_classes: int, mode: str,
                 amp_dtype: torch.dtype | None) -> "Validation":
        """The task's validation over every rank's share of the validation split, exactly once."""
        raise NotImplementedError

    def check_config(self, cfg) -> None:
        """Refuse the config options that mean something else for this head (``config.validate``)."""
        raise NotImplementedError

    def train_images(self, ds, train_split: str, val_split: str) -> int:
        """How many images of dataset ``ds`` an epoch trains on; the splits must hold what it needs."""
        raise NotImplementedError

    def check_parent(self, cfg, weights: dict[str, torch.Tensor], path: str, net: nn.Module) -> None:
        """``model.init_from``'s ``weights`` (at ``path``) fit ``net`` (on the meta device: shapes only)."""
        raise NotImplementedError

    def load_parent(self, net: nn.Module, cfg, weights: dict[str, torch.Tensor]) -> str:
        """Copy ``model.init_from``'s ``weights`` into ``net``; returns what was copied, for the log."""
        raise NotImplementedError

    def start(self, net: nn.Module, cfg, mean_box) -> None:
        """A fresh net's last touch after its parent's weights (``model.box_bias``); ``mean_box()``
        gives the training split's mean box, computed only when asked for."""


class Classification(Task):
    head: ClassVar[str] = "classes"
    label: ClassVar[str] = "classes"
    role: ClassVar[str] = "classification"
    boxes: ClassVar[bool] = False
    count_names: ClassVar[tuple[str, str]] = ("train/top1_err", "train/top5_err")
    output: ClassVar[str] = "(N, classes) class scores (logits)"

    def loss(self, out, labels, boxes=None):
        return F.cross_entropy(out.float(), labels)

    def counts(self, out, labels, boxes=None):
        """Top-1 and top-5 misses."""
        return scoring.misses(out.topk(min(5, out.shape[1]), dim=1).indices, labels)

    def validate(self, net, loader, *, worker, num_classes, mode, amp_dtype):
        tally, loss = evaluate(net, loader, worker=worker, num_classes=num_classes, mode=mode, amp_dtype=amp_dtype)
        return Validation(tally.top1_error, {"val/top1_err": tally.top1_error, "val/top5_err": tally.top5_error,
                                             "val/loss": loss},
                          f"val top-1 err {100 * tally.top1_error:.2f} %, top-5 err {100 * tally.top5_error:.2f} % "
                          f"({tally.n} images)", tally)

    def check_config(self, cfg) -> None:
        if cfg.model.box_bias != "zero":
            raise ConfigError(f"model.box_bias: {cfg.model.box_bias!r} starts a box head; model.head is 'classes'")

    def train_images(self, ds, train_split, val_split):
        return ds.split(train_split).num_samples

    def check_parent(self, cfg, weights, path, net):
        """Every tensor of the net comes from the parent, by name and shape (FC8 excepted with
        ``model.reinit_head``); the paper's "from A" mode (``init_from_mode: a``) needs only the
        tensors it copies, with A's shapes at this width, crop and class count."""
        m = cfg.model
        skip = model.HEAD_KEYS if m.reinit_head else ()
        if m.init_from_mode == "a":
            wrong = mismatches(from_a_shapes(cfg, keep_fc8=not m.reinit_head), weights, extra=False)
            what = "the tensors the paper's \"from A\" copies (model.init_from_mode a)"
        else:
            wrong = mismatches(shapes(net, skip), weights, skip=skip)
            what = "every tensor but FC8 (model.reinit_head)" if skip else "every tensor"
        if not wrong:
            return
        head_only = all(w.split(" ", 1)[0] in model.HEAD_KEYS for w in wrong)
        raise ConfigError(f"model.init_from {path} does not fit net {m.name} of width {m.width} on "
                          f"{cfg.data.crop_size} px crops with {m.num_classes} classes, {what}: {listed(wrong)}"
                          + ("; its FC8 is for another class count: set model.reinit_head=true to start a new "
                             "last layer" if head_only else ""))

    def load_parent(self, net, cfg, weights):
        """All of them (S=384 from S=256, multi-scale from S=384) or the paper's "from A" subset; with
        ``model.reinit_head`` all but FC8, kept fresh. Checked first (``check_parent``): nothing is
        skipped unsaid."""
        self.check_parent(cfg, weights, cfg.model.init_from, net)
        keep_fc8 = not cfg.model.reinit_head
        total = len(net.state_dict())
        if cfg.model.init_from_mode == "a":
            copied = model.init_from_a(net, weights, head=keep_fc8)
            return f"{len(copied)} of {total} tensors, the paper's subset from A" + ("" if keep_fc8 else ", FC8 new")
        body = weights if keep_fc8 else {k: v for k, v in weights.items() if k not in model.HEAD_KEYS}
        net.load_state_dict(body, strict=keep_fc8)
        return f"{len(body)} of {total} tensors, " + ("every weight" if keep_fc8 else "every weight but FC8 (new)")


class BoxTask(Task):
    """What SCR and PCR share: a box regressor's FC8 on a classification net's body."""
    role: ClassVar[str] = "localisation"
    boxes: ClassVar[bool] = True
    count_names: ClassVar[tuple[str, str]] = ("train/box_iou", "train/box_err")

    def predicted_boxes(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, 4) (cx, cy, w, h): the box of class ``labels`` (the ground truth)."""
        raise NotImplementedError

    def loss(self, out, labels, boxes):
        if boxes is None:
            raise ValueError(f"model.head {self.head!r} trains on boxes, but the batch has none")
        return EUCLIDEAN * model.box_loss(out.float(), boxes.float(), labels)

    def counts(self, out, labels, boxes):
        """The IoU of each predicted box with its target box, and the images whose IoU is not above
        0.5 (the training counterpart of ``val/loc_err``)."""
        pred = box_lib.cxcywh_to_xyxy(self.predicted_boxes(out, labels))
        iou = box_lib.box_iou(pred, box_lib.cxcywh_to_xyxy(boxes.float())).diagonal()   # (N,) pairs
        return torch.stack([iou.sum(), (iou <= box_lib.IOU_CORRECT).sum().double()]).float()

    def validate(self, net, loader, *, worker, num_classes, mode, amp_dtype):
        return evaluate_boxes(self, net, loader, worker=worker, amp_dtype=amp_dtype)

    def check_config(self, cfg) -> None:
        """It starts from a classification net's body (every weight but FC8, always new) and
        validates on the centre crop (the paper's protocol (a))."""
        m = cfg.model
        if m.init_from_mode != "all":
            raise ConfigError(f"model.init_from_mode: {m.init_from_mode!r} with model.head {m.head!r}; a "
                              f"localisation net starts from a classification net of the same model (all)")
        if m.reinit_head:
            raise ConfigError(f"model.reinit_head: a localisation head ({m.head}) is always new; leave it false")
        if cfg.data.val_mode != "center":
            raise ConfigError(f"data.val_mode: {cfg.data.val_mode!r} with model.head {m.head!r}; a localisation "
                              f"run validates on the centre crop (center), dense boxes are jobs.evaluate's")

    def train_images(self, ds, train_split, val_split):
        """The training images with a box; both splits must have boxes (dataset.json says so)."""
        for split in (train_split, val_split):
            if not ds.has_boxes(split):
                raise ConfigError(f"model.head {self.head!r} needs boxes, but split {split!r} of {ds.root} has "
                                  f"none (dataset.json); preprocess it with its box annotations (docs/localisation.md)")
        return ds.boxed_images(train_split)

    def check_parent(self, cfg, weights, path, net):
        """Every weight but FC8 comes from the parent: the same model at the same width and crop,
        whatever its FC8 (classes or another head)."""
        wrong = mismatches(shapes(net, model.HEAD_KEYS), weights, skip=model.HEAD_KEYS)
        if wrong:
            m = cfg.model
            raise ConfigError(f"model.init_from {path} is not a net {m.name} of width {m.width} on "
                              f"{cfg.data.crop_size} px crops, the body the {m.head} net takes from its parent: "
                              f"{listed(wrong)}")

    def load_parent(self, net, cfg, weights):
        copied = model.init_from_classification(net, weights)
        return f"{len(copied)} tensors, every weight but FC8 (a new {self.head} head)"

    def start(self, net, cfg, mean_box) -> None:
        """``model.box_bias mean``: FC8 starts at the training split's mean box."""
        if cfg.model.box_bias == "mean":
            box = mean_box()
            model.start_at_box(net, box)
            log.info("model.box_bias mean: FC8 starts at the training split's mean box %s", box.tolist())


class SCR(BoxTask):
    head: ClassVar[str] = "scr"
    label: ClassVar[str] = "SCR"
    output: ClassVar[str] = "(N, 4) one box (cx, cy, w, h) in units of the crop side"

    def predicted_boxes(self, out, labels):
        return out.float()


class PCR(BoxTask):
    head: ClassVar[str] = "pcr"
    label: ClassVar[str] = "PCR"
    output: ClassVar[str] = ("(N, 4 x classes) a box (cx, cy, w, h) per class, class c at 4c..4c+3, in units "
                             "of the crop side")

    def predicted_boxes(self, out, labels):
        return model.select_class_boxes(out.float(), labels)


# ---------------------------------------------------------------- a parent's weights against a net

def shapes(net: nn.Module, skip: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every tensor of ``net``'s state_dict but ``skip`` (a meta net will do)."""
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if k not in skip}


def mismatches(want: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor], *, skip: Collection[str] = (),
               extra: bool = True) -> list[str]:
    """Each tensor whose name or shape differs between what a net wants (``want``: name -> shape) and
    ``weights``, in the net's order: first "<name> (64, 3, 3, 3) for (32, 3, 3, 3)" (the weights' shape
    for the net's), then "<name> absent" (the weights lack it) and, with ``extra``, "<name> extra" (the
    net has no such tensor); names in ``skip`` are left out. [] when every tensor fits."""
    got = {k: tuple(getattr(v, "shape", ())) for k, v in weights.items() if k not in skip}
    resized = [f"{k} {got[k]} for {shape}" for k, shape in want.items() if k in got and got[k] != shape]
    absent = [f"{k} absent" for k in want if k not in got]
    return resized + absent + ([f"{k} extra" for k in got if k not in want] if extra else [])


def listed(wrong: list[str], shown: int = 4) -> str:
    """``mismatches`` for a message: the count and the first ``shown``."""
    more = f", and {len(wrong) - shown} more" if len(wrong) > shown else ""
    n = len(wrong)
    return f"{n} tensor{'s differ' if n != 1 else ' differs'} ({', '.join(wrong[:shown])}{more})"


def from_a_shapes(cfg, keep_fc8: bool) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of what ``model.init_from_a`` reads from net A (its first four convs and its
    FC layers, FC8 only with ``keep_fc8``) at the config's width, crop and class count."""
    m = cfg.model
    with torch.device("meta"):     # shapes only, nothing allocated
        a = model.build("A", num_classes=m.num_classes, width=m.width, image_size=cfg.data.crop_size)
        own = a.state_dict()
        needed = model.init_from_a(a, own, head=keep_fc8)   # A into A: the keys it reads, in order
    return {k: tuple(own[k].shape) for k in needed}


TASKS: dict[str, Task] = {t.head: t for t in (Classification(), SCR(), PCR())}   # model.HEADS' tasks


def task_for(head: str = "classes") -> Task:
    """The task of ``model.head``."""
    if head not in TASKS:
        raise ConfigError(f"model.head: {head!r}; one of {', '.join(TASKS)}")
    return TASKS[head]


@dataclass
class Validation:
    """One epoch's validation: ``error`` drives the plateau rule and the best checkpoint; ``metrics``
    are logged; ``summary`` is the log line's words; ``tally`` the classification counts (else None)."""
    error: float
    metrics: dict[str, float]
    summary: str
    tally: scoring.Tally | None = None


def all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


def net_outputs(net: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return net(images)


@torch.no_grad()
def evaluate(net: nn.Module, loader, *, worker: Worker, num_classes: int, mode: str,
             amp_dtype: torch.dtype | None) -> tuple[scoring.Tally, float]:
    """Validation over every rank's share, exactly once: (Tally of top-1/top-5 misses and per-class
    counts summed over ranks, mean negative log posterior). ``mode`` "center": the net on the centre
    crop at Q; "dense": the fully convolutional net on the whole image at Q, averaged with its flip."""
    net.eval()
    tally, nll = scoring.Tally(num_classes), torch.zeros((), dtype=torch.float64)
    protocol = eval_lib.Protocol(modes=("dense",), scales=(loader.scale,), crop=loader.crop,
                                 amp_dtype=amp_dtype) if mode == "dense" else None
    for batch in loader:
        images = batch.images.to(worker.device, non_blocking=True)
        if mode == "dense":
            p = eval_lib.posteriors_at_scale([net], list(images), protocol)["dense"]
        else:
            p = scoring.posteriors(net_outputs(net, images, amp_dtype))
        labels = batch.labels.to(p.device)
        tally.add(scoring.topk(p, 5), labels)
        nll += -torch.log(p.gather(1, labels[:, None]).clamp_min(1e-12)).sum().double().cpu()
    net.train()
    counts = torch.cat([torch.tensor([tally.n, tally.top1_wrong, tally.top5_wrong], dtype=torch.long),
                        tally.class_total, tally.class_correct]).to(worker.device)
    counts = all_reduce(counts, worker.world_size).cpu()
    loss = all_reduce(nll.to(worker.device), worker.world_size).item()
    k = num_classes
    total = scoring.Tally(k, int(counts[0]), int(counts[1]), int(counts[2]), counts[3:3 + k], counts[3 + k:])
    return total, loss / max(total.n, 1)


def image_correct(pred: torch.Tensor, gt: torch.Tensor) -> tuple[bool, float]:
    """(correct, best IoU) of one predicted box (4,) for the sample's class against the image's
    ground-truth boxes (G, 4), all corners in pixels: the paper's rule, IoU > 0.5 with one of them.
    Every box of a sample is of the sample's class (docs/localisation.md), so the class is right and
    the best IoU alone decides: ``pipeline.boxes.is_correct`` without computing the IoU twice."""
    if gt.numel() == 0:
        return False, 0.0
    best = float(box_lib.box_iou(pred.reshape(1, 4), gt.reshape(-1, 4).double()).max())
    return best > box_lib.IOU_CORRECT, best


@torch.no_grad()
def evaluate_boxes(task: BoxTask, net: nn.Module, loader, *, worker: Worker,
                   amp_dtype: torch.dtype | None) -> Validation:
    """Protocol (a) on the centre crops of an ``EvalLoader(..., mode="center", boxes=True)``: the box
    for the ground-truth class, in pixels of the crop, against the image's ground-truth boxes (pixels of
    the same crop). Images without a ground-truth box are not counted (none in ILSVRC's validation)."""
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64)             # images with boxes, wrong, sum of best IoUs
    for batch in loader:
        out = net_outputs(net, batch.images.to(worker.device, non_blocking=True), amp_dtype)
        pred = task.predicted_boxes(out, batch.labels.to(out.device)).cpu()
        pixels = box_lib.cxcywh_to_xyxy(pred.double()) * loader.crop           # (N, 4) corners in the crop
        for box, gt in zip(pixels, batch.gt_boxes):
            if gt.numel() == 0:
                continue
            correct, iou = image_correct(box, gt)
            sums += torch.tensor([1.0, float(not correct), iou], dtype=torch.float64)
    net.train()
    n, wrong, iou = all_reduce(sums.to(worker.device), worker.world_size).cpu().tolist()
    if n == 0:
        raise ValueError(f"model.head {task.head!r}: the validation split has no image with a box to score")
    err = wrong / n
    return Validation(err, {"val/loc_err": err, "val/box_iou": iou / n},
                      f"val localisation err {100 * err:.2f} % (protocol a), mean best IoU {iou / n:.3f} "
                      f"({int(n)} images)")
