"""The default data set: colour photographs shipped inside scikit-image, no download needed.

Only images stored in the scikit-image wheel itself are used (``skimage.data`` reads them from
its own folder; none of them goes through ``pooch``), so training and evaluation work on a
machine without internet. Synthetic pictures (``colorwheel``, ``logo``) and the near-duplicate
right view of the stereo pair are left out.

The split is a fixed list (:data:`VAL_IMAGES` / :data:`TRAIN_IMAGES`):

* validation: ``chelsea`` (a cat, 451x300), ``coffee`` (a cup, 600x400) - ordinary photographs,
  like the Kodak images codecs are usually compared on;
* training: ``astronaut``, ``rocket``, ``hubble_deep_field``, ``immunohistochemistry``,
  ``retina``, ``motorcycle_left``.

Images are downscaled (Lanczos) so the longer side is at most ``max_side`` (512 by default)
and kept decoded in memory, once per process and ``max_side``.
"""

from __future__ import annotations

import functools

import torch
from PIL import Image

from taskcodec.data.base import ImageDataset, check_split
from taskcodec.data.transforms import downscale, to_uint8_tensor

DEFAULT_MAX_SIDE = 512

# name -> how to get it from skimage.data (stereo_motorcycle returns (left, right, disparity))
_LOADERS = {
    "astronaut": lambda d: d.astronaut(),
    "rocket": lambda d: d.rocket(),
    "hubble_deep_field": lambda d: d.hubble_deep_field(),
    "immunohistochemistry": lambda d: d.immunohistochemistry(),
    "retina": lambda d: d.retina(),
    "motorcycle_left": lambda d: d.stereo_motorcycle()[0],
    "chelsea": lambda d: d.chelsea(),
    "coffee": lambda d: d.coffee(),
}
VAL_IMAGES = ("chelsea", "coffee")
TRAIN_IMAGES = tuple(name for name in _LOADERS if name not in VAL_IMAGES)


@functools.cache
def load_embedded(name: str, max_side: int | None = DEFAULT_MAX_SIDE
                  ) -> tuple[torch.Tensor, tuple[int, int]]:
    """One embedded image as uint8 ``(3, H, W)`` (cached; do not modify it in place) and its
    original ``(w, h)``."""
    if name not in _LOADERS:
        raise ValueError(f'Invalid embedded image "{name}", should be one of '
                         f"{', '.join(_LOADERS)}")
    import skimage.data  # imported here: only this data set needs scikit-image

    img = Image.fromarray(_LOADERS[name](skimage.data))
    return to_uint8_tensor(downscale(img, max_side)), img.size


class EmbeddedImages(ImageDataset):
    """scikit-image's bundled colour photographs (see the module docstring for the split).

    Args:
        split: ``"train"`` (6 images) or ``"val"`` (2 images).
        max_side: downscale so the longer side is at most this (``None``: full size).
        crop: random crops if true, whole images if false; default: crops for ``"train"``.
        Other arguments: see :class:`taskcodec.data.base.ImageDataset`.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        patch_size: int | tuple[int, int] = 256,
        seed: int = 0,
        max_side: int | None = DEFAULT_MAX_SIDE,
        epoch_length: int | None = None,
        hflip: bool = False,
        crop: bool | None = None,
    ) -> None:
        if max_side is not None and (not isinstance(max_side, int) or isinstance(max_side, bool)
                                     or max_side < 1):
            raise ValueError(f"Invalid max_side {max_side!r}, should be a positive int or None")
        names = TRAIN_IMAGES if check_split(split) == "train" else VAL_IMAGES
        super().__init__(list(names), source="embedded", split=split,
                         crop=split == "train" if crop is None else crop,
                         patch_size=patch_size, seed=seed, epoch_length=epoch_length,
                         hflip=hflip)
        self.max_side = max_side

    def _load(self, i: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        image, original = load_embedded(self.names[i], self.max_side)
        return image, (original if tuple(image.shape[:0:-1]) != original else None)
