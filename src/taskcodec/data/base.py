"""What every taskcodec image data set does once it can decode image ``i``.

Two modes, as in CompressAI's training script: training yields random crops of a fixed size
(so images batch together), validation yields whole images (batch size 1; the engine pads
them with :func:`taskcodec.data.transforms.pad_to_multiple`).

Crops are reproducible without shared state: the crop of item ``index`` in epoch ``epoch``
comes from a generator seeded with ``(seed, epoch, index)``. The same item is therefore the
same crop in every DataLoader worker, with any number of workers, in any order.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from taskcodec.data.transforms import crop_box, parse_patch_size, to_float
from taskcodec.errors import ConfigError, DataError

SPLITS = ("train", "val")
#: What a folder of images can also be asked for, for evaluation: its test/ folder, or every image.
FOLDER_SPLITS = ("train", "val", "test", "all")
MIN_EPOCH_LENGTH = 64  # crops per epoch for tiny sets, so an "epoch" is a useful unit of work


def check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> str:
    if split not in allowed:
        raise ValueError(f'Invalid split "{split}", should be one of: {", ".join(allowed)}')
    return split


def check_plain_split(split: str, source: str) -> str:
    """A data set other than a folder has train and val only: "test"/"all" are one line."""
    if split not in SPLITS:
        raise ConfigError(f'split "{split}" is for folders of images; {source} has the splits '
                          "train and val")
    return split


def _check_count(name: str, value: int | None, *, minimum: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid {name} {value!r}, should be an int >= {minimum}")


class ImageDataset(Dataset):
    """Random crops (``crop=True``) or whole images of a list of named images.

    Subclasses fill ``names`` and implement :meth:`_load`. Items are float32 ``(3, H, W)``
    tensors in ``[0, 1]``.

    Args:
        names: one name per image (a file path or an embedded image's name).
        source: where the images come from, for messages and :meth:`describe`.
        split: ``"train"`` or ``"val"``.
        crop: random crops of ``patch_size`` if true, whole images if false.
        patch_size: crop size, an int or ``(h, w)``.
        seed: seeds the crops (non-negative int).
        epoch_length: crops per epoch; ``None`` or ``0`` means
            ``max(len(names), 64)``. Ignored for whole images.
        hflip: also flip half of the crops left-right.
        skip_bad: warn about and skip images that cannot be used, instead of raising.
        cache_mb: keep up to this many megabytes of decoded images in memory, so that the
            crops of later epochs cut from decoded pixels instead of decoding the file again
            (0: decode every time). The cache lives in the process that reads the items: with
            ``num_workers=0`` it lasts the whole run; non-persistent workers refill their own
            every epoch, so for a set that fits the cache workers do not help.
    """

    def __init__(
        self,
        names: list[str],
        *,
        source: str,
        split: str,
        crop: bool,
        patch_size: int | tuple[int, int] = 256,
        seed: int = 0,
        epoch_length: int | None = None,
        hflip: bool = False,
        skip_bad: bool = False,
        cache_mb: int = 0,
    ) -> None:
        _check_count("seed", seed, minimum=0)
        _check_count("cache_mb", cache_mb, minimum=0)
        self.cache_mb = cache_mb
        self._cache: dict[int, tuple[torch.Tensor, tuple[int, int] | None]] = {}
        self._cache_bytes = 0
        _check_count("epoch_length", epoch_length, minimum=0)
        self.names = list(names)
        self.source = source
        self.split = check_split(split, FOLDER_SPLITS)
        self.crop = bool(crop)
        self.patch_size = parse_patch_size(patch_size)
        self.seed = seed
        self.hflip = bool(hflip)
        self.skip_bad = bool(skip_bad)
        self._epoch_length = epoch_length or None
        self.epoch = 0
        self._bad: dict[int, str] = {}  # index -> reason, filled lazily when skip_bad

    # -- what subclasses provide ------------------------------------------------------------

    def _load(self, i: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Decode image ``i`` as uint8 ``(3, H, W)``; also its original ``(w, h)`` if it was
        downscaled, else ``None``. Raises :class:`DataError` naming the image."""
        raise NotImplementedError

    # -- the Dataset protocol -----------------------------------------------------------------

    def __len__(self) -> int:
        if not self.crop:
            return len(self.names)
        return self._epoch_length or max(len(self.names), MIN_EPOCH_LENGTH)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        if not self.crop:
            return to_float(self._usable(index))
        image = self._usable(index % len(self.names))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        ph, pw = self.patch_size
        top, left = crop_box(image.shape[1], image.shape[2], self.patch_size, rng)
        patch = image[:, top:top + ph, left:left + pw]
        if self.hflip and rng.random() < 0.5:
            patch = patch.flip(-1)
        return to_float(patch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the crops of epoch ``epoch``. Call before iterating; DataLoader workers see
        the change only if they are started afterwards (the default, non-persistent ones)."""
        _check_count("epoch", epoch, minimum=0)
        self.epoch = epoch

    # -- checking -------------------------------------------------------------------------------

    def _checked(self, i: int) -> torch.Tensor:
        """Image ``i``, or :class:`DataError` if it is unreadable or smaller than the crop."""
        image, original = self._decoded(i)
        if self.crop:
            ph, pw = self.patch_size
            h, w = image.shape[1:]
            if h < ph or w < pw:
                how = "" if original is None else (
                    f" (downscaled from {original[0]}x{original[1]})")
                raise DataError(f"image {self.names[i]} is {w}x{h}{how}, smaller than the "
                                f"{pw}x{ph} training crop")
        return image

    def _decoded(self, i: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """:meth:`_load`, through the in-memory cache while it has room (see ``cache_mb``)."""
        hit = self._cache.get(i)
        if hit is None:
            hit = self._load(i)
            size = hit[0].numel() * hit[0].element_size()
            if self._cache_bytes + size <= self.cache_mb * 2**20:
                self._cache[i] = hit
                self._cache_bytes += size
        return hit

    def _usable(self, i: int) -> torch.Tensor:
        """Image ``i``; with ``skip_bad``, the next usable one when ``i`` is bad.

        Substituting keeps indices stable without decoding everything up front, which is what
        a large training set needs; whole-image sets drop bad files at construction instead
        (see :meth:`drop_bad`), so that no image is counted twice in an evaluation.
        """
        n = len(self.names)
        for j in (k % n for k in range(i, i + n)):
            if j in self._bad:
                continue
            try:
                return self._checked(j)
            except DataError as err:
                if not self.skip_bad:
                    raise
                self._bad[j] = str(err)
                warnings.warn(f"skipping: {err}", stacklevel=2)
        raise DataError(f"no usable images in {self.source}: all {n} are unreadable or too "
                        "small (see the warnings above)")

    def verify(self) -> list[str]:
        """Decode every image now; return one message per unusable image (empty: all good)."""
        problems = []
        for i in range(len(self.names)):
            try:
                self._checked(i)
            except DataError as err:
                problems.append(str(err))
        return problems

    def drop_bad(self) -> list[str]:
        """Decode every image, warn about and remove the unusable ones; return the messages.

        Raises :class:`DataError` if none is left.
        """
        keep, problems = [], []
        for i, name in enumerate(self.names):
            try:
                self._checked(i)
                keep.append(name)
            except DataError as err:
                problems.append(str(err))
                warnings.warn(f"skipping: {err}", stacklevel=2)
        if not keep:
            raise DataError(f"no usable images in {self.source}: all {len(self.names)} are "
                            "unreadable or too small (see the warnings above)")
        self.names = keep
        self._bad.clear()
        self._cache.clear()  # indices moved
        self._cache_bytes = 0
        return problems

    def describe(self) -> str:
        """One line for logs: source, split, how many images and what an item is."""
        n = len(self.names)
        images = f"{n} image{'s' if n != 1 else ''}"
        if self.crop:
            ph, pw = self.patch_size
            flip = " with flips" if self.hflip else ""
            what = f"{len(self)} random {pw}x{ph} crops per epoch{flip} (seed {self.seed})"
        else:
            what = "whole images"
        return f"{self.source} [{self.split}]: {images}, {what}"
