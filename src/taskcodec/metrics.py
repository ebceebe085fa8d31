"""Image-quality and rate metrics: pure functions of tensors.

Images are float tensors in ``[0, 1]``, shaped ``NCHW``. The functions do not clamp: a
codec's ``x_hat`` may overshoot, and clamping it before measuring is the caller's choice
(CompressAI's evaluation clamps, so does :mod:`taskcodec.baselines`).

Batch metrics are *per-image averages*: PSNR and MS-SSIM are computed for each image and
then averaged, which is what RD papers report and what does not depend on how a data set
was cut into batches (the PSNR of a batch-mean MSE would).

Rates follow CompressAI: while training, bpp is estimated from the entropy models'
likelihoods; in evaluation, bpp is counted from the real bytes of the bitstream.
"""

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as _pytorch_ms_ssim
from torch import Tensor

#: Ceiling for PSNR and MS-SSIM in dB. Identical images would give +inf, which MLflow
#: cannot plot and which poisons every average it enters; 100 dB is far above anything a
#: lossy codec reaches on 8-bit images (lossless 8-bit rounding alone stays below 60 dB).
MAX_DB = 100.0

# Weights of the five scales from Wang, Simoncelli & Bovik, "Multiscale structural
# similarity for image quality assessment" (2003), as used by pytorch_msssim.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_MS_SSIM_WIN_SIZE = 11
_MS_SSIM_WIN_SIGMA = 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def _check_pair(x: Tensor, x_hat: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"Expected NCHW images, got a tensor of shape {tuple(x.shape)}")
    if x.shape != x_hat.shape:
        raise ValueError(
            f"Image shapes differ: x is {tuple(x.shape)}, x_hat is {tuple(x_hat.shape)}"
        )


def psnr_per_image(x: Tensor, x_hat: Tensor, max_val: float = 1.0) -> Tensor:
    """PSNR in dB of each image of the batch, shape ``[N]``, capped at :data:`MAX_DB`.

    The MSE is taken over all channels and pixels of one image (RGB PSNR, as CompressAI
    reports it), not per channel.
    """
    _check_pair(x, x_hat)
    if not max_val > 0:
        raise ValueError(f"Invalid max_val {max_val!r}, should be > 0")
    mse = (x.detach().double() - x_hat.detach().double()).pow(2).flatten(1).mean(dim=1)
    # mse == 0 gives +inf here, which the clamp turns into MAX_DB.
    psnr = 10 * torch.log10(max_val**2 / mse)
    return psnr.clamp(max=MAX_DB).float()


def psnr(x: Tensor, x_hat: Tensor, max_val: float = 1.0) -> float:
    """Mean over the batch of per-image PSNR in dB; identical images count as 100 dB."""
    return psnr_per_image(x, x_hat, max_val).mean().item()


def ms_ssim_levels(height: int, width: int) -> int:
    """How many MS-SSIM scales (at most 5) an image of this size supports.

    Each scale halves the image, and the 11-px Gaussian window must fit inside the last
    scale: ``min(height, width) > 10 * 2**(levels - 1)``. So 5 scales need more than
    160 px on the short side, 4 more than 80, 3 more than 40, 2 more than 20, 1 more
    than 10.
    """
    short = min(height, width)
    levels = len(_MS_SSIM_WEIGHTS)
    while levels > 0 and short <= (_MS_SSIM_WIN_SIZE - 1) * 2 ** (levels - 1):
        levels -= 1
    return levels


def ms_ssim_per_image(x: Tensor, x_hat: Tensor) -> Tensor:
    """MS-SSIM of each image of the batch (``data_range=1``), shape ``[N]``, differentiable.

    Images with more than 160 px on the short side get the standard 5-scale MS-SSIM of
    ``pytorch_msssim.ms_ssim``. Smaller images, which that function refuses, get MS-SSIM
    over the scales they support (see :func:`ms_ssim_levels`) with the first weights of
    the standard five renormalised to sum to one, and a warning says so: those values
    are comparable among images of the same size, not with 5-scale numbers from papers.
    Images of 10 px or less on a side have no scale at all and raise ``ValueError``.
    """
    _check_pair(x, x_hat)
    height, width = x.shape[-2:]
    levels = ms_ssim_levels(height, width)
    if levels == len(_MS_SSIM_WEIGHTS):
        return _pytorch_ms_ssim(x_hat, x, data_range=1.0, size_average=False)
    if levels == 0:
        raise ValueError(
            f"Images of {height}x{width} px are too small for MS-SSIM, "
            f"which needs more than {_MS_SSIM_WIN_SIZE - 1} px on each side"
        )
    warnings.warn(
        f"MS-SSIM on {height}x{width} px images uses {levels} of 5 scales "
        "(5 need more than 160 px on the short side); values are not comparable with 5-scale MS-SSIM",
        stacklevel=2,
    )
    return _ms_ssim_with_levels(x_hat, x, levels)


