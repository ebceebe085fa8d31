"""Two-layer scalable codecs for humans and machines.

* :class:`BaseModel` - a task base layer: an analysis transform and an entropy model whose
  quantized latent ``y_hat_b`` feeds a machine-task head. With ``beta > 0`` a light synthesis
  head also reconstructs the input from the same latent: adapted from the task-compatible
  representation of A. de Andrade and I. V. Bajić, "Towards Task-Compatible Compressible
  Representations" (ICME CfM 2024; "paper 2"), where the representation is rewarded for
  keeping input information.
* :class:`EnhancementModel` - what the assisted target (image reconstruction or segmentation)
  still needs on top of a frozen base, adapted from A. de Andrade, A. Harell, Y. Foroutan and
  I. V. Bajić, "Conditional and Residual Methods in Scalable Coding for Humans and Machines"
  (ICME CfM 2023; "paper 1"), and paper 2:

  - ``conditional`` (both papers): only the enhancement latent's *entropy model* is
    conditioned on ``y_hat_b`` - its Gaussian parameters come from an entropy-parameters
    network over the hyper-decoder's output and features computed from ``y_hat_b`` (the
    condition path), p(y_e | z_e, y_b); the decoder sees ``y_hat_e`` alone;
  - ``conditional-decoder`` (taskcodec's extension, not in the papers): the same, and the
    decoder also gets the condition features. It can imitate residual coding, so it is a
    different, stronger model; checkpoints of the former ``conditional`` with
    ``condition_decoder=True`` are this method;
  - ``residual`` (paper 1): a predictor synthesises the input from ``y_hat_b``; the
    enhancement codes the difference between the input and that prediction;
  - ``lower`` / ``upper`` (paper 1's baselines): the enhancement architecture without the
    base (no condition path). Both train the same model; ``lower`` (simulcast) is charged its
    own rate plus the base rate, ``upper`` its own rate only (the base bits are free);
  - ``standalone-refit`` (paper 2's "standalone"): the conditional architecture initialised
    from a trained ``conditional`` run with its transforms frozen and the condition zeroed;
    only the entropy model (condition path included) is re-fitted, which measures the bits
    the base saves for the same representation;
  - ``standalone`` (stored runs only): taskcodec's former no-side-information baseline, the
    conditional architecture with the condition zeroed, trained from scratch and charged the
    base rate - paper 1's lower baseline in another architecture. New runs use ``lower``.

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
METHODS = ("conditional", "conditional-decoder", "residual", "lower", "upper",
           "standalone-refit")
LEGACY_METHODS = ("standalone",)  # still loads and evaluates; new runs are refused
# Which paper defines each method (MLflow tag ``defined_by``), and which baseline it is.
DEFINED_BY = {"conditional": "paper1+paper2", "conditional-decoder": "taskcodec",
              "residual": "paper1", "lower": "paper1", "upper": "paper1",
              "standalone-refit": "paper2", "standalone": "taskcodec"}
BASELINE_OF = {"lower": "paper1-lower", "upper": "paper1-upper",
               "standalone-refit": "paper2-standalone", "standalone": "paper1-lower"}
CONDITIONED = ("conditional", "conditional-decoder", "standalone-refit", "standalone")
# The condition path of checkpoints written before it was configurable.
LEGACY_CONDITION = {"cond_layers": 2, "cond_kernel": 3}
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

    ``ste = True`` quantises y in training by rounding with a straight-through gradient (as
    paper 2) instead of CompressAI's additive uniform noise; evaluation is the same either way.
    """

    def __init__(self, M: int, N: int, cond_channels: int = 0) -> None:
        super().__init__()
        self.cond_channels = cond_channels
        self.ste = False
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
        if self.ste and self.training:
            from compressai.ops import quantize_ste

            gaussian = self.gaussian_conditional
            y_hat = quantize_ste(y - means) + means
            y_likelihoods = gaussian._likelihood(y_hat, scales, means)
            if gaussian.use_likelihood_bound:
                y_likelihoods = gaussian.likelihood_lower_bound(y_likelihoods)
        else:
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


