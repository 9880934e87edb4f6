"""One optimizer step, built once with its device-level choices, so training and benchmarks run the
same code: autocast dtype, memory format, torch.compile mode, fused SGD, cuDNN autotuning, and
convolution + ReLU as one cuDNN call."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.fused import fuse_conv_relu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOptions:
    amp_dtype: torch.dtype | None = None  # bfloat16 on GPU; None = the parameters' dtype
    channels_last: bool = False
    compile: str = ""                     # "" = eager; else a torch.compile mode ("default", ...)
    cudnn_benchmark: bool = False          # let cuDNN time its algorithms for these fixed shapes
    tf32: bool = False
    fuse_conv_relu: bool = False           # model.fused: one cuDNN call per conv + bias + ReLU


def sgd(net: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
        decay_bias: bool = False, nesterov: bool = False, fused: bool = False) -> torch.optim.SGD:
    """The paper's SGD. Biases are not decayed by default: the L2 penalty is meant to limit the
    weights; decaying biases only pulls ReLU thresholds to zero (the paper does not say either way).
    Frozen parameters (``requires_grad`` False, ``model.train_layers: fc``) are left out: they must not
    decay, nor cost momentum buffers."""
    trained = [p for p in net.parameters() if p.requires_grad]
    weights = [p for p in trained if p.ndim > 1 or decay_bias]
    biases = [p for p in trained if p.ndim <= 1 and not decay_bias]
    groups = [{"params": weights, "weight_decay": weight_decay}]
    if biases:
        groups.append({"params": biases, "weight_decay": 0.0})
    kwargs = {"fused": True} if fused else {}
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **kwargs)


def apply_backend_options(opts: StepOptions) -> None:
    torch.backends.cudnn.benchmark = opts.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = opts.tf32
    torch.backends.cudnn.allow_tf32 = opts.tf32


def prepare(net: nn.Module, opts: StepOptions,
            wrap: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """Conv-ReLU fusion and memory format (both in place), ``wrap`` (the data-parallel wrapper, if
    any), then compilation; returns the module to call. DDP is built after the memory format because
    its gradient buckets take the parameters' strides as they are when it is constructed; compiled
    around DDP, torch.compile splits its graph at the gradient buckets so all-reduces overlap backward."""
    apply_backend_options(opts)
    if opts.fuse_conv_relu:
        log.info("conv + ReLU fused into one op: %d pairs", fuse_conv_relu(net))
    if opts.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if wrap is not None:
        net = wrap(net)
    if opts.compile:
        log.info("torch.compile, mode %s", opts.compile)
        return torch.compile(net, mode=opts.compile)
    return net


def layout(images: torch.Tensor, opts: StepOptions) -> torch.Tensor:
    """A batch in the memory format ``prepare`` gave the net (channels_last batches into a
    channels_last net run cuDNN's NHWC kernels, with no layout change inside the net)."""
    return images.contiguous(memory_format=torch.channels_last) if opts.channels_last else images


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, amp_dtype: torch.dtype | None = None,
               loss_fn: Callable[[torch.Tensor, slice], torch.Tensor] | None = None, *,
               weight: float = 1.0, micro_batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, update. Returns (loss, the net's outputs), detached and still on the device:
    reading them is a CPU-GPU sync point, left to the caller. The loss of the images ``part`` (a
    slice of the batch) is ``loss_fn(outputs, part)``, by default cross-entropy against those labels
    (``pipeline.task.Task.loss`` for the others).

    ``micro_batch`` > 0 and smaller than the batch: gradient accumulation, the batch in parts of that
    many images (DDP's all-reduce once, after the last), each part's mean loss weighted by its share of
    the batch, so the gradient is the batch mean's up to rounding. ``weight`` scales the gradient,
    not the loss returned: a rank's share of an unevenly split global batch (``pipeline.epoch_plan``)."""
    n = images.shape[0]
    size = micro_batch if 0 < micro_batch < n else n
    parts = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    optimizer.zero_grad(set_to_none=True)
    total, outputs = torch.zeros((), device=images.device), []
    for j, part in enumerate(parts):
        last = j == len(parts) - 1
        with (contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()):
            with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = net(images[part])
                loss = F.cross_entropy(logits.float(), labels[part]) if loss_fn is None else loss_fn(logits, part)
            share = (part.stop - part.start) / n
            (loss * (weight * share) if weight * share != 1.0 else loss).backward()
        total += loss.detach() * share
        outputs.append(logits.detach())
    optimizer.step()
    return total, outputs[0] if len(outputs) == 1 else torch.cat(outputs)
