"""Classical codecs as reference points on RD plots: JPEG through Pillow's libjpeg.

JPEG is run as CompressAI's benchmark runs it (``Image.save(..., "jpeg", quality=q)``,
Pillow's default 4:2:0 chroma subsampling), and its rate is the size of the whole file,
headers included, the way a learned codec's rate is counted from its real bitstream.
Quality is measured against the original image with :mod:`taskcodec.metrics`.
"""

import io
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from taskcodec.metrics import bpp_from_bytes, ms_ssim, psnr

#: Qualities :func:`jpeg_at_bpp` searches. libjpeg accepts up to 100, but above 95 the
#: files grow a lot for almost no gain, and Pillow's documentation advises against it.
SEARCH_QUALITIES = range(1, 96)

ImageLike = Tensor | Image.Image


def jpeg_at_bpp(image: ImageLike, target_bpp: float) -> dict:
    """Encode ``image`` as JPEG at the quality whose real bpp is nearest ``target_bpp``.

    ``image`` is a ``[3, H, W]`` float tensor in ``[0, 1]`` or a PIL image. Returns
    ``{"quality", "bpp", "psnr", "ms_ssim"}``. A target outside what JPEG reaches gives
    quality 1 or 95.

    File size grows with quality except for small wiggles, so a binary search finds where
    the target falls and the two qualities on either side of it are then compared too;
    ties go to the lower quality (fewer bits).
    """
    if isinstance(target_bpp, bool) or not (
        isinstance(target_bpp, (int, float)) and math.isfinite(target_bpp) and target_bpp > 0
    ):
        raise ValueError(f"Invalid target_bpp {target_bpp!r}, should be a number > 0")
    original = _as_tensor(image)
    pil = _as_pil(original)
    height, width = original.shape[-2:]
    encoded: dict[int, bytes] = {}

    def bpp_at(quality: int) -> float:
        if quality not in encoded:
            encoded[quality] = _encode(pil, quality)
        return bpp_from_bytes(len(encoded[quality]), height, width)

    # Smallest quality whose bpp reaches the target (or the top of the range).
    lo, hi = SEARCH_QUALITIES[0], SEARCH_QUALITIES[-1]
    while lo < hi:
        mid = (lo + hi) // 2
        if bpp_at(mid) < target_bpp:
            lo = mid + 1
        else:
            hi = mid
    window = range(max(lo - 2, SEARCH_QUALITIES[0]), min(lo + 2, SEARCH_QUALITIES[-1]) + 1)
    best = min(window, key=lambda q: (abs(bpp_at(q) - target_bpp), q))
    return _measure(original, encoded[best], best)


def jpeg_curve(images: Iterable[ImageLike], qualities: Sequence[int]) -> list[dict]:
    """Mean ``bpp``, ``psnr`` and ``ms_ssim`` over ``images`` at each JPEG quality.

    One dict per quality, in the order given: ``{"quality", "bpp", "psnr", "ms_ssim"}``.
    Means are over images (per-image PSNR averaged, as :func:`taskcodec.metrics.psnr`).
    """
    qualities = list(qualities)
    if not qualities:
        raise ValueError("No JPEG qualities given")
    for quality in qualities:
        _check_quality(quality)
    sums = {q: {"bpp": 0.0, "psnr": 0.0, "ms_ssim": 0.0} for q in qualities}
    count = 0
    for image in images:
        original = _as_tensor(image)
        pil = _as_pil(original)
        for quality in qualities:
            point = _measure(original, _encode(pil, quality), quality)
            for key in sums[quality]:
                sums[quality][key] += point[key]
        count += 1
    if count == 0:
        raise ValueError("No images given for the JPEG curve")
    return [
        {"quality": q, **{key: total / count for key, total in sums[q].items()}}
        for q in qualities
    ]


def _check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"Invalid JPEG quality {quality!r}, should be an integer in [1, 100]")


def _as_tensor(image: ImageLike) -> Tensor:
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"Expected a [3, H, W] image tensor or a PIL image, got {shape}")
    return image.detach().float().cpu()


def _as_pil(image: Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _encode(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _measure(original: Tensor, data: bytes, quality: int) -> dict:
    decoded = _as_tensor(Image.open(io.BytesIO(data)))
    x, x_hat = original.unsqueeze(0), decoded.unsqueeze(0)
    height, width = original.shape[-2:]
    return {
        "quality": quality,
        "bpp": bpp_from_bytes(len(data), height, width),
        "psnr": psnr(x, x_hat),
        "ms_ssim": ms_ssim(x, x_hat),
    }
