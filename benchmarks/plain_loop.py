"""The loop a researcher writes by hand on CompressAI + torch, as CompressAI's
``examples/train.py`` trains: Adam on the transforms, a second Adam on the entropy
bottlenecks' quantiles (the aux loss), loss = lmbda * 255^2 * MSE + bpp, gradient clipping.

No taskcodec code runs in the step: the only thing borrowed is the data set object, so both
sides see the very same crops in the very same order (the DataLoader generator is seeded the
way taskcodec's engine seeds it).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from compressai.models import FactorizedPrior, ScaleHyperprior
from torch import nn
from torch.utils.data import DataLoader

MODELS = {"bmshj2018-factorized": FactorizedPrior, "bmshj2018-hyperprior": ScaleHyperprior}


@dataclass
class PlainResult:
    step_times: list[float] = field(default_factory=list)  # perf_counter at each step start
    losses: list[float] = field(default_factory=list)
    model: nn.Module | None = None


def rd_loss(out: dict, x: torch.Tensor, lmbda: float) -> dict[str, torch.Tensor]:
    n, _, h, w = x.shape
    bpp = sum(torch.log(v).sum() for v in out["likelihoods"].values()) / (-math.log(2) * n * h * w)
    mse = F.mse_loss(out["x_hat"], x)
    return {"bpp_loss": bpp, "mse_loss": mse, "loss": lmbda * 255**2 * mse + bpp}


def train_plain(codec: str, N: int, M: int, dataset, *, batch_size: int, steps: int, seed: int,
                lr: float = 1e-4, aux_lr: float = 1e-3, lmbda: float = 0.013,
                clip: float = 1.0, channels_last: bool = False,
                compile: bool = False, max_seconds: float = 0.0) -> PlainResult:
    """``compile``: run the forward through ``torch.compile`` (inductor); the first step then
    includes the compilation (see :func:`images_per_second`'s warm-up). ``max_seconds``: stop
    at the first step that would start after this much wall clock (0: no limit)."""
    random.seed(seed)
    torch.manual_seed(seed)
    model = MODELS[codec](N=N, M=M)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    optimizer, aux_optimizer = torch.optim.Adam(main, lr=lr), torch.optim.Adam(aux, lr=aux_lr)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed * 100_003))
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    result = PlainResult(model=model)
    model.train()
    forward = torch.compile(model) if compile else model
    start = time.perf_counter()
    for i, x in enumerate(loader):
        if i >= steps or (max_seconds and time.perf_counter() - start >= max_seconds):
            break
        result.step_times.append(time.perf_counter())
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        aux_optimizer.zero_grad(set_to_none=True)
        losses = rd_loss(forward(x), x, lmbda)
        losses["loss"].backward()
        if clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        aux_loss = model.aux_loss()
        aux_loss.backward()
        aux_optimizer.step()
        result.losses.append(float(losses["loss"].detach()))
    result.step_times.append(time.perf_counter())
    return result



def pad64(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``x`` to a multiple of 64 on both sides, centred as CompressAI's eval_model
    pads; returns the padded tensor and the (top, left) offsets of the image in it."""
    h, w = x.shape[-2:]
    eh, ew = -h % 64, -w % 64
    top, left = eh // 2, ew // 2
    return F.pad(x, (left, ew - left, top, eh - top)), (top, left)

def validate_plain(model: nn.Module, images, lmbda: float = 0.013) -> float:
    """Mean RD loss over whole images, zero-padded to a multiple of 64 as CompressAI's
    eval_model pads, the loss taken on the crop back to the image."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x in images:
            x = x.unsqueeze(0)
            h, w = x.shape[-2:]
            padded, (top, left) = pad64(x)
            out = model(padded)
            x_hat = out["x_hat"][..., top:top + h, left:left + w].clamp(0, 1)
            total += float(rd_loss({"x_hat": x_hat, "likelihoods": out["likelihoods"]}, x,
                                   lmbda)["loss"])
    model.train()
    return total / len(images)


def images_per_second(step_times: list[float], warmup: int, measured: int,
                      batch_size: int) -> float:
    """From step-start timestamps: ``measured`` steps after ``warmup`` steps."""
    if len(step_times) < warmup + measured + 1:
        raise ValueError(f"need {warmup + measured + 1} timestamps, got {len(step_times)}")
    return measured * batch_size / (step_times[warmup + measured] - step_times[warmup])
