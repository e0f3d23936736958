"""The Binary-Relax grids (binary, ternary, 4-bit) and int8 per channel on hand-worked tensors, Binary-Relax's
schedule and straight-through step, and ADMM projecting onto sparse-and-quantized weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.algorithms.admm import ADMM, elem_projection
from pipeline.algorithms.binary_relax import BinaryRelax
from pipeline.algorithms.quantizers import (BITS, LEVELS, binary, codes, fourbit, grid_sparsity, int8_per_channel,
                                            quantize, ternary)


# --------------------------------------------------------------------------- the grids
def test_binary_is_mean_magnitude_times_sign():
    w = torch.tensor([1.0, -2.0, 0.0, 3.0])             # mean|w| = 6/4
    assert binary(w).tolist() == [1.5, -1.5, 0.0, 1.5]   # sign(0) = 0: a zero stays zero


def test_ternary_scale_averages_over_all_entries():
    w = torch.tensor([0.1, -0.2, 1.0, -3.0, 0.0, 2.0])   # mean|w| = 1.05, delta = 0.735: keeps 1, -3, 2
    assert ternary(w).tolist() == [0.0, 0.0, 1.0, -1.0, 0.0, 1.0]   # scale 6/6; TWN's 6/3 would give 2
    q, scale = codes(w, 2)
    assert q.tolist() == [0, 0, 1, -1, 0, 1] and float(scale) == 1.0


def test_ternary_threshold_and_a_flat_kernel():
    w = torch.tensor([0.7, 1.3, 0.0, -1.0])              # mean|w| = 0.75, delta = 0.525
    assert codes(w, 2)[0].tolist() == [1, 1, 0, -1]
    w = torch.tensor([4.0, 4.0, 4.0, 4.0])               # delta = 2.8 < 4: all kept, scale 4
    assert ternary(w).tolist() == w.tolist()


def test_fourbit_levels_at_the_bucket_edges():
    # max 15 -> delta = 1: level k on [2k-1, 2k+1), 7 from 13 up
    w = torch.tensor([0.99, 1.0, 2.99, 3.0, 5.0, 12.99, 13.0, 15.0, -7.0, 0.0])
    q, scale = codes(w, 4)
    assert q.tolist() == [0, 1, 1, 2, 3, 6, 7, 7, -4, 0]
    # least squares: sum|w|q / sum q^2
    assert float(scale) == pytest.approx((1 + 2.99 + 6 + 15 + 12.99 * 6 + 91 + 105 + 28) / 165, rel=1e-6)
    torch.testing.assert_close(fourbit(w), float(scale) * q.float(), rtol=0, atol=0)


def _reference_fourbit(kernel):
    """The seed paper's quantize_fbit, loop and all (its edges: (2k-1)δ < |w| <= (2k+1)δ)."""
    data = kernel.abs()
    delta = data.max() / 15
    q = 0.0 * data
    for i in range(3, 17, 2):
        index = (data.gt((i - 2) * delta) * data.le(i * delta)) if i < 15 else data.gt(13 * delta)
        q += (i - 1) / 2 * index.float()
    return (data * q).sum() / (q * q).sum() * q * kernel.sign()


def test_grids_match_the_reference_formulas_on_random_kernels():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(binary(w), w.abs().mean() * w.sign())
    a = w.abs()
    keep = (a >= 0.7 * a.mean()).float()
    torch.testing.assert_close(ternary(w), (a * keep).mean() * keep * w.sign())
    torch.testing.assert_close(fourbit(w), _reference_fourbit(w))


