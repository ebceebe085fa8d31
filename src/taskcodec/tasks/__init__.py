"""Task networks on a codec's decoded latent, in torchvision's style: a dict of named losses
(with ``"loss"``, their sum) in training mode, predictions in eval mode.

* :func:`build_task` / :data:`TASKS` - "detection", "segmentation", "depth", "classification".
* :class:`TaskHead` - the contract every head follows (see :mod:`taskcodec.tasks.base`).
"""

from taskcodec.tasks.base import LatentAdapter, TaskHead
from taskcodec.tasks.classification import ClassificationHead  # importing a head registers it
from taskcodec.tasks.depth import DepthHead, scale_invariant_log_loss
from taskcodec.tasks.detection import DetectionHead
from taskcodec.tasks.registry import TASKS, build_task
from taskcodec.tasks.segmentation import IGNORE_INDEX, SegmentationHead

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "ClassificationHead",
    "DepthHead",
    "DetectionHead",
    "LatentAdapter",
    "SegmentationHead",
    "TaskHead",
    "build_task",
    "scale_invariant_log_loss",
]
