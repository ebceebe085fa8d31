"""Image data sets for training and evaluating codecs: float32 RGB ``(3, H, W)`` in ``[0, 1]``.

* :class:`EmbeddedImages` - photographs shipped with scikit-image (the default; no download);
* :class:`ImageFolder` - a folder or ``.zip``/``.tar`` archive of PNG/JPEG/WebP/BMP/TIFF files;
* :class:`SceneImages` - the procedural scenes' images alone;
* :func:`build_dataset` - any of these, from a config's ``data`` string;
* :class:`ScenesDataset`, :class:`CocoDetection`, :class:`Cityscapes` - multi-task
  ``(image, target)`` items, from :func:`build_task_dataset`, batched by :func:`collate`;
* :func:`pad_to_multiple` / :func:`crop_padding` - CompressAI's zero padding for evaluation.
"""

from taskcodec.data.base import SPLITS, ImageDataset
from taskcodec.data.cityscapes import Cityscapes
from taskcodec.data.coco import CocoDetection
from taskcodec.data.embedded import TRAIN_IMAGES, VAL_IMAGES, EmbeddedImages
from taskcodec.data.factory import build_dataset, build_task_dataset, describe
from taskcodec.data.folder import IMAGE_SUFFIXES, ImageFolder
from taskcodec.data.samples import collate
from taskcodec.data.scenes import SceneImages, ScenesDataset
from taskcodec.data.transforms import crop_padding, pad_to_multiple

__all__ = [
    "SPLITS",
    "IMAGE_SUFFIXES",
    "TRAIN_IMAGES",
    "VAL_IMAGES",
    "Cityscapes",
    "CocoDetection",
    "EmbeddedImages",
    "ImageDataset",
    "ImageFolder",
    "SceneImages",
    "ScenesDataset",
    "build_dataset",
    "build_task_dataset",
    "collate",
    "crop_padding",
    "describe",
    "pad_to_multiple",
]
