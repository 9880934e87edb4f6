"""The paper's SGD (pipeline/step.py ``sgd``): which parameters weight decay reaches, momentum 0.9, and
the schedule's rate reaching every parameter group in the loop. Each test watches parameters move, so a
wrong group, a dropped momentum or a group left at the old rate shows as a wrong number."""
from __future__ import annotations

import pytest
import torch

import model
from pipeline.step import sgd


def tiny_net():
    torch.manual_seed(0)
    net = model.build("A", num_classes=3, width=1 / 16, image_size=32)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.fill_(0.5)  # the paper's biases start at zero, where decay could not be seen
    return net


def step_with(net, opt, grad):
    """One optimizer step with every gradient set to ``grad(p)``."""
    for p in net.parameters():
        p.grad = grad(p)
    opt.step()


@pytest.mark.parametrize("decay_bias", [False, True])
def test_weight_decay_shrinks_the_weights_and_leaves_the_biases_unless_asked(decay_bias):
    """With zero gradients one step is pure L2 decay: p <- p (1 - lr wd), for every conv and FC weight;
    biases only with optim.decay_bias (the default leaves them: docs/training.md)."""
    net, lr, wd = tiny_net(), 2.0, 5e-4
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    step_with(net, sgd(net, lr=lr, weight_decay=wd, decay_bias=decay_bias), torch.zeros_like)
    weights = [n for n, p in net.named_parameters() if p.ndim > 1]
    biases = [n for n, p in net.named_parameters() if p.ndim == 1]
    assert len(weights) == len(biases) == 11                            # A: 8 convs + 3 FCs
    for n, p in net.named_parameters():
        if n in weights or decay_bias:
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr * wd), atol=0, rtol=1e-6)
        else:
            assert torch.equal(p.detach(), before[n]), n


def test_momentum_is_the_papers_0_9():
    """Two steps of a unit gradient on an undecayed bias: the second moves it 0.9 + 1 times the first."""
    net, lr = tiny_net(), 0.1
    opt = sgd(net, lr=lr)
    bias = net.classifier[6].bias

    def unit(p):
        return torch.ones_like(p) if p is bias else torch.zeros_like(p)

    seen = [bias.detach().clone()]
    for _ in range(2):
        step_with(net, opt, unit)
        seen.append(bias.detach().clone())
    torch.testing.assert_close(seen[0] - seen[1], torch.full_like(bias, lr))            # buffer = gradient
    torch.testing.assert_close(seen[1] - seen[2], torch.full_like(bias, lr * (0.9 + 1)))  # 0.9 buffer + gradient


def test_the_schedules_rate_reaches_every_parameter_group(sample_dataset):
    """A decay divides the rate of the biases' group too, not only the weights'."""
    from pipeline.train_loop import Worker, fit, setup
    from tiny import tiny_config

    cfg = tiny_config(sample_dataset, **{"model.num_classes": 4, "run.workers": 1, "run.global_batch_size": 8,
                                         "schedule.epochs": 2, "schedule.milestones": [1]})
    run = setup(cfg, Worker(), report=lambda *a: None, log=lambda m, step: None)
    fit(run)
    groups = run.optimizer.param_groups
    assert len(groups) == 2 and [g["weight_decay"] for g in groups] == [cfg.optim.weight_decay, 0.0]
    assert [g["lr"] for g in groups] == pytest.approx([cfg.optim.lr * cfg.schedule.factor] * 2)
