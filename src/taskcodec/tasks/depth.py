"""Monocular depth: a convolutional head on a codec latent, trained with Eigen's loss on metric
depth, or regressing stereo disparity in pixels as the papers' authors do on Cityscapes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from taskcodec.errors import ConfigError
from taskcodec.tasks.base import TaskHead, check_fraction
from taskcodec.tasks.registry import TASKS


def scale_invariant_log_loss(log_pred: Tensor, target: Tensor, lmbda: float = 0.5) -> Tensor:
    """Scale-invariant log loss of Eigen, Puhrsch & Fergus, "Depth map prediction from a single
    image using a multi-scale deep network" (NeurIPS 2014), eq. 4, with their λ = 0.5.

    Per image, with ``d = log_pred - log(target)`` over its ``n`` valid pixels (``target > 0``):
    ``mean(d**2) - lmbda * mean(d)**2``; then the mean over images that have valid pixels
    (0, still differentiable, if none has any). ``lmbda = 1`` ignores a global scale error
    entirely, ``lmbda = 0`` is the plain log MSE. Shapes: ``(B, ...)``, the same for both.
    """
    if log_pred.shape != target.shape:
        raise ValueError(
            f"log_pred of shape {tuple(log_pred.shape)} does not match target {tuple(target.shape)}"
        )
    valid = (target > 0).flatten(1)
    # log(1) = 0 where invalid keeps -inf out of the graph; those pixels are masked anyway.
    log_target = torch.log(torch.where(target > 0, target, torch.ones_like(target))).flatten(1)
    d = (log_pred.flatten(1) - log_target) * valid
    n = valid.sum(1)
    has = n > 0
    if not has.any():
        return log_pred.sum() * 0
    n, d = n[has].to(d.dtype), d[has]
    per_image = (d**2).sum(1) / n - lmbda * (d.sum(1) / n) ** 2
    return per_image.mean()


#: What a depth network can regress: metric depth (m) or stereo disparity (px).
DEPTH_TARGETS = ("depth", "disparity")
#: Disparity is regressed as ``DISPARITY_SCALE * output``: the authors' network predicts
#: disparity / 128 and reports 128 * RMSE, the RMSE in pixels.
DISPARITY_SCALE = 128.0


def check_depth_target(target: object) -> str:
    if target not in DEPTH_TARGETS:
        raise ConfigError(f'Invalid target "{target}" for task depth, should be one of '
                          f'{", ".join(DEPTH_TARGETS)}')
    return str(target)


def depth_from_output(raw: Tensor, target: str) -> Tensor:
    """A network's one-channel output as a prediction: depth = exp(log-depth), always
    positive; disparity = ``DISPARITY_SCALE`` * output (pixels)."""
    return raw.exp() if target == "depth" else raw * DISPARITY_SCALE


def depth_losses(raw: Tensor, reference: Tensor, target: str, si_lambda: float = 0.5,
                 l1_weight: float = 0.0) -> dict[str, Tensor]:
    """Named losses of a one-channel output ``raw`` ``(B, 1, H, W)`` against ``reference``
    ``(B, H, W)`` (0 = no ground truth), with ``"loss"`` their sum.

    Depth: ``"loss_silog"`` (:func:`scale_invariant_log_loss` of the log-depth output) plus
    ``"loss_l1"`` (``l1_weight`` times the mean absolute depth error) when ``l1_weight > 0``.
    Disparity: ``"loss_rmse"``, the RMSE in pixels over the batch's valid pixels (the authors'
    ``128 * sqrt(masked MSE)`` of disparity / 128).
    """
    valid = reference > 0
    if target == "disparity":
        error = (depth_from_output(raw[:, 0], target)[valid] - reference[valid]).pow(2).sum()
        mse = error / valid.sum().clamp(min=1)
        # Floored: the gradient of sqrt at an exact 0 is infinite.
        out = {"loss_rmse": mse.clamp(min=1e-12).sqrt()}
    else:
        log_pred = raw[:, 0]
        out = {"loss_silog": scale_invariant_log_loss(log_pred, reference, si_lambda)}
        if l1_weight > 0:
            # Only valid pixels enter the graph: masking by a product could meet inf * 0 = nan.
            error = (log_pred[valid].exp() - reference[valid]).abs().sum()
            out["loss_l1"] = l1_weight * error / valid.sum().clamp(min=1)
    out["loss"] = sum(out.values())
    return out


@TASKS.register("depth")
class DepthHead(TaskHead):
    """Depth regression: adapter -> conv 3x3 -> ReLU -> conv 3x3 to log-depth, upsampled
    bilinearly (in log space) to the image; the prediction is ``exp`` of it, so always positive.
    With ``target="disparity"`` the output is disparity / 128 instead, trained on the RMSE in
    pixels against targets' ``"disparity"`` (see :func:`depth_losses`).

    Training returns ``{"loss_silog", "loss"}`` — :func:`scale_invariant_log_loss` with
    ``si_lambda`` — plus ``"loss_l1"`` when ``l1_weight > 0``: ``l1_weight`` times the mean
    absolute depth error over valid pixels, already weighted so that the parts sum to ``"loss"``.
    Targets hold ``"depth"`` ``(H, W)`` with 0 where there is no ground truth. Evaluation
    returns depth ``(B, 1, H, W)``. ``num_classes`` must be 1 (one depth channel).
    """

    task = "depth"
    metric_name = "abs_rel"
    target_keys = ("depth",)

    def __init__(
        self,
        *,
        in_channels: int,
        stride: int = 16,
        num_classes: int = 1,
        channels: int = 64,
        upsample: int = 1,
        si_lambda: float = 0.5,
        l1_weight: float = 0.0,
        target: str = "depth",
    ) -> None:
        if num_classes != 1:
            raise ConfigError(
                f'Invalid num_classes "{num_classes}" for task depth, should be 1 (one depth channel)'
            )
        super().__init__(
            in_channels=in_channels,
            stride=stride,
            num_classes=num_classes,
            channels=channels,
            upsample=upsample,
        )
        self.si_lambda = check_fraction(self.task, "si_lambda", si_lambda)
        if isinstance(l1_weight, bool) or not isinstance(l1_weight, (int, float)) or not l1_weight >= 0:
            raise ConfigError(f'Invalid l1_weight "{l1_weight}" for task depth, should be >= 0')
        self.l1_weight = float(l1_weight)
        self.target = check_depth_target(target)
        self.target_keys = (self.target,)
        if self.target == "disparity":
            self.metric_name = "disparity_rmse"
        self.regressor = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, 3, padding=1),
        )

    def log_depth(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        """The raw output at the image's size: log-depth, or disparity / 128."""
        return self.to_image(self.regressor(self.adapter(features)), image_size)

    def predict(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        return depth_from_output(self.log_depth(features, image_size), self.target)

    def losses(self, features: Tensor, image_size: tuple[int, int], targets: list[dict]) -> dict[str, Tensor]:
        reference = self.stack_targets(targets, self.target, features.device).to(features.dtype)
        if tuple(reference.shape[-2:]) != image_size:
            raise ValueError(f"{self.target} maps of shape {tuple(reference.shape)} do not match "
                             f"image_size {image_size}")
        return depth_losses(self.log_depth(features, image_size), reference, self.target,
                            self.si_lambda, self.l1_weight)
