"""Single-layer codecs: CompressAI's image zoo (fixed-rate models), built untrained by size.

- bmshj2018-factorized: Ballé et al., "Variational image compression with a scale
  hyperprior" (ICLR 2018), factorized-prior baseline; -relu: the same with ReLU for GDN.
- bmshj2018-hyperprior: the same paper's scale hyperprior.
- mbt2018-mean: Minnen et al., "Joint autoregressive and hierarchical priors for learned image
  compression" (NeurIPS 2018), mean-scale hyperprior without the autoregressive context.
- mbt2018: the same paper's full model, with the context (:mod:`taskcodec.codecs.autoregressive`).
- cheng2020-anchor, cheng2020-attn: Cheng et al. (CVPR 2020), context models too.

Sizes follow CompressAI's zoo (``compressai.zoo.image.cfgs``): N channels in the transforms and
M in the latent; the cheng2020 models have N alone (their latent has N channels), so their
builders take M and leave it unused. The context models decode serially, one latent position
after the other, which makes them slow to decode large images.
"""

from __future__ import annotations

from compressai.models import FactorizedPrior, FactorizedPriorReLU, MeanScaleHyperprior, ScaleHyperprior

from taskcodec.codecs.autoregressive import Cheng2020Anchor, Cheng2020Attention, Mbt2018
from taskcodec.codecs.registry import CODECS
from taskcodec.config import PAD_MULTIPLE  # noqa: F401  (how much each codec downsamples)


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