def condition_path(in_channels: int, channels: int, layers: int, kernel: int) -> nn.Sequential:
    """Features of the base latent for the entropy model: ``layers`` convolutions (LeakyReLU
    between them), all ``channels`` wide, at the latent's resolution."""
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Conv2d(in_channels if i == 0 else channels, channels, kernel,
                                 padding=kernel // 2))
        if i < layers - 1:
            modules.append(nn.LeakyReLU(inplace=True))
    return nn.Sequential(*modules)


def charged_rate(method: str, bpp_base: Any, bpp_enh: Any) -> Any:
    """The rate a method is charged for: base + enhancement, except paper 1's upper baseline,
    whose base bits are free (the lower baseline, simulcast, pays both)."""
    return bpp_enh if method == "upper" else bpp_base + bpp_enh


def method_of(args: dict[str, Any]) -> str:
    """The method a checkpoint's ``model_args`` describe. Before ``conditional-decoder`` had its
    own name, ``conditional`` with ``condition_decoder=True`` (then the default) was it."""
    method = str(args["method"])
    if method == "conditional" and args.get("condition_decoder"):
        return "conditional-decoder"
    return method


def method_tags(method: str) -> dict[str, str]:
    """MLflow tags of a method: which paper defines it, which baseline it is, and whether its
    decoder sees the base - so compare can keep runs of different definitions apart."""
    tags = {"defined_by": DEFINED_BY.get(method, ""),
            "condition_decoder": str(method == "conditional-decoder").lower()}
    if method in BASELINE_OF:
        tags["baseline_of"] = BASELINE_OF[method]
    return tags


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters in total and per part (a scalable model: per part of its base and of its
    enhancement), named as MLflow params: ``params_total``, ``params_enh_condition``, ..."""
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    names = {"coder": "entropy_model", "cond": "condition"}
    out = {"params_total": count(model)}
    parts = ({"base": model.base, "enh": model.enhancement}
             if isinstance(model, ScalableModel) else {"": model})
    for prefix, part in parts.items():
        if prefix:
            out[f"params_{prefix}"] = count(part)
        for name, child in part.named_children():
            out["_".join(filter(None, ("params", prefix, names.get(name, name))))] = count(child)
    return out


def _strings_of(strings: list, item: int = 0) -> list:
    return [s[item] if isinstance(s, list) else s for s in strings]


def synthesis_width_of(N: int, width: int = 0) -> int:
    """The width of a base's synthesis transforms: ``width``, or by default half of N (at
    least 8) - light, since a probe or a beta > 0 head only has to show what y_hat keeps."""
    return width or max(N // 2, 8)


class BaseModel(CompressionModel):
    """The task base layer: g_a -> entropy model -> y_hat_b -> task network (+ synthesis).

    ``task="reconstruction"`` makes the base a plain image codec (its synthesis is the task).
    ``task_network`` is ``"latent"`` (a small head on the latent, :mod:`taskcodec.tasks`) or a
    torchvision network fed by a synthesis of the latent (:mod:`taskcodec.tasks.image`).
    ``probe=True`` adds a reconstruction probe: a synthesis trained on the *detached* latent,
    which measures how much of the input the base keeps without shaping it (paper 2's
    "Baseline" reconstruction); it is the base layer's preview. ``synthesis_width`` is the width
    of every synthesis of the base (the beta > 0 head, the probe, the image-space task decoder);
    0 means half of N (at least 8).
    """

    def __init__(self, *, N: int, M: int, task: str, entropy_model: str = "factorized",
                 num_classes: int = 1, synthesis_head: bool = False,
                 task_kwargs: dict[str, Any] | None = None, task_network: str = "latent",
                 synthesis_width: int = 0, probe: bool = False,
                 depth_target: str = "depth", detection_min_size: int = 0) -> None:
        super().__init__()
        if task not in BASE_TASKS:
            raise ConfigError(f"task={task!r} is not one of: {', '.join(BASE_TASKS)}")
        self.task_name, self.N, self.M = task, N, M
        self.synthesis_width = synthesis_width_of(N, synthesis_width)
        self.g_a = analysis(N, M)
        self.coder = build_coder(entropy_model, M, N)
        self.probe = None
        if task == "reconstruction":
            self.task = None
            self.g_s = synthesis(M, N)
            return
        kwargs = dict(task_kwargs or {})
        if task == "depth":
            kwargs.setdefault("target", depth_target)
        if task_network == "latent":
            from taskcodec.tasks import build_task

            self.task = build_task(task, in_channels=M, stride=16, num_classes=num_classes,
                                   **kwargs)
        else:
            from taskcodec.tasks.image import build_image_task

            if task == "detection":
                kwargs.setdefault("min_size", detection_min_size)
            self.task = build_image_task(task_network, synthesis=synthesis(M, self.synthesis_width),
                                         in_channels=M, stride=16, num_classes=num_classes,
                                         **kwargs)
        # The task-compatible variant's reconstruction head: light by default, since it only
        # has to keep the representation informative, not to be a good decoder.
        self.g_s = synthesis(M, self.synthesis_width) if synthesis_head else None
        if probe:
            self.probe = synthesis(M, self.synthesis_width)

    def forward(self, x: Tensor, targets: list[dict] | None = None) -> dict[str, Any]:
        """Training/validation pass: likelihoods, the task output (losses in training mode,
        predictions in eval mode), the reconstruction when there is a synthesis and the
        probe's reconstruction ``x_probe`` (from the detached latent) when there is a probe."""
        y = self.g_a(x)
        y_hat, likelihoods = self.coder(y)
        out: dict[str, Any] = {"y_hat": y_hat, "likelihoods": likelihoods}
        if self.g_s is not None:
            out["x_hat"] = self.g_s(y_hat)
        if self.probe is not None:
            out["x_probe"] = self.probe(y_hat.detach())
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

    def preview(self, y_hat: Tensor) -> Tensor | None:
        """The image the base layer alone shows a human: the probe's reconstruction, else the
        beta > 0 synthesis head's; None for a task base with neither (or a codec base, whose
        task is the reconstruction)."""
        head = self.probe if self.probe is not None else (
            self.g_s if self.task is not None else None)
        return None if head is None else head(y_hat).clamp(0, 1)


