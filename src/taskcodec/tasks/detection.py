"""Object detection: Faster R-CNN from torchvision's parts, fed by a codec latent."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
from torchvision.ops import roi_align

from taskcodec.errors import ConfigError
from taskcodec.tasks.base import TaskHead, check_fraction, check_int, check_sizes
from taskcodec.tasks.registry import TASKS


class SingleLevelRoIAlign(nn.Module):
    """RoIAlign on feature map ``"0"`` at a known stride, called like torchvision's
    ``MultiScaleRoIAlign`` (which with one level does the same ``roi_align``).

    ``MultiScaleRoIAlign`` instead infers the scale from the first batch's image size, rounds it
    to a power of two and keeps it: wrong for small images that are not a multiple of the
    stride, and state that is not in the ``state_dict``. The stride is known here.
    """

    def __init__(self, output_size: int, stride: int, sampling_ratio: int = 2) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
        self.spatial_scale = 1.0 / stride
        self.sampling_ratio = sampling_ratio

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list) -> Tensor:
        return roi_align(features["0"], boxes, self.output_size, self.spatial_scale, self.sampling_ratio)


class DetectionTask:
    """What every detection network declares, on the latent or in image space."""

    task = "detection"
    metric_name = "map"
    target_keys = ("boxes", "labels")
    min_classes = 2
    min_classes_why = " (the background and at least one object class)"


@TASKS.register("detection")
class DetectionHead(DetectionTask, TaskHead):
    """Faster R-CNN of Ren et al., "Faster R-CNN: towards real-time object detection with region
    proposal networks" (NeurIPS 2015), with torchvision's RPN and RoI heads on one feature map:
    the adapted latent at stride 8 (``stride / 2**upsample``).

    Boxes are absolute ``xyxy`` pixels of ``image_size``; ``num_classes`` includes the background
    class 0. The defaults are sized for CPU training on 96-128 px images: anchors of 16, 32 and
    64 px with aspect ratios 0.5, 1 and 2; 64 sampled anchors and RoIs per image instead of 256
    and 512; 600/300 proposals before/after NMS when training and 300/100 when testing; an MLP of
    128 units. Option names are torchvision's ``FasterRCNN`` ones; other settings are its defaults.

    Training targets hold ``"boxes"`` ``(n, 4)`` and ``"labels"`` ``(n,)`` in ``1..num_classes-1``;
    ``n = 0`` (an image without objects) is fine. Training returns torchvision's four losses
    ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg`` and their sum
    ``loss``; evaluation returns one ``{"boxes", "labels", "scores"}`` dict per image.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        stride: int = 16,
        num_classes: int,
        channels: int = 64,
        upsample: int = 1,
        anchor_sizes: Sequence[int] = (16, 32, 64),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        representation_size: int = 128,
        roi_size: int = 7,
        rpn_pre_nms_top_n_train: int = 600,
        rpn_pre_nms_top_n_test: int = 300,
        rpn_post_nms_top_n_train: int = 300,
        rpn_post_nms_top_n_test: int = 100,
        rpn_batch_size_per_image: int = 64,
        box_batch_size_per_image: int = 64,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            stride=stride,
            num_classes=num_classes,
            channels=channels,
            upsample=upsample,
        )
        task = self.task
        sizes = check_sizes(task, "anchor_sizes", anchor_sizes)
        if (
            not isinstance(aspect_ratios, (list, tuple))
            or not aspect_ratios
            or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 for r in aspect_ratios)
        ):
            raise ConfigError(
                f'Invalid aspect_ratios "{aspect_ratios}" for task {task}, should be a list of numbers > 0'
            )
        for name, value in (
            ("representation_size", representation_size),
            ("roi_size", roi_size),
            ("rpn_pre_nms_top_n_train", rpn_pre_nms_top_n_train),
            ("rpn_pre_nms_top_n_test", rpn_pre_nms_top_n_test),
            ("rpn_post_nms_top_n_train", rpn_post_nms_top_n_train),
            ("rpn_post_nms_top_n_test", rpn_post_nms_top_n_test),
            ("rpn_batch_size_per_image", rpn_batch_size_per_image),
            ("box_batch_size_per_image", box_batch_size_per_image),
            ("box_detections_per_img", box_detections_per_img),
        ):
            check_int(task, name, value, 1)
        score_thresh = check_fraction(task, "box_score_thresh", box_score_thresh)
        nms_thresh = check_fraction(task, "box_nms_thresh", box_nms_thresh)

        # One feature map: every anchor size at every location.
        anchors = AnchorGenerator(sizes=(sizes,), aspect_ratios=(tuple(float(r) for r in aspect_ratios),))
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=0.7,
        )
        self.roi_heads = RoIHeads(
            SingleLevelRoIAlign(roi_size, self.feature_stride),
            TwoMLPHead(channels * roi_size**2, representation_size),
            FastRCNNPredictor(representation_size, num_classes),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=box_detections_per_img,
        )

    def _run(self, features: Tensor, image_size: tuple[int, int], targets: list[dict] | None):
        x = self.adapter(features)
        b, _, h, w = x.shape
        # The anchor generator reads the padded image size from ImageList.tensors' shape only;
        # an empty tensor of that shape says it without allocating an image.
        extent = (h * self.feature_stride, w * self.feature_stride)
        images = ImageList(x.new_empty((b, 0, *extent)), [image_size] * b)
        feature_maps = {"0": x}
        proposals, rpn_losses = self.rpn(images, feature_maps, targets)
        detections, roi_losses = self.roi_heads(feature_maps, proposals, images.image_sizes, targets)
        return detections, {**rpn_losses, **roi_losses}

    def predict(self, features: Tensor, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        return self._run(features, image_size, None)[0]

    def losses(self, features: Tensor, image_size: tuple[int, int], targets: list[dict]) -> dict[str, Tensor]:
        boxes_and_labels = [self._check_target(i, t, features.device) for i, t in enumerate(targets)]
        out = self._run(features, image_size, boxes_and_labels)[1]
        out["loss"] = sum(out.values())
        return out

    def _check_target(self, index: int, target: dict, device: torch.device) -> dict[str, Tensor]:
        return check_detection_target(index, target, self.num_classes, device)


def check_detection_target(index: int, target: dict, num_classes: int, device: torch.device) -> dict[str, Tensor]:
    """Only boxes and labels, on ``device``; refuses what would give nan or a crash."""
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device)
    labels = torch.as_tensor(target["labels"], dtype=torch.int64, device=device)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"detection target {index} has boxes of shape {tuple(boxes.shape)} and labels of shape "
            f"{tuple(labels.shape)}, should be (n, 4) and (n,)"
        )
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if degenerate.any():
        box = [round(v, 2) for v in boxes[degenerate][0].tolist()]
        raise ValueError(f"detection target {index} has a box of zero width or height: {box}")
    bad = labels[(labels < 1) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"detection target {index} has label {int(bad[0])}, should be in 1..{num_classes - 1} "
            "(0 is the background)"
        )
    return {"boxes": boxes, "labels": labels}
