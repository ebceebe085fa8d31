import math

import pytest
import torch
import torch.nn as nn
from compressai.entropy_models import EntropyBottleneck
from compressai.models import FactorizedPrior

from taskcodec.errors import ConfigError
from taskcodec.losses import RateDistortionLoss, aux_loss


def test_mse_loss_by_hand():
    target = torch.full((1, 3, 4, 4), 0.5)
    output = {
        "x_hat": torch.full((1, 3, 4, 4), 0.6),
        # 8 bits from y (p = 1/2) + 8 bits from z (4 symbols, p = 1/4) over 16 pixels = 1 bpp
        "likelihoods": {"y": torch.full((1, 8, 1, 1), 0.5), "z": torch.full((1, 4, 1, 1), 0.25)},
    }
    out = RateDistortionLoss(lmbda=0.01, metric="mse")(output, target)
    assert set(out) == {"bpp_loss", "mse_loss", "loss"}
    assert out["bpp_loss"].item() == pytest.approx(1.0)
    assert out["mse_loss"].item() == pytest.approx(0.01)
    assert out["loss"].item() == pytest.approx(0.01 * 255**2 * 0.01 + 1.0)  # 7.5025


def test_ms_ssim_loss_by_hand():
    # Constant images: every contrast-structure term is 1 and the coarsest SSIM is the
    # luminance term, so MS-SSIM = ((2ab + C1) / (a^2 + b^2 + C1)) ** 0.1333.
    size = 176
    target = torch.full((1, 3, size, size), 0.5)
    output = {
        "x_hat": torch.full((1, 3, size, size), 0.6),
        "likelihoods": {"y": torch.full((1, 16, 44, 44), 0.5)},  # 176*176 bits -> 1 bpp
    }
    out = RateDistortionLoss(lmbda=2.4, metric="ms-ssim")(output, target)
    expected_ms_ssim = ((2 * 0.5 * 0.6 + 1e-4) / (0.5**2 + 0.6**2 + 1e-4)) ** 0.1333
    assert set(out) == {"bpp_loss", "mse_loss", "ms_ssim_loss", "loss"}
    assert out["bpp_loss"].item() == pytest.approx(1.0)
    assert out["mse_loss"].item() == pytest.approx(0.01)
    assert out["ms_ssim_loss"].item() == pytest.approx(expected_ms_ssim, rel=1e-4)
    assert out["loss"].item() == pytest.approx(2.4 * (1 - expected_ms_ssim) + 1.0, rel=1e-4)


def test_perfect_reconstruction_costs_only_the_rate():
    target = torch.rand(2, 3, 176, 176)
    output = {"x_hat": target.clone(), "likelihoods": {"y": torch.full((2, 4, 8, 8), 0.5)}}
    bpp = 2 * 4 * 8 * 8 / (2 * 176 * 176)
    for metric in ("mse", "ms-ssim"):
        out = RateDistortionLoss(lmbda=10.0, metric=metric)(output, target)
        assert out["loss"].item() == pytest.approx(bpp, abs=1e-5)


def test_mse_gradients_reach_x_hat_and_likelihoods_by_hand():
    target = torch.full((1, 3, 4, 4), 0.5)
    x_hat = torch.full((1, 3, 4, 4), 0.6, requires_grad=True)
    y = torch.full((1, 8, 1, 1), 0.5, requires_grad=True)
    out = RateDistortionLoss(lmbda=0.01)({"x_hat": x_hat, "likelihoods": {"y": y}}, target)
    out["loss"].backward()
    # d/dx_hat of lmbda * 255^2 * mean((x_hat - x)^2) = lmbda * 255^2 * 2 * 0.1 / 48
    assert torch.allclose(x_hat.grad, torch.full_like(x_hat, 0.01 * 255**2 * 2 * 0.1 / 48))
    # d/dp of -log2(p) / 16 = -1 / (p ln2 16)
    assert torch.allclose(y.grad, torch.full_like(y, -1 / (0.5 * math.log(2) * 16)))


def test_ms_ssim_gradients_reach_x_hat_and_likelihoods():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 176, 176, generator=g)
    x_hat = (target + 0.05 * torch.randn(target.shape, generator=g)).requires_grad_()
    y = torch.full((1, 4, 11, 11), 0.3, requires_grad=True)
    out = RateDistortionLoss(lmbda=5.0, metric="ms-ssim")(
        {"x_hat": x_hat, "likelihoods": {"y": y}}, target
    )
    out["loss"].backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    assert torch.isfinite(y.grad).all() and (y.grad < 0).all()


@pytest.mark.parametrize("lmbda", [0, -0.01, math.nan, math.inf, "0.01", None, True])
def test_bad_lmbda_is_refused_by_name(lmbda):
    with pytest.raises(ConfigError, match=f"Invalid lmbda {lmbda!r}"):
        RateDistortionLoss(lmbda=lmbda)


def test_bad_metric_is_refused_by_name():
    with pytest.raises(ValueError, match='"ssim"'):
        RateDistortionLoss(metric="ssim")


def test_mismatched_shapes_are_refused():
    loss = RateDistortionLoss()
    output = {"x_hat": torch.zeros(1, 3, 8, 8), "likelihoods": {"y": torch.full((1, 1, 1, 1), 0.5)}}
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\).*\(1, 3, 8, 9\)"):
        loss(output, torch.zeros(1, 3, 8, 9))


def test_aux_loss_sums_every_entropy_bottleneck():
    torch.manual_seed(0)
    bottlenecks = nn.ModuleDict({"a": EntropyBottleneck(4), "b": nn.Sequential(EntropyBottleneck(2))})
    total = aux_loss(bottlenecks)
    expected = bottlenecks["a"].loss() + bottlenecks["b"][0].loss()
    assert total.item() == pytest.approx(expected.item())
    assert total.item() > 0
    total.backward()
    assert bottlenecks["a"].quantiles.grad is not None


def test_aux_loss_matches_compressai_models():
    model = FactorizedPrior(N=8, M=8)
    assert aux_loss(model).item() == pytest.approx(model.aux_loss().item())


def test_aux_loss_of_a_model_without_bottlenecks_is_zero():
    assert aux_loss(nn.Linear(2, 2)).item() == 0.0
