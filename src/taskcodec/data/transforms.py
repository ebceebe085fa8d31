"""Pixel plumbing shared by every data set: decode to RGB, downscale, crop, pad.

Images travel as float32 tensors of shape ``(3, H, W)`` with values in ``[0, 1]``, the
convention of CompressAI and torchvision's ``ToTensor``. Sizes in messages are written
``WIDTHxHEIGHT``, as image viewers and ``file`` print them; sizes in code are ``(h, w)``,
as tensors index them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Pads = tuple[int, int, int, int]  # (top, bottom, left, right)


def parse_patch_size(patch_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Return ``(h, w)`` from an int (a square) or a pair; ``ValueError`` otherwise."""
    if isinstance(patch_size, bool):
        raise ValueError(f"Invalid patch_size {patch_size!r}, should be an int or (h, w)")
    if isinstance(patch_size, int):
        size = (patch_size, patch_size)
    elif isinstance(patch_size, (tuple, list)) and len(patch_size) == 2:
        size = tuple(patch_size)
    else:
        raise ValueError(f"Invalid patch_size {patch_size!r}, should be an int or (h, w)")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"Invalid patch_size {patch_size!r}, sides should be positive ints")
    return size  # type: ignore[return-value]


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as 8-bit RGB, whatever its mode (gray, 16-bit gray, RGBA, palette, CMYK).

    Alpha is dropped, not composited, as CompressAI's ``convert("RGB")`` does: a codec is
    judged on the stored colour values. 16-bit gray is scaled down rather than clipped,
    which is what a plain ``convert`` would do to it.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # "I", "I;16", "I;16B", ...: integer gray, often 16-bit
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when a transparent palette goes straight to RGB
    return img.convert("RGB")


def downscale(img: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink ``img`` (Lanczos) so its longer side is ``max_side``; smaller images are kept.

    The longer side lands on ``max_side`` exactly and the shorter one is rounded, so the
    result depends only on the input size: the same file gives the same pixels everywhere.
    """
    if max_side is None:
        return img
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    if w >= h:
        size = (max_side, max(1, round(h * max_side / w)))
    else:
        size = (max(1, round(w * max_side / h)), max_side)
    return img.resize(size, Image.Resampling.LANCZOS)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor ``(3, H, W)`` (4x smaller to cache than float)."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(3, H, W)`` -> float32 in ``[0, 1]``; always a new tensor, never a cached one."""
    return x.to(torch.float32).div_(255.0)


def crop_box(
    height: int, width: int, size: tuple[int, int], rng: np.random.Generator
) -> tuple[int, int]:
    """Top-left corner of a uniformly random ``size`` crop inside a ``height x width`` image."""
    ph, pw = size
    assert height >= ph and width >= pw, "caller checks the image is large enough"
    top = int(rng.integers(0, height - ph + 1))
    left = int(rng.integers(0, width - pw + 1))
    return top, left


def pad_to_multiple(x: torch.Tensor, multiple: int = 64) -> tuple[torch.Tensor, Pads]:
    """Zero-pad ``x`` ``(B, C, H, W)`` so H and W are multiples of ``multiple``.

    The padding is split evenly around the image and is zeros, exactly what CompressAI's
    ``eval_model`` does (``compute_padding`` then ``F.pad(..., mode="constant", value=0)``),
    so bpp and PSNR match numbers reported with CompressAI. Returns the padded tensor and
    ``(top, bottom, left, right)`` for :func:`crop_padding`.
    """
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"Invalid multiple {multiple!r}, should be a positive int")
    if x.dim() != 4:
        raise ValueError(f"pad_to_multiple expects a (B, C, H, W) tensor, got shape "
                         f"{tuple(x.shape)}")
    h, w = x.shape[-2:]
    extra_h = -h % multiple
    extra_w = -w % multiple
    pads = (extra_h // 2, extra_h - extra_h // 2, extra_w // 2, extra_w - extra_w // 2)
    top, bottom, left, right = pads
    return F.pad(x, (left, right, top, bottom), mode="constant", value=0.0), pads


def crop_padding(x: torch.Tensor, pads: Pads) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: drop ``(top, bottom, left, right)`` pixels from the edges."""
    top, bottom, left, right = pads
    if min(pads) < 0:
        raise ValueError(f"Invalid pads {pads!r}, should be non-negative")
    h, w = x.shape[-2:]
    return x[..., top:h - bottom, left:w - right]
