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
    #: Named presets (``recipe=NAME``): settings applied beneath the ones given explicitly.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        """All settings, the class's own first (so --help starts with what is specific)."""
        every = list(dataclasses.fields(cls))  # type: ignore[arg-type]
        own = cls.__dict__.get("__annotations__", {})
        return [f for f in every if f.name in own] + [f for f in every if f.name not in own]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        known = {f.name: f for f in cls.fields()}
        preset = cls.presets.get(str(values.get("recipe", "")))
        if preset:  # explicit settings win over the preset's
            values = {**preset, **values}
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

    def derived(self) -> set[str]:
        """Settings this config sets from its others (not given, so never in conflict)."""
        return set()

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


CODEC_NAMES = ("bmshj2018-factorized", "bmshj2018-factorized-relu", "bmshj2018-hyperprior",
               "mbt2018-mean", "mbt2018", "cheng2020-anchor", "cheng2020-attn")
#: Codecs without a hyperprior: they downsample by 16 only.
FACTORIZED_CODECS = ("bmshj2018-factorized", "bmshj2018-factorized-relu")
#: Codecs whose one size parameter is N (their latent has N channels; CompressAI's cheng2020).
N_ONLY_CODECS = ("cheng2020-anchor", "cheng2020-attn")
#: The classical codecs (Pillow: taskcodec.baselines) evaluate measures beside a learned one and
#: compare draws as curves: name -> label.
ANCHORS = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}


def parse_anchors(text: str, where: str) -> tuple[str, ...]:
    """Anchor names from a comma list (empty or ``none``: none), in order, each once;
    ``where`` starts the error message (``--anchors 'png'``)."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    if names == ["none"]:
        return ()
    for name in names:
        if name not in ANCHORS:
            raise ConfigError(f"{where}: {name!r} is not an anchor (choose from "
                              f"{', '.join(ANCHORS)}, or none)")
    return tuple(dict.fromkeys(names))


#: How much the codecs downsample in all (the hyperprior's 64): inputs are padded to, and
#: training crops are, a multiple of this.
PAD_MULTIPLE = 64
#: Variable-rate codecs (one model, several rate points; see taskcodec.codecs.single) and
#: their number of rate points (CompressAI's vbr models have 8 quantisation gains).
VBR_CODEC_NAMES = ("bmshj2018-hyperprior-vbr", "mbt2018-mean-vbr", "mbt2018-vbr")
VBR_LEVELS = 8
CODEC_NAMES += VBR_CODEC_NAMES

# Metrics where a smaller value is the better one, named with or without "val_": rates, losses,
# depth errors, distances, perceptual losses. Everything else (PSNR, mAP, mIoU, ...) is higher.
LOWER_IS_BETTER = frozenset({"loss", "bpp", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10",
                             "silog", "mae", "mse", "lpips", "dists", "fid", "error", "wer", "cer"})
_LOWER_AFFIXES = ("_loss", "_error", "_rmse", "_mae", "_mse", "_abs_rel", "_lpips")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (the one rule for monitors, early
    stopping, task heads and RD curves)."""
    key = metric.lower().removeprefix("val_")
    return not (key in LOWER_IS_BETTER or key.endswith(_LOWER_AFFIXES) or key.startswith("bpp"))


