"""Semantic segmentation: a DeepLabV3 head on a codec latent."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from taskcodec.tasks.base import TaskHead, check_sizes
from taskcodec.tasks.registry import TASKS

#: Mask value of pixels without a label (Cityscapes' and VOC's convention).
IGNORE_INDEX = 255


@TASKS.register("segmentation")
class SegmentationHead(TaskHead):
    """DeepLabV3 of Chen et al., "Rethinking atrous convolution for semantic image
    segmentation" (2017): torchvision's ASPP and DeepLabHead layout, with ``channels`` instead
    of 256 channels, on the adapted latent; logits are upsampled bilinearly to the image.

    The default atrous rates (3, 6, 9) at stride 8 keep the paper's rates *relative to the
    image* (12, 24, 36 at stride 8 on 513 px crops) for the 96-128 px images trained on CPU;
    pass larger ones for Cityscapes-sized inputs. Training minimises pixel cross-entropy over
    pixels whose mask is not ``IGNORE_INDEX`` (255) and returns ``{"loss_seg", "loss"}``;
    evaluation returns logits ``(B, num_classes, H, W)``.

    ASPP's image-pooling branch has a BatchNorm over one value per image, so training needs
    batches of at least two images.
    """

    task = "segmentation"
    metric_name = "miou"
    target_keys = ("mask",)

    def __init__(
        self,
        *,
        in_channels: int,
        stride: int = 16,
        num_classes: int,
        channels: int = 64,
        upsample: int = 1,
        atrous_rates: Sequence[int] = (3, 6, 9),
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            stride=stride,
            num_classes=num_classes,
            channels=channels,
            upsample=upsample,
        )
        rates = check_sizes(self.task, "atrous_rates", atrous_rates)
        self.classifier = nn.Sequential(
            ASPP(channels, rates, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, num_classes, 1),
        )

    def predict(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        return self.to_image(self.classifier(self.adapter(features)), image_size)

    def losses(self, features: Tensor, image_size: tuple[int, int], targets: list[dict]) -> dict[str, Tensor]:
        check_batch(features.shape[0])
        mask = self.stack_targets(targets, "mask", features.device).long()
        loss = segmentation_loss(self.predict(features, image_size), mask, image_size, self.num_classes)
        return {"loss_seg": loss, "loss": loss}


def check_batch(batch: int) -> None:
    """DeepLabV3's ASPP image pooling has a BatchNorm over one value per image."""
    if batch < 2:
        raise ValueError(
            "segmentation training needs batches of >= 2 images "
            f"(BatchNorm in ASPP's image pooling), got {batch}"
        )


def segmentation_loss(logits: Tensor, mask: Tensor, image_size: tuple[int, int], num_classes: int) -> Tensor:
    """Pixel cross-entropy of ``logits`` ``(B, C, H, W)`` against ``mask`` ``(B, H, W)``, the mean
    over pixels whose mask is not ``IGNORE_INDEX`` (0 if there are none, instead of nan)."""
    if tuple(mask.shape[-2:]) != image_size:
        raise ValueError(
            f"segmentation masks of shape {tuple(mask.shape)} do not match image_size {image_size}"
        )
    labelled = mask != IGNORE_INDEX
    bad = mask[labelled & ((mask < 0) | (mask >= num_classes))]
    if bad.numel():
        raise ValueError(
            f"segmentation mask has class {int(bad[0])}, should be in 0..{num_classes - 1} "
            f"or {IGNORE_INDEX} (ignore)"
        )
    total = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / labelled.sum().clamp(min=1)
