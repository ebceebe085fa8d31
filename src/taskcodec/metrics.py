"""Image-quality and rate metrics: pure functions of tensors.

Images are float tensors in ``[0, 1]``, shaped ``NCHW``. The functions do not clamp: a
codec's ``x_hat`` may overshoot, and clamping it before measuring is the caller's choice
(CompressAI's evaluation clamps, so does :mod:`taskcodec.baselines`).

Batch metrics are *per-image averages*: PSNR and MS-SSIM are computed for each image and
then averaged, which is what RD papers report and what does not depend on how a data set
was cut into batches (the PSNR of a batch-mean MSE would).

Rates follow CompressAI: while training, bpp is estimated from the entropy models'
likelihoods; in evaluation, bpp is counted from the real bytes of the bitstream.
"""

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as _pytorch_ms_ssim
from torch import Tensor

#: Ceiling for PSNR and MS-SSIM in dB. Identical images would give +inf, which MLflow
#: cannot plot and which poisons every average it enters; 100 dB is far above anything a
#: lossy codec reaches on 8-bit images (lossless 8-bit rounding alone stays below 60 dB).
MAX_DB = 100.0

# Weights of the five scales from Wang, Simoncelli & Bovik, "Multiscale structural
# similarity for image quality assessment" (2003), as used by pytorch_msssim.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_MS_SSIM_WIN_SIZE = 11
_MS_SSIM_WIN_SIGMA = 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def _check_pair(x: Tensor, x_hat: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"Expected NCHW images, got a tensor of shape {tuple(x.shape)}")
    if x.shape != x_hat.shape:
        raise ValueError(
            f"Image shapes differ: x is {tuple(x.shape)}, x_hat is {tuple(x_hat.shape)}"
        )


def psnr_per_image(x: Tensor, x_hat: Tensor, max_val: float = 1.0) -> Tensor:
    """PSNR in dB of each image of the batch, shape ``[N]``, capped at :data:`MAX_DB`.

    The MSE is taken over all channels and pixels of one image (RGB PSNR, as CompressAI
    reports it), not per channel.
    """
    _check_pair(x, x_hat)
    if not max_val > 0:
        raise ValueError(f"Invalid max_val {max_val!r}, should be > 0")
    mse = (x.detach().double() - x_hat.detach().double()).pow(2).flatten(1).mean(dim=1)
    # mse == 0 gives +inf here, which the clamp turns into MAX_DB.
    psnr = 10 * torch.log10(max_val**2 / mse)
    return psnr.clamp(max=MAX_DB).float()


def psnr(x: Tensor, x_hat: Tensor, max_val: float = 1.0) -> float:
    """Mean over the batch of per-image PSNR in dB; identical images count as 100 dB."""
    return psnr_per_image(x, x_hat, max_val).mean().item()


def ms_ssim_levels(height: int, width: int) -> int:
    """How many MS-SSIM scales (at most 5) an image of this size supports.

    Each scale halves the image, and the 11-px Gaussian window must fit inside the last
    scale: ``min(height, width) > 10 * 2**(levels - 1)``. So 5 scales need more than
    160 px on the short side, 4 more than 80, 3 more than 40, 2 more than 20, 1 more
    than 10.
    """
    short = min(height, width)
    levels = len(_MS_SSIM_WEIGHTS)
    while levels > 0 and short <= (_MS_SSIM_WIN_SIZE - 1) * 2 ** (levels - 1):
        levels -= 1
    return levels


def ms_ssim_per_image(x: Tensor, x_hat: Tensor) -> Tensor:
    """MS-SSIM of each image of the batch (``data_range=1``), shape ``[N]``, differentiable.

    Images with more than 160 px on the short side get the standard 5-scale MS-SSIM of
    ``pytorch_msssim.ms_ssim``. Smaller images, which that function refuses, get MS-SSIM
    over the scales they support (see :func:`ms_ssim_levels`) with the first weights of
    the standard five renormalised to sum to one, and a warning says so: those values
    are comparable among images of the same size, not with 5-scale numbers from papers.
    Images of 10 px or less on a side have no scale at all and raise ``ValueError``.
    """
    _check_pair(x, x_hat)
    height, width = x.shape[-2:]
    levels = ms_ssim_levels(height, width)
    if levels == len(_MS_SSIM_WEIGHTS):
        return _pytorch_ms_ssim(x_hat, x, data_range=1.0, size_average=False)
    if levels == 0:
        raise ValueError(
            f"Images of {height}x{width} px are too small for MS-SSIM, "
            f"which needs more than {_MS_SSIM_WIN_SIZE - 1} px on each side"
        )
    warnings.warn(
        f"MS-SSIM on {height}x{width} px images uses {levels} of 5 scales "
        "(5 need more than 160 px on the short side); values are not comparable with 5-scale MS-SSIM",
        stacklevel=2,
    )
    return _ms_ssim_with_levels(x_hat, x, levels)


