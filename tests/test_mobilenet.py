"""The mobile architectures (MobileNetV2 and torchvision's ResNet-18 for 32x32, models/mobilenet.py and
models/resnet_cifar.py) and models from outside the registry (models/external.py), through what the pipeline does to
a model: coupled channel groups against torch-pruning's own, surgery of one zeroed group (exact, exactly one channel
fewer), the architecture description round trip, the MAC/param cost model and the budget solver's time."""
import copy
import io
import json
import math
import random
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import models
from models.external import builder_kwargs, builder_problem, create_external
from models.preact_resnet import CIFAR10_MEAN, CIFAR10_STD, Normalize
from pipeline.algorithms import budget as budget_mod
from pipeline.algorithms.budget import cost_problem, group_loss, network_layers, solve
from pipeline.algorithms.groups import coupled_families, group_costs, is_depthwise, paper_families
from pipeline.algorithms.surgery import count_params_macs, remove_dead_channels
from tests.helpers import randomized_model as randomized

MOBILE = ("test_mobilenet", "mobilenet_v2_cifar", "resnet18_cifar")


def example(n=2, seed=1, shape=(3, 32, 32)):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))




def logits64(model, x):
    m = copy.deepcopy(model).double().eval()
    with models.noise_disabled(m), torch.no_grad():
        return m(x.double())


def layer_dims(model):
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[n] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[n] = (m.in_features, m.out_features)
        elif isinstance(m, nn.BatchNorm2d):
            out[n] = (m.num_features,)
    return out


# ------------------------------------------------------------------------------------------------ the registry
def test_registry_metadata():
    for name in ("preact_resnet20", "preact_resnet38", "preact_resnet56", "test_resnet"):
        meta = models.model_entry(name).metadata
        assert meta["noise_sites"] is True and meta["family"] == "preact_resnet"
    for name, family in (("mobilenet_v2_cifar", "mobilenet_v2"), ("test_mobilenet", "mobilenet_v2"),
                         ("resnet18_cifar", "resnet")):
        meta = models.model_entry(name).metadata
        assert meta["noise_sites"] is False and meta["family"] == family and not meta.get("external")
        assert name in models.list_models()
    # an external name: an entry without importing anything (the module does not exist)
    meta = models.model_entry("no_such_package_xyz.mod:build").metadata
    assert meta["external"] is True and meta["noise_sites"] is False
    assert "no_such_package_xyz" not in sys.modules
    with pytest.raises(KeyError, match="unknown model"):
        models.model_entry("mobilenet_v3")


def test_supports_latency_budget():
    assert models.supports_latency_budget("preact_resnet20") and models.supports_latency_budget("test_resnet")
    for name in MOBILE:
        assert not models.supports_latency_budget(name)
    assert not models.supports_latency_budget("some.module:builder")


@pytest.mark.parametrize("arch", MOBILE)
def test_calling_convention_shapes_and_member_names(arch):
    model = models.create_model(arch, ensemble=2, noise_coef=0.0, num_classes=100, normalize=True,
                                in_channels=1).eval()
    with torch.no_grad():
        out = model(example(2, shape=(1, 32, 32)))
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("members.0.", "members.1.")) for n in names)
    with pytest.raises(ValueError, match="no noise sites"):
        models.create_model(arch, noise_coef=0.1)
    with pytest.raises(ValueError, match="ensemble"):
        models.create_model(arch, ensemble=0)
    # any image size: global average pooling before the classifier
    with torch.no_grad():
        assert models.create_model(arch).eval()(example(2, shape=(3, 20, 20))).shape == (2, 10)


