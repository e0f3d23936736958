"""Physical removal of the channels that RGSM's group sparsity made dead.

A channel can be cut out of the network without changing its function exactly when every layer that
*reads* it ignores it: each consuming conv has a zero input slice ``W[:, c]`` (an RGSM group) and each
consuming linear a zero column. Producers of the channel (conv out-channels, BN entries) then go with it.
torch-pruning's DependencyGraph supplies the coupling, which matters for the residual stream: one residual
channel of a stage is written by every conv2/shortcut of the stage and read by every block after it, so it
goes only when all of those readers ignore it.

A depthwise conv (MobileNetV2) neither decides nor blocks: its filter c reads channel c and writes channel c, so it
goes with the channel like a BN entry; the channel of an inverted residual's expansion is dead when the 1x1
projection after the depthwise conv ignores it. In the paper's unit a depthwise conv's groups are its filters
(``input_groups``).

Exactness holds with the residual noise *off*. With noise on, ``ResidualNoise`` scales by ``std()`` over the
whole residual tensor, dead channels included, so removing residual-stream channels changes the noise
magnitude (not the noiseless function).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from models import noise_disabled
from pipeline.algorithms.groups import is_depthwise
from pipeline.algorithms.sparsity import group_norms

PARITY_TOL = 1e-5

# Op types that carry a channel through unchanged (BN, relu, add, pooling, flatten): they neither decide
# whether the channel is dead nor block its removal.
_PASS_THROUGH = (tp.ops.OPTYPE.BN, tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE)


@dataclass
class SurgeryResult:
    model: nn.Module          # physically pruned deep copy; the input model is untouched
    removed_channels: int     # zero conv input-channel groups that disappeared (paper's group unit)
    zero_channels: int        # groups with l2 norm < tol in the input model, all convs of all members
    total_channels: int       # sum of C_in over all convs of the input model (675 per ResNet20 member; a
                              # depthwise conv's groups are its C filters)
    removed_fraction: float   # removed_channels / zero_channels; 0.0 when there are no zero groups
    kept_for_shape: int       # zero groups kept only so that no layer ends up with 0 channels
    max_abs_diff: float       # max |logits(pruned) - logits(input)|, noise off, eval mode, float64
    removed_branches: list[str] = field(default_factory=list)   # blocks whose residual branch went whole


def _dead_mask(group, dg: tp.DependencyGraph, n: int, tol: float) -> tuple[torch.Tensor, int]:
    """Which of the group's ``n`` root channels every consumer ignores, and how many consumer convs read them."""
    dead = torch.ones(n, dtype=torch.bool)
    conv_readers = 0
    for item in group:
        dep, idxs, roots = item.dep, item.idxs, item.root_idxs
        module, op = dep.target.module, dep.target.type
        reads = dg.is_in_channel_pruning_fn(dep.handler)
        if op == tp.ops.OPTYPE.CONV and module.groups == 1:
            if not reads:
                continue  # a producer: its out-channel simply goes with the channel
            conv_readers += 1
            alive = group_norms(module.weight)[idxs] >= tol
        elif op == tp.ops.OPTYPE.LINEAR and reads:
            alive = (module.weight.detach()[:, idxs].abs() >= tol).any(dim=0)
        elif op == tp.ops.OPTYPE.DEPTHWISE_CONV and is_depthwise(module):
            continue  # filter c reads channel c and writes channel c: it goes with the channel, as a BN does
        elif op in _PASS_THROUGH:
            continue
        else:
            # Anything else (linear outputs = class logits, grouped convs, concat, norms other than BN, model
            # output, ...) is never cut.
            alive = torch.ones(len(idxs), dtype=torch.bool)
        dead[torch.as_tensor(roots, dtype=torch.long)[alive]] = False
    return dead, conv_readers


