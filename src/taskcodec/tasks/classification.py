"""Image classification: global average pooling and a small MLP on a codec latent."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from taskcodec.tasks.base import TaskHead, check_int
from taskcodec.tasks.registry import TASKS


@TASKS.register("classification")
class ClassificationHead(TaskHead):
    """Adapter (no upsampling: pooling discards the layout anyway) -> global average pool ->
    Linear -> ReLU -> Linear, as the classifier of a ResNet or ViT probe.

    Training targets hold ``"label"``, a class index; it returns ``{"loss_classifier", "loss"}``
    (cross-entropy). Evaluation returns logits ``(B, num_classes)``.
    """

    task = "classification"
    metric_name = "accuracy"
    target_keys = ("label",)

    def __init__(
        self, *, in_channels: int, stride: int = 16, num_classes: int, channels: int = 64, hidden: int = 128
    ) -> None:
        super().__init__(
            in_channels=in_channels, stride=stride, num_classes=num_classes, channels=channels, upsample=0
        )
        check_int(self.task, "hidden", hidden, 1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def predict(self, features: Tensor, image_size: tuple[int, int]) -> Tensor:
        return self.classifier(self.adapter(features).mean(dim=(2, 3)))

    def losses(self, features: Tensor, image_size: tuple[int, int], targets: list[dict]) -> dict[str, Tensor]:
        labels = self.stack_targets(targets, "label", features.device).long().reshape(-1)
        if labels.numel() != features.shape[0]:
            raise ValueError(
                f"classification targets need one scalar label per image, got {labels.numel()} labels"
            )
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"classification label {int(bad[0])} is not in 0..{self.num_classes - 1}")
        loss = F.cross_entropy(self.predict(features, image_size), labels)
        return {"loss_classifier": loss, "loss": loss}