def test_mobilenet_v2_matches_torchvision_parameter_count_and_layout():
    from torchvision.models import mobilenet_v2

    model = models.create_model("mobilenet_v2_cifar")
    n = sum(p.numel() for p in model.parameters())
    # the same layers as torchvision's MobileNetV2 (the 32x32 variant changes strides only)
    assert n == sum(p.numel() for p in mobilenet_v2(num_classes=10).parameters()) == 2_236_682
    assert models.model_entry("mobilenet_v2_cifar").metadata["params_per_member"] == n
    member = model.members[0]
    blocks = list(member.layers)
    assert len(blocks) == 17
    assert [b.conv2.stride[0] for b in blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert [b.residual for b in blocks] == [False, False, True, False, True, True, False, True, True, True, False,
                                            True, True, False, True, True, False]
    assert blocks[0].conv1 is None and all(b.conv1.kernel_size == (1, 1) for b in blocks[1:])
    assert all(is_depthwise(b.conv2) and b.conv2.kernel_size == (3, 3) for b in blocks)
    assert member.conv1.stride == (1, 1) and member.conv2.out_channels == 1280
    sizes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: sizes.__setitem__(n, o.shape[-1]))
             for n, m in member.named_modules() if n in ("conv1", "conv2")]
    with torch.no_grad():
        model.eval()(example(1))
    for h in hooks:
        h.remove()
    assert sizes == {"conv1": 32, "conv2": 4}    # stride-1 stem, three downsamplings


def test_resnet18_is_torchvisions_with_a_cifar_stem():
    from torchvision.models import resnet18

    model = models.create_model("resnet18_cifar")
    net = model.members[0].net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    tv = sum(p.numel() for p in resnet18(num_classes=10).parameters())
    assert sum(p.numel() for p in model.parameters()) == tv - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3 == 11_173_962
    assert models.model_entry("resnet18_cifar").metadata["params_per_member"] == 11_173_962


@pytest.mark.parametrize("arch", MOBILE)
def test_normalisation_is_inside_and_ensemble_averages(arch):
    model = randomized(arch, ensemble=2)
    x = example(3)
    for member in model.members:
        assert isinstance(member.normalize, Normalize)
        torch.testing.assert_close(member.normalize.mean.flatten(), torch.tensor(CIFAR10_MEAN))
        torch.testing.assert_close(member.normalize.std.flatten(), torch.tensor(CIFAR10_STD))
    raw = models.create_model(arch, ensemble=2, normalize=False).eval()
    raw.load_state_dict({k: v for k, v in model.state_dict().items() if ".normalize." not in k})
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw((x - mean) / std), rtol=1e-5, atol=1e-5)
        members = torch.stack([m(x) for m in model.members])
        assert (members[0] - members[1]).abs().max() > 1e-4
        torch.testing.assert_close(model(x), members.mean(0), rtol=0, atol=1e-5)
    grey = models.create_model(arch, in_channels=1).members[0].normalize
    assert grey.mean.shape == (1, 1, 1, 1)


# ---------------------------------------------------------------------------------- coupled groups vs torch-pruning
def family_items(family):
    """{(param, dim, index, channel j)} over all of the family's groups."""
    return {(s.name, s.dim, int(s.index[j]), j) for s in family.slices for j in range(family.width)}