def input_groups(model: nn.Module) -> dict[str, torch.Tensor]:
    """Conv name -> l2 norm of each of its paper groups (input channels ``W[:, i]``; a depthwise conv's filters
    ``W[i]``, the only weights that read input channel i)."""
    return {n: (m.weight.detach().flatten(1).norm(dim=1) if is_depthwise(m) else group_norms(m.weight))
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _branch_owners(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """conv1 of every pre-activation block -> the block: when no reader uses any of conv1's channels, the whole
    residual branch (conv1, bn2, conv2) contributes exactly zero and goes (depth pruning)."""
    from models import PreActBlock

    return {m.conv1: m for m in model.modules() if isinstance(m, PreActBlock) and m.has_branch}


def _logits64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # float64 so that the parity check measures the surgery, not float32 summation-order noise.
    m = copy.deepcopy(model).double().eval()
    with noise_disabled(m), torch.no_grad():
        return m(x.double())


def remove_dead_channels(model: nn.Module, example_input: torch.Tensor, tol: float = 1e-15) -> SurgeryResult:
    """Return a physically smaller copy of ``model`` that computes the same function with noise off.

    Raises RuntimeError if the empirical parity check on ``example_input`` exceeds ``PARITY_TOL``.
    """
    norms_before = input_groups(model)
    zero = sum(int((v < tol).sum()) for v in norms_before.values())
    total = sum(v.numel() for v in norms_before.values())
    c_in_before = {n: m.in_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    x = example_input.detach()

    work = copy.deepcopy(model)
    reference = _logits64(work, x)
    kept_for_shape = 0
    # DependencyGraph traces through autograd and calls eval(); noise off because std() mixes all channels.
    with noise_disabled(work), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(work, example_inputs=x, verbose=False)
        plan, branches = [], []
        owner = _branch_owners(work)
        names = {m: n for n, m in work.named_modules()}
        work_norms = input_groups(work)
        # Conv out-channel groups cover every conv input except the stem's RGB, which is never pruned.
        for group in dg.get_all_groups(root_module_types=(nn.Conv2d,)):
            root = group[0].dep.target.module
            dead, conv_readers = _dead_mask(group, dg, root.out_channels, tol)
            idxs = dead.nonzero().flatten().tolist()
            if len(idxs) == root.out_channels:
                if root in owner:   # a residual branch that adds nothing: the block becomes its shortcut
                    branches.append(owner[root])
                    continue
                kept = idxs[0]
                idxs = idxs[1:]  # keep one channel: layers with 0 channels are not valid modules
                kept_for_shape += conv_readers + sum(  # and a depthwise filter of it that is zero
                    int(work_norms[names[item.dep.target.module]][item.idxs[item.root_idxs.index(kept)]] < tol)
                    for item in group if _is_depthwise_item(item))
            if idxs:
                plan.append((root, idxs))
        # Groups are disjoint, so pruning one does not shift the indices of another.
        removed_depthwise = 0   # zero depthwise filters that go with their channel (the paper's unit)
        for root, idxs in plan:
            group = dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs)
            removed_depthwise += sum(int((work_norms[names[item.dep.target.module]][list(item.idxs)] < tol).sum())
                                     for item in group if _is_depthwise_item(item))
            group.prune()
    for block in branches:
        block.remove_branch()

    # torch-pruning replaces parameters with fresh ones: restore the input's modes and freezing.
    src_modules = dict(model.named_modules())
    for name, m in work.named_modules():
        m.training = src_modules[name].training
    src_params = dict(model.named_parameters())
    for name, p in work.named_parameters():
        p.requires_grad_(src_params[name].requires_grad)
    _check_shapes(work)

    max_abs_diff = float((_logits64(work, x) - reference).abs().max())
    if not max_abs_diff <= PARITY_TOL:
        raise RuntimeError(f"channel surgery changed the logits by {max_abs_diff:.3g} > {PARITY_TOL}")

    after = {n: m.in_channels for n, m in work.named_modules() if isinstance(m, nn.Conv2d)}
    zero_before = {n: int((v < tol).sum()) for n, v in norms_before.items()}
    depthwise = {n for n, m in model.named_modules() if is_depthwise(m)}
    # a conv that went with its branch counts its zero input groups (its other inputs fed only the dead branch);
    # a depthwise conv's removed input channels are counted where its filter was zero (removed_depthwise)
    removed = removed_depthwise + sum(c_in - after[n] if n in after else zero_before[n]
                                      for n, c_in in c_in_before.items() if n not in depthwise)
    return SurgeryResult(
        model=work,
        removed_channels=removed,
        zero_channels=zero,
        total_channels=total,
        removed_fraction=removed / zero if zero else 0.0,
        kept_for_shape=kept_for_shape,
        max_abs_diff=max_abs_diff,
        removed_branches=sorted(n for n, m in work.named_modules() if m in set(branches)),
    )


def _is_depthwise_item(item) -> bool:
    return item.dep.target.type == tp.ops.OPTYPE.DEPTHWISE_CONV and is_depthwise(item.dep.target.module)


def _check_shapes(model: nn.Module) -> None:
    # describe()/build_from_description() read these attributes, not the weight shapes.
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            ok = m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        elif isinstance(m, nn.BatchNorm2d):
            ok = all(t is None or t.shape == (m.num_features,)
                     for t in (m.weight, m.bias, m.running_mean, m.running_var))
        elif isinstance(m, nn.Linear):
            ok = m.weight.shape == (m.out_features, m.in_features)
        else:
            continue
        if not ok:
            raise RuntimeError(f"{name}: shape attributes disagree with weights after surgery")


MAC_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def count_params_macs(model: nn.Module, input_shape=(1, 3, 32, 32)) -> tuple[int, int]:
    """(parameters, MACs) as torch-pruning counts them, noise off (its std/randn are not model compute). MACs are
    those of the convs, BNs and linear layers (``MAC_LAYERS``, what the budget's cost model prices): torch-pruning
    also counts activations and pooling written as modules (torchvision's ``nn.ReLU``), not functional ones, which
    would make the count depend on how a network is written."""
    p = next(model.parameters())
    x = torch.zeros(input_shape, dtype=p.dtype, device=p.device)
    with noise_disabled(model), torch.no_grad():
        _, params, layer_macs, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    macs = sum(layer_macs.get(m) or 0 for m in model.modules() if isinstance(m, MAC_LAYERS))
    return int(params), int(macs)