def test_int8_per_channel_rounds_half_to_even_and_survives_zero_channels():
    w = torch.tensor([[127.0, 2.5, -3.5, -2.5],      # scale 1: halves go to the even neighbour
                      [0.0, 0.0, 0.0, 0.0],          # all zero: some positive scale, codes 0
                      [-0.5, 0.25, 1e-3, 0.49]])
    q, scale = codes(w, 8)
    assert scale.shape == (3,) and scale.dtype == torch.float32 and bool((scale > 0).all())
    assert q[0].tolist() == [127, 2, -4, -2] and q[1].tolist() == [0, 0, 0, 0]
    s2 = np.float32(np.float64(np.float32(0.5)) / 127)   # onnxruntime: float64 scale, stored as float32
    assert float(scale[2]) == float(s2)
    expected = np.clip(np.round(w[2].numpy() / s2), -127, 127)   # numpy rounds half to even too
    assert q[2].tolist() == expected.astype(int).tolist() and q[2, 0] == -127
    out = int8_per_channel(w)
    assert out[0].tolist() == [127.0, 2.0, -4.0, -2.0] and out[1].tolist() == [0.0] * 4
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("bits", BITS)
def test_all_zero_tensor_quantizes_to_zeros(bits):
    w = torch.zeros(3, 2, 3, 3)
    out = quantize(w, bits)
    assert out.shape == w.shape and out.abs().sum() == 0 and not torch.isnan(out).any()
    assert codes(w, bits)[0].abs().sum() == 0


@pytest.mark.parametrize("bits", BITS)
def test_codes_reproduce_quantize_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    for w in (torch.randn(8, 4, 3, 3, generator=g), elem_projection(torch.randn(6, 5, 3, 3, generator=g), 50),
              torch.randn(5, 7, generator=g) * 1e-3):
        q, scale = codes(w, bits)
        assert q.dtype == torch.int8 and q.shape == w.shape
        assert set(q.unique().tolist()) <= LEVELS[bits]
        assert scale.shape == ((w.shape[0],) if bits == 8 else ())
        s = scale.view(-1, *[1] * (w.dim() - 1)) if bits == 8 else scale
        assert torch.equal(s * q.float(), quantize(w, bits))
        assert bool(((quantize(w, bits) == 0) >= (w == 0)).all())   # zeros stay zeros


def test_quantize_rejects_other_bit_widths():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.ones(2), 3)


def test_grid_sparsity_counts_exact_zeros():
    assert grid_sparsity(torch.tensor([0.0, 1.0, -0.0, 2.0])) == 0.5
    w = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(1))
    assert grid_sparsity(w) == 0.0 and grid_sparsity(binary(w)) == 0.0
    # Gaussian weights: P(|w| < 0.7·E|w|) ≈ 0.42 for ternary, P(|w| < max/15) > 0.2 for 4 bits
    assert 0.38 < grid_sparsity(ternary(w)) < 0.46 and grid_sparsity(fourbit(w)) > 0.2


# --------------------------------------------------------------------------- Binary-Relax
def _kernel(seed=0, shape=(4, 3, 3, 3)):
    return nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def test_binary_relax_validates_its_arguments():
    w = [_kernel()]
    for kwargs, name in ((dict(bits=3, relax_epochs=1), "bits"), (dict(bits=2, relax_epochs=-1), "relax_epochs"),
                         (dict(bits=2, relax_epochs=1, eta0=0.0), "eta0"),
                         (dict(bits=2, relax_epochs=1, eta_growth=0.99), "eta_growth")):
        with pytest.raises(ValueError, match=name):
            BinaryRelax(w, **kwargs)


def test_binary_relax_schedule():
    w = _kernel()
    br = BinaryRelax([w], bits=2, relax_epochs=2, eta0=0.5, eta_growth=2.0)
    for epoch, eta in ((0, 0.5), (1, 1.0)):                  # phase 1: relaxed toward Q(w)
        w0 = w.detach().clone()
        br.before_batch()
        assert br.eta == eta
        torch.testing.assert_close(w.detach(), (eta * ternary(w0) + w0) / (1 + eta))
        assert not torch.equal(w.detach(), w0) and not torch.equal(w.detach(), ternary(w0))
        br.regularize()
        assert torch.equal(w.detach(), w0)
        with torch.no_grad():
            w.add_(0.01)                                     # an optimizer step moves the float weights
        br.end_epoch(last=False)
    w0 = w.detach().clone()
    br.before_batch()                                        # phase 2: pure Q(w)
    assert torch.equal(w.detach(), ternary(w0))
    br.regularize()
    assert torch.equal(w.detach(), w0)
    br.end_epoch(last=True)                                  # what ships
    assert torch.equal(w.detach(), ternary(w0)) and br.epoch == 3 and br.eta == 4.0