@dataclass
class LoopConfig(Config):
    """Settings every training entry point shares: the loop, its schedule, and the run."""

    monitors: ClassVar[tuple[str, ...]] = ("val_loss",)
    #: The settings that shape the model: --init-from takes them from its source checkpoint.
    architecture: ClassVar[tuple[str, ...]] = ()
    fits_weights: ClassVar[dict[str, frozenset]] = {}

    data: str = opt("embedded", "'embedded' (images shipped with scikit-image) or a folder/"
                    ".zip/.tar of images")
    patch_size: int = opt(256, "side of the random training crops (pixels)", min=16, max=4096)
    batch_size: int = opt(8, "training batch size", min=1, max=4096)
    epochs: int = opt(50, "maximum number of epochs", min=1, max=1_000_000)
    epoch_length: int = opt(0, "training samples per epoch (0: the data set's default)",
                            min=0, max=10_000_000)
    max_steps: int = opt(0, "stop after this many optimizer steps (0: no limit)", min=0)
    max_minutes: float = opt(0.0, "stop after this many minutes of training, validation "
                             "excluded (0: no limit)", min=0)
    lr: float = opt(1e-4, "learning rate of the main optimizer (Adam)",
                    min=0, min_exclusive=True, max=1.0)
    aux_lr: float = opt(1e-3, "learning rate of the auxiliary (entropy bottleneck) optimizer",
                        min=0, min_exclusive=True, max=1.0)
    clip_max_norm: float = opt(1.0, "gradient clipping max norm (0: off)", min=0)
    lr_scheduler: str = opt("plateau", "learning-rate schedule (warmup-cosine: linear warm-up "
                            "over warmup_steps, then cosine to lr/10 at the end of the budget: "
                            "max_steps, max_minutes or epochs)",
                            choices=("plateau", "cosine", "warmup-cosine", "none"))
    warmup_steps: int = opt(0, "warmup-cosine schedule: steps of linear learning-rate warm-up",
                            min=0)
    lr_patience: int = opt(5, "plateau schedule: epochs without improvement before lr /= 10",
                           min=0)
    early_stop_patience: int = opt(0, "stop after this many validations without improvement "
                                   "of the monitored metric (0: off)", min=0)
    monitor: str = opt("val_loss", "validation metric watched by early stopping, the plateau "
                       "schedule and the best checkpoint")
    val_every: int = opt(1, "validate every this many epochs", min=1)
    max_val_images: int = opt(0, "validate on at most this many images (0: all)", min=0)
    num_workers: int = opt(0, "data loader worker processes", min=0, max=64)
    seed: int = opt(0, "seeds the model's initialisation and the training order (crops, "
                    "flips, shuffling); replicates differ in it", min=0)
    data_seed: int = opt(0, "seeds the procedural scenes (training and validation sets), so "
                         "runs of different --seed see the same data", min=0)
    device: str = opt("auto", "auto (cuda when available), cpu or cuda",
                      choices=("auto", "cpu", "cuda"))
    log_every: int = opt(10, "log training losses every this many steps", min=1)
    checkpoint_every: int = opt(0, "also checkpoint every this many steps (0: once per epoch)",
                                min=0)
    init_from: str = opt("", "start from the weights of this MLflow run id, registered model "
                         "(models:/NAME@ALIAS) or checkpoint path "
                         "(its architecture too: codec, N, M, ... unless given)")
    resume: str = opt("", "continue this MLflow run id from its last checkpoint "
                      "(also $TASKCODEC_RESUME_RUN_ID)")
    run_name: str = opt("", "MLflow run name (default: generated)")
    checkpoint_dir: str = opt("", "local folder for checkpoints (default: ./checkpoints/RUN_ID)")
    compile: str = opt("auto", "torch.compile the training forward (auto: on a GPU, and on the "
                       "CPU for runs of >= 5000 steps or 30 minutes, which repay the trace)",
                       choices=("auto", "true", "false"))
    channels_last: bool = opt(True, "channels_last memory layout for the model and batches")
    precision: str = opt("auto", "autocast precision of the transforms (entropy models stay "
                         "fp32); auto: bf16 on a GPU that has it, else fp32",
                         choices=("auto", "fp32", "bf16", "fp16"))
    tf32: bool = opt(True, "TF32 matmuls/convolutions on GPUs that have them (no-op on CPU)")
    register_as: str = opt("", "register the trained codec in the MLflow Model Registry under "
                           "this name (NAME@ALIAS: also point ALIAS at the new version); it is "
                           "then models:/NAME/VERSION and models:/NAME@ALIAS")
    system_metrics: bool = opt(False, "log MLflow's system metrics (CPU, memory, disk, network, "
                               "GPU) as system/* every 10 s; also on when "
                               "$MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true, as in jobs that "
                               "slurm-launch and k8s-launch start")

    def check(self) -> None:
        if self.register_as:
            from taskcodec.model_registry import check_name

            check_name(self.register_as)
        if self.patch_size % 16:
            raise ConfigError(f"patch_size={self.patch_size} must be a multiple of 16 "
                              "(the codecs downsample by 16)")
        if self.monitor not in self.monitors:
            raise ConfigError(f"monitor={self.monitor!r} is not one of: "
                              f"{', '.join(self.monitors)}")