def ms_ssim(x: Tensor, x_hat: Tensor) -> float:
    """Mean over the batch of per-image MS-SSIM, in ``[0, 1]`` (1 for identical images)."""
    return ms_ssim_per_image(x, x_hat).mean().item()


def ms_ssim_db(value: float) -> float:
    """MS-SSIM in dB, ``-10 log10(1 - value)``, which spreads the crowded top of the scale.

    Capped at :data:`MAX_DB` like PSNR, so a perfect score of 1 gives 100 dB.
    """
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid MS-SSIM value {value!r}, should be in [0, 1]")
    if value >= 1.0:
        return MAX_DB
    return min(-10.0 * math.log10(1.0 - value), MAX_DB)


def bpp_from_likelihoods(likelihoods: Mapping[str, Tensor], num_pixels: int) -> Tensor:
    """Estimated bits per pixel: ``sum(-log2(p)) / num_pixels`` over every likelihood tensor.

    This is the rate term of CompressAI's ``RateDistortionLoss``; it stays differentiable.
    ``num_pixels`` is ``N * H * W`` of the batch, so the result is the mean bpp per image.
    """
    if not likelihoods:
        raise ValueError("No likelihoods given: the model's output has an empty 'likelihoods' dict")
    if num_pixels <= 0:
        raise ValueError(f"Invalid num_pixels {num_pixels!r}, should be > 0")
    return sum(_bits(p) for p in likelihoods.values()) / num_pixels


def bpp_per_likelihood(likelihoods: Mapping[str, Tensor], num_pixels: int) -> dict[str, float]:
    """The estimated bpp of each latent by name (for example ``{"y": 0.41, "z": 0.02}``)."""
    if num_pixels <= 0:
        raise ValueError(f"Invalid num_pixels {num_pixels!r}, should be > 0")
    return {name: (_bits(p) / num_pixels).item() for name, p in likelihoods.items()}


def bpp_from_bytes(num_bytes: int, height: int, width: int) -> float:
    """Real bits per pixel of a file of ``num_bytes`` that codes one ``height x width`` image."""
    if num_bytes < 0:
        raise ValueError(f"Invalid num_bytes {num_bytes!r}, should be >= 0")
    if height <= 0 or width <= 0:
        raise ValueError(f"Invalid image size {height}x{width}, both sides should be > 0")
    return 8.0 * num_bytes / (height * width)


def _bits(likelihoods: Tensor) -> Tensor:
    return torch.log(likelihoods).sum() / -math.log(2)


def _gaussian_window(channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(_MS_SSIM_WIN_SIZE, dtype=dtype, device=device) - _MS_SSIM_WIN_SIZE // 2
    g = torch.exp(-(coords**2) / (2 * _MS_SSIM_WIN_SIGMA**2))
    g = g / g.sum()
    return g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)


def _blur(x: Tensor, win: Tensor) -> Tensor:
    # Separable Gaussian, "valid" convolution (no padding), per channel.
    channels = x.shape[1]
    x = F.conv2d(x, win, groups=channels)
    return F.conv2d(x, win.transpose(2, 3), groups=channels)


def _ssim_and_cs(x: Tensor, y: Tensor, win: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel SSIM and contrast-structure term, each ``[N, C]``."""
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2  # data_range is 1
    mu_x, mu_y = _blur(x, win), _blur(y, win)
    var_x = _blur(x * x, win) - mu_x**2
    var_y = _blur(y * y, win) - mu_y**2
    cov = _blur(x * y, win) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def _ms_ssim_with_levels(x: Tensor, y: Tensor, levels: int) -> Tensor:
    """MS-SSIM over the first ``levels`` scales, weights renormalised; ``[N]``.

    With ``levels=5`` this agrees with ``pytorch_msssim.ms_ssim`` to about 1e-5 (the
    tests check it; the standard weights sum to 1.0001, these to exactly 1), so the
    small-image fallback differs from the standard only in the number of scales.
    """
    weights = torch.tensor(_MS_SSIM_WEIGHTS[:levels], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    win = _gaussian_window(x.shape[1], x.dtype, x.device)
    terms = []
    for level in range(levels):
        ssim, cs = _ssim_and_cs(x, y, win)
        if level < levels - 1:
            terms.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
    terms.append(torch.relu(ssim))
    stacked = torch.stack(terms, dim=0)  # [levels, N, C]
    per_channel = torch.prod(stacked ** weights.view(-1, 1, 1), dim=0)
    return per_channel.mean(dim=1)
