"""COCO 2017 object detection (and semantic masks from its instance masks) from a local copy.

The layout is the official one::

    ROOT/annotations/instances_val2017.json      (and instances_train2017.json)
    ROOT/val2017/000000000139.jpg ...             (and train2017/)

Category ids (1..90 with gaps) become contiguous labels 1..K in id order, label 0 being the
background, as torchvision's detectors expect; :attr:`CocoDetection.label_to_category`
keeps the way back for writing COCO-style results (:meth:`CocoDetection.to_coco_results`).
Crowd annotations get no box (torchvision's references drop them too); in masks they are
255 (ignored). Boxes are converted from COCO's ``xywh`` to ``xyxy`` and clipped to the image.

Training needs fixed-size batches: ``min_side`` resizes the shorter side, then ``crop``
takes a random window (centred when ``train`` is false) - see :mod:`taskcodec.data.samples`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from taskcodec.data.samples import fit_sample, shorter_side_size
from taskcodec.data.transforms import parse_patch_size, to_rgb
from taskcodec.errors import DataError

IGNORE_INDEX = 255


def load_coco_api(ann_file: Path):
    """A ``pycocotools.coco.COCO`` of ``ann_file``, quietly; :class:`DataError` if unusable."""
    from pycocotools.coco import COCO

    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"COCO annotation file not found: {ann_file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"COCO annotation file {ann_file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"COCO annotation file {ann_file} holds a {type(data).__name__}, "
                        "not an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f'COCO annotation file {ann_file} has no "{key}" list')
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as err:
        raise DataError(f"COCO annotation file {ann_file} is malformed: missing {err}") from None
    return coco


class CocoDetection(Dataset):
    """COCO detection items ``(image, target)`` with ``boxes``, ``labels``, ``image_id``
    (COCO's id), ``orig_size`` and ``size`` (``(h, w)`` before and after resizing), and with
    ``masks=True`` also a semantic ``mask`` (0 background, 1..K, 255 crowd).

    Args:
        root: the COCO folder (holding ``annotations/`` and the image folders).
        split: ``"val2017"``, ``"train2017"`` or any ``instances_{split}.json`` present.
        ann_file: annotation file, default ``ROOT/annotations/instances_{split}.json``.
        masks: also rasterise the instance masks into a semantic ``mask``.
        skip_empty: leave out images without a usable (non-crowd) box.
        min_side: resize so the shorter side has this many pixels (``None``: keep).
        crop: then take a window of this size, an int or ``(h, w)`` (``None``: whole image).
        train: random crop and optional flip (default: when ``"train"`` is in ``split``).
        hflip: flip half of the training images left-right.
        seed: seeds the crops and flips, with the epoch (:meth:`set_epoch`) and index.
    """

    def __init__(self, root: str | Path, split: str = "val2017", ann_file: str | Path | None = None,
                 *, masks: bool = False, skip_empty: bool = False, min_side: int | None = None,
                 crop: int | tuple[int, int] | None = None, train: bool | None = None,
                 hflip: bool = False, seed: int = 0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"COCO folder not found: {self.root}")
        self.split = split
        self.ann_file = Path(ann_file) if ann_file is not None else (
            self.root / "annotations" / f"instances_{split}.json")
        if not self.ann_file.is_file():
            raise DataError(f"COCO annotation file not found: {self.ann_file} (expected "
                            f"annotations/instances_{split}.json under {self.root})")
        self.image_dir = self.root / split
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder not found: {self.image_dir}")
        if min_side is not None and (not isinstance(min_side, int) or min_side < 1):
            raise ValueError(f"Invalid min_side {min_side!r}, should be a positive int or None")
        self.min_side = min_side
        self.crop = None if crop is None else parse_patch_size(crop)
        self.train = ("train" in split) if train is None else bool(train)
        self.masks, self.hflip, self.seed, self.epoch = bool(masks), bool(hflip), seed, 0

        self.coco = load_coco_api(self.ann_file)
        categories = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.category_to_label = {c["id"]: i + 1 for i, c in enumerate(categories)}
        self.label_to_category = {v: k for k, v in self.category_to_label.items()}
        names = [str(c.get("name", c["id"])) for c in categories]
        self.classes = ["__background__", *names]
        self.seg_classes = ["background", *names]
        self.ids = sorted(self.coco.imgs)
        if skip_empty:
            self.ids = [i for i in self.ids if len(self._boxes(i)[0])]
        if not self.ids:
            raise DataError(f"COCO annotation file {self.ann_file} lists no usable images")

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Draw the training crops and flips of epoch ``epoch``."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as img:
                arr = np.asarray(to_rgb(img), dtype=np.uint8)
        except (OSError, ValueError) as err:
            raise DataError(f"COCO image {path} is missing or unreadable: {err}") from None
        h, w = arr.shape[:2]
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
                                 / np.float32(255.0))
        boxes, labels = self._boxes(image_id, (h, w))
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                  "image_id": int(image_id), "orig_size": (h, w)}
        if self.masks:
            target["mask"] = torch.from_numpy(self._mask(image_id, h, w))
        resize = None if self.min_side is None else shorter_side_size(h, w, self.min_side)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        image, target = fit_sample(image, target, resize=resize, crop=self.crop, rng=rng,
                                   hflip=self.hflip)
        target["size"] = tuple(image.shape[-2:])
        return image, target

    def _boxes(self, image_id: int, size: tuple[int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Non-crowd boxes of an image as xyxy (clipped to ``size`` if given) and labels."""
        info = self.coco.imgs[image_id]
        h, w = size or (info.get("height", np.inf), info.get("width", np.inf))
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0) or "bbox" not in ann:
                continue
            x, y, bw, bh = ann["bbox"]
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + bw, w), min(y + bh, h)
            if x2 > x1 and y2 > y1:
                boxes.append((x1, y1, x2, y2))
                labels.append(self.category_to_label[ann["category_id"]])
        return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64))

    def _mask(self, image_id: int, h: int, w: int) -> np.ndarray:
        """Semantic mask: crowd regions ignored, then instances largest first so that small
        objects lying on big ones stay visible."""
        mask = np.zeros((h, w), dtype=np.int64)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if "segmentation" in a]
        for ann in [a for a in anns if a.get("iscrowd", 0)]:
            mask[self._ann_mask(ann, h, w)] = IGNORE_INDEX
        regular = [a for a in anns if not a.get("iscrowd", 0)]
        for ann in sorted(regular, key=lambda a: -float(a.get("area", 0.0))):
            mask[self._ann_mask(ann, h, w)] = self.category_to_label[ann["category_id"]]
        return mask

    def _ann_mask(self, ann: dict, h: int, w: int) -> np.ndarray:
        # annToMask reads the image size from the annotation file; check it matches the file.
        try:
            m = self.coco.annToMask(ann)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise DataError(f"COCO annotation {ann.get('id')} in {self.ann_file} has an unusable "
                            f"segmentation ({type(err).__name__}: {err})") from None
        if m.shape != (h, w):
            raise DataError(f"COCO annotation {ann.get('id')} in {self.ann_file} is for a "
                            f"{m.shape[1]}x{m.shape[0]} image, but the image file is {w}x{h}")
        return m.astype(bool)

    def to_coco_results(self, predictions: list[dict], targets: list[dict]) -> list[dict]:
        """COCO-style detection results (``image_id``, ``category_id``, ``bbox`` xywh in the
        original image's pixels, ``score``) for predictions on un-cropped items."""
        results = []
        for pred, target in zip(predictions, targets, strict=True):
            (oh, ow), (h, w) = target["orig_size"], target.get("size", target["orig_size"])
            scale = torch.tensor([ow / w, oh / h, ow / w, oh / h])
            boxes = pred["boxes"].detach().cpu().float() * scale
            for box, label, score in zip(boxes.tolist(), pred["labels"].tolist(),
                                         pred["scores"].tolist()):
                x1, y1, x2, y2 = box
                results.append({"image_id": int(target["image_id"]),
                                "category_id": self.label_to_category[int(label)],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
        return results

    def describe(self) -> str:
        what = "boxes and masks" if self.masks else "boxes"
        crop = f", {self.crop[1]}x{self.crop[0]} crops" if self.crop else ""
        return (f"COCO {self.split} at {self.root}: {len(self)} images, {len(self.classes) - 1} "
                f"classes, {what}{crop}")
