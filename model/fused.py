"""Convolution, bias and ReLU as one cuDNN call (``torch.cudnn_convolution_relu``) on the GPU.

Why: torch.compile leaves convolutions to cuDNN and cannot fuse the ReLU into them, so every conv
output of a VGG is written, read back and written again by a separate bias + ReLU kernel: three passes
over every activation (for D at batch 256 in bf16, some 7 GB each) per step. The fused call writes
the output once; PyTorch builds it as relu(conv + 0 * z + bias) with z the output buffer itself, so
unless cuDNN's engine skips the 0 * z term it also reads z once: one or two of the three passes saved.
Whether that makes the step faster, i.e. whether cuDNN's fused kernels are as fast as its plain ones,
is a measurement, not a given: see the ``*+convrelu`` variants of ``python -m jobs.bench train``. That
z is uninitialised memory is also why jobs/bench/gpu_check.py fills the buffer with NaN first:
0 * NaN must not reach the output.

The op is a ``torch.library`` custom op with a fake (shape and strides) implementation and an autograd
formula, so torch.compile treats it as one opaque kernel. On the CPU it runs conv2d + relu, which is
how the tests check the formula.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The layout the output gets: channels_last if the input or the weight is, as for conv2d (an NCHW
    batch into a channels_last net must not turn every later layer NCHW). Forced on the output, so
    the real op and the fake one always agree."""
    cl = _channels_last(x) or _channels_last(weight)
    return torch.channels_last if cl else torch.contiguous_format


@torch.library.custom_op("vgg::conv2d_relu", mutates_args=())
def conv2d_relu(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    """relu(conv2d(x, weight, bias, stride 1, ``padding``)); x, weight and bias of one dtype."""
    if x.is_cuda:
        out = torch.cudnn_convolution_relu(x, weight, bias, [1, 1], [padding, padding], [1, 1], 1)
    else:   # as the cuDNN op: no autocast inside, the dtypes are the caller's
        with torch.autocast(x.device.type, enabled=False):
            out = F.relu(F.conv2d(x, weight, bias, padding=padding))
    return out.contiguous(memory_format=_format(x, weight))


@conv2d_relu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    n, _, h, w = x.shape
    k_h, k_w = weight.shape[2:]
    shape = (n, weight.shape[0], h + 2 * padding - k_h + 1, w + 2 * padding - k_w + 1)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_format(x, weight))


def _setup_context(ctx, inputs, output):
    x, weight, _, padding = inputs
    ctx.save_for_backward(x, weight, output)   # the output is the ReLU mask: no pre-activation kept
    ctx.padding = padding


def _backward(ctx, grad: Tensor):
    x, weight, out = ctx.saved_tensors
    grad = torch.ops.aten.threshold_backward(grad, out, 0)
    p = ctx.padding
    dx, dw, db = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]], [1, 1], [p, p], [1, 1], False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
    return dx, dw, db, None


conv2d_relu.register_autograd(_backward, setup_context=_setup_context)


class Conv2dReLU(nn.Conv2d):
    """An ``nn.Conv2d`` whose output is already through a ReLU: the same parameters and state_dict
    keys, so checkpoints and pretrained weights load either way."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        kind = x.device.type
        if torch.is_autocast_enabled(kind):       # a custom op gets no autocast: cast as conv2d would
            dtype = torch.get_autocast_dtype(kind)
            x, weight, bias = (t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                               for t in (x, weight, bias))
        return conv2d_relu(x, weight, bias, self.padding[0])


def fusable(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.bias is not None and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1])


def fuse_conv_relu(net: nn.Module) -> int:
    """In place: every fusable Conv2d directly followed by a ReLU inside an ``nn.Sequential`` becomes
    a Conv2dReLU and the ReLU an Identity. Parameter objects are kept (an optimizer or DDP built
    before still holds them). Returns how many were fused."""
    fused = 0
    for seq in net.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            if fusable(seq[i]) and isinstance(seq[i + 1], nn.ReLU):
                seq[i].__class__ = Conv2dReLU
                seq[i + 1] = nn.Identity()
                fused += 1
    return fused
