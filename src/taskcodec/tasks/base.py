"""What every task head shares: the contract, the adapter from a codec latent, the checks.

A head follows torchvision: ``forward(features, image_size, targets)`` returns a dict of named
losses (plus ``"loss"``, their sum) in training mode and predictions in eval mode.

``features`` is a decoded latent at ``stride`` (16 for the codecs here): each feature pixel
covers ``stride x stride`` image pixels, starting at the top-left corner, so an ``h x w`` latent
covers ``h*stride x w*stride`` pixels. ``image_size`` is the size of the image the codec
encoded: the padded size if the caller padded it (then the caller crops the predictions, as it
crops ``x_hat``), else the original size, which strided convolutions round up to whole feature
pixels. Outputs at image resolution are made at the latent's full extent and cropped to
``image_size`` at the top-left, never stretched: stretching would shift every pixel a little.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from compressai.layers import GDN
from torch import Tensor, nn

from taskcodec.config import higher_is_better
from taskcodec.errors import ConfigError


def check_int(task: str, name: str, value: object, minimum: int, why: str = "") -> int:
    """``value`` if it is an int >= ``minimum``, else a one-line :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f'Invalid {name} "{value}" for task {task}, should be >= {minimum}{why}')
    return value


def check_fraction(task: str, name: str, value: object) -> float:
    """``value`` as a float if it is a number in [0, 1], else a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f'Invalid {name} "{value}" for task {task}, should be between 0 and 1')
    return float(value)


def check_sizes(task: str, name: str, values: object) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (lists come from JSON configs) as a tuple."""
    if (
        not isinstance(values, (list, tuple))
        or not values
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)
    ):
        raise ConfigError(f'Invalid {name} "{values}" for task {task}, should be a list of ints >= 1')
    return tuple(values)


class LatentAdapter(nn.Sequential):
    """Turns a decoded latent into task features: conv 3x3 -> inverse GDN, then ``upsample``
    times (bilinear x2 -> conv 3x3 -> ReLU), so the output stride is ``stride / 2**upsample``.

    The analysis transform normalised the latent with GDN; the inverse GDN of Ballé et al.,
    "Density modeling of images using a generalized normalization transformation" (ICLR 2016)
    is how a synthesis transform starts undoing that, so the head starts the same way.
    Bilinear upsampling then a convolution, not a transposed convolution, avoids checkerboard
    artefacts in dense outputs.
    """

    def __init__(self, in_channels: int, channels: int, upsample: int) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 3, padding=1),
            GDN(channels, inverse=True),
        ]
        for _ in range(upsample):
            layers += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


class TaskHead(nn.Module):
    """A task network on a codec latent; subclasses implement :meth:`losses` and :meth:`predict`.

    Class attributes: ``task`` (its registry name), ``metric_name`` (the MLflow name of its main
    metric; ``higher_is_better`` follows from it), ``target_keys`` (what training targets must hold) and
    ``min_classes``. Instances have ``in_channels``, ``stride``, ``num_classes`` and
    ``feature_stride`` (the adapter's output stride).
    """

    task: ClassVar[str]
    metric_name: ClassVar[str]
    target_keys: ClassVar[tuple[str, ...]]
    min_classes: ClassVar[int] = 1
    min_classes_why: ClassVar[str] = ""

    def __init__(
        self, *, in_channels: int, stride: int, num_classes: int, channels: int, upsample: int
    ) -> None:
        super().__init__()
        task = self.task
        self.in_channels = check_int(task, "in_channels", in_channels, 1)
        self.stride = check_int(task, "stride", stride, 1)
        self.num_classes = check_int(task, "num_classes", num_classes, self.min_classes, self.min_classes_why)
        check_int(task, "channels", channels, 1)
        check_int(task, "upsample", upsample, 0)
        if stride % 2**upsample:
            raise ConfigError(
                f'Invalid upsample "{upsample}" for task {task}: '
                f"stride {stride} is not divisible by 2**{upsample}"
            )
        self.feature_stride = stride // 2**upsample
        self.adapter = LatentAdapter(in_channels, channels, upsample)

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger ``metric_name`` is better (one rule: config.higher_is_better)."""
        return higher_is_better(self.metric_name)

    def forward(self, features: Tensor, image_size: tuple[int, int], targets: list[dict] | None = None):
        """Losses in training mode (``targets`` required), predictions in eval mode (``targets``
        ignored, as in torchvision)."""
        image_size = self._check_inputs(features, image_size, targets)
        if not self.training:
            return self.predict(features, image_size)
        if targets is None:
            raise ValueError(f"the {self.task} head needs targets in training mode (call .eval() to predict)")
        return self.losses(features, image_size, targets)

    def losses(self, features: Tensor, image_size: tuple[int, int], targets: list[dict]) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, features: Tensor, image_size: tuple[int, int]):
        raise NotImplementedError

    def to_image(self, x: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Bilinear upsampling of a map at ``feature_stride`` to its full extent, cropped to
        ``image_size`` at the top-left (see the module docstring for why not stretched)."""
        h, w = x.shape[-2:]
        s = self.feature_stride
        if s > 1:
            x = F.interpolate(x, size=(h * s, w * s), mode="bilinear", align_corners=False)
        return x[..., : image_size[0], : image_size[1]]

    def stack_targets(self, targets: list[dict], key: str, device: torch.device) -> Tensor:
        return torch.stack([torch.as_tensor(t[key]) for t in targets]).to(device)

    def _check_inputs(self, features: Tensor, image_size, targets) -> tuple[int, int]:
        if not isinstance(features, Tensor) or features.dim() != 4 or features.shape[1] != self.in_channels:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"the {self.task} head expects features of shape (B, {self.in_channels}, h, w), got {shape}"
            )
        if (
            not isinstance(image_size, (tuple, list, torch.Size))
            or len(image_size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in image_size)
        ):
            raise ValueError(f"Invalid image_size {image_size!r}, should be (height, width) in pixels")
        size = (int(image_size[0]), int(image_size[1]))
        extent = tuple(n * self.stride for n in features.shape[-2:])
        # A latent made from this image covers it with less than one feature pixel to spare.
        if any(not e - self.stride < v <= e for v, e in zip(size, extent, strict=True)):
            raise ValueError(
                f"features of {features.shape[-2]}x{features.shape[-1]} at stride {self.stride} cover "
                f"{extent[0]}x{extent[1]} pixels, not an image of {size[0]}x{size[1]}: pass the size of "
                "the image the codec encoded (padded, if it was padded)"
            )
        if self.training and targets is not None:
            if not isinstance(targets, (list, tuple)) or len(targets) != features.shape[0]:
                count = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
                raise ValueError(f"the {self.task} head got {count} targets for {features.shape[0]} images")
            for i, target in enumerate(targets):
                missing = [k for k in self.target_keys if k not in target]
                if missing:
                    keys = ", ".join(map(str, target)) or "nothing"
                    raise ValueError(f'{self.task} target {i} has no "{missing[0]}" (it has: {keys})')
        return size
