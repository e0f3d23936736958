import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models import PreActBlock, ResidualNoise, noise_disabled
from models.preact_resnet import CIFAR10_MEAN, CIFAR10_STD


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bn(c: int) -> int:
    return 2 * c  # weight + bias (running stats are buffers, not parameters)


def conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k  # bias=False everywhere


def block(c_in: int, c_out: int) -> int:
    """bn1 + conv1 (3x3) + bn2 + conv2 (3x3) + a 1x1 shortcut where the shape changes."""
    shortcut = conv(c_in, c_out, 1) if c_in != c_out else 0
    return bn(c_in) + conv(c_in, c_out, 3) + bn(c_out) + conv(c_out, c_out, 3) + shortcut


def resnet_params(n: int, widths=(16, 32, 64), classes: int = 10) -> int:
    """Hand count for a PreActResNet with ``n`` blocks per stage (stride/width change at each stage start)."""
    total = conv(3, widths[0], 3)                       # stem
    c_in = widths[0]
    for w in widths:
        total += block(c_in, w) + (n - 1) * block(w, w)
        c_in = w
    return total + bn(widths[-1]) + widths[-1] * classes + classes   # final bn + linear


def eval_with_random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode with BN statistics/affines far from identity, so relu(bn1(x)) differs from x."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- parameter counts

def test_resnet20_parameter_count_by_hand():
    stem = 3 * 16 * 9                                                    # 432
    # Stage 1: 3 blocks 16->16, no shortcut: bn1 2*16, conv1 16*16*9, bn2 2*16, conv2 16*16*9
    stage1 = 3 * (2 * 16 + 16 * 16 * 9 + 2 * 16 + 16 * 16 * 9)         # 3 * 4672 = 14016
    # Stage 2: first block 16->32 (stride 2) with a 1x1 shortcut 16*32, then 2 blocks 32->32
    stage2 = (2 * 16 + 16 * 32 * 9 + 2 * 32 + 32 * 32 * 9 + 16 * 32) \
        + 2 * (2 * 32 + 32 * 32 * 9 + 2 * 32 + 32 * 32 * 9)             # 14432 + 37120 = 51552
    # Stage 3: first block 32->64 with a 1x1 shortcut 32*64, then 2 blocks 64->64
    stage3 = (2 * 32 + 32 * 64 * 9 + 2 * 64 + 64 * 64 * 9 + 32 * 64) \
        + 2 * (2 * 64 + 64 * 64 * 9 + 2 * 64 + 64 * 64 * 9)             # 57536 + 147968 = 205504
    head = 2 * 64 + (64 * 10 + 10)                                      # final bn + linear = 778
    expected = stem + stage1 + stage2 + stage3 + head
    assert expected == 272_282
    assert resnet_params(3) == expected  # the helper used for 38/56 agrees with the explicit sum

    model = models.create_model("preact_resnet20", ensemble=1)
    assert n_params(model) == expected
    assert abs(expected / 1e6 - 0.27) < 0.005            # "0.27M" in the paper
    assert models.model_entry("preact_resnet20").metadata["params_per_member"] == expected
    assert n_params(models.create_model("preact_resnet20", ensemble=2)) == 2 * expected


@pytest.mark.parametrize("name,n", [("preact_resnet20", 3), ("preact_resnet38", 6), ("preact_resnet56", 9)])
def test_depth_block_structure_and_parameter_count(name, n):
    model = models.create_model(name, ensemble=1)
    member = model.members[0]
    assert [len(member.layer1), len(member.layer2), len(member.layer3)] == [n, n, n]
    assert all(isinstance(b, PreActBlock) for layer in (member.layer1, member.layer2, member.layer3) for b in layer)
    # depth = stem + 2 convs per block + linear
    assert 2 + 2 * 3 * n == models.model_entry(name).metadata["depth"]
    assert n_params(model) == resnet_params(n)


def test_parameter_count_ignores_noise_and_scales_with_ensemble():
    one = n_params(models.create_model("test_resnet", ensemble=1, noise_coef=0.0))
    assert one == resnet_params(1, widths=(4, 8, 16))
    assert n_params(models.create_model("test_resnet", ensemble=3, noise_coef=0.5)) == 3 * one