def test_eta_grows_geometrically():
    br = BinaryRelax([_kernel()], bits=4, relax_epochs=120)
    for _ in range(119):
        br.end_epoch()
    assert br.eta == pytest.approx(1.05 ** 119, rel=1e-12) and br.relaxing
    br.end_epoch()
    assert not br.relaxing


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_straight_through_gradient_is_the_relaxed_weights_gradient():
    net = _tiny_net()
    x, y = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1])
    convs = [net[0].weight, net[2].weight]
    floats = [w.detach().clone() for w in convs]

    def grads_at(weights):
        ref = _tiny_net()
        with torch.no_grad():
            for p, v in zip((ref[0].weight, ref[2].weight), weights):
                p.copy_(v)
        F.cross_entropy(ref(x), y).backward()
        return [ref[0].weight.grad, ref[2].weight.grad, ref[5].weight.grad]

    eta = 1.0
    expected = grads_at([(eta * fourbit(w) + w) / (1 + eta) for w in floats])
    br = BinaryRelax(convs, bits=4, relax_epochs=5, eta0=eta)
    br.before_batch()
    F.cross_entropy(net(x), y).backward()
    br.regularize()
    for got, want, at_floats in zip((*(w.grad for w in convs), net[5].weight.grad), expected, grads_at(floats)):
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, at_floats)        # the test can tell the two apart
    assert all(torch.equal(w.detach(), f) for w, f in zip(convs, floats))


def test_train_step_applies_the_relaxed_gradient_to_the_float_weights():
    from pipeline.train.loop import TrainStep

    net = _tiny_net()
    x, y = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([2, 1, 0, 0, 1])
    convs = [net[0].weight, net[2].weight]
    floats = [w.detach().clone() for w in convs]
    br = BinaryRelax(convs, bits=2, relax_epochs=1, eta0=2.0)
    with torch.no_grad():                                 # the gradient at the relaxed weights, by hand
        for w in convs:
            w.copy_(br.relaxed(w))
    F.cross_entropy(net(x), y).backward()
    grads = [w.grad.clone() for w in convs]
    with torch.no_grad():
        for w, f in zip(convs, floats):
            w.copy_(f)
    lr = 0.1
    TrainStep(net, torch.optim.SGD(net.parameters(), lr=lr), attack=None, sparsifier=br)(x, y)
    for w, f, g in zip(convs, floats, grads):
        torch.testing.assert_close(w.detach(), f - lr * g)


def test_quantized_context_shows_what_ships_and_restores():
    w = _kernel()
    br = BinaryRelax([w], bits=1, relax_epochs=3)
    w0 = w.detach().clone()
    with br.quantized():
        assert torch.equal(w.detach(), binary(w0))
    assert torch.equal(w.detach(), w0)
    br.before_batch()                                     # mid-batch: Q of the float weights, then back
    relaxed = w.detach().clone()
    with br.quantized():
        assert torch.equal(w.detach(), binary(w0))
    assert torch.equal(w.detach(), relaxed)
    br.regularize()
    assert torch.equal(w.detach(), w0)


def test_binary_relax_state_roundtrip_resumes_exactly():
    def run(br, w, epochs):
        for _ in range(epochs):
            br.before_batch()
            br.regularize()
            with torch.no_grad():
                w.mul_(0.99)
            br.end_epoch(last=False)

    w = _kernel(1)
    a = BinaryRelax([w], bits=4, relax_epochs=4, eta0=1.0, eta_growth=1.05)
    run(a, w, 3)
    v = nn.Parameter(w.detach().clone())
    b = BinaryRelax([v], bits=2, relax_epochs=1, eta0=9.0, eta_growth=1.5)
    b.load_state_dict(a.state_dict())
    assert (b.bits, b.relax_epochs, b.eta0, b.eta_growth, b.epoch, b.eta) == (4, 4, 1.0, 1.05, 3, a.eta)
    a.before_batch()
    b.before_batch()
    assert torch.equal(w.detach(), v.detach())
    a.regularize()
    b.regularize()
    a.end_epoch(last=True)
    b.end_epoch(last=True)
    assert torch.equal(w.detach(), v.detach()) and torch.equal(w.detach(), fourbit(w.detach()))
    assert "4-bit" in a.describe() and "1 conv kernels" in a.describe()


