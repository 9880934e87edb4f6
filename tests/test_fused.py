"""Conv + bias + ReLU as one op (model/fused.py): the same function and gradients as the layers it
replaces, the same state_dict, and an op torch.compile can trace. On the CPU the op runs conv2d + relu,
so these tests check the autograd formula, the fake implementation and the module surgery; the cuDNN
kernel itself is compared with the unfused net by jobs/bench/gpu_check.py on a GPU."""
import copy

import pytest
import torch
from torch import nn

import model
from model.fused import Conv2dReLU, conv2d_relu, fuse_conv_relu
from pipeline.step import StepOptions, prepare, sgd, train_step


def _args(channels_last: bool, dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 7, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(5, 3, 3, 3, dtype=dtype), torch.randn(5, dtype=dtype)
    return [t.requires_grad_() for t in (x, w, b)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_op_registration_fake_and_autograd(channels_last):
    x, w, b = _args(channels_last)
    torch.library.opcheck(conv2d_relu, (x, w, b, 1))   # schema, fake strides, autograd registration
    assert torch.autograd.gradcheck(lambda *a: conv2d_relu(*a, 1), (x, w, b))
    out = conv2d_relu(x, w, b, 1)
    assert out.shape == (2, 5, 9, 7)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_channels_last_weights_keep_an_nchw_batch_channels_last_as_conv2d_does():
    conv = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8)                                   # NCHW batch, channels_last net
    fused = conv2d_relu(x, conv.weight, conv.bias, 1)
    assert conv(x).is_contiguous(memory_format=torch.channels_last)
    assert fused.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(conv2d_relu, (x, conv.weight, conv.bias, 1))


def test_autocast_runs_the_fused_conv_in_bf16_like_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    fused = copy.deepcopy(conv)
    fused.__class__ = Conv2dReLU
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = torch.relu(conv(x)), fused(x)
    assert want.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):             # autocast leaves float64 alone
        assert fused.double()(x.double()).dtype == torch.float64


def test_fused_net_matches_the_plain_one_in_values_and_gradients():
    torch.manual_seed(0)
    # C: 1x1 convs too. Kaiming init and no dropout, so the logits depend on every layer; the
    # tolerances are relative only, so tiny values cannot pass by being tiny
    plain = model.build("C", num_classes=10, width=1 / 16, image_size=32, init="kaiming", dropout=0.0).double()
    fused = copy.deepcopy(plain)
    convs = sum(type(m) is nn.Conv2d for m in plain.modules())
    assert fuse_conv_relu(fused) == convs == 13
    assert sum(isinstance(m, Conv2dReLU) for m in fused.modules()) == convs
    assert not any(isinstance(m, nn.ReLU) for m in fused.features)
    assert list(plain.state_dict()) == list(fused.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for net in (plain, fused):
        net(x).square().sum().backward()
    assert (plain(x) != 0).all()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=0)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-300, msg=name)


def test_fusion_keeps_parameter_objects_and_skips_what_it_cannot_fuse():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.MaxPool2d(2))
    params = list(net.parameters())
    assert fuse_conv_relu(net) == 1
    assert [type(m).__name__ for m in net] == ["Conv2dReLU", "Identity", "Conv2d", "ReLU", "Conv2d", "ReLU",
                                               "Conv2d", "MaxPool2d"]
    assert all(a is b for a, b in zip(params, net.parameters()))


def test_compiled_training_step_with_fusion_matches_eager_plain():
    """torch.compile traces the op through its fake implementation; a wrong stride or formula there
    would give other weights after a step."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    fused = copy.deepcopy(plain)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    losses = []
    for net, opts in ((plain, StepOptions(channels_last=True)),
                      (fused, StepOptions(channels_last=True, compile="default", fuse_conv_relu=True))):
        call, opt = prepare(net, opts), sgd(net, lr=0.1)
        losses.append([train_step(call, opt, x, y)[0].item() for _ in range(2)])
    assert sum(isinstance(m, Conv2dReLU) for m in fused) == 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