def ms_ssim(x: Tensor, x_hat: Tensor) -> float:
    """Mean over the batch of per-image MS-SSIM, in ``[0, 1]`` (1 for identical images)."""
    return ms_ssim_per_image(x, x_hat).mean().item()


def ms_ssim_db(value: float) -> float:
    """MS-SSIM in dB, ``-10 log10(1 - value)``, which spreads the crowded top of the scale.

    Capped at :data:`MAX_DB` like PSNR, so a perfect score of 1 gives 100 dB.
    """
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid MS-SSIM value {value!r}, should be in [0, 1]")
    if value >= 1.0:
        return MAX_DB
    return min(-10.0 * math.log10(1.0 - value), MAX_DB)


def bpp_from_likelihoods(likelihoods: Mapping[str, Tensor], num_pixels: int) -> Tensor:
    """Estimated bits per pixel: ``sum(-log2(p)) / num_pixels`` over every likelihood tensor.

    This is the rate term of CompressAI's ``RateDistortionLoss``; it stays differentiable.
    ``num_pixels`` is ``N * H * W`` of the batch, so the result is the mean bpp per image.
    """
    if not likelihoods:
        raise ValueError("No likelihoods given: the model's output has an empty 'likelihoods' dict")
    if num_pixels <= 0:
        raise ValueError(f"Invalid num_pixels {num_pixels!r}, should be > 0")
    return sum(_bits(p) for p in likelihoods.values()) / num_pixels


def bpp_per_likelihood(likelihoods: Mapping[str, Tensor], num_pixels: int) -> dict[str, float]:
    """The estimated bpp of each latent by name (for example ``{"y": 0.41, "z": 0.02}``)."""
    if num_pixels <= 0:
        raise ValueError(f"Invalid num_pixels {num_pixels!r}, should be > 0")
    return {name: (_bits(p) / num_pixels).item() for name, p in likelihoods.items()}


def bpp_from_bytes(num_bytes: int, height: int, width: int) -> float:
    """Real bits per pixel of a file of ``num_bytes`` that codes one ``height x width`` image."""
    if num_bytes < 0:
        raise ValueError(f"Invalid num_bytes {num_bytes!r}, should be >= 0")
    if height <= 0 or width <= 0:
        raise ValueError(f"Invalid image size {height}x{width}, both sides should be > 0")
    return 8.0 * num_bytes / (height * width)


def _bits(likelihoods: Tensor) -> Tensor:
    return torch.log(likelihoods).sum() / -math.log(2)


def _gaussian_window(channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(_MS_SSIM_WIN_SIZE, dtype=dtype, device=device) - _MS_SSIM_WIN_SIZE // 2
    g = torch.exp(-(coords**2) / (2 * _MS_SSIM_WIN_SIGMA**2))
    g = g / g.sum()
    return g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)


def _blur(x: Tensor, win: Tensor) -> Tensor:
    # Separable Gaussian, "valid" convolution (no padding), per channel.
    channels = x.shape[1]
    x = F.conv2d(x, win, groups=channels)
    return F.conv2d(x, win.transpose(2, 3), groups=channels)


