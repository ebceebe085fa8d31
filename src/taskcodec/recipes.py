"""What each training entry point trains: its model, data, losses and validation.

The engine (:mod:`taskcodec.engine`) owns the loop, the MLflow run, checkpoints, signals and
resuming; a recipe owns the science. Three recipes:

* :class:`CodecRecipe` (``train``): a single-layer codec, loss = bpp + lmbda * D.
* :class:`BaseRecipe` (``train-base``): a task base layer, loss = alpha * bpp_base + task loss
  (+ beta * reconstruction MSE for a task-compatible representation).
* :class:`EnhancementRecipe` (``train-enhancement``): an enhancement layer over a frozen base
  loaded from an MLflow run, loss = alpha * (bpp_base + bpp_enh) + distortion.

Loss dicts name their parts; those names are the MLflow metric names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskcodec.codecs import rebuild
from taskcodec.codecs.scalable import charged_rate, method_tags
from taskcodec.codecs.single import vbr_lambdas
from taskcodec.config import (
    PAD_MULTIPLE,
    BaseConfig,
    EnhancementConfig,
    LoopConfig,
    TrainConfig,
    higher_is_better,
    resolve_task_network,
)
from taskcodec.data.transforms import crop_padding, pad_to_multiple
from taskcodec.errors import CheckpointError
from taskcodec.metrics import bpp_from_likelihoods, ms_ssim, psnr


class Recipe:
    """The science of one entry point; the engine calls these in this order."""

    config: LoopConfig
    collate: Callable | None = None

    @property
    def monitor(self) -> str:
        """The validation metric that picks the best checkpoint and drives early stopping."""
        return self.config.monitor

    def model_args(self) -> dict[str, Any]:
        """Everything needed to rebuild the model; stored in every checkpoint."""
        raise NotImplementedError

    @staticmethod
    def build_model(args: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def datasets(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def losses(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def validate(self, model: nn.Module, dataset: Any, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def tags(self) -> dict[str, str]:
        return {}

    def prepare(self) -> None:
        """Load and check what the recipe depends on before an MLflow run is created, so a
        bad setting (for example a base_run that is not a train-base run) leaves no run."""

    def trainable(self, model: nn.Module) -> nn.Module:
        """The part whose parameters the optimizers update (all of it by default)."""
        return model

    def initialise(self, model: nn.Module) -> None:
        """Set up a model that starts from scratch (not resumed, not init_from)."""

    def clip_groups(self, model: nn.Module) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped each on its own (one by default):
        a part trained apart, such as a probe, must not change the others' clipping."""
        return [list(model.parameters())]

    def model_params(self, model: nn.Module) -> dict[str, int]:
        """Parameter counts logged as MLflow params, so capacity is visible in the UI."""
        from taskcodec.codecs.scalable import parameter_counts

        counts = parameter_counts(model)
        counts["params_trainable"] = sum(p.numel() for p in self.trainable(model).parameters()
                                         if p.requires_grad)
        return counts


def _num_pixels(x: Tensor) -> int:
    return x.shape[0] * x.shape[-2] * x.shape[-1]


def _limit(dataset: Any, max_images: int) -> int:
    return len(dataset) if not max_images else min(max_images, len(dataset))


def _mean(sums: dict[str, float], count: int) -> dict[str, float]:
    return {k: v / max(count, 1) for k, v in sums.items()}


# -- single-layer codecs --------------------------------------------------------------------