def dg_items(dg, group, names):
    """The same set for one of torch-pruning's groups (root channels as j); a depthwise conv's slice is its filter."""
    out = set()
    for item in group:
        dep, module, op = item.dep, item.dep.target.module, item.dep.target.type
        reads = dg.is_in_channel_pruning_fn(dep.handler)
        pairs = list(zip(item.idxs, item.root_idxs))
        if op == tp.ops.OPTYPE.DEPTHWISE_CONV:
            params = [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
        elif op == tp.ops.OPTYPE.CONV:
            params = [("weight", 1)] if reads else [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
        elif op == tp.ops.OPTYPE.BN:
            params = [("weight", 0), ("bias", 0)]
        elif op == tp.ops.OPTYPE.LINEAR:
            assert reads
            params = [("weight", 1)]
        else:
            continue
        out |= {(f"{names[module]}.{p}", d, int(i), int(j)) for p, d in params for i, j in pairs}
    return out


@pytest.mark.parametrize("arch,ensemble,n_families", [("test_mobilenet", 2, 2 * 6), ("mobilenet_v2_cifar", 1, 25),
                                                      ("resnet18_cifar", 1, 12)])
def test_coupled_families_are_dependency_graph_groups(arch, ensemble, n_families):
    model = randomized(arch, ensemble).train()
    x = example()
    families = coupled_families(model, x)
    assert all(m.training for m in model.modules())
    assert len(families) == n_families
    params = {id(p) for p in model.parameters()}
    assert all(id(s.tensor) in params for f in families for s in f.slices)
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    model.train()
    names = {m: n for n, m in model.named_modules()}
    groups = {names[g[0].dep.target.module]: g for g in dg.get_all_groups(root_module_types=(nn.Conv2d,))}
    # every DependencyGraph group is a family, except the one reaching the logits (a linear's outputs)
    assert sorted(f.name for f in families) == sorted(groups)
    for f in families:
        assert family_items(f) == dg_items(dg, groups[f.name], names), f.name


def test_test_mobilenet_families_channel_by_channel_and_by_hand():
    """Per channel, against torch-pruning's pruning group of that one channel; and the inventory by hand."""
    model = randomized("test_mobilenet")
    x = example()
    families = {f.name: f for f in coupled_families(model, x)}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    for f in families.values():
        for j in range(f.width):
            group = dg.get_pruning_group(modules[f.name], tp.prune_conv_out_channels, [j])
            assert {(s.name, s.dim, int(s.index[j])) for s in f.slices} == \
                {(p, d, i) for p, d, i, _ in dg_items(dg, group, names)}, (f.name, j)
    p = "members.0."
    # the stem's channels run through block 0's depthwise conv (expansion 1): one family, read by block 0's conv3
    stem = families[p + "layers.0.conv2"]
    assert stem.width == 8 and sorted((s.name, s.dim) for s in stem.slices) == sorted(
        [(p + "conv1.weight", 0), (p + "bn1.weight", 0), (p + "bn1.bias", 0), (p + "layers.0.conv2.weight", 0),
         (p + "layers.0.bn2.weight", 0), (p + "layers.0.bn2.bias", 0), (p + "layers.0.conv3.weight", 1)])
    assert stem.group_size == 27 + 2 + 9 + 2 + 4
    # an expansion: conv1 filter, bn1, the depthwise filter, bn2, conv3's input slice
    expansion = families[p + "layers.2.conv2"]
    assert expansion.width == 32 and expansion.group_size == 8 + 2 + 9 + 2 + 8
    # the stage-2 stream: written by conv3 of blocks 1 and 2 (residual add), read by block 2's conv1 and the head
    stream = families[p + "layers.1.conv3"]
    assert sorted(s.name for s in stream.slices if s.dim == 1) == [p + "conv2.weight", p + "layers.2.conv1.weight"]
    assert sorted(s.name for s in stream.slices if s.dim == 0 and s.tensor.dim() == 4) == [
        p + "layers.1.conv3.weight", p + "layers.2.conv3.weight"]
    head = families[p + "conv2"]
    assert [s.name for s in head.slices if s.dim == 1] == [p + "linear.weight"]


def test_paper_groups_of_a_depthwise_conv_are_its_filters():
    model = models.create_model("test_mobilenet")
    fams = {f.name: f for f in paper_families(model)}
    dw = fams["members.0.layers.2.conv2"]
    assert dw.width == 32 and dw.slices[0].dim == 0 and dw.group_size == 9
    assert fams["members.0.layers.2.conv3"].width == 32 and fams["members.0.layers.2.conv3"].slices[0].dim == 1
    scales = group_costs(model, list(fams.values()), example(), "weights")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    reference = sum(m.weight.numel() for m in convs) / sum(m.in_channels for m in convs)
    assert scales[list(fams).index("members.0.layers.2.conv2")] == pytest.approx(9 / reference)


# ------------------------------------------------------------------------------------------------------ surgery
def zero_group(family, j):
    with torch.no_grad():
        for s in family.slices:
            s.tensor.select(s.dim, int(s.index[j])).zero_()


def check_one_channel_fewer(model, family, result, x):
    """The pruned network computes the masked one's function and every layer of the family lost one channel."""
    assert result.max_abs_diff <= 1e-5
    assert (logits64(result.model, x) - logits64(model, x)).abs().max() <= 1e-5
    before, after = layer_dims(model), layer_dims(result.model)
    modules = dict(model.named_modules())
    readers, producers = set(), set()
    for s in family.slices:
        name = s.name.rsplit(".", 1)[0]
        m = modules[name]
        if is_depthwise(m) or isinstance(m, nn.BatchNorm2d):
            readers.add(name)
            producers.add(name)
        elif s.dim == 1:
            readers.add(name)
        else:
            producers.add(name)
    for name, dims in before.items():
        if len(dims) == 1:
            expected = (dims[0] - (name in producers),)
        else:
            expected = (dims[0] - (name in readers), dims[1] - (name in producers))
        assert after[name] == expected, (family.name, name, dims, after[name])
    for name, m in result.model.named_modules():
        if isinstance(m, nn.Conv2d) and is_depthwise(modules[name]):
            assert m.groups == m.in_channels == m.out_channels   # still depthwise
    # in the paper's unit every zero group went: the readers' input slices and a depthwise conv's filter
    n_zero = sum(1 for s in family.slices if s.tensor.dim() == 4 and (s.dim == 1 or is_depthwise(
        modules[s.name.rsplit(".", 1)[0]])))
    assert result.zero_channels == result.removed_channels == n_zero and result.kept_for_shape == 0


@pytest.mark.parametrize("arch,ensemble,sample", [("test_mobilenet", 2, None), ("mobilenet_v2_cifar", 1, 4),
                                                  ("resnet18_cifar", 1, 3)])
def test_zeroing_one_coupled_group_removes_exactly_that_channel(arch, ensemble, sample):
    rng = random.Random(0)
    base = randomized(arch, ensemble)
    x = example(2, seed=3)
    n = len(coupled_families(base, x))
    chosen = range(n) if sample is None else rng.sample(range(n), sample)
    for fi in chosen:
        model = copy.deepcopy(base)
        family = coupled_families(model, x)[fi]
        zero_group(family, rng.randrange(family.width))
        check_one_channel_fewer(model, family, remove_dead_channels(model, x), x)


def test_a_fully_dead_expansion_keeps_one_channel_and_stays_depthwise():
    model = randomized("test_mobilenet")
    x = example()
    family = {f.name: f for f in coupled_families(model, x)}["members.0.layers.2.conv2"]
    for j in range(family.width):
        zero_group(family, j)
    res = remove_dead_channels(model, x)
    block = res.model.members[0].layers[2]
    assert block.conv1.out_channels == block.conv2.in_channels == block.conv2.out_channels == 1
    assert block.conv3.in_channels == 1 and block.bn2.num_features == 1
    # zero groups: 32 depthwise filters, 32 conv3 input slices, and conv1's 8 input slices (all its filters are
    # zero) -- those stay: the stream they read feeds the head too
    assert res.kept_for_shape == 2 and res.removed_channels == 2 * 31 and res.zero_channels == 2 * 32 + 8
    assert res.max_abs_diff <= 1e-5


# ------------------------------------------------------------------------------------------------- descriptions
def round_trip(pruned, arch, kwargs, x):
    desc = json.loads(json.dumps(models.describe(pruned, arch, kwargs)))
    buf = io.BytesIO()
    torch.save(pruned.state_dict(), buf)
    buf.seek(0)
    rebuilt = models.build_from_description(desc)
    rebuilt.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned.eval()(x))
    for (n, a), (_, b) in zip(pruned.named_modules(), rebuilt.named_modules()):
        if isinstance(a, nn.Conv2d):
            assert (a.in_channels, a.out_channels, a.groups) == (b.in_channels, b.out_channels, b.groups), n
    return desc


@pytest.mark.parametrize("arch,kwargs", [("test_mobilenet", {"ensemble": 2}),
                                         ("mobilenet_v2_cifar", {"num_classes": 100}),
                                         ("resnet18_cifar", {})])
def test_description_round_trip_of_a_pruned_model(arch, kwargs):
    model = randomized(arch, **kwargs)
    x = example()
    rng = random.Random(1)
    families = coupled_families(model, x)
    for family in rng.sample(families, min(6, len(families))):
        for j in rng.sample(range(family.width), max(1, family.width // 3)):
            zero_group(family, j)
    pruned = remove_dead_channels(model, x).model
    desc = round_trip(pruned, arch, kwargs, x)
    assert desc["shapes"] and desc["arch"] == arch and desc["kwargs"] == kwargs
    if arch != "resnet18_cifar":
        assert any(".conv2" in k and "layers" in k for k in desc["shapes"])   # a depthwise conv was resized


def test_resize_keeps_depthwise_and_refuses_grouped_convs():
    from models.shapes import _resized

    dw = nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False)
    small = _resized(dw, [5, 5], "dw")
    assert (small.in_channels, small.out_channels, small.groups, small.stride) == (5, 5, 5, (2, 2))
    assert small.weight.shape == (5, 1, 3, 3)
    with pytest.raises(ValueError, match="depthwise conv has as many outputs as inputs"):
        _resized(dw, [5, 4], "dw")
    with pytest.raises(ValueError, match="cannot resize a grouped conv"):
        _resized(nn.Conv2d(8, 8, 3, groups=2), [6, 6], "g")
    assert _resized(nn.BatchNorm1d(4), [3], "bn").num_features == 3


# ------------------------------------------------------------------------------------------- external builders
EXTERNAL = textwrap.dedent('''
    import torch.nn as nn
    import torch.nn.functional as F

    class SmallCNN(nn.Module):
        def __init__(self, width, num_classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(2 * width)
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def small_cnn(width=8, num_classes=10):
        return SmallCNN(width, num_classes)

    def fixed_classes(width=8):
        return SmallCNN(width, 10)

    def with_kwargs(**kwargs):
        return SmallCNN(kwargs.get("width", 8), 10)

    def not_a_module(width=8):
        return {"width": width}

    def wrong_classes(num_classes=10):
        return SmallCNN(4, num_classes + 1)

    def tuple_output(num_classes=10):
        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = SmallCNN(4, num_classes)
            def forward(self, x):
                return self.net(x), x
        return Two()

    def grey_only(num_classes=10):
        m = SmallCNN(4, num_classes)
        m.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        return m

    def explodes(num_classes=10):
        raise RuntimeError("out of ideas")

    class FlatCNN(nn.Module):
        """LeNet-style: the last conv's 4x4 maps flattened into the classifier."""
        def __init__(self, num_classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 5, stride=2, padding=2)
            self.conv2 = nn.Conv2d(6, 8, 3, stride=4, padding=1)
            self.fc = nn.Linear(8 * 4 * 4, num_classes)

        def forward(self, x):
            x = F.relu(self.conv2(F.relu(self.conv1(x))))
            return self.fc(x.flatten(1))

    def flat_cnn(num_classes=10):
        return FlatCNN(num_classes)

    NOT_CALLABLE = 3
''')


@pytest.fixture
def ext(tmp_path, monkeypatch):
    """A user's module ``my_ext_models`` (and one that fails to import) on sys.path; forgotten afterwards."""
    (tmp_path / "my_ext_models.py").write_text(EXTERNAL)
    (tmp_path / "my_broken_models.py").write_text("import numpy\nimport a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_ext_models"
    for name in ("my_ext_models", "my_broken_models"):
        sys.modules.pop(name, None)


def test_external_builder_through_create_model(ext):
    model = models.create_model(f"{ext}:small_cnn", width=6, num_classes=7)
    assert isinstance(model, models.Ensemble) and len(model.members) == 1
    assert {n for n, _ in model.named_parameters()} >= {"members.0.conv1.weight", "members.0.fc.bias"}
    with torch.no_grad():
        assert model.eval()(example(2)).shape == (2, 7)
    assert models.model_entry(f"{ext}:small_cnn").metadata == {
        "noise_sites": False, "external": True, "family": "external", "paper": False}
    assert create_external(f"{ext}:small_cnn").members[0].conv1.out_channels == 8
    assert builder_problem(f"{ext}:small_cnn", {"width": 6}, 7, (3, 32, 32)) is None
    assert builder_problem(f"{ext}:small_cnn", {}, 3, (3, 16, 16)) is None
    # num_classes only when the signature names it, and the user's own value wins
    assert builder_kwargs(f"{ext}:small_cnn", {"width": 4}, 5) == {"width": 4, "num_classes": 5}
    assert builder_kwargs(f"{ext}:small_cnn", {"num_classes": 3}, 5) == {"num_classes": 3}
    assert builder_kwargs(f"{ext}:fixed_classes", {"width": 4}, 5) == {"width": 4}
    assert builder_kwargs(f"{ext}:with_kwargs", {}, 5) == {}
    assert builder_problem(f"{ext}:fixed_classes", {}, 10, (3, 32, 32)) is None
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        models.create_model(f"{ext}:not_a_module")
    with pytest.raises(ValueError, match="cannot import module"):
        models.create_model("my_broken_models:anything")


def test_builder_problem_messages(ext):
    shape = (3, 32, 32)
    cases = {
        "no_such_module_abc.sub:build": ("cannot import module no_such_module_abc.sub (ModuleNotFoundError: No "
                                         "module named 'no_such_module_abc')"),
        "my_broken_models:build": ("cannot import module my_broken_models (ModuleNotFoundError: No module named "
                                   "'a_package_that_is_not_installed')"),
        f"{ext}:missing": f"module {ext} (",
        f"{ext}:NOT_CALLABLE": f"{ext}:NOT_CALLABLE is a int, not a function",
        f"{ext}:not_a_module": f"{ext}:not_a_module(width=8) returned a dict, not a torch.nn.Module",
        f"{ext}:wrong_classes": (f"the model of {ext}:wrong_classes maps a zeros batch [2, 3, 32, 32] to [2, 11]; "
                                 "expected [2, 10] (logits of the 10 classes)"),
        f"{ext}:tuple_output": f"the model of {ext}:tuple_output returns a tuple on a zeros batch [2, 3, 32, 32]; "
                               "expected a logits tensor [2, 10]",
        f"{ext}:grey_only": f"the model of {ext}:grey_only fails on a zeros batch [2, 3, 32, 32]: RuntimeError: ",
        f"{ext}:explodes": f"{ext}:explodes(num_classes=10) raised RuntimeError: out of ideas",
        "not an arch": 'expected "package.module:function", got \'not an arch\'',
        f"{ext}:": f'expected "package.module:function", got \'{ext}:\'',
    }
    kwargs = {f"{ext}:not_a_module": {"width": 8}}
    for arch, message in cases.items():
        problem = builder_problem(arch, kwargs.get(arch, {}), 10, shape)
        assert problem is not None and problem.startswith(message), (arch, problem)
        assert "\n" not in problem
    assert "has no 'missing'" in builder_problem(f"{ext}:missing", {}, 10, shape)
    typo = builder_problem(f"{ext}:small_cnn", {"widht": 4}, 10, shape)
    assert typo.startswith(f"{ext}:small_cnn(widht=4, num_classes=10) raised TypeError: ") and "widht" in typo
    # the user passing num_classes to a builder without one: a TypeError, not silently dropped
    assert "unexpected keyword argument 'num_classes'" in builder_problem(f"{ext}:fixed_classes",
                                                                         {"num_classes": 10}, 10, shape)


def test_external_model_groups_surgery_and_description(ext):
    arch, kwargs = f"{ext}:small_cnn", {"width": 8, "num_classes": 10}
    model = randomized(arch, **kwargs)
    x = example()
    families = {f.name: f for f in coupled_families(model, x)}
    assert sorted(families) == ["members.0.conv1", "members.0.conv2"]
    zero_group(families["members.0.conv1"], 3)
    zero_group(families["members.0.conv2"], 5)
    res = remove_dead_channels(model, x)
    # paper units: conv2's zero input slice (the classifier's zero column is not a conv group)
    assert res.max_abs_diff <= 1e-5 and res.removed_channels == res.zero_channels == 1
    assert layer_dims(res.model)["members.0.conv2"] == (7, 15) and layer_dims(res.model)["members.0.fc"] == (15, 10)
    desc = round_trip(res.model, arch, kwargs, x)
    assert desc == {"arch": arch, "kwargs": kwargs, "shapes": {
        "members.0.conv1": [3, 7], "members.0.bn1": [7], "members.0.conv2": [7, 15], "members.0.bn2": [15],
        "members.0.fc": [15, 10]}}


# ---------------------------------------------------------------------------------------------- MAC/param budget
@pytest.mark.parametrize("arch", ["test_mobilenet", "mobilenet_v2_cifar", "resnet18_cifar"])
def test_cost_model_counts_what_torch_pruning_counts(arch):
    model = randomized(arch)
    x = example()
    families = coupled_families(model, x)
    layers = network_layers(model, families, x)
    depthwise = [layer for layer in layers if layer.kind == "depthwise"]
    assert len(depthwise) == (3 if arch == "test_mobilenet" else 17 if arch == "mobilenet_v2_cifar" else 0)
    assert all(layer.in_family == layer.out_family is not None for layer in depthwise)
    params, macs = count_params_macs(model)
    dense = [[f.width] for f in families]
    assert cost_problem(layers, dense, "macs").cost([0] * len(families)) == macs
    assert cost_problem(layers, dense, "params").cost([0] * len(families)) == params
    pruned = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=x)
    roots = dict(pruned.named_modules())
    for fam in coupled_families(pruned, x):
        dg.get_pruning_group(roots[fam.name], tp.prune_conv_out_channels, [0, 1]).prune()
    narrow = [[f.width - 2] for f in families]
    params, macs = count_params_macs(pruned)
    assert cost_problem(layers, narrow, "macs").cost([0] * len(families)) == macs
    assert cost_problem(layers, narrow, "params").cost([0] * len(families)) == params


def test_depthwise_cost_is_kernel_times_width_times_positions():
    model = models.create_model("test_mobilenet")
    families = coupled_families(model, example())
    layers = {layer.name: layer for layer in network_layers(model, families, example())}
    dw = layers["members.0.layers.1.conv2"]     # 16 channels, 3x3, stride 2: 16x16 outputs
    assert (dw.kind, dw.kernel, dw.positions) == ("depthwise", 9, 256)
    assert budget_mod._layer_cost(dw, 12, 12, "macs") == 12 * 9 * 256
    assert budget_mod._layer_cost(dw, 12, 12, "params") == 12 * 9


def test_solver_on_mobilenet_v2_mac_budget_is_fast_and_meets_the_target():
    from pipeline.train.sparsify import allowed_widths

    model = models.create_model("mobilenet_v2_cifar")
    x = example()
    families = coupled_families(model, x)
    options = allowed_widths(model, families, 8)
    problem = cost_problem(network_layers(model, families, x), options, "macs")
    dense = problem.cost(problem.dense_choice())
    rng = np.random.default_rng(0)
    losses = [group_loss(rng.uniform(0, 1, f.width) ** 2, o, 1.0) for f, o in zip(families, options)]
    t = time.perf_counter()
    choice = solve(problem, losses, dense / 2)
    elapsed = time.perf_counter() - t
    cost = problem.cost(choice)
    assert dense / 2 * 0.98 <= cost <= dense / 2        # within 2% of the budget, never over it
    assert elapsed < 20, elapsed                          # ~0.4 s on one core
    assert math.isfinite(sum(losses[f][i] for f, i in enumerate(choice)))


def test_external_flatten_into_a_linear_is_not_a_family_and_surgery_stays_exact(ext):
    """A channel flattened into 16 classifier columns is not one group: its family is left out, the others stay;
    surgery (which reads all 16 columns) still cuts such a channel when all of them are zero."""
    model = randomized(f"{ext}:flat_cnn")
    x = example()
    families = coupled_families(model, x)
    assert [f.name for f in families] == ["members.0.conv1"]
    with torch.no_grad():
        model.members[0].fc.weight[:, 16 * 3:16 * 4] = 0        # channel 3 of conv2: all its 16 columns
        model.members[0].conv2.weight[:, 2] = 0                 # channel 2 of conv1
    res = remove_dead_channels(model, x)
    assert res.max_abs_diff <= 1e-5
    assert layer_dims(res.model)["members.0.conv2"] == (5, 7) and layer_dims(res.model)["members.0.fc"] == (112, 10)
    round_trip(res.model, f"{ext}:flat_cnn", {}, x)


def test_the_grouped_ensemble_refuses_other_architectures():
    from models.grouped import to_grouped

    with pytest.raises(ValueError, match="pre-activation ResNet members, got MobileNetV2"):
        to_grouped(models.create_model("test_mobilenet", ensemble=2))
