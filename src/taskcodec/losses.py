"""Training losses. Each returns a dict of named parts plus ``"loss"``; the names are the
MLflow metric names, so they are kept stable and equal to CompressAI's.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from torch import Tensor

from taskcodec.errors import ConfigError
from taskcodec.metrics import bpp_from_likelihoods, ms_ssim_per_image

RD_METRICS = ("mse", "ms-ssim")


class RateDistortionLoss(nn.Module):
    """Lagrangian rate-distortion loss ``R + lmbda * D`` of Ballé et al., "End-to-end
    optimized image compression" (ICLR 2017), with CompressAI's scaling.

    - ``metric="mse"``: ``loss = lmbda * 255**2 * mse + bpp``. The ``255**2`` keeps
      CompressAI's lambdas (0.0018 ... 0.0932 for its quality levels 1 ... 8) meaning the
      same here, although images are in ``[0, 1]``.
    - ``metric="ms-ssim"``: ``loss = lmbda * (1 - ms_ssim) + bpp`` (CompressAI's MS-SSIM
      lambdas are 2.4 ... 60.5).

    ``forward`` returns ``bpp_loss`` (estimated bpp), ``mse_loss`` (always, so MSE-trained
    and MS-SSIM-trained runs can be compared on one chart), ``ms_ssim_loss`` (only for
    ``metric="ms-ssim"``) and ``loss``. As in CompressAI, ``ms_ssim_loss`` holds the
    MS-SSIM *value* (higher is better), not ``1 - ms_ssim``. MS-SSIM on crops of 160 px
    or less uses fewer scales; see :func:`taskcodec.metrics.ms_ssim_per_image`.
    """

    def __init__(self, lmbda: float = 0.01, metric: str = "mse"):
        super().__init__()
        if metric not in RD_METRICS:
            raise ConfigError(f'Invalid metric "{metric}", should be one of {", ".join(RD_METRICS)}')
        if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)):
            raise ConfigError(f"Invalid lmbda {lmbda!r}, should be a number > 0")
        if not (math.isfinite(lmbda) and lmbda > 0):
            raise ConfigError(f"Invalid lmbda {lmbda!r}, should be a number > 0")
        self.lmbda = float(lmbda)
        self.metric = metric

    def forward(self, output: dict, target: Tensor) -> dict[str, Tensor]:
        x_hat = output["x_hat"]
        if target.dim() != 4:
            raise ValueError(f"Expected an NCHW target, got a tensor of shape {tuple(target.shape)}")
        if x_hat.shape != target.shape:
            raise ValueError(
                f"x_hat of shape {tuple(x_hat.shape)} does not match the target "
                f"of shape {tuple(target.shape)}"
            )
        n, _, h, w = target.shape
        out = {"bpp_loss": bpp_from_likelihoods(output["likelihoods"], n * h * w)}
        out["mse_loss"] = F.mse_loss(x_hat, target)
        if self.metric == "ms-ssim":
            out["ms_ssim_loss"] = ms_ssim_per_image(target, x_hat).mean()
            distortion = 1 - out["ms_ssim_loss"]
        else:
            distortion = 255**2 * out["mse_loss"]
        out["loss"] = self.lmbda * distortion + out["bpp_loss"]
        return out

    def extra_repr(self) -> str:
        return f"lmbda={self.lmbda}, metric={self.metric!r}"


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the auxiliary losses of every ``EntropyBottleneck`` inside ``model``.

    The same sum as CompressAI's ``CompressionModel.aux_loss()``, but for any module, so
    a composite taskcodec model (for example base + enhancement layers, or a codec inside
    a task model) needs no method of its own. A model without bottlenecks gives 0, on the
    device of its parameters.
    """
    losses = [m.loss() for m in model.modules() if isinstance(m, EntropyBottleneck)]
    if losses:
        return torch.stack([loss.reshape(()) for loss in losses]).sum()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((), device=device)
