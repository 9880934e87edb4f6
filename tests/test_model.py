"""The six VGG configs: sizes, shapes, dense form, gradients, torchvision interop, init schemes."""
import pytest
import torch
import torchvision

import model

ALL = model.list_models()
PAPER_MILLIONS = {"A": 133, "A-LRN": 133, "B": 133, "C": 134, "D": 138, "E": 144}
TORCHVISION = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
TORCHVISION_PARAMS = {"A": 132_863_336, "B": 133_047_848, "D": 138_357_544, "E": 143_667_240}
SMALL = dict(width=1 / 16, num_classes=10)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_registry_lists_the_six_configs():
    assert ALL == ["A", "A-LRN", "B", "C", "D", "E"]


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_matches_paper_table_2(name):
    count = n_params(model.build(name))
    assert round(count / 1e6) == PAPER_MILLIONS[name]
    if name in TORCHVISION_PARAMS:
        assert count == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("alias,name", list(model.ALIASES.items()) + [("d", "D"), ("VGG16", "D"), ("a-lrn", "A-LRN")])
def test_aliases_are_case_insensitive(alias, name):
    assert model.canonical_name(alias) == name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"vgg17.*Known: A, A-LRN, B, C, D, E, vgg11"):
        model.build("vgg17")


def test_architecture_details():
    lrn = [m for m in model.build("A-LRN", **SMALL).features if isinstance(m, torch.nn.LocalResponseNorm)]
    assert len(lrn) == 1 and (lrn[0].size, lrn[0].alpha, lrn[0].beta, lrn[0].k) == (5, 1e-4, 0.75, 2.0)
    feats = model.build("A-LRN", **SMALL).features
    assert isinstance(feats[0], torch.nn.Conv2d) and isinstance(feats[2], torch.nn.LocalResponseNorm)
    kernels = [m.kernel_size[0] for m in model.build("C").features if isinstance(m, torch.nn.Conv2d)]
    assert kernels == [3, 3, 3, 3, 3, 3, 1, 3, 3, 1, 3, 3, 1]
    net = model.build("D")
    drops = [m.p for m in net.classifier if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.5, 0.5]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.features) == 5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_width_scales_conv_and_fc():
    net = model.build("A", width=0.125, num_classes=7)
    assert [m.out_channels for m in net.features if isinstance(m, torch.nn.Conv2d)][:2] == [8, 16]
    assert [m.out_features for m in net.classifier if isinstance(m, torch.nn.Linear)] == [512, 512, 7]


@pytest.mark.parametrize("name", ALL)
def test_forward_shape(name):
    net = model.build(name, **SMALL).eval()
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 10)


@pytest.mark.parametrize("name", ALL)
def test_dense_equals_plain_forward_at_224_and_maps_at_384(name):
    torch.manual_seed(0)
    net = model.build(name, **SMALL, init="glorot").eval()
    dense = model.to_dense(net)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, scores = net(x), dense(x)
        assert scores.shape == (2, 10, 1, 1)
        torch.testing.assert_close(scores[:, :, 0, 0], logits, atol=1e-5, rtol=0)
        assert logits.abs().max() > 1e-3  # a dead net would make the comparison vacuous
        assert dense(torch.randn(1, 3, 384, 384)).shape == (1, 10, 6, 6)
        assert dense(torch.randn(1, 3, 256, 320)).shape == (1, 10, 2, 4)


def test_dense_shares_the_weights():
    net = model.build("A", **SMALL).eval()
    dense = model.to_dense(net)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        net.classifier[6].bias += 1.0
        torch.testing.assert_close(dense(x)[:, :, 0, 0], net(x), atol=1e-5, rtol=0)
    assert {id(p) for p in dense.parameters()} == {id(p) for p in net.parameters()}


def test_dense_at_a_smaller_training_crop():
    net = model.build("A", width=1 / 16, num_classes=5, image_size=64, init="glorot").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.to_dense(net)(x)[:, :, 0, 0], net(x), atol=1e-5, rtol=0)
        assert model.to_dense(net)(torch.randn(1, 3, 128, 96)).shape == (1, 5, 3, 2)


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name):
    net = model.build(name, **SMALL, init="glorot")
    loss = torch.nn.functional.cross_entropy(net(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
    loss.backward()
    for key, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_checkpoint_loads_strict_with_identical_logits(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, TORCHVISION[name])(weights=None).eval()
    ours = model.build(name).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)  # any size: both pool adaptively to 7x7 before FC6
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("scheme", model.INITS)
def test_init_schemes_have_zero_biases(scheme):
    net = model.build("A", width=1 / 8, init=scheme)
    assert all(m.bias.abs().sum() == 0 for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def test_paper_init_is_normal_std_0_01():
    w = model.build("A", init="paper").features[0].weight.detach()  # 1728 values; fc6 tested cheaply below
    fc6 = model.build("A", width=1 / 8, init="paper").classifier[0].weight.detach()
    assert abs(fc6.mean()) < 1e-4 and abs(fc6.std() - 0.01) < 2e-4
    assert abs(w.std() - 0.01) < 1e-3


def test_glorot_init_matches_its_bound():
    w = model.build("A", width=1 / 8, init="glorot").classifier[0].weight.detach()
    fan_in, fan_out = w.shape[1], w.shape[0]
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound


def test_unknown_init_is_an_error():
    with pytest.raises(ValueError, match="Invalid init 'he'. Only paper, glorot, kaiming"):
        model.build("A", init="he")


@pytest.mark.parametrize("target", ["B", "C", "D", "E"])
def test_init_from_a_copies_exactly_the_intended_tensors(target):
    a = model.build("A", width=1 / 8, num_classes=10, init="glorot")
    net = model.build(target, width=1 / 8, num_classes=10, init="glorot")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copied = model.init_from_a(net, a.state_dict())

    a_sd, after = a.state_dict(), net.state_dict()
    a_convs = [k for k in a_sd if k.startswith("features.") and k.endswith(".weight")][:4]
    t_convs = [k for k in after if k.startswith("features.") and k.endswith(".weight")]
    # A's convs are (block 1: 1st), (block 2: 1st), (block 3: 1st, 2nd); in every deeper net block
    # 1 and 2 hold two convs, so those positions are the 1st, 3rd, 5th and 6th convs.
    expected_targets = [t_convs[i] for i in (0, 2, 4, 5)]
    expected = {}
    for src, dst in zip(a_convs, expected_targets):
        expected[dst] = src
        expected[dst.replace(".weight", ".bias")] = src.replace(".weight", ".bias")
    for i in (0, 3, 6):
        for leaf in ("weight", "bias"):
            expected[f"classifier.{i}.{leaf}"] = f"classifier.{i}.{leaf}"
    assert sorted(copied) == sorted(expected)
    for key in after:
        if key in expected:
            assert torch.equal(after[key], a_sd[expected[key]]), key
        else:
            assert torch.equal(after[key], before[key]), key


def test_init_from_a_rejects_another_width_naming_the_layer():
    a = model.build("A", width=1 / 4, num_classes=10)
    net = model.build("D", width=1 / 8, num_classes=10)
    with pytest.raises(ValueError, match=r"features\.0\.weight.*features\.0\.weight"):
        model.init_from_a(net, a.state_dict())


def test_init_from_a_rejects_a_state_dict_that_is_not_a():
    net = model.build("D", width=1 / 8, num_classes=10)
    with pytest.raises(ValueError, match="has no 'features"):
        model.init_from_a(net, {"classifier.0.weight": torch.zeros(1)})