class CodecRecipe(Recipe):
    def __init__(self, config: TrainConfig) -> None:
        from taskcodec.losses import RateDistortionLoss

        self.config = config
        self.criterion = RateDistortionLoss(lmbda=config.lmbda, metric=config.metric)
        # Variable-rate codecs: one criterion per rate point, each with that point's λ.
        self.rate_criteria = [RateDistortionLoss(lmbda=v, metric=config.metric)
                              for v in vbr_lambdas(config.codec, config.vbr_lambdas)]

    def model_args(self) -> dict[str, Any]:
        c = self.config
        return {"kind": "codec", "codec": c.codec, "N": c.N, "M": c.M}

    build_model = staticmethod(rebuild.build_codec_model)

    def datasets(self):
        from taskcodec.data import build_dataset

        c = self.config
        train = build_dataset(c.data, "train", patch_size=c.patch_size, seed=c.seed,
                              data_seed=c.data_seed, max_side=c.max_side, skip_bad=c.skip_bad,
                              epoch_length=c.epoch_length or None, cache_mb=c.cache_mb)
        val = build_dataset(c.data, "val", seed=c.seed, data_seed=c.data_seed,
                            max_side=c.max_side, skip_bad=c.skip_bad)
        return train, val

    def losses(self, model, batch, device):
        x = batch.to(device, non_blocking=True)
        if not self.rate_criteria:
            return self.criterion(model(x), x)
        # A variable-rate codec learns every rate point: each batch samples one (from the
        # seeded global generator, so every rank of a DDP run draws the same), weighed by its λ.
        rate = int(torch.randint(len(self.rate_criteria), ()))
        out = self.rate_criteria[rate](model(x, s=rate), x)
        out["vbr_rate"] = torch.tensor(float(rate))
        out["vbr_lmbda"] = torch.tensor(self.rate_criteria[rate].lmbda)
        return out

    def validate(self, model, dataset, device):
        """Loss, estimated bpp, PSNR and MS-SSIM over whole (padded) images, per image."""
        sums: dict[str, float] = {}
        count = _limit(dataset, self.config.max_val_images)
        # A variable-rate codec: the mean over its rate points, each with its own λ.
        points = [({}, self.criterion)] if not self.rate_criteria else \
            [({"s": rate}, criterion) for rate, criterion in enumerate(self.rate_criteria)]
        with torch.no_grad():
            for i in range(count):
                x = dataset[i].unsqueeze(0).to(device)
                padded, pads = pad_to_multiple(x, PAD_MULTIPLE)
                for kwargs, criterion in points:
                    out = model(padded, **kwargs)
                    out = {"x_hat": crop_padding(out["x_hat"], pads).clamp(0, 1),
                           "likelihoods": out["likelihoods"]}
                    parts = {k: float(v) for k, v in criterion(out, x).items()}
                    parts["psnr"] = psnr(x, out["x_hat"])
                    parts["ms_ssim"] = ms_ssim(x, out["x_hat"])
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
        result = {f"val_{k}": v for k, v in _mean(sums, count * len(points)).items()}
        result["val_bpp"] = result.pop("val_bpp_loss")
        return result

    def tags(self):
        tags = {"codec": self.config.codec, "method": self.config.codec}
        if self.rate_criteria:
            tags["vbr_lambdas"] = ",".join(f"{c.lmbda:g}" for c in self.rate_criteria)
        return tags


# -- scalable coding: the task base layer ---------------------------------------------------


def _task_datasets(config: BaseConfig | EnhancementConfig, task: str):
    from taskcodec.data import build_task_dataset

    extra = {"length": config.epoch_length} if config.data == "scenes" and config.epoch_length \
        else {}
    train = build_task_dataset(config.data, "train", task=task, size=config.image_size,
                               seed=config.seed, data_seed=config.data_seed, **extra)
    val = build_task_dataset(config.data, "val", task=task, size=config.image_size,
                             seed=config.seed, data_seed=config.data_seed)
    return train, val


def _class_counts(dataset: Any, task: str) -> int:
    if task == "segmentation":
        return len(dataset.seg_classes)
    if task in ("detection", "classification"):
        return len(dataset.classes)  # labels index .classes (0 is "__background__")
    return 1


