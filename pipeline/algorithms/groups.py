"""Channel families: which weight slices RGSM treats as one group, and which groups share one width.

A *family* is one channel dimension of the network, ``width`` channels wide; group ``j`` of the family is
the set of weight slices that belong to channel ``j``. Two groupings:

- ``paper``: every conv weight ``W [C_out, C_in, k, k]`` is a family of its ``C_in`` input slices
  ``W[:, i]`` -- the paper's RGSM groups (675 per ResNet20). A zero group does not make the channel
  removable unless every other reader of that channel is zero too.
- ``coupled``: one family per torch-pruning DependencyGraph pruning group rooted at a conv's output
  channels. Group ``j`` spans everything that must go when channel ``j`` is removed: the producing convs'
  output filters, the BN entries (weight and bias), and every consumer's input slice (conv input slices,
  the classifier's input column). A residual-stream channel of a stage is therefore one group spanning
  the stage's stem/conv2/shortcut outputs, its BNs and all its readers. A zero group is a removable channel.

Depthwise convs (MobileNetV2) carry their input channel to the same output channel: their filter ``W[j]`` (and
bias) joins the family of the channel they read, whose producer is the preceding 1x1 expansion (or the stem), and
the family's readers are the convs after the depthwise one. Grouped convs that are not depthwise, concatenations and
splits end a family, and so does a flatten of HxW maps into a linear layer (one channel, H·W columns): a dimension
that reaches one is not a family (never pruned).

The network's interface is never a family: the stem's RGB input has no producer conv, and a dimension
that reaches a linear layer's *outputs* (the logits) is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Slice:
    """``tensor`` indexed along ``dim``: family channel ``j`` is ``tensor.select(dim, index[j])``."""
    name: str
    tensor: torch.Tensor
    dim: int
    index: torch.Tensor   # long, len = family width

    def sq_norms(self) -> torch.Tensor:
        t = self.tensor.detach()
        dims = [d for d in range(t.dim()) if d != self.dim]
        per_position = t.pow(2).sum(dim=dims) if dims else t.pow(2)
        return per_position[self.index]

    def view_shape(self) -> list[int]:
        shape = [1] * self.tensor.dim()
        shape[self.dim] = -1
        return shape

    def along_dim(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """A vector over the whole of ``dim`` holding ``values`` at the family's positions, ``fill`` elsewhere."""
        out = torch.full((self.tensor.shape[self.dim],), fill, dtype=self.tensor.dtype, device=self.tensor.device)
        out[self.index] = values.to(out.dtype)
        return out.view(self.view_shape())

    @property
    def group_numel(self) -> int:
        return self.tensor.numel() // self.tensor.shape[self.dim]


@dataclass(frozen=True)
class ChannelFamily:
    name: str
    width: int
    slices: tuple[Slice, ...]

    def sq_norms(self) -> torch.Tensor:
        """Squared l2 norm of each of the ``width`` groups over all of its slices."""
        return sum(s.sq_norms() for s in self.slices)

    @property
    def group_size(self) -> int:
        """Scalars in one group (all groups of a family have the same size)."""
        return sum(s.group_numel for s in self.slices)


