"""Cityscapes semantic segmentation (19 train ids) and depth from disparity, from a local copy.

The layout is the official one (``leftImg8bit_trainvaltest.zip``, ``gtFine_trainvaltest.zip``,
``disparity_trainvaltest.zip`` and ``camera_trainvaltest.zip`` unpacked in one folder)::

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
    ROOT/disparity/{split}/{city}/{city}_{seq}_{frame}_disparity.png
    ROOT/camera/{split}/{city}/{city}_{seq}_{frame}_camera.json      (optional)

Label ids become the 19 train ids of the Cityscapes label definitions; every other id
(void classes, and classes such as "parking" or "caravan" that the benchmark does not
evaluate) is 255, ignored. Disparity pixels ``p > 0`` mean ``d = (p - 1) / 256`` pixels;
depth is ``baseline * fx / d`` metres, with the image's camera file when present, else the
dataset's usual constants; ``p = 0`` (and ``d = 0``) are invalid, depth 0. Items carry the
disparity ``d`` itself too (``"disparity"``, pixels of the full-resolution frame, as the papers'
authors regress it), whatever ``scale``.

The full 2048x1024 frames are heavy on a CPU: ``scale`` (for example ``0.25``) shrinks
image, labels and depth together (bilinear for the image, nearest for labels and depth;
depth values stay metres, they come from full-resolution disparities). ``crop`` then takes
a fixed-size window, random when training, so that batches stack.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from taskcodec.data.samples import fit_sample
from taskcodec.data.transforms import parse_patch_size, to_rgb
from taskcodec.errors import DataError

#: The 19 evaluated classes, in train-id order (Cityscapes ``labels.py``).
CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
           "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
           "bus", "train", "motorcycle", "bicycle")
#: label id -> train id for the evaluated classes; all other ids map to 255.
LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                     23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
IGNORE_INDEX = 255
#: Stereo baseline (m) and focal length (px) shared by most Cityscapes cameras, used when an
#: image has no camera file.
BASELINE_M = 0.209313
FOCAL_PX = 2262.52
TARGETS = ("mask", "depth")

_LUT = np.full(256, IGNORE_INDEX, dtype=np.int64)
_LUT[list(LABEL_TO_TRAIN_ID)] = list(LABEL_TO_TRAIN_ID.values())
_IMAGE_SUFFIX = "_leftImg8bit.png"
_PARTS = {  # target -> (folder, file suffix)
    "mask": ("gtFine", "_gtFine_labelIds.png"),
    "depth": ("disparity", "_disparity.png"),
}


def check_scale(scale: float) -> float:
    """``scale`` as a float in ``(0, 1]``, else ``ValueError``."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise ValueError(f"Invalid scale {scale!r}, should be in (0, 1]")
    return float(scale)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes ``labelIds`` image (uint8) to train ids (int64, 255 = ignore)."""
    return _LUT[np.asarray(label_ids, dtype=np.uint8)]


def raw_to_disparity(raw: np.ndarray) -> np.ndarray:
    """Disparity in pixels of the full-resolution frame (float32) from a raw 16-bit Cityscapes
    disparity image: ``(p - 1) / 256`` where ``p > 0``; 0 = invalid."""
    raw = np.asarray(raw, dtype=np.float64)
    return np.where(raw > 0, (raw - 1.0) / 256.0, 0.0).astype(np.float32)


def disparity_to_depth(raw: np.ndarray, baseline: float = BASELINE_M,
                       focal: float = FOCAL_PX) -> np.ndarray:
    """Depth in metres (float32) from a raw 16-bit Cityscapes disparity image; 0 = invalid."""
    raw = np.asarray(raw, dtype=np.float64)
    disparity = np.where(raw > 0, (raw - 1.0) / 256.0, 0.0)
    depth = np.zeros_like(disparity)
    valid = disparity > 0
    depth[valid] = baseline * focal / disparity[valid]
    return depth.astype(np.float32)


class Cityscapes(Dataset):
    """Cityscapes items ``(image, target)`` with ``mask`` (19 train ids, 255 ignore) and/or
    ``depth`` (metres, 0 invalid) with ``disparity`` (pixels, 0 invalid), plus ``image_id`` (the index) and ``name``.

    Args:
        root: the Cityscapes folder (holding ``leftImg8bit/``, ``gtFine/``, ...).
        split: ``"train"``, ``"val"`` (or ``"test"``, whose public labels are empty).
        targets: which of ``"mask"`` and ``"depth"`` to load (their folders must exist).
        scale: resize factor in ``(0, 1]`` applied to every image.
        crop: a window of this size after scaling, int or ``(h, w)`` (``None``: whole image).
        train: random crops and optional flips (default: for the ``"train"`` split).
        hflip: flip half of the training images left-right.
        seed: seeds the crops and flips, with the epoch (:meth:`set_epoch`) and index.
    """

    seg_classes = list(CLASSES)
    classes = ["__background__", *CLASSES]  # no detection targets here; kept for uniformity
    ignore_index = IGNORE_INDEX

    def __init__(self, root: str | Path, split: str = "train", *,
                 targets: tuple[str, ...] | list[str] = TARGETS, scale: float = 1.0,
                 crop: int | tuple[int, int] | None = None, train: bool | None = None,
                 hflip: bool = False, seed: int = 0) -> None:
        self.root = Path(root)
        self.split = split
        self.targets = tuple(targets)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"Invalid Cityscapes target {unknown[0]!r}, should be one of "
                             f"{', '.join(TARGETS)}")
        self.scale = check_scale(scale)
        self.crop = None if crop is None else parse_patch_size(crop)
        self.train = (split == "train") if train is None else bool(train)
        self.hflip, self.seed, self.epoch = bool(hflip), seed, 0
        if not self.root.is_dir():
            raise DataError(f"Cityscapes folder not found: {self.root}")
        for folder in ["leftImg8bit"] + [_PARTS[t][0] for t in self.targets]:
            if not (self.root / folder / split).is_dir():
                raise DataError(f"Cityscapes folder not found: {self.root / folder / split}")
        image_dir = self.root / "leftImg8bit" / split
        self.images = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"))
        if not self.images:
            raise DataError(f"no */*{_IMAGE_SUFFIX} images in {image_dir}")
        for target in self.targets:  # up front: a gap is found before training, not hours in
            missing = [p for p in map(lambda im: self._part(im, target), self.images)
                       if not p.is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise DataError(f"Cityscapes {_PARTS[target][0]} file not found: "
                                f"{missing[0]}{more}")

    def _part(self, image: Path, target: str) -> Path:
        folder, suffix = _PARTS[target]
        stem = image.name[: -len(_IMAGE_SUFFIX)]
        return self.root / folder / self.split / image.parent.name / f"{stem}{suffix}"

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Draw the training crops and flips of epoch ``epoch``."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        path = self.images[index]
        arr = _read(path, rgb=True)
        h, w = arr.shape[:2]
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
                                 / np.float32(255.0))
        target: dict = {"image_id": index, "name": path.name[: -len(_IMAGE_SUFFIX)]}
        if "mask" in self.targets:
            target["mask"] = torch.from_numpy(
                label_ids_to_train_ids(self._plane(self._part(path, "mask"), (h, w))))
        if "depth" in self.targets:
            raw = self._plane(self._part(path, "depth"), (h, w))
            target["depth"] = torch.from_numpy(disparity_to_depth(raw, *self._camera(path)))
            target["disparity"] = torch.from_numpy(raw_to_disparity(raw))
        resize = None
        if self.scale != 1.0:
            resize = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        return fit_sample(image, target, resize=resize, crop=self.crop, rng=rng,
                          hflip=self.hflip)

    def _plane(self, path: Path, size: tuple[int, int]) -> np.ndarray:
        arr = _read(path)
        if arr.ndim != 2 or arr.shape != size:
            raise DataError(f"Cityscapes file {path} is {arr.shape[::-1]} (w, h), not a "
                            f"one-channel {size[1]}x{size[0]} image like its photograph")
        return arr

    def _camera(self, image: Path) -> tuple[float, float]:
        """``(baseline, fx)`` from the image's camera file, or the usual constants."""
        stem = image.name[: -len(_IMAGE_SUFFIX)]
        path = self.root / "camera" / self.split / image.parent.name / f"{stem}_camera.json"
        if not path.is_file():
            return BASELINE_M, FOCAL_PX
        try:
            with open(path, encoding="utf-8") as f:
                camera = json.load(f)
            return float(camera["extrinsic"]["baseline"]), float(camera["intrinsic"]["fx"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"Cityscapes camera file {path} is unusable: "
                            f"{type(err).__name__}: {err}") from None

    def describe(self) -> str:
        scale = f" at scale {self.scale:g}" if self.scale != 1.0 else ""
        crop = f", {self.crop[1]}x{self.crop[0]} crops" if self.crop else ""
        return (f"Cityscapes {self.split} at {self.root}: {len(self)} images{scale}, "
                f"{' + '.join(self.targets) or 'images only'}{crop}")


def _read(path: Path, *, rgb: bool = False) -> np.ndarray:
    """The pixels of ``path`` (RGB if ``rgb``, else as stored: 8- or 16-bit gray)."""
    try:
        with Image.open(path) as img:
            return np.asarray(to_rgb(img) if rgb else img)
    except (OSError, ValueError) as err:
        raise DataError(f"Cityscapes file {path} is missing or unreadable: {err}") from None
