"""Image data sets for training and evaluating codecs: float32 RGB ``(3, H, W)`` in ``[0, 1]``.

* :class:`EmbeddedImages` - photographs shipped with scikit-image (the default; no download);
* :class:`ImageFolder` - a folder or ``.zip``/``.tar`` archive of PNG/JPEG/WebP/BMP/TIFF files;
* :func:`build_dataset` - either, from a config's ``data`` string;
* :func:`pad_to_multiple` / :func:`crop_padding` - CompressAI's zero padding for evaluation.
"""

from taskcodec.data.base import SPLITS, ImageDataset
from taskcodec.data.embedded import TRAIN_IMAGES, VAL_IMAGES, EmbeddedImages
from taskcodec.data.factory import build_dataset, describe
from taskcodec.data.folder import IMAGE_SUFFIXES, ImageFolder
from taskcodec.data.transforms import crop_padding, pad_to_multiple

__all__ = [
    "SPLITS",
    "IMAGE_SUFFIXES",
    "TRAIN_IMAGES",
    "VAL_IMAGES",
    "EmbeddedImages",
    "ImageDataset",
    "ImageFolder",
    "build_dataset",
    "crop_padding",
    "describe",
    "pad_to_multiple",
]
