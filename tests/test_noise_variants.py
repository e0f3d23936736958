"""The deployable noise variants: per-sample noise in torch, and noisy ONNX graphs checked against torch."""
import numpy as np
import pytest
import torch

from export import ort_session
from export.onnx_export import export_onnx, stochastic_parity
from models import ResidualNoise, create_model, noise_mode


def _noise_scale(mode: str, batch: torch.Tensor) -> torch.Tensor:
    """The noise each image of ``batch`` receives, with the RNG fixed (so only the std can differ)."""
    m = ResidualNoise(0.1)
    with noise_mode(m, mode):
        torch.manual_seed(0)
        return m(batch) - batch


def test_per_sample_noise_does_not_depend_on_the_rest_of_the_batch():
    x = torch.randn(2, 4, 5, 5)
    other = x.clone()
    other[1] *= 100.0
    # the paper's noise: image 0's noise scales with image 1 (std over the whole tensor)
    assert not torch.allclose(_noise_scale("batch", x)[0], _noise_scale("batch", other)[0])
    assert torch.equal(_noise_scale("per_sample", x)[0], _noise_scale("per_sample", other)[0])
    # and at batch 1 both are the same function
    assert torch.equal(_noise_scale("per_sample", x[:1]), _noise_scale("batch", x[:1]))


def test_per_sample_std_is_each_images_own():
    x = torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1)
    noise = _noise_scale("per_sample", x)
    torch.manual_seed(0)
    z = torch.randn_like(x)
    expected = 0.1 * x.flatten(1).std(dim=1).view(3, 1, 1, 1) * z
    assert torch.allclose(noise, expected, rtol=1e-5, atol=1e-6)


def test_noise_mode_restores_settings_and_rejects_unknown_modes():
    model = create_model("test_resnet", noise_coef=0.1)
    with noise_mode(model, "off"):
        assert not any(m.enabled for m in model.modules() if isinstance(m, ResidualNoise))
    assert all(m.enabled and not m.per_sample for m in model.modules() if isinstance(m, ResidualNoise))
    with pytest.raises(ValueError, match="noise mode"):
        noise_mode(model, "sometimes")


@pytest.fixture(scope="module")
def noisy_model():
    torch.manual_seed(0)
    return create_model("test_resnet", ensemble=2, noise_coef=0.1).eval()


@pytest.mark.parametrize("noise", ["batch", "per_sample"])
def test_noisy_export_has_one_seedless_random_node_per_site_and_is_random(noisy_model, noise, tmp_path):
    path = tmp_path / f"{noise}.onnx"
    rep = export_onnx(noisy_model, path, noise=noise, parity_draws=60)
    sites = sum(1 for m in noisy_model.modules() if isinstance(m, ResidualNoise))
    assert rep.random_nodes == sites == 6          # 3 blocks x 2 members
    assert rep.parity_mean_z <= 6.0 and 1 / 1.5 <= rep.parity_spread_ratio <= 1.5
    sess = ort_session(path)
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    a, b = (sess.run(None, {"image": x})[0] for _ in range(2))
    assert not np.allclose(a, b)                   # fresh noise every call (no seed attribute)
    # the deterministic graph of the same model is one fixed function
    det = tmp_path / "det.onnx"
    assert export_onnx(noisy_model, det).random_nodes == 0


def test_statistical_parity_detects_a_graph_without_its_noise(noisy_model, tmp_path):
    """The check the export relies on must fail when ORT and torch compute different things."""
    det = tmp_path / "det.onnx"
    export_onnx(noisy_model, det)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with noise_mode(noisy_model, "batch"):
        z, spread = stochastic_parity(noisy_model, ort_session(det), x, draws=60)
    assert spread < 0.1            # ORT has no noise at all: its logits do not spread
    noisy = tmp_path / "noisy.onnx"
    export_onnx(noisy_model, noisy, noise="batch", parity_draws=60)
    with noise_mode(noisy_model, "batch"):
        noisy_model.members[0].layer1[0].noise.coef = 1.0     # torch now injects 10x the noise at one site
        try:
            z, spread = stochastic_parity(noisy_model, ort_session(noisy), x, draws=60)
        finally:
            noisy_model.members[0].layer1[0].noise.coef = 0.1
    assert z > 6.0 or not 1 / 1.5 <= spread <= 1.5
