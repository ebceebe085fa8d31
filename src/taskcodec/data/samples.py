"""Batching and geometric transforms of multi-task samples ``(image, target)``.

A target holds any of ``boxes`` (xyxy pixels), ``labels``, ``mask`` (255 = ignore),
``depth`` (0 = invalid), ``label`` and ``image_id`` (see ``/tmp/spec/scalable.md``). The
transforms move every spatial part together, so boxes, masks and depth stay aligned with
the pixels: images are resized bilinearly (antialiased), masks and depth by nearest
neighbour (a label or a depth is never blended with its neighbour's).

Training on COCO or Cityscapes follows the usual recipe, kept simple: resize (shorter side
or a scale factor), then a random crop of a fixed size so images stack into a batch
(padding with zeros, mask 255 and depth 0 where an image is smaller than the crop), then an
optional left-right flip. Validation skips the crop and flip and uses batch size 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: A box cut by a crop keeps its label only if this much of its area is left, the same
#: rule as the procedural scenes' occlusion limit.
MIN_BOX_FRACTION = 0.3
IGNORE_INDEX = 255


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """``[(image, target), ...]`` -> ``(images [B, 3, H, W], [target, ...])``.

    Images must share a size: use a training crop, or batch size 1 for whole images.
    """
    if not batch:
        raise ValueError("Cannot collate an empty batch")
    images = [item[0] for item in batch]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        sizes = ", ".join(sorted(f"{s[-1]}x{s[-2]}" for s in shapes))
        raise ValueError(f"Cannot batch images of different sizes ({sizes}): use a fixed "
                         "training crop or batch size 1")
    return torch.stack(images), [item[1] for item in batch]


def resize_sample(image: torch.Tensor, target: dict, size: tuple[int, int]
                  ) -> tuple[torch.Tensor, dict]:
    """Resize a float ``(3, H, W)`` image and its target to ``size`` ``(h, w)``."""
    h0, w0 = image.shape[-2:]
    h, w = size
    if (h, w) == (h0, w0):
        return image, target
    image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp_(0.0, 1.0)
    out = dict(target)
    if "boxes" in out:
        scale = torch.tensor([w / w0, h / h0, w / w0, h / h0], dtype=torch.float32)
        out["boxes"] = out["boxes"] * scale
    for key in ("mask", "depth", "disparity"):
        if key in out:
            plane = out[key]
            resized = F.interpolate(plane[None, None].double(), size=(h, w), mode="nearest-exact")
            out[key] = resized[0, 0].to(plane.dtype)
    return image, out


def shorter_side_size(height: int, width: int, side: int) -> tuple[int, int]:
    """``(h, w)`` with the shorter side equal to ``side`` and the aspect ratio kept."""
    if height <= width:
        return side, max(1, round(width * side / height))
    return max(1, round(height * side / width)), side


def crop_sample(image: torch.Tensor, target: dict, top: int, left: int,
                size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """The ``size`` window at ``(top, left)``; parts outside the image are padding.

    Boxes are clipped to the window; a box keeps its place only if at least
    :data:`MIN_BOX_FRACTION` of its area (and 1 px on each side) is inside.
    """
    h, w = size
    out = dict(target)
    image = _window(image, top, left, h, w, 0.0)
    if "mask" in out:
        out["mask"] = _window(out["mask"], top, left, h, w, IGNORE_INDEX)
    for key in ("depth", "disparity"):
        if key in out:
            out[key] = _window(out[key], top, left, h, w, 0.0)
    if "boxes" in out:
        boxes = out["boxes"]
        shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
        clipped = torch.stack([shifted[:, 0].clamp(0, w), shifted[:, 1].clamp(0, h),
                               shifted[:, 2].clamp(0, w), shifted[:, 3].clamp(0, h)], dim=1)
        keep = (_area(clipped) >= MIN_BOX_FRACTION * _area(shifted)) & \
               (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1)
        out["boxes"] = clipped[keep]
        for key in ("labels", "iscrowd", "area"):
            if key in out:
                out[key] = out[key][keep]
    return image, out


def hflip_sample(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror left-right."""
    w = image.shape[-1]
    out = dict(target)
    for key in ("mask", "depth", "disparity"):
        if key in out:
            out[key] = out[key].flip(-1)
    if "boxes" in out:
        boxes = out["boxes"]
        out["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]],
                                   dim=1)
    return image.flip(-1), out


def fit_sample(image: torch.Tensor, target: dict, *, resize: tuple[int, int] | None = None,
               crop: tuple[int, int] | None = None, rng: np.random.Generator | None = None,
               hflip: bool = False) -> tuple[torch.Tensor, dict]:
    """Resize to ``resize``, then crop ``crop`` (random with ``rng``, else centred), then flip
    half of the images if ``hflip`` and ``rng`` are given."""
    if resize is not None:
        image, target = resize_sample(image, target, resize)
    if crop is not None:
        h, w = image.shape[-2:]
        ch, cw = crop
        if rng is None:
            top, left = (h - ch) // 2, (w - cw) // 2
        else:
            top = int(rng.integers(0, max(h - ch, 0) + 1)) if h >= ch else (h - ch) // 2
            left = int(rng.integers(0, max(w - cw, 0) + 1)) if w >= cw else (w - cw) // 2
        image, target = crop_sample(image, target, top, left, crop)
    if hflip and rng is not None and rng.random() < 0.5:
        image, target = hflip_sample(image, target)
    return image, target


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _window(x: torch.Tensor, top: int, left: int, h: int, w: int, fill: float) -> torch.Tensor:
    """``x[..., top:top+h, left:left+w]``, padded with ``fill`` where it leaves ``x``."""
    H, W = x.shape[-2:]
    out = torch.full((*x.shape[:-2], h, w), fill, dtype=x.dtype)
    y0, y1 = max(top, 0), min(top + h, H)
    x0, x1 = max(left, 0), min(left + w, W)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top:y1 - top, x0 - left:x1 - left] = x[..., y0:y1, x0:x1]
    return out
