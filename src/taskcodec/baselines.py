"""Classical codecs as reference points on RD plots: JPEG, WebP and AVIF through Pillow.

Each anchor is run as Pillow encodes it (``Image.save(..., format, quality=q, **settings)``),
with the fixed encoder settings of :data:`ANCHOR_CODECS` (JPEG as CompressAI's benchmark runs
it: Pillow's 4:2:0 chroma subsampling). Its rate is the size of the whole file, headers
included, the way a learned codec's rate is counted from its real bitstream; quality is
measured on the file decoded back by Pillow, against the original, with :mod:`taskcodec.metrics`.
"""

import functools
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import PIL
import torch
from PIL import Image
from torch import Tensor

from taskcodec.metrics import bpp_from_bytes, ms_ssim, psnr

ImageLike = Tensor | Image.Image


@dataclass(frozen=True)
class AnchorCodec:
    """How one classical codec is run: Pillow's format name, the qualities searched, and the
    encoder settings that stay fixed (logged with the results)."""

    name: str
    format: str
    qualities: range
    settings: Mapping[str, object]


#: JPEG: libjpeg accepts up to 100, but above 95 the files grow a lot for almost no gain, and
#: Pillow's documentation advises against it. WebP: method 6, libwebp's slowest and best
#: compression. AVIF: Pillow's default speed (6 of 0-10, 0 the slowest and best) on one thread,
#: so that the files do not depend on the machine's cores.
ANCHOR_CODECS = {
    "jpeg": AnchorCodec("jpeg", "JPEG", range(1, 96), {"subsampling": "4:2:0"}),
    "webp": AnchorCodec("webp", "WEBP", range(0, 101), {"method": 6, "lossless": False}),
    "avif": AnchorCodec("avif", "AVIF", range(0, 101),
                        {"speed": 6, "subsampling": "4:2:0", "max_threads": 1}),
}

#: Each anchor's name in :func:`PIL.features.check`.
_FEATURES = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}

#: Qualities :func:`jpeg_at_bpp` searches.
SEARCH_QUALITIES = ANCHOR_CODECS["jpeg"].qualities


def _codec(name: str) -> AnchorCodec:
    if name not in ANCHOR_CODECS:
        raise ValueError(f"Invalid anchor {name!r}, should be one of {', '.join(ANCHOR_CODECS)}")
    return ANCHOR_CODECS[name]


@functools.cache
def unavailable(name: str) -> str:
    """Why this Pillow cannot encode and decode the anchor ``name`` ("" when it can): a tiny
    image is coded once, so a library present without its encoder is found too."""
    from PIL import features

    codec = _codec(name)
    if not features.check(_FEATURES[name]):
        return f"this Pillow ({PIL.__version__}) was built without {codec.format} support"
    try:
        with Image.open(io.BytesIO(_encode(name, Image.new("RGB", (16, 16)), 50))) as image:
            image.load()
    except Exception as err:  # whatever the library raises: the anchor is skipped, with why
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"Pillow {PIL.__version__} cannot code {codec.format}: {why}"
    return ""


def anchor_settings(name: str) -> dict[str, str]:
    """The anchor's fixed encoder settings and library version, as logged with its results."""
    from PIL import features

    codec = _codec(name)
    settings = {k: str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in codec.settings.items()}
    library = f"lib{_FEATURES[name]} {features.version(_FEATURES[name])}"
    if name == "jpeg" and features.check_feature("libjpeg_turbo"):  # "jpg" is its API version
        library = f"libjpeg-turbo {features.version_feature('libjpeg_turbo')}"
    if name == "avif":  # libavif codes with whichever AV1 encoder it was built with
        from PIL import _avif

        library += f" ({_avif.codec_versions()})"
    return {**settings, "encoder": f"Pillow {PIL.__version__}, {library}"}


def anchor_at_bpp(name: str, image: ImageLike, target_bpp: float) -> dict:
    """Encode ``image`` with the anchor ``name`` at the quality whose real bpp is nearest
    ``target_bpp``.

    ``image`` is a ``[3, H, W]`` float tensor in ``[0, 1]`` or a PIL image. Returns
    ``{"quality", "bpp", "psnr", "ms_ssim"}``. A target outside what the codec reaches gives
    its lowest or highest quality.

    File size grows with quality except for small wiggles, so a binary search finds where
    the target falls and the two qualities on either side of it are then compared too;
    ties go to the lower quality (fewer bits).
    """
    codec = _codec(name)
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
            encoded[quality] = _encode(name, pil, quality)
        return bpp_from_bytes(len(encoded[quality]), height, width)

    # Smallest quality whose bpp reaches the target (or the top of the range).
    first, last = codec.qualities[0], codec.qualities[-1]
    lo, hi = first, last
    while lo < hi:
        mid = (lo + hi) // 2
        if bpp_at(mid) < target_bpp:
            lo = mid + 1
        else:
            hi = mid
    window = range(max(lo - 2, first), min(lo + 2, last) + 1)
    best = min(window, key=lambda q: (abs(bpp_at(q) - target_bpp), q))
    return _measure(original, encoded[best], best)


def jpeg_at_bpp(image: ImageLike, target_bpp: float) -> dict:
    """:func:`anchor_at_bpp` with JPEG (qualities 1-95)."""
    return anchor_at_bpp("jpeg", image, target_bpp)


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
            point = _measure(original, _encode("jpeg", pil, quality), quality)
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


def _encode(name: str, image: Image.Image, quality: int) -> bytes:
    codec = ANCHOR_CODECS[name]
    buffer = io.BytesIO()
    image.save(buffer, format=codec.format, quality=quality, **codec.settings)
    return buffer.getvalue()


def _measure(original: Tensor, data: bytes, quality: int) -> dict:
    with Image.open(io.BytesIO(data)) as decoded_image:
        decoded = _as_tensor(decoded_image)
    x, x_hat = original.unsqueeze(0), decoded.unsqueeze(0)
    height, width = original.shape[-2:]
    return {
        "quality": quality,
        "bpp": bpp_from_bytes(len(data), height, width),
        "psnr": psnr(x, x_hat),
        "ms_ssim": ms_ssim(x, x_hat),
    }
