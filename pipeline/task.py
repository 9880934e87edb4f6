"""What a training run does that depends on what FC8 predicts (``model.head``): the loss, the running
training metrics, the per-epoch validation and the error the schedule and the best checkpoint follow.

- ``classes`` (the paper's section 3.1): softmax cross-entropy; train top-1/top-5 error; validation
  top-1/top-5 error and loss on the centre crop or densely; the plateau rule follows val top-1 error.
- ``scr`` / ``pcr`` (Appendix A): the Euclidean loss between the predicted box and the ground truth,
  (cx, cy, w, h) in units of the crop side (docs/localisation.md); PCR counts only the ground-truth
  class's 4 outputs. Validation is the paper's protocol (a), "the central crop, the ground-truth class's
  box": an image is correct when that box has IoU > 0.5 with one of its ground-truth boxes; the
  fraction wrong is ``val/loc_err``, which replaces val top-1 error in the plateau rule and the choice
  of the best checkpoint.

Plain torch; the training loop (pipeline/train_loop.py) calls these and nothing else of the task.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import model
from pipeline import boxes as box_lib
from pipeline import evaluate as eval_lib
from pipeline import scoring
from pipeline.worker import Worker

# Caffe's EuclideanLoss, which the paper's code used, is 1/(2N) sum_i ||p_i - t_i||^2 over the 4 box
# parameters; model.box_loss is the mean over N and the 4 parameters, i.e. half of it. The training loss
# is Caffe's, so the paper's lr 1e-3 and weight decay 5e-4 keep their balance (doubling the lr instead
# would double the decay too).
EUCLIDEAN = 2.0


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


@dataclass(frozen=True)
class Task:
    """The head's part of training: ``Task(cfg.model.head)``."""
    head: str = "classes"

    @property
    def boxes(self) -> bool:
        """Whether the loaders must yield boxes (``Batch.boxes``)."""
        return self.head != "classes"

    @property
    def count_names(self) -> tuple[str, str]:
        """The metric names of ``counts``'s two sums once divided by the images."""
        return ("train/box_iou", "train/box_err") if self.boxes else ("train/top1_err", "train/top5_err")

    def loss(self, out: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """The training loss of a batch: ``out`` the net's (N, outputs), ``labels`` (N,), ``boxes``
        (N, 4) target boxes (localisation only). In fp32 whatever the autocast dtype."""
        if not self.boxes:
            return F.cross_entropy(out.float(), labels)
        if boxes is None:
            raise ValueError(f"model.head {self.head!r} trains on boxes, but the batch has none")
        return EUCLIDEAN * model.box_loss(out.float(), boxes.float(), labels)

    def predicted_boxes(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, 4) (cx, cy, w, h): SCR's box, or PCR's box of class ``labels`` (the ground truth)."""
        out = out.float()
        return out if self.head == "scr" else model.select_class_boxes(out, labels)

    def counts(self, out: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """(2,) sums over a batch, kept on the device: classification, top-1 and top-5 misses;
        localisation, the IoU of each predicted box with its target box, and the images whose IoU is
        not above 0.5 (the training counterpart of ``val/loc_err``)."""
        if not self.boxes:
            return scoring.misses(out.topk(min(5, out.shape[1]), dim=1).indices, labels)
        pred = box_lib.cxcywh_to_xyxy(self.predicted_boxes(out, labels))
        iou = box_lib.box_iou(pred, box_lib.cxcywh_to_xyxy(boxes.float())).diagonal()   # (N,) pairs
        return torch.stack([iou.sum(), (iou <= box_lib.IOU_CORRECT).sum().double()]).float()


CLASSES = Task()   # the classification task, the default


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


def validate(task: Task, net: nn.Module, loader, *, worker: Worker, num_classes: int, mode: str,
             amp_dtype: torch.dtype | None) -> Validation:
    """The task's validation over every rank's share of the validation split, exactly once."""
    if task.boxes:
        return evaluate_boxes(task, net, loader, worker=worker, amp_dtype=amp_dtype)
    tally, loss = evaluate(net, loader, worker=worker, num_classes=num_classes, mode=mode, amp_dtype=amp_dtype)
    return Validation(tally.top1_error, {"val/top1_err": tally.top1_error, "val/top5_err": tally.top5_error,
                                         "val/loss": loss},
                      f"val top-1 err {100 * tally.top1_error:.2f} %, top-5 err {100 * tally.top5_error:.2f} % "
                      f"({tally.n} images)", tally)


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
def evaluate_boxes(task: Task, net: nn.Module, loader, *, worker: Worker,
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
        for box, gt in zip(pixels, batch.boxes):
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
