"""Single-layer codecs: CompressAI's reference architectures, built untrained with (N, M).

- bmshj2018-factorized: Ballé et al., "Variational image compression with a scale
  hyperprior" (ICLR 2018), factorized-prior baseline.
- bmshj2018-hyperprior: the same paper's scale hyperprior.
- mbt2018-mean: Minnen et al., "Joint autoregressive and hierarchical priors for learned image
  compression" (NeurIPS 2018), mean-scale hyperprior without the autoregressive context (which
  would make decoding sequential and slow on CPU).
"""

from __future__ import annotations

from compressai.models import FactorizedPrior, MeanScaleHyperprior, ScaleHyperprior

from taskcodec.codecs.registry import CODECS
from taskcodec.config import PAD_MULTIPLE  # noqa: F401  (how much each codec downsamples)


@CODECS.register("bmshj2018-factorized")
def bmshj2018_factorized(*, N: int, M: int) -> FactorizedPrior:
    return FactorizedPrior(N=N, M=M)


@CODECS.register("bmshj2018-hyperprior")
def bmshj2018_hyperprior(*, N: int, M: int) -> ScaleHyperprior:
    return ScaleHyperprior(N=N, M=M)


@CODECS.register("mbt2018-mean")
def mbt2018_mean(*, N: int, M: int) -> MeanScaleHyperprior:
    return MeanScaleHyperprior(N=N, M=M)
