"""Speed switches of the training loop: torch.compile, channels_last, mixed precision, TF32.

None of them changes what is trained. Mixed precision runs the transforms under autocast but
keeps every entropy model (its CDF, its likelihoods, hence the rate) in float32, so the bpp a
run reports under ``bf16``/``fp16`` is the rate it would report in float32 (see
:func:`keep_entropy_models_fp32`).

Defaults are chosen by what pays off (BENCHMARKS.md 1b): channels_last is on (1.06x on this
2-core CPU, neutral to positive on GPUs); precision ``auto`` is bf16 on a CUDA device that
supports it and float32 on the CPU (bf16 brought no gain here); TF32 is on (a no-op without
an Ampere-or-newer GPU). ``compile=auto`` compiles on a GPU, and on the CPU only for runs long
enough to repay the trace: the trace of a small codec takes minutes on 2 cores, so a 10-minute
run would lose more than the 1.18x gains (and every test would pay it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

import torch
from torch import nn

log = logging.getLogger(__name__)

#: compile=auto on a CPU: compile only runs planned for at least this many steps or minutes.
AUTO_COMPILE_STEPS = 5000
AUTO_COMPILE_MINUTES = 30.0
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def has_cxx_compiler() -> bool:
    """torch.compile's CPU backend (inductor) builds C++: it needs a compiler on PATH."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def use_compile(setting: str, device: torch.device, planned_steps: int,
                planned_minutes: float) -> bool:
    """Whether ``compile=setting`` ("auto", "true", "false") compiles this run."""
    if setting == "false":
        return False
    if setting == "true":
        if device.type == "cpu" and not has_cxx_compiler():
            raise ValueError("compile=true on the CPU needs a C++ compiler (g++ or clang++) "
                             "on PATH; install one or use compile=false")
        return True
    if device.type == "cuda":
        return True
    long_run = planned_steps >= AUTO_COMPILE_STEPS or planned_minutes >= AUTO_COMPILE_MINUTES
    return long_run and has_cxx_compiler()


def compile_module(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` with the backend of $TASKCODEC_COMPILE_BACKEND (default
    inductor; ``aot_eager`` traces the same graphs without generating code, for tests)."""
    return torch.compile(module, backend=os.environ.get("TASKCODEC_COMPILE_BACKEND", "inductor"))


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CUDA device that supports it, fp32 otherwise."""
    if setting != "auto":
        if setting == "fp16" and device.type != "cuda":
            raise ValueError("precision=fp16 needs a CUDA device (the CPU has no fp16 "
                             "autocast worth using); use bf16 or fp32")
        return setting
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 matmuls and convolutions on GPUs that have them (nothing happens on a CPU)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def _entropy_model_types() -> tuple[type, ...]:
    from compressai.entropy_models import EntropyModel

    return (EntropyModel,)


def _fp32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def keep_entropy_models_fp32(model: nn.Module) -> nn.Module:
    """Run every entropy model of ``model`` in float32 even inside autocast.

    The rate is ``-log2`` of likelihoods that are differences of CDF values; in bf16 those
    differences lose most of their digits and the bpp drifts. Each entropy model's forward
    gets its inputs as float32 and runs with autocast off. Idempotent; returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, _entropy_model_types()) and not getattr(module, "_fp32_forward",
                                                                      False):
            module.forward = _fp32_forward(module.forward)
            module._fp32_forward = True
    return model


def _fp32_forward(forward):
    def wrapped(*args, **kwargs):
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device_type, enabled=False):
            return forward(*(_fp32(a) for a in args),
                           **{k: _fp32(v) for k, v in kwargs.items()})

    return wrapped


#: Codecs trained in the default memory layout whatever --channels-last says: torch's CPU
#: backward of CompressAI's cheng2020 models in channels_last hung or crashed ("double free or
#: corruption") in three of four runs here (torch 2.14.1); mbt2018 is not affected.
CHANNELS_FIRST_CODECS = ("cheng2020-anchor", "cheng2020-attn")


def channels_last_for(config) -> bool:
    """Whether a training of ``config`` runs in channels_last (off, with a warning, for the
    :data:`CHANNELS_FIRST_CODECS`)."""
    codec = getattr(config, "codec", "")
    if config.channels_last and codec in CHANNELS_FIRST_CODECS:
        log.warning("channels_last is off for codec=%s: torch's backward of this model hangs "
                    "or crashes in channels_last on a CPU", codec)
        return False
    return bool(config.channels_last)


def channels_last(batch):
    """A 4-D image batch (or the 4-D tensors of a tuple/list batch) in channels_last layout."""
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(channels_last(b) if isinstance(b, torch.Tensor) else b for b in batch)
    return batch