#: ``--recipe short-cpu``: CompressAI's recipe (lr 1e-4, 256-px crops, batch 16) spends a short
#: budget on few, slow steps at a learning rate made for days of training. A higher rate with a
#: warm-up and a cosine decay to the end of the budget, and smaller crops (4x the steps per
#: second), reach a given quality sooner; the real-bitstream RD check shows it while it trains.
#: The peak lr was chosen on make demo's codec (N=48, M=64, λ=0.013, 400 steps, held-out
#: images): 5e-4 ended at 1.23 bpp / 21.96 dB, 1e-3 at 0.94 / 22.39, 2e-3 at 0.58 / 22.48 (the
#: lowest loss), 4e-3 at 0.35 / 18.59 and 8e-3 at 0.11 / 17.67 (unstable).
SHORT_CPU: dict[str, Any] = {"lr": 2e-3, "lr_scheduler": "warmup-cosine", "warmup_steps": 100,
                             "patch_size": 128, "batch_size": 8, "epoch_length": 2000,
                             "rd_every": 1}


@dataclass
class TrainConfig(LoopConfig):
    """Settings of ``taskcodec train`` (and the MLflow entry point ``train``)."""

    entry_point: ClassVar[str] = "train"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"short-cpu": SHORT_CPU}
    monitors: ClassVar[tuple[str, ...]] = ("val_loss", "val_bpp", "val_psnr", "val_ms_ssim")
    architecture: ClassVar[tuple[str, ...]] = ("codec", "N", "M")

    codec: str = opt("bmshj2018-factorized", "codec architecture from the registry, sized by N "
                     "and M (cheng2020-*: N alone); mbt2018(-vbr) and cheng2020-* decode serially "
                     "(autoregressive context: slow on large images)",
                     choices=CODEC_NAMES)
    N: int = opt(128, "channels of the transforms (CompressAI's N; cheng2020-*: of the latent "
                 "too)", min=1, max=1024)
    M: int = opt(192, "channels of the latent (CompressAI's M; cheng2020-* have none: leave it "
                 "out or equal to N)", min=1, max=1024)
    lmbda: float = opt(0.0130, "rate-distortion trade-off: loss = bpp + lmbda * D",
                       min=0, min_exclusive=True, max=1e4)
    metric: str = opt("mse", "distortion D: mse (on the 255^2 scale) or ms-ssim (1 - MS-SSIM)",
                      choices=("mse", "ms-ssim"))
    max_side: int = opt(512, "downscale embedded images so the longer side is at most this",
                        min=64, max=8192)
    skip_bad: bool = opt(False, "skip unreadable or too-small images with a warning")
    cache_mb: int = opt(2048, "keep up to this many MB of decoded training images in memory: "
                        "crops of later epochs are cut without decoding again (0: off)",
                        min=0, max=1_000_000)
    rd_every: int = opt(0, "every this many epochs, code rd_images validation images with real "
                        "bitstreams and log test_bpp, test_psnr, test_bpp_gap (0: off)", min=0)
    rd_images: int = opt(2, "images of the real-bitstream RD check (the first of the "
                         "validation set)", min=1, max=1000)
    vbr_lambdas: str = opt("", f"variable-rate codecs ({', '.join(VBR_CODEC_NAMES)}): λ of "
                           f"each of the {VBR_LEVELS} rate points, comma-separated, lowest "
                           "rate first; each training batch samples a rate point and weighs its "
                           "distortion by its λ (lmbda is unused; empty: CompressAI's 0.0018, "
                           "0.0035, 0.0067, 0.013, 0.025, 0.0483, 0.0932, 0.18)")
    recipe: str = opt("", "named preset of settings beneath the ones you give: short-cpu "
                      "(make demo's; a good codec in minutes on a CPU) sets "
                      + ", ".join(f"{k}={v}" for k, v in SHORT_CPU.items())
                      + ": a higher lr, warmed up, then cosine-decayed to lr/10 at the end of "
                      "the budget (max_steps, max_minutes or epochs), smaller crops for more "
                      "steps in the time, validation and a real-bitstream RD point every "
                      "epoch of crops", choices=("", "short-cpu"))

    def check(self) -> None:
        super().check()
        # The hyperprior downsamples the latent 4 more times: other crops fail mid-training.
        if self.codec not in FACTORIZED_CODECS and self.patch_size % PAD_MULTIPLE:
            raise ConfigError(f"patch_size={self.patch_size} must be a multiple of {PAD_MULTIPLE} "
                              f"for codec={self.codec} (its hyperprior downsamples by {PAD_MULTIPLE})")
        # M's default stands for "not given": the cheng2020 models are sized by N alone.
        if self.codec in N_ONLY_CODECS and self.M not in (self.N, type(self).M):
            raise ConfigError(f"M={self.M} is not a size of codec={self.codec}: its latent has "
                              f"N={self.N} channels (leave M out, or set it equal to N)")
        if self.codec in N_ONLY_CODECS:  # what the params, checkpoint and model then say
            self.M = self.N
        if self.vbr_lambdas:
            if self.codec not in VBR_CODEC_NAMES:
                raise ConfigError(f"vbr_lambdas is for the variable-rate codecs "
                                  f"({', '.join(VBR_CODEC_NAMES)}), not codec={self.codec}")
            parse_vbr_lambdas(self.vbr_lambdas)

    def derived(self) -> set[str]:
        return {"M"} if self.codec in N_ONLY_CODECS else set()


