"""Single-layer codecs: CompressAI's image zoo (fixed-rate models), built untrained by size.

- bmshj2018-factorized: Ballé et al., "Variational image compression with a scale
  hyperprior" (ICLR 2018), factorized-prior baseline; -relu: the same with ReLU for GDN.
- bmshj2018-hyperprior: the same paper's scale hyperprior.
- mbt2018-mean: Minnen et al., "Joint autoregressive and hierarchical priors for learned image
  compression" (NeurIPS 2018), mean-scale hyperprior without the autoregressive context.
- mbt2018: the same paper's full model, with the context (:mod:`taskcodec.codecs.autoregressive`).
- cheng2020-anchor, cheng2020-attn: Cheng et al. (CVPR 2020), context models too.
- bmshj2018-hyperprior-vbr, mbt2018-mean-vbr, mbt2018-vbr: the two hyperpriors and mbt2018
  coding at several rates with one set of weights (see "variable-rate codecs" below).

Sizes follow CompressAI's zoo (``compressai.zoo.image.cfgs``): N channels in the transforms and
M in the latent; the cheng2020 models have N alone (their latent has N channels), so their
builders take M and leave it unused. The context models decode serially, one latent position
after the other, which makes them slow to decode large images.
"""

from __future__ import annotations

from compressai.models import FactorizedPrior, FactorizedPriorReLU, MeanScaleHyperprior, ScaleHyperprior
from compressai.models.vbr import MeanScaleHyperpriorVbr, ScaleHyperpriorVbr
from torch import nn

from taskcodec.codecs.autoregressive import Cheng2020Anchor, Cheng2020Attention, Mbt2018, Mbt2018Vbr
from taskcodec.codecs.registry import CODECS
from taskcodec.config import PAD_MULTIPLE, VBR_CODEC_NAMES, VBR_LEVELS  # noqa: F401  (PAD_MULTIPLE: how much each codec downsamples)
from taskcodec.errors import ConfigError


@CODECS.register("bmshj2018-factorized")
def bmshj2018_factorized(*, N: int, M: int) -> FactorizedPrior:
    return FactorizedPrior(N=N, M=M)


@CODECS.register("bmshj2018-factorized-relu")
def bmshj2018_factorized_relu(*, N: int, M: int) -> FactorizedPriorReLU:
    return FactorizedPriorReLU(N=N, M=M)


@CODECS.register("bmshj2018-hyperprior")
def bmshj2018_hyperprior(*, N: int, M: int) -> ScaleHyperprior:
    return ScaleHyperprior(N=N, M=M)


@CODECS.register("mbt2018-mean")
def mbt2018_mean(*, N: int, M: int) -> MeanScaleHyperprior:
    return MeanScaleHyperprior(N=N, M=M)


@CODECS.register("mbt2018")
def mbt2018(*, N: int, M: int) -> Mbt2018:
    return Mbt2018(N=N, M=M)


@CODECS.register("cheng2020-anchor")
def cheng2020_anchor(*, N: int, M: int) -> Cheng2020Anchor:
    del M  # not a size of this model (see the module docstring)
    return Cheng2020Anchor(N=N)


@CODECS.register("cheng2020-attn")
def cheng2020_attn(*, N: int, M: int) -> Cheng2020Attention:
    del M
    return Cheng2020Attention(N=N)


# -- variable-rate codecs -------------------------------------------------------------------
# Kamisli, Racapé and Choi, "Variable-Rate Learned Image Compression with Multi-Objective
# Optimization and Quantization-Reconstruction Offsets" (DCC 2024): one model codes at
# VBR_LEVELS rates. Rate point s (0: lowest) scales the latent by a learned gain Gain[s] (the
# inverse quantisation step) before rounding, and a small network (QuantABCD) moves each
# reconstruction off the bin centre. The rate is an argument of forward/compress/decompress
# (``s=``), not a weight: a file must say at which rate it was coded (its header does).
# mbt2018-vbr (the autoregressive one) decodes serially, through taskcodec's safe coder
# (taskcodec.codecs.autoregressive.Mbt2018Vbr).
# The hyper-latent keeps its fixed-step entropy bottleneck (vr_entbttlnck=False, CompressAI's
# default when building): CompressAI's EntropyBottleneckVbr is not one of its EntropyModels.


@CODECS.register("bmshj2018-hyperprior-vbr")
def bmshj2018_hyperprior_vbr(*, N: int, M: int) -> ScaleHyperpriorVbr:
    return ScaleHyperpriorVbr(N=N, M=M)


@CODECS.register("mbt2018-mean-vbr")
def mbt2018_mean_vbr(*, N: int, M: int) -> MeanScaleHyperpriorVbr:
    return MeanScaleHyperpriorVbr(N=N, M=M)


@CODECS.register("mbt2018-vbr")
def mbt2018_vbr(*, N: int, M: int) -> Mbt2018Vbr:
    return Mbt2018Vbr(N=N, M=M)


def rate_levels(model: nn.Module) -> int:
    """How many rate points ``model`` codes at (0: a fixed-rate codec)."""
    return len(model.Gain) if isinstance(model, ScaleHyperpriorVbr) else 0


def default_rate(model: nn.Module) -> int | None:
    """The rate point to code at when none is given: a variable-rate codec's highest (gain 1,
    the quantisation step of the model's fixed-rate parent); None for a fixed-rate codec."""
    levels = rate_levels(model)
    return levels - 1 if levels else None


def rate_kwargs(model: nn.Module, rate: int | None, name: str, error: type[Exception] = ConfigError
                ) -> dict[str, int]:
    """The arguments that select rate point ``rate`` in the model's forward/compress/decompress,
    or one ``error`` line when the codec cannot code at that rate."""
    levels = rate_levels(model)
    if not levels:
        if rate is not None:
            raise error(f"rate {rate} given, but {name} has a fixed rate (rates are for the "
                        f"variable-rate codecs: {', '.join(VBR_CODEC_NAMES)})")
        return {}
    if rate is None:
        raise error(f"{name} is a variable-rate codec: it needs a rate point from 0 to "
                    f"{levels - 1}")
    if isinstance(rate, bool) or not isinstance(rate, int) or not 0 <= rate < levels:
        raise error(f"rate {rate!r} is outside {name}'s range 0..{levels - 1}")
    return {"s": rate}


#: λ of each rate point that CompressAI's vbr models set in ``__init__`` (compressai 1.2.8,
#: pinned; a test checks them against a built model), lowest rate first.
VBR_DEFAULT_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.025, 0.0483, 0.0932, 0.18)


def vbr_lambdas(codec: str, text: str = "") -> list[float]:
    """λ of each rate point of the variable-rate ``codec`` ([] for a fixed-rate one): ``text``
    (comma-separated, checked by the config) or CompressAI's (VBR_DEFAULT_LAMBDAS)."""
    if codec not in VBR_CODEC_NAMES:
        return []
    lambdas = [float(v) for v in text.split(",")] if text.strip() else list(VBR_DEFAULT_LAMBDAS)
    if len(lambdas) != VBR_LEVELS:
        raise ConfigError(f"vbr_lambdas has {len(lambdas)} values; the model has "
                          f"{VBR_LEVELS} rate points")
    return lambdas