class TaskEvaluator:
    """Accumulates a task's metrics over a data set (pure metric functions underneath)."""

    def __init__(self, task: str, num_classes: int, depth_target: str = "depth") -> None:
        from taskcodec.metrics import ConfusionMatrix

        self.task, self.num_classes, self.depth_target = task, num_classes, depth_target
        self.detections: list[dict] = []
        self.targets: list[dict] = []
        self.confusion = ConfusionMatrix(num_classes) if task == "segmentation" else None
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, prediction: Any, targets: list[dict], image: Tensor | None = None) -> None:
        from taskcodec.metrics import depth_errors

        if self.task == "detection":
            self.detections += [{k: v.detach().cpu() for k, v in p.items()} for p in prediction]
            self.targets += [{k: v for k, v in t.items() if k in ("boxes", "labels")}
                             for t in targets]
        elif self.task == "segmentation":
            mask = torch.stack([t["mask"] for t in targets]).to(prediction.device)
            self.confusion.update(prediction.argmax(1), mask)
        elif self.task == "depth":
            # Disparity is scored with the same errors, named disparity_* (RMSE in pixels).
            key = self.depth_target
            prefix = "" if key == "depth" else f"{key}_"
            reference = torch.stack([t[key] for t in targets]).to(prediction.device)
            for k, v in depth_errors(prediction[:, 0], reference).items():
                self.sums[prefix + k] = self.sums.get(prefix + k, 0.0) + v * len(targets)
            self.count += len(targets)
        elif self.task == "classification":
            labels = torch.stack([t["label"] for t in targets]).to(prediction.device)
            self.sums["accuracy"] = (self.sums.get("accuracy", 0.0)
                                     + float((prediction.argmax(1) == labels).sum()))
            self.count += len(targets)
        else:  # reconstruction
            x_hat = prediction
            self.sums["psnr"] = self.sums.get("psnr", 0.0) + psnr(image, x_hat) * len(x_hat)
            self.sums["ms_ssim"] = self.sums.get("ms_ssim", 0.0) + ms_ssim(image, x_hat) * len(x_hat)
            self.count += len(x_hat)

    def result(self) -> dict[str, float]:
        from taskcodec.metrics import detection_map

        if self.task == "detection":
            return detection_map(self.detections, self.targets, self.num_classes)
        if self.task == "segmentation":
            return self.confusion.compute()
        return _mean(self.sums, self.count)


class BaseRecipe(Recipe):
    def __init__(self, config: BaseConfig) -> None:
        from taskcodec.data import collate

        self.config = config
        self.collate = collate
        self._datasets = None

    def datasets(self):
        if self._datasets is None:
            self._datasets = _task_datasets(self.config, self.config.task)
        return self._datasets

    def model_args(self) -> dict[str, Any]:
        c = self.config
        train, _ = self.datasets()
        return {"kind": "base", "N": c.N, "M": c.M, "task": c.task,
                "entropy_model": c.entropy_model, "num_classes": _class_counts(train, c.task),
                "synthesis_head": c.beta > 0,
                "task_network": resolve_task_network(c.task, c.task_network),
                "synthesis_width": c.synthesis_width,
                "probe": c.probe and c.task != "reconstruction",
                "depth_target": c.depth_target, "detection_min_size": c.detection_min_size}

    build_model = staticmethod(rebuild.build_base)

    def _weights_file(self):
        from taskcodec.tasks.image import resolve_weights

        c = self.config
        return resolve_weights(c.task_weights, resolve_task_network(c.task, c.task_network))

    def prepare(self) -> None:
        if self.config.task_weights:
            self._weights_file()  # a missing file is refused before a run starts

    def initialise(self, model) -> None:
        if self.config.task_weights:
            model.task.load_network_weights(self._weights_file())

    def clip_groups(self, model):
        probe = [] if model.probe is None else list(model.probe.parameters())
        ids = {id(p) for p in probe}
        return [[p for p in model.parameters() if id(p) not in ids]] + ([probe] if probe else [])

    def _parts(self, model, x: Tensor, targets: list[dict], out: dict) -> dict[str, Tensor]:
        c = self.config
        bpp = bpp_from_likelihoods(out["likelihoods"], _num_pixels(x))
        if c.task == "reconstruction":
            mse = F.mse_loss(out["x_hat"], x)
            task = {"mse_loss": mse, "task_loss": 255 ** 2 * mse}
        else:
            task = {k: v for k, v in out["task"].items() if k != "loss"}
            task["task_loss"] = out["task"]["loss"]
        parts = {"bpp_loss": bpp, **task}
        loss = c.alpha * bpp + task["task_loss"]
        if c.beta > 0 and c.task != "reconstruction":
            parts["recon_mse"] = F.mse_loss(out["x_hat"], x)
            loss = loss + c.beta * parts["recon_mse"]
        if "x_probe" in out:
            # The probe sees a detached latent: this term trains the probe and nothing else.
            parts["probe_mse"] = F.mse_loss(out["x_probe"], x)
            loss = loss + parts["probe_mse"]
        parts["loss"] = loss
        return parts

    def losses(self, model, batch, device):
        images, targets = batch
        x = images.to(device, non_blocking=True)
        targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()}
                   for t in targets]
        return self._parts(model, x, targets, model(x, targets))

    def validate(self, model, dataset, device):
        c = self.config
        args = self.model_args()
        evaluator = TaskEvaluator(c.task, int(args["num_classes"]), c.depth_target)
        sums: dict[str, float] = {}
        count = _limit(dataset, c.max_val_images)
        with torch.no_grad():
            for i in range(count):
                image, target = dataset[i]
                x = image.unsqueeze(0).to(device)
                targets = [{k: v.to(device) if isinstance(v, Tensor) else v
                            for k, v in target.items()}]
                out = model(x)                      # eval mode: predictions, no task loss
                sums["bpp"] = sums.get("bpp", 0.0) + float(
                    bpp_from_likelihoods(out["likelihoods"], _num_pixels(x)))
                prediction = out["task"] if model.task is not None else out["x_hat"].clamp(0, 1)
                evaluator.add(prediction, targets, x)
                if c.beta > 0 and "x_hat" in out and model.task is not None:
                    sums["psnr"] = sums.get("psnr", 0.0) + psnr(x, out["x_hat"].clamp(0, 1))
                preview = model.preview(out["y_hat"]) if model.task is not None else None
                if preview is not None:  # what the base layer alone shows
                    sums["psnr_base"] = sums.get("psnr_base", 0.0) + psnr(x, preview)
        result = {f"val_{k}": v for k, v in _mean(sums, count).items()}
        result.update({f"val_{k}": v for k, v in evaluator.result().items()})
        return result

    @property
    def monitor(self) -> str:
        if self.config.monitor != "auto":
            return self.config.monitor
        if self.config.depth_target == "disparity":
            return "val_disparity_rmse"
        return {"detection": "val_map", "segmentation": "val_miou", "depth": "val_abs_rel",
                "classification": "val_accuracy",
                "reconstruction": "val_psnr"}[self.config.task]

    def tags(self):
        from taskcodec.codecs.scalable import synthesis_width_of

        c = self.config
        return {"method": f"base-{c.task}-beta{c.beta:g}", "task": c.task, "alpha": str(c.alpha),
                "beta": str(c.beta), "layer": "base", "entropy_model": c.entropy_model,
                "task_network": resolve_task_network(c.task, c.task_network),
                # The width in use (the synthesis_width param says 0 for the default).
                "synthesis_width": str(synthesis_width_of(c.N, c.synthesis_width))}


