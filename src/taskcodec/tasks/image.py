"""Image-space task networks: the base latent decoded to an image-like tensor, then a full
torchvision network, as in the authors' code of both papers (de Andrade, Harell, Foroutan &
Bajić, ICME CfM 2023; de Andrade & Bajić, "Towards Task-Compatible Compressible
Representations", ICME CfM 2024):

* ``fasterrcnn_resnet50_fpn_v2`` - detection (COCO in both papers);
* ``lraspp_mobilenet_v3_large`` - depth or disparity (Cityscapes, paper 2), one output channel;
* ``deeplabv3_mobilenet_v3_large`` - segmentation (paper 1);
* ``deeplabv3_resnet50`` with its auxiliary loss - segmentation (paper 2).

The networks are built untrained (``weights=None, weights_backbone=None``: nothing is ever
downloaded). Pretrained weights come from a local file or the torch hub cache
(:func:`resolve_weights`, :meth:`ImageTaskNetwork.load_network_weights`). A network plays the
part of a latent head (:class:`~taskcodec.tasks.base.TaskHead`): the synthesis transform is its
adapter, at stride 1; training gives named losses, evaluation the same predictions as the latent
heads. The synthesis output is ImageNet-normalised before the network (Faster R-CNN does it in
its own transform), as the pretrained weights expect.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from taskcodec.config import IMAGE_NETWORKS
from taskcodec.errors import ConfigError
from taskcodec.tasks.base import TaskHead
from taskcodec.tasks.depth import check_depth_target, depth_from_output, depth_losses
from taskcodec.tasks.detection import DetectionTask, check_detection_target
from taskcodec.tasks.segmentation import check_batch, segmentation_loss

log = logging.getLogger(__name__)

#: Weight of the auxiliary classifier's loss (torchvision's segmentation reference).
AUX_WEIGHT = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hub_checkpoints() -> Path:
    """Where torch.hub keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(path: str, network: str) -> Path:
    """The weights file for ``path``: a file, or a file name in the torch hub cache; ``"hub"``
    names torchvision's default weights file for ``network`` in that cache."""
    from urllib.parse import urlparse

    from torchvision.models import get_model_weights

    hub = hub_checkpoints()
    if path == "hub":
        name = Path(urlparse(get_model_weights(network).DEFAULT.url).path).name
        candidates = [hub / name]
    else:
        given = Path(path).expanduser()
        candidates = [given] + ([hub / given.name] if not given.is_absolute() else [])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"task_weights={path}: no such file (looked for "
                      f"{' and '.join(str(c) for c in candidates)})")


class KeepSize(GeneralizedRCNNTransform):
    """torchvision's detection transform without its resize: normalise and batch only."""

    def resize(self, image, target=None):
        return image, target