def _ssim_and_cs(x: Tensor, y: Tensor, win: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel SSIM and contrast-structure term, each ``[N, C]``."""
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2  # data_range is 1
    mu_x, mu_y = _blur(x, win), _blur(y, win)
    var_x = _blur(x * x, win) - mu_x**2
    var_y = _blur(y * y, win) - mu_y**2
    cov = _blur(x * y, win) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def _ms_ssim_with_levels(x: Tensor, y: Tensor, levels: int) -> Tensor:
    """MS-SSIM over the first ``levels`` scales, weights renormalised; ``[N]``.

    With ``levels=5`` this agrees with ``pytorch_msssim.ms_ssim`` to about 1e-5 (the
    tests check it; the standard weights sum to 1.0001, these to exactly 1), so the
    small-image fallback differs from the standard only in the number of scales.
    """
    weights = torch.tensor(_MS_SSIM_WEIGHTS[:levels], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    win = _gaussian_window(x.shape[1], x.dtype, x.device)
    terms = []
    for level in range(levels):
        ssim, cs = _ssim_and_cs(x, y, win)
        if level < levels - 1:
            terms.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
    terms.append(torch.relu(ssim))
    stacked = torch.stack(terms, dim=0)  # [levels, N, C]
    per_channel = torch.prod(stacked ** weights.view(-1, 1, 1), dim=0)
    return per_channel.mean(dim=1)


# -- task metrics ---------------------------------------------------------------------------------
# Detection, segmentation and depth scores of the issue-4 task heads, with the usual
# definitions so that numbers can be set beside published ones: COCO's own evaluation code
# for mAP, the confusion-matrix mIoU of semantic segmentation benchmarks, and the depth
# errors of Eigen et al. (2014).


def detection_map(predictions: list[dict], targets: list[dict], num_classes: int) -> dict:
    """COCO mAP@[.5:.95] (``"map"``) and mAP@.5 (``"map50"``) of torchvision-style detections.

    ``predictions[i]`` (``boxes`` xyxy, ``labels``, ``scores``) and ``targets[i]`` (``boxes``,
    ``labels``) describe image ``i``. The ground truth becomes a COCO data set on the fly -
    one image per target, one annotation per box with its area taken from the box and
    ``iscrowd`` 0, categories ``1..num_classes-1`` (``num_classes`` counts the background 0,
    as torchvision's detectors do) - and pycocotools' ``COCOeval`` scores it, quietly. No
    detection at all scores 0.0; no ground-truth box at all gives ``nan`` and a warning.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"Got {len(predictions)} predictions for {len(targets)} targets, "
                         "should be one per image")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Invalid num_classes {num_classes!r}, should be an int >= 2 "
                         "(background included)")
    images, gt, dt = [], [], []
    for i, (pred, target) in enumerate(zip(predictions, targets), start=1):
        images.append({"id": i})
        for box, label in zip(*_boxes_labels(target, num_classes, "target")):
            gt.append({"id": len(gt) + 1, "image_id": i, "category_id": label, "bbox": box,
                       "area": box[2] * box[3], "iscrowd": 0})
        boxes, labels = _boxes_labels(pred, num_classes, "prediction")
        scores = pred["scores"].detach().flatten().tolist()
        if len(scores) != len(labels):
            raise ValueError(f"A prediction has {len(labels)} boxes but {len(scores)} scores")
        for box, label, score in zip(boxes, labels, scores):
            dt.append({"image_id": i, "category_id": label, "bbox": box, "score": score})
    if not gt:
        warnings.warn("detection_map: the targets hold no box, mAP is undefined (nan)",
                      stacklevel=2)
        return {"map": math.nan, "map50": math.nan}
    if not dt:
        return {"map": 0.0, "map50": 0.0}
    stats = _coco_bbox_stats(images, gt, dt, num_classes)
    return {"map": float(stats[0]), "map50": float(stats[1])}


def _boxes_labels(item: dict, num_classes: int, what: str) -> tuple[list, list]:
    """COCO ``xywh`` boxes and int labels of one prediction or target (checked)."""
    boxes = item["boxes"].detach().double().reshape(-1, 4)
    labels = item["labels"].detach().flatten().tolist()
    if len(labels) != len(boxes):
        raise ValueError(f"A {what} has {len(boxes)} boxes but {len(labels)} labels")
    bad = [label for label in labels if not 1 <= label < num_classes]
    if bad:
        raise ValueError(f"A {what} has label {bad[0]}, should be in 1..{num_classes - 1} "
                         f"(num_classes={num_classes} counts the background 0)")
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    return xywh.tolist(), [int(label) for label in labels]