@dataclass(frozen=True)
class MemberBlockSlice:
    """The paper's groups of a conv of the grouped ensemble (models/grouped.py), whose weight ``[n·C_out, C_in,
    k, k]`` stacks the n members' kernels: group ``m·C_in + i`` is member m's input slice ``W[m·C_out:(m+1)·C_out,
    i]`` -- exactly member m's group i in the member list. Same interface as ``Slice`` for RGSM."""
    name: str
    tensor: torch.Tensor
    members: int

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.members, t.shape[0] // self.members, t.shape[1], -1)   # [n, C_out, C_in, k·k]

    def sq_norms(self) -> torch.Tensor:
        return self._blocks(self.tensor.detach()).pow(2).sum(dim=(1, 3)).flatten()

    def along_dim(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """``values`` (one per group) broadcast over each group's elements (every element is in a group, so
        ``fill`` is never used)."""
        n, c_out, c_in = self.members, self.tensor.shape[0] // self.members, self.tensor.shape[1]
        v = values.to(self.tensor.dtype).view(n, 1, c_in).expand(n, c_out, c_in).reshape(n * c_out, c_in)
        return v.view(n * c_out, c_in, *([1] * (self.tensor.dim() - 2)))

    @property
    def group_numel(self) -> int:
        return self.tensor.numel() // (self.members * self.tensor.shape[1])


def is_depthwise(m: nn.Module) -> bool:
    """A depthwise conv: one filter per channel (groups == in_channels == out_channels > 1). Its input channel i is
    read by filter i alone, so its channels are its producer's (torch-pruning couples them the same way)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def input_channel_family(name: str, weight: torch.Tensor, depthwise: bool = False) -> ChannelFamily:
    """The paper's groups of one conv weight: its input-channel slices ``W[:, i]`` -- for a depthwise conv (weight
    ``[C, 1, k, k]``) the filters ``W[i]``, which are what reads input channel i."""
    dim = 0 if depthwise else 1
    index = torch.arange(weight.shape[dim], device=weight.device)
    return ChannelFamily(name, weight.shape[dim], (Slice(f"{name}.weight", weight, dim, index),))


def paper_group_count(m: nn.Conv2d) -> int:
    """How many paper groups (input channels) a conv has: C_in, also for a depthwise conv (C filters)."""
    return m.weight.shape[0] if is_depthwise(m) else m.weight.shape[1]


def paper_families(model: nn.Module) -> list[ChannelFamily]:
    """The paper's groups: the input-channel slices of every Conv2d, stem and 1x1 shortcuts included (a depthwise
    conv's: its filters) -- per member, also when ``model`` is the grouped ensemble (one family per grouped conv,
    n·C_in groups)."""
    from models.grouped import GroupedEnsemble

    if isinstance(model, GroupedEnsemble):
        convs = [(name, m.weight) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        return [ChannelFamily(name, model.n * w.shape[1], (MemberBlockSlice(f"{name}.weight", w, model.n),))
                for name, w in convs]
    return [input_channel_family(n, m.weight, is_depthwise(m)) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d)]


def coupled_families(model: nn.Module, example_input: torch.Tensor) -> list[ChannelFamily]:
    """One family per DependencyGraph pruning group of conv output channels (see the module docstring).

    Builds the graph with the residual noise off (``std()`` would couple every channel) and restores the
    model's train/eval modes, which graph building changes.
    """
    import torch_pruning as tp

    from models import noise_disabled

    modes = {m: m.training for m in model.modules()}
    try:
        with noise_disabled(model), torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
            names = {m: n for n, m in model.named_modules()}
            groups = list(dg.get_all_groups(root_module_types=(nn.Conv2d,)))
            return [f for f in (_family(g, dg, names) for g in groups) if f is not None]
    finally:
        for m, training in modes.items():
            m.training = training


def _family(group, dg, names: dict[nn.Module, str]) -> ChannelFamily | None:
    import torch_pruning as tp

    root = group[0].dep.target.module
    width = root.out_channels
    slices: dict[tuple[str, int], Slice] = {}

    def add(module, attr: str, dim: int, idxs, roots):
        param = getattr(module, attr, None)
        if param is None:
            return
        index = torch.empty(width, dtype=torch.long)
        index[torch.as_tensor(list(roots), dtype=torch.long)] = torch.as_tensor(list(idxs), dtype=torch.long)
        name = f"{names[module]}.{attr}"
        slices.setdefault((name, dim), Slice(name, param, dim, index.to(param.device)))

    for item in group:
        dep, idxs, roots = item.dep, item.idxs, item.root_idxs
        module, op = dep.target.module, dep.target.type
        if len(set(roots)) != len(roots) and op not in (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE):
            return None       # a channel spread over several positions (a flatten of HxW maps before a linear)
        reads = dg.is_in_channel_pruning_fn(dep.handler)
        if op == tp.ops.OPTYPE.DEPTHWISE_CONV:
            if not is_depthwise(module):
                return None   # groups == out_channels but a channel multiplier: not one filter per channel
            add(module, "weight", 0, idxs, roots)   # filter j reads channel j and writes channel j
            add(module, "bias", 0, idxs, roots)
        elif op == tp.ops.OPTYPE.CONV:
            if module.groups != 1:
                return None   # a grouped conv mixes channels within groups: removing one breaks the grouping
            if reads:
                add(module, "weight", 1, idxs, roots)
            else:
                add(module, "weight", 0, idxs, roots)
                add(module, "bias", 0, idxs, roots)
        elif op == tp.ops.OPTYPE.BN:
            add(module, "weight", 0, idxs, roots)
            add(module, "bias", 0, idxs, roots)
        elif op == tp.ops.OPTYPE.LINEAR:
            if not reads:
                return None   # the dimension reaches the logits: the classifier's width is never touched
            add(module, "weight", 1, idxs, roots)
        elif op in (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE):
            continue          # relu, add, pooling, flatten carry the channel unchanged
        else:
            return None       # concat, split, model output, ...: not a plain removable channel
    return ChannelFamily(names[root], width, tuple(slices[k] for k in sorted(slices)))


def output_positions(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Module name -> output positions per image (height x width) of every conv and BN, from one noise-off pass
    in eval mode (the model's modes are restored)."""
    from models import noise_disabled

    positions, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, _n=name: positions.__setitem__(_n, out.shape[-1] * out.shape[-2])))
    modes = {m: m.training for m in model.modules()}
    try:
        with noise_disabled(model), torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return positions


def _output_pixels(model: nn.Module, example_input: torch.Tensor) -> dict[int, int]:
    """id(weight) -> output positions per image of its conv (1 for linear layers)."""
    positions = output_positions(model, example_input)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[id(m.weight)] = positions[name]
        elif isinstance(m, nn.Linear):
            out[id(m.weight)] = 1
    return out


def group_costs(model: nn.Module, families: list[ChannelFamily], example_input: torch.Tensor,
                cost: str) -> list[float]:
    """Per family, what one of its groups costs relative to an average paper group (so lambda1 keeps its scale).

    ``weights``: scalars in the group ÷ (conv weights ÷ conv input channels).
    ``macs``: multiply-accumulates per image that removing the channel saves ÷ (conv MACs ÷ conv input
    channels). BN entries cost nothing here: onnxruntime folds BN into the neighbouring conv.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    in_channels = sum(paper_group_count(m) for m in convs)
    if cost == "weights":
        reference = sum(m.weight.numel() for m in convs) / in_channels
        return [f.group_size / reference for f in families]
    if cost == "macs":
        pixels = _output_pixels(model, example_input)
        reference = sum(m.weight.numel() * pixels[id(m.weight)] for m in convs) / in_channels
        return [sum(s.group_numel * pixels[id(s.tensor)] for s in f.slices if id(s.tensor) in pixels) / reference
                for f in families]
    raise ValueError(f"cost must be 'weights' or 'macs', got {cost!r}")
