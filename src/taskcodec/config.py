"""One typed, validated config object per entry point.

Every setting of a run lives in one dataclass. Each field carries its help text and its allowed
values in ``metadata``; from that single description come the validation, the Click options
(``taskcodec train --lmbda ...``), the MLflow params that are logged, and the copy stored in
every checkpoint. Unknown keys and out-of-range values are refused before any work starts, with
the name and the allowed range in the message.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from taskcodec.errors import ConfigError


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        min_exclusive: bool = False, choices: tuple[str, ...] | None = None,
        secret: bool = False) -> Any:
    """A config field with its help text and allowed values."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive,
            "choices": choices, "secret": secret}
    return field(default=default, metadata=meta)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Turn a value (often a string from the command line or MLflow) into the field's type."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean (use true or false)")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        try:
            as_float = float(str(value))
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{name}={value!r} is not an integer")
        return int(as_float)
    if kind is float:
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} is not a number") from None
        if not math.isfinite(result):
            raise ConfigError(f"{name}={value!r} is not a finite number")
        return result
    return "" if value is None else str(value)


class Config:
    """Mixin of the shared behaviour; subclasses are dataclasses."""

    entry_point: ClassVar[str] = ""

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        """All settings, the class's own first (so --help starts with what is specific)."""
        every = list(dataclasses.fields(cls))  # type: ignore[arg-type]
        own = cls.__dict__.get("__annotations__", {})
        return [f for f in every if f.name in own] + [f for f in every if f.name not in own]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        known = {f.name: f for f in cls.fields()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown {cls.entry_point} setting{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)} (known: {', '.join(sorted(known, key=str.lower))})")
        kwargs = {}
        for name, value in values.items():
            kind = _type_of(known[name])
            kwargs[name] = _coerce(name, value, kind)
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        for f in self.fields():
            value = getattr(self, f.name)
            kind = _type_of(f)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                value = _coerce(f.name, value, kind)
                setattr(self, f.name, value)
            meta = f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{f.name}={value!r} is not one of: "
                                  f"{', '.join(meta['choices'])}")
            low, high = meta.get("min"), meta.get("max")
            if low is not None and (value < low or (meta.get("min_exclusive") and value == low)):
                rel = ">" if meta.get("min_exclusive") else ">="
                bound = f"{rel} {low}" + (f" and <= {high}" if high is not None else "")
                raise ConfigError(f"{f.name}={value} is out of range: must be {bound}")
            if high is not None and value > high:
                raise ConfigError(f"{f.name}={value} is out of range: must be <= {high}")
        self.check()

    def check(self) -> None:
        """Cross-field checks of a subclass."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_params(self) -> dict[str, str]:
        """What is logged to MLflow: every setting except secrets, as strings."""
        return {f.name: str(getattr(self, f.name)) for f in self.fields()
                if not f.metadata.get("secret")}


def _type_of(f: dataclasses.Field) -> type:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool,
                                                    "str": str}[str(f.type)]
    return kind


CODEC_NAMES = ("bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean")


LOWER_IS_BETTER = ("val_loss", "val_bpp", "val_abs_rel", "val_rmse", "val_mse_loss",
                   "val_task_loss")


@dataclass
class LoopConfig(Config):
    """Settings every training entry point shares: the loop, its schedule, and the run."""

    monitors: ClassVar[tuple[str, ...]] = ("val_loss",)
    #: The settings that shape the model: --init-from takes them from its source checkpoint.
    architecture: ClassVar[tuple[str, ...]] = ()

    data: str = opt("embedded", "'embedded' (images shipped with scikit-image) or a folder/"
                    ".zip/.tar of images")
    patch_size: int = opt(256, "side of the random training crops (pixels)", min=16, max=4096)
    batch_size: int = opt(8, "training batch size", min=1, max=4096)
    epochs: int = opt(50, "maximum number of epochs", min=1, max=1_000_000)
    epoch_length: int = opt(0, "training samples per epoch (0: the data set's default)",
                            min=0, max=10_000_000)
    max_steps: int = opt(0, "stop after this many optimizer steps (0: no limit)", min=0)
    lr: float = opt(1e-4, "learning rate of the main optimizer (Adam)",
                    min=0, min_exclusive=True, max=1.0)
    aux_lr: float = opt(1e-3, "learning rate of the auxiliary (entropy bottleneck) optimizer",
                        min=0, min_exclusive=True, max=1.0)
    clip_max_norm: float = opt(1.0, "gradient clipping max norm (0: off)", min=0)
    lr_scheduler: str = opt("plateau", "learning-rate schedule",
                            choices=("plateau", "cosine", "none"))
    lr_patience: int = opt(5, "plateau schedule: epochs without improvement before lr /= 10",
                           min=0)
    early_stop_patience: int = opt(0, "stop after this many validations without improvement "
                                   "of the monitored metric (0: off)", min=0)
    monitor: str = opt("val_loss", "validation metric watched by early stopping, the plateau "
                       "schedule and the best checkpoint")
    val_every: int = opt(1, "validate every this many epochs", min=1)
    max_val_images: int = opt(0, "validate on at most this many images (0: all)", min=0)
    num_workers: int = opt(0, "data loader worker processes", min=0, max=64)
    seed: int = opt(0, "random seed", min=0)
    device: str = opt("auto", "auto (cuda when available), cpu or cuda",
                      choices=("auto", "cpu", "cuda"))
    log_every: int = opt(10, "log training losses every this many steps", min=1)
    checkpoint_every: int = opt(0, "also checkpoint every this many steps (0: once per epoch)",
                                min=0)
    init_from: str = opt("", "start from the weights of this MLflow run id or checkpoint path "
                         "(its architecture too: codec, N, M, ... unless given)")
    resume: str = opt("", "continue this MLflow run id from its last checkpoint "
                      "(also $TASKCODEC_RESUME_RUN_ID)")
    run_name: str = opt("", "MLflow run name (default: generated)")
    checkpoint_dir: str = opt("", "local folder for checkpoints (default: ./checkpoints/RUN_ID)")

    def check(self) -> None:
        if self.patch_size % 16:
            raise ConfigError(f"patch_size={self.patch_size} must be a multiple of 16 "
                              "(the codecs downsample by 16)")
        if self.monitor not in self.monitors:
            raise ConfigError(f"monitor={self.monitor!r} is not one of: "
                              f"{', '.join(self.monitors)}")


@dataclass
class TrainConfig(LoopConfig):
    """Settings of ``taskcodec train`` (and the MLflow entry point ``train``)."""

    entry_point: ClassVar[str] = "train"
    monitors: ClassVar[tuple[str, ...]] = ("val_loss", "val_bpp", "val_psnr", "val_ms_ssim")
    architecture: ClassVar[tuple[str, ...]] = ("codec", "N", "M")

    codec: str = opt("bmshj2018-factorized", "codec architecture from the registry",
                     choices=CODEC_NAMES)
    N: int = opt(128, "channels of the transforms (CompressAI's N)", min=1, max=1024)
    M: int = opt(192, "channels of the latent (CompressAI's M)", min=1, max=1024)
    lmbda: float = opt(0.0130, "rate-distortion trade-off: loss = bpp + lmbda * D",
                       min=0, min_exclusive=True, max=1e4)
    metric: str = opt("mse", "distortion D: mse (on the 255^2 scale) or ms-ssim (1 - MS-SSIM)",
                      choices=("mse", "ms-ssim"))
    max_side: int = opt(512, "downscale embedded images so the longer side is at most this",
                        min=64, max=8192)
    skip_bad: bool = opt(False, "skip unreadable or too-small images with a warning")

    def check(self) -> None:
        super().check()
        # The hyperprior downsamples the latent 4 more times: other crops fail mid-training.
        if self.codec != "bmshj2018-factorized" and self.patch_size % 64:
            raise ConfigError(f"patch_size={self.patch_size} must be a multiple of 64 for "
                              f"codec={self.codec} (its hyperprior downsamples by 64)")


TASK_MONITORS = ("auto", "val_loss", "val_bpp", "val_task_loss", "val_map", "val_map50", "val_miou",
                 "val_pixel_accuracy", "val_abs_rel", "val_rmse", "val_delta1", "val_accuracy",
                 "val_psnr")


@dataclass
class BaseConfig(LoopConfig):
    """Settings of ``taskcodec train-base``: a compressed representation for a machine task.

    loss = alpha * bpp_base + task loss + beta * reconstruction MSE (beta > 0: the
    task-compatible representation, which is also rewarded for keeping the input).
    """

    entry_point: ClassVar[str] = "train-base"
    monitors: ClassVar[tuple[str, ...]] = TASK_MONITORS
    architecture: ClassVar[tuple[str, ...]] = ("task", "entropy_model", "N", "M")

    data: str = opt("scenes", "'scenes' (procedural, embedded), coco:PATH or cityscapes:PATH")
    monitor: str = opt("auto", "validation metric for the best checkpoint and early stopping "
                       "(auto: the task's own: val_map, val_miou, val_abs_rel, val_accuracy "
                       "or val_psnr)")
    task: str = opt("detection", "machine task fed by the base latent",
                    choices=("detection", "segmentation", "depth", "classification",
                             "reconstruction"))
    entropy_model: str = opt("factorized", "entropy model of the base latent",
                             choices=("factorized", "hyperprior"))
    N: int = opt(64, "channels of the analysis transform", min=1, max=1024)
    M: int = opt(64, "channels of the base latent", min=1, max=1024)
    alpha: float = opt(0.1, "weight of the rate: loss = alpha * bpp + task loss + beta * D",
                       min=0)
    beta: float = opt(0.0, "weight of the input-reconstruction reward (0: plain task "
                      "representation; > 0: task-compatible)", min=0)
    image_size: int = opt(128, "side of the procedural scenes (data=scenes) or of the "
                          "training crops of COCO/Cityscapes", min=32, max=4096)

    def check(self) -> None:
        super().check()
        if self.image_size % 64:
            raise ConfigError(f"image_size={self.image_size} must be a multiple of 64")


@dataclass
class EnhancementConfig(LoopConfig):
    """Settings of ``taskcodec train-enhancement``: the layer an assisted target adds on top
    of a frozen base. loss = alpha * (bpp_base + bpp_enh) + distortion."""

    entry_point: ClassVar[str] = "train-enhancement"
    monitors: ClassVar[tuple[str, ...]] = ("val_loss", "val_bpp", "val_bpp_enh", "val_psnr",
                                           "val_ms_ssim", "val_miou")
    architecture: ClassVar[tuple[str, ...]] = ("method", "target", "N", "M",
                                               "condition_decoder")

    base_run: str = opt("", "MLflow run id (or checkpoint path) of the trained base layer")
    data: str = opt("scenes", "'scenes' (procedural, embedded), coco:PATH or cityscapes:PATH")
    method: str = opt("conditional", "how the enhancement uses the base: conditional "
                      "(entropy model and decoder conditioned on it), residual (codes the "
                      "input minus a prediction from it) or standalone (ignores it)",
                      choices=("conditional", "residual", "standalone"))
    target: str = opt("reconstruction", "what the enhancement serves",
                      choices=("reconstruction", "segmentation"))
    N: int = opt(64, "channels of the enhancement transforms", min=1, max=1024)
    M: int = opt(64, "channels of the enhancement latent", min=1, max=1024)
    alpha: float = opt(128.0, "weight of the rate: loss = alpha * (bpp_base + bpp_enh) + D, "
                       "with D = 255^2 * MSE (alpha = 1/lambda of CompressAI's convention: "
                       "64..512 spans its usual range) or the segmentation cross-entropy "
                       "(alpha around 0.05..1)", min=0, min_exclusive=True)
    condition_decoder: bool = opt(True, "conditional: also feed the base to the decoder")
    image_size: int = opt(128, "side of the procedural scenes / training crops", min=32,
                          max=4096)

    def check(self) -> None:
        super().check()
        if not self.base_run:
            raise ConfigError("base_run is required: the MLflow run id of a train-base run")
        if self.method == "residual" and self.target != "reconstruction":
            raise ConfigError("method=residual needs target=reconstruction "
                              "(use conditional for segmentation)")
        if self.image_size % 64:
            raise ConfigError(f"image_size={self.image_size} must be a multiple of 64")


@dataclass
class EvalConfig(Config):
    """Settings of ``taskcodec evaluate`` (and the MLflow entry point ``evaluate``)."""

    entry_point: ClassVar[str] = "evaluate"

    checkpoint: str = opt("", "MLflow run id whose checkpoint to evaluate, or a checkpoint path")
    which: str = opt("best", "which checkpoint of the run: best or last",
                     choices=("best", "last"))
    data: str = opt("", "data to evaluate on: 'embedded', 'scenes', a folder/.zip/.tar of "
                    "images, coco:PATH or cityscapes:PATH (default: what the checkpoint was "
                    "trained on)")
    split: str = opt("auto", "split to evaluate: auto (every image of a folder without "
                     "train/val/test subfolders, else its test/ or val/; val of embedded, "
                     "scenes, coco, cityscapes), train, val, test or all",
                     choices=("auto", "train", "val", "test", "all"))
    max_images: int = opt(0, "evaluate at most this many images (0: all)", min=0)
    max_side: int = opt(512, "downscale embedded images so the longer side is at most this",
                        min=64, max=8192)
    jpeg: bool = opt(True, "also measure JPEG (Pillow) at the nearest bpp as a reference")
    device: str = opt("cpu", "cpu or cuda (entropy coding runs on the CPU)",
                      choices=("cpu", "cuda"))
    run_name: str = opt("", "MLflow run name (default: generated)")

    def check(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint is required: an MLflow run id or a checkpoint path")