def _coco_bbox_stats(images: list, gt: list, dt: list, num_classes: int) -> list[float]:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print as they go
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": gt,
                           "categories": [{"id": c, "name": str(c)} for c in range(1, num_classes)]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dt)
        evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return list(evaluation.stats)


class ConfusionMatrix:
    """Accumulates a semantic segmentation confusion matrix over a data set.

    ``matrix[t, p]`` counts pixels of true class ``t`` predicted as ``p``; pixels whose
    target is ``ignore_index`` are left out. :meth:`compute` gives the same scores as
    :func:`segmentation_scores`, for everything seen so far.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"Invalid num_classes {num_classes!r}, should be a positive int")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` integer class maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"Segmentation shapes differ: pred is {tuple(pred.shape)}, "
                             f"target is {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("Segmentation maps should hold class indices (take the argmax of "
                             "the logits first)")
        pred, target = pred.detach().cpu().flatten(), target.detach().cpu().flatten()
        valid = target != self.ignore_index
        pred, target = pred[valid].long(), target[valid].long()
        c = self.num_classes
        for name, values in (("target", target), ("pred", pred)):
            bad = values[(values < 0) | (values >= c)]
            if bad.numel():
                raise ValueError(f"Segmentation {name} holds class {int(bad[0])}, should be in "
                                 f"0..{c - 1} (or {self.ignore_index} in the target: ignored)")
        self.matrix += torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)

    def iou(self) -> Tensor:
        """IoU of each class (float64 ``[C]``), ``nan`` for classes never seen in target or
        prediction."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def compute(self) -> dict:
        """``"miou"`` over the classes present in target or prediction, ``"pixel_accuracy"``
        over non-ignored pixels; both ``nan`` when no pixel counted."""
        total = int(self.matrix.sum())
        if total == 0:
            return {"miou": math.nan, "pixel_accuracy": math.nan}
        iou = self.iou()
        return {"miou": float(iou[~iou.isnan()].mean()),
                "pixel_accuracy": float(self.matrix.diag().sum()) / total}


def segmentation_scores(pred: Tensor, target: Tensor, num_classes: int,
                        ignore_index: int = 255) -> dict:
    """Mean IoU (``"miou"``, over classes present in target or prediction) and
    ``"pixel_accuracy"`` of integer class maps ``[B, H, W]``, skipping ``ignore_index``."""
    matrix = ConfusionMatrix(num_classes, ignore_index)
    matrix.update(pred, target)
    return matrix.compute()


#: δ threshold of the depth accuracy ``"delta1"``: share of pixels with max(p/t, t/p) < 1.25.
DEPTH_DELTA = 1.25


def depth_errors(pred: Tensor, target: Tensor) -> dict:
    """Depth ``"abs_rel"`` (mean |p - t| / t), ``"rmse"`` and ``"delta1"`` (share of pixels with
    ``max(p/t, t/p) < 1.25``) over the valid pixels (``target > 0``) of the whole batch.

    ``pred`` may carry a channel of one (``[B, 1, H, W]`` for a ``[B, H, W]`` target). For
    the ratio of ``delta1`` non-positive predictions count as 1e-6. No valid pixel gives
    ``nan`` and a warning.
    """
    if pred.dim() == target.dim() + 1 and pred.shape[1] == 1:
        pred = pred.squeeze(1)
    if pred.shape != target.shape:
        raise ValueError(f"Depth shapes differ: pred is {tuple(pred.shape)}, target is "
                         f"{tuple(target.shape)}")
    pred, target = pred.detach().double(), target.detach().double()
    valid = target > 0
    if not bool(valid.any()):
        warnings.warn("depth_errors: the target has no valid pixel (all <= 0), errors are nan",
                      stacklevel=2)
        return {"abs_rel": math.nan, "rmse": math.nan, "delta1": math.nan}
    p, t = pred[valid], target[valid]
    ratio = torch.maximum(p.clamp(min=1e-6) / t, t / p.clamp(min=1e-6))
    return {"abs_rel": float(((p - t).abs() / t).mean()),
            "rmse": float((p - t).pow(2).mean().sqrt()),
            "delta1": float((ratio < DEPTH_DELTA).double().mean())}