# --------------------------------------------------------------------------- outputs / ensembles

@pytest.mark.parametrize("name", ["test_resnet", "preact_resnet20"])
@pytest.mark.parametrize("ensemble", [1, 3])
def test_output_shape(name, ensemble):
    model = models.create_model(name, ensemble=ensemble).eval()
    assert len(model.members) == ensemble
    with torch.no_grad():
        out = model(images(2))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_ensemble_is_mean_of_member_logits():
    torch.manual_seed(0)
    model = eval_with_random_bn(models.create_model("preact_resnet20", ensemble=3, noise_coef=0.1))
    x = images(4)
    with noise_disabled(model), torch.no_grad():
        out = model(x)
        members = torch.stack([m(x) for m in model.members])
    # The members really differ (otherwise "mean" would be untested) ...
    assert (members[0] - members[1]).abs().max() > 1e-3
    # ... and the ensemble is their average, not e.g. their sum or the first member.
    torch.testing.assert_close(out, members.mean(0), rtol=0, atol=1e-5)


def test_invalid_ensemble_size():
    with pytest.raises(ValueError):
        models.create_model("test_resnet", ensemble=0)


# --------------------------------------------------------------------------- noise

def _blocks(model):
    return [m for m in model.modules() if isinstance(m, PreActBlock)]


@pytest.mark.parametrize("name,blocks_per_member", [("test_resnet", 3), ("preact_resnet20", 9)])
def test_one_noise_module_per_block(name, blocks_per_member):
    model = models.create_model(name, ensemble=2, noise_coef=0.3)
    noises = [m for m in model.modules() if isinstance(m, ResidualNoise)]
    assert len(noises) == blocks_per_member * 2
    assert len(_blocks(model)) == blocks_per_member * 2
    for b in _blocks(model):
        assert isinstance(b.noise, ResidualNoise) and b.noise.coef == 0.3
        assert sum(isinstance(m, ResidualNoise) for m in b.modules()) == 1


def test_noise_is_applied_to_the_residual_sum():
    """Hooks: noise input == conv2 output + shortcut branch, and the block returns the noise output."""
    torch.manual_seed(0)
    model = eval_with_random_bn(models.create_model("test_resnet", ensemble=1, noise_coef=0.2))
    member = model.members[0]
    for blk in (member.layer1[0], member.layer2[0]):   # identity shortcut and 1x1 projection shortcut
        seen = {}

        def noise_hook(m, a, o):  # returns None: a forward hook's return value would replace the output
            seen["noise_in"], seen["noise_out"] = a[0].detach().clone(), o.detach().clone()

        hooks = [
            blk.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone())),
            blk.register_forward_hook(lambda m, a, o: seen.__setitem__("block_out", o.detach().clone())),
            blk.conv2.register_forward_hook(lambda m, a, o: seen.__setitem__("conv2", o.detach().clone())),
            blk.noise.register_forward_hook(noise_hook),
        ]
        if blk.shortcut is not None:
            hooks.append(blk.shortcut.register_forward_hook(
                lambda m, a, o: seen.__setitem__("shortcut", o.detach().clone())))
        with torch.no_grad():
            model(images(4))
        for h in hooks:
            h.remove()
        skip = seen["shortcut"] if blk.shortcut is not None else seen["x"]
        torch.testing.assert_close(seen["noise_in"], seen["conv2"] + skip, rtol=0, atol=1e-6)
        assert torch.equal(seen["block_out"], seen["noise_out"])
        assert not torch.equal(seen["noise_out"], seen["noise_in"])  # noise actually added, in eval mode