def parse_vbr_lambdas(text: str) -> list[float]:
    """``vbr_lambdas``: VBR_LEVELS positive numbers, increasing (rate point 0 is the lowest)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"vbr_lambdas={text!r} is not a comma-separated list of numbers") from None
    if len(values) != VBR_LEVELS or not all(math.isfinite(v) and v > 0 for v in values) \
            or any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"vbr_lambdas={text!r} must be {VBR_LEVELS} increasing numbers > 0, "
                          "one per rate point")
    return values


def parse_rates(text: str) -> list[int] | None:
    """``evaluate --rate``: None for all rate points, else the listed indices (>= 0)."""
    if text.strip().lower() in ("", "all"):
        return None
    try:
        rates = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"rate={text!r} is not 'all' or comma-separated rate points "
                          "(0, 1, ...)") from None
    if any(r < 0 for r in rates) or len(set(rates)) != len(rates):
        raise ConfigError(f"rate={text!r} must list distinct rate points >= 0")
    return rates


TASK_MONITORS = ("auto", "val_loss", "val_bpp", "val_task_loss", "val_map", "val_map50", "val_miou",
                 "val_pixel_accuracy", "val_abs_rel", "val_rmse", "val_delta1", "val_accuracy",
                 "val_psnr", "val_disparity_rmse", "val_psnr_base")
#: The image-space task networks (torchvision builders, :mod:`taskcodec.tasks.image`) and the
#: task each serves; named here so that a config is checked without importing torch.
IMAGE_NETWORKS = {
    "fasterrcnn_resnet50_fpn_v2": "detection",
    "lraspp_mobilenet_v3_large": "depth",
    "deeplabv3_mobilenet_v3_large": "segmentation",
    "deeplabv3_resnet50": "segmentation",
}
#: ``task_network=image``: the network the papers' authors use for each task.
DEFAULT_IMAGE_NETWORKS = {"detection": "fasterrcnn_resnet50_fpn_v2",
                          "depth": "lraspp_mobilenet_v3_large",
                          "segmentation": "deeplabv3_mobilenet_v3_large"}
#: What feeds a base's task: a head on the latent, or a torchvision network on a synthesis of it.
TASK_NETWORKS = ("latent", "image", *IMAGE_NETWORKS)


def resolve_task_network(task: str, choice: str) -> str:
    """``"latent"`` or the torchvision network ``choice`` means for ``task`` (``"image"``: the
    authors' one); a one-line :class:`ConfigError` when it does not serve the task."""
    if choice == "latent":
        return choice
    if choice == "image":
        if task not in DEFAULT_IMAGE_NETWORKS:
            raise ConfigError(f"task_network=image is available for "
                              f"{', '.join(DEFAULT_IMAGE_NETWORKS)}, not task={task}")
        return DEFAULT_IMAGE_NETWORKS[task]
    if choice not in IMAGE_NETWORKS:
        raise ConfigError(f"task_network={choice!r} is not one of: {', '.join(TASK_NETWORKS)}")
    if IMAGE_NETWORKS[choice] != task:
        raise ConfigError(f"task_network={choice} is a {IMAGE_NETWORKS[choice]} network, not a "
                          f"{task} one")
    return choice


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
    task_network: str = opt("latent", "what runs the task: latent (a small head on the latent) "
                            "or a torchvision network on a synthesis of it, as the papers' "
                            "authors do (image: their network for the task)",
                            choices=TASK_NETWORKS)
    task_weights: str = opt("", "image-space networks: a torchvision state dict to start from "
                            "(a file, a file name in the torch hub cache, or 'hub' for "
                            "torchvision's default weights file there); never downloaded")
    detection_min_size: int = opt(0, "image-space detection: torchvision's resize of the "
                                  "shorter side (0: none; the authors keep torchvision's 800)",
                                  min=0, max=4096)
    synthesis_width: int = opt(0, "channels of the base's synthesis transforms (beta > 0 head, "
                               "probe, image-space task decoder; 0: N / 2)", min=0, max=1024)
    probe: bool = opt(True, "train a reconstruction probe on the detached latent (it cannot "
                      "shape the representation): the base layer's preview")
    depth_target: str = opt("depth", "task=depth: regress metric depth (m) or stereo disparity "
                            "(px, RMSE as the papers report)", choices=("depth", "disparity"))

    def check(self) -> None:
        super().check()
        if self.image_size % PAD_MULTIPLE:
            raise ConfigError(f"image_size={self.image_size} must be a multiple of {PAD_MULTIPLE}")
        if self.depth_target != "depth" and self.task != "depth":
            raise ConfigError(f"depth_target={self.depth_target} needs task=depth")
        if self.task_network != "latent":
            resolve_task_network(self.task, self.task_network)
        elif self.task_weights:
            raise ConfigError("task_weights loads a torchvision network: it needs "
                              "task_network=image (or a network name)")


@dataclass
class EnhancementConfig(LoopConfig):
    """Settings of ``taskcodec train-enhancement``: the layer an assisted target adds on top
    of a frozen base. loss = alpha * (bpp_base + bpp_enh) + distortion."""

    entry_point: ClassVar[str] = "train-enhancement"
    monitors: ClassVar[tuple[str, ...]] = ("val_loss", "val_bpp", "val_bpp_enh", "val_psnr",
                                           "val_ms_ssim", "val_miou")
    architecture: ClassVar[tuple[str, ...]] = ("method", "target", "N", "M",
                                               "condition_decoder")
    # Settings that differ from the --init-from weights' and still fit them: (stored, given).
    # upper is lower's model charged fewer bits; standalone-refit re-fits a conditional run.
    fits_weights: ClassVar[dict[str, frozenset]] = {"method": frozenset(
        {("lower", "upper"), ("upper", "lower"), ("conditional", "standalone-refit")})}

    base_run: str = opt("", "MLflow run id (or registered model models:/NAME@ALIAS, or "
                        "checkpoint path) of the trained base layer")
    data: str = opt("scenes", "'scenes' (procedural, embedded), coco:PATH or cityscapes:PATH")
    method: str = opt("conditional", "how the enhancement uses the base: conditional (its "
                      "entropy model is conditioned on it, as in both papers), "
                      "conditional-decoder (taskcodec's extension: the decoder too), residual "
                      "(codes the input minus a prediction from it), lower / upper (paper 1's "
                      "baselines: no base; charged base + own rate / own rate only), "
                      "standalone-refit (paper 2's standalone: re-fits only the entropy model "
                      "of the --init-from conditional run, condition zeroed); standalone is "
                      "the former name of lower, kept for stored runs",
                      choices=("conditional", "conditional-decoder", "residual", "lower",
                               "upper", "standalone-refit", "standalone"))
    target: str = opt("reconstruction", "what the enhancement serves",
                      choices=("reconstruction", "segmentation"))
    N: int = opt(64, "channels of the enhancement transforms", min=1, max=1024)
    M: int = opt(64, "channels of the enhancement latent", min=1, max=1024)
    alpha: float = opt(128.0, "weight of the rate: loss = alpha * (bpp_base + bpp_enh) + D, "
                       "with D = 255^2 * MSE (alpha = 1/lambda of CompressAI's convention: "
                       "64..512 spans its usual range) or the segmentation cross-entropy "
                       "(alpha around 0.05..1)", min=0, min_exclusive=True)
    condition_decoder: bool = opt(False, "the former spelling of method=conditional-decoder "
                                  "(with method=conditional); read from stored runs")
    cond_channels: int = opt(0, "width of the condition path, the base latent's features fed "
                             "to the entropy model (0: N)", min=0, max=1024)
    cond_layers: int = opt(3, "5x5 convolutions of the condition path (3 at width N: about "
                           "the residual predictor's parameters)", min=1, max=16)
    distortion: str = opt("mse", "reconstruction distortion D: mse (255^2 * MSE) or rmse "
                          "(255 * per-image RMSE, averaged: the papers' code)",
                          choices=("mse", "rmse"))
    ste: bool = opt(False, "quantise the enhancement latent by rounding with a straight-through "
                    "gradient in training (paper 2) instead of additive uniform noise")
    image_size: int = opt(128, "side of the procedural scenes / training crops", min=32,
                          max=4096)

    def check(self) -> None:
        super().check()
        if not self.base_run:
            raise ConfigError("base_run is required: the MLflow run id of a train-base run")
        if self.condition_decoder and self.method == "conditional":
            self.method = "conditional-decoder"  # a stored run's spelling
        self.condition_decoder = self.method == "conditional-decoder"
        if self.method == "standalone" and not self.resume:
            raise ConfigError("method=standalone is now named lower (paper 1's lower baseline; "
                              "upper: the same without the base's bits; paper 2's standalone "
                              "is standalone-refit)")
        if self.method == "standalone-refit" and not (self.init_from or self.resume):
            raise ConfigError("method=standalone-refit needs --init-from: the conditional run "
                              "whose entropy model it re-fits")
        if self.method == "residual" and self.target != "reconstruction":
            raise ConfigError("method=residual needs target=reconstruction "
                              "(use conditional for segmentation)")
        if self.distortion == "rmse" and self.target != "reconstruction":
            raise ConfigError("distortion=rmse is a reconstruction distortion: it needs "
                              "target=reconstruction")
        if self.image_size % PAD_MULTIPLE:
            raise ConfigError(f"image_size={self.image_size} must be a multiple of {PAD_MULTIPLE}")


@dataclass
class EvalConfig(Config):
    """Settings of ``taskcodec evaluate`` (and the MLflow entry point ``evaluate``)."""

    entry_point: ClassVar[str] = "evaluate"

    checkpoint: str = opt("", "MLflow run id whose checkpoint to evaluate, a registered model "
                          "(models:/NAME/VERSION or models:/NAME@ALIAS), a checkpoint path "
                          "(taskcodec's or CompressAI's) or compressai:ARCH:QUALITY")
    which: str = opt("best", "which checkpoint of the run: best or last",
                     choices=("best", "last"))
    codec: str = opt("", "codec of a CompressAI checkpoint whose weights fit several")
    data: str = opt("", "data to evaluate on: 'embedded', 'scenes', a folder/.zip/.tar of "
                    "images, coco:PATH or cityscapes:PATH (default: what the checkpoint was "
                    "trained on)")
    split: str = opt("auto", "split to evaluate: auto (every image of a folder without "
                     "train/val/test subfolders, else its test/ or val/; val of embedded, "
                     "scenes, coco, cityscapes), train, val, test or all",
                     choices=("auto", "train", "val", "test", "all"))
    max_images: int = opt(0, "evaluate at most this many images (0: all; procedural scenes: "
                          "exactly this many, 0: their default number)", min=0)
    data_seed: int = opt(-1, "procedural scenes: data seed of the evaluated set (-1: the "
                         "checkpoint's own, i.e. its validation set; another value gives "
                         "images distinct from those that selected the checkpoint)", min=-1)
    max_side: int = opt(512, "downscale embedded images so the longer side is at most this",
                        min=64, max=8192)
    jpeg: bool = opt(True, "measure the anchors at all (false: none; its name is from when "
                     "JPEG was the only one)")
    anchors: str = opt(",".join(ANCHORS), "classical codecs (Pillow) measured as references, "
                       "each per image at the quality whose bpp is nearest the codec's: a comma "
                       "list of " + ", ".join(ANCHORS) + ", or none")
    rate: str = opt("all", "variable-rate codecs: the rate points to evaluate, comma-separated "
                    f"(0 = lowest .. {VBR_LEVELS - 1}) or all; each is one evaluate run, and "
                    "compare draws them as one RD curve")
    device: str = opt("cpu", "cpu or cuda (entropy coding runs on the CPU)",
                      choices=("cpu", "cuda"))
    run_name: str = opt("", "MLflow run name (default: generated)")

    def check(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint is required: an MLflow run id or a checkpoint path")
        self.anchors = ",".join(parse_anchors(self.anchors, f"anchors={self.anchors!r}"))
        parse_rates(self.rate)