class EnhancementModel(CompressionModel):
    """The enhancement layer for an assisted target, on top of a frozen base latent (the
    methods are described in the module docstring).

    ``cond_channels`` (0: N), ``cond_layers`` and ``cond_kernel`` size the condition path;
    by default it has about the residual predictor's parameters (three 5x5 layers N wide vs
    four 5x5 transposed convolutions N wide), so methods compete at comparable capacity.
    """

    def __init__(self, *, N: int, M: int, M_base: int, method: str,
                 target: str = "reconstruction", num_classes: int = 1,
                 condition_decoder: bool = False, cond_channels: int = 0, cond_layers: int = 3,
                 cond_kernel: int = 5) -> None:
        super().__init__()
        if method == "conditional" and condition_decoder:
            method = "conditional-decoder"  # the former spelling
        if method not in METHODS + LEGACY_METHODS:
            raise ConfigError(f"method={method!r} is not one of: {', '.join(METHODS)}")
        if target not in TARGETS:
            raise ConfigError(f"target={target!r} is not one of: {', '.join(TARGETS)}")
        if method == "residual" and target != "reconstruction":
            raise ConfigError("method=residual codes an image residual: it needs "
                              "target=reconstruction (use conditional for segmentation)")
        self.method, self.target, self.N, self.M = method, target, N, M
        self.condition_decoder = (method == "conditional-decoder"
                                  or (method == "standalone" and condition_decoder))
        self.g_a = analysis(N, M)
        out_channels = 3 if target == "reconstruction" else num_classes
        if method == "residual":
            self.predictor = synthesis(M_base, N)   # x_pred from y_hat_b
            self.coder = build_coder("hyperprior", M, N)
            self.g_s = synthesis(M, N)
        elif method in CONDITIONED:
            # Features of the base latent, at the enhancement latent's resolution.
            width = cond_channels or N
            self.cond = condition_path(M_base, width, cond_layers, cond_kernel)
            self.coder = build_coder("hyperprior", M, N, cond_channels=width)
            self.g_s = synthesis(M + width if self.condition_decoder else M, N, out_channels)
        else:  # lower, upper: the same architecture without the base
            self.coder = build_coder("hyperprior", M, N)
            self.g_s = synthesis(M, N, out_channels)
        if method == "standalone-refit":
            # Paper 2's standalone: the representation is the source run's; only the entropy
            # model (the condition path is part of it) learns.
            for p in (*self.g_a.parameters(), *self.g_s.parameters()):
                p.requires_grad_(False)

    def entropy_model_parameter_names(self) -> list[str]:
        """Names of the entropy model's parameters (condition path included)."""
        return [n for n, _ in self.named_parameters() if n.startswith(("coder.", "cond."))]

    def decode(self, y_hat_e: Tensor, y_hat_b: Tensor) -> Tensor:
        """The target (unclamped) from a decoded enhancement latent and the base latent."""
        return self._decode(y_hat_e, y_hat_b, self._condition_or_none(y_hat_b))

    def condition(self, y_hat_b: Tensor) -> Tensor:
        if self.method in ("standalone", "standalone-refit"):
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
        return self.g_a(x), self._condition_or_none(y_hat_b)

    def _condition_or_none(self, y_hat_b: Tensor) -> Tensor | None:
        return self.condition(y_hat_b) if self.method in CONDITIONED else None

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
        cond = self._condition_or_none(y_hat_b)
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