def _block_output(model, blk, x):
    out = {}
    h = blk.register_forward_hook(lambda m, a, o: out.__setitem__("o", o.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["o"]


@pytest.mark.parametrize("train_mode", [False, True])
def test_noise_on_in_both_modes_and_off_with_noise_disabled(train_mode):
    torch.manual_seed(0)
    model = models.create_model("test_resnet", ensemble=2, noise_coef=0.1)
    model.train(train_mode)
    x = images(8)
    for blk in (model.members[0].layer1[0], model.members[1].layer3[0]):
        a, b = _block_output(model, blk, x), _block_output(model, blk, x)
        assert not torch.equal(a, b), "block output should be stochastic when coef > 0"
        # (train-mode BN updates running stats, but normalises with batch stats: noise-free passes agree)
        with noise_disabled(model):
            c, d = _block_output(model, blk, x), _block_output(model, blk, x)
        assert torch.equal(c, d)
    # noise_disabled restores the previous switches
    assert all(m.enabled for m in model.modules() if isinstance(m, ResidualNoise))


def test_noise_disabled_restores_mixed_state():
    model = models.create_model("test_resnet", ensemble=1)
    noises = [m for m in model.modules() if isinstance(m, ResidualNoise)]
    noises[0].enabled = False
    with noise_disabled(model):
        assert not any(m.enabled for m in noises)
    assert [m.enabled for m in noises] == [False] + [True] * (len(noises) - 1)


def test_coef_zero_is_deterministic_and_consumes_no_randomness():
    torch.manual_seed(0)
    model = models.create_model("test_resnet", ensemble=2, noise_coef=0.0).eval()
    x = images(4)
    blk = model.members[1].layer2[0]
    state = torch.get_rng_state()
    a = _block_output(model, blk, x)
    assert torch.equal(torch.get_rng_state(), state)
    b = _block_output(model, blk, x)
    assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert torch.equal(torch.get_rng_state(), state)


def test_noise_disabled_consumes_no_randomness():
    model = models.create_model("test_resnet", ensemble=1, noise_coef=0.5).eval()
    state = torch.get_rng_state()
    with noise_disabled(model), torch.no_grad():
        model(images(2))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("coef", [0.1, 0.5])
def test_noise_magnitude_is_coef_times_std(coef):
    torch.manual_seed(0)
    model = eval_with_random_bn(models.create_model("test_resnet", ensemble=1, noise_coef=coef))
    x = images(64, seed=3)
    member = model.members[0]
    # First block: its input is deterministic, so compare a noisy pass with a noise-free one.
    blk = member.layer1[0]
    with noise_disabled(model):
        clean = _block_output(model, blk, x)
    noisy = _block_output(model, blk, x)
    ratio = float((noisy - clean).std() / (coef * clean.std()))
    assert 0.9 < ratio < 1.1, ratio
    # Every block: the noise module's own input is the clean residual sum of that pass.
    pairs = []
    hooks = [m.register_forward_hook(lambda m, a, o: pairs.append((a[0].detach(), o.detach())))
             for m in member.modules() if isinstance(m, ResidualNoise)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(pairs) == 3
    for inp, out in pairs:
        ratio = float((out - inp).std() / (coef * inp.std()))
        assert 0.9 < ratio < 1.1, ratio
        # zero-mean Gaussian noise
        assert abs(float((out - inp).mean())) < 0.05 * coef * float(inp.std())


# --------------------------------------------------------------------------- normalisation / shortcut

def test_normalisation_inside_model():
    model = models.create_model("test_resnet", ensemble=2).eval()
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    for member in model.members:
        torch.testing.assert_close(member.normalize.mean.flatten(), torch.tensor(CIFAR10_MEAN))
        torch.testing.assert_close(member.normalize.std.flatten(), torch.tensor(CIFAR10_STD))
        # buffers, so they travel with the state_dict / ONNX graph, but are not trained
        assert "normalize.mean" in dict(member.named_buffers())
        assert "normalize.std" in dict(member.named_buffers())
    assert not any("normalize" in n for n, _ in model.named_parameters())
    # The stem conv sees (x - mean) / std of the raw [0, 1] input.
    x = images(3)
    seen = {}
    h = model.members[0].conv1.register_forward_hook(lambda m, a, o: seen.__setitem__("in", a[0].detach()))
    with noise_disabled(model), torch.no_grad():
        model(x)
    h.remove()
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["in"], (x - mean) / std)


@pytest.mark.parametrize("name", ["test_resnet", "preact_resnet20"])
def test_shortcut_only_where_shape_changes(name):
    model = models.create_model(name, ensemble=1)
    member = model.members[0]
    for li, layer in enumerate((member.layer1, member.layer2, member.layer3)):
        for bi, blk in enumerate(layer):
            changes = blk.conv1.stride != (1, 1) or blk.conv1.in_channels != blk.conv2.out_channels
            assert changes == (li > 0 and bi == 0)
            if changes:
                sc = blk.shortcut
                assert isinstance(sc, nn.Conv2d)
                assert sc.kernel_size == (1, 1) and sc.stride == (2, 2) and sc.bias is None
                assert (sc.in_channels, sc.out_channels) == (blk.conv1.in_channels, blk.conv2.out_channels)
            else:
                assert blk.shortcut is None


def test_shortcut_reads_preactivated_input():
    torch.manual_seed(0)
    model = eval_with_random_bn(models.create_model("test_resnet", ensemble=1, noise_coef=0.1))
    member = model.members[0]
    for blk in (member.layer2[0], member.layer3[0]):
        seen = {}
        h1 = blk.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
        h2 = blk.shortcut.register_forward_hook(lambda m, a, o: seen.__setitem__("sc_in", a[0].detach().clone()))
        with torch.no_grad():
            model(images(4))
        h1.remove()
        h2.remove()
        with torch.no_grad():
            expected = F.relu(blk.bn1(seen["x"]))
        torch.testing.assert_close(seen["sc_in"], expected, rtol=0, atol=0)
        # and that is genuinely different from the raw input or relu(x)
        assert not torch.allclose(expected, seen["x"])
        assert not torch.allclose(expected, F.relu(seen["x"]))


# --------------------------------------------------------------------------- registry / descriptions

def test_registry_lists_models_and_rejects_unknown():
    names = models.list_models()
    for n in ("preact_resnet20", "preact_resnet38", "preact_resnet56", "test_resnet"):
        assert n in names
    with pytest.raises(KeyError) as e:
        models.create_model("preact_resnet21")
    msg = str(e.value)
    assert "preact_resnet21" in msg
    for n in names:
        assert n in msg


def test_register_twice_is_an_error():
    with pytest.raises(ValueError):
        models.register_model()(models.preact_resnet.test_resnet)


def test_describe_round_trip_dense():
    torch.manual_seed(0)
    kwargs = {"ensemble": 2, "noise_coef": 0.1}
    model = eval_with_random_bn(models.create_model("test_resnet", **kwargs))
    desc = models.describe(model, "test_resnet", kwargs)
    assert desc == {"arch": "test_resnet", "kwargs": kwargs, "shapes": {}}
    rebuilt = models.build_from_description(desc)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    x = images(2)
    with noise_disabled(model), noise_disabled(rebuilt), torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_normalize_off_feeds_raw_pixels_to_the_stem():
    """normalize=False (the reference's raw [0, 1] input) computes the normalized model's function of the
    de-normalized input: same weights, x -> (x - mean) / std moved outside."""
    from models.preact_resnet import CIFAR10_MEAN, CIFAR10_STD

    torch.manual_seed(0)
    raw = models.create_model("test_resnet", ensemble=2, noise_coef=0.1, normalize=False).eval()
    norm = models.create_model("test_resnet", ensemble=2, noise_coef=0.1).eval()
    assert not any("normalize" in k for k in raw.state_dict())
    missing, unexpected = norm.load_state_dict(raw.state_dict(), strict=False)
    assert unexpected == [] and all(k.endswith(("normalize.mean", "normalize.std")) for k in missing)
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with models.noise_disabled(raw), models.noise_disabled(norm), torch.no_grad():
        torch.testing.assert_close(raw((x - mean) / std), norm(x), rtol=1e-5, atol=1e-5)
        assert (raw(x) - norm(x)).abs().max() > 1e-3     # and the switch really changes the function
    desc = models.describe(raw, "test_resnet", {"ensemble": 2, "noise_coef": 0.1, "normalize": False})
    rebuilt = models.build_from_description(desc)
    rebuilt.load_state_dict(raw.state_dict())           # strict: no normalisation buffers expected