class ImageTaskNetwork(TaskHead):
    """synthesis(latent) -> image-like tensor (cropped to the image) -> torchvision network."""

    network_name: ClassVar[str]

    def __init__(self, *, network: str, synthesis: nn.Module, in_channels: int, stride: int,
                 num_classes: int) -> None:
        super().__init__(in_channels=in_channels, stride=stride, num_classes=num_classes,
                         channels=1, upsample=0)
        # The synthesis is this network's adapter: it makes a full-resolution image.
        self.adapter = synthesis
        self.feature_stride = 1
        self.network_name = network
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def image(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        """The image-like tensor the network sees (before normalisation)."""
        return self.to_image(self.adapter(features), image_size)

    def normalised(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        return (self.image(features, image_size) - self.mean) / self.std

    def load_network_weights(self, path: Path) -> tuple[int, int]:
        """Load a torchvision state dict into the network (not the synthesis); tensors whose
        name or shape differ (a classifier for other classes) are skipped. Returns (loaded,
        in the file)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a torchvision reference-scripts checkpoint
        if not isinstance(state, dict):
            raise ConfigError(f"task_weights={path}: not a state dict")
        own = self.network.state_dict()
        usable = {k: v for k, v in state.items()
                  if k in own and isinstance(v, Tensor) and v.shape == own[k].shape}
        if not usable:
            raise ConfigError(f"task_weights={path}: none of its {len(state)} tensors fit "
                              f"{self.network_name}")
        self.network.load_state_dict(usable, strict=False)
        log.info("task_weights %s: loaded %d of %d tensors into %s (%d of the network's "
                 "kept their initial values)", path, len(usable), len(state), self.network_name,
                 len(own) - len(usable))
        return len(usable), len(state)


class ImageDetection(DetectionTask, ImageTaskNetwork):
    """Faster R-CNN ResNet-50-FPN v2 of torchvision on the synthesised image. ``min_size`` is
    torchvision's resize of the shorter side (the authors keep its 800); 0 keeps the image's
    size, which is what CPU-sized training wants. The RoI options are torchvision's."""

    def __init__(self, *, network: str, synthesis: nn.Module, in_channels: int, stride: int = 16,
                 num_classes: int, min_size: int = 0, rpn_post_nms_top_n_train: int = 2000,
                 rpn_post_nms_top_n_test: int = 1000, box_batch_size_per_image: int = 512) -> None:
        from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

        super().__init__(network=network, synthesis=synthesis, in_channels=in_channels,
                         stride=stride, num_classes=num_classes)
        sizes = {"min_size": min_size, "max_size": max(1333, min_size * 1333 // 800)} \
            if min_size else {}
        # The RoI options (torchvision's defaults here) set most of the cost of a step.
        self.network = fasterrcnn_resnet50_fpn_v2(
            weights=None, weights_backbone=None, num_classes=num_classes,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            box_batch_size_per_image=box_batch_size_per_image, **sizes)
        if not min_size:
            transform = self.network.transform
            self.network.transform = KeepSize(transform.min_size, transform.max_size,
                                              transform.image_mean, transform.image_std)

    def predict(self, features: Tensor, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        return self.network(list(self.image(features, image_size)))

    def losses(self, features: Tensor, image_size: tuple[int, int], targets: list[dict]) -> dict[str, Tensor]:
        checked = [check_detection_target(i, t, self.num_classes, features.device)
                   for i, t in enumerate(targets)]
        out = dict(self.network(list(self.image(features, image_size)), checked))
        out["loss"] = sum(out.values())
        return out


class ImageSegmentation(ImageTaskNetwork):
    """DeepLabV3 of torchvision (MobileNetV3-Large or ResNet-50 backbone) on the synthesised
    image; ResNet-50 adds its auxiliary classifier's loss (``"loss_aux"``, weight 0.5), as paper
    2's segmentation does. Training needs batches of two or more (BatchNorm in ASPP)."""

    task = "segmentation"
    metric_name = "miou"
    target_keys = ("mask",)

    def __init__(self, *, network: str, synthesis: nn.Module, in_channels: int, stride: int = 16,
                 num_classes: int) -> None:
        from torchvision.models import segmentation

        super().__init__(network=network, synthesis=synthesis, in_channels=in_channels,
                         stride=stride, num_classes=num_classes)
        self.aux = network == "deeplabv3_resnet50"
        self.network = getattr(segmentation, network)(weights=None, weights_backbone=None,
                                                      num_classes=num_classes, aux_loss=self.aux)

    def predict(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        return self.network(self.normalised(features, image_size))["out"]

    def losses(self, features: Tensor, image_size: tuple[int, int], targets: list[dict]) -> dict[str, Tensor]:
        check_batch(features.shape[0])
        mask = self.stack_targets(targets, "mask", features.device).long()
        out = self.network(self.normalised(features, image_size))
        losses = {"loss_seg": segmentation_loss(out["out"], mask, image_size, self.num_classes)}
        if self.aux:
            losses["loss_aux"] = AUX_WEIGHT * segmentation_loss(out["aux"], mask, image_size,
                                                                self.num_classes)
        losses["loss"] = sum(losses.values())
        return losses


class ImageDepth(ImageTaskNetwork):
    """LR-ASPP MobileNetV3-Large of torchvision with one output channel on the synthesised
    image: log-depth or disparity / 128, trained as :class:`~taskcodec.tasks.DepthHead`."""

    task = "depth"
    metric_name = "abs_rel"
    target_keys = ("depth",)

    def __init__(self, *, network: str, synthesis: nn.Module, in_channels: int, stride: int = 16,
                 num_classes: int = 1, target: str = "depth") -> None:
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        if num_classes != 1:
            raise ConfigError(f'Invalid num_classes "{num_classes}" for task depth, should be 1')
        super().__init__(network=network, synthesis=synthesis, in_channels=in_channels,
                         stride=stride, num_classes=1)
        self.target = check_depth_target(target)
        self.target_keys = (self.target,)
        if self.target == "disparity":
            self.metric_name = "disparity_rmse"
        self.network = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                 num_classes=1)

    def raw(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        return self.network(self.normalised(features, image_size))["out"]

    def predict(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        return depth_from_output(self.raw(features, image_size), self.target)

    def losses(self, features: Tensor, image_size: tuple[int, int], targets: list[dict]) -> dict[str, Tensor]:
        reference = self.stack_targets(targets, self.target, features.device).to(features.dtype)
        return depth_losses(self.raw(features, image_size), reference, self.target)


_CLASSES = {"detection": ImageDetection, "segmentation": ImageSegmentation, "depth": ImageDepth}


def build_image_task(network: str, *, synthesis: nn.Module, in_channels: int, stride: int = 16,
                     num_classes: int, **kw) -> ImageTaskNetwork:
    """The image-space network ``network`` (a key of ``config.IMAGE_NETWORKS``), untrained."""
    if network not in IMAGE_NETWORKS:
        raise ConfigError(f"task_network={network!r} is not one of: {', '.join(IMAGE_NETWORKS)}")
    return _CLASSES[IMAGE_NETWORKS[network]](network=network, synthesis=synthesis,
                                       in_channels=in_channels, stride=stride,
                                       num_classes=num_classes, **kw)