# --------------------------------------------------------------------------- ADMM on the grid
def _on_grid(w: torch.Tensor, bits: int) -> bool:
    """w == s·q with integer q in LEVELS[bits], s inferred from w alone (the largest |w| is the top level)."""
    rows = w.reshape(w.shape[0], -1) if bits == 8 else w.reshape(1, -1)
    top = max(LEVELS[bits])
    scale = rows.abs().amax(dim=1, keepdim=True) / top
    q = torch.where(scale > 0, rows / scale.clamp_min(1e-30), torch.zeros_like(rows))
    integral = torch.allclose(q, q.round(), atol=1e-3 * top, rtol=0)
    return integral and set(q.round().int().unique().tolist()) <= LEVELS[bits]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sparsity", ["elem", "channel"])
def test_admm_with_bits_ends_sparse_and_on_the_grid(bits, sparsity):
    g = torch.Generator().manual_seed(bits)
    weights = [torch.randn(8, 10, 3, 3, generator=g), torch.randn(6, 8, 3, 3, generator=g)]
    percentile = 60
    admm = ADMM(weights, rho=0.5, percentile=percentile, sparsity=sparsity, bits=bits)
    assert f"{bits}-bit grid" in admm.describe()
    for epoch in range(2):
        for _ in range(3):
            admm.before_batch()
            for w in weights:
                w.sub_(0.01 * torch.randn(w.shape, generator=g))   # a stand-in optimizer step
            admm.pull(0.1)
        before = [w.clone() for w in weights]
        admm.end_epoch(last=epoch == 1)
    for w, b in zip(weights, before):
        assert _on_grid(w, bits)
        assert not _on_grid(b, bits)                       # the float weights were not on it: the projection did it
        if sparsity == "elem":
            assert int((w == 0).sum()) >= percentile / 100 * w.numel() - 1
        else:
            zero_groups = int((w.abs().sum(dim=(0, 2, 3)) == 0).sum())
            assert zero_groups >= percentile / 100 * w.shape[1] - 1
        assert grid_sparsity(w) >= grid_sparsity(ADMM([b.clone()], rho=1.0, percentile=percentile,
                                                      sparsity=sparsity).proj(b))


def test_admm_without_bits_is_unchanged():
    w = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])
    plain = ADMM([w.clone()], rho=1.0, percentile=40)
    assert set(plain.state_dict()) == {"rho", "percentile", "sparsity", "projections", "z", "u"}
    assert plain.proj(w).tolist() == [0.0, 0.0, 3.0, -4.0, 5.0]
    assert "grid" not in plain.describe()
    quantized = ADMM([w.clone()], rho=1.0, percentile=40, bits=1)
    # binary of (0, 0, 3, -4, 5): mean|w| = 12/5
    torch.testing.assert_close(quantized.proj(w), torch.tensor([0.0, 0.0, 2.4, -2.4, 2.4]), rtol=0, atol=1e-6)
    state = quantized.state_dict()
    assert state["bits"] == 1
    plain.load_state_dict(state)
    assert plain.bits == 1
    with pytest.raises(ValueError, match="bits"):
        ADMM([w], rho=1.0, percentile=40, bits=3)


@pytest.mark.parametrize("bits", BITS)
def test_codes_on_grid_read_back_what_quantize_wrote(bits):
    """Reading the codes of an on-grid tensor gives it back exactly; quantizing it again would not for ternary
    (§5's scale averages over the zeros too), which is why Binary-Relax's final weights are read, not re-quantized."""
    from pipeline.algorithms.quantizers import codes_on_grid

    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(bits))
    g = quantize(w, bits)
    q, s = codes_on_grid(g, bits)
    assert torch.equal((s.view(-1, 1, 1, 1) if s.dim() else s) * q.float(), g)
    assert set(q.unique().tolist()) <= LEVELS[bits]
    assert codes_on_grid(w, bits) is None   # a float tensor is not on the grid
    if bits == 2:
        assert not torch.allclose(quantize(g, 2), g)   # the reason: ternary is not idempotent


def test_binary_relax_quantized_view_after_the_end_is_what_ships():
    from pipeline.algorithms.binary_relax import BinaryRelax

    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)))
    br = BinaryRelax([w], bits=2, relax_epochs=0)
    br.end_epoch(last=True)
    final = w.detach().clone()
    with br.quantized():
        assert torch.equal(w.detach(), final)
