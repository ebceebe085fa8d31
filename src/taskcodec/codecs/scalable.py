"""Two-layer scalable codecs for humans and machines.

* :class:`BaseModel` - a task base layer: an analysis transform and an entropy model whose
  quantized latent ``y_hat_b`` feeds a machine-task head. With ``beta > 0`` a light synthesis
  head also reconstructs the input from the same latent: the task-compatible representation
  of Choi & Bajić et al., "Towards Task-Compatible Compressible Representations" (ICME CfM
  2024), where the representation is rewarded for keeping input information.
* :class:`EnhancementModel` - what the assisted target (image reconstruction or segmentation)
  still needs on top of a frozen base, after "Conditional and Residual Methods in Scalable
  Coding for Humans and Machines" (ICME CfM 2023):

  - ``conditional``: the enhancement latent's entropy model is conditioned on ``y_hat_b``
    (its Gaussian parameters come from an entropy-parameters network over the hyper-decoder's
    output *and* features computed from ``y_hat_b``, p(y_e | z_e, y_b)), and so is its decoder;
  - ``residual``: a predictor synthesises the input from ``y_hat_b``; the enhancement codes the
    difference between the input and that prediction;
  - ``standalone``: the conditional architecture with the condition zeroed - the
    no-side-information baseline.

Every part keeps CompressAI's contract: ``forward`` returns likelihoods for training,
``compress`` returns entropy-coded strings, ``decompress`` inverts it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN
from compressai.models import CompressionModel
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from taskcodec.errors import ConfigError

ENTROPY_MODELS = ("factorized", "hyperprior")
METHODS = ("conditional", "residual", "standalone")
TARGETS = ("reconstruction", "segmentation")
BASE_TASKS = ("detection", "segmentation", "depth", "classification", "reconstruction")


def analysis(N: int, M: int, in_channels: int = 3) -> nn.Sequential:
    """Four stride-2 convolutions with GDN: image -> latent at 1/16 resolution."""
    return nn.Sequential(conv(in_channels, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N),
                         conv(N, M))


def synthesis(M: int, N: int, out_channels: int = 3) -> nn.Sequential:
    """The mirror of :func:`analysis`: latent at 1/16 resolution -> image."""
    return nn.Sequential(deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
                         deconv(N, N), GDN(N, inverse=True), deconv(N, out_channels))


class FactorizedCoder(nn.Module):
    """y -> y_hat with a fully factorized (non-parametric) density; one string per image."""

    def __init__(self, M: int) -> None:
        super().__init__()
        self.entropy_bottleneck = EntropyBottleneck(M)

    def forward(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        y_hat, likelihoods = self.entropy_bottleneck(y)
        return y_hat, {"y": likelihoods}

    def compress(self, y: Tensor, cond: Tensor | None = None) -> tuple[list, tuple, Tensor]:
        strings = self.entropy_bottleneck.compress(y)
        shape = tuple(y.shape[-2:])
        return [strings], shape, self.entropy_bottleneck.decompress(strings, shape)

    def decompress(self, strings: list, shape: tuple, cond: Tensor | None = None) -> Tensor:
        return self.entropy_bottleneck.decompress(strings[0], shape)


class HyperpriorCoder(nn.Module):
    """Mean-scale hyperprior (Minnen et al. 2018), optionally conditioned on side features.

    With ``cond_channels > 0`` the Gaussian parameters of y come from an entropy-parameters
    network over [h_s(z_hat), cond] (three 1x1 convolutions), which models p(y | z, cond) with
    more capacity than adding the condition to the hyper-decoder's input.
    """

    def __init__(self, M: int, N: int, cond_channels: int = 0) -> None:
        super().__init__()
        self.cond_channels = cond_channels
        self.h_a = nn.Sequential(conv(M, N, stride=1, kernel_size=3), nn.LeakyReLU(inplace=True),
                                 conv(N, N), nn.LeakyReLU(inplace=True), conv(N, N))
        self.h_s = nn.Sequential(deconv(N, M), nn.LeakyReLU(inplace=True),
                                 deconv(M, M * 3 // 2), nn.LeakyReLU(inplace=True),
                                 conv(M * 3 // 2, M * 2, stride=1, kernel_size=3))
        width = M * 2 + cond_channels
        self.entropy_parameters = nn.Sequential(
            nn.Conv2d(width, M * 10 // 3, 1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(M * 10 // 3, M * 8 // 3, 1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(M * 8 // 3, M * 2, 1))
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)

    def _params(self, z_hat: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        params = self.h_s(z_hat)
        if self.cond_channels:
            if cond is None:
                raise ValueError("this coder is conditional: give the condition features")
            params = torch.cat([params, cond], dim=1)
        scales, means = self.entropy_parameters(params).chunk(2, 1)
        return scales, means

    def forward(self, y: Tensor, cond: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.h_a(y)
        z_hat, z_likelihoods = self.entropy_bottleneck(z)
        scales, means = self._params(z_hat, cond)
        y_hat, y_likelihoods = self.gaussian_conditional(y, scales, means=means)
        return y_hat, {"y": y_likelihoods, "z": z_likelihoods}

    def compress(self, y: Tensor, cond: Tensor | None = None) -> tuple[list, tuple, Tensor]:
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        shape = tuple(z.shape[-2:])
        z_hat = self.entropy_bottleneck.decompress(z_strings, shape)
        scales, means = self._params(z_hat, cond)
        indexes = self.gaussian_conditional.build_indexes(scales)
        y_strings = self.gaussian_conditional.compress(y, indexes, means=means)
        y_hat = self.gaussian_conditional.decompress(y_strings, indexes, means=means)
        return [y_strings, z_strings], shape, y_hat

    def decompress(self, strings: list, shape: tuple, cond: Tensor | None = None) -> Tensor:
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        scales, means = self._params(z_hat, cond)
        indexes = self.gaussian_conditional.build_indexes(scales)
        return self.gaussian_conditional.decompress(strings[0], indexes, means=means)


def build_coder(kind: str, M: int, N: int, cond_channels: int = 0) -> nn.Module:
    if kind == "factorized":
        if cond_channels:
            raise ConfigError("a conditional entropy model needs entropy_model=hyperprior")
        return FactorizedCoder(M)
    if kind == "hyperprior":
        return HyperpriorCoder(M, N, cond_channels)
    raise ConfigError(f"entropy_model={kind!r} is not one of: {', '.join(ENTROPY_MODELS)}")


def _strings_of(strings: list, item: int = 0) -> list:
    return [s[item] if isinstance(s, list) else s for s in strings]


class BaseModel(CompressionModel):
    """The task base layer: g_a -> entropy model -> y_hat_b -> task head (+ light synthesis).

    ``task="reconstruction"`` makes the base a plain image codec (its synthesis is the task).
    """

    def __init__(self, *, N: int, M: int, task: str, entropy_model: str = "factorized",
                 num_classes: int = 1, synthesis_head: bool = False,
                 task_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if task not in BASE_TASKS:
            raise ConfigError(f"task={task!r} is not one of: {', '.join(BASE_TASKS)}")
        self.task_name, self.N, self.M = task, N, M
        self.g_a = analysis(N, M)
        self.coder = build_coder(entropy_model, M, N)
        if task == "reconstruction":
            self.task = None
            self.g_s = synthesis(M, N)
        else:
            from taskcodec.tasks import build_task

            self.task = build_task(task, in_channels=M, stride=16, num_classes=num_classes,
                                   **(task_kwargs or {}))
            # The task-compatible variant's reconstruction head: light (half width), since it
            # only has to keep the representation informative, not to be a good decoder.
            self.g_s = synthesis(M, max(N // 2, 8)) if synthesis_head else None

    def forward(self, x: Tensor, targets: list[dict] | None = None) -> dict[str, Any]:
        """Training/validation pass: likelihoods, the task output (losses in training mode,
        predictions in eval mode) and, when there is a synthesis, the reconstruction."""
        y = self.g_a(x)
        y_hat, likelihoods = self.coder(y)
        out: dict[str, Any] = {"y_hat": y_hat, "likelihoods": likelihoods}
        if self.g_s is not None:
            out["x_hat"] = self.g_s(y_hat)
        if self.task is not None:
            out["task"] = self.task(y_hat, tuple(x.shape[-2:]), targets)
        return out

    def compress(self, x: Tensor) -> dict[str, Any]:
        strings, shape, y_hat = self.coder.compress(self.g_a(x))
        return {"strings": strings, "shape": shape, "y_hat": y_hat}

    def decompress(self, strings: list, shape: tuple) -> dict[str, Tensor]:
        return {"y_hat": self.coder.decompress(strings, shape)}

    def run_task(self, y_hat: Tensor, image_size: tuple[int, int]) -> Any:
        """The machine task on a decoded base latent (eval mode: predictions)."""
        if self.task is None:
            return self.g_s(y_hat).clamp(0, 1)
        return self.task(y_hat, image_size, None)


class EnhancementModel(CompressionModel):
    """The enhancement layer for an assisted target, on top of a frozen base latent."""

    def __init__(self, *, N: int, M: int, M_base: int, method: str,
                 target: str = "reconstruction", num_classes: int = 1,
                 condition_decoder: bool = True) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"method={method!r} is not one of: {', '.join(METHODS)}")
        if target not in TARGETS:
            raise ConfigError(f"target={target!r} is not one of: {', '.join(TARGETS)}")
        if method == "residual" and target != "reconstruction":
            raise ConfigError("method=residual codes an image residual: it needs "
                              "target=reconstruction (use conditional for segmentation)")
        self.method, self.target, self.N, self.M = method, target, N, M
        self.condition_decoder = condition_decoder and method != "residual"
        self.g_a = analysis(N, M)
        out_channels = 3 if target == "reconstruction" else num_classes
        if method == "residual":
            self.predictor = synthesis(M_base, N)   # x_pred from y_hat_b
            self.coder = build_coder("hyperprior", M, N)
            self.g_s = synthesis(M, N)
        else:
            # Features of the base latent, at the enhancement latent's resolution.
            self.cond = nn.Sequential(nn.Conv2d(M_base, M, 3, padding=1), nn.LeakyReLU(inplace=True),
                                      nn.Conv2d(M, M, 3, padding=1))
            self.coder = build_coder("hyperprior", M, N, cond_channels=M)
            self.g_s = synthesis(M * 2 if self.condition_decoder else M, N, out_channels)

    def condition(self, y_hat_b: Tensor) -> Tensor:
        if self.method == "standalone":
            y_hat_b = torch.zeros_like(y_hat_b)  # no side information
        return self.cond(y_hat_b)

    def _decode(self, y_hat_e: Tensor, y_hat_b: Tensor, cond: Tensor | None) -> Tensor:
        if self.method == "residual":
            return self.predictor(y_hat_b) + self.g_s(y_hat_e)
        if self.condition_decoder:
            return self.g_s(torch.cat([y_hat_e, cond], dim=1))
        return self.g_s(y_hat_e)

    def _analyse(self, x: Tensor, y_hat_b: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.method == "residual":
            return self.g_a(x - self.predictor(y_hat_b)), None
        return self.g_a(x), self.condition(y_hat_b)

    def forward(self, x: Tensor, y_hat_b: Tensor) -> dict[str, Any]:
        y, cond = self._analyse(x, y_hat_b)
        y_hat, likelihoods = self.coder(y, cond)
        out = self._decode(y_hat, y_hat_b, cond)
        key = "x_hat" if self.target == "reconstruction" else "logits"
        return {key: out, "likelihoods": {f"{k}_e": v for k, v in likelihoods.items()}}

    def compress(self, x: Tensor, y_hat_b: Tensor) -> dict[str, Any]:
        y, cond = self._analyse(x, y_hat_b)
        strings, shape, _ = self.coder.compress(y, cond)
        return {"strings": strings, "shape": shape}

    def decompress(self, strings: list, shape: tuple, y_hat_b: Tensor) -> dict[str, Tensor]:
        cond = None if self.method == "residual" else self.condition(y_hat_b)
        y_hat = self.coder.decompress(strings, shape, cond)
        out = self._decode(y_hat, y_hat_b, cond)
        if self.target == "reconstruction":
            return {"x_hat": out.clamp(0, 1)}
        return {"logits": out}


class ScalableModel(CompressionModel):
    """A frozen base and its enhancement: what a two-layer bitstream is coded with."""

    def __init__(self, base: BaseModel, enhancement: EnhancementModel) -> None:
        super().__init__()
        self.base = base
        self.enhancement = enhancement
        for p in self.base.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> ScalableModel:
        super().train(mode)
        self.base.eval()  # frozen: its latent is what a decoder would see
        return self

    def base_latent(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            y_hat_b, likelihoods = self.base.coder(self.base.g_a(x))
        return y_hat_b, likelihoods

    def forward(self, x: Tensor) -> dict[str, Any]:
        y_hat_b, base_likelihoods = self.base_latent(x)
        out = self.enhancement(x, y_hat_b)
        out["base_likelihoods"] = {f"{k}_b": v for k, v in base_likelihoods.items()}
        out["y_hat_b"] = y_hat_b
        return out

    def compress(self, x: Tensor) -> dict[str, Any]:
        base = self.base.compress(x)
        enh = self.enhancement.compress(x, base["y_hat"])
        return {"layers": {"base": (base["strings"], base["shape"]),
                           "enhancement": (enh["strings"], enh["shape"])}}

    def decompress(self, layers: dict[str, tuple[list, tuple]]) -> dict[str, Tensor]:
        """The inverse of :meth:`compress`: ``layers`` maps a layer name to its (strings, shape).

        The base decodes alone (``{"base": ...}``: the machine task's latent ``y_hat_b``);
        with ``"enhancement"`` too, the assisted target (``x_hat`` or ``logits``) is added.
        """
        y_hat_b = self.base.decompress(*layers["base"])["y_hat"]
        out: dict[str, Tensor] = {"y_hat_b": y_hat_b}
        if "enhancement" in layers:
            out.update(self.enhancement.decompress(*layers["enhancement"], y_hat_b=y_hat_b))
        return out

    def aux_loss(self) -> Tensor:
        return self.enhancement.aux_loss()