# -- scalable coding: the enhancement layer -------------------------------------------------


class EnhancementRecipe(Recipe):
    def __init__(self, config: EnhancementConfig) -> None:
        from taskcodec.data import collate

        self.config = config
        self.collate = collate
        self._datasets = None
        self._base = None

    def base(self):
        if self._base is None:
            self._base = rebuild.load_base(self.config.base_run)
        return self._base

    def prepare(self) -> None:
        self.base()
        if self.config.method == "standalone-refit" and not self.config.resume:
            self._check_refit_source()

    def _check_refit_source(self) -> None:
        """Paper 2's standalone re-fits the entropy model of a conditional run on this base."""
        from taskcodec import checkpoints
        from taskcodec.codecs.scalable import method_of

        c = self.config
        ckpt, _ = checkpoints.load_ref(c.init_from, "best")
        args = ckpt.get("model_args") or {}
        source = method_of(args) if args.get("kind") == "scalable" else args.get("kind", "codec")
        if source != "conditional":
            raise CheckpointError(f"init_from={c.init_from}: method=standalone-refit re-fits a "
                                  f"conditional run, not a {source} run")
        if args.get("base_fingerprint") != self.base()[1].get("fingerprint", ""):
            raise CheckpointError(f"init_from={c.init_from}: its base is not base_run="
                                  f"{c.base_run}")
        mine = self._condition_args()
        theirs = {k: args.get(k) for k in ("N", "M", "target", *mine)}
        wanted = {"N": c.N, "M": c.M, "target": c.target, **mine}
        if theirs != wanted:
            diff = ", ".join(f"{k}={theirs[k]} (not {wanted[k]})" for k in wanted
                             if theirs[k] != wanted[k])
            raise CheckpointError(f"init_from={c.init_from}: its enhancement has {diff}; "
                                  "give standalone-refit the same settings")

    def _condition_args(self) -> dict[str, int]:
        c = self.config
        return {"cond_channels": c.cond_channels or c.N, "cond_layers": c.cond_layers,
                "cond_kernel": 5}

    def datasets(self):
        if self._datasets is None:
            task = "segmentation" if self.config.target == "segmentation" else "reconstruction"
            self._datasets = _task_datasets(self.config, task)
        return self._datasets

    def model_args(self) -> dict[str, Any]:
        c = self.config
        base_model, ckpt = self.base()
        train, _ = self.datasets()
        num_classes = len(train.seg_classes) if c.target == "segmentation" else 3
        # The base's beta travels with its model args: evaluate tags runs with it.
        base = {**ckpt["model_args"], "beta": float(ckpt["config"].get("beta", 0.0))}
        return {"kind": "scalable", "base": base, "N": c.N, "M": c.M,
                "method": c.method, "target": c.target, "num_classes": num_classes,
                "condition_decoder": c.method == "conditional-decoder",
                **self._condition_args(), "base_fingerprint": ckpt.get("fingerprint", "")}

    def build_model(self, args):
        model = rebuild.build_scalable(args, self.base()[0])
        model.enhancement.coder.ste = self.config.ste
        return model

    def trainable(self, model):
        return model.enhancement

    def _parts(self, model, x: Tensor, targets: list[dict] | None, out: dict) -> dict[str, Tensor]:
        c = self.config
        pixels = _num_pixels(x)
        bpp_base = bpp_from_likelihoods(out["base_likelihoods"], pixels)
        bpp_enh = bpp_from_likelihoods(out["likelihoods"], pixels)
        parts = {"bpp_loss": charged_rate(c.method, bpp_base, bpp_enh), "bpp_base": bpp_base,
                 "bpp_enh": bpp_enh}
        if c.target == "reconstruction":
            parts["mse_loss"] = F.mse_loss(out["x_hat"], x)
            if c.distortion == "rmse":  # the papers' code: 255 * mean of per-image RMSE
                per_image = (out["x_hat"] - x).pow(2).flatten(1).mean(1)
                parts["rmse_loss"] = 255 * per_image.clamp_min(1e-12).sqrt().mean()
                distortion = parts["rmse_loss"]
            else:
                distortion = 255 ** 2 * parts["mse_loss"]
        else:
            mask = torch.stack([t["mask"] for t in targets]).to(x.device)
            parts["ce_loss"] = F.cross_entropy(out["logits"], mask, ignore_index=255)
            distortion = parts["ce_loss"]
        parts["loss"] = c.alpha * parts["bpp_loss"] + distortion
        return parts

    def losses(self, model, batch, device):
        images, targets = batch
        x = images.to(device, non_blocking=True)
        return self._parts(model, x, targets, model(x))

    def validate(self, model, dataset, device):
        c = self.config
        evaluator = TaskEvaluator("segmentation" if c.target == "segmentation" else
                                  "reconstruction", int(self.model_args()["num_classes"]))
        sums: dict[str, float] = {}
        count = _limit(dataset, c.max_val_images)
        with torch.no_grad():
            for i in range(count):
                image, target = dataset[i]
                x = image.unsqueeze(0).to(device)
                out = model(x)
                for k, v in self._parts(model, x, [target], out).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                prediction = out["x_hat"].clamp(0, 1) if c.target == "reconstruction" \
                    else out["logits"]
                evaluator.add(prediction, [target], x)
        result = {f"val_{k}": v for k, v in _mean(sums, count).items()}
        result["val_bpp"] = result.pop("val_bpp_loss")
        result.update({f"val_{k}": v for k, v in evaluator.result().items()})
        return result

    def tags(self):
        c = self.config
        _, ckpt = self.base()
        base_config = ckpt.get("config", {})
        tags = {"method": c.method, "target": c.target, "alpha": str(c.alpha), "layer": "enhancement",
                "task": str(base_config.get("task", "")), "beta": str(base_config.get("beta", "")),
                "base_alpha": str(base_config.get("alpha", "")), **method_tags(c.method)}
        if ckpt.get("run_id"):
            tags["base_run_id"] = ckpt["run_id"]
        return tags


def recipe_for(config: LoopConfig) -> Recipe:
    if isinstance(config, TrainConfig):
        return CodecRecipe(config)
    if isinstance(config, BaseConfig):
        return BaseRecipe(config)
    if isinstance(config, EnhancementConfig):
        return EnhancementRecipe(config)
    raise TypeError(f"no recipe for {type(config).__name__}")


__all__ = ["Recipe", "CodecRecipe", "BaseRecipe", "EnhancementRecipe", "recipe_for",
           "higher_is_better", "TaskEvaluator"]
